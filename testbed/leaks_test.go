package testbed

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

// TestLeaksFindsWhatIsLeft proves the leak check can fail: it plants a
// process, a file and a mount of the kinds colo could leak, and expects
// each to be reported, then nothing once they are gone.
func TestLeaksFindsWhatIsLeft(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to mount")
	}
	dir := t.TempDir()
	c := &Containerd{Dir: dir, StateDir: filepath.Join(dir, "colo")}
	mnt := filepath.Join(c.StateDir, "ns", "sandbox", "shared")
	if err := os.MkdirAll(mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	if leaks := c.Leaks(); len(leaks) != 0 {
		t.Fatalf("empty directories are no leak, got %v", leaks)
	}
	if err := os.WriteFile(filepath.Join(c.StateDir, "ns", "sandbox", "state.json"), []byte("{}"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Mount("tmpfs", mnt, "tmpfs", 0, ""); err != nil {
		t.Fatal(err)
	}
	defer syscall.Unmount(mnt, syscall.MNT_DETACH)
	// sh waits on a pipe we hold, with dir in its command line.
	proc := exec.Command("sh", "-c", "read x", dir)
	stdin, err := proc.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	defer stdin.Close()
	if err := proc.Start(); err != nil {
		t.Fatal(err)
	}
	defer proc.Process.Kill()

	id := "colo-leak-test-" + filepath.Base(dir)
	cgroup := "/sys/fs/cgroup/pids/" + id
	if _, err := os.Stat("/sys/fs/cgroup/cgroup.controllers"); err == nil {
		cgroup = "/sys/fs/cgroup/" + id
	}
	if err := os.Mkdir(cgroup, 0o755); err != nil {
		t.Fatal(err)
	}
	defer os.Remove(cgroup)

	leaks := strings.Join(c.Leaks(id), "\n")
	for _, want := range []string{"process", "mount " + mnt, "file " + filepath.Join(c.StateDir, "ns", "sandbox", "state.json"), "cgroup " + cgroup} {
		if !strings.Contains(leaks, want) {
			t.Errorf("leaks %q lack %q", leaks, want)
		}
	}

	proc.Process.Kill()
	proc.Wait()
	if err := syscall.Unmount(mnt, 0); err != nil {
		t.Fatal(err)
	}
	os.Remove(filepath.Join(c.StateDir, "ns", "sandbox", "state.json"))
	if err := os.Remove(cgroup); err != nil {
		t.Fatal(err)
	}
	if leaks := c.Leaks(id); len(leaks) != 0 {
		t.Errorf("after cleanup, still %v", leaks)
	}
}
