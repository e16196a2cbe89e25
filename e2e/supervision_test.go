package e2e

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/colo-runtime/colo/shim/sandbox"
	"github.com/colo-runtime/colo/testbed"
)

// qemuOf is the QEMU process of the sandbox id.
func qemuOf(t *testing.T, id string) int {
	t.Helper()
	return qemuIn(t, sandboxDir(cd.Namespace, id))
}

// TestFrozenGuestRecovers: a guest that stops answering (its QEMU stopped
// with SIGSTOP) makes exec and kill fail with the agent's deadline, while
// state still answers; once the guest runs again, so does everything
// (health checks are set not to give up here).
func TestFrozenGuestRecovers(t *testing.T) {
	id := "frozen-recovers"
	checkNoLeaks(t, id)
	cfg := coloConfig(t, "[agent]\ncall_timeout = \"2s\"\ncreate_timeout = \"3s\"\nhealth_interval = \"1s\"\nhealth_failures = 100000\n")
	startDetached(t, testbed.Runtime, id, []string{"--null-io", "--runtime-config-path", cfg}, "sleep", "1000")
	t.Cleanup(func() {
		ctr(t, "task", "kill", "-s", "SIGKILL", id)
		waitStopped(t, id)
		ctr(t, "task", "rm", id)
		ctr(t, "container", "rm", id)
	})
	qemu := qemuOf(t, id)
	if err := syscall.Kill(qemu, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	cont := func() {
		if err := syscall.Kill(qemu, syscall.SIGCONT); err != nil {
			t.Error(err)
		}
	}
	defer cont()

	for _, tc := range []struct {
		name string
		args []string
	}{
		{"exec", []string{"task", "exec", "--exec-id", "frozen-exec", id, "true"}},
		{"kill", []string{"task", "kill", "-s", "SIGUSR1", id}},
	} {
		r := ctr(t, tc.args...)
		if r.ExitCode == 0 {
			t.Errorf("%s into a frozen guest succeeded: %s", tc.name, r)
		} else if !strings.Contains(r.Stderr, "no answer from the guest") {
			t.Errorf("%s into a frozen guest: %s, want the agent's deadline named", tc.name, r)
		}
	}
	if st := taskStatus(t, id); st != "RUNNING" {
		t.Errorf("state of the task with a frozen guest = %q, want RUNNING", st)
	}

	cont()
	if r := ctr(t, "task", "exec", "--exec-id", "thawed-exec", id, "true"); r.ExitCode != 0 {
		t.Errorf("exec after the guest runs again: %s", r)
	}
	if r := ctr(t, "task", "kill", "-s", "SIGUSR1", id); r.ExitCode != 0 {
		t.Errorf("kill after the guest runs again: %s", r)
	}
}

// TestFrozenGuestFails: a guest that stays frozen past the health checks
// fails its sandbox: the task exits (status 255, with an exit event), and
// the VM and everything of the sandbox are gone.
func TestFrozenGuestFails(t *testing.T) {
	id := "frozen-fails"
	checkNoLeaks(t, id)
	ev := watchEvents(t)
	cfg := coloConfig(t, "[agent]\ncall_timeout = \"1s\"\nhealth_interval = \"1s\"\nhealth_failures = 2\n")
	startDetached(t, testbed.Runtime, id, []string{"--null-io", "--runtime-config-path", cfg}, "sleep", "1000")
	qemu := qemuOf(t, id)
	if err := syscall.Kill(qemu, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	// SIGKILL in the teardown ends a stopped QEMU too; should the sandbox
	// not fail, let it go on rather than leave it stopped.
	defer syscall.Kill(qemu, syscall.SIGCONT)

	waitStopped(t, id)
	ev.waitTopic(t, id, "/tasks/exit")
	if !ev.exitStatus(id, 255) {
		t.Errorf("no exit event with status 255 for %s: %v", id, ev.topics(id))
	}
	// The failed sandbox tears itself down, before anyone deletes the
	// task.
	dir := filepath.Join(cd.StateDir, cd.Namespace, sandbox.DirName(id))
	deadline := time.Now().Add(time.Minute)
	for {
		if _, err := os.Stat(dir); os.IsNotExist(err) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("sandbox dir of the failed sandbox still there: %s", dir)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if pid := qemu; syscall.Kill(pid, 0) == nil {
		if b, _ := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "cmdline")); strings.Contains(string(b), "qemu") {
			t.Errorf("QEMU %d of the failed sandbox still running", pid)
		}
	}
	ctr(t, "task", "rm", id)
	ctr(t, "container", "rm", id)
}

// TestVirtiofsdKilled: virtiofsd's death fails the sandbox: the task exits
// with an exit event, and nothing is left.
func TestVirtiofsdKilled(t *testing.T) {
	id := "virtiofsd-killed"
	checkNoLeaks(t, id)
	ev := watchEvents(t)
	cfg := coloConfig(t, "[storage]\nshared_fs = \"virtio-fs\"\n")
	startDetached(t, testbed.Runtime, id, []string{"--null-io", "--runtime-config-path", cfg}, "sleep", "1000")
	var virtiofsd []int
	for _, p := range testbed.ProcessesMentioning(filepath.Join(cd.StateDir, cd.Namespace, sandbox.DirName(id)) + "/") {
		if strings.Contains(p.Cmdline, "virtiofsd") {
			virtiofsd = append(virtiofsd, p.Pid)
		}
	}
	if len(virtiofsd) == 0 {
		t.Fatal("no virtiofsd for the sandbox")
	}
	for _, pid := range virtiofsd {
		_ = syscall.Kill(pid, syscall.SIGKILL)
	}
	waitStopped(t, id)
	ev.waitTopic(t, id, "/tasks/exit")
	if !ev.exitStatus(id, 255) {
		t.Errorf("no exit event with status 255 for %s: %v", id, ev.topics(id))
	}
	ctr(t, "task", "rm", id)
	ctr(t, "container", "rm", id)
}

// exitStatus reports whether a /tasks/exit event of the container carries
// status.
func (e *events) exitStatus(id string, status int) bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	for _, line := range strings.Split(e.buf.String(), "\n") {
		if strings.Contains(line, "/tasks/exit") && strings.Contains(line, `"`+id+`"`) &&
			strings.Contains(line, `"exit_status":`+strconv.Itoa(status)) {
			return true
		}
	}
	return false
}
