package e2e

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/colo-runtime/colo/internal/procfs"
	"github.com/colo-runtime/colo/shim/sandbox"
	"github.com/colo-runtime/colo/testbed"
)

// TestShimDeleteWithoutQEMU kills the shim of a running VM and then takes
// the QEMU binary away, as an upgrade or a move would: containerd's `shim
// delete` must still kill the VM and remove everything, from the sandbox's
// record alone. (A shim delete that first made a hypervisor driver failed
// its PATH lookup here, and the VM leaked for good.)
func TestShimDeleteWithoutQEMU(t *testing.T) {
	system, err := exec.LookPath("qemu-system-x86_64")
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name     string
		sharedFS string
	}{
		{name: "9p", sharedFS: "9p"},
		// With virtiofsd, a helper to kill besides QEMU.
		{name: "virtio-fs", sharedFS: "virtio-fs"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			id := "shimdel-" + tc.name
			checkNoLeaks(t, id)
			// QEMU as the shim finds it, in a directory of its own.
			bin := t.TempDir()
			qemu := filepath.Join(bin, "qemu-system-x86_64")
			if err := os.Symlink(system, qemu); err != nil {
				t.Fatal(err)
			}
			cfg := coloConfig(t, fmt.Sprintf("[hypervisor]\npath = %q\n\n[storage]\nshared_fs = %q\n", qemu, tc.sharedFS))
			if r := ctr(t, "run", "-d", "--runtime", testbed.Runtime, "--runtime-config-path", cfg,
				testbed.BusyboxImage, id, "sleep", "1000"); r.ExitCode != 0 {
				t.Fatalf("ctr run -d: %s", r)
			}

			dir := filepath.Join(cd.StateDir, cd.Namespace, sandbox.DirName(id))
			st, err := sandbox.ReadState(dir)
			if err != nil {
				t.Fatal(err)
			}
			vm := procfs.Proc{Pid: st.HypervisorPid, Start: st.HypervisorStart}
			if st.Version != sandbox.StateVersion || vm.Start == 0 || vm.Gone() ||
				!slices.ContainsFunc(st.Containers, func(c sandbox.ContainerState) bool { return c.ID == id }) {
				t.Fatalf("the sandbox's record: %+v", st)
			}
			if args, _ := procfs.Cmdline(vm.Pid); len(args) == 0 || args[0] != qemu {
				t.Fatalf("QEMU %d runs %q, want %s", vm.Pid, args, qemu)
			}
			if (tc.sharedFS == "virtio-fs") != (st.VirtiofsdPid != 0) {
				t.Fatalf("virtiofsd pid %d with %s", st.VirtiofsdPid, tc.sharedFS)
			}
			pids := cd.ShimPids(id)
			if len(pids) != 1 {
				t.Fatalf("want one shim for %s, found %v", id, pids)
			}

			// QEMU goes away; the VM runs on. A driver cannot be made any more.
			if err := os.Remove(qemu); err != nil {
				t.Fatal(err)
			}
			if _, err := exec.LookPath(qemu); err == nil {
				t.Fatalf("%s still found", qemu)
			}
			if err := syscall.Kill(pids[0], syscall.SIGKILL); err != nil {
				t.Fatal(err)
			}

			// containerd runs `shim delete` when it sees the shim die.
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			for !vm.Gone() || pathExists(dir) {
				if ctx.Err() != nil {
					t.Fatalf("after the shim died, still there: VM running %v, sandbox dir %v; leaks:\n  %s\ncontainerd on %s:\n%s",
						!vm.Gone(), pathExists(dir), strings.Join(cd.Leaks(), "\n  "), id, testbed.Tail(grepLines(cd.Logs(), id), 40))
				}
				time.Sleep(100 * time.Millisecond)
			}
			if leaks := cd.WaitNoLeaks(ctx, id); len(leaks) > 0 {
				t.Errorf("left behind:\n  %s", strings.Join(leaks, "\n  "))
			}
		})
	}
}

func pathExists(p string) bool {
	_, err := os.Lstat(p)
	return err == nil
}

// grepLines returns the lines of s that contain sub.
func grepLines(s, sub string) string {
	var out []string
	for _, line := range strings.Split(s, "\n") {
		if strings.Contains(line, sub) {
			out = append(out, line)
		}
	}
	return strings.Join(out, "\n")
}
