package sandbox

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"runtime"
	"sync"
	"time"

	"github.com/containerd/log"
	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"github.com/hashicorp/yamux"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/colo-runtime/colo/internal/splice"
)

// Port forwarding (CRI PortForward, `kubectl port-forward`). containerd
// enters the pod's network namespace on the host and dials
// 127.0.0.1:<port>; with colo the server is in the guest. So that the
// connection reaches the guest's loopback, the shim puts into the pod's
// network namespace:
//
//   - a listening socket on 127.0.0.1:P (a port the kernel picks), and
//   - an nftables table with a nat OUTPUT rule redirecting TCP to
//     127.0.0.1, any port but P, to P. Made over netlink
//     (github.com/google/nftables), not with the host's nft or iptables:
//     no dependency on which host binary (nft, iptables-nft or -legacy) is
//     installed, no process to start, and a table of its own that is
//     removed as one piece.
//
// For each connection accepted it learns the port containerd dialed from
// conntrack (SO_ORIGINAL_DST; a connection to P itself is not redirected,
// and its original destination is P) and opens a yamux stream over the VM's
// port-forward channel (a virtio-serial port of its own,
// VM.DialPortForward), sends the port and waits for the agent's status
// (agent/portforward.go), then splices the connection and the stream,
// honouring half-close both ways.
//
// The guest is untrusted: it can only answer streams the shim opened (a
// stream it opens ends the session), each stream costs at most yamux's
// window of host memory, a stream the guest stalls or floods blocks only
// that stream's copies, and a guest that breaks the protocol ends its own
// session (the next connection dials a new one).
const (
	// forwardTable is the nftables table in the pod's network namespace.
	forwardTable = "colo_portforward"
	// forwardChannelDial bounds connecting to QEMU's end of the channel.
	forwardChannelDial = 10 * time.Second
	// forwardHandshake bounds sending the port and reading the guest's
	// status (the agent dials IPv4 then IPv6, 5s each at most).
	forwardHandshake = 15 * time.Second
	// forwardMaxConns bounds the connections forwarded at once; more are
	// reset.
	forwardMaxConns = 256
	// forwardStopWait bounds waiting for the connections' goroutines.
	forwardStopWait = 5 * time.Second
	// forwardHalfClosed bounds a stream closed on one side that the
	// guest never closes: yamux then resets it.
	forwardHalfClosed = 5 * time.Minute

	forwardOK byte = 0
)

// forwardYamuxConfig is the host side's multiplexer: no keep-alives (an
// idle pod is not woken), bounded stream opens and writes, and yamux's
// logging dropped (its errors come back from the calls).
func forwardYamuxConfig() *yamux.Config {
	c := yamux.DefaultConfig()
	c.EnableKeepAlive = false
	c.LogOutput = io.Discard
	c.ConnectionWriteTimeout = 30 * time.Second
	c.StreamOpenTimeout = forwardHandshake
	c.StreamCloseTimeout = forwardHalfClosed
	// The guest is not to open streams: keep no backlog for it.
	c.AcceptBacklog = 1
	return c
}

// startPortForward serves port-forwarding into the VM of a sandbox on the
// pod network, until the sandbox stops or the VM exits. A failure is
// logged, never the pod's: it runs without port-forwarding then.
func (s *Sandbox) startPortForward() {
	if s.net == nil {
		return
	}
	ctx := log.WithLogger(s.ctx, log.G(s.ctx).WithField("sandbox", s.id))
	f, err := listenPortForward(ctx, s.net.nsPath, s.vm.DialPortForward)
	if err != nil {
		log.G(ctx).WithError(err).Error("port-forward: not available in this pod")
		return
	}
	go func() {
		select {
		case <-s.stopping:
		case <-s.vm.Done():
		}
		f.close()
	}()
}

// listenPortForward sets port-forwarding up in the network namespace at
// nsPath and serves it.
func listenPortForward(ctx context.Context, nsPath string, dial func(context.Context) (net.Conn, error)) (*portForwarder, error) {
	ns, err := netns.GetFromPath(nsPath)
	if err != nil {
		return nil, fmt.Errorf("open network namespace %s: %w", nsPath, err)
	}
	defer ns.Close()
	ln, err := listenInNamespace(ns)
	if err != nil {
		return nil, err
	}
	port := ln.Addr().(*net.TCPAddr).Port
	if err := addForwardRule(ns, uint16(port)); err != nil {
		ln.Close()
		return nil, err
	}
	f := newPortForwarder(ctx, ln, originalPort, dial)
	f.cleanup = func() error { return removeForwardRule(nsPath) }
	log.G(ctx).WithField("port", port).Debug("port-forward: listening in the pod's network namespace")
	return f, nil
}

