package procfs

import (
	"context"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"testing"
	"time"
)

func TestReadStat(t *testing.T) {
	st, err := ReadStat(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	if st.State != "R" && st.State != "S" {
		t.Errorf("state of the test process = %q", st.State)
	}
	if st.Start == 0 {
		t.Error("no start time")
	}
	if st.Pgrp <= 0 {
		t.Errorf("process group %d", st.Pgrp)
	}
	if _, err := ReadStat(-1); err == nil {
		t.Error("ReadStat(-1) succeeded")
	}
}

// sleeper starts a process that lives until killed, with a command line
// no other process has.
func sleeper(t *testing.T) (*exec.Cmd, string) {
	t.Helper()
	mark := "procfs-test-" + strconv.Itoa(os.Getpid()) + "-" + t.Name()
	// Blocked reading stdin, which stays open until the test ends: no
	// child process, nothing left if the test dies.
	cmd := exec.Command("/bin/sh", "-c", "read x", mark)
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		stdin.Close()
	})
	return cmd, mark
}

// A process named by pid and start time: only that very process is killed
// or counted as running.
func TestProc(t *testing.T) {
	for _, tc := range []struct {
		name       string
		named      func(p Proc) Proc // what the caller holds
		wantKilled bool
	}{
		{"itself", func(p Proc) Proc { return p }, true},
		{"another start time: the pid was reused", func(p Proc) Proc { p.Start++; return p }, false},
		{"start unknown", func(p Proc) Proc { p.Start = 0; return p }, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cmd, _ := sleeper(t)
			self := Of(cmd.Process.Pid)
			if self.Start == 0 || self.Gone() {
				t.Fatalf("Of(%d) = %+v, gone %v", cmd.Process.Pid, self, self.Gone())
			}
			p := tc.named(self)
			if err := p.Kill(); err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			if tc.wantKilled {
				if err := WaitGone(ctx, self); err != nil {
					t.Fatal(err)
				}
				return
			}
			time.Sleep(50 * time.Millisecond)
			if self.Gone() {
				t.Errorf("Kill of %+v killed %+v", p, self)
			}
			if !p.Gone() {
				t.Errorf("%+v does not count as gone", p)
			}
		})
	}
}

func TestFindAndKillIf(t *testing.T) {
	cmd, mark := sleeper(t)
	match := func(args []string) bool { return slices.Contains(args, mark) }
	found := Find(match)
	if len(found) != 1 || found[0] != Of(cmd.Process.Pid) {
		t.Fatalf("Find = %v, want the one process %d", found, cmd.Process.Pid)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	killed, err := KillIf(ctx, cmd.Process.Pid, func(_ Stat, args []string) bool { return !match(args) })
	if killed || err != nil || found[0].Gone() {
		t.Fatalf("KillIf with a refusing check: killed %v, %v; gone %v", killed, err, found[0].Gone())
	}
	killed, err = KillIf(ctx, cmd.Process.Pid, func(st Stat, args []string) bool { return st.Start == found[0].Start && match(args) })
	if !killed || err != nil {
		t.Fatalf("KillIf: killed %v, %v", killed, err)
	}
	// KillIf returns once the process has exited: a zombie here.
	if !found[0].Gone() {
		t.Error("still running after KillIf")
	}
	if got := Find(match); len(got) != 0 {
		t.Errorf("Find after the kill = %v", got)
	}
	if killed, err := KillIf(ctx, cmd.Process.Pid, func(Stat, []string) bool { return true }); killed || err != nil {
		t.Errorf("KillIf of a zombie: killed %v, %v", killed, err)
	}
}
