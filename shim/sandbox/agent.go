package sandbox

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"github.com/containerd/log"
	"github.com/containerd/ttrpc"

	"github.com/colo-runtime/colo/agentproto"
	"github.com/colo-runtime/colo/hypervisor"
)

const (
	// checkTimeout bounds the first readiness Check; each Check that times
	// out doubles it, up to maxCheckTimeout. Over virtio-serial a request
	// sent before the guest opened its port waits in the socket and is
	// answered once the agent runs (ttrpc then logs the late answers to
	// abandoned calls); a fresh Check covers one that got lost.
	checkTimeout    = time.Second
	maxCheckTimeout = 8 * time.Second
	// dialRetry is the pause between failed dials (vsock refuses until the
	// guest listens).
	dialRetry = 20 * time.Millisecond
)

// agentChannel resolves the agent.channel setting; "auto" is the driver's
// to pick, as the transports that work depend on the hypervisor.
func agentChannel(setting string, drv hypervisor.Driver) hypervisor.AgentChannel {
	switch setting {
	case "vsock":
		return hypervisor.ChannelVsock
	case "serial":
		return hypervisor.ChannelSerial
	}
	if p, ok := drv.(hypervisor.ChannelPicker); ok {
		return p.PickChannel()
	}
	return hypervisor.ChannelVsock
}

// agentConn is the one ttrpc connection to a VM's agent, kept for the VM's
// life: over virtio-serial the guest cannot tell a reconnect from the old
// session and stream IDs clash.
type agentConn struct {
	conn   net.Conn
	client *ttrpc.Client
	agentproto.AgentService
}

// agentTimeouts bound the calls to the agent (agent.call_timeout and
// agent.create_timeout).
type agentTimeouts struct {
	call, create time.Duration
	// observe, if set, is told how long each bounded call took.
	observe func(method string, d time.Duration)
}

// waitingCalls wait for something to happen in the guest for as long as
// it takes: they have no deadline and end when the connection closes
// (the sandbox's end).
var waitingCalls = map[string]bool{
	"WaitProcess": true, "ReadStdout": true, "ReadStderr": true,
	"GetOOMEvent": true, "WriteStdin": true,
}

// settingUpCalls set something up or take it down in the guest and may
// take a while (runc in the guest, a loaded host).
var settingUpCalls = map[string]bool{
	"CreateSandbox": true, "DestroySandbox": true, "CreateContainer": true,
	"StartContainer": true, "RemoveContainer": true, "ExecProcess": true,
	"RemoveProcess": true, "UpdateContainer": true, "OnlineCPUMem": true,
	"UpdateInterface": true, "UpdateRoutes": true, "AddARPNeighbors": true,
}

// bound is the deadline a call gets and the configuration key behind it;
// 0 for a waiting call.
func (t agentTimeouts) bound(method string) (time.Duration, string) {
	switch {
	case waitingCalls[method]:
		return 0, ""
	case settingUpCalls[method]:
		return t.create, "agent.create_timeout"
	}
	return t.call, "agent.call_timeout"
}

// intercept gives every call its deadline (the caller's, if sooner), so
// that a guest that stops answering fails calls instead of holding them.
func (t agentTimeouts) intercept(ctx context.Context, req *ttrpc.Request, resp *ttrpc.Response, info *ttrpc.UnaryClientInfo, invoke ttrpc.Invoker) error {
	method := path.Base(info.FullMethod)
	d, key := t.bound(method)
	if d == 0 {
		return invoke(ctx, req, resp)
	}
	ctx, cancel := context.WithTimeoutCause(ctx, d, errNoAnswer)
	defer cancel()
	start := time.Now()
	err := invoke(ctx, req, resp)
	if t.observe != nil {
		t.observe(method, time.Since(start))
	}
	if err != nil && errors.Is(context.Cause(ctx), errNoAnswer) {
		return fmt.Errorf("%s: no answer from the guest within %s (%s): %w", method, d, key, context.DeadlineExceeded)
	}
	return err
}

var errNoAnswer = errors.New("no answer from the agent")

// deadlineConn bounds every write to the agent: a guest that stops
// reading fills the channel, and a blocked write would hold ttrpc's send
// lock, and so every call, forever. A write that cannot finish in time
// breaks the connection, which fails the sandbox.
type deadlineConn struct {
	net.Conn
	timeout time.Duration
}

func (c deadlineConn) Write(b []byte) (int, error) {
	if err := c.Conn.SetWriteDeadline(time.Now().Add(c.timeout)); err != nil {
		return 0, err
	}
	n, err := c.Conn.Write(b)
	if errors.Is(err, os.ErrDeadlineExceeded) {
		// Part of a message may be out: the stream is broken for good.
		c.Conn.Close()
		return n, fmt.Errorf("guest did not read for %s: %w", c.timeout, err)
	}
	return n, err
}

// newAgentConn wraps conn; onClose is called once the connection is gone,
// closed by either side.
func newAgentConn(conn net.Conn, t agentTimeouts, onClose func()) *agentConn {
	if onClose == nil {
		onClose = func() {}
	}
	client := ttrpc.NewClient(deadlineConn{Conn: conn, timeout: t.call},
		ttrpc.WithUnaryClientInterceptor(t.intercept), ttrpc.WithOnClose(onClose))
	return &agentConn{conn: conn, client: client, AgentService: agentproto.NewAgentClient(client)}
}

