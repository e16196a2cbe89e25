package storage

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/moby/sys/mountinfo"
	"golang.org/x/sys/unix"
)

func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root (mount)")
	}
}

// tempDir is a canonical temp dir whose mounts are all undone at the end.
func tempDir(t *testing.T) string {
	t.Helper()
	dir, err := filepath.EvalSymlinks(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		left, err := MountsUnder(dir)
		if err != nil {
			t.Error(err)
		}
		for _, m := range left {
			t.Errorf("mount left behind: %s", m)
			_ = unix.Unmount(m, unix.MNT_DETACH)
		}
	})
	return dir
}

func mountInfo(t *testing.T, mp string) *mountinfo.Info {
	t.Helper()
	infos, err := mountinfo.GetMounts(mountinfo.SingleEntryFilter(mp))
	if err != nil {
		t.Fatal(err)
	}
	if len(infos) == 0 {
		return nil
	}
	return infos[len(infos)-1]
}

// share is a sandbox directory with SetupShare done, and the mounts it
// recorded, undone in reverse at the end.
type share struct {
	dir      string
	recorded []string
}

func newShare(t *testing.T) *share {
	t.Helper()
	sh := &share{dir: tempDir(t)}
	t.Cleanup(func() { sh.undo(t) })
	if err := SetupShare(sh.dir, sh.record); err != nil {
		t.Fatal(err)
	}
	return sh
}

func (sh *share) record(rel string) error {
	sh.recorded = append(sh.recorded, rel)
	return nil
}

func (sh *share) undo(t *testing.T) {
	t.Helper()
	for i := len(sh.recorded) - 1; i >= 0; i-- {
		if err := UnmountBeneath(sh.dir, sh.recorded[i], false); err != nil {
			t.Error(err)
		}
	}
	sh.recorded = nil
}

// mount records rel and mounts a tmpfs there, in the host-only tree.
func (sh *share) mountTmpfs(t *testing.T, rel string) {
	t.Helper()
	target, err := MkdirAllBeneath(sh.dir, rel, 0o755)
	if err != nil {
		t.Fatal(err)
	}
	defer target.Close()
	_ = sh.record(rel)
	if err := unix.Mount("tmpfs", procFD(target), "tmpfs", 0, "size=1m"); err != nil {
		t.Fatal(err)
	}
}

func TestSetupShare(t *testing.T) {
	requireRoot(t)
	sh := newShare(t)
	mounts := filepath.Join(sh.dir, ShareMounts)
	view := filepath.Join(sh.dir, ShareView)

	for _, tc := range []struct {
		path     string
		ro       bool
		optional []string
	}{
		{mounts, false, []string{"shared:"}},
		{view, true, []string{"shared:", "master:"}},
	} {
		info := mountInfo(t, tc.path)
		if info == nil {
			t.Fatalf("%s is not a mount point", tc.path)
		}
		for _, o := range tc.optional {
			if !strings.Contains(info.Optional, o) {
				t.Errorf("propagation of %s = %q, want %s", tc.path, info.Optional, o)
			}
		}
		if ro := strings.Contains(","+info.Options+",", ",ro,"); ro != tc.ro {
			t.Errorf("%s: options %q, read-only want %v", tc.path, info.Options, tc.ro)
		}
	}

	// A container's rootfs mounted in the host-only tree reaches the view
	// and stays writable there; the view's own directories do not.
	sh.mountTmpfs(t, ShareMounts+"/c1/rootfs")
	if err := os.WriteFile(filepath.Join(view, "c1", "rootfs", "hello"), []byte("hi"), 0o644); err != nil {
		t.Errorf("write into the rootfs through the view: %v", err)
	}
	if b, err := os.ReadFile(filepath.Join(mounts, "c1", "rootfs", "hello")); err != nil || string(b) != "hi" {
		t.Errorf("file written through the view: %q %v", b, err)
	}
	for name, op := range map[string]func() error{
		"create at the root":     func() error { return os.WriteFile(filepath.Join(view, "x"), nil, 0o644) },
		"create in c1":           func() error { return os.WriteFile(filepath.Join(view, "c1", "x"), nil, 0o644) },
		"rename c1":              func() error { return os.Rename(filepath.Join(view, "c1"), filepath.Join(view, "c2")) },
		"symlink at the root":    func() error { return os.Symlink("/", filepath.Join(view, "c2")) },
		"remove c1's rootfs dir": func() error { return os.Remove(filepath.Join(view, "c1", "rootfs")) },
	} {
		if err := op(); !errors.Is(err, unix.EROFS) && !errors.Is(err, unix.EBUSY) {
			t.Errorf("%s through the view: %v, want EROFS", name, err)
		}
	}

	sh.undo(t)
	if left, _ := MountsUnder(sh.dir); len(left) > 0 {
		t.Fatalf("mounts left: %v", left)
	}
	if err := RemoveDir(sh.dir); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(sh.dir); !os.IsNotExist(err) {
		t.Fatalf("%s still exists: %v", sh.dir, err)
	}
}

