package agent

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/containerd/log"
	"github.com/mdlayher/vsock"
	"golang.org/x/sys/unix"

	"github.com/colo-runtime/colo/agentproto"
)

const (
	// ChannelSerial and ChannelVsock name the host-guest channels.
	ChannelSerial = "serial"
	ChannelVsock  = "vsock"

	// serialRetry is how long a read of the serial port waits before
	// reading again while the host side is not connected.
	serialRetry = 5 * time.Millisecond
	// serialPortTimeout bounds the wait for the agent's port to show up.
	// Without it the agent is useless: failing makes PID 1 power off, which
	// the host sees, instead of a VM that hangs.
	serialPortTimeout = 30 * time.Second
)

// listen returns the listener the service is served on: addr
// ("unix:/path", for development and tests) if set, else the channel.
func listen(ctx context.Context, channel, addr string) (net.Listener, error) {
	if addr != "" {
		path, ok := strings.CutPrefix(addr, "unix:")
		if !ok || path == "" {
			return nil, fmt.Errorf("listen address %q: want unix:/path", addr)
		}
		// A socket left by an earlier run would fail the bind.
		if fi, err := os.Lstat(path); err == nil && fi.Mode().Type() == os.ModeSocket {
			os.Remove(path)
		}
		return net.Listen("unix", path)
	}
	switch channel {
	case ChannelSerial:
		return listenSerial(ctx, "/sys/class/virtio-ports", "/dev", agentproto.SerialPortName)
	case ChannelVsock:
		return listenVsock(agentproto.VsockPort)
	default:
		return nil, fmt.Errorf("unknown channel %q (want %s or %s)", channel, ChannelSerial, ChannelVsock)
	}
}

// listenVsock listens on the vsock port for connections to any of the
// guest's CIDs (VMADDR_CID_ANY), not to the CID it has now, which is what
// vsock.Listen binds. A VM restored from a template gets a CID of its own
// after the guest started listening: its host sends a transport reset and
// the guest driver re-reads its CID (hypervisor/qemu's startClone has the
// details). A listener bound to the template's CID would not match the
// host's connections to the new one, and the guest would refuse them.
//
// The reset also resets the connections open when the template was saved
// (the host's probe that found the agent listening); the service keeps
// serving: ttrpc drops a connection that fails, and the kernel's accept
// returns such a connection rather than an error (only an error of the
// listener itself fails accept).
func listenVsock(port uint32) (net.Listener, error) {
	l, err := vsock.ListenContextID(unix.VMADDR_CID_ANY, port, nil)
	if err != nil {
		return nil, fmt.Errorf("listen on vsock port %d: %w", port, err)
	}
	return l, nil
}

// listenSerial finds the virtio-serial port with the given name and
// serves its one long-lived connection.
func listenSerial(ctx context.Context, sysDir, devDir, name string) (net.Listener, error) {
	ctx, cancel := context.WithTimeout(ctx, serialPortTimeout)
	defer cancel()
	var dev string
	err := poll(ctx, func() (bool, error) {
		port, err := findSerialPort(sysDir, name)
		if err != nil || port == "" {
			return false, err
		}
		dev = filepath.Join(devDir, port)
		// devtmpfs creates the node shortly after the port appears.
		_, err = os.Stat(dev)
		return err == nil, nil
	})
	if err != nil {
		return nil, fmt.Errorf("find virtio-serial port %q: %w", name, err)
	}
	fd, err := unix.Open(dev, unix.O_RDWR|unix.O_NONBLOCK|unix.O_CLOEXEC|unix.O_NOCTTY, 0)
	if err != nil {
		return nil, &os.PathError{Op: "open", Path: dev, Err: err}
	}
	log.G(ctx).Infof("serving on virtio-serial port %s (%s)", name, dev)
	// Non-blocking, so the file uses the runtime poller and Close
	// interrupts a pending read.
	return newOneConnListener(newSerialConn(os.NewFile(uintptr(fd), dev))), nil
}

// findSerialPort returns the name of the port device (e.g. "vport1p1")
// whose name attribute is name, or "" if there is none (yet).
func findSerialPort(sysDir, name string) (string, error) {
	files, err := filepath.Glob(filepath.Join(sysDir, "*", "name"))
	if err != nil {
		return "", err
	}
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			continue // the port went away
		}
		if strings.TrimSpace(string(b)) == name {
			return filepath.Base(filepath.Dir(f)), nil
		}
	}
	return "", nil
}

