package qemu

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"syscall"
	"time"
)

// Event is an asynchronous QMP event such as SHUTDOWN.
type Event struct {
	Name string
	Data json.RawMessage
	Time time.Time
}

// QMPError is an error reply from QEMU.
type QMPError struct {
	Command string
	Class   string
	Desc    string
}

func (e *QMPError) Error() string {
	return fmt.Sprintf("qmp %s: %s: %s", e.Command, e.Class, e.Desc)
}

// errQMPClosed is returned for commands that cannot get a reply because
// the connection is gone (after quit, QEMU closes it without more ado).
var errQMPClosed = errors.New("qmp connection closed")

// QMP is a client of the QEMU Machine Protocol on one connection. Commands
// may be issued concurrently: replies are matched to commands by id, and
// events, which QEMU interleaves with replies, go to the callback.
type QMP struct {
	conn    net.Conn
	onEvent func(Event)

	writeMu sync.Mutex

	mu      sync.Mutex
	nextID  uint64
	pending map[uint64]chan qmpMessage
	err     error // why the reader stopped; set once before done is closed

	done chan struct{}
}

// qmpMessage is any message from QEMU: a greeting, a reply or an event.
type qmpMessage struct {
	QMP    json.RawMessage `json:"QMP"`
	ID     *uint64         `json:"id"`
	Return json.RawMessage `json:"return"`
	Error  *struct {
		Class string `json:"class"`
		Desc  string `json:"desc"`
	} `json:"error"`
	Event     string          `json:"event"`
	Data      json.RawMessage `json:"data"`
	Timestamp struct {
		Seconds      int64 `json:"seconds"`
		Microseconds int64 `json:"microseconds"`
	} `json:"timestamp"`
}

// NewQMP reads QEMU's greeting on conn and negotiates capabilities. onEvent,
// if not nil, is called for every event from the one reading goroutine, so
// it must not block. The QMP owns conn from now on, also on error.
func NewQMP(ctx context.Context, conn net.Conn, onEvent func(Event)) (*QMP, error) {
	q := &QMP{
		conn:    conn,
		onEvent: onEvent,
		pending: make(map[uint64]chan qmpMessage),
		done:    make(chan struct{}),
	}
	r := bufio.NewReader(conn)

	// The greeting is read before the reader goroutine runs; a context that
	// ends first unblocks the read by closing the connection.
	stop := context.AfterFunc(ctx, func() { conn.SetReadDeadline(time.Unix(1, 0)) })
	var greeting qmpMessage
	err := readMessage(r, &greeting)
	if !stop() {
		err = context.Cause(ctx)
	}
	if err == nil && greeting.QMP == nil {
		err = errors.New("no QMP greeting")
	}
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("qmp greeting: %w", err)
	}
	conn.SetReadDeadline(time.Time{})

	go q.read(r)
	if _, err := q.Execute(ctx, "qmp_capabilities", nil); err != nil {
		q.Close()
		return nil, err
	}
	return q, nil
}

func readMessage(r *bufio.Reader, m *qmpMessage) error {
	line, err := r.ReadBytes('\n')
	if err != nil {
		// A reset is QEMU exiting with a command of ours unread.
		if errors.Is(err, io.EOF) || errors.Is(err, syscall.ECONNRESET) {
			return errQMPClosed
		}
		return err
	}
	if err := json.Unmarshal(line, m); err != nil {
		return fmt.Errorf("qmp: bad message %q: %w", line, err)
	}
	return nil
}

func (q *QMP) read(r *bufio.Reader) {
	var err error
	for {
		var m qmpMessage
		if err = readMessage(r, &m); err != nil {
			break
		}
		switch {
		case m.Event != "":
			if q.onEvent != nil {
				q.onEvent(Event{
					Name: m.Event,
					Data: m.Data,
					Time: time.Unix(m.Timestamp.Seconds, m.Timestamp.Microseconds*1000),
				})
			}
		case m.ID != nil:
			q.mu.Lock()
			ch := q.pending[*m.ID]
			delete(q.pending, *m.ID)
			q.mu.Unlock()
			if ch != nil {
				ch <- m
			}
		}
		// A reply without id answers a request QEMU could not parse; ours
		// are always well formed, and there is nobody to give it to.
	}
	q.mu.Lock()
	q.err = err
	q.mu.Unlock()
	close(q.done)
}

