package storage

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// Host-side operations below a sandbox directory resolve their paths with
// these functions: beneath a root the caller trusts, without following any
// symlink on the way. Part of the tree is written by the guest (container
// rootfs, writable volumes), and a symlink a guest plants must never take a
// mkdir, mount or removal somewhere else on the host (Kata's
// CVE-2020-2026): a symlink met on the way is an error, and removal takes
// links away as links.

// resolveBeneath stays below the root and follows nothing: no symlinks, no
// /proc magic links, no "..", no absolute paths.
const resolveBeneath = unix.RESOLVE_BENEATH | unix.RESOLVE_NO_SYMLINKS | unix.RESOLVE_NO_MAGICLINKS

// ErrUnsafePath is returned for a relative path that is absolute or
// leaves its root, and (wrapped) when a symlink stands on the way.
var ErrUnsafePath = errors.New("unsafe path")

// checkRel rejects what cannot name something below a root: an absolute
// path or one that climbs out with "..". openat2 would refuse these too;
// checking first gives a clearer error.
func checkRel(rel string) (string, error) {
	if filepath.IsAbs(rel) {
		return "", fmt.Errorf("%w: %q is absolute", ErrUnsafePath, rel)
	}
	c := filepath.Clean(rel)
	if c == ".." || strings.HasPrefix(c, "../") {
		return "", fmt.Errorf("%w: %q leaves its root", ErrUnsafePath, rel)
	}
	return c, nil
}

// OpenBeneath opens rel below root with flags (O_CLOEXEC is added),
// refusing to follow any symlink, to cross above root or to resolve "..".
// root itself is trusted: it is resolved as usual.
func OpenBeneath(root, rel string, flags int) (*os.File, error) {
	rel, err := checkRel(rel)
	if err != nil {
		return nil, err
	}
	rfd, err := unix.Open(root, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, &os.PathError{Op: "open", Path: root, Err: err}
	}
	defer unix.Close(rfd)
	return openat2(rfd, root, rel, flags)
}

func openat2(dirfd int, dirName, rel string, flags int) (*os.File, error) {
	// O_NOFOLLOW would open a trailing symlink itself (O_PATH) or fail
	// with ENOTDIR (O_DIRECTORY); RESOLVE_NO_SYMLINKS alone refuses it,
	// with ELOOP.
	how := unix.OpenHow{Flags: uint64((flags &^ unix.O_NOFOLLOW) | unix.O_CLOEXEC), Resolve: resolveBeneath}
	var fd int
	var err error
	for {
		fd, err = unix.Openat2(dirfd, rel, &how)
		if err != unix.EINTR && err != unix.EAGAIN {
			break
		}
	}
	name := filepath.Join(dirName, rel)
	if err != nil {
		if err == unix.ELOOP || err == unix.EXDEV {
			// ELOOP: a symlink on the way; EXDEV: an escape attempt.
			return nil, &os.PathError{Op: "open beneath", Path: name, Err: fmt.Errorf("%w: %w", ErrUnsafePath, err)}
		}
		return nil, &os.PathError{Op: "open beneath", Path: name, Err: err}
	}
	return os.NewFile(uintptr(fd), name), nil
}

// MkdirAllBeneath creates rel below root and its missing parents with mode
// and returns the last as an O_PATH handle. Every component must be a real
// directory: a symlink or a file on the way is an error, not followed.
func MkdirAllBeneath(root, rel string, mode os.FileMode) (*os.File, error) {
	rel, err := checkRel(rel)
	if err != nil {
		return nil, err
	}
	dir, err := OpenBeneath(root, ".", unix.O_PATH|unix.O_DIRECTORY)
	if err != nil {
		return nil, err
	}
	if rel == "." {
		return dir, nil
	}
	for _, name := range strings.Split(rel, "/") {
		err := unix.Mkdirat(int(dir.Fd()), name, uint32(mode.Perm()))
		if err != nil && err != unix.EEXIST {
			dir.Close()
			return nil, &os.PathError{Op: "mkdir", Path: filepath.Join(dir.Name(), name), Err: err}
		}
		// The component is opened whether it was made now or found: a
		// symlink that stood there already, or was swapped in since the
		// mkdir, fails here.
		next, err := openat2(int(dir.Fd()), dir.Name(), name, unix.O_PATH|unix.O_DIRECTORY|unix.O_NOFOLLOW)
		dir.Close()
		if err != nil {
			return nil, err
		}
		dir = next
	}
	return dir, nil
}

// CreateBeneath creates the empty file rel below root (its parent must
// exist), failing if anything stands there already, and returns it as an
// O_PATH handle.
func CreateBeneath(root, rel string, mode os.FileMode) (*os.File, error) {
	rel, err := checkRel(rel)
	if err != nil {
		return nil, err
	}
	parent, err := OpenBeneath(root, filepath.Dir(rel), unix.O_PATH|unix.O_DIRECTORY)
	if err != nil {
		return nil, err
	}
	defer parent.Close()
	name := filepath.Base(rel)
	fd, err := unix.Openat(int(parent.Fd()), name, unix.O_CREAT|unix.O_EXCL|unix.O_NOFOLLOW|unix.O_WRONLY|unix.O_CLOEXEC, uint32(mode.Perm()))
	if err != nil {
		return nil, &os.PathError{Op: "create", Path: filepath.Join(root, rel), Err: err}
	}
	unix.Close(fd)
	return openat2(int(parent.Fd()), parent.Name(), name, unix.O_PATH|unix.O_NOFOLLOW)
}

