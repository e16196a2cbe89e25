package storage

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sort"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/log"
	"github.com/moby/sys/mountinfo"
	"golang.org/x/sys/unix"
)

// The share of a sandbox is two trees in its directory (as Kata's
// mounts/ and shared/):
//
//   - ShareMounts is host-only: every mount the shim makes for the guest
//     (container rootfs, volumes) is made here, and the guest never sees
//     this tree's own directories;
//   - ShareView is what the guest is given: a read-only bind of
//     ShareMounts that receives each mount made there (propagation), with
//     that mount's own flags. The guest can write inside a writable rootfs
//     or volume and nowhere else: not at the root, not in another
//     container's directory, and it cannot rename or replace anything the
//     host later acts on.
const (
	ShareMounts = "mounts"
	ShareView   = "shared"
)

// SetupShare makes ShareMounts and ShareView below dir. record is called
// with each mount's path relative to dir before the mount is made, so that
// a crash never leaves a mount nobody knows of; undo them in reverse with
// UnmountBeneath. On error what was made is recorded and left for that.
func SetupShare(dir string, record func(rel string) error) error {
	mounts, err := MkdirAllBeneath(dir, ShareMounts, 0o700)
	if err != nil {
		return fmt.Errorf("create %s: %w", ShareMounts, err)
	}
	defer mounts.Close()
	view, err := MkdirAllBeneath(dir, ShareView, 0o700)
	if err != nil {
		return fmt.Errorf("create %s: %w", ShareView, err)
	}
	defer view.Close()

	// ShareMounts becomes a mount of its own, private first so that what
	// is mounted below it stays out of whatever peer group its parent
	// (often /run) is in, then shared so that it reaches ShareView.
	if err := record(ShareMounts); err != nil {
		return err
	}
	if err := cloneMount(mounts, mounts, false, Writable, false); err != nil {
		return fmt.Errorf("bind %s on itself: %w", ShareMounts, err)
	}
	if err := setPropagation(dir, ShareMounts, unix.MS_PRIVATE); err != nil {
		return err
	}
	if err := setPropagation(dir, ShareMounts, unix.MS_SHARED); err != nil {
		return err
	}
	// The view is read-only before it is anywhere: a read-only flag set
	// after the fact would not reach the copies propagation made.
	if err := record(ShareView); err != nil {
		return err
	}
	src, err := OpenBeneath(dir, ShareMounts, unix.O_PATH|unix.O_DIRECTORY)
	if err != nil {
		return err
	}
	defer src.Close()
	if err := cloneMount(src, view, false, ReadOnly, false); err != nil {
		return fmt.Errorf("bind %s read-only on %s: %w", ShareMounts, ShareView, err)
	}
	// A slave receives what is mounted in ShareMounts and sends nothing
	// back; shared on top, so that virtiofsd's namespace (a slave copy
	// taken when it starts) receives it in turn.
	if err := setPropagation(dir, ShareView, unix.MS_SLAVE); err != nil {
		return err
	}
	return setPropagation(dir, ShareView, unix.MS_SHARED)
}

// setPropagation changes the propagation of the mount at rel below root.
func setPropagation(root, rel string, flag uintptr) error {
	f, err := OpenBeneath(root, rel, unix.O_PATH|unix.O_DIRECTORY)
	if err != nil {
		return err
	}
	defer f.Close()
	if mounted, err := isMountRoot(f); err != nil || !mounted {
		if err == nil {
			err = fmt.Errorf("%s is not a mount", f.Name())
		}
		return err
	}
	if err := unix.Mount("", procFD(f), "", flag, ""); err != nil {
		return fmt.Errorf("set propagation of %s: %w", f.Name(), err)
	}
	return nil
}

// ReadOnlyMode says how a bind mount is read-only.
type ReadOnlyMode int

const (
	// Writable leaves the mount as its source is.
	Writable ReadOnlyMode = iota
	// ReadOnly makes the mount itself read-only; mounts below it keep
	// their own flags (Kubernetes' plain readOnly).
	ReadOnly
	// RecursiveReadOnly makes the mount and every mount below it
	// read-only (OCI's "rro", Kubernetes' recursiveReadOnly).
	RecursiveReadOnly
)

// cloneMount binds source on target (both open files, so no path is
// resolved again) as one step: the mount is made detached, given its
// flags, then moved into place, so that what propagation copies from
// target already has them. recursive takes the mounts below source along.
//
// With private, the bind is private (MS_PRIVATE) whatever source's
// propagation, as binds of the orchestrator's paths are: a clone of a
// shared mount (kubelet's volume directories are) would otherwise join
// its peer group, and a mount the host made under source later would
// appear in the share, and in the guest, with its own flags (writable
// under a read-only volume). runc's containers get such volumes rprivate
// by default too; propagation from the host into a VM is not offered
// (docs/kubernetes.md).
func cloneMount(source, target *os.File, recursive bool, ro ReadOnlyMode, private bool) error {
	flags := uint(unix.OPEN_TREE_CLONE | unix.O_CLOEXEC)
	if recursive {
		flags |= unix.AT_RECURSIVE
	}
	fd, err := unix.OpenTree(int(source.Fd()), "", flags|unix.AT_EMPTY_PATH)
	if err != nil {
		return fmt.Errorf("open_tree %s: %w", source.Name(), err)
	}
	defer unix.Close(fd)
	if private {
		if err := unix.MountSetattr(fd, "", uint(unix.AT_EMPTY_PATH|unix.AT_RECURSIVE), &unix.MountAttr{Propagation: unix.MS_PRIVATE}); err != nil {
			return fmt.Errorf("make bind of %s private: %w", source.Name(), err)
		}
	}
	if ro != Writable {
		attrFlags := uint(unix.AT_EMPTY_PATH)
		if ro == RecursiveReadOnly {
			attrFlags |= unix.AT_RECURSIVE
		}
		if err := unix.MountSetattr(fd, "", attrFlags, &unix.MountAttr{Attr_set: unix.MOUNT_ATTR_RDONLY}); err != nil {
			return fmt.Errorf("make bind of %s read-only: %w", source.Name(), err)
		}
	}
	if err := unix.MoveMount(fd, "", int(target.Fd()), "", unix.MOVE_MOUNT_F_EMPTY_PATH|unix.MOVE_MOUNT_T_EMPTY_PATH); err != nil {
		return fmt.Errorf("move bind of %s to %s: %w", source.Name(), target.Name(), err)
	}
	return nil
}

