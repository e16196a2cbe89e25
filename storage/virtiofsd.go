package storage

import (
	"bufio"
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
	"sync"
	"time"

	"github.com/containerd/log"
	"golang.org/x/sys/unix"
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
type Virtiofsd struct {
	cmd    *exec.Cmd
	socket string
	stderr *lineTail

	done chan struct{}
	err  error // why the process exited; set before done is closed
}

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
	cmd := exec.Command(cfg.Binary, cfg.args()...)
	stderr, err := cmd.StderrPipe()
	if err != nil {
		return nil, fmt.Errorf("virtiofsd: %w", err)
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("virtiofsd: start %s: %w", cfg.Binary, err)
	}
	v := &Virtiofsd{
		cmd:    cmd,
		socket: cfg.SocketPath,
		stderr: newLineTail(8),
		done:   make(chan struct{}),
	}
	logger := log.G(ctx).WithFields(log.Fields{"virtiofsd": cmd.Process.Pid})
	go v.wait(logger, stderr)
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

func (v *Virtiofsd) wait(logger *log.Entry, stderr io.Reader) {
	sc := bufio.NewScanner(stderr)
	for sc.Scan() {
		line := sc.Text()
		v.stderr.add(line)
		logger.Debug(line)
	}
	// Wait closes the pipe, so it must come after the last read.
	err := v.cmd.Wait()
	if err == nil {
		err = errors.New("exited with status 0")
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

// Stop ends virtiofsd: SIGTERM, then SIGKILL once ctx is done. It returns
// once the process and the child it forks for its sandbox are gone, and
// removes the socket and virtiofsd's pid file. Stopping a stopped
// virtiofsd only removes what is left.
func (v *Virtiofsd) Stop(ctx context.Context) error {
	var children []proc
	select {
	case <-v.done:
	default:
		// The namespace sandbox runs in a child of the process we
		// started; remember it before its parent dies and it is
		// reparented.
		children = childPids(v.Pid())
		_ = v.cmd.Process.Signal(unix.SIGTERM)
		select {
		case <-v.done:
		case <-ctx.Done():
			_ = v.cmd.Process.Kill()
			<-v.done
		}
	}
	var errs []error
	for _, c := range children {
		if err := waitGone(ctx, c); err != nil {
			_ = c.kill()
			if err := waitGone(context.Background(), c); err != nil {
				errs = append(errs, err)
			}
		}
	}
	errs = append(errs, removeVirtiofsdFiles(v.socket))
	return errors.Join(errs...)
}

// CleanupVirtiofsd kills a virtiofsd left behind by a crashed shim and
// removes its socket and pid file. pid is what the shim recorded (0 if
// none); virtiofsd's own pid file is tried too. A pid is only killed if its
// command line names socketPath, so a reused pid is never hit.
func CleanupVirtiofsd(ctx context.Context, pid int, socketPath string) error {
	pids := []int{pid}
	if b, err := os.ReadFile(virtiofsdPidFile(socketPath)); err == nil {
		if p, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil && p != pid {
			pids = append(pids, p)
		}
	}
	var errs []error
	for _, p := range pids {
		if p <= 0 || !cmdlineHas(p, "--socket-path="+socketPath) {
			continue
		}
		parent := procOf(p)
		children := childPids(p)
		log.G(ctx).WithField("pid", p).Info("killing virtiofsd left behind")
		all := append([]proc{parent}, children...)
		for _, c := range all {
			_ = c.kill()
		}
		for _, c := range all {
			if err := waitGone(ctx, c); err != nil {
				errs = append(errs, err)
			}
		}
	}
	errs = append(errs, removeVirtiofsdFiles(socketPath))
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

// proc names a process by pid and start time, so that a reused pid is
// never mistaken for it.
type proc struct {
	pid   int
	start string
}

func procOf(pid int) proc {
	st, _ := procStat(pid)
	return proc{pid: pid, start: st.start}
}

func (p proc) kill() error {
	st, err := procStat(p.pid)
	if err != nil || st.start != p.start {
		return nil
	}
	return unix.Kill(p.pid, unix.SIGKILL)
}

// gone reports whether the process has exited. A zombie counts as gone:
// it holds no files or mounts any more.
func (p proc) gone() bool {
	st, err := procStat(p.pid)
	return err != nil || st.start != p.start || st.state == "Z" || st.state == "X"
}

func waitGone(ctx context.Context, p proc) error {
	for !p.gone() {
		select {
		case <-ctx.Done():
			return fmt.Errorf("process %d still running: %w", p.pid, ctx.Err())
		case <-time.After(5 * time.Millisecond):
		}
	}
	return nil
}

type stat struct {
	state string
	start string
}

// procStat reads the state (field 3) and start time (field 22) of a
// process from /proc/<pid>/stat.
func procStat(pid int) (stat, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return stat{}, err
	}
	// The command name (field 2) is in parentheses and may hold spaces.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return stat{}, fmt.Errorf("malformed /proc/%d/stat", pid)
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 20 {
		return stat{}, fmt.Errorf("malformed /proc/%d/stat", pid)
	}
	return stat{state: f[0], start: f[19]}, nil
}

// childPids lists the children of pid, from every thread's children file.
func childPids(pid int) []proc {
	tasks, _ := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/children", pid))
	var out []proc
	for _, t := range tasks {
		b, err := os.ReadFile(t)
		if err != nil {
			continue
		}
		for _, f := range strings.Fields(string(b)) {
			if c, err := strconv.Atoi(f); err == nil {
				out = append(out, procOf(c))
			}
		}
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
