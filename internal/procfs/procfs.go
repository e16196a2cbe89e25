// Package procfs names host processes by pid and start time, read from
// /proc, so that a process recorded once is never mistaken for a later one
// that got the same pid. Cleanup after a crashed shim acts on processes it
// did not start (QEMU, virtiofsd) long after they were recorded; by then
// their pids may belong to anything.
package procfs

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// Proc is a process: its pid and its start time.
type Proc struct {
	Pid int
	// Start is field 22 of /proc/<pid>/stat: clock ticks after boot. 0
	// means unknown, which matches no live process.
	Start uint64
}

// Of names the process pid as it is now. A process that is gone already
// gets Start 0: it is never confused with a later one.
func Of(pid int) Proc {
	st, _ := ReadStat(pid)
	return Proc{Pid: pid, Start: st.Start}
}

// Stat is what colo reads of /proc/<pid>/stat.
type Stat struct {
	// State is field 3: R, S, D, Z (zombie), X (dead)...
	State string
	// Pgrp is field 5, the process group.
	Pgrp int
	// Start is field 22, the start time in clock ticks after boot.
	Start uint64
	// UTime and STime (fields 14 and 15) are the CPU time in user and
	// kernel mode, in clock ticks (ClockTicks a second).
	UTime, STime uint64
	// Threads is field 20.
	Threads int
}

// ClockTicks is USER_HZ, the unit of /proc's times: 100 on every
// architecture colo runs on.
const ClockTicks = 100

// ReadStat reads the state (field 3), process group (field 5) and start
// time (field 22) of a process.
func ReadStat(pid int) (Stat, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return Stat{}, err
	}
	// The command name (field 2) is in parentheses and may hold spaces
	// and parentheses.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return Stat{}, fmt.Errorf("malformed /proc/%d/stat", pid)
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 20 {
		return Stat{}, fmt.Errorf("malformed /proc/%d/stat", pid)
	}
	pgrp, err := strconv.Atoi(f[2])
	if err != nil {
		return Stat{}, fmt.Errorf("malformed /proc/%d/stat: %w", pid, err)
	}
	start, err1 := strconv.ParseUint(f[19], 10, 64)
	utime, err2 := strconv.ParseUint(f[11], 10, 64)
	stime, err3 := strconv.ParseUint(f[12], 10, 64)
	threads, err4 := strconv.Atoi(f[17])
	if err := errors.Join(err1, err2, err3, err4); err != nil {
		return Stat{}, fmt.Errorf("malformed /proc/%d/stat: %w", pid, err)
	}
	return Stat{State: f[0], Pgrp: pgrp, Start: start, UTime: utime, STime: stime, Threads: threads}, nil
}

// Gone reports whether the process has exited. A zombie counts as gone: it
// holds no files or mounts any more.
func (p Proc) Gone() bool {
	st, err := ReadStat(p.Pid)
	return err != nil || p.Start == 0 || st.Start != p.Start || st.State == "Z" || st.State == "X"
}

// Kill sends SIGKILL to the process if it is still the one named. The
// signal goes through a pidfd opened before the start time is checked, so
// a pid reused between the check and the signal cannot be hit.
func (p Proc) Kill() error {
	if p.Pid <= 0 || p.Start == 0 {
		return nil
	}
	fd, err := unix.PidfdOpen(p.Pid, 0)
	if errors.Is(err, unix.ESRCH) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("pidfd_open %d: %w", p.Pid, err)
	}
	defer unix.Close(fd)
	if st, err := ReadStat(p.Pid); err != nil || st.Start != p.Start {
		return nil
	}
	if err := unix.PidfdSendSignal(fd, unix.SIGKILL, nil, 0); err != nil && !errors.Is(err, unix.ESRCH) {
		return fmt.Errorf("kill %d: %w", p.Pid, err)
	}
	return nil
}

