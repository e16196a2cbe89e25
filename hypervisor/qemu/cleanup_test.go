package qemu

import (
	"context"
	"errors"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/colo-runtime/colo/internal/procfs"
)

func TestIsQEMUArgs(t *testing.T) {
	const pidfile = "/run/colo/ns/c1/vm/qemu.pid"
	for _, tc := range []struct {
		name string
		args []string
		want bool
	}{
		{"QEMU", []string{"/usr/bin/qemu-system-x86_64", "-name", "c1", "-pidfile", pidfile}, true},
		{"QEMU, path not clean", []string{"qemu-system-x86_64", "-pidfile", "/run/colo/ns/c1/vm/../vm/qemu.pid"}, true},
		{"setpriv before its exec", []string{"/usr/bin/setpriv", "--no-new-privs", "--inh-caps=-all", "--", "/usr/bin/qemu-system-x86_64", "-pidfile", pidfile}, true},
		{"setpriv of something else", []string{"setpriv", "--", "/bin/sh", "-pidfile", pidfile}, false},
		{"setpriv without --", []string{"setpriv", "qemu-system-x86_64", "-pidfile", pidfile}, false},
		{"another VM's", []string{"qemu-system-x86_64", "-pidfile", "/run/colo/ns/c2/vm/qemu.pid"}, false},
		{"not QEMU", []string{"/bin/sleep", "-pidfile", pidfile}, false},
		{"pid file last, no value", []string{"qemu-system-x86_64", "-pidfile"}, false},
		{"empty", nil, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := isQEMUArgs(tc.args, pidfile); got != tc.want {
				t.Errorf("isQEMUArgs(%q) = %v, want %v", tc.args, got, tc.want)
			}
		})
	}
}

// orphanQEMU starts a process whose command line is argv (argv[0] as the
// process's name) that blocks until killed, opening a FIFO in dir nobody
// writes to; with pidfile set, it first writes its pid there, as QEMU does.
func orphanQEMU(t *testing.T, dir, pidfile string, argv ...string) *exec.Cmd {
	t.Helper()
	hold := filepath.Join(dir, "hold")
	if err := unix.Mkfifo(hold, 0o600); err != nil && !errors.Is(err, fs.ErrExist) {
		t.Fatal(err)
	}
	script := `read x < "$HOLD"`
	if pidfile != "" {
		script = `echo $$ > "$PIDFILE"; ` + script
	}
	cmd := exec.Command("/bin/sh", append([]string{"-c", script}, argv...)...)
	cmd.Args[0] = argv[0]
	cmd.Env = []string{"HOLD=" + hold, "PIDFILE=" + pidfile}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	if pidfile != "" {
		deadline := time.Now().Add(10 * time.Second)
		for {
			if b, err := os.ReadFile(pidfile); err == nil && len(b) > 0 && b[len(b)-1] == '\n' {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("the fake QEMU wrote no %s", pidfile)
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	return cmd
}

// alive reports whether cmd's process has not exited (a zombie has).
func alive(cmd *exec.Cmd) bool {
	st, err := procfs.ReadStat(cmd.Process.Pid)
	return err == nil && st.State != "Z" && st.State != "X"
}

// TestCleanupWithoutDriver finds a dead controller's QEMU each way it can
// be found, and leaves processes that are not it alone, with no Driver and
// no PATH: what a `shim delete` after QEMU was removed has.
func TestCleanupWithoutDriver(t *testing.T) {
	for _, tc := range []struct {
		name string
		// start returns the process, and what the controller recorded.
		start      func(t *testing.T, dir, pidfile string) (*exec.Cmd, procfs.Proc)
		wantKilled bool
	}{{
		name: "by its pid file",
		start: func(t *testing.T, dir, pidfile string) (*exec.Cmd, procfs.Proc) {
			return orphanQEMU(t, dir, pidfile, "qemu-system-x86_64", "-pidfile", pidfile), procfs.Proc{}
		},
		wantKilled: true,
	}, {
		// The controller died between launching QEMU and its pid file.
		name: "by its command line, before its pid file",
		start: func(t *testing.T, dir, pidfile string) (*exec.Cmd, procfs.Proc) {
			return orphanQEMU(t, dir, "", "/usr/bin/qemu-system-x86_64", "-pidfile", pidfile), procfs.Proc{}
		},
		wantKilled: true,
	}, {
		name: "by its command line, setpriv not yet QEMU",
		start: func(t *testing.T, dir, pidfile string) (*exec.Cmd, procfs.Proc) {
			return orphanQEMU(t, dir, "", "/usr/bin/setpriv", "--no-new-privs", "--", "qemu-system-x86_64", "-pidfile", pidfile), procfs.Proc{}
		},
		wantKilled: true,
	}, {
		// The pid and start time name the process, whatever it looks like.
		name: "by the recorded pid and start time",
		start: func(t *testing.T, dir, pidfile string) (*exec.Cmd, procfs.Proc) {
			cmd := orphanQEMU(t, dir, "", "some-hypervisor")
			return cmd, procfs.Of(cmd.Process.Pid)
		},
		wantKilled: true,
	}, {
		name: "recorded pid taken by another process",
		start: func(t *testing.T, dir, pidfile string) (*exec.Cmd, procfs.Proc) {
			cmd := orphanQEMU(t, dir, "", "qemu-system-x86_64", "-pidfile", "/elsewhere/qemu.pid")
			p := procfs.Of(cmd.Process.Pid)
			p.Start++ // the recorded process started at another time
			return cmd, p
		},
	}, {
		name: "pid file naming another process",
		start: func(t *testing.T, dir, pidfile string) (*exec.Cmd, procfs.Proc) {
			cmd := orphanQEMU(t, dir, "", "qemu-system-x86_64", "-pidfile", "/elsewhere/qemu.pid")
			if err := os.WriteFile(pidfile, []byte(strconv.Itoa(cmd.Process.Pid)+"\n"), 0o600); err != nil {
				t.Fatal(err)
			}
			return cmd, procfs.Proc{}
		},
	}} {
		t.Run(tc.name, func(t *testing.T) {
			t.Setenv("PATH", "")
			dir := t.TempDir()
			pidfile := filepath.Join(dir, PidFile)
			cmd, recorded := tc.start(t, dir, pidfile)
			if err := os.WriteFile(filepath.Join(dir, QMPSocket), nil, 0o600); err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			if err := Cleanup(ctx, dir, recorded); err != nil {
				t.Fatal(err)
			}
			if alive(cmd) == tc.wantKilled {
				t.Errorf("process %d alive after Cleanup: %v, want %v", cmd.Process.Pid, alive(cmd), !tc.wantKilled)
			}
			if tc.wantKilled {
				if err := cmd.Wait(); err == nil || cmd.ProcessState.Sys().(syscall.WaitStatus).Signal() != syscall.SIGKILL {
					t.Errorf("wait: %v, want killed by SIGKILL", err)
				}
			}
			for _, p := range driverFiles(dir) {
				if _, err := os.Lstat(p); !errors.Is(err, fs.ErrNotExist) {
					t.Errorf("%s: still there (%v)", p, err)
				}
			}
		})
	}
}