// procFD is the path of an open file through /proc, for syscalls that take
// a path but should act on what was opened.
func procFD(f *os.File) string {
	return fmt.Sprintf("/proc/self/fd/%d", f.Fd())
}

// UnmountBeneath unmounts every mount stacked at rel below root. A
// symlink at rel or on the way to it is an error, never followed. With
// lazy, busy mounts are detached at once; otherwise a busy mount is
// detached only after a plain unmount failed. It is no error if nothing is
// mounted there (any more), or if rel is gone.
func UnmountBeneath(root, rel string, lazy bool) error {
	for {
		f, err := OpenBeneath(root, rel, unix.O_PATH|unix.O_NOFOLLOW)
		if errors.Is(err, os.ErrNotExist) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("unmount: %w", err)
		}
		mounted, err := isMountRoot(f)
		if err != nil || !mounted {
			f.Close()
			return err
		}
		// The path was checked just now and the mount is the one found:
		// umount2 does not take a file, so it gets the checked path with
		// UMOUNT_NOFOLLOW, and the check is repeated on the next round.
		name := filepath.Join(root, rel)
		f.Close()
		flags := unix.UMOUNT_NOFOLLOW
		if lazy {
			flags |= unix.MNT_DETACH
		}
		err = unix.Unmount(name, flags)
		if err == unix.EBUSY && !lazy {
			err = unix.Unmount(name, flags|unix.MNT_DETACH)
		}
		if err != nil && err != unix.EINVAL {
			return fmt.Errorf("unmount %s: %w", name, err)
		}
	}
}

// isMountRoot reports whether f is the root of a mount.
func isMountRoot(f *os.File) (bool, error) {
	var st unix.Statx_t
	if err := unix.Statx(int(f.Fd()), "", unix.AT_EMPTY_PATH|unix.AT_SYMLINK_NOFOLLOW, 0, &st); err != nil {
		return false, &os.PathError{Op: "statx", Path: f.Name(), Err: err}
	}
	if st.Attributes_mask&unix.STATX_ATTR_MOUNT_ROOT == 0 {
		return false, fmt.Errorf("statx %s: the kernel does not report mount roots (Linux 5.8 or later needed)", f.Name())
	}
	return st.Attributes&unix.STATX_ATTR_MOUNT_ROOT != 0, nil
}

// RemoveBeneath removes rel below root and everything in it. Symlinks
// inside are removed as links; a symlink on the way to rel is an error. It
// refuses while anything is mounted at or below rel, since removing
// through a mount would delete a container's files where they came from.
// A missing rel is no error.
func RemoveBeneath(root, rel string) error {
	rel, err := checkRel(rel)
	if err != nil {
		return err
	}
	if rel == "." {
		return fmt.Errorf("%w: refusing to remove the root %s itself", ErrUnsafePath, root)
	}
	parent, err := OpenBeneath(root, filepath.Dir(rel), unix.O_RDONLY|unix.O_DIRECTORY)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	defer parent.Close()
	name := filepath.Join(root, rel)
	left, err := MountsUnder(filepath.Clean(name))
	if err != nil {
		return err
	}
	if len(left) > 0 {
		return fmt.Errorf("refusing to remove %s: still mounted: %s", name, strings.Join(left, ", "))
	}
	return removeAt(int(parent.Fd()), parent.Name(), filepath.Base(rel))
}

// removeAt removes name in the directory dirfd and all below it, never
// following a symlink and never crossing into another mount.
func removeAt(dirfd int, dirName, name string) error {
	path := filepath.Join(dirName, name)
	err := unix.Unlinkat(dirfd, name, 0)
	if err == nil || err == unix.ENOENT {
		return nil
	}
	if err != unix.EISDIR && err != unix.EPERM {
		return &os.PathError{Op: "unlink", Path: path, Err: err}
	}
	fd, err := unix.Openat(dirfd, name, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		if err == unix.ENOENT {
			return nil
		}
		return &os.PathError{Op: "open", Path: path, Err: err}
	}
	d := os.NewFile(uintptr(fd), path)
	defer d.Close()
	if mounted, err := isMountRoot(d); err != nil || mounted {
		if err == nil {
			err = fmt.Errorf("refusing to remove %s: a mount appeared there", path)
		}
		return err
	}
	names, err := d.Readdirnames(-1)
	if err != nil {
		return &os.PathError{Op: "readdir", Path: path, Err: err}
	}
	for _, n := range names {
		if err := removeAt(fd, path, n); err != nil {
			return err
		}
	}
	if err := unix.Unlinkat(dirfd, name, unix.AT_REMOVEDIR); err != nil && err != unix.ENOENT {
		return &os.PathError{Op: "rmdir", Path: path, Err: err}
	}
	return nil
}
