package storage

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/containerd/log"
	"golang.org/x/sys/unix"

	"github.com/colo-runtime/colo/internal/procfs"
)

// virtiofsdPidDir is where the C virtiofsd (QEMU 7.x) keeps a lock/pid file
// per socket path; it does not remove the file when it exits.
const virtiofsdPidDir = "/run/virtiofsd"

// VirtiofsdConfig describes one virtiofsd serving one directory.
type VirtiofsdConfig struct {
	// Binary is the virtiofsd executable.
	Binary string
	// SocketPath is the vhost-user socket virtiofsd listens on; the VM
	// connects to it.
	SocketPath string
	// SharedDir is the directory exported to the guest.
	SharedDir string
	// Cache is the cache mode: "auto" (default), "always" or "none".
	Cache string
}

func (c VirtiofsdConfig) args() []string {
	cache := c.Cache
	if cache == "" {
		cache = "auto"
	}
	return []string{
		"--socket-path=" + c.SocketPath,
		"-o", "source=" + c.SharedDir,
		"-o", "cache=" + cache,
		// Each container's rootfs is a mount below the shared directory;
		// without this the guest sees clashing inode numbers across them.
		"-o", "announce_submounts",
	}
}

// Virtiofsd is a running virtiofsd process.
//
// virtiofsd forks a sandbox child once the VM connects; that child keeps
// virtiofsd's stderr open and may outlive its parent. So the process's
// exit is never inferred from its output: the daemon is waited for on its
// own, its output is read from a pipe whose read end we close ourselves,
// and Stop takes down every process of virtiofsd's process group before it
// stops reading.
type Virtiofsd struct {
	cmd    *exec.Cmd
	self   procfs.Proc
	socket string
	stderr *lineTail
	errR   *os.File
	// drained is closed once the output reader has returned.
	drained chan struct{}

	done chan struct{}
	err  error // why the process exited; set before done is closed
}

const (
	// virtiofsdStopGrace bounds the wait for virtiofsd to exit on SIGTERM,
	// whatever the caller's context allows, before everything of it is
	// killed.
	virtiofsdStopGrace = 5 * time.Second
	// killWait bounds the wait for a SIGKILLed process to be gone.
	killWait = 5 * time.Second
	// drainGrace bounds reading a process's output once it exited: what
	// is still buffered is read, a writer left holding the pipe is not
	// waited for.
	drainGrace = 500 * time.Millisecond
)

// StartVirtiofsd starts virtiofsd and returns once its socket is listening.
// The daemon outlives ctx; only Stop ends it. On error nothing is left
// running and no socket is left behind.
func StartVirtiofsd(ctx context.Context, cfg VirtiofsdConfig) (_ *Virtiofsd, retErr error) {
	if cfg.Binary == "" || cfg.SocketPath == "" || cfg.SharedDir == "" {
		return nil, errors.New("virtiofsd: binary, socket path and shared dir are required")
	}
	if err := os.Remove(cfg.SocketPath); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("virtiofsd: remove stale socket: %w", err)
	}
	errR, errW, err := os.Pipe()
	if err != nil {
		return nil, fmt.Errorf("virtiofsd: %w", err)
	}
	cmd := exec.Command(cfg.Binary, cfg.args()...)
	// An *os.File is handed to the process as it is: Wait does not wait
	// for a copying goroutine, so it returns when the process exits.
	cmd.Stderr = errW
	// Its own process group, so that the sandbox child it forks can be
	// found after the parent is gone.
	cmd.SysProcAttr = &unix.SysProcAttr{Setpgid: true}
	err = cmd.Start()
	errW.Close()
	if err != nil {
		errR.Close()
		return nil, fmt.Errorf("virtiofsd: start %s: %w", cfg.Binary, err)
	}
	v := &Virtiofsd{
		cmd:     cmd,
		self:    procfs.Of(cmd.Process.Pid),
		socket:  cfg.SocketPath,
		stderr:  newLineTail(8),
		errR:    errR,
		drained: make(chan struct{}),
		done:    make(chan struct{}),
	}
	logger := log.G(ctx).WithFields(log.Fields{"virtiofsd": cmd.Process.Pid})
	go v.drain(logger)
	go v.wait()
	defer func() {
		if retErr != nil {
			_ = v.Stop(context.WithoutCancel(ctx))
		}
	}()

	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for {
		ok, err := unixListening(cfg.SocketPath)
		if err != nil {
			return nil, fmt.Errorf("virtiofsd: %w", err)
		}
		if ok {
			return v, nil
		}
		select {
		case <-v.done:
			return nil, fmt.Errorf("virtiofsd exited before listening on %s: %w%s", cfg.SocketPath, v.err, v.stderr.suffix())
		case <-ctx.Done():
			return nil, fmt.Errorf("virtiofsd: waiting for socket %s: %w", cfg.SocketPath, ctx.Err())
		case <-tick.C:
		}
	}
}

