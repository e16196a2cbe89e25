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

func TestSetupShared(t *testing.T) {
	requireRoot(t)
	ctx := context.Background()
	dir := tempDir(t)
	shared := filepath.Join(dir, "shared")

	if err := SetupShared(shared); err != nil {
		t.Fatal(err)
	}
	info := mountInfo(t, shared)
	if info == nil {
		t.Fatalf("%s is not a mount point", shared)
	}
	if !strings.Contains(info.Optional, "shared:") {
		t.Errorf("propagation of %s = %q, want shared", shared, info.Optional)
	}
	st, err := os.Stat(shared)
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode().Perm() != 0o700 {
		t.Errorf("mode of %s = %v, want 0700", shared, st.Mode().Perm())
	}

	// A mount made below it after the fact, as a container rootfs is.
	sub := filepath.Join(shared, "c1", "rootfs")
	if err := os.MkdirAll(sub, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount("tmpfs", sub, "tmpfs", 0, ""); err != nil {
		t.Fatal(err)
	}

	if err := UnmountAll(ctx, dir); err != nil {
		t.Fatal(err)
	}
	if left, _ := MountsUnder(dir); len(left) > 0 {
		t.Fatalf("mounts left: %v", left)
	}
	if err := RemoveDir(shared); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(shared); !os.IsNotExist(err) {
		t.Fatalf("%s still exists: %v", shared, err)
	}
}

func TestMountRootfs(t *testing.T) {
	requireRoot(t)
	ctx := context.Background()
	dir := tempDir(t)
	lower := filepath.Join(dir, "lower")
	upper := filepath.Join(dir, "upper")
	work := filepath.Join(dir, "work")
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
	}{
		{"bind", []mount.Mount{{Type: "bind", Source: lower, Options: []string{"rbind", "ro"}}}},
		{"overlay", []mount.Mount{{
			Type:    "overlay",
			Source:  "overlay",
			Options: []string{"lowerdir=" + lower, "upperdir=" + upper, "workdir=" + work},
		}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			target := filepath.Join(dir, "shared", tc.name, "rootfs")
			if err := MountRootfs(ctx, tc.mounts, target); err != nil {
				t.Fatal(err)
			}
			if b, err := os.ReadFile(filepath.Join(target, "hello")); err != nil || string(b) != "hi" {
				t.Errorf("read hello through the mount: %q, %v", b, err)
			}
			if err := RemoveDir(target); err == nil {
				t.Fatal("RemoveDir removed a mounted directory")
			}
			if err := UnmountAll(ctx, target); err != nil {
				t.Fatal(err)
			}
			if err := RemoveDir(filepath.Join(dir, "shared")); err != nil {
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
	dir := tempDir(t)
	lower := filepath.Join(dir, "lower")
	if err := os.MkdirAll(lower, 0o755); err != nil {
		t.Fatal(err)
	}
	target := filepath.Join(dir, "rootfs")
	mounts := []mount.Mount{
		{Type: "bind", Source: lower, Options: []string{"rbind"}},
		{Type: "no-such-fs", Source: "none"},
	}
	if err := MountRootfs(ctx, mounts, target); err == nil {
		t.Fatal("MountRootfs succeeded with a bad mount")
	}
	if left, _ := MountsUnder(dir); len(left) > 0 {
		t.Fatalf("mounts left after a failed MountRootfs: %v", left)
	}
	if err := MountRootfs(ctx, nil, target); err == nil {
		t.Fatal("MountRootfs succeeded with no mounts")
	}
}

func TestUnmountAllMissingDir(t *testing.T) {
	if err := UnmountAll(context.Background(), filepath.Join(t.TempDir(), "nope")); err != nil {
		t.Fatal(err)
	}
	if err := RemoveDir(filepath.Join(t.TempDir(), "nope")); err != nil {
		t.Fatal(err)
	}
}

// TestDetachAllBusy: a mount with a file open in it is gone from the mount
// table at once; the open file still works.
func TestDetachAllBusy(t *testing.T) {
	requireRoot(t)
	dir := tempDir(t)
	target := filepath.Join(dir, "c1", "rootfs")
	if err := os.MkdirAll(target, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount("tmpfs", target, "tmpfs", 0, ""); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = unix.Unmount(target, unix.MNT_DETACH) })
	f, err := os.Create(filepath.Join(target, "held"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := DetachAll(context.Background(), filepath.Join(dir, "c1")); err != nil {
		t.Fatal(err)
	}
	if left, err := MountsUnder(dir); err != nil || len(left) > 0 {
		t.Errorf("mounts left: %v %v", left, err)
	}
	if _, err := f.WriteString("still open"); err != nil {
		t.Errorf("write to the file held open: %v", err)
	}
	if err := RemoveDir(filepath.Join(dir, "c1")); err != nil {
		t.Fatal(err)
	}
}

// TestBindMount: a directory and a file bound into a tree, read-only or
// not; a missing source is an error that names it and leaves nothing.
func TestBindMount(t *testing.T) {
	requireRoot(t)
	dir := tempDir(t)
	srcDir := filepath.Join(dir, "src")
	if err := os.MkdirAll(srcDir, 0o755); err != nil {
		t.Fatal(err)
	}
	srcFile := filepath.Join(dir, "hosts")
	if err := os.WriteFile(srcFile, []byte("127.0.0.1 localhost\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	shared := filepath.Join(dir, "shared")
	for _, tc := range []struct {
		name, source string
		readonly     bool
	}{
		{"dir", srcDir, false},
		{"dir ro", srcDir, true},
		{"file ro", srcFile, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			target := filepath.Join(shared, "c1", "mounts", strings.ReplaceAll(tc.name, " ", "-"))
			if err := BindMount(tc.source, target, true, tc.readonly); err != nil {
				t.Fatal(err)
			}
			defer func() {
				if err := UnmountAll(context.Background(), target); err != nil {
					t.Error(err)
				}
			}()
			probe := target
			if st, _ := os.Stat(tc.source); st.IsDir() {
				probe = filepath.Join(target, "written")
			}
			err := os.WriteFile(probe, []byte("x"), 0o644)
			if tc.readonly != errors.Is(err, unix.EROFS) {
				t.Errorf("write through the mount: %v (read-only %v)", err, tc.readonly)
			}
		})
	}
	missing := filepath.Join(shared, "c1", "mounts", "missing")
	if err := BindMount(filepath.Join(dir, "nope"), missing, false, false); err == nil || !strings.Contains(err.Error(), filepath.Join(dir, "nope")) {
		t.Errorf("missing source: %v", err)
	}
	if _, err := os.Stat(missing); !os.IsNotExist(err) {
		t.Errorf("mount point left for a missing source: %v", err)
	}
	if err := RemoveDir(shared); err != nil {
		t.Fatal(err)
	}
}
