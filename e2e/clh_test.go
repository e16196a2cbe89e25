package e2e

import (
	"errors"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"

	"github.com/colo-runtime/colo/shim/sandbox"
	"github.com/colo-runtime/colo/testbed"
)

// clhConfig selects Cloud Hypervisor, with virtio-fs: CH has no 9p, and
// the configuration refuses it with clh.
const clhConfig = "[hypervisor]\ntype = \"clh\"\n[storage]\nshared_fs = \"virtio-fs\"\n"

// clhMissing is what keeps Cloud Hypervisor from running here, as the
// test sees the host, in the order the driver looks: its binary, then a
// usable KVM (the device opens and the CPU has vmx or svm); nil where it
// can run. want are the words the driver's error must have for it.
func clhMissing(t *testing.T) (reason error, want []string) {
	if _, err := exec.LookPath("cloud-hypervisor"); err != nil {
		return err, []string{"cloud-hypervisor", "not found"}
	}
	return kvmMissing(t)
}

// kvmMissing is clhMissing's KVM part.
func kvmMissing(t *testing.T) (reason error, want []string) {
	f, err := os.OpenFile("/dev/kvm", os.O_RDWR, 0)
	if err != nil {
		return err, []string{"needs KVM", "/dev/kvm"}
	}
	f.Close()
	if !hasHardwareVirt(t) {
		return errors.New("/proc/cpuinfo has neither vmx nor svm"), []string{"needs KVM", "neither vmx nor svm"}
	}
	return nil, nil
}

// TestCLHUnusable: with hypervisor.type = "clh" where Cloud Hypervisor
// cannot run, `ctr run` fails at create with an error naming the missing
// piece (the binary, or KVM), and leaves nothing behind: no shim, no
// process, no sandbox directory, no mount. "binary" is the host as it is;
// "kvm" names a binary that exists (hypervisor.path), so that what is
// missing is KVM, where it is.
func TestCLHUnusable(t *testing.T) {
	for _, tc := range []struct {
		name    string
		config  string
		missing func(*testing.T) (error, []string)
	}{
		{name: "binary", config: clhConfig, missing: clhMissing},
		{name: "kvm", config: "[hypervisor]\ntype = \"clh\"\npath = \"/bin/true\"\n[storage]\nshared_fs = \"virtio-fs\"\n", missing: kvmMissing},
	} {
		t.Run(tc.name, func(t *testing.T) {
			missing, want := tc.missing(t)
			if missing == nil {
				t.Skip("Cloud Hypervisor can run here (cloud-hypervisor and a usable KVM): TestCLHBasic covers it")
			}
			t.Logf("Cloud Hypervisor cannot run here: %v", missing)
			id := "clh-unusable-" + tc.name
			checkNoLeaks(t, id)
			r := runColo(t, []string{"--runtime-config-path", coloConfig(t, tc.config)}, id, "echo", "never")
			if r.ExitCode == 0 || strings.Contains(r.Stdout, "never") {
				t.Fatalf("ctr run with hypervisor.type clh succeeded here: %s", r)
			}
			// The shim's create names the driver it could not make.
			for _, w := range append([]string{`hypervisor "clh"`}, want...) {
				if !strings.Contains(r.Stderr, w) {
					t.Errorf("error lacks %q: %s", w, r.Stderr)
				}
			}
			if r := ctr(t, "task", "ls"); strings.Contains(r.Stdout, id) {
				t.Errorf("a task %s is listed after the failed create: %s", id, r.Stdout)
			}
		})
	}
}

// TestCLHBasic: the task API's basic lifecycle on Cloud Hypervisor, with
// the assertions of the QEMU tests (TestExitCodes, TestExec,
// TestLifecycleEvents): run to exit, exec with output, stdin and exit
// codes, kill, rm. It needs cloud-hypervisor and a usable KVM; elsewhere it
// skips and says which is missing.
func TestCLHBasic(t *testing.T) {
	if missing, _ := clhMissing(t); missing != nil {
		t.Skipf("Cloud Hypervisor cannot run here: %v", missing)
	}
	cfg := coloConfig(t, clhConfig)

	t.Run("run", func(t *testing.T) {
		id := "clh-run"
		checkNoLeaks(t, id)
		r := runColo(t, []string{"--runtime-config-path", cfg}, id, "sh", "-c", "echo hello; echo err >&2; exit 7")
		if r.ExitCode != 7 || r.Stdout != "hello\n" || !strings.Contains(r.Stderr, "err") {
			t.Errorf("run: want exit 7, stdout hello, stderr err; got %s", r)
		}
	})

	t.Run("exec kill rm", func(t *testing.T) {
		id := "clh-exec"
		checkNoLeaks(t, id)
		startDetached(t, testbed.Runtime, id, []string{"--null-io", "--runtime-config-path", cfg}, "sleep", "1000")
		// The VM is Cloud Hypervisor's, as the sandbox recorded it.
		st, err := sandbox.ReadState(sandboxDir(cd.Namespace, id))
		if err != nil {
			t.Fatal(err)
		}
		if st.Config.Hypervisor.Type != "clh" {
			t.Errorf("sandbox recorded hypervisor %q, want clh", st.Config.Hypervisor.Type)
		}
		if b, err := os.ReadFile("/proc/" + strconv.Itoa(st.HypervisorPid) + "/comm"); err != nil || !strings.HasPrefix(string(b), "cloud-hyperviso") {
			t.Errorf("hypervisor process %d is %q (%v), want cloud-hypervisor", st.HypervisorPid, b, err)
		}

		r := ctr(t, "task", "exec", "--exec-id", "e1", id, "sh", "-c", "echo out; echo err >&2; exit 5")
		if r.ExitCode != 5 || r.Stdout != "out\n" || !strings.Contains(r.Stderr, "err") {
			t.Errorf("exec: want exit 5, stdout out, stderr err; got %s", r)
		}
		r = withStdin(t, strings.NewReader("line one\nline two\n"), "task", "exec", "--exec-id", "e2", id, "sh", "-c", "cat; echo eof-seen")
		if r.ExitCode != 0 || r.Stdout != "line one\nline two\neof-seen\n" {
			t.Errorf("exec with stdin: %s", r)
		}
		if s := taskStatus(t, id); s != "RUNNING" {
			t.Errorf("after execs the task is %q, want RUNNING", s)
		}
		if r := ctr(t, "task", "kill", "-s", "SIGKILL", id); r.ExitCode != 0 {
			t.Fatalf("kill: %s", r)
		}
		waitStopped(t, id)
		if r := ctr(t, "task", "rm", id); r.ExitCode != 0 {
			t.Errorf("task rm: %s", r)
		}
		if r := ctr(t, "container", "rm", id); r.ExitCode != 0 {
			t.Errorf("container rm: %s", r)
		}
	})
}