// drain keeps virtiofsd's last lines of output and logs them. It returns
// at EOF or once Stop closes the pipe.
func (v *Virtiofsd) drain(logger *log.Entry) {
	defer close(v.drained)
	sc := bufio.NewScanner(v.errR)
	for sc.Scan() {
		line := sc.Text()
		v.stderr.add(line)
		logger.Debug(line)
	}
}

func (v *Virtiofsd) wait() {
	err := v.cmd.Wait()
	if err == nil {
		err = errors.New("exited with status 0")
	}
	// Give the reader a moment for the last lines, for Err's sake; a
	// forked child holding the pipe open does not hold this up.
	select {
	case <-v.drained:
	case <-time.After(drainGrace):
	}
	v.err = err
	close(v.done)
}

// Pid is the virtiofsd process.
func (v *Virtiofsd) Pid() int { return v.cmd.Process.Pid }

// Done is closed once the process has exited.
func (v *Virtiofsd) Done() <-chan struct{} { return v.done }

// Err tells why the process exited, once Done is closed.
func (v *Virtiofsd) Err() error {
	select {
	case <-v.done:
		return fmt.Errorf("%w%s", v.err, v.stderr.suffix())
	default:
		return nil
	}
}

// Stop ends virtiofsd: SIGTERM, then SIGKILL to it and every process it
// forked once ctx is done or virtiofsdStopGrace has passed, whichever
// comes first. It returns once they are all gone (or could not be killed
// within killWait), stops reading their output, and removes the socket and
// virtiofsd's pid file. Stopping a stopped virtiofsd only removes what is
// left.
func (v *Virtiofsd) Stop(ctx context.Context) error {
	arg := "--socket-path=" + v.socket
	procs := append([]procfs.Proc{v.self}, groupMembers(v.Pid(), arg)...)
	select {
	case <-v.done:
	default:
		_ = v.cmd.Process.Signal(unix.SIGTERM)
	}
	graceCtx, cancel := context.WithTimeout(ctx, virtiofsdStopGrace)
	err := waitAllGone(graceCtx, procs)
	cancel()
	if err != nil {
		log.G(ctx).WithError(err).Warn("virtiofsd: did not stop on SIGTERM; killing it")
		// Members forked since the first look are found again here.
		procs = append(procs, groupMembers(v.Pid(), arg)...)
		err = killAll(procs)
	}
	// Everything that could write to the pipe is gone: what is left in it
	// is read, then the reader is stopped whatever holds the write end.
	_ = v.errR.SetReadDeadline(time.Now().Add(drainGrace))
	<-v.drained
	v.errR.Close()
	// The process is gone: Done closes once wait has reaped it, which
	// Stop's callers count on.
	select {
	case <-v.done:
	case <-time.After(virtiofsdStopGrace):
		err = errors.Join(err, fmt.Errorf("virtiofsd %d: gone, but not reaped within %s", v.Pid(), virtiofsdStopGrace))
	}
	return errors.Join(err, removeVirtiofsdFiles(v.socket))
}

