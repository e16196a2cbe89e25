package placement

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path"
	"slices"
	"strings"
	"time"

	"github.com/containerd/cgroups/v3"
	"github.com/containerd/cgroups/v3/cgroup1"
	systemd "github.com/coreos/go-systemd/v22/dbus"
	"github.com/godbus/dbus/v5"
	"golang.org/x/sys/unix"
)

// Scope is the systemd scope unit a VM is placed in when its cgroupsPath
// is one of systemd's cgroup driver ("slice:prefix:name", kubeadm's
// default): the unit runc's systemd driver would make for a container
// there.
type Scope struct {
	// Slice is the slice unit the scope is in
	// ("kubepods-besteffort-pod<uid>.slice").
	Slice string
	// Unit is the scope unit ("cri-containerd-<id>.scope").
	Unit string
}

// defaultSlice is the slice of a cgroupsPath that names none, as runc's.
const defaultSlice = "system.slice"

// SystemdScope resolves a cgroupsPath of systemd's cgroup driver to its
// scope and the scope's cgroup, as runc does (libcontainer/specconv and
// github.com/opencontainers/cgroups/systemd): an empty slice is
// system.slice, the unit is "<prefix>-<name>.scope", and its cgroup is
// the slice expanded (ExpandSlice) with the unit below:
// "kubepods-besteffort-pod1.slice:cri-containerd:abc" is
// /kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1.slice/cri-containerd-abc.scope.
//
// Two of runc's cases are refused, as no VM could be placed there: an
// empty name (runc's unit "<prefix>-.scope" would be every sandbox's),
// and a name ending in ".slice" (runc makes that slice unit, and systemd
// puts no processes in a slice).
func SystemdScope(cgroupsPath string) (Scope, string, error) {
	parts := strings.Split(cgroupsPath, ":")
	if len(parts) != 3 {
		return Scope{}, "", fmt.Errorf("cgroupsPath %q: want \"slice:prefix:name\" for systemd's cgroup driver", cgroupsPath)
	}
	slice, prefix, name := parts[0], parts[1], parts[2]
	if slice == "" {
		slice = defaultSlice
	}
	switch {
	case name == "":
		return Scope{}, "", fmt.Errorf("cgroupsPath %q: no name after the prefix: the scope %q would be every container's", cgroupsPath, prefix+"-.scope")
	case strings.HasSuffix(name, ".slice"):
		return Scope{}, "", fmt.Errorf("cgroupsPath %q: name %q is a slice, which holds no processes: a VM is placed in a scope", cgroupsPath, name)
	}
	dir, err := ExpandSlice(slice)
	if err != nil {
		return Scope{}, "", fmt.Errorf("cgroupsPath %q: %w", cgroupsPath, err)
	}
	unit := prefix + "-" + name + ".scope"
	if err := checkUnitName(unit); err != nil {
		return Scope{}, "", fmt.Errorf("cgroupsPath %q: scope %w", cgroupsPath, err)
	}
	return Scope{Slice: slice, Unit: unit}, path.Join(dir, unit), nil
}

// ExpandSlice is the cgroup of a systemd slice unit, as runc's: each "-"
// in the name is a level of systemd's hierarchy, so "a-b-c.slice" is
// /a.slice/a-b.slice/a-b-c.slice, and "-.slice" (the root slice) is "/".
// It refuses what systemd would: a name not ending in ".slice", "/",
// empty levels (a leading, trailing or double "-"), characters systemd
// does not allow in a unit name.
func ExpandSlice(slice string) (string, error) {
	const suffix = ".slice"
	name, ok := strings.CutSuffix(slice, suffix)
	if !ok {
		return "", fmt.Errorf("slice %q: want a name ending in %q", slice, suffix)
	}
	if strings.Contains(slice, "/") {
		return "", fmt.Errorf("slice %q: a unit name has no \"/\"", slice)
	}
	if err := checkUnitName(slice); err != nil {
		return "", fmt.Errorf("slice %w", err)
	}
	if name == "-" {
		return "/", nil
	}
	var dir, prefix string
	for _, level := range strings.Split(name, "-") {
		if level == "" {
			return "", fmt.Errorf("slice %q: an empty level (a leading, trailing or double \"-\"): \"-\" separates the levels of systemd's slices", slice)
		}
		dir += "/" + prefix + level + suffix
		prefix += level + "-"
	}
	return dir, nil
}

