package e2e

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/colo-runtime/colo/placement"
	"github.com/colo-runtime/colo/shim/sandbox"
	"github.com/colo-runtime/colo/testbed"
)

// cgroupRoots are the roots of the host's cgroup hierarchies: v2's, or
// each mounted v1 one.
func cgroupRoots(t *testing.T) []string {
	t.Helper()
	if _, err := os.Stat("/sys/fs/cgroup/cgroup.controllers"); err == nil {
		return []string{"/sys/fs/cgroup"}
	}
	procs, err := filepath.Glob("/sys/fs/cgroup/*/cgroup.procs")
	if err != nil || len(procs) == 0 {
		t.Fatalf("no cgroup hierarchies in /sys/fs/cgroup: %v", err)
	}
	var roots []string
	for _, p := range procs {
		roots = append(roots, filepath.Dir(p))
	}
	return roots
}

// TestSystemdCgroupsPath: a pod whose cgroupsPath is one of systemd's
// cgroup driver (kubeadm's default, containerd's SystemdCgroup = true)
// has its VM placed in the scope runc would make in the pod's slice:
// QEMU's vCPU threads in <scope>/vcpu-<class>, its other threads in
// <scope>/overhead. Where systemd does not run (the test bed), the scope
// is made in cgroupfs: the test makes kubelet's outer slices, and the
// pod's slice, missing, is made by colo and removed with the scope, both
// when the task is removed and when `shim delete` cleans up after a dead
// shim. The test removes its own slices.
func TestSystemdCgroupsPath(t *testing.T) {
	systemd := pathExists("/run/systemd/system")
	roots := cgroupRoots(t)
	// Kubelet's slices above the pods', as it makes them: where systemd
	// runs they are its.
	outer := []string{"/kubepods.slice", "/kubepods.slice/kubepods-besteffort.slice"}
	if !systemd {
		var made []string
		for _, root := range roots {
			for _, s := range outer {
				dir := root + s
				if err := os.Mkdir(dir, 0o755); err == nil {
					made = append(made, dir)
				} else if !os.IsExist(err) {
					t.Fatal(err)
				}
			}
		}
		t.Cleanup(func() {
			for _, dir := range slices.Backward(made) {
				if err := os.Remove(dir); err != nil {
					t.Errorf("remove the test's slice cgroup: %v", err)
				}
			}
		})
	}
	cfg := coloConfig(t, "[colocation]\nvcpus = [\"high\", \"low\"]\n")

	for _, tc := range []struct {
		name string
		// end ends the sandbox.
		end func(t *testing.T, id, dir string)
	}{
		{"task removed", func(t *testing.T, id, _ string) {
			ctr(t, "task", "kill", "-s", "SIGKILL", id)
			waitStopped(t, id)
			ctr(t, "task", "rm", id)
			ctr(t, "container", "rm", id)
		}},
		{"shim killed", func(t *testing.T, id, dir string) {
			pids := cd.ShimPids(id)
			if len(pids) != 1 {
				t.Fatalf("want one shim for %s, found %v", id, pids)
			}
			if err := syscall.Kill(pids[0], syscall.SIGKILL); err != nil {
				t.Fatal(err)
			}
			// containerd runs `shim delete` when it sees the shim die.
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			for pathExists(dir) {
				if ctx.Err() != nil {
					t.Fatalf("sandbox dir %s still there after the shim died", dir)
				}
				time.Sleep(100 * time.Millisecond)
			}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			id := "colo-sd-" + strings.ReplaceAll(tc.name, " ", "-")
			checkNoLeaks(t, id)
			podSlice := fmt.Sprintf("kubepods-besteffort-pod%d_%s.slice", os.Getpid(), strings.ReplaceAll(id, "-", "_"))
			cgroupsPath := podSlice + ":cri-containerd:" + id
			scope := "cri-containerd-" + id + ".scope"
			podDir := "/kubepods.slice/kubepods-besteffort.slice/" + podSlice
			parent := podDir + "/" + scope
			startDetached(t, testbed.Runtime, id, []string{"--null-io", "--runtime-config-path", cfg, "--cgroup", cgroupsPath}, "sleep", "1000")

			dir := sandboxDir(cd.Namespace, id)
			st, err := sandbox.ReadState(dir)
			if err != nil {
				t.Fatal(err)
			}
			if st.Cgroup != parent {
				t.Errorf("sandbox cgroup %q, want %q", st.Cgroup, parent)
			}
			if systemd {
				if st.CgroupMade.Unit != scope || len(st.CgroupMade.Slices) != 0 {
					t.Errorf("recorded as made %+v, want the unit %s only", st.CgroupMade, scope)
				}
			} else if st.CgroupMade.Unit != "" || len(st.CgroupMade.Slices) == 0 ||
				slices.ContainsFunc(st.CgroupMade.Slices, func(s string) bool { return !strings.HasSuffix(s, podDir) }) {
				t.Errorf("recorded as made %+v, want the pod's slice %s only, and no unit", st.CgroupMade, podDir)
			}

			qemu := qemuIn(t, dir)
			tasks, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", qemu))
			if err != nil {
				t.Fatal(err)
			}
			vcpus := 0
			for _, e := range tasks {
				tid, _ := strconv.Atoi(e.Name())
				comm, _ := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/comm", qemu, tid))
				want := parent + "/" + placement.OverheadGroup
				switch {
				case strings.HasPrefix(string(comm), "CPU 0/"):
					want = parent + "/" + placement.ClassGroup("high")
					vcpus++
				case strings.HasPrefix(string(comm), "CPU 1/"):
					want = parent + "/" + placement.ClassGroup("low")
					vcpus++
				}
				if got := threadCgroup(t, qemu, tid); got != want {
					t.Errorf("QEMU thread %d (%s) in cgroup %q, want %q", tid, strings.TrimSpace(string(comm)), got, want)
				}
			}
			if vcpus != 2 {
				t.Errorf("found %d vCPU threads, want 2", vcpus)
			}

			tc.end(t, id, dir)
			for _, root := range roots {
				if pathExists(root + parent) {
					t.Errorf("scope cgroup %s left", root+parent)
				}
				if !systemd && pathExists(root+podDir) {
					t.Errorf("pod's slice cgroup %s, made by colo, left", root+podDir)
				}
				for _, s := range outer {
					if !systemd && !pathExists(root+s) {
						t.Errorf("kubelet's slice cgroup %s removed", root+s)
					}
				}
			}
		})
	}
}
