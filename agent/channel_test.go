package agent

import (
	"context"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"testing"

	"github.com/containerd/ttrpc"
	"github.com/mdlayher/vsock"
	"golang.org/x/sys/unix"

	"github.com/colo-runtime/colo/agentproto"
)

// openFIFOReader opens the read side of a new FIFO without blocking. With
// no writer it reads EOF again and again, as a virtio-serial port does
// while the host side is not connected.
func openFIFOReader(t *testing.T) (*os.File, string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "port")
	if err := unix.Mkfifo(path, 0o600); err != nil {
		t.Fatal(err)
	}
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	return os.NewFile(uintptr(fd), path), path
}

func TestSerialConnHidesEOF(t *testing.T) {
	f, path := openFIFOReader(t)
	conn := newSerialConn(f)
	defer conn.Close()

	type result struct {
		data string
		err  error
	}
	read := func() <-chan result {
		ch := make(chan result, 1)
		go func() {
			buf := make([]byte, 64)
			n, err := conn.Read(buf)
			ch <- result{string(buf[:n]), err}
		}()
		return ch
	}

	// The host connects, writes, disconnects, twice: the reader sees the
	// data and never EOF.
	for _, msg := range []string{"hello", "again"} {
		got := read() // waits through EOFs: nobody is connected yet
		w, err := os.OpenFile(path, os.O_WRONLY, 0)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := w.WriteString(msg); err != nil {
			t.Fatal(err)
		}
		r := <-got
		w.Close()
		if r.err != nil || r.data != msg {
			t.Fatalf("Read = %q, %v; want %q", r.data, r.err, msg)
		}
	}

	// Close ends a read that is waiting for the host.
	got := read()
	if err := conn.Close(); err != nil {
		t.Fatal(err)
	}
	if r := <-got; !errors.Is(r.err, net.ErrClosed) {
		t.Fatalf("Read after Close = %q, %v; want net.ErrClosed", r.data, r.err)
	}
}

func TestOneConnListener(t *testing.T) {
	t.Run("second accept fails when the connection closes", func(t *testing.T) {
		c1, c2 := net.Pipe()
		defer c2.Close()
		l := newOneConnListener(c1)
		defer l.Close()
		conn, err := l.Accept()
		if err != nil {
			t.Fatal(err)
		}
		errc := make(chan error, 1)
		go func() {
			_, err := l.Accept()
			errc <- err
		}()
		conn.Close()
		if err := <-errc; err == nil || errors.Is(err, net.ErrClosed) {
			t.Fatalf("Accept after the connection closed = %v, want a channel error", err)
		}
	})
	t.Run("close stops accept", func(t *testing.T) {
		c1, c2 := net.Pipe()
		defer c2.Close()
		l := newOneConnListener(c1)
		conn, err := l.Accept()
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		errc := make(chan error, 1)
		go func() {
			_, err := l.Accept()
			errc <- err
		}()
		l.Close()
		if err := <-errc; !errors.Is(err, net.ErrClosed) {
			t.Fatalf("Accept after Close = %v, want net.ErrClosed", err)
		}
		// The connection handed out stays usable.
		go c2.Write([]byte("x"))
		if _, err := conn.Read(make([]byte, 1)); err != nil {
			t.Fatalf("connection after listener Close: %v", err)
		}
	})
	t.Run("close before accept closes the connection", func(t *testing.T) {
		c1, c2 := net.Pipe()
		l := newOneConnListener(c1)
		l.Close()
		if _, err := l.Accept(); !errors.Is(err, net.ErrClosed) {
			t.Fatalf("Accept = %v, want net.ErrClosed", err)
		}
		if _, err := c2.Read(make([]byte, 1)); err != io.EOF {
			t.Fatalf("peer read = %v, want EOF", err)
		}
	})
}

