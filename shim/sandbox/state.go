package sandbox

import (
	"cmp"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/colo-runtime/colo/config"
	"github.com/colo-runtime/colo/placement"
	"github.com/colo-runtime/colo/vfio"
)

// Names inside the sandbox directory (docs/architecture.md).
const (
	stateFile       = "state.json"
	vmDir           = "vm"
	virtiofsdSocket = "virtiofsd.sock"

	// BundleFile is the file in a container's bundle that holds the
	// sandbox directory, so that `shim delete` finds it after a crash.
	BundleFile = "colo-sandbox"
)

// StateVersion is the version of State this shim writes. Cleanup refuses
// a record of a later version: it may name resources this shim does not
// know how to undo, and a half cleanup that then removes the record would
// leak them for good. Version 0 is the unversioned record of earlier
// shims: the same meaning, fewer fields, the hypervisor's configuration
// under "hypervisor".
//
// Version 2 records VFIO: a shim of version 1 would not give those devices
// back. Version 3 records a systemd scope and the slice cgroups made for
// it (CgroupMade): a shim of version 2 would leave them.
const StateVersion = 3

// State is the sandbox record: what a sandbox is, on disk, so that a later
// process can clean up after a crashed shim (`shim delete`, Cleanup)
// without anything else: no configuration, no hypervisor driver. Each
// resource is recorded before it is made (or, where only making it tells
// what it is, such as a process's pid, its owner leaves a trace Cleanup
// finds by itself until then), and stays recorded until it is gone.
type State struct {
	Version int `json:"version"`
	// Dir is the sandbox directory itself; Cleanup refuses to touch a
	// directory whose state does not name it.
	Dir string `json:"dir"`
	ID  string `json:"id"`
	// Pod names the Kubernetes pod the sandbox is, where CRI said
	// (colo resize finds a sandbox by it).
	Pod *PodName `json:"pod,omitempty"`
	// Config is the sandbox's configuration. Cleanup reads only the
	// hypervisor's name in it, to pick that hypervisor's cleanup.
	Config config.Config `json:"config"`
	// HypervisorPid and HypervisorStart (field 22 of /proc/<pid>/stat)
	// name the hypervisor process, so that a reused pid is never killed.
	// Until they are written the driver's own files in vm/ lead to it.
	HypervisorPid   int    `json:"hypervisor_pid,omitempty"`
	HypervisorStart uint64 `json:"hypervisor_start,omitempty"`
	VirtiofsdPid    int    `json:"virtiofsd_pid,omitempty"`
	// Sockets are the sockets the sandbox has a helper listen on,
	// relative to Dir; a helper is found by its socket (in its command
	// line) until its pid is recorded.
	Sockets []string `json:"sockets,omitempty"`
	// NetNS is the pod's network namespace, where Mirrors are.
	NetNS   string        `json:"netns,omitempty"`
	Mirrors []MirrorState `json:"mirrors,omitempty"`
	// Cgroup is the host cgroup the VM's threads were placed under.
	Cgroup string `json:"cgroup,omitempty"`
	// CgroupMade is what placing them made beyond Cgroup's tree: the
	// systemd scope Cgroup is, or the slice cgroups above it made where
	// systemd does not run.
	CgroupMade placement.Made `json:"cgroup_made,omitzero"`
	// Mounts are the mounts the shim made, relative to Dir, in the
	// order made: only these are ever unmounted.
	Mounts []string `json:"mounts,omitempty"`
	// Containers are the sandbox's containers, from before their rootfs
	// is mounted until it is unmounted.
	Containers []ContainerState `json:"containers,omitempty"`
	// Disks are the disks attached to the VM (a container's block
	// rootfs, a pod's io.colo.disks), from before they are attached until
	// they are detached. The VM holds each by a copy of an open file, not
	// by name: nothing of a disk outlives the VM, so a record naming them
	// needs no newer StateVersion and Cleanup has only the VM to stop.
	Disks []DiskState `json:"disks,omitempty"`
	// VFIO are the host PCI devices bound to vfio-pci for the VM, each
	// with the drivers its IOMMU group had (vfio.go), from before the
	// first is rebound until all are given back.
	VFIO []vfio.Binding `json:"vfio,omitempty"`
}

// DiskState records a disk attached to the VM.
type DiskState struct {
	// ID is the disk's in the VM (hypervisor.Disk.ID).
	ID string `json:"id"`
	// Container is the container whose rootfs the disk is; "" for a
	// pod's disk.
	Container string `json:"container,omitempty"`
	// Source is the host block device or image file.
	Source string `json:"source"`
}

// PodName is a Kubernetes pod's identity, from CRI's sandbox annotations.
type PodName struct {
	Name      string `json:"name"`
	Namespace string `json:"namespace"`
	UID       string `json:"uid"`
}

// CRI's annotations of the pod's identity on its sandbox.
const (
	SandboxNameAnnotation      = "io.kubernetes.cri.sandbox-name"
	SandboxNamespaceAnnotation = "io.kubernetes.cri.sandbox-namespace"
	SandboxUIDAnnotation       = "io.kubernetes.cri.sandbox-uid"
)

// podNameOf is the pod spec's annotations name, or nil.
func podNameOf(annotations map[string]string) *PodName {
	p := &PodName{
		Name:      annotations[SandboxNameAnnotation],
		Namespace: annotations[SandboxNamespaceAnnotation],
		UID:       annotations[SandboxUIDAnnotation],
	}
	if p.Name == "" {
		return nil
	}
	return p
}

// ContainerState records a container of the sandbox.
type ContainerState struct {
	ID     string `json:"id"`
	Bundle string `json:"bundle"`
}

