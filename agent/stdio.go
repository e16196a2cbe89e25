package agent

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"sync"

	"github.com/containerd/errdefs"
	"github.com/opencontainers/runc/libcontainer"
	"github.com/opencontainers/runc/libcontainer/utils"
	"golang.org/x/sys/unix"
)

const (
	// defaultReadLen is what ReadStdout/ReadStderr return at most when the
	// request names no length.
	defaultReadLen = 32 << 10
	// maxReadLen bounds one read so a reply stays far below ttrpc's 4 MiB
	// message limit.
	maxReadLen = 1 << 20
)

// streams says which standard streams of a process the host will use.
type streams struct {
	stdin, stdout, stderr, terminal bool
}

// stdio holds the agent's ends of a process's standard streams. Streams the
// host did not ask for are nil and the process gets /dev/null instead.
// With a terminal, stdin and stdout are both the pty master (stdout reads
// a dup of it) and stderr is nil.
type stdio struct {
	stdin  *os.File
	stdout *stream
	stderr *stream

	// console is the pty master, for resizes; nil without a terminal.
	console *os.File
	// consoleSocket receives the master from the container's init.
	consoleSocket *os.File
}

// pipeStdio creates a pipe per requested stream and wires the child ends
// into p. The caller must call closeChild once the process has started
// (or failed to), and stdio.Close when done with the process.
func pipeStdio(p *libcontainer.Process, want streams, rootUID, rootGID int) (_ *stdio, closeChild func(), retErr error) {
	if want.terminal {
		return consoleStdio(p)
	}
	s := &stdio{}
	var child []*os.File
	closeChild = func() {
		for _, f := range child {
			f.Close()
		}
	}
	defer func() {
		if retErr != nil {
			closeChild()
			s.Close()
		}
	}()
	newPipe := func() (r, w *os.File, err error) {
		r, w, err = os.Pipe()
		if err != nil {
			return nil, nil, fmt.Errorf("create stdio pipe: %w", err)
		}
		return r, w, nil
	}
	// The container's root user must be able to reopen its stdio through
	// /proc/self/fd (e.g. /dev/stdout) when a user namespace maps it.
	chown := func(f *os.File) error {
		if err := unix.Fchown(int(f.Fd()), rootUID, rootGID); err != nil {
			return fmt.Errorf("chown stdio pipe: %w", err)
		}
		return nil
	}

	if want.stdin {
		r, w, err := newPipe()
		if err != nil {
			return nil, nil, err
		}
		s.stdin, child = w, append(child, r)
		if err := chown(r); err != nil {
			return nil, nil, err
		}
		p.Stdin = r
	}
	if want.stdout {
		r, w, err := newPipe()
		if err != nil {
			return nil, nil, err
		}
		s.stdout, child = newStream(r), append(child, w)
		if err := chown(w); err != nil {
			return nil, nil, err
		}
		p.Stdout = w
	}
	if want.stderr {
		r, w, err := newPipe()
		if err != nil {
			return nil, nil, err
		}
		s.stderr, child = newStream(r), append(child, w)
		if err := chown(w); err != nil {
			return nil, nil, err
		}
		p.Stderr = w
	}
	return s, closeChild, nil
}

// consoleStdio asks libcontainer for a pty: the container's init creates
// it and sends the master over a socket; receiveConsole takes it once the
// process has started.
func consoleStdio(p *libcontainer.Process) (*stdio, func(), error) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, nil, fmt.Errorf("console socket: %w", err)
	}
	parent, child := os.NewFile(uintptr(fds[0]), "console-parent"), os.NewFile(uintptr(fds[1]), "console-child")
	p.ConsoleSocket = child
	return &stdio{consoleSocket: parent}, func() { child.Close() }, nil
}

// receiveConsole takes the pty master from a started process; a no-op
// without a terminal.
func (s *stdio) receiveConsole() error {
	if s.consoleSocket == nil {
		return nil
	}
	defer func() {
		s.consoleSocket.Close()
		s.consoleSocket = nil
	}()
	master, err := utils.RecvFile(s.consoleSocket)
	if err != nil {
		return fmt.Errorf("receive the pty master: %w", err)
	}
	fd, err := unix.Dup(int(master.Fd()))
	if err != nil {
		master.Close()
		return fmt.Errorf("dup the pty master: %w", err)
	}
	unix.CloseOnExec(fd)
	s.console = master
	s.stdin = os.NewFile(uintptr(fd), "pty-stdin")
	s.stdout = newStream(master)
	return nil
}