// CleanupVirtiofsd kills a virtiofsd left behind by a crashed shim and
// removes its socket and pid file. pid is what the shim recorded (0 if
// none); virtiofsd's own pid file is tried too, and so is every process
// whose command line names socketPath, for a shim that died before it
// recorded the pid. A process is only killed if its command line names
// socketPath, so a reused pid is never hit.
func CleanupVirtiofsd(ctx context.Context, pid int, socketPath string) error {
	pids := []int{pid}
	if b, err := os.ReadFile(virtiofsdPidFile(socketPath)); err == nil {
		if p, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil && p != pid {
			pids = append(pids, p)
		}
	}
	arg := "--socket-path=" + socketPath
	var all []procfs.Proc
	for _, p := range pids {
		if p <= 0 {
			continue
		}
		if cmdlineHas(p, arg) {
			all = append(all, procfs.Of(p))
		}
		// The sandbox child, even when its parent is gone already.
		all = append(all, groupMembers(p, arg)...)
	}
	// The socket is in the sandbox's own directory: no other sandbox's
	// virtiofsd has it in its command line.
	for _, p := range procfs.Find(func(args []string) bool { return slices.Contains(args, arg) }) {
		if !slices.ContainsFunc(all, func(q procfs.Proc) bool { return q.Pid == p.Pid }) {
			all = append(all, p)
		}
	}
	var errs []error
	if len(all) > 0 {
		log.G(ctx).WithField("pids", all).Info("killing virtiofsd left behind")
		errs = append(errs, killAll(all))
	}
	errs = append(errs, removeVirtiofsdFiles(socketPath))
	return errors.Join(errs...)
}

// killAll SIGKILLs procs and waits, at most killWait, for them to be gone.
func killAll(procs []procfs.Proc) error {
	for _, p := range procs {
		_ = p.Kill()
	}
	ctx, cancel := context.WithTimeout(context.Background(), killWait)
	defer cancel()
	return waitAllGone(ctx, procs)
}

func waitAllGone(ctx context.Context, procs []procfs.Proc) error {
	var errs []error
	for _, p := range procs {
		if err := procfs.WaitGone(ctx, p); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

func removeVirtiofsdFiles(socketPath string) error {
	var errs []error
	for _, f := range []string{socketPath, virtiofsdPidFile(socketPath)} {
		if err := os.Remove(f); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// virtiofsdPidFile is the file virtiofsd locks for socketPath: the path
// with every '/' turned into '.'.
func virtiofsdPidFile(socketPath string) string {
	return filepath.Join(virtiofsdPidDir, strings.ReplaceAll(socketPath, "/", ".")+".pid")
}

// groupMembers lists the live processes of process group pgid, other than
// its leader, whose command line has arg. virtiofsd's sandbox child is a
// fork and keeps its parent's command line, so the check finds it while
// it shuts out any process that took over a reused group id.
func groupMembers(pgid int, arg string) []procfs.Proc {
	entries, _ := os.ReadDir("/proc")
	var out []procfs.Proc
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == pgid {
			continue
		}
		st, err := procfs.ReadStat(pid)
		if err != nil || st.Pgrp != pgid || !cmdlineHas(pid, arg) {
			continue
		}
		out = append(out, procfs.Proc{Pid: pid, Start: st.Start})
	}
	return out
}

// cmdlineHas reports whether one argument of pid's command line is arg.
func cmdlineHas(pid int, arg string) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil {
		return false
	}
	for _, a := range bytes.Split(b, []byte{0}) {
		if string(a) == arg {
			return true
		}
	}
	return false
}

// unixListening reports whether a unix socket bound at path is listening,
// from /proc/net/unix. Connecting to test it is no option: virtiofsd
// serves exactly one connection.
func unixListening(path string) (bool, error) {
	if _, err := os.Stat(path); err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return false, nil
		}
		return false, err
	}
	f, err := os.Open("/proc/net/unix")
	if err != nil {
		return false, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Scan() // header
	for sc.Scan() {
		// Num RefCount Protocol Flags Type St Inode Path
		fields := strings.Fields(sc.Text())
		if len(fields) < 8 || fields[7] != path {
			continue
		}
		flags, err := strconv.ParseUint(fields[3], 16, 32)
		if err != nil {
			continue
		}
		const soAcceptCon = 1 << 16 // __SO_ACCEPTCON: listen(2) was called
		if flags&soAcceptCon != 0 {
			return true, nil
		}
	}
	return false, sc.Err()
}

// lineTail keeps the last lines of a process's output for error messages.
type lineTail struct {
	mu    sync.Mutex
	max   int
	lines []string
}

func newLineTail(max int) *lineTail { return &lineTail{max: max} }

func (t *lineTail) add(line string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.lines = append(t.lines, line)
	if len(t.lines) > t.max {
		t.lines = t.lines[len(t.lines)-t.max:]
	}
}

// suffix is ": <last lines>" or "" when there was no output.
func (t *lineTail) suffix() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	if len(t.lines) == 0 {
		return ""
	}
	return ": " + strings.Join(t.lines, "; ")
}