// MountRootfs mounts containerd's rootfs mounts on rel below root (the
// sandbox directory; rel inside ShareMounts), creating it and its parents
// (mode 0755: the guest walks them) without following symlinks. On error
// nothing it mounted stays mounted.
func MountRootfs(ctx context.Context, mounts []mount.Mount, root, rel string) (retErr error) {
	if len(mounts) == 0 {
		return errors.New("no rootfs mounts given")
	}
	target, err := MkdirAllBeneath(root, rel, 0o755)
	if err != nil {
		return fmt.Errorf("create rootfs mount point: %w", err)
	}
	defer target.Close()
	defer func() {
		if retErr != nil {
			if err := UnmountBeneath(root, rel, true); err != nil {
				log.G(ctx).WithError(err).WithField("target", target.Name()).Warn("undo partial rootfs mount")
			}
		}
	}()
	for i, m := range mounts {
		// Stacked mounts go on top of what is there: the target is
		// opened anew for each.
		if i > 0 {
			target.Close()
			if target, err = OpenBeneath(root, rel, unix.O_PATH|unix.O_DIRECTORY); err != nil {
				return err
			}
		}
		if isBindMount(m) {
			// A bind is made and then remounted for its flags, which
			// propagation would not carry: clone it instead.
			err = bindOnto(m.Source, target, slices.Contains(m.Options, "rbind"), mountReadOnly(m.Options))
		} else {
			err = m.Mount(procFD(target))
		}
		if err != nil {
			return fmt.Errorf("mount rootfs at %s: %w", target.Name(), err)
		}
	}
	return nil
}

func isBindMount(m mount.Mount) bool {
	return m.Type == "bind" || slices.Contains(m.Options, "bind") || slices.Contains(m.Options, "rbind")
}

// mountReadOnly reads the read-only options of a bind mount: "rro" is
// recursive, "ro" the mount alone.
func mountReadOnly(options []string) ReadOnlyMode {
	switch {
	case slices.Contains(options, "rro"):
		return RecursiveReadOnly
	case slices.Contains(options, "ro"):
		return ReadOnly
	}
	return Writable
}

func bindOnto(source string, target *os.File, recursive bool, ro ReadOnlyMode) error {
	// The source is a host path the orchestrator chose (a snapshot, a
	// volume): it is resolved as given, once.
	src, err := os.OpenFile(source, unix.O_PATH|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("bind mount source: %w", err)
	}
	defer src.Close()
	return cloneMount(src, target, recursive, ro, true)
}

// BindMount binds the host file or directory source on rel below root (the
// sandbox directory; rel inside ShareMounts), creating rel (and its
// parents, mode 0755) of the same kind without following symlinks;
// recursive takes the mounts below source along (rbind), ro says how it
// is read-only. On error nothing stays mounted.
func BindMount(source, root, rel string, recursive bool, ro ReadOnlyMode) error {
	st, err := os.Stat(source)
	if err != nil {
		return fmt.Errorf("bind mount source: %w", err)
	}
	parent, err := MkdirAllBeneath(root, filepath.Dir(rel), 0o755)
	if err != nil {
		return fmt.Errorf("create bind mount point: %w", err)
	}
	parent.Close()
	var target *os.File
	if st.IsDir() {
		target, err = MkdirAllBeneath(root, rel, 0o755)
	} else {
		target, err = CreateBeneath(root, rel, 0o644)
	}
	if err != nil {
		return fmt.Errorf("create bind mount point: %w", err)
	}
	defer target.Close()
	if err := bindOnto(source, target, recursive, ro); err != nil {
		_ = UnmountBeneath(root, rel, true)
		return err
	}
	return nil
}

// MountsUnder lists the distinct mount points at or below dir (which must
// be canonical: absolute, clean, no symlinks), deepest first.
func MountsUnder(dir string) ([]string, error) {
	infos, err := mountinfo.GetMounts(mountinfo.PrefixFilter(dir))
	if err != nil {
		return nil, fmt.Errorf("read mount table: %w", err)
	}
	seen := make(map[string]bool)
	var points []string
	for _, i := range infos {
		if !seen[i.Mountpoint] {
			seen[i.Mountpoint] = true
			points = append(points, i.Mountpoint)
		}
	}
	// A child's path is always longer than its parent's.
	sort.Slice(points, func(i, j int) bool { return len(points[i]) > len(points[j]) })
	return points, nil
}

// RemoveDir removes dir (a sandbox directory: a path the host made) and
// everything in it, but only once no mount is left below it: removing
// through a mount would delete a container's files in the snapshot it came
// from. Symlinks inside are removed as links, never followed.
func RemoveDir(dir string) error {
	dir = filepath.Clean(dir)
	return RemoveBeneath(filepath.Dir(dir), filepath.Base(dir))
}
