package agent

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/containerd/log"
	"golang.org/x/sys/unix"

	"github.com/colo-runtime/colo/agentproto"
)

// The debug console (the host's agent.debug_console): a virtio-serial port
// of its own, on which the agent serves a root shell in the guest's own
// namespaces, outside every container, for an operator's `colo console`.
// One session at a time: a shell on a new terminal for each host
// connection, killed with everything it started when the host goes away.
//
// The shell cannot take the service down by accident: it runs in a session
// and process group of its own with the terminal as its controlling tty (so
// ^C, ^Z and the hang-up reach the shell, never the service), with the
// default oom_score_adj (the guest OOM killer picks it before the service),
// and its output goes to the port only, never to the agent's log. Guest
// root can still kill the service on purpose: that is what a root shell
// is for, and the guest then powers off as it does whenever the service
// dies.
const (
	// consolePortName is the port's name under /sys/class/virtio-ports.
	consolePortName = agentproto.ConsolePortName
	// consoleKernelParam is on the kernel command line when the host gave
	// the VM a console.
	consoleKernelParam = agentproto.ConsoleKernelParam
	// consoleShell is the console's shell: busybox, which guest/build.sh
	// puts in the initrd for the console alone.
	consoleShell = "/bin/sh"

	// consolePoll is how often the agent looks whether a host client
	// connected: a virtio-serial port cannot be waited on for that (poll
	// reports POLLHUP at once while nobody is connected). Only a VM with
	// the console pays these wake-ups.
	consolePoll = 200 * time.Millisecond
	// consoleLinger bounds the wait for the host to go away after the
	// shell exited; a client still connected then gets a new shell.
	consoleLinger = 30 * time.Second
	// consoleKillWait bounds the wait for a killed shell to be reaped.
	consoleKillWait = 5 * time.Second
	// consoleOutputGrace is how long output the shell wrote before it
	// exited may still take to reach the host.
	consoleOutputGrace = time.Second
	// consoleRetry paces new sessions after one failed to start.
	consoleRetry = time.Second

	// ConsoleExitNotice starts the line the agent writes to the host when
	// the shell exited, followed by the exit status and "]"; `colo
	// console` ends on it (package cli has the same text).
	ConsoleExitNotice = "[colo-agent: the shell exited with status "
)

// consoleEnv is the shell's environment: the service's own has nothing a
// person at a terminal wants.
var consoleEnv = []string{
	"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
	"HOME=/",
	"SHELL=" + consoleShell,
	"USER=root",
	"LOGNAME=root",
	"TERM=xterm",
	`PS1=colo-guest:\w# `,
}

// consolePorts opens the console for one session: it returns once a host
// client is connected. Reads end (EOF) when the host goes away.
type consolePorts func(ctx context.Context) (io.ReadWriteCloser, error)

// startConsole serves the debug console if the VM has one, and returns
// what stops it (killing a running shell). Not with --listen: that is the
// service on a host, for development.
func startConsole(ctx context.Context, cfg ServeConfig) (stop func()) {
	if cfg.Listen != "" {
		return func() {}
	}
	cmdline, _ := os.ReadFile("/proc/cmdline")
	wait := false
	for _, f := range strings.Fields(string(cmdline)) {
		wait = wait || f == consoleKernelParam
	}
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		dev, err := findConsolePort(ctx, "/sys/class/virtio-ports", "/dev", wait)
		switch {
		case err != nil:
			log.G(ctx).WithError(err).Error("debug console: the host gave the VM one, but its port did not show up")
			return
		case dev == "":
			return // no console: nothing changes
		}
		port, err := openConsolePort(dev)
		if err != nil {
			log.G(ctx).WithError(err).Error("debug console")
			return
		}
		defer port.f.Close()
		log.G(ctx).Infof("debug console on virtio-serial port %s (%s)", consolePortName, dev)
		serveConsole(ctx, port.next, []string{consoleShell})
	}()
	return func() {
		cancel()
		select {
		case <-done:
		case <-time.After(2 * consoleKillWait):
			log.G(ctx).Warn("debug console: still stopping")
		}
	}
}

// findConsolePort returns the console port's device, or "" if the VM has
// none. With wait it waits (bounded) for the port to show up.
func findConsolePort(ctx context.Context, sysDir, devDir string, wait bool) (string, error) {
	find := func() (string, error) {
		port, err := findSerialPort(sysDir, consolePortName)
		if err != nil || port == "" {
			return "", err
		}
		dev := filepath.Join(devDir, port)
		// devtmpfs creates the node shortly after the port appears.
		if _, err := os.Stat(dev); err != nil {
			return "", nil
		}
		return dev, nil
	}
	if !wait {
		return find()
	}
	ctx, cancel := context.WithTimeout(ctx, serialPortTimeout)
	defer cancel()
	var dev string
	err := poll(ctx, func() (bool, error) {
		var err error
		dev, err = find()
		return dev != "", err
	})
	if err != nil {
		return "", fmt.Errorf("find virtio-serial port %q: %w", consolePortName, err)
	}
	return dev, nil
}

