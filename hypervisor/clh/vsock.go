package clh

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// handshakeTimeout bounds CH's answer to CONNECT when ctx allows longer.
// CH answers at once when the guest accepts, or closes the connection when
// nothing listens: a guest that does neither is hung.
const handshakeTimeout = 10 * time.Second

// maxHandshakeLine bounds CH's "OK <port>\n".
const maxHandshakeLine = 32

// errNotListening is a handshake CH ended without an answer: nothing in the
// guest listens on the port (yet, while it boots).
var errNotListening = errors.New("nothing listens on the guest's port (yet): Cloud Hypervisor closed the connection")

// dialHybrid connects to the guest's vsock port through CH's hybrid vsock
// socket: "CONNECT <port>\n", answered by "OK <host port>\n" once the guest
// accepted (Firecracker's protocol, docs/vsock.md in CH). The answer is
// read byte by byte, so that nothing the guest sends after it is taken
// from the connection.
func dialHybrid(ctx context.Context, path string, port uint32) (_ net.Conn, retErr error) {
	conn, err := (&net.Dialer{}).DialContext(ctx, "unix", path)
	if err != nil {
		return nil, err
	}
	defer func() {
		if retErr != nil {
			conn.Close()
		}
	}()
	deadline := time.Now().Add(handshakeTimeout)
	if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
		deadline = d
	}
	conn.SetDeadline(deadline)
	stop := context.AfterFunc(ctx, func() { conn.SetDeadline(time.Now()) })
	defer stop()

	fail := func(err error) error {
		switch {
		case errors.Is(err, os.ErrDeadlineExceeded) || ctx.Err() != nil:
			err = fmt.Errorf("no answer to CONNECT in time (guest or Cloud Hypervisor hung, or the caller gave up): %w", err)
			if ctx.Err() != nil {
				err = fmt.Errorf("%w: %w", context.Cause(ctx), err)
			}
		case errors.Is(err, io.EOF) || errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE):
			err = fmt.Errorf("%w: %w", errNotListening, err)
		}
		return fmt.Errorf("vsock port %d via %s: handshake: %w", port, path, err)
	}
	if _, err := fmt.Fprintf(conn, "CONNECT %d\n", port); err != nil {
		return nil, fail(err)
	}
	var line []byte
	b := make([]byte, 1)
	for {
		if _, err := conn.Read(b); err != nil {
			return nil, fail(err)
		}
		if b[0] == '\n' {
			break
		}
		if len(line) == maxHandshakeLine {
			return nil, fail(fmt.Errorf("answer %q...: too long", line))
		}
		line = append(line, b[0])
	}
	f := strings.Fields(string(line))
	if len(f) != 2 || f[0] != "OK" {
		return nil, fail(fmt.Errorf("answer %q: want \"OK <port>\"", line))
	}
	if _, err := strconv.ParseUint(f[1], 10, 32); err != nil {
		return nil, fail(fmt.Errorf("answer %q: want \"OK <port>\"", line))
	}
	if !stop() {
		return nil, fail(errors.New("cancelled"))
	}
	conn.SetDeadline(time.Time{})
	return conn, nil
}