func (a *agentConn) Close() error { return a.client.Close() }

// connectAgent dials the agent and waits until it answers Check. deadline
// is the whole boot deadline, counted from the VM's launch. A VM that exits
// meanwhile ends the wait at once with its error.
func connectAgent(ctx context.Context, vm hypervisor.VM, channel hypervisor.AgentChannel, bootTimeout time.Duration, deadline time.Time, t agentTimeouts, onClose func()) (_ *agentConn, _ *agentproto.CheckResponse, retErr error) {
	ctx, cancel := context.WithDeadline(ctx, deadline)
	defer cancel()

	var (
		a       *agentConn
		lastErr error
		timeout = checkTimeout
	)
	defer func() {
		if retErr != nil && a != nil {
			a.Close()
		}
	}()
	fail := func() error {
		select {
		case <-vm.Done():
			return fmt.Errorf("VM exited before its agent answered (agent channel %s): %w", channel, vm.Err())
		default:
		}
		if ctx.Err() != nil {
			msg := fmt.Sprintf("VM did not answer within %s (agent channel %s)", bootTimeout, channel)
			if lastErr != nil {
				msg += fmt.Sprintf("; last error: %v", lastErr)
			}
			if errors.Is(ctx.Err(), context.Canceled) {
				return fmt.Errorf("waiting for the agent (agent channel %s): %w", channel, ctx.Err())
			}
			return errdefs.ErrUnavailable.WithMessage(msg)
		}
		return nil
	}
	pause := func(d time.Duration) {
		select {
		case <-vm.Done():
		case <-ctx.Done():
		case <-time.After(d):
		}
	}
	for {
		if err := fail(); err != nil {
			return nil, nil, err
		}
		if a == nil {
			conn, err := vm.DialAgent(ctx)
			if err != nil {
				lastErr = err
				pause(dialRetry)
				continue
			}
			a = newAgentConn(conn, t, onClose)
		}
		callCtx, callCancel := context.WithTimeout(ctx, timeout)
		resp, err := a.Check(callCtx, &agentproto.CheckRequest{})
		callCancel()
		if err == nil {
			if v := resp.GetProtocolVersion(); v != agentproto.ProtocolVersion {
				return nil, nil, errdefs.ErrFailedPrecondition.WithMessage(fmt.Sprintf(
					"agent %s speaks protocol version %d, this shim speaks %d", resp.GetAgentVersion(), v, agentproto.ProtocolVersion))
			}
			return a, resp, nil
		}
		lastErr = err
		switch {
		case errors.Is(err, ttrpc.ErrClosed):
			// The channel went away (vsock: the guest was not
			// listening yet). Dial again.
			a.Close()
			a = nil
			pause(dialRetry)
		case errors.Is(err, context.DeadlineExceeded):
			// Unanswered: ask again on the same connection.
			timeout = min(2*timeout, maxCheckTimeout)
		default:
			// Answered, but not ready.
			pause(dialRetry)
		}
	}
}

// agentError turns an error of an agent call into a containerd error that
// says which call failed.
func agentError(call string, err error) error {
	if err == nil {
		return nil
	}
	if errors.Is(err, ttrpc.ErrClosed) {
		return fmt.Errorf("agent %s: connection to the guest closed: %w", call, errdefs.ErrUnavailable)
	}
	// The guest writes the message: it is clipped, its kind kept.
	native := errgrpc.ToNative(err)
	return fmt.Errorf("agent %s: %s: %w", call, clipTo(native.Error(), maxErrorText), errKind(native))
}

// errKind is the errdefs class of err, for an error whose message is not
// passed on; errdefs.ErrUnknown if it has none.
func errKind(err error) error {
	for _, kind := range []error{
		errdefs.ErrNotFound, errdefs.ErrAlreadyExists, errdefs.ErrInvalidArgument,
		errdefs.ErrFailedPrecondition, errdefs.ErrUnavailable, errdefs.ErrNotImplemented,
		context.DeadlineExceeded, context.Canceled, errdefs.ErrPermissionDenied,
		errdefs.ErrResourceExhausted, errdefs.ErrAborted, errdefs.ErrOutOfRange, errdefs.ErrConflict,
		errdefs.ErrDataLoss, errdefs.ErrUnauthenticated, errdefs.ErrInternal,
	} {
		if errors.Is(err, kind) {
			return kind
		}
	}
	return errdefs.ErrUnknown
}

// stage logs the time a start stage was reached; a benchmark reads these
// lines (msg "start stage", field stage).
func stage(ctx context.Context, name string, since time.Time, fields log.Fields) {
	e := log.G(ctx).WithFields(log.Fields{
		"stage":   name,
		"at":      time.Now().UTC().Format(time.RFC3339Nano),
		"elapsed": time.Since(since).String(),
	})
	if fields != nil {
		e = e.WithFields(fields)
	}
	e.Info("start stage")
}