// consolePort is the console's virtio-serial port, open for as long as the
// console is served. Not reopened for each session: closing the port
// discards what it holds, and a client that connects right after another
// left may have sent its first bytes before the agent is done with the
// last session.
type consolePort struct {
	f  *os.File
	fd int
}

func openConsolePort(dev string) (*consolePort, error) {
	// Non-blocking, so the file uses the runtime poller and a deadline
	// ends a read or a write blocked on an absent host.
	fd, err := unix.Open(dev, unix.O_RDWR|unix.O_NONBLOCK|unix.O_CLOEXEC|unix.O_NOCTTY, 0)
	if err != nil {
		return nil, &os.PathError{Op: "open", Path: dev, Err: err}
	}
	return &consolePort{f: os.NewFile(uintptr(fd), dev), fd: fd}, nil
}

// next waits for a host client and returns the session's connection. The
// last session must be over: its connection's Close stopped its I/O, which
// next lets go again.
func (p *consolePort) next(ctx context.Context) (io.ReadWriteCloser, error) {
	p.f.SetDeadline(time.Time{})
	t := time.NewTicker(consolePoll)
	defer t.Stop()
	for {
		// POLLHUP while no host client is connected.
		pfd := []unix.PollFd{{Fd: int32(p.fd), Events: unix.POLLIN}}
		_, err := unix.Poll(pfd, 0)
		if err != nil && !errors.Is(err, unix.EINTR) {
			return nil, fmt.Errorf("poll %s: %w", p.f.Name(), err)
		}
		if err == nil && pfd[0].Revents&unix.POLLHUP == 0 {
			return &portSession{f: p.f}, nil
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-t.C:
		}
	}
}

// portSession is one session's use of the port. Reads end (EOF) when the
// host goes away; Close ends pending and later reads and writes (a
// deadline in the past) and leaves the port open.
type portSession struct {
	f *os.File
}

func (s *portSession) Read(p []byte) (int, error)  { return s.f.Read(p) }
func (s *portSession) Write(p []byte) (int, error) { return s.f.Write(p) }
func (s *portSession) Close() error                { return s.f.SetDeadline(time.Unix(1, 0)) }

// serveConsole runs one shell session after the other, each on a port
// connection from open, until ctx ends.
func serveConsole(ctx context.Context, open consolePorts, shell []string) {
	servePort(ctx, "debug console", open, func(ctx context.Context, conn io.ReadWriteCloser) {
		if err := consoleSession(ctx, conn, shell); err != nil {
			log.G(ctx).WithError(err).Warn("debug console: session")
			sleepCtx(ctx, consoleRetry)
		}
	})
}

// servePort serves one session after the other on a virtio-serial port of
// its own (the debug console's, port-forwarding's), each on a connection
// from open, until ctx ends; the session closes nothing, servePort closes
// the connection after it. A panic ends what the port serves, not the
// agent's service.
func servePort(ctx context.Context, what string, open consolePorts, session func(context.Context, io.ReadWriteCloser)) {
	defer func() {
		if p := recover(); p != nil {
			log.G(ctx).Errorf("%s: stopped by a panic: %v", what, p)
		}
	}()
	for ctx.Err() == nil {
		conn, err := open(ctx)
		if err != nil {
			if ctx.Err() == nil {
				log.G(ctx).WithError(err).Warnf("%s: open the port", what)
				sleepCtx(ctx, consoleRetry)
			}
			continue
		}
		session(ctx, conn)
		conn.Close()
	}
}

func sleepCtx(ctx context.Context, d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
	case <-t.C:
	}
}

