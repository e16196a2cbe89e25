package e2e

import (
	"debug/elf"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/colo-runtime/colo/testbed"
)

// checkVmcore checks that path is an ELF core of a guest's memory, root's
// alone.
func checkVmcore(t *testing.T, path string) {
	t.Helper()
	f, err := elf.Open(path)
	if err != nil {
		t.Fatalf("vmcore %s: %v", path, err)
	}
	defer f.Close()
	var notes, loads int
	for _, p := range f.Progs {
		switch p.Type {
		case elf.PT_NOTE:
			notes++
		case elf.PT_LOAD:
			loads++
		}
	}
	if f.Type != elf.ET_CORE || notes == 0 || loads == 0 {
		t.Errorf("vmcore %s: type %v, %d PT_NOTE, %d PT_LOAD; want ET_CORE with both", path, f.Type, notes, loads)
	}
	if st, err := os.Stat(path); err != nil || st.Mode().Perm() != 0o600 {
		t.Errorf("vmcore %s: %v (%v), want mode 0600", path, st.Mode(), err)
	}
}

// vmcores lists dir's entries.
func vmcores(t *testing.T, dir string) []string {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil && !os.IsNotExist(err) {
		t.Fatal(err)
	}
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	return names
}

// logLine is the first line of the containerd log (the shims' logs are
// in it) that has every one of words.
func logLine(words ...string) string {
	for line := range strings.Lines(cd.Logs()) {
		all := true
		for _, w := range words {
			all = all && strings.Contains(line, w)
		}
		if all {
			return line
		}
	}
	return ""
}

// panicking is a privileged container (without host devices: colo passes
// none) that crashes the guest kernel (sysrq c) once /tmp/go exists, so
// that its start has answered first.
var panicking = []string{"sh", "-c", "while [ ! -e /tmp/go ]; do sleep 0.1; done; echo c > /proc/sysrq-trigger; sleep 1000"}

// crash makes the panicking container id crash its guest.
func crash(t *testing.T, id string) {
	t.Helper()
	// The exec's own end races with the panic: its result does not matter.
	ctr(t, "task", "exec", "--exec-id", "go", id, "touch", "/tmp/go")
}

// TestGuestPanic: a guest kernel panic pauses the VM (pvpanic); the shim
// writes a vmcore into hypervisor.dump_dir and fails the sandbox: every
// task of the pod exits with status 255 and an exit event, and nothing is
// left. Before, `colo dump` writes one of the running guest on demand.
func TestGuestPanic(t *testing.T) {
	pod, crasher := "panic-pod", "panic-crasher"
	checkNoLeaks(t, crasher, pod)
	dumpDir := filepath.Join(t.TempDir(), "crash")
	cfg := coloConfig(t, "[hypervisor]\ndump_dir = \""+dumpDir+"\"\n")
	ev := watchEvents(t)
	flags := func(kind string, extra ...string) []string {
		return append([]string{"--null-io", "--runtime-config-path", cfg,
			"--annotation", "io.kubernetes.cri.container-type=" + kind,
			"--annotation", "io.kubernetes.cri.sandbox-id=" + pod}, extra...)
	}
	startDetached(t, testbed.Runtime, pod, flags("sandbox"), "sleep", "1000")
	startDetached(t, testbed.Runtime, crasher, flags("container", "--privileged", "--privileged-without-host-devices"), panicking...)

	// On demand, into another directory: the guest runs on after it.
	onDemand := t.TempDir()
	out, err := coloCLI(t, cfg, "dump", pod, "--dir", onDemand)
	if err != nil {
		t.Fatalf("colo dump: %v: %s", err, out)
	}
	path := strings.TrimSpace(out)
	if filepath.Dir(path) != onDemand || !strings.HasPrefix(filepath.Base(path), pod+"-") {
		t.Errorf("colo dump printed %q, want a vmcore of %s in %s", out, pod, onDemand)
	}
	checkVmcore(t, path)
	if r := ctr(t, "task", "exec", "--exec-id", "after-dump", pod, "true"); r.ExitCode != 0 {
		t.Errorf("exec after the dump: %s", r)
	}

	crash(t, crasher)
	for _, id := range []string{pod, crasher} {
		waitStopped(t, id)
		ev.waitTopic(t, id, "/tasks/exit")
		if !ev.exitStatus(id, 255) {
			t.Errorf("no exit event with status 255 for %s: %v", id, ev.topics(id))
		}
	}
	names := vmcores(t, dumpDir)
	if len(names) != 1 || !strings.HasPrefix(names[0], pod+"-") || !strings.HasSuffix(names[0], ".vmcore") {
		t.Fatalf("dump_dir holds %v, want one vmcore of %s", names, pod)
	}
	checkVmcore(t, filepath.Join(dumpDir, names[0]))
	if st, err := os.Stat(dumpDir); err != nil || st.Mode().Perm() != 0o700 {
		t.Errorf("dump_dir made %v (%v), want 0700", st.Mode(), err)
	}
	if l := logLine("the guest kernel panicked; vmcore "+filepath.Join(dumpDir, names[0]), "sandbox failed"); l == "" {
		t.Errorf("the failure in the log does not name the panic and the vmcore")
	}
	t.Logf("log: %s", strings.TrimSpace(logLine("vmcore written", names[0])))
	for _, id := range []string{crasher, pod} {
		ctr(t, "task", "rm", id)
		ctr(t, "container", "rm", id)
	}
}

// TestGuestPanicNoSpace: with dump_dir on a filesystem with less than
// twice the guest's memory free, no vmcore is written and the log says
// why; the task still exits.
func TestGuestPanicNoSpace(t *testing.T) {
	id := "panic-no-space"
	checkNoLeaks(t, id)
	small := t.TempDir()
	if err := unix.Mount("tmpfs", small, "tmpfs", 0, "size=16m,mode=0700"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := unix.Unmount(small, 0); err != nil {
			t.Error(err)
		}
	})
	cfg := coloConfig(t, "[hypervisor]\ndump_dir = \""+small+"\"\n")
	ev := watchEvents(t)
	startDetached(t, testbed.Runtime, id, []string{"--null-io", "--runtime-config-path", cfg, "--privileged", "--privileged-without-host-devices"}, panicking...)
	crash(t, id)
	waitStopped(t, id)
	ev.waitTopic(t, id, "/tasks/exit")
	if !ev.exitStatus(id, 255) {
		t.Errorf("no exit event with status 255 for %s: %v", id, ev.topics(id))
	}
	if names := vmcores(t, small); len(names) != 0 {
		t.Errorf("dump_dir on a full filesystem holds %v", names)
	}
	if l := logLine("no vmcore written", small, "MiB free", "needs", id); l == "" {
		t.Errorf("the log does not say why no vmcore was written")
	} else {
		t.Logf("log: %s", strings.TrimSpace(l))
	}
	ctr(t, "task", "rm", id)
	ctr(t, "container", "rm", id)
}
