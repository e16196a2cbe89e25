package e2e

import (
	"bufio"
	"context"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/colo-runtime/colo/testbed"
)

// Initial namespace inode numbers (include/linux/proc_ns.h): a process
// still in one of these has not been given its own namespace.
const (
	initIPCNamespace = "ipc:[4026531839]"
	initUTSNamespace = "uts:[4026531838]"
	initPIDNamespace = "pid:[4026531836]"
)

func hostKernel(t *testing.T) string {
	var u syscall.Utsname
	if err := syscall.Uname(&u); err != nil {
		t.Fatal(err)
	}
	var b strings.Builder
	for _, c := range u.Release {
		if c == 0 {
			break
		}
		b.WriteByte(byte(c))
	}
	return b.String()
}

// keyValues parses "key=value" lines.
func keyValues(s string) map[string]string {
	m := map[string]string{}
	for _, line := range strings.Split(s, "\n") {
		if k, v, ok := strings.Cut(line, "="); ok {
			m[k] = v
		}
	}
	return m
}

// TestContainerInGuest runs one container with each shared filesystem and
// checks from inside that it ran in the guest, isolated, with the spec's
// settings applied, and that stdout, stderr and the exit code arrive.
func TestContainerInGuest(t *testing.T) {
	for _, fs := range []string{"virtio-fs", "9p"} {
		t.Run(fs, func(t *testing.T) {
			id := "guest-" + strings.ReplaceAll(fs, "-", "")
			checkNoLeaks(t, id)
			cfg := coloConfig(t, "[storage]\nshared_fs = \""+fs+"\"\n")
			script := strings.Join([]string{
				`echo kernel=$(uname -r)`,
				`echo pid=$$`,
				`echo hostname=$(hostname)`,
				`echo foo=$FOO`,
				`echo cwd=$(pwd)`,
				`echo uid=$(id -u)`,
				`echo gid=$(id -g)`,
				`echo marker=$(cat ` + testbed.BusyboxMarker + `)`,
				`echo guestroot=$(test -e /etc/colo/modules && echo visible || echo hidden)`,
				`echo ns_pid=$(readlink /proc/self/ns/pid)`,
				`echo ns_ipc=$(readlink /proc/self/ns/ipc)`,
				`echo ns_uts=$(readlink /proc/self/ns/uts)`,
				`echo to-stderr >&2`,
				`exit 7`,
			}, "\n")
			r := runColo(t, []string{"--runtime-config-path", cfg, "--env", "FOO=bar", "--cwd", "/tmp",
				"--user", "1000:1000", "--hostname", "colo-guest"}, id, "sh", "-c", script)
			if r.ExitCode != 7 {
				t.Fatalf("want exit 7, got %s", r)
			}
			got := keyValues(r.Stdout)
			want := map[string]string{
				"pid": "1", "hostname": "colo-guest", "foo": "bar", "cwd": "/tmp", "uid": "1000", "gid": "1000",
				"marker": "colo busybox test image", "guestroot": "hidden",
			}
			for k, v := range want {
				if got[k] != v {
					t.Errorf("%s = %q, want %q", k, got[k], v)
				}
			}
			if got["kernel"] == "" || got["kernel"] == hostKernel(t) {
				t.Errorf("guest kernel %q should be set and differ from the host's %q", got["kernel"], hostKernel(t))
			}
			for k, initNS := range map[string]string{"ns_pid": initPIDNamespace, "ns_ipc": initIPCNamespace, "ns_uts": initUTSNamespace} {
				if got[k] == "" || got[k] == initNS {
					t.Errorf("%s = %q: want a namespace of its own", k, got[k])
				}
			}
			if !strings.Contains(r.Stderr, "to-stderr") || strings.Contains(r.Stdout, "to-stderr") {
				t.Errorf("stderr not kept apart from stdout: %s", r)
			}
			if t.Failed() {
				t.Logf("ctr run: %s", r)
			}
		})
	}
}

func TestExitCodes(t *testing.T) {
	for _, code := range []string{"0", "7", "42"} {
		t.Run(code, func(t *testing.T) {
			id := "exit-" + code
			checkNoLeaks(t, id)
			r := runColo(t, nil, id, "sh", "-c", "exit "+code)
			if got := r.ExitCode; got != atoi(t, code) {
				t.Errorf("exit code %d, want %s: %s", got, code, r)
			}
		})
	}
}

func TestMissingBinary(t *testing.T) {
	id := "missing-binary"
	checkNoLeaks(t, id)
	r := runColo(t, nil, id, "/no/such/binary")
	if r.ExitCode == 0 || !strings.Contains(r.Stderr, "/no/such/binary") {
		t.Errorf("want an error naming /no/such/binary, got %s", r)
	}
}