// KillIf holds pid through a pidfd, asks ok about the process (its stat
// and command line, read while it is held), and if ok agrees, SIGKILLs it
// and waits until it has exited or ctx ends. It reports whether it sent
// the signal. A process that is gone already, or a zombie, is left alone.
//
// The signal goes to the process the pidfd holds: if that one exited and
// its pid was reused before ok's look, ok may judge the newcomer, but the
// signal still reaches only the exited process, harmlessly.
func KillIf(ctx context.Context, pid int, ok func(st Stat, args []string) bool) (bool, error) {
	if pid <= 0 {
		return false, nil
	}
	fd, err := unix.PidfdOpen(pid, 0)
	if errors.Is(err, unix.ESRCH) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("pidfd_open %d: %w", pid, err)
	}
	defer unix.Close(fd)
	st, err := ReadStat(pid)
	if errors.Is(err, os.ErrNotExist) || st.State == "Z" || st.State == "X" {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	args, err := Cmdline(pid)
	if errors.Is(err, os.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	if !ok(st, args) {
		return false, nil
	}
	if err := unix.PidfdSendSignal(fd, unix.SIGKILL, nil, 0); err != nil {
		if errors.Is(err, unix.ESRCH) {
			return false, nil
		}
		return false, fmt.Errorf("kill %d: %w", pid, err)
	}
	// The pidfd turns readable when the process has exited (a zombie
	// waiting for its parent counts: it holds nothing any more).
	for {
		fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
		n, err := unix.Poll(fds, 100) // ms: to notice ctx
		if err != nil && !errors.Is(err, unix.EINTR) {
			return true, fmt.Errorf("wait for %d: %w", pid, err)
		}
		if n > 0 {
			return true, nil
		}
		if err := ctx.Err(); err != nil {
			return true, fmt.Errorf("wait for %d to exit after SIGKILL: %w", pid, err)
		}
	}
}

// WaitGone polls until the process is gone or ctx ends.
func WaitGone(ctx context.Context, p Proc) error {
	for !p.Gone() {
		select {
		case <-ctx.Done():
			return fmt.Errorf("process %d still running: %w", p.Pid, ctx.Err())
		case <-time.After(5 * time.Millisecond):
		}
	}
	return nil
}

// Cmdline returns the arguments of pid's command line.
func Cmdline(pid int) ([]string, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil {
		return nil, err
	}
	b = bytes.TrimRight(b, "\x00")
	if len(b) == 0 {
		// A kernel thread, or a zombie.
		return nil, nil
	}
	return strings.Split(string(b), "\x00"), nil
}

// Find lists the live processes whose command line match accepts. It
// finds what was started but not recorded yet when its controller died:
// the caller matches arguments only that process can have, such as a path
// inside its own sandbox directory.
func Find(match func(args []string) bool) []Proc {
	entries, _ := os.ReadDir("/proc")
	var out []Proc
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		// The same start time before and after the command line is read:
		// the line is that process's, not one that got its pid between.
		before, err := ReadStat(pid)
		if err != nil || before.State == "Z" || before.State == "X" {
			continue
		}
		args, err := Cmdline(pid)
		if err != nil || len(args) == 0 || !match(args) {
			continue
		}
		if after, err := ReadStat(pid); err != nil || after.Start != before.Start {
			continue
		}
		out = append(out, Proc{Pid: pid, Start: before.Start})
	}
	return out
}

// KillAbandoned kills the process a dead controller left behind, each
// candidate only once it is known to be that process, and returns once
// they are gone:
//   - recorded, the process the controller wrote down: pid and start time
//     name that very process, whatever its command line says;
//   - the pid in pidfile (written by the process itself), if its command
//     line matches: the pid may have been reused;
//   - any process whose command line matches (match names something only
//     the abandoned process has, such as a socket in its own directory):
//     the controller may have died before recording anything.
//
// It returns the pids it killed, and refused reports those it left alone
// because they were another process's now. A missing pid file is no
// error; one that names no pid is ignored.
func KillAbandoned(ctx context.Context, recorded Proc, pidfile string, match func(args []string) bool) (killed, refused []int, err error) {
	byArgs := func(_ Stat, args []string) bool { return match(args) }
	type candidate struct {
		pid int
		ok  func(Stat, []string) bool
	}
	var cands []candidate
	if recorded.Pid > 0 && recorded.Start != 0 {
		cands = append(cands, candidate{recorded.Pid, func(st Stat, _ []string) bool { return st.Start == recorded.Start }})
	}
	if pidfile != "" {
		b, err := os.ReadFile(pidfile)
		if err != nil && !errors.Is(err, os.ErrNotExist) {
			return nil, nil, err
		}
		if pid, perr := strconv.Atoi(strings.TrimSpace(string(b))); err == nil && perr == nil && pid > 0 {
			cands = append(cands, candidate{pid, byArgs})
		}
	}
	for _, p := range Find(match) {
		cands = append(cands, candidate{p.Pid, func(st Stat, args []string) bool {
			return st.Start == p.Start && byArgs(st, args)
		}})
	}
	var (
		errs  []error
		tried = make(map[int]bool)
	)
	for _, c := range cands {
		if tried[c.pid] {
			continue
		}
		tried[c.pid] = true
		judged := false
		sent, err := KillIf(ctx, c.pid, func(st Stat, args []string) bool {
			judged = true
			return c.ok(st, args)
		})
		switch {
		case sent:
			killed = append(killed, c.pid)
		case judged:
			refused = append(refused, c.pid)
		}
		if err != nil {
			errs = append(errs, err)
		}
	}
	return killed, refused, errors.Join(errs...)
}