// resize sets the terminal's window size.
func (s *stdio) resize(rows, cols uint32) error {
	if s.console == nil {
		return fmt.Errorf("the process has no terminal: %w", errdefs.ErrFailedPrecondition)
	}
	ws := &unix.Winsize{Row: uint16(rows), Col: uint16(cols)}
	if err := unix.IoctlSetWinsize(int(s.console.Fd()), unix.TIOCSWINSZ, ws); err != nil {
		return fmt.Errorf("resize terminal: %w", err)
	}
	return nil
}

// Write writes data to the process's stdin.
func (s *stdio) Write(data []byte) (int, error) {
	if s.stdin == nil {
		return 0, fmt.Errorf("stdin was not requested: %w", errdefs.ErrFailedPrecondition)
	}
	n, err := s.stdin.Write(data)
	if errors.Is(err, os.ErrClosed) {
		return n, fmt.Errorf("stdin is closed: %w", errdefs.ErrFailedPrecondition)
	}
	return n, err
}

// CloseStdin makes the process read EOF. Closing twice is not an error.
func (s *stdio) CloseStdin() error {
	if s.stdin == nil {
		return nil
	}
	if err := s.stdin.Close(); err != nil && !errors.Is(err, os.ErrClosed) {
		return err
	}
	return nil
}

// Close releases every stream; blocked reads return end of stream.
func (s *stdio) Close() error {
	if s.consoleSocket != nil {
		s.consoleSocket.Close()
	}
	err := s.CloseStdin()
	for _, st := range []*stream{s.stdout, s.stderr} {
		if st != nil {
			st.Close()
		}
	}
	return err
}

// stream is the agent's end of one output stream. A pump goroutine reads
// it a chunk at a time and hands the chunk to one reader; what a reader
// does not take stays for the next one. So a read whose caller gives up
// (its context ends) loses no data, and the process still blocks when
// nobody reads, as it would on a pipe.
type stream struct {
	r      io.Closer
	chunks chan []byte   // closed by the pump at end of stream
	done   chan struct{} // closed by Close
	once   sync.Once

	turn    chan struct{} // one reader at a time; a token, so waiting honours ctx
	pending []byte        // owned by the holder of turn
	eof     bool          // owned by the holder of turn
}

func newStream(r io.ReadCloser) *stream {
	s := &stream{
		r:      r,
		chunks: make(chan []byte),
		done:   make(chan struct{}),
		turn:   make(chan struct{}, 1),
	}
	go s.pump(r)
	return s
}

func (s *stream) pump(r io.Reader) {
	defer close(s.chunks)
	for {
		buf := make([]byte, defaultReadLen)
		n, err := r.Read(buf)
		if n > 0 {
			select {
			case s.chunks <- buf[:n]:
			case <-s.done:
				return
			}
		}
		// Any error ends the stream: EOF once every writer is gone,
		// ErrClosed after Close (and EIO from a pty master, later).
		if err != nil {
			return
		}
	}
}

// Read returns up to max bytes, blocking until there is data or the stream
// has ended (eof true, no data).
func (s *stream) Read(ctx context.Context, max int) (data []byte, eof bool, err error) {
	select {
	case s.turn <- struct{}{}:
	case <-ctx.Done():
		return nil, false, ctx.Err()
	}
	defer func() { <-s.turn }()

	if len(s.pending) == 0 && !s.eof {
		select {
		case chunk, ok := <-s.chunks:
			s.pending, s.eof = chunk, !ok
		case <-ctx.Done():
			return nil, false, ctx.Err()
		}
	}
	if len(s.pending) == 0 {
		return nil, true, nil
	}
	n := min(max, len(s.pending))
	data, s.pending = s.pending[:n], s.pending[n:]
	return data, false, nil
}

// Close closes the agent's end; data not read yet is dropped.
func (s *stream) Close() {
	s.once.Do(func() {
		close(s.done)
		s.r.Close()
	})
}

// readLen picks the length of one read from the request's len.
func readLen(n uint32) int {
	if n == 0 {
		return defaultReadLen
	}
	return min(int(n), maxReadLen)
}