// background starts `ctr run --rm` and returns it with a reader of its
// stdout, once the container printed "ready".
func background(t *testing.T, id string, cmd ...string) (*exec.Cmd, *bufio.Reader) {
	t.Helper()
	args := append([]string{"run", "--rm", "--runtime", testbed.Runtime, testbed.BusyboxImage, id}, cmd...)
	c := cd.CtrCmd(context.Background(), args...)
	out, err := c.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	c.Stderr = os.Stderr
	if err := c.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if c.ProcessState == nil {
			c.Process.Kill()
			c.Wait()
		}
	})
	r := bufio.NewReader(out)
	line, err := r.ReadString('\n')
	if err != nil || strings.TrimSpace(line) != "ready" {
		t.Fatalf("container did not get ready: %q %v", line, err)
	}
	return c, r
}

func taskStatus(t *testing.T, id string) string {
	t.Helper()
	r := ctr(t, "task", "ls")
	for _, line := range strings.Split(r.Stdout, "\n") {
		if f := strings.Fields(line); len(f) >= 3 && f[0] == id {
			return f[2]
		}
	}
	return ""
}

func exitCode(t *testing.T, c *exec.Cmd) int {
	t.Helper()
	err := c.Wait()
	if ee, ok := err.(*exec.ExitError); ok {
		return ee.ExitCode()
	}
	if err != nil {
		t.Fatal(err)
	}
	return 0
}

func TestKill(t *testing.T) {
	t.Run("SIGTERM reaches a handler", func(t *testing.T) {
		id := "kill-term"
		checkNoLeaks(t, id)
		c, out := background(t, id, "sh", "-c", `trap "echo got-term; exit 3" TERM; echo ready; while true; do sleep 1; done`)
		if s := taskStatus(t, id); s != "RUNNING" {
			t.Errorf("ctr task ls: status %q, want RUNNING", s)
		}
		if r := ctr(t, "task", "kill", id); r.ExitCode != 0 {
			t.Fatalf("ctr task kill: %s", r)
		}
		rest, _ := io.ReadAll(out)
		if code := exitCode(t, c); code != 3 {
			t.Errorf("exit code %d, want 3 (from the TERM trap)", code)
		}
		if !strings.Contains(string(rest), "got-term") {
			t.Errorf("the trap's output %q lacks got-term", rest)
		}
	})
	t.Run("SIGKILL", func(t *testing.T) {
		id := "kill-kill"
		checkNoLeaks(t, id)
		c, _ := background(t, id, "sh", "-c", "echo ready; exec sleep 1000")
		if r := ctr(t, "task", "kill", "--signal", "SIGKILL", id); r.ExitCode != 0 {
			t.Fatalf("ctr task kill: %s", r)
		}
		if code := exitCode(t, c); code != 137 {
			t.Errorf("exit code %d, want 137", code)
		}
	})
	t.Run("status after exit", func(t *testing.T) {
		id := "kill-status"
		checkNoLeaks(t, id)
		if r := ctr(t, "run", "-d", "--runtime", testbed.Runtime, testbed.BusyboxImage, id, "sleep", "1000"); r.ExitCode != 0 {
			t.Fatalf("ctr run -d: %s", r)
		}
		if s := taskStatus(t, id); s != "RUNNING" {
			t.Errorf("status %q, want RUNNING", s)
		}
		if r := ctr(t, "task", "kill", "--signal", "SIGKILL", id); r.ExitCode != 0 {
			t.Fatalf("ctr task kill: %s", r)
		}
		deadline := time.Now().Add(time.Minute)
		for taskStatus(t, id) != "STOPPED" && time.Now().Before(deadline) {
			time.Sleep(100 * time.Millisecond)
		}
		if s := taskStatus(t, id); s != "STOPPED" {
			t.Errorf("status %q, want STOPPED", s)
		}
		if r := ctr(t, "task", "rm", id); r.ExitCode != 0 {
			t.Errorf("ctr task rm: %s", r)
		}
		if r := ctr(t, "container", "rm", id); r.ExitCode != 0 {
			t.Errorf("ctr container rm: %s", r)
		}
	})
}

// TestShimKilled kills the shim with SIGKILL while its container runs:
// containerd's cleanup (`shim delete`) must kill the VM and remove the state.
func TestShimKilled(t *testing.T) {
	id := "shim-killed"
	checkNoLeaks(t, id)
	if r := ctr(t, "run", "-d", "--runtime", testbed.Runtime, testbed.BusyboxImage, id, "sleep", "1000"); r.ExitCode != 0 {
		t.Fatalf("ctr run -d: %s", r)
	}
	pids := cd.ShimPids(id)
	if len(pids) != 1 {
		t.Fatalf("want one shim for %s, found %v", id, pids)
	}
	if len(cd.Leaks()) == 0 {
		t.Fatal("a running container should show up in the leak check (QEMU, shim, state)")
	}
	if err := syscall.Kill(pids[0], syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	// containerd reacts to the dead shim asynchronously.
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	for {
		if leaks := cd.Leaks(); len(leaks) == 0 {
			break
		} else if ctx.Err() != nil {
			t.Fatalf("after the shim died, still there:\n  %s", strings.Join(leaks, "\n  "))
		}
		time.Sleep(100 * time.Millisecond)
	}
	if entries, _ := os.ReadDir(filepath.Join(cd.StateDir, cd.Namespace)); len(entries) > 0 {
		t.Errorf("state dir not cleaned: %v", entries)
	}
}
