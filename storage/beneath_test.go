package storage

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"golang.org/x/sys/unix"
)

// tree makes root with a few entries, and an outside directory with a file
// that a symlink in root points to.
func tree(t *testing.T) (root, outside string) {
	t.Helper()
	base := t.TempDir()
	root = filepath.Join(base, "root")
	outside = filepath.Join(base, "outside")
	for _, d := range []string{filepath.Join(root, "a", "b"), outside} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	for _, f := range []string{filepath.Join(root, "a", "file"), filepath.Join(outside, "secret")} {
		if err := os.WriteFile(f, []byte("data"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	links := map[string]string{
		"abs":      outside,         // absolute, out of root
		"absroot":  "/",             // absolute, to /
		"rel":      "../outside",    // relative, out of root
		"inside":   "a/b",           // relative, staying inside
		"loop1":    "loop2",         // a loop
		"loop2":    "loop1",         // ...
		"a/up":     "../../outside", // relative, deeper
		"a/dangle": "nowhere",       // dangling
	}
	for name, target := range links {
		if err := os.Symlink(target, filepath.Join(root, name)); err != nil {
			t.Fatal(err)
		}
	}
	return root, outside
}

func TestOpenBeneath(t *testing.T) {
	root, _ := tree(t)
	for _, tc := range []struct {
		rel string
		// ok: opens; else errUnsafe says the error is ErrUnsafePath
		// (a symlink or an escape), otherwise any error will do.
		ok, errUnsafe bool
	}{
		{".", true, false},
		{"a", true, false},
		{"a/b", true, false},
		{"a/file", true, false},
		{"a/b/../file", true, false}, // cleaned lexically; stays inside
		{"..", false, true},
		{"../outside/secret", false, true},
		{"a/../../outside", false, true},
		{"/etc/passwd", false, true},
		{"abs", false, true},
		{"abs/secret", false, true},
		{"absroot/etc", false, true},
		{"rel/secret", false, true},
		{"inside", false, true}, // a symlink even where it stays inside
		{"loop1", false, true},
		{"a/up/secret", false, true},
		{"a/dangle", false, true},
		{"missing", false, false},
	} {
		t.Run(strings.ReplaceAll(tc.rel, "/", "_"), func(t *testing.T) {
			f, err := OpenBeneath(root, tc.rel, unix.O_PATH)
			if tc.ok {
				if err != nil {
					t.Fatalf("OpenBeneath(%q): %v", tc.rel, err)
				}
				f.Close()
				return
			}
			if err == nil {
				f.Close()
				t.Fatalf("OpenBeneath(%q) succeeded", tc.rel)
			}
			if tc.errUnsafe && !errors.Is(err, ErrUnsafePath) && !errors.Is(err, unix.ELOOP) && !errors.Is(err, unix.EXDEV) {
				t.Errorf("OpenBeneath(%q): %v, want an unsafe-path error", tc.rel, err)
			}
		})
	}
}

func TestMkdirAllBeneath(t *testing.T) {
	root, outside := tree(t)
	for _, tc := range []struct {
		rel string
		ok  bool
	}{
		{"new/deeper/dir", true},
		{"a/b/c", true},
		{"a/file/x", false}, // a file on the way
		{"abs/x", false},
		{"rel/x", false},
		{"inside/x", false},
		{"loop1/x", false},
		{"a/up/x", false},
		{"a/dangle", false}, // not made through the dangling link
		{"../escape", false},
		{"/abs", false},
	} {
		t.Run(strings.ReplaceAll(tc.rel, "/", "_"), func(t *testing.T) {
			f, err := MkdirAllBeneath(root, tc.rel, 0o755)
			if tc.ok != (err == nil) {
				t.Fatalf("MkdirAllBeneath(%q): %v, want ok %v", tc.rel, err, tc.ok)
			}
			if err == nil {
				defer f.Close()
				st, err := os.Lstat(filepath.Join(root, tc.rel))
				if err != nil || !st.IsDir() {
					t.Errorf("%s not a directory: %v", tc.rel, err)
				}
			}
		})
	}
	entries, err := os.ReadDir(outside)
	if err != nil || len(entries) != 1 {
		t.Errorf("outside changed: %v %v", entries, err)
	}
	if _, err := os.Lstat(filepath.Join(filepath.Dir(root), "escape")); !os.IsNotExist(err) {
		t.Errorf("made a directory above root: %v", err)
	}
	if _, err := os.Lstat(filepath.Join(root, "a", "nowhere")); !os.IsNotExist(err) {
		t.Errorf("made the dangling link's target: %v", err)
	}
}

func TestRemoveBeneath(t *testing.T) {
	root, outside := tree(t)
	if err := os.MkdirAll(filepath.Join(root, "a", "b", "c"), 0o755); err != nil {
		t.Fatal(err)
	}
	// Removing "a" takes the links inside away as links.
	if err := RemoveBeneath(root, "a"); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(filepath.Join(root, "a")); !os.IsNotExist(err) {
		t.Errorf("a still there: %v", err)
	}
	// A symlink itself is removed, not what it points to.
	for _, name := range []string{"abs", "rel", "absroot", "loop1"} {
		if err := RemoveBeneath(root, name); err != nil {
			t.Errorf("remove %s: %v", name, err)
		}
		if _, err := os.Lstat(filepath.Join(root, name)); !os.IsNotExist(err) {
			t.Errorf("%s still there: %v", name, err)
		}
	}
	if b, err := os.ReadFile(filepath.Join(outside, "secret")); err != nil || string(b) != "data" {
		t.Errorf("outside file: %q %v", b, err)
	}
	// Through a symlink on the way: refused.
	if err := os.Symlink(outside, filepath.Join(root, "abs2")); err != nil {
		t.Fatal(err)
	}
	if err := RemoveBeneath(root, "abs2/secret"); !errors.Is(err, ErrUnsafePath) {
		t.Errorf("remove through a symlink: %v, want ErrUnsafePath", err)
	}
	for _, rel := range []string{".", "..", "/", "../outside"} {
		if err := RemoveBeneath(root, rel); !errors.Is(err, ErrUnsafePath) {
			t.Errorf("RemoveBeneath(%q): %v, want ErrUnsafePath", rel, err)
		}
	}
	if _, err := os.Stat(filepath.Join(outside, "secret")); err != nil {
		t.Errorf("outside file gone: %v", err)
	}
	if err := RemoveBeneath(root, "missing/x"); err != nil {
		t.Errorf("missing: %v", err)
	}
}

// TestBeneathRace swaps a directory for a symlink to the outside over and
// over while mkdir, open and remove run below it: whatever wins a race,
// nothing is ever made, opened or removed outside the root.
func TestBeneathRace(t *testing.T) {
	root, outside := tree(t)
	dir := filepath.Join(root, "swap")
	aside := filepath.Join(root, "aside")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(outside, "victim"), []byte("keep"), 0o644); err != nil {
		t.Fatal(err)
	}

	var stop atomic.Bool
	var wg sync.WaitGroup
	wg.Go(func() {
		// swap is a directory, then a symlink to outside, and so on.
		for !stop.Load() {
			_ = os.Rename(dir, aside)
			_ = os.Symlink(outside, dir)
			_ = os.Remove(dir)
			_ = os.Rename(aside, dir)
		}
	})
	var opened, refused int
	for range 2000 {
		if f, err := MkdirAllBeneath(root, "swap/made", 0o755); err == nil {
			real, _ := os.Readlink(procFD(f))
			f.Close()
			if !strings.HasPrefix(real, root+"/") {
				t.Errorf("MkdirAllBeneath resolved to %s, outside %s", real, root)
			}
			opened++
		} else {
			refused++
		}
		if f, err := OpenBeneath(root, "swap/victim", unix.O_RDONLY); err == nil {
			f.Close()
			t.Error("opened the outside victim through the swapped-in symlink")
		}
		_ = RemoveBeneath(root, "swap/victim")
		_ = RemoveBeneath(root, "swap/made")
	}
	stop.Store(true)
	wg.Wait()
	t.Logf("%d made or opened inside, %d refused", opened, refused)
	if _, err := os.Lstat(filepath.Join(outside, "made")); !os.IsNotExist(err) {
		t.Errorf("made a directory outside: %v", err)
	}
	if b, err := os.ReadFile(filepath.Join(outside, "victim")); err != nil || string(b) != "keep" {
		t.Errorf("outside victim: %q %v", b, err)
	}
}