func TestFindSerialPort(t *testing.T) {
	sys := t.TempDir()
	for port, name := range map[string]string{
		"vport0p0": "org.qemu.guest_agent.0\n",
		"vport1p1": agentproto.SerialPortName + "\n",
		"vport1p2": "",
	} {
		if err := os.Mkdir(filepath.Join(sys, port), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(sys, port, "name"), []byte(name), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	tests := []struct{ name, want string }{
		{agentproto.SerialPortName, "vport1p1"},
		{"org.qemu.guest_agent.0", "vport0p0"},
		{"missing", ""},
	}
	for _, tt := range tests {
		got, err := findSerialPort(sys, tt.name)
		if err != nil || got != tt.want {
			t.Errorf("findSerialPort(%q) = %q, %v; want %q", tt.name, got, err, tt.want)
		}
	}
}

func TestListenSerial(t *testing.T) {
	sys, dev := t.TempDir(), t.TempDir()
	if err := os.Mkdir(filepath.Join(sys, "vport2p1"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(sys, "vport2p1", "name"), []byte(agentproto.SerialPortName+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}

	// The device node is not there yet: give up when ctx ends.
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := listenSerial(ctx, sys, dev, agentproto.SerialPortName); !errors.Is(err, context.Canceled) {
		t.Fatalf("listenSerial without a device node = %v, want context.Canceled", err)
	}

	// A FIFO opened read-write stands in for the port: what is written
	// comes back.
	if err := unix.Mkfifo(filepath.Join(dev, "vport2p1"), 0o600); err != nil {
		t.Fatal(err)
	}
	l, err := listenSerial(context.Background(), sys, dev, agentproto.SerialPortName)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	conn, err := l.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if _, err := conn.Write([]byte("ping")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 4)
	if _, err := io.ReadFull(conn, buf); err != nil || string(buf) != "ping" {
		t.Fatalf("read back %q, %v; want ping", buf, err)
	}
}

// TestServeOverSerialConn serves the service through the serial
// connection and listener, on a socket pair standing in for the port.
func TestServeOverSerialConn(t *testing.T) {
	ctx := context.Background()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	l := newOneConnListener(newSerialConn(os.NewFile(uintptr(fds[0]), "guest")))
	hostFile := os.NewFile(uintptr(fds[1]), "host")
	hostConn, err := net.FileConn(hostFile)
	hostFile.Close()
	if err != nil {
		t.Fatal(err)
	}

	svc, err := NewService(ServiceConfig{Version: "test", StateDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	srv, err := ttrpc.NewServer(ttrpc.WithUnaryServerInterceptor(statusInterceptor))
	if err != nil {
		t.Fatal(err)
	}
	agentproto.RegisterAgentService(srv, svc)
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ctx, l) }()

	client := ttrpc.NewClient(hostConn)
	resp, err := agentproto.NewAgentClient(client).Check(ctx, &agentproto.CheckRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if resp.AgentVersion != "test" || resp.ProtocolVersion != agentproto.ProtocolVersion || resp.BootId == "" {
		t.Errorf("Check = %+v", resp)
	}
	client.Close()
	srv.Close()
	if err := <-served; !errors.Is(err, ttrpc.ErrServerClosed) {
		t.Errorf("Serve = %v, want ErrServerClosed", err)
	}
}

// TestListenVsockAnyCID: the agent's vsock listener takes connections to
// any CID of the guest, so that a VM restored from a template, whose CID
// changes under it, still finds it (listenVsock). vsock.Listen would bind
// the CID the guest has at the time. Port 0 lets the kernel pick one.
func TestListenVsockAnyCID(t *testing.T) {
	l, err := listenVsock(0)
	if errors.Is(err, unix.EAFNOSUPPORT) {
		t.Skipf("needs AF_VSOCK (a vsock transport module loaded): %v", err)
	}
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	addr, ok := l.Addr().(*vsock.Addr)
	if !ok {
		t.Fatalf("listener address %v (%T), want a *vsock.Addr", l.Addr(), l.Addr())
	}
	if addr.ContextID != unix.VMADDR_CID_ANY || addr.Port == 0 {
		t.Errorf("listening on %v, want CID %d (VMADDR_CID_ANY) and the port the kernel picked", addr, uint32(unix.VMADDR_CID_ANY))
	}
	if cid, err := vsock.ContextID(); err == nil {
		t.Logf("this host's own CID is %d; the listener is bound to %v", cid, addr)
	}
}
