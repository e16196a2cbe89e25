package sandbox

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path"
	"path/filepath"
	"slices"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/colo-runtime/colo/agentproto"
)

// ReadSpec reads the OCI spec (config.json) of a bundle.
func ReadSpec(bundle string) (*specs.Spec, error) {
	b, err := os.ReadFile(filepath.Join(bundle, "config.json"))
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, errdefs.ErrInvalidArgument.WithMessage(fmt.Sprintf("bundle %s has no config.json", bundle))
		}
		return nil, fmt.Errorf("read OCI spec: %w", err)
	}
	var s specs.Spec
	if err := json.Unmarshal(b, &s); err != nil {
		return nil, errdefs.ErrInvalidArgument.WithMessage(fmt.Sprintf("bundle %s: config.json: %v", bundle, err))
	}
	return &s, nil
}

func invalidSpec(format string, args ...any) error {
	return errdefs.ErrInvalidArgument.WithMessage("invalid OCI spec: " + fmt.Sprintf(format, args...))
}

// ValidateSpec checks, on the host and before any VM starts, what the guest
// would otherwise reject late or what colo cannot do yet. Errors are
// errdefs.ErrInvalidArgument or, for what is valid but not supported yet,
// errdefs.ErrNotImplemented.
func ValidateSpec(s *specs.Spec) error {
	if s == nil {
		return invalidSpec("empty")
	}
	p := s.Process
	switch {
	case p == nil:
		return invalidSpec("no process")
	case len(p.Args) == 0:
		return invalidSpec("process.args is empty")
	case p.Args[0] == "":
		return invalidSpec("process.args[0] is empty")
	case p.Cwd == "":
		return invalidSpec("process.cwd is empty")
	case !path.IsAbs(p.Cwd):
		return invalidSpec("process.cwd %q is not absolute", p.Cwd)
	case s.Root == nil || s.Root.Path == "":
		return invalidSpec("no root.path")
	case s.Linux == nil:
		return invalidSpec("no linux section")
	}
	for i, m := range s.Mounts {
		if m.Destination == "" || !path.IsAbs(m.Destination) {
			return invalidSpec("mounts[%d].destination %q is not absolute", i, m.Destination)
		}
		if isBind(m) && !filepath.IsAbs(m.Source) {
			return invalidSpec("mounts[%d] (%s): bind source %q is not an absolute host path", i, m.Destination, m.Source)
		}
	}
	return nil
}

func isBind(m specs.Mount) bool {
	return m.Type == "bind" || slices.Contains(m.Options, "bind") || slices.Contains(m.Options, "rbind")
}

// RootfsPath is where a container's rootfs is in the guest.
func RootfsPath(containerID string) string {
	return path.Join(agentproto.SharedMountPoint, containerID, "rootfs")
}

// guestView is what GuestSpec needs to know of the sandbox.
type guestView struct {
	// binds maps the index of a bind mount in the spec to the guest path
	// its host source is shared at.
	binds map[int]string
	// podPid is the guest pid of the pod's first container, whose
	// namespaces the pod's other containers join; 0 for none.
	podPid uint32
	// class is the container's CPU class, if it asks for one.
	class *agentproto.CPUClass
	// topology mounts the guest's topology file into the container.
	topology bool
}

// nsProcName is a namespace's name under /proc/PID/ns.
var nsProcName = map[specs.LinuxNamespaceType]string{
	specs.PIDNamespace:    "pid",
	specs.IPCNamespace:    "ipc",
	specs.UTSNamespace:    "uts",
	specs.CgroupNamespace: "cgroup",
	specs.TimeNamespace:   "time",
}

// GuestSpec returns a copy of s for the guest: root.path points into the
// shared directory (root.readonly is kept), bind mounts take their sources
// from there too, hooks are dropped (they name host binaries), and host
// namespace paths are rewritten. A network namespace to join (the pod's,
// on the host) becomes the VM's own network namespace, where the pod's
// interfaces are; a pod's other namespaces to join (the sandbox
// container's, by its host pid) become those of the pod's first container
// in the guest; anything else to join becomes new.
func GuestSpec(ctx context.Context, s *specs.Spec, containerID string, v guestView) (*specs.Spec, error) {
	b, err := json.Marshal(s)
	if err != nil {
		return nil, fmt.Errorf("copy OCI spec: %w", err)
	}
	var g specs.Spec
	if err := json.Unmarshal(b, &g); err != nil {
		return nil, fmt.Errorf("copy OCI spec: %w", err)
	}
	if g.Root == nil {
		g.Root = &specs.Root{}
	}
	g.Root.Path = RootfsPath(containerID)
	for i, src := range v.binds {
		g.Mounts[i].Source = src
	}
	if g.Hooks != nil {
		log.G(ctx).WithField("hooks", g.Hooks).Debug("dropping OCI hooks: they would run in the guest")
		g.Hooks = nil
	}
	if v.topology {
		g.Mounts = append(g.Mounts, specs.Mount{Destination: agentproto.TopologyFile, Type: "bind",
			Source: agentproto.TopologyFile, Options: []string{"rbind", "ro"}})
	}
	if c := v.class; c != nil {
		if g.Linux == nil {
			g.Linux = &specs.Linux{}
		}
		g.Linux.CgroupsPath = path.Join(agentproto.ClassCgroup(c.GetName()), containerID)
		if g.Process != nil {
			adj := int(c.GetOomScoreAdj())
			g.Process.OOMScoreAdj = &adj
		}
	}
	if g.Linux != nil {
		var nss []specs.LinuxNamespace
		for _, ns := range g.Linux.Namespaces {
			if ns.Path != "" {
				if ns.Type == specs.NetworkNamespace {
					continue
				}
				host := ns.Path
				ns.Path = ""
				if name, ok := nsProcName[ns.Type]; ok && v.podPid != 0 {
					ns.Path = fmt.Sprintf("/proc/%d/ns/%s", v.podPid, name)
				}
				log.G(ctx).WithFields(log.Fields{"type": ns.Type, "host": host, "guest": ns.Path}).Debug("namespace path rewritten for the guest")
			}
			nss = append(nss, ns)
		}
		g.Linux.Namespaces = nss
	}
	return &g, nil
}

// PodAnnotation is the CRI annotation naming a container's pod sandbox;
// containers of one pod share one VM.
const PodAnnotation = "io.kubernetes.cri.sandbox-id"

// PodID is the pod a container belongs to, or "" outside a pod (ctr run).
func PodID(spec *specs.Spec) string {
	return spec.Annotations[PodAnnotation]
}
