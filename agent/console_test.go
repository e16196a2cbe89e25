package agent

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containerd/log"
	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"
)

// testShell is busybox's sh, the guest's console shell, when the host has
// it (Debian's busybox-static), else the host's sh.
func testShell(t *testing.T) []string {
	t.Helper()
	if _, err := os.Stat("/bin/busybox"); err == nil {
		return []string{"/bin/busybox", "sh"}
	}
	if _, err := os.Stat("/bin/sh"); err != nil {
		t.Skip("no shell")
	}
	return []string{"/bin/sh"}
}

// fakeHost is the host's end of a console connection: a socketpair stands
// in for the virtio-serial port, its closing for the host going away.
type fakeHost struct {
	t    *testing.T
	conn net.Conn

	mu   sync.Mutex
	out  bytes.Buffer
	done chan struct{}
}

// newFakeHost returns the host's end and the agent's.
func newFakeHost(t *testing.T) (*fakeHost, io.ReadWriteCloser) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	conn := func(fd int) net.Conn {
		f := os.NewFile(uintptr(fd), "console")
		defer f.Close()
		c, err := net.FileConn(f)
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	h := &fakeHost{t: t, conn: conn(fds[0]), done: make(chan struct{})}
	go func() {
		defer close(h.done)
		buf := make([]byte, 4096)
		for {
			n, err := h.conn.Read(buf)
			h.mu.Lock()
			h.out.Write(buf[:n])
			h.mu.Unlock()
			if err != nil {
				return
			}
		}
	}()
	t.Cleanup(func() { h.conn.Close() })
	return h, conn(fds[1])
}

func (h *fakeHost) send(s string) {
	h.t.Helper()
	if _, err := h.conn.Write([]byte(s)); err != nil {
		h.t.Fatal(err)
	}
}