// listenInNamespace listens on 127.0.0.1 in ns. The socket stays in the
// namespace it was made in.
func listenInNamespace(ns netns.NsHandle) (net.Listener, error) {
	runtime.LockOSThread()
	orig, err := netns.Get()
	if err != nil {
		runtime.UnlockOSThread()
		return nil, err
	}
	defer orig.Close()
	if err := netns.Set(ns); err != nil {
		runtime.UnlockOSThread()
		return nil, fmt.Errorf("enter network namespace: %w", err)
	}
	ln, lerr := net.Listen("tcp4", "127.0.0.1:0")
	if err := netns.Set(orig); err != nil {
		// The thread is in the wrong namespace: leave it locked, so
		// that it ends with this goroutine instead of serving others.
		if ln != nil {
			ln.Close()
		}
		return nil, fmt.Errorf("return to the shim's network namespace: %w", err)
	}
	runtime.UnlockOSThread()
	if lerr != nil {
		return nil, fmt.Errorf("listen on 127.0.0.1 in the pod's network namespace: %w", lerr)
	}
	return ln, nil
}

// addForwardRule makes the table: in the nat OUTPUT hook,
//
//	meta l4proto tcp ip daddr 127.0.0.1 tcp dport != port redirect to :port
//
// Only locally made connections pass that hook: in the pod's namespace on
// the host that is containerd's port-forward (the pod's processes are in
// the guest). A table left by an earlier shim for the same namespace is
// replaced.
func addForwardRule(ns netns.NsHandle, port uint16) error {
	c, err := nftables.New(nftables.WithNetNSFd(int(ns)))
	if err != nil {
		return err
	}
	t := &nftables.Table{Name: forwardTable, Family: nftables.TableFamilyIPv4}
	// Add then delete then add: the delete cannot fail on a missing
	// table, and the batch is atomic.
	c.AddTable(t)
	c.DelTable(t)
	c.AddTable(t)
	ch := c.AddChain(&nftables.Chain{
		Name:     "output",
		Table:    t,
		Type:     nftables.ChainTypeNAT,
		Hooknum:  nftables.ChainHookOutput,
		Priority: nftables.ChainPriorityNATDest,
	})
	p := binary.BigEndian.AppendUint16(nil, port)
	c.AddRule(&nftables.Rule{Table: t, Chain: ch, Exprs: []expr.Any{
		&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{unix.IPPROTO_TCP}},
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: 16, Len: 4},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{127, 0, 0, 1}},
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 2, Len: 2},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: p},
		&expr.Immediate{Register: 1, Data: p},
		&expr.Redir{RegisterProtoMin: 1},
	}})
	if err := c.Flush(); err != nil {
		return fmt.Errorf("nftables: add table %s in the pod's network namespace: %w", forwardTable, err)
	}
	return nil
}

// removeForwardRule removes the table; a namespace that is gone has none.
func removeForwardRule(nsPath string) error {
	ns, err := netns.GetFromPath(nsPath)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	defer ns.Close()
	c, err := nftables.New(nftables.WithNetNSFd(int(ns)))
	if err != nil {
		return err
	}
	t := &nftables.Table{Name: forwardTable, Family: nftables.TableFamilyIPv4}
	c.AddTable(t)
	c.DelTable(t)
	if err := c.Flush(); err != nil {
		return fmt.Errorf("nftables: delete table %s: %w", forwardTable, err)
	}
	return nil
}

// originalPort is the port a redirected connection was made to, from
// conntrack; the connection's own port if it was not redirected.
func originalPort(c net.Conn) (int, error) {
	tc, ok := c.(*net.TCPConn)
	if !ok {
		return 0, errors.New("not a TCP connection")
	}
	raw, err := tc.SyscallConn()
	if err != nil {
		return 0, err
	}
	var (
		sa    *unix.IPv6Mreq // 20 bytes, room for the sockaddr_in
		soErr error
	)
	if err := raw.Control(func(fd uintptr) {
		sa, soErr = unix.GetsockoptIPv6Mreq(int(fd), unix.SOL_IP, unix.SO_ORIGINAL_DST)
	}); err != nil {
		return 0, err
	}
	if soErr != nil {
		if errors.Is(soErr, unix.ENOENT) {
			return c.LocalAddr().(*net.TCPAddr).Port, nil
		}
		return 0, fmt.Errorf("SO_ORIGINAL_DST: %w", soErr)
	}
	// struct sockaddr_in: family, port (big-endian), address.
	b := sa.Multiaddr
	if b[4] != 127 {
		return 0, fmt.Errorf("original destination %d.%d.%d.%d is not the loopback", b[4], b[5], b[6], b[7])
	}
	return int(binary.BigEndian.Uint16(b[2:4])), nil
}

// portForwarder accepts the connections redirected to its listener and
// forwards each as a stream of one multiplexer session on the VM's
// channel, dialed at the first connection and again after it failed.
type portForwarder struct {
	ctx      context.Context
	ln       net.Listener
	origPort func(net.Conn) (int, error)
	dial     func(context.Context) (net.Conn, error)
	cleanup  func() error // removes the redirect; may be nil
	slots    chan struct{}

	mu     sync.Mutex
	sess   *yamux.Session
	conns  map[net.Conn]struct{}
	closed bool

	wg   sync.WaitGroup
	once sync.Once
}

