package sandbox

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/colo-runtime/colo/config"
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

// State is what a sandbox records on disk so that a later process can clean
// up after a crashed shim: it is written before anything it names can leak.
type State struct {
	// Dir is the sandbox directory itself; Cleanup refuses to touch a
	// directory whose state does not name it.
	Dir string `json:"dir"`
	ID  string `json:"id"`
	// Hypervisor picks the driver whose Cleanup stops the VM.
	Hypervisor    config.Hypervisor `json:"hypervisor"`
	HypervisorPid int               `json:"hypervisor_pid,omitempty"`
	VirtiofsdPid  int               `json:"virtiofsd_pid,omitempty"`
	// NetNS is the pod's network namespace, where Mirrors are.
	NetNS   string        `json:"netns,omitempty"`
	Mirrors []MirrorState `json:"mirrors,omitempty"`
	// Cgroup is the host cgroup the VM's threads were placed under.
	Cgroup string `json:"cgroup,omitempty"`
	// Mounts are the mounts the shim made, relative to Dir, in the
	// order made: only these are ever unmounted.
	Mounts []string `json:"mounts,omitempty"`
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
	return nil
}

// ReadState reads the state of the sandbox in dir.
func ReadState(dir string) (State, error) {
	var st State
	b, err := os.ReadFile(filepath.Join(dir, stateFile))
	if err != nil {
		return st, err
	}
	if err := json.Unmarshal(b, &st); err != nil {
		return st, fmt.Errorf("sandbox state %s: %w", filepath.Join(dir, stateFile), err)
	}
	if st.Dir != dir {
		return st, fmt.Errorf("sandbox state %s names directory %q", filepath.Join(dir, stateFile), st.Dir)
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