func TestMountRootfs(t *testing.T) {
	requireRoot(t)
	ctx := context.Background()
	src := tempDir(t)
	lower := filepath.Join(src, "lower")
	upper := filepath.Join(src, "upper")
	work := filepath.Join(src, "work")
	for _, d := range []string{lower, upper, work} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(lower, "hello"), []byte("hi"), 0o644); err != nil {
		t.Fatal(err)
	}

	for _, tc := range []struct {
		name   string
		mounts []mount.Mount
		ro     bool
	}{
		{"bind-ro", []mount.Mount{{Type: "bind", Source: lower, Options: []string{"rbind", "ro"}}}, true},
		{"bind", []mount.Mount{{Type: "bind", Source: lower, Options: []string{"rbind", "rw"}}}, false},
		{"overlay", []mount.Mount{{
			Type:    "overlay",
			Source:  "overlay",
			Options: []string{"lowerdir=" + lower, "upperdir=" + upper, "workdir=" + work},
		}}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			sh := newShare(t)
			rel := ShareMounts + "/" + tc.name + "/rootfs"
			_ = sh.record(rel)
			if err := MountRootfs(ctx, tc.mounts, sh.dir, rel); err != nil {
				t.Fatal(err)
			}
			// What the guest sees: the view.
			seen := filepath.Join(sh.dir, ShareView, tc.name, "rootfs")
			if b, err := os.ReadFile(filepath.Join(seen, "hello")); err != nil || string(b) != "hi" {
				t.Errorf("read hello through the view: %q, %v", b, err)
			}
			// A read-only rootfs is read-only in the view too: the flag
			// must have been there before propagation copied the mount.
			err := os.WriteFile(filepath.Join(seen, "written"), []byte("x"), 0o644)
			if tc.ro != errors.Is(err, unix.EROFS) {
				t.Errorf("write through the view: %v (read-only %v)", err, tc.ro)
			}
			_ = os.Remove(filepath.Join(lower, "written"))
			if err := RemoveDir(sh.dir); err == nil {
				t.Fatal("RemoveDir removed a mounted directory")
			}
			sh.undo(t)
			if err := RemoveDir(sh.dir); err != nil {
				t.Fatal(err)
			}
			if _, err := os.Stat(filepath.Join(lower, "hello")); err != nil {
				t.Errorf("the source lost its file: %v", err)
			}
		})
	}
}

func TestMountRootfsFailureLeavesNothing(t *testing.T) {
	requireRoot(t)
	ctx := context.Background()
	sh := newShare(t)
	lower := filepath.Join(tempDir(t), "lower")
	if err := os.MkdirAll(lower, 0o755); err != nil {
		t.Fatal(err)
	}
	rel := ShareMounts + "/c1/rootfs"
	mounts := []mount.Mount{
		{Type: "bind", Source: lower, Options: []string{"rbind"}},
		{Type: "no-such-fs", Source: "none"},
	}
	if err := MountRootfs(ctx, mounts, sh.dir, rel); err == nil {
		t.Fatal("MountRootfs succeeded with a bad mount")
	}
	if info := mountInfo(t, filepath.Join(sh.dir, rel)); info != nil {
		t.Fatalf("mount left after a failed MountRootfs: %v", info.Mountpoint)
	}
	if err := MountRootfs(ctx, nil, sh.dir, rel); err == nil {
		t.Fatal("MountRootfs succeeded with no mounts")
	}
}