func newPortForwarder(ctx context.Context, ln net.Listener, origPort func(net.Conn) (int, error), dial func(context.Context) (net.Conn, error)) *portForwarder {
	f := &portForwarder{
		ctx:      ctx,
		ln:       ln,
		origPort: origPort,
		dial:     dial,
		slots:    make(chan struct{}, forwardMaxConns),
		conns:    map[net.Conn]struct{}{},
	}
	f.wg.Add(1)
	go f.serve()
	return f
}

func (f *portForwarder) serve() {
	defer f.wg.Done()
	for {
		c, err := f.ln.Accept()
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			if !errors.Is(err, net.ErrClosed) {
				log.G(f.ctx).WithError(err).Warn("port-forward: accept")
			}
			return
		}
		select {
		case f.slots <- struct{}{}:
		default:
			reset(c) // too many at once
			continue
		}
		if !f.track(c) {
			reset(c)
			return
		}
		f.wg.Add(1)
		go func() {
			defer f.wg.Done()
			defer func() { <-f.slots }()
			defer f.untrack(c)
			f.forward(c)
		}()
	}
}

func (f *portForwarder) track(c net.Conn) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		return false
	}
	f.conns[c] = struct{}{}
	return true
}

func (f *portForwarder) untrack(c net.Conn) {
	f.mu.Lock()
	delete(f.conns, c)
	f.mu.Unlock()
	c.Close()
}

// reset closes c with a RST: the client sees its connection refused in
// effect, not an empty answer.
func reset(c net.Conn) {
	if tc, ok := c.(*net.TCPConn); ok {
		tc.SetLinger(0)
	}
	c.Close()
}

// forward serves one connection.
func (f *portForwarder) forward(c net.Conn) {
	port, err := f.origPort(c)
	if err != nil {
		log.G(f.ctx).WithError(err).Warn("port-forward")
		reset(c)
		return
	}
	logger := log.G(f.ctx).WithField("port", port)
	st, err := f.open(port)
	if err != nil {
		logger.WithError(err).Info("port-forward: nothing answers in the guest")
		reset(c)
		return
	}
	defer st.Close()
	hc, ok := c.(splice.HalfConn)
	if !ok {
		reset(c)
		return
	}
	splice.Splice(hc, splice.Stream{Stream: st})
}

// open opens a stream to port in the guest: it returns once the guest
// says it connected.
func (f *portForwarder) open(port int) (*yamux.Stream, error) {
	sess, err := f.session()
	if err != nil {
		return nil, err
	}
	st, err := sess.OpenStream()
	if err != nil {
		return nil, fmt.Errorf("open stream: %w", err)
	}
	st.SetDeadline(time.Now().Add(forwardHandshake))
	var status [1]byte
	_, err = st.Write(binary.BigEndian.AppendUint16(nil, uint16(port)))
	if err == nil {
		_, err = io.ReadFull(st, status[:])
	}
	if err != nil {
		st.Close()
		if errors.Is(err, os.ErrDeadlineExceeded) {
			// A guest that does not answer in time may have stalled
			// the whole channel: start afresh next time.
			sess.Close()
		}
		return nil, fmt.Errorf("port %d: %w", port, err)
	}
	if status[0] != forwardOK {
		st.Close()
		return nil, fmt.Errorf("port %d: refused in the guest", port)
	}
	st.SetDeadline(time.Time{})
	return st, nil
}

// session is the multiplexer session, dialed if there is none or the last
// one ended.
func (f *portForwarder) session() (*yamux.Session, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		return nil, net.ErrClosed
	}
	if f.sess != nil && !f.sess.IsClosed() {
		return f.sess, nil
	}
	ctx, cancel := context.WithTimeout(f.ctx, forwardChannelDial)
	defer cancel()
	conn, err := f.dial(ctx)
	if err != nil {
		return nil, err
	}
	sess, err := yamux.Client(conn, forwardYamuxConfig())
	if err != nil {
		conn.Close()
		return nil, err
	}
	// The guest may only answer: a stream it opens ends the session.
	go func() {
		if st, err := sess.AcceptStream(); err == nil {
			log.G(f.ctx).Warn("port-forward: the guest opened a stream; closing the channel")
			st.Close()
			sess.Close()
		}
	}()
	f.sess = sess
	return sess, nil
}

// close stops accepting, closes every connection and the session, waits
// (bounded) for the goroutines and removes the redirect.
func (f *portForwarder) close() {
	f.once.Do(func() {
		f.ln.Close()
		f.mu.Lock()
		f.closed = true
		for c := range f.conns {
			c.Close()
		}
		if f.sess != nil {
			f.sess.Close()
		}
		f.mu.Unlock()
		done := make(chan struct{})
		go func() {
			f.wg.Wait()
			close(done)
		}()
		select {
		case <-done:
		case <-time.After(forwardStopWait):
			log.G(f.ctx).Warn("port-forward: connections still closing")
		}
		if f.cleanup != nil {
			if err := f.cleanup(); err != nil {
				log.G(f.ctx).WithError(err).Warn("port-forward")
			}
		}
	})
}