// expect waits (bounded) until the output matches re, and returns the
// submatches of its first match; the output up to the match's end is
// consumed.
func (h *fakeHost) expect(re string) []string {
	h.t.Helper()
	rx := regexp.MustCompile(re)
	deadline := time.Now().Add(10 * time.Second)
	for {
		h.mu.Lock()
		out := h.out.String()
		if loc := rx.FindStringSubmatchIndex(out); loc != nil {
			m := rx.FindStringSubmatch(out)
			h.out.Next(loc[1])
			h.mu.Unlock()
			return m
		}
		h.mu.Unlock()
		if time.Now().After(deadline) {
			h.t.Fatalf("output %q: no match for %q within 10s", out, re)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// runConsole serves the console on the conns given to the returned
// function, and stops it at the end of the test, checking it stops.
func runConsole(t *testing.T, ctx context.Context, shell []string) func(io.ReadWriteCloser) {
	t.Helper()
	ctx, cancel := context.WithCancel(ctx)
	conns := make(chan io.ReadWriteCloser)
	done := make(chan struct{})
	go func() {
		defer close(done)
		serveConsole(ctx, func(ctx context.Context) (io.ReadWriteCloser, error) {
			select {
			case c := <-conns:
				return c, nil
			case <-ctx.Done():
				return nil, ctx.Err()
			}
		}, shell)
	}()
	t.Cleanup(func() {
		cancel()
		select {
		case <-done:
		case <-time.After(2 * consoleKillWait):
			t.Error("the console did not stop")
		}
	})
	return func(c io.ReadWriteCloser) {
		select {
		case conns <- c:
		case <-time.After(10 * time.Second):
			t.Fatal("the console did not take a new connection")
		}
	}
}

// logContext logs into a buffer, to check what reaches the agent's log.
func logContext(t *testing.T) (context.Context, *lockedBuffer) {
	var buf bytes.Buffer
	var mu sync.Mutex
	l := logrus.New()
	l.SetOutput(writerFunc(func(p []byte) (int, error) {
		mu.Lock()
		defer mu.Unlock()
		return buf.Write(p)
	}))
	l.SetLevel(logrus.DebugLevel)
	return log.WithLogger(context.Background(), logrus.NewEntry(l)), &lockedBuffer{mu: &mu, buf: &buf}
}

type lockedBuffer struct {
	mu  *sync.Mutex
	buf *bytes.Buffer
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

type writerFunc func([]byte) (int, error)

func (f writerFunc) Write(p []byte) (int, error) { return f(p) }

// gonePid waits (bounded) until pid is no more, or a zombie.
func gonePid(t *testing.T, pid int) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		_, zombie, ok := sessionOf(pid)
		if !ok || zombie {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("pid %d still runs", pid)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestConsoleSession: a shell on a terminal of its own session; ^C reaches
// it, not the service; its exit is told to the host with the status; the
// host going away kills it and its background jobs; each connection gets
// a new shell; nothing of its output reaches the agent's log.
func TestConsoleSession(t *testing.T) {
	ctx, logs := logContext(t)
	connect := runConsole(t, ctx, testShell(t))

	h, c := newFakeHost(t)
	connect(c)
	// Quotes keep the echo of the command line from matching.
	h.send("echo hel''lo-$((6*7))\n")
	h.expect(`hello-42`)
	h.send("tty; echo sid=$(cut -d' ' -f6 /proc/$$/stat) pid=$$\n")
	m := h.expect(`(/dev/pts/\d+)\r?\n.*sid=(\d+) pid=(\d+)`)
	if m[2] != m[3] {
		t.Errorf("the shell (pid %s) is not its session's leader (session %s)", m[3], m[2])
	}
	if sid, _ := unix.Getsid(0); strconv.Itoa(sid) == m[2] {
		t.Errorf("the shell is in the service's session %d", sid)
	}
	// ^C interrupts the shell's foreground job, and only that: this
	// process (the service) gets no SIGINT and goes on.
	h.send("sleep 100\n")
	time.Sleep(300 * time.Millisecond)
	h.send("\x03")
	h.send("echo ali''ve\n")
	h.expect(`alive`)
	h.send("exit 7\n")
	h.expect(regexp.QuoteMeta(ConsoleExitNotice) + `7\]`)
	h.conn.Close()

	// A new connection, a new shell; leaving kills it and its jobs.
	h2, c2 := newFakeHost(t)
	connect(c2)
	h2.send("sleep 1000 & echo bg=$! pid=$$\n")
	m = h2.expect(`bg=(\d+) pid=(\d+)`)
	if m[1] == m[2] {
		t.Fatalf("same pid for the shell and its job: %q", m[0])
	}
	h2.conn.Close()
	for _, p := range m[1:] {
		pid, _ := strconv.Atoi(p)
		gonePid(t, pid)
	}

	// A third one works after the kill.
	h3, c3 := newFakeHost(t)
	connect(c3)
	h3.send("echo thi''rd\n")
	h3.expect(`third`)
	h3.conn.Close()

	if strings.Contains(logs.String(), "hello") || strings.Contains(logs.String(), "third") {
		t.Errorf("the shell's output is in the agent's log:\n%s", logs)
	}
	if !strings.Contains(logs.String(), "shell started") {
		t.Errorf("no session in the agent's log:\n%s", logs)
	}
}

// TestConsoleStopKills: stopping the console (the service stopping) kills
// the shell.
func TestConsoleStopKills(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	conns := make(chan io.ReadWriteCloser, 1)
	done := make(chan struct{})
	go func() {
		defer close(done)
		serveConsole(ctx, func(ctx context.Context) (io.ReadWriteCloser, error) {
			select {
			case c := <-conns:
				return c, nil
			case <-ctx.Done():
				return nil, ctx.Err()
			}
		}, testShell(t))
	}()
	h, c := newFakeHost(t)
	conns <- c
	h.send("echo pid=$$\n")
	pid, _ := strconv.Atoi(h.expect(`pid=(\d+)`)[1])
	cancel()
	select {
	case <-done:
	case <-time.After(2 * consoleKillWait):
		t.Fatal("the console did not stop")
	}
	gonePid(t, pid)
	// The host's end sees the end of the connection.
	select {
	case <-h.done:
	case <-time.After(5 * time.Second):
		t.Error("the host's end was not closed")
	}
}

// TestConsoleNoShell: a guest image without the shell says so on the
// console, and the console goes on.
func TestConsoleNoShell(t *testing.T) {
	ctx, _ := logContext(t)
	connect := runConsole(t, ctx, []string{filepath.Join(t.TempDir(), "no-sh")})
	h, c := newFakeHost(t)
	connect(c)
	h.expect(`debug console: .*no-sh`)
	h.conn.Close()
	// The console takes the next connection after its pause.
	h2, c2 := newFakeHost(t)
	connect(c2)
	h2.expect(`no-sh`)
}

func TestSessionOf(t *testing.T) {
	sid, zombie, ok := sessionOf(os.Getpid())
	want, _ := unix.Getsid(0)
	if !ok || zombie || sid != want {
		t.Fatalf("sessionOf(self) = %d, %v, %v; want %d", sid, zombie, ok, want)
	}
	if _, _, ok := sessionOf(1 << 30); ok {
		t.Error("sessionOf(no such pid): ok")
	}
}

// TestFindConsolePort: a port found by name in sysfs; none without it,
// at once unless the kernel command line says to wait.
func TestFindConsolePort(t *testing.T) {
	sys, dev := t.TempDir(), t.TempDir()
	ctx := context.Background()
	if got, err := findConsolePort(ctx, sys, dev, false); got != "" || err != nil {
		t.Fatalf("no port: got %q, %v", got, err)
	}
	short, cancel := context.WithTimeout(ctx, 50*time.Millisecond)
	defer cancel()
	if _, err := findConsolePort(short, sys, dev, true); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("waiting for a port that never comes: %v", err)
	}
	for name, port := range map[string]string{"vport1p1": "agent.0", "vport1p2": consolePortName} {
		if err := os.MkdirAll(filepath.Join(sys, name), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(sys, name, "name"), []byte(port+"\n"), 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dev, name), nil, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if got, err := findConsolePort(ctx, sys, dev, true); got != filepath.Join(dev, "vport1p2") || err != nil {
		t.Fatalf("got %q, %v; want %s", got, err, filepath.Join(dev, "vport1p2"))
	}
}