// TestMountsRefuseSymlinks: a symlink planted where a mount is to be made
// (as a guest could do in a writable place) is an error, and the host
// directory it points to is left alone.
func TestMountsRefuseSymlinks(t *testing.T) {
	requireRoot(t)
	ctx := context.Background()
	sh := newShare(t)
	outside := tempDir(t)
	lower := filepath.Join(outside, "lower")
	if err := os.MkdirAll(lower, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(outside, filepath.Join(sh.dir, ShareMounts, "c1")); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("../..", filepath.Join(sh.dir, ShareMounts, "c2")); err != nil {
		t.Fatal(err)
	}
	bind := []mount.Mount{{Type: "bind", Source: lower, Options: []string{"rbind"}}}
	for _, rel := range []string{ShareMounts + "/c1/rootfs", ShareMounts + "/c2/rootfs", ShareMounts + "/c1"} {
		if err := MountRootfs(ctx, bind, sh.dir, rel); !errors.Is(err, ErrUnsafePath) {
			t.Errorf("MountRootfs on %s: %v, want ErrUnsafePath", rel, err)
		}
		if err := BindMount(lower, sh.dir, rel+"/v", false, ReadOnly); !errors.Is(err, ErrUnsafePath) {
			t.Errorf("BindMount on %s: %v, want ErrUnsafePath", rel, err)
		}
		if err := UnmountBeneath(sh.dir, rel, true); !errors.Is(err, ErrUnsafePath) {
			t.Errorf("UnmountBeneath %s: %v, want ErrUnsafePath", rel, err)
		}
	}
	if left, _ := MountsUnder(outside); len(left) > 0 {
		t.Errorf("mounted outside the sandbox: %v", left)
	}
	if entries, _ := os.ReadDir(outside); len(entries) != 1 {
		t.Errorf("outside dir changed: %v", entries)
	}
}

// TestUnmountBeneathBusy: a mount with a file open in it is gone from the
// mount table at once when lazy; the open file still works.
func TestUnmountBeneathBusy(t *testing.T) {
	requireRoot(t)
	sh := newShare(t)
	rel := ShareMounts + "/c1/rootfs"
	sh.mountTmpfs(t, rel)
	f, err := os.Create(filepath.Join(sh.dir, ShareView, "c1", "rootfs", "held"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := UnmountBeneath(sh.dir, rel, true); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{filepath.Join(sh.dir, rel), filepath.Join(sh.dir, ShareView, "c1", "rootfs")} {
		if info := mountInfo(t, p); info != nil {
			t.Errorf("%s still mounted", p)
		}
	}
	if _, err := f.WriteString("still open"); err != nil {
		t.Errorf("write to the file held open: %v", err)
	}
	if err := RemoveBeneath(sh.dir, ShareMounts+"/c1"); err != nil {
		t.Fatal(err)
	}
	// Nothing mounted there any more: a no-op.
	if err := UnmountBeneath(sh.dir, rel, false); err != nil {
		t.Fatal(err)
	}
}

// TestBindMount: a directory and a file bound into the host-only tree,
// writable, read-only or recursively read-only, as the guest sees them
// through the view; a missing source is an error that names it and leaves
// nothing.
func TestBindMount(t *testing.T) {
	requireRoot(t)
	sh := newShare(t)
	src := tempDir(t)
	srcDir := filepath.Join(src, "src")
	nested := filepath.Join(srcDir, "nested")
	if err := os.MkdirAll(nested, 0o755); err != nil {
		t.Fatal(err)
	}
	// A host mount inside the volume: Kubernetes' readOnly leaves it as
	// it is, recursiveReadOnly makes it read-only too.
	if err := unix.Mount("tmpfs", nested, "tmpfs", 0, "size=1m"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = unix.Unmount(nested, unix.MNT_DETACH) })
	srcFile := filepath.Join(src, "hosts")
	if err := os.WriteFile(srcFile, []byte("127.0.0.1 localhost\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name, source string
		ro           ReadOnlyMode
		// wantRO, wantNestedRO: EROFS expected at the top, below.
		wantRO, wantNestedRO bool
	}{
		{"dir", srcDir, Writable, false, false},
		{"dir-ro", srcDir, ReadOnly, true, false},
		{"dir-rro", srcDir, RecursiveReadOnly, true, true},
		{"file-ro", srcFile, ReadOnly, true, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rel := ShareMounts + "/c1/mounts/" + tc.name
			_ = sh.record(rel)
			if err := BindMount(tc.source, sh.dir, rel, true, tc.ro); err != nil {
				t.Fatal(err)
			}
			seen := filepath.Join(sh.dir, ShareView, "c1", "mounts", tc.name)
			probe, nestedProbe := seen, ""
			if st, _ := os.Stat(tc.source); st.IsDir() {
				probe = filepath.Join(seen, "written")
				nestedProbe = filepath.Join(seen, "nested", "written")
			}
			err := os.WriteFile(probe, []byte("x"), 0o644)
			if tc.wantRO != errors.Is(err, unix.EROFS) {
				t.Errorf("write through the view: %v (read-only %v)", err, tc.wantRO)
			}
			if nestedProbe != "" {
				err := os.WriteFile(nestedProbe, []byte("x"), 0o644)
				if tc.wantNestedRO != errors.Is(err, unix.EROFS) {
					t.Errorf("write below a nested mount through the view: %v (read-only %v)", err, tc.wantNestedRO)
				}
			}
			_ = os.Remove(filepath.Join(srcDir, "written"))
			_ = os.Remove(filepath.Join(nested, "written"))
		})
	}
	missing := ShareMounts + "/c1/mounts/missing"
	if err := BindMount(filepath.Join(src, "nope"), sh.dir, missing, false, Writable); err == nil || !strings.Contains(err.Error(), filepath.Join(src, "nope")) {
		t.Errorf("missing source: %v", err)
	}
	if _, err := os.Stat(filepath.Join(sh.dir, missing)); !os.IsNotExist(err) {
		t.Errorf("mount point left for a missing source: %v", err)
	}
}

// TestBindMountPrivate: a volume on a shared host mount (as kubelet's
// are) is bound private: a mount the host makes below it later does not
// reach the share, and so not the guest, where it would keep its own
// flags under a read-only volume.
func TestBindMountPrivate(t *testing.T) {
	requireRoot(t)
	sh := newShare(t)
	src := filepath.Join(tempDir(t), "volume")
	if err := os.MkdirAll(filepath.Join(src, "later"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount(src, src, "", unix.MS_BIND, ""); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = unix.Unmount(src, unix.MNT_DETACH) })
	if err := unix.Mount("", src, "", unix.MS_SHARED, ""); err != nil {
		t.Fatal(err)
	}
	rel := ShareMounts + "/c1/mounts/volume"
	_ = sh.record(rel)
	if err := BindMount(src, sh.dir, rel, true, ReadOnly); err != nil {
		t.Fatal(err)
	}
	later := filepath.Join(src, "later")
	if err := unix.Mount("tmpfs", later, "tmpfs", 0, "size=1m"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = unix.Unmount(later, unix.MNT_DETACH) })
	if err := os.WriteFile(filepath.Join(later, "hostfile"), []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, tree := range []string{ShareMounts, ShareView} {
		p := filepath.Join(sh.dir, tree, "c1", "mounts", "volume", "later", "hostfile")
		if _, err := os.Stat(p); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s: a host mount made after the bind reached the share (%v)", p, err)
		}
	}
}