// consoleSession runs the shell on a new terminal, connected to conn, until
// the host goes away (the shell is then killed), the shell exits (the host
// is told, and has consoleLinger to go away) or ctx ends. Every process of
// the shell's session is killed at the end.
func consoleSession(ctx context.Context, conn io.ReadWriteCloser, shell []string) error {
	master, slave, err := openPty()
	if err != nil {
		fmt.Fprintf(conn, "colo-agent: debug console: %v\r\n", err)
		return err
	}
	defer master.Close()
	cmd := exec.Command(shell[0], shell[1:]...)
	cmd.Env = consoleEnv
	cmd.Dir = "/"
	cmd.Stdin, cmd.Stdout, cmd.Stderr = slave, slave, slave
	// A session of its own with the terminal as its controlling tty: job
	// control works, and the terminal's signals reach only its processes.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true, Setctty: true, Ctty: 0}
	err = cmd.Start()
	slave.Close()
	if err != nil {
		fmt.Fprintf(conn, "colo-agent: debug console: %v\r\n", err)
		return fmt.Errorf("start %s: %w", shell[0], err)
	}
	pid := cmd.Process.Pid
	// The service's -1000 is inherited: a shell that eats the guest's
	// memory must be what the OOM killer picks.
	if err := setOOMScoreAdj(fmt.Sprintf("/proc/%d/oom_score_adj", pid), defaultContainerOOMScoreAdj); err != nil {
		log.G(ctx).WithError(err).Warn("debug console")
	}
	logger := log.G(ctx).WithField("pid", pid)
	logger.Info("debug console: shell started")

	exited := make(chan struct{})
	var waitErr error
	go func() {
		waitErr = cmd.Wait()
		close(exited)
	}()
	// Output ends when the terminal's last user is gone (EIO) or the
	// master is closed.
	output := make(chan struct{})
	go func() {
		defer close(output)
		io.Copy(conn, master)
	}()
	// Input ends when the host goes away (EOF) or conn is closed, and
	// only then: once the shell is gone what the host types is dropped,
	// so that hostGone keeps meaning the host went away.
	var shellGone atomic.Bool
	hostGone := make(chan struct{})
	go func() {
		defer close(hostGone)
		buf := make([]byte, 4096)
		for {
			n, err := conn.Read(buf)
			if n > 0 && !shellGone.Load() {
				master.Write(buf[:n])
			}
			if err != nil {
				return
			}
		}
	}()

	select {
	case <-exited:
		shellGone.Store(true)
		// What the shell wrote last is on its way; background jobs
		// it left may hold the terminal open, hence the kill first
		// and the bound.
		killSession(cmd.Process)
		select {
		case <-output:
		case <-time.After(consoleOutputGrace):
		}
		fmt.Fprintf(conn, "\r\n%s%d]\r\n", ConsoleExitNotice, exitCode(cmd.ProcessState))
		logger.Infof("debug console: shell exited: %v", describeExit(waitErr))
		t := time.NewTimer(consoleLinger)
		select {
		case <-hostGone:
		case <-ctx.Done():
		case <-t.C:
		}
		t.Stop()
	case <-hostGone:
		logger.Info("debug console: the host went away, killing the shell")
	case <-ctx.Done():
	}
	shellGone.Store(true)
	killSession(cmd.Process)
	master.Close()
	conn.Close()
	<-hostGone
	<-output
	select {
	case <-exited:
	case <-time.After(consoleKillWait):
		return fmt.Errorf("shell %d: not reaped %s after SIGKILL", pid, consoleKillWait)
	}
	return nil
}

func exitCode(ps *os.ProcessState) int {
	if ps == nil {
		return -1
	}
	if ws, ok := ps.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
		return 128 + int(ws.Signal())
	}
	return ps.ExitCode()
}

func describeExit(err error) string {
	if err == nil {
		return "exit status 0"
	}
	return err.Error()
}

// openPty opens a new pseudo-terminal pair of 24x80: the master
// non-blocking, so that it uses the runtime poller and closing it ends a
// pending read or write; the slave blocking, for the shell.
func openPty() (master, slave *os.File, err error) {
	fd, err := unix.Open("/dev/ptmx", unix.O_RDWR|unix.O_NOCTTY|unix.O_CLOEXEC|unix.O_NONBLOCK, 0)
	if err != nil {
		return nil, nil, &os.PathError{Op: "open", Path: "/dev/ptmx", Err: err}
	}
	fail := func(what string, err error) (*os.File, *os.File, error) {
		unix.Close(fd)
		return nil, nil, fmt.Errorf("%s: %w", what, err)
	}
	if err := unix.IoctlSetPointerInt(fd, unix.TIOCSPTLCK, 0); err != nil {
		return fail("unlock pty", err)
	}
	n, err := unix.IoctlGetInt(fd, unix.TIOCGPTN)
	if err != nil {
		return fail("pty number", err)
	}
	if err := unix.IoctlSetWinsize(fd, unix.TIOCSWINSZ, &unix.Winsize{Row: 24, Col: 80}); err != nil {
		return fail("pty size", err)
	}
	name := "/dev/pts/" + strconv.Itoa(n)
	sfd, err := unix.Open(name, unix.O_RDWR|unix.O_NOCTTY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fail("open "+name, err)
	}
	return os.NewFile(uintptr(fd), "/dev/ptmx"), os.NewFile(uintptr(sfd), name), nil
}

// killSession kills the shell and every process of its session, background
// jobs included; a process that made a session of its own (a daemon
// started on purpose) stays. The shell is signalled through its
// os.Process, which knows when it was reaped; the session id cannot name
// another process while a member of the session lives (the kernel keeps
// the id), so the scan is safe. Scanned again while it finds some: a
// member may fork meanwhile.
func killSession(shell *os.Process) {
	shell.Kill()
	for range 10 {
		found := false
		entries, _ := os.ReadDir("/proc")
		for _, e := range entries {
			pid, err := strconv.Atoi(e.Name())
			if err != nil || pid == shell.Pid {
				continue
			}
			if s, zombie, ok := sessionOf(pid); ok && s == shell.Pid && !zombie {
				unix.Kill(pid, unix.SIGKILL)
				found = true
			}
		}
		if !found {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// sessionOf reads a process's session id from /proc/PID/stat, and whether
// it is a zombie (killed already, waiting for its parent).
func sessionOf(pid int) (sid int, zombie, ok bool) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0, false, false
	}
	// The command name, in parentheses, may hold anything: fields
	// follow the last ")": state, ppid, pgrp, session.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, false, false
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 4 {
		return 0, false, false
	}
	sid, err = strconv.Atoi(f[3])
	return sid, f[0] == "Z", err == nil
}