// checkUnitName refuses a unit name systemd would (unit_name_is_valid):
// too long, or with a character other than ASCII letters, digits and
// ":-_.\". It also keeps the name a single path element of a cgroup.
func checkUnitName(unit string) error {
	const maxLen = 255
	if len(unit) > maxLen {
		return fmt.Errorf("%q: longer than systemd's %d characters", unit, maxLen)
	}
	for _, r := range unit {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || strings.ContainsRune(":-_.\\", r)) {
			return fmt.Errorf("%q: character %q is not allowed in a systemd unit name", unit, r)
		}
	}
	return nil
}

// Made is what placing a plan makes beyond the cgroups of Parent's own
// tree, for Remove to undo: its caller records it before Apply makes it.
type Made struct {
	// Unit is the systemd scope started for Parent where systemd runs.
	Unit string `json:"unit,omitempty"`
	// Slices are the slice cgroups that were missing above a scope where
	// systemd does not run, as directories, outermost first. Apply makes
	// them as runc's cgroupfs driver makes a missing parent; Remove
	// removes them once empty. Kubelet makes them before a pod's sandbox,
	// so on a node there are none.
	Slices []string `json:"slices,omitempty"`
}

// ToMake is what Apply of p will make beyond Parent's own tree: nothing
// for a plain cgroup path; for a scope, where systemd runs, the scope
// unit, and elsewhere the slice cgroups above it that are missing.
func ToMake(p Plan) (Made, error) {
	if p.Scope == nil {
		return Made{}, nil
	}
	if systemdRunning() {
		return Made{Unit: p.Scope.Unit}, nil
	}
	var ancestors []string
	for dir := path.Dir(p.Parent); dir != "/"; dir = path.Dir(dir) {
		ancestors = append(ancestors, dir)
	}
	slices.Reverse(ancestors)
	roots, err := hierarchies()
	if err != nil {
		return Made{}, err
	}
	var m Made
	for _, root := range roots {
		for _, a := range ancestors {
			dir := path.Join(root, a)
			if _, err := os.Lstat(dir); errors.Is(err, os.ErrNotExist) {
				m.Slices = append(m.Slices, dir)
			} else if err != nil {
				return Made{}, fmt.Errorf("slice cgroup %s: %w", dir, err)
			}
		}
	}
	return m, nil
}

// hierarchies are the roots of the cgroup hierarchies Apply makes
// cgroups in: v2's one, or v1's mounted ones.
func hierarchies() ([]string, error) {
	if cgroups.Mode() == cgroups.Unified {
		return []string{"/sys/fs/cgroup"}, nil
	}
	subsystems, err := cgroup1.Default()
	if err != nil {
		return nil, err
	}
	var roots []string
	for _, s := range subsystems {
		if p, ok := s.(interface{ Path(string) string }); ok {
			roots = append(roots, p.Path("/"))
		}
	}
	return roots, nil
}

// removeSlice removes a slice cgroup colo made above the scope parent if
// it is empty: one holding another sandbox's scope, or anything else,
// is left to them.
func removeSlice(parent, dir string) error {
	// The record is the host's, but a path that is no slice above parent
	// in a cgroup hierarchy is not removed whatever it names.
	above := false
	if strings.HasPrefix(dir, "/sys/fs/cgroup/") && path.Clean(dir) == dir && strings.HasSuffix(dir, ".slice") {
		for a := path.Dir(parent); a != "/" && !above; a = path.Dir(a) {
			above = strings.HasSuffix(dir, a)
		}
	}
	if !above {
		return fmt.Errorf("recorded slice cgroup %s: not a slice above %s, not removing it", dir, parent)
	}
	err := unix.Rmdir(dir)
	if err == nil || errors.Is(err, unix.ENOENT) || errors.Is(err, unix.EBUSY) || errors.Is(err, unix.ENOTEMPTY) {
		return nil
	}
	return fmt.Errorf("remove slice cgroup %s: %w", dir, err)
}