// poll calls cond every few milliseconds until it is true, fails, or ctx
// ends.
func poll(ctx context.Context, cond func() (bool, error)) error {
	t := time.NewTicker(10 * time.Millisecond)
	defer t.Stop()
	for {
		ok, err := cond()
		if ok || err != nil {
			return err
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-t.C:
		}
	}
}

// serialConn is a net.Conn over a virtio-serial port. While the host side
// is not connected the port reads EOF over and over (POLLHUP); the
// connection hides that by waiting and reading again, so the ttrpc server
// only ever sees data. Writes block meanwhile, in the kernel.
type serialConn struct {
	f      *os.File
	closed chan struct{}
	once   sync.Once
}

func newSerialConn(f *os.File) *serialConn {
	return &serialConn{f: f, closed: make(chan struct{})}
}

func (c *serialConn) Read(p []byte) (int, error) {
	for {
		n, err := c.f.Read(p)
		if errors.Is(err, os.ErrClosed) {
			return n, net.ErrClosed
		}
		if !errors.Is(err, io.EOF) {
			return n, err
		}
		t := time.NewTimer(serialRetry)
		select {
		case <-c.closed:
			t.Stop()
			return 0, net.ErrClosed
		case <-t.C:
		}
	}
}

func (c *serialConn) Write(p []byte) (int, error) { return c.f.Write(p) }

func (c *serialConn) Close() error {
	err := net.ErrClosed
	c.once.Do(func() {
		close(c.closed)
		err = c.f.Close()
	})
	return err
}

func (c *serialConn) LocalAddr() net.Addr                { return serialAddr(c.f.Name()) }
func (c *serialConn) RemoteAddr() net.Addr               { return serialAddr(c.f.Name()) }
func (c *serialConn) SetDeadline(t time.Time) error      { return c.f.SetDeadline(t) }
func (c *serialConn) SetReadDeadline(t time.Time) error  { return c.f.SetReadDeadline(t) }
func (c *serialConn) SetWriteDeadline(t time.Time) error { return c.f.SetWriteDeadline(t) }

type serialAddr string

func (a serialAddr) Network() string { return "virtio-serial" }
func (a serialAddr) String() string  { return string(a) }

// oneConnListener hands out a single connection once. Later Accepts block
// until the listener is closed, or fail once the connection is closed: a
// serial port cannot be accepted again, and the service ending then lets
// PID 1 power off the VM rather than leave it deaf.
type oneConnListener struct {
	conn     net.Conn
	closed   chan struct{}
	connDone chan struct{}

	mu        sync.Mutex
	handedOut bool
	closeOnce sync.Once
}

func newOneConnListener(conn net.Conn) *oneConnListener {
	return &oneConnListener{
		conn:     conn,
		closed:   make(chan struct{}),
		connDone: make(chan struct{}),
	}
}

func (l *oneConnListener) Accept() (net.Conn, error) {
	l.mu.Lock()
	first := !l.handedOut
	l.handedOut = true
	l.mu.Unlock()
	select {
	case <-l.closed:
		return nil, net.ErrClosed
	default:
	}
	if first {
		return &notifyConn{Conn: l.conn, done: l.connDone}, nil
	}
	select {
	case <-l.closed:
		return nil, net.ErrClosed
	case <-l.connDone:
		return nil, errors.New("the channel's only connection is closed")
	}
}

// Close stops Accept; the connection, once handed out, belongs to its
// user.
func (l *oneConnListener) Close() error {
	l.closeOnce.Do(func() {
		close(l.closed)
		l.mu.Lock()
		defer l.mu.Unlock()
		if !l.handedOut {
			l.handedOut = true
			l.conn.Close()
		}
	})
	return nil
}

func (l *oneConnListener) Addr() net.Addr { return l.conn.LocalAddr() }

// notifyConn tells its listener when it is closed.
type notifyConn struct {
	net.Conn
	done chan struct{}
	once sync.Once
}

func (c *notifyConn) Close() error {
	err := c.Conn.Close()
	c.once.Do(func() { close(c.done) })
	return err
}