// newState is the record of a sandbox that has nothing yet.
func newState(dir, id string, cfg config.Config) State {
	return State{Version: StateVersion, Dir: dir, ID: id, Config: cfg}
}

// updateState changes the sandbox's record and writes it.
func (s *Sandbox) updateState(change func(*State)) error {
	s.stateMu.Lock()
	defer s.stateMu.Unlock()
	change(&s.state)
	return writeState(s.dir, s.state)
}

// recorded is the sandbox's record as it stands.
func (s *Sandbox) recorded() State {
	s.stateMu.Lock()
	defer s.stateMu.Unlock()
	return s.state
}

// recordContainer adds a container to the record, before anything of it
// is made on the host.
func (s *Sandbox) recordContainer(id, bundle string) error {
	return s.updateState(func(st *State) {
		st.Containers = slices.DeleteFunc(st.Containers, func(c ContainerState) bool { return c.ID == id })
		st.Containers = append(st.Containers, ContainerState{ID: id, Bundle: bundle})
	})
}

// forgetContainer drops a container from the record once nothing of it is
// left on the host.
func (s *Sandbox) forgetContainer(id string) error {
	return s.updateState(func(st *State) {
		st.Containers = slices.DeleteFunc(st.Containers, func(c ContainerState) bool { return c.ID == id })
	})
}

// recordDisk adds a disk to the record before it is attached.
func (s *Sandbox) recordDisk(d DiskState) error {
	return s.updateState(func(st *State) {
		st.Disks = slices.DeleteFunc(st.Disks, func(o DiskState) bool { return o.ID == d.ID })
		st.Disks = append(st.Disks, d)
	})
}

// forgetDisk drops a disk from the record once the VM has let go of it.
func (s *Sandbox) forgetDisk(id string) error {
	return s.updateState(func(st *State) {
		st.Disks = slices.DeleteFunc(st.Disks, func(d DiskState) bool { return d.ID == id })
	})
}

func writeState(dir string, st State) error {
	b, err := json.MarshalIndent(st, "", "  ")
	if err != nil {
		return fmt.Errorf("encode sandbox state: %w", err)
	}
	tmp := filepath.Join(dir, "."+stateFile)
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return fmt.Errorf("write sandbox state: %w", err)
	}
	if err := os.Rename(tmp, filepath.Join(dir, stateFile)); err != nil {
		return fmt.Errorf("write sandbox state: %w", err)
	}
	if stateWritten != nil {
		stateWritten(st)
	}
	return nil
}

// stateWritten, if set, is called after each write of a record: tests
// crash the shim there, before the resource just recorded is made.
var stateWritten func(State)

// ReadState reads the state of the sandbox in dir.
func ReadState(dir string) (State, error) {
	var st State
	p := filepath.Join(dir, stateFile)
	b, err := os.ReadFile(p)
	if err != nil {
		return st, err
	}
	// The version first: a later one may not even decode as this one.
	var v struct {
		Version int `json:"version"`
	}
	if err := json.Unmarshal(b, &v); err != nil {
		return st, fmt.Errorf("sandbox state %s: %w", p, err)
	}
	switch {
	case v.Version > StateVersion:
		return st, fmt.Errorf("sandbox state %s: version %d is newer than this shim's %d: clean up with the shim that made it", p, v.Version, StateVersion)
	case v.Version < 0:
		return st, fmt.Errorf("sandbox state %s: version %d", p, v.Version)
	}
	if err := json.Unmarshal(b, &st); err != nil {
		return st, fmt.Errorf("sandbox state %s: %w", p, err)
	}
	if st.Version == 0 {
		var v0 struct {
			Hypervisor config.Hypervisor `json:"hypervisor"`
		}
		if err := json.Unmarshal(b, &v0); err != nil {
			return st, fmt.Errorf("sandbox state %s: %w", p, err)
		}
		// Read as the current version, so that what Cleanup writes back
		// is one.
		st.Config.Hypervisor = v0.Hypervisor
		st.Version = StateVersion
	}
	if st.Config.Hypervisor.Type == "" {
		// Written before hypervisor.name became hypervisor.type: the
		// driver's name is under its old key.
		var named struct {
			Config struct {
				Hypervisor struct{ Name string }
			} `json:"config"`
			Hypervisor struct{ Name string } `json:"hypervisor"`
		}
		if err := json.Unmarshal(b, &named); err != nil {
			return st, fmt.Errorf("sandbox state %s: %w", p, err)
		}
		st.Config.Hypervisor.Type = cmp.Or(named.Config.Hypervisor.Name, named.Hypervisor.Name)
	}
	if st.Dir != dir {
		return st, fmt.Errorf("sandbox state %s names directory %q", p, st.Dir)
	}
	return st, nil
}

// writeBundleFile records the sandbox directory dir in a bundle and
// returns the file's path.
func writeBundleFile(bundle, dir string) (string, error) {
	f := filepath.Join(bundle, BundleFile)
	if err := os.WriteFile(f, []byte(dir+"\n"), 0o600); err != nil {
		return "", fmt.Errorf("write %s: %w", f, err)
	}
	return f, nil
}

// ReadBundleFile returns the sandbox directory recorded in a bundle, or ""
// if the bundle has none.
func ReadBundleFile(bundle string) (string, error) {
	b, err := os.ReadFile(filepath.Join(bundle, BundleFile))
	if errors.Is(err, os.ErrNotExist) {
		return "", nil
	}
	if err != nil {
		return "", err
	}
	dir := strings.TrimSpace(string(b))
	if !filepath.IsAbs(dir) || filepath.Clean(dir) != dir || dir == "/" {
		return "", fmt.Errorf("%s: %q is not a sandbox directory", filepath.Join(bundle, BundleFile), dir)
	}
	return dir, nil
}
