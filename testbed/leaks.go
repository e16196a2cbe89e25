package testbed

import (
	"bytes"
	"context"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/colo-runtime/colo/storage"
)

// Leaks lists what colo left behind for this containerd: processes whose
// command line names its directory (shims, QEMU, virtiofsd), mounts
// below it, loop devices of its files (a blockfile snapshot mounted on
// the host), files in the colo state dir, and host cgroups named after any
// of the given container ids; with CRI, also what pods left (see
// CRI.leaks). Empty means clean.
func (c *Containerd) Leaks(ids ...string) []string {
	var leaks []string
	self := os.Getpid()
	daemon := -1
	if c.cmd != nil && c.cmd.Process != nil {
		daemon = c.cmd.Process.Pid
	}
	for _, p := range ProcessesMentioning(c.Dir) {
		if p.Pid != self && p.Pid != daemon {
			leaks = append(leaks, fmt.Sprintf("process %d: %s", p.Pid, p.Cmdline))
		}
	}
	for _, m := range mountsUnder(c.StateDir) {
		leaks = append(leaks, "mount "+m)
	}
	for _, l := range LoopDevicesOf(c.Dir) {
		leaks = append(leaks, "loop device "+l)
	}
	_ = filepath.WalkDir(c.StateDir, func(path string, d fs.DirEntry, err error) error {
		if err != nil || path == c.StateDir {
			return nil
		}
		if d.IsDir() && d.Name() == ".starts" {
			return filepath.SkipDir // the host's start slots, kept on purpose
		}
		if !d.IsDir() {
			leaks = append(leaks, "file "+path)
		}
		return nil
	})
	for _, cg := range cgroupsNamed(ids) {
		leaks = append(leaks, "cgroup "+cg)
	}
	if c.CRI != nil {
		leaks = append(leaks, c.CRI.leaks()...)
	}
	return leaks
}

// WaitNoLeaks polls Leaks until it is empty or ctx ends, for cleanup that
// happens asynchronously (containerd reacting to a dead shim), and returns
// what was still there.
func (c *Containerd) WaitNoLeaks(ctx context.Context, ids ...string) []string {
	for {
		leaks := c.Leaks(ids...)
		if len(leaks) == 0 {
			return nil
		}
		select {
		case <-ctx.Done():
			return leaks
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// LoopDevicesOf lists the loop devices ("/dev/loop3 of <file>") whose
// backing file is at or below dir.
func LoopDevicesOf(dir string) []string {
	files, _ := filepath.Glob("/sys/block/loop*/loop/backing_file")
	var out []string
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			continue // detached meanwhile
		}
		backing := strings.TrimSpace(string(b))
		if backing == dir || strings.HasPrefix(backing, dir+"/") {
			dev := filepath.Base(filepath.Dir(filepath.Dir(f)))
			out = append(out, "/dev/"+dev+" of "+backing)
		}
	}
	return out
}

// Process is a process found by its command line.
type Process struct {
	Pid int
	// Cmdline has its arguments joined by spaces.
	Cmdline string
}

// ProcessesMentioning lists the processes whose command line contains s.
func ProcessesMentioning(s string) []Process {
	entries, _ := os.ReadDir("/proc")
	var out []Process
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil || len(b) == 0 {
			continue
		}
		cmdline := string(bytes.ReplaceAll(bytes.TrimRight(b, "\x00"), []byte{0}, []byte{' '}))
		if strings.Contains(cmdline, s) {
			out = append(out, Process{pid, cmdline})
		}
	}
	return out
}

// mountsUnder lists mount points at or below dir; an unreadable mount
// table counts as a leak rather than as clean.
func mountsUnder(dir string) []string {
	mounts, err := storage.MountsUnder(dir)
	if err != nil {
		return []string{err.Error()}
	}
	return mounts
}

// cgroupsNamed finds cgroup directories whose name contains one of ids, in
// every mounted hierarchy (v1 and v2), a few levels deep.
func cgroupsNamed(ids []string) []string {
	if len(ids) == 0 {
		return nil
	}
	var out []string
	roots, _ := filepath.Glob("/sys/fs/cgroup/*")
	if _, err := os.Stat("/sys/fs/cgroup/cgroup.controllers"); err == nil {
		roots = []string{"/sys/fs/cgroup"}
	}
	for _, root := range roots {
		_ = filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
			if err != nil || !d.IsDir() {
				return nil
			}
			if strings.Count(strings.TrimPrefix(path, root), "/") > 4 {
				return fs.SkipDir
			}
			for _, id := range ids {
				if strings.Contains(d.Name(), id) {
					out = append(out, path)
				}
			}
			return nil
		})
	}
	return out
}

// RemoveCgroup removes the cgroup at path (relative to the hierarchy
// roots) in every mounted hierarchy, where it is empty: runc creates the
// parents of its containers' cgroups and leaves them behind.
func RemoveCgroup(path string) {
	dirs, _ := filepath.Glob(filepath.Join("/sys/fs/cgroup", "*", path))
	for _, d := range append(dirs, filepath.Join("/sys/fs/cgroup", path)) {
		_ = os.Remove(d)
	}
}

// ProcStatusKB reads a field in kB of /proc/<pid>/status ("VmRSS",
// "VmHWM").
func ProcStatusKB(pid int, field string) (int, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, field+":"); ok {
			if f := strings.Fields(rest); len(f) > 0 {
				return strconv.Atoi(f[0])
			}
		}
	}
	return 0, fmt.Errorf("no %s in /proc/%d/status", field, pid)
}
