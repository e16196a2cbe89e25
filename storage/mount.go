package storage

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/log"
	"github.com/moby/sys/mountinfo"
	"golang.org/x/sys/unix"
)

// SetupShared creates dir (mode 0700 if missing), bind-mounts it on itself
// and gives it a peer group of its own with shared propagation. Mounts made
// under dir later (container rootfs) then also appear in the mount namespace
// virtiofsd makes for itself, which is a slave copy taken when it starts.
// Making it private first keeps those mounts from propagating into whatever
// peer group the parent mount (often /run) belongs to.
func SetupShared(dir string) (retErr error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("create shared dir: %w", err)
	}
	if err := unix.Mount(dir, dir, "", unix.MS_BIND, ""); err != nil {
		return fmt.Errorf("bind-mount shared dir %s on itself: %w", dir, err)
	}
	defer func() {
		if retErr != nil {
			_ = unix.Unmount(dir, unix.MNT_DETACH)
		}
	}()
	if err := unix.Mount("", dir, "", unix.MS_PRIVATE, ""); err != nil {
		return fmt.Errorf("make shared dir %s private: %w", dir, err)
	}
	if err := unix.Mount("", dir, "", unix.MS_SHARED|unix.MS_REC, ""); err != nil {
		return fmt.Errorf("make shared dir %s rshared: %w", dir, err)
	}
	return nil
}

// MountRootfs mounts containerd's rootfs mounts on target, creating target
// and its parents (mode 0755: the guest walks them). On error nothing it
// mounted stays mounted.
func MountRootfs(ctx context.Context, mounts []mount.Mount, target string) error {
	if len(mounts) == 0 {
		return errors.New("no rootfs mounts given")
	}
	if err := os.MkdirAll(target, 0o755); err != nil {
		return fmt.Errorf("create rootfs mount point: %w", err)
	}
	if err := mount.All(mounts, target); err != nil {
		if uerr := UnmountAll(ctx, target); uerr != nil {
			log.G(ctx).WithError(uerr).WithField("target", target).Warn("undo partial rootfs mount")
		}
		return fmt.Errorf("mount rootfs at %s: %w", target, err)
	}
	return nil
}

// BindMount binds the host file or directory source on target, creating
// target (and its parents, mode 0755) of the same kind; recursive takes
// the mounts below source along (rbind), readonly makes the new mount
// read-only. On error nothing stays mounted.
func BindMount(source, target string, recursive, readonly bool) error {
	st, err := os.Stat(source)
	if err != nil {
		return fmt.Errorf("bind mount source: %w", err)
	}
	if err := os.MkdirAll(filepath.Dir(target), 0o755); err != nil {
		return fmt.Errorf("create bind mount point: %w", err)
	}
	if st.IsDir() {
		err = os.Mkdir(target, 0o755)
	} else {
		var f *os.File
		if f, err = os.OpenFile(target, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o644); err == nil {
			err = f.Close()
		}
	}
	if err != nil {
		return fmt.Errorf("create bind mount point: %w", err)
	}
	flags := uintptr(unix.MS_BIND)
	if recursive {
		flags |= unix.MS_REC
	}
	if err := unix.Mount(source, target, "", flags, ""); err != nil {
		return fmt.Errorf("bind %s on %s: %w", source, target, err)
	}
	if readonly {
		// A bind mount takes its flags only from a remount; nosuid and
		// nodev must stay if source had them, or the remount fails.
		var sfs unix.Statfs_t
		if err := unix.Statfs(target, &sfs); err != nil {
			_ = unix.Unmount(target, unix.MNT_DETACH)
			return fmt.Errorf("statfs %s: %w", target, err)
		}
		var keep uintptr
		for st, ms := range map[int64]uintptr{
			unix.ST_NOSUID: unix.MS_NOSUID, unix.ST_NODEV: unix.MS_NODEV, unix.ST_NOEXEC: unix.MS_NOEXEC,
			unix.ST_NOATIME: unix.MS_NOATIME, unix.ST_NODIRATIME: unix.MS_NODIRATIME, unix.ST_RELATIME: unix.MS_RELATIME,
		} {
			if sfs.Flags&st != 0 {
				keep |= ms
			}
		}
		if err := unix.Mount("", target, "", unix.MS_BIND|unix.MS_REMOUNT|unix.MS_RDONLY|keep, ""); err != nil {
			_ = unix.Unmount(target, unix.MNT_DETACH)
			return fmt.Errorf("make bind mount %s read-only: %w", target, err)
		}
	}
	return nil
}

// UnmountAll unmounts every mount at or below dir, deepest first, and
// checks that none is left. It is a no-op when dir does not exist. A mount
// that stays busy is detached lazily (and logged) so that it no longer
// pins the sandbox directory.
func UnmountAll(ctx context.Context, dir string) error {
	return unmountAll(ctx, dir, 0)
}

// DetachAll is UnmountAll for mounts that a running VM's file server may
// hold open, such as a container's rootfs in a sandbox whose VM goes on
// (the guest's 9p or virtio-fs client keeps files of a removed container
// open for a while): it detaches them lazily at once, as Kata does, rather
// than waiting in vain for them to be free.
func DetachAll(ctx context.Context, dir string) error {
	return unmountAll(ctx, dir, unix.MNT_DETACH)
}

func unmountAll(ctx context.Context, dir string, flags int) error {
	dir, err := canonical(dir)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil
		}
		return err
	}
	points, err := MountsUnder(dir)
	if err != nil {
		return err
	}
	var errs []error
	for _, p := range points {
		if err := mount.UnmountAll(p, flags); err != nil {
			if flags&unix.MNT_DETACH != 0 {
				errs = append(errs, fmt.Errorf("unmount %s: %w", p, err))
				continue
			}
			log.G(ctx).WithError(err).WithField("mountpoint", p).Warn("unmount failed, detaching lazily")
			if err := mount.UnmountAll(p, unix.MNT_DETACH); err != nil {
				errs = append(errs, fmt.Errorf("unmount %s: %w", p, err))
			}
		}
	}
	if err := errors.Join(errs...); err != nil {
		return err
	}
	left, err := MountsUnder(dir)
	if err != nil {
		return err
	}
	if len(left) > 0 {
		return fmt.Errorf("mounts left under %s after unmounting: %s", dir, strings.Join(left, ", "))
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

// RemoveDir removes dir and everything in it, but only once no mount is
// left below it: removing through a mount would delete a container's
// files in the snapshot it came from.
func RemoveDir(dir string) error {
	cdir, err := canonical(dir)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil
		}
		return err
	}
	left, err := MountsUnder(cdir)
	if err != nil {
		return err
	}
	if len(left) > 0 {
		return fmt.Errorf("refusing to remove %s: still mounted: %s", dir, strings.Join(left, ", "))
	}
	if err := os.RemoveAll(cdir); err != nil {
		return fmt.Errorf("remove %s: %w", dir, err)
	}
	return nil
}

func canonical(p string) (string, error) {
	p, err := filepath.Abs(p)
	if err != nil {
		return "", err
	}
	return filepath.EvalSymlinks(p)
}
