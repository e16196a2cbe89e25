package agent

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"sync"
	"time"

	"github.com/containerd/log"
	"github.com/hashicorp/yamux"
	"golang.org/x/sys/unix"

	"github.com/colo-runtime/colo/agentproto"
	"github.com/colo-runtime/colo/internal/splice"
)

// Port forwarding (CRI PortForward, `kubectl port-forward`): the host's shim
// accepts the connections containerd opens to 127.0.0.1:<port> in the pod's
// network namespace and sends each as a yamux stream over a virtio-serial
// port of its own (shim/sandbox/portforward.go). The agent serves that
// port: for each stream it reads the port, dials it on the guest's
// loopback (where the pod's containers are, so a server bound to
// 127.0.0.1 only is reached, as on runc) and splices the two, honouring
// half-close both ways.
//
// The stream protocol, host to guest: the port, 2 bytes big-endian; guest
// to host: one status byte (forwardOK, or forwardRefused when nothing
// listens); then the connection's bytes both ways. The guest only answers
// streams the host opened: a yamux server never opens any.
const (
	// forwardPortName is the port's name under /sys/class/virtio-ports.
	forwardPortName = agentproto.PortForwardPortName
	// forwardPoll is how often the agent looks whether the host
	// connected (a virtio-serial port cannot be waited on for that, see
	// consolePort.next). Only VMs with the port pay these wake-ups, and
	// only until the first port-forward: the host then stays connected.
	forwardPoll = 250 * time.Millisecond
	// forwardPortWait bounds the wait for the port to show up at boot;
	// a VM without one (no pod network) stops looking after it.
	forwardPortWait = 30 * time.Second
	// forwardHeaderTimeout bounds reading a new stream's port.
	forwardHeaderTimeout = 10 * time.Second
	// forwardDialTimeout bounds dialing the port in the guest.
	forwardDialTimeout = 5 * time.Second
	// forwardMaxStreams bounds the connections forwarded at once.
	forwardMaxStreams = 1024

	forwardOK      byte = 0
	forwardRefused byte = 1
)

// forwardYamuxConfig is the guest side's multiplexer: no keep-alives (an
// idle port-forward must not wake the guest), and yamux's logging dropped
// (its errors come back from the calls).
func forwardYamuxConfig() *yamux.Config {
	c := yamux.DefaultConfig()
	c.EnableKeepAlive = false
	c.LogOutput = io.Discard
	c.ConnectionWriteTimeout = 30 * time.Second
	return c
}

// startPortForward serves the port-forward channel if the VM has one, and
// returns what stops it. Not with --listen (a service on a host).
func startPortForward(ctx context.Context, cfg ServeConfig) (stop func()) {
	if cfg.Listen != "" {
		return func() {}
	}
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		dev, err := findForwardPort(ctx, "/sys/class/virtio-ports", "/dev")
		if err != nil || dev == "" {
			// No pod network: the host gave the VM no port.
			log.G(ctx).WithError(err).Debug("port-forward: no channel")
			return
		}
		port, err := openConsolePort(dev)
		if err != nil {
			log.G(ctx).WithError(err).Error("port-forward")
			return
		}
		defer port.f.Close()
		log.G(ctx).Infof("port-forward on virtio-serial port %s (%s)", forwardPortName, dev)
		serveForward(ctx, func(ctx context.Context) (io.ReadWriteCloser, error) {
			return port.nextEvery(ctx, forwardPoll)
		}, dialLoopback)
	}()
	return func() {
		cancel()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			log.G(ctx).Warn("port-forward: still stopping")
		}
	}
}

// findForwardPort waits (bounded) for the port to show up.
func findForwardPort(ctx context.Context, sysDir, devDir string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, forwardPortWait)
	defer cancel()
	var dev string
	err := poll(ctx, func() (bool, error) {
		port, err := findSerialPort(sysDir, forwardPortName)
		if err != nil || port == "" {
			return false, err
		}
		if _, err := os.Stat(devDir + "/" + port); err != nil {
			return false, nil // devtmpfs makes the node a little later
		}
		dev = devDir + "/" + port
		return true, nil
	})
	return dev, err
}

// nextEvery is consolePort.next looking every d: port-forward can afford
// fewer wake-ups than the console.
func (p *consolePort) nextEvery(ctx context.Context, d time.Duration) (io.ReadWriteCloser, error) {
	p.f.SetDeadline(time.Time{})
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
		sleepCtx(ctx, d)
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
	}
}

// dialLoopback connects to port on the guest's loopback: IPv4 first, then
// IPv6, as containerd does in a runc pod's network namespace.
func dialLoopback(ctx context.Context, port int) (net.Conn, error) {
	d := net.Dialer{Timeout: forwardDialTimeout}
	c, err := d.DialContext(ctx, "tcp4", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)))
	if err == nil {
		return c, nil
	}
	c, err6 := d.DialContext(ctx, "tcp6", net.JoinHostPort("::1", strconv.Itoa(port)))
	if err6 == nil {
		return c, nil
	}
	return nil, fmt.Errorf("IPv4: %w; IPv6: %v", err, err6)
}

// serveForward runs one multiplexer session after the other, each on a
// port connection from open, until ctx ends.
func serveForward(ctx context.Context, open consolePorts, dial func(context.Context, int) (net.Conn, error)) {
	servePort(ctx, "port-forward", open, func(ctx context.Context, conn io.ReadWriteCloser) {
		if err := forwardSession(ctx, conn, dial); err != nil && ctx.Err() == nil {
			log.G(ctx).WithError(err).Info("port-forward: session ended")
		}
	})
}

// forwardSession serves the streams the host opens on conn until the host
// goes away, the session fails or ctx ends; every stream is closed and its
// goroutines gone when it returns.
func forwardSession(ctx context.Context, conn io.ReadWriteCloser, dial func(context.Context, int) (net.Conn, error)) error {
	sess, err := yamux.Server(conn, forwardYamuxConfig())
	if err != nil {
		return err
	}
	stop := context.AfterFunc(ctx, func() { sess.Close() })
	defer stop()
	var wg sync.WaitGroup
	defer wg.Wait()
	defer sess.Close() // ends every stream, so the waits end
	slots := make(chan struct{}, forwardMaxStreams)
	for {
		st, err := sess.AcceptStream()
		if err != nil {
			if errors.Is(err, io.EOF) || errors.Is(err, yamux.ErrSessionShutdown) {
				return nil
			}
			return err
		}
		select {
		case slots <- struct{}{}:
		default:
			st.Close() // too many: the host sees EOF instead of a status
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-slots }()
			forwardStream(ctx, st, dial)
		}()
	}
}

// forwardStream serves one stream: the port, the dial, the status, then
// the splice.
func forwardStream(ctx context.Context, st *yamux.Stream, dial func(context.Context, int) (net.Conn, error)) {
	defer st.Close()
	var hdr [2]byte
	st.SetReadDeadline(time.Now().Add(forwardHeaderTimeout))
	if _, err := io.ReadFull(st, hdr[:]); err != nil {
		return
	}
	st.SetReadDeadline(time.Time{})
	port := int(binary.BigEndian.Uint16(hdr[:]))
	c, err := dial(ctx, port)
	if err != nil {
		log.G(ctx).WithError(err).WithField("port", port).Debug("port-forward: dial")
		st.Write([]byte{forwardRefused})
		return
	}
	defer c.Close()
	hc, ok := c.(splice.HalfConn)
	if !ok {
		return
	}
	if _, err := st.Write([]byte{forwardOK}); err != nil {
		return
	}
	splice.Splice(splice.Stream{Stream: st}, hc)
}