// Execute runs a command and returns its "return" value. args is marshalled
// as the command's "arguments" and may be nil.
func (q *QMP) Execute(ctx context.Context, command string, args any) (json.RawMessage, error) {
	return q.execute(ctx, command, args, nil)
}

// ExecuteWithFile is Execute with f passed along (SCM_RIGHTS), as getfd and
// add-fd take a file descriptor. It needs a unix socket connection.
func (q *QMP) ExecuteWithFile(ctx context.Context, command string, args any, f *os.File) (json.RawMessage, error) {
	if _, ok := q.conn.(*net.UnixConn); !ok {
		return nil, fmt.Errorf("qmp %s: passing a file needs a unix socket, not %T", command, q.conn)
	}
	return q.execute(ctx, command, args, syscall.UnixRights(int(f.Fd())))
}

func (q *QMP) execute(ctx context.Context, command string, args any, oob []byte) (json.RawMessage, error) {
	req := struct {
		Execute   string `json:"execute"`
		Arguments any    `json:"arguments,omitempty"`
		ID        uint64 `json:"id"`
	}{Execute: command, Arguments: args}

	ch := make(chan qmpMessage, 1)
	q.mu.Lock()
	if q.err != nil {
		err := q.err
		q.mu.Unlock()
		return nil, fmt.Errorf("qmp %s: %w", command, err)
	}
	q.nextID++
	req.ID = q.nextID
	q.pending[req.ID] = ch
	q.mu.Unlock()
	defer func() {
		q.mu.Lock()
		delete(q.pending, req.ID)
		q.mu.Unlock()
	}()

	b, err := json.Marshal(req)
	if err != nil {
		return nil, fmt.Errorf("qmp %s: %w", command, err)
	}
	// No deadline on the write: a command is far smaller than the socket
	// buffer, and a write cut short by a deadline would garble the stream.
	q.writeMu.Lock()
	if oob != nil {
		// The rights travel with the first byte of the message: QEMU
		// takes them for the command that byte starts.
		_, _, err = q.conn.(*net.UnixConn).WriteMsgUnix(append(b, '\n'), oob, nil)
	} else {
		_, err = q.conn.Write(append(b, '\n'))
	}
	q.writeMu.Unlock()
	if errors.Is(err, syscall.EPIPE) || errors.Is(err, syscall.ECONNRESET) {
		err = errQMPClosed
	}
	if err != nil {
		return nil, fmt.Errorf("qmp %s: %w", command, err)
	}

	select {
	case m := <-ch:
		if m.Error != nil {
			return nil, &QMPError{Command: command, Class: m.Error.Class, Desc: m.Error.Desc}
		}
		return m.Return, nil
	case <-q.done:
		// The reply may have arrived just before the connection closed.
		select {
		case m := <-ch:
			if m.Error != nil {
				return nil, &QMPError{Command: command, Class: m.Error.Class, Desc: m.Error.Desc}
			}
			return m.Return, nil
		default:
		}
		return nil, fmt.Errorf("qmp %s: %w", command, q.Err())
	case <-ctx.Done():
		return nil, fmt.Errorf("qmp %s: %w", command, context.Cause(ctx))
	}
}

// Done is closed when the connection is gone.
func (q *QMP) Done() <-chan struct{} { return q.done }

// Err tells why the connection is gone once Done is closed.
func (q *QMP) Err() error {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.err
}

// Close closes the connection and waits for the reader to stop.
func (q *QMP) Close() error {
	err := q.conn.Close()
	<-q.done
	return err
}

// Status is the reply of query-status.
type Status struct {
	Running bool   `json:"running"`
	Status  string `json:"status"`
}

// QueryStatus asks for the VM's run state, e.g. "running".
func (q *QMP) QueryStatus(ctx context.Context) (Status, error) {
	var s Status
	raw, err := q.Execute(ctx, "query-status", nil)
	if err != nil {
		return s, err
	}
	if err := json.Unmarshal(raw, &s); err != nil {
		return s, fmt.Errorf("qmp query-status: %w", err)
	}
	return s, nil
}

// Quit asks QEMU to exit. QEMU may close the connection before the reply
// reaches us: that counts as success.
func (q *QMP) Quit(ctx context.Context) error {
	_, err := q.Execute(ctx, "quit", nil)
	if errors.Is(err, errQMPClosed) {
		return nil
	}
	return err
}