// systemdRunning is whether systemd is the host's init, as sd_booted(3)
// and runc tell it.
func systemdRunning() bool {
	fi, err := os.Lstat("/run/systemd/system")
	return err == nil && fi.IsDir()
}

// systemdTimeout bounds a call to systemd and the wait for its job, as
// runc's 30 seconds do.
const systemdTimeout = 30 * time.Second

// startScope has systemd start the transient scope unit of a plan with
// the processes pids in it, as runc's systemd driver starts a
// container's: in its slice, delegated (colo makes the vCPU and overhead
// cgroups below it), and waits for the job.
func startScope(ctx context.Context, p Plan, pids []int) error {
	ctx, cancel := context.WithTimeout(ctx, systemdTimeout)
	defer cancel()
	conn, err := systemd.NewWithContext(ctx)
	if err != nil {
		return fmt.Errorf("connect to systemd: %w", err)
	}
	defer conn.Close()
	var ids []uint32
	for _, pid := range pids {
		ids = append(ids, uint32(pid))
	}
	props := []systemd.Property{
		systemd.PropDescription("colo VM " + p.Scope.Unit),
		systemd.PropSlice(p.Scope.Slice),
		systemd.PropPids(ids...),
		{Name: "Delegate", Value: dbus.MakeVariant(true)},
		{Name: "DefaultDependencies", Value: dbus.MakeVariant(false)},
		{Name: "CPUAccounting", Value: dbus.MakeVariant(true)},
		{Name: "MemoryAccounting", Value: dbus.MakeVariant(true)},
		{Name: "TasksAccounting", Value: dbus.MakeVariant(true)},
	}
	if p.ParentWeight != 0 {
		// systemd writes the scope's own CPU weight at each reload: it
		// keeps this one rather than its default.
		props = append(props, systemd.Property{Name: "CPUWeight", Value: dbus.MakeVariant(p.ParentWeight)})
	}
	done := make(chan string, 1)
	_, err = conn.StartTransientUnitContext(ctx, p.Scope.Unit, "replace", props, done)
	if isDBusError(err, "org.freedesktop.systemd1.UnitExists") {
		// A failed unit of the name left over: reset it and try once
		// more, as runc does.
		_ = conn.ResetFailedUnitContext(ctx, p.Scope.Unit)
		_, err = conn.StartTransientUnitContext(ctx, p.Scope.Unit, "replace", props, done)
	}
	if err != nil {
		return fmt.Errorf("start systemd scope %s in %s: %w", p.Scope.Unit, p.Scope.Slice, err)
	}
	select {
	case r := <-done:
		if r != "done" {
			_ = conn.ResetFailedUnitContext(ctx, p.Scope.Unit)
			return fmt.Errorf("start systemd scope %s in %s: job %s", p.Scope.Unit, p.Scope.Slice, r)
		}
		return nil
	case <-ctx.Done():
		return fmt.Errorf("start systemd scope %s in %s: %w", p.Scope.Unit, p.Scope.Slice, context.Cause(ctx))
	}
}

// stopScope has systemd stop a scope unit and waits for the job; one
// that is gone (a scope whose processes have all exited goes by itself)
// counts as stopped.
func stopScope(ctx context.Context, unit string) error {
	ctx, cancel := context.WithTimeout(ctx, systemdTimeout)
	defer cancel()
	conn, err := systemd.NewWithContext(ctx)
	if err != nil {
		return fmt.Errorf("connect to systemd: %w", err)
	}
	defer conn.Close()
	done := make(chan string, 1)
	_, err = conn.StopUnitContext(ctx, unit, "replace", done)
	switch {
	case isDBusError(err, "org.freedesktop.systemd1.NoSuchUnit"):
		return nil
	case err != nil:
		return fmt.Errorf("stop systemd scope %s: %w", unit, err)
	}
	select {
	case <-done:
	case <-ctx.Done():
		return fmt.Errorf("stop systemd scope %s: %w", unit, context.Cause(ctx))
	}
	// A scope that failed stays loaded until reset.
	_ = conn.ResetFailedUnitContext(ctx, unit)
	return nil
}

// isDBusError is whether err is the D-Bus error name.
func isDBusError(err error, name string) bool {
	var e dbus.Error
	return errors.As(err, &e) && e.Name == name
}
