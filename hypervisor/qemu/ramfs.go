package qemu

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/containerd/log"
	"golang.org/x/sys/unix"
)

// Templates keep their memory on a ramfs, which has no hole punching.
// QEMU 7.2 discards a page of file-backed guest memory by punching a
// hole in the file (ram_block_discard_range), even where the VM maps the
// file copy-on-write as a clone does: a balloon or free page reporting in
// one clone would zero the template's page under every other clone. On a
// ramfs the punch fails (QEMU logs it and leaves the page alone), so
// clones may have a balloon: what the guest frees in its plugged memory
// (anonymous, where its processes' pages go first) returns to the host,
// and the template's pages stay shared.

// ramfsMagic is ramfs's statfs type.
const ramfsMagic = 0x858458f6

// onRAMFS tells whether dir is on a ramfs.
func onRAMFS(dir string) bool {
	var st unix.Statfs_t
	return unix.Statfs(dir, &st) == nil && uint32(st.Type) == ramfsMagic
}

// ensureRAMFS mounts a ramfs on dir unless it is one. What dir held
// before (templates made on another filesystem) is removed first, as the
// mount would hide it for good. Concurrent callers are serialized by a
// lock file beside dir.
func ensureRAMFS(ctx context.Context, dir string) error {
	if onRAMFS(dir) {
		return nil
	}
	unlock, err := lockFile(ctx, filepath.Clean(dir)+".mount.lock")
	if err != nil {
		return err
	}
	defer unlock()
	if onRAMFS(dir) {
		return nil // mounted while we waited
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		return err
	}
	for _, e := range entries {
		if err := os.RemoveAll(filepath.Join(dir, e.Name())); err != nil {
			return err
		}
	}
	if err := unix.Mount("ramfs", dir, "ramfs", unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, "mode=0700"); err != nil {
		return fmt.Errorf("mount a ramfs on %s: %w", dir, err)
	}
	log.G(ctx).WithField("dir", dir).Info("qemu: templates on a ramfs")
	return nil
}

// ReleaseTemplates unmounts the ramfs of a template directory (and with
// it the templates), for whoever removes the directory: a test, or an
// operator reclaiming the memory. A directory that is no ramfs mount is
// left alone.
func ReleaseTemplates(dir string) error {
	if !onRAMFS(dir) {
		return nil
	}
	if err := unix.Unmount(dir, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) {
		return fmt.Errorf("unmount templates %s: %w", dir, err)
	}
	return nil
}
