package sandbox

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/url"
	"os"
	"sync"
	"syscall"

	"github.com/containerd/errdefs"
	"github.com/containerd/fifo"
	"github.com/containerd/log"
	"github.com/containerd/ttrpc"

	"github.com/colo-runtime/colo/agentproto"
)

// streamChunk is the most one ReadStdout/ReadStderr/WriteStdin call moves.
const streamChunk = 32 << 10

// Stdio are the stdio paths containerd gives for a process.
type Stdio struct {
	Stdin    string
	Stdout   string
	Stderr   string
	Terminal bool
}

// Validate tells whether colo can serve these stdio paths.
func (s Stdio) Validate() error {
	for _, p := range []struct{ name, path string }{{"stdin", s.Stdin}, {"stdout", s.Stdout}, {"stderr", s.Stderr}} {
		if p.path == "" {
			continue
		}
		u, err := url.Parse(p.path)
		if err != nil {
			return errdefs.ErrInvalidArgument.WithMessage(fmt.Sprintf("%s %q: %v", p.name, p.path, err))
		}
		switch u.Scheme {
		case "", "fifo":
		case "file", "binary", "binary-v2":
			if p.name == "stdin" {
				return errdefs.ErrInvalidArgument.WithMessage(fmt.Sprintf("stdin %q: a log URI is for output", p.path))
			}
		default:
			return errdefs.ErrNotImplemented.WithMessage(fmt.Sprintf(
				"%s %q: %s:// stdio is not supported: use a fifo, file://, binary:// or binary-v2://", p.name, p.path, u.Scheme))
		}
	}
	return nil
}

// streams are the stdio the process has in the guest: with a terminal,
// stdout carries the tty and there is no stderr, as with runc.
func (s Stdio) streams() Stdio {
	if s.Terminal {
		s.Stderr = ""
	}
	return s
}

// pipes connects one process's stdio fifos to its streams in the guest.
//
// Stdin ends (EOF in the guest) once the client has closed its end of the
// fifo and all it wrote is through. With a terminal the shim also holds a
// write end, as the runc shim does for every process, so that a client
// that detaches (ctr run -d -t, attach) is no end of input: there stdin
// ends only after CloseIO too. Without a terminal colo does not wait for
// CloseIO, unlike runc: ctr sends no CloseIO for an EOF that comes before
// the task is created, which a VM's boot makes likely (echo x | ctr run).
type pipes struct {
	stdin io.ReadCloser
	// stdinKeep is our write end of a terminal's stdin fifo; CloseIO
	// closes it.
	stdinKeep      io.Closer
	stdout, stderr io.WriteCloser
	// Our own read ends of the output fifos: with them open, a client that
	// goes away and comes back (containerd restart, attach) never makes
	// our writes fail with EPIPE.
	keep []io.Closer

	outputs   sync.WaitGroup
	drained   chan struct{}
	closeOnce sync.Once

	// logger is the binary:// logging process, if any.
	logger *logger
}

// openPipes opens the process's stdio. Opening an output fifo waits for
// the client's read end, as long as ctx lasts.
func openPipes(ctx context.Context, s Stdio, o owner) (_ *pipes, retErr error) {
	s = s.streams()
	p := &pipes{drained: make(chan struct{})}
	defer func() {
		if retErr != nil {
			p.close()
		}
	}()
	switch {
	case s.Stdin != "" && s.Terminal:
		// Our write end first (O_RDWR opens a fifo without waiting for a
		// reader); with it the read end opens at once. Opening the read
		// end later could find every writer gone, the client's too, and
		// wait for ever: our end holds what the client wrote meanwhile.
		keep, err := os.OpenFile(s.Stdin, os.O_RDWR, 0)
		if err != nil {
			return nil, fmt.Errorf("open stdin %s: %w", s.Stdin, err)
		}
		p.stdinKeep = keep
		r, err := os.OpenFile(s.Stdin, os.O_RDONLY|syscall.O_NONBLOCK, 0)
		if err != nil {
			return nil, fmt.Errorf("open stdin %s: %w", s.Stdin, err)
		}
		p.stdin = r
	case s.Stdin != "":
		// The fifo package opens the read end in the background, once a
		// writer comes, and reads wait for that: the client's end may
		// open after this request, and cannot write before ours is open.
		r, err := fifo.OpenFifo(context.WithoutCancel(ctx), s.Stdin, syscall.O_RDONLY|syscall.O_NONBLOCK, 0)
		if err != nil {
			return nil, fmt.Errorf("open stdin %s: %w", s.Stdin, err)
		}
		p.stdin = r
	}
	if u, err := url.Parse(s.Stdout); err == nil && (u.Scheme == "file" || isBinaryScheme(u.Scheme)) {
		// A log URI takes both output streams.
		if u.Scheme == "file" {
			p.stdout, p.stderr, err = openLogFile(u)
		} else {
			p.logger, p.stdout, p.stderr, err = startLogger(ctx, u, o)
		}
		if err != nil {
			return nil, fmt.Errorf("log URI %s: %w", s.Stdout, err)
		}
		return p, nil
	}
	var err error
	if p.stdout, err = p.openOutput(ctx, s.Stdout); err != nil {
		return nil, fmt.Errorf("open stdout %s: %w", s.Stdout, err)
	}
	if p.stderr, err = p.openOutput(ctx, s.Stderr); err != nil {
		return nil, fmt.Errorf("open stderr %s: %w", s.Stderr, err)
	}
	return p, nil
}

func (p *pipes) openOutput(ctx context.Context, path string) (io.WriteCloser, error) {
	if path == "" {
		return nil, nil
	}
	isFifo, err := fifo.IsFifo(path)
	if err != nil {
		return nil, err
	}
	if !isFifo {
		f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND, 0)
		if err != nil {
			return nil, err
		}
		return f, nil
	}
	w, err := fifo.OpenFifo(ctx, path, syscall.O_WRONLY, 0)
	if err != nil {
		return nil, err
	}
	r, err := fifo.OpenFifo(ctx, path, syscall.O_RDONLY, 0)
	if err != nil {
		w.Close()
		return nil, err
	}
	p.keep = append(p.keep, r)
	return w, nil
}

// start copies between the fifos and the agent until the output streams
// end; ctx must outlive the process.
func (p *pipes) start(ctx context.Context, agent agentproto.AgentService, containerID, execID string) {
	ctx = log.WithLogger(ctx, log.G(ctx).WithFields(log.Fields{"container": containerID, "exec": execID}))
	if p.stdout != nil {
		p.outputs.Add(1)
		go func() {
			defer p.outputs.Done()
			copyOutput(ctx, "stdout", agent.ReadStdout, containerID, execID, p.stdout)
		}()
	}
	if p.stderr != nil {
		p.outputs.Add(1)
		go func() {
			defer p.outputs.Done()
			copyOutput(ctx, "stderr", agent.ReadStderr, containerID, execID, p.stderr)
		}()
	}
	go func() {
		p.outputs.Wait()
		close(p.drained)
	}()
	if p.stdin != nil {
		go copyInput(ctx, agent, containerID, execID, p.stdin)
	}
}

type readStream func(context.Context, *agentproto.ReadStreamRequest) (*agentproto.ReadStreamResponse, error)

func copyOutput(ctx context.Context, name string, read readStream, containerID, execID string, w io.WriteCloser) {
	defer func() { w.Close() }()
	req := &agentproto.ReadStreamRequest{ContainerId: containerID, ExecId: execID, Len: streamChunk}
	for {
		resp, err := read(ctx, req)
		if err != nil {
			if !errors.Is(err, ttrpc.ErrClosed) {
				log.G(ctx).WithError(err).Warnf("read %s from the guest", name)
			}
			return
		}
		if len(resp.GetData()) > 0 && w != nil {
			if _, err := w.Write(resp.GetData()); err != nil {
				// Keep reading so the process in the guest never
				// blocks on a full pipe; the output is lost.
				log.G(ctx).WithError(err).Warnf("write %s; discarding the rest", name)
				w.Close()
				w = nopCloser{}
			}
		}
		if resp.GetEof() {
			return
		}
	}
}

type nopCloser struct{}

func (nopCloser) Write(b []byte) (int, error) { return len(b), nil }
func (nopCloser) Close() error                { return nil }

func copyInput(ctx context.Context, agent agentproto.AgentService, containerID, execID string, r io.Reader) {
	buf := make([]byte, streamChunk)
	for {
		n, rerr := r.Read(buf)
		data := buf[:n]
		for len(data) > 0 {
			resp, err := agent.WriteStdin(ctx, &agentproto.WriteStreamRequest{ContainerId: containerID, ExecId: execID, Data: data})
			if err != nil {
				log.G(ctx).WithError(err).Debug("write stdin to the guest")
				return
			}
			if resp.GetLen() == 0 || int(resp.GetLen()) > len(data) {
				log.G(ctx).Warnf("guest accepted %d of %d stdin bytes; stopping stdin", resp.GetLen(), len(data))
				return
			}
			data = data[resp.GetLen():]
		}
		if rerr != nil {
			break
		}
	}
	if _, err := agent.CloseStdin(ctx, &agentproto.CloseStdinRequest{ContainerId: containerID, ExecId: execID}); err != nil {
		log.G(ctx).WithError(err).Debug("close stdin in the guest")
	}
}

// closeStdin serves CloseIO: it closes our write end of a terminal's
// stdin (see pipes).
func (p *pipes) closeStdin() {
	if p.stdinKeep != nil {
		_ = p.stdinKeep.Close()
	}
}

// close closes every fifo; the copy loops end with it.
func (p *pipes) close() {
	p.closeOnce.Do(func() {
		for _, c := range []io.Closer{p.stdin, p.stdinKeep, p.stdout, p.stderr} {
			if c != nil {
				_ = c.Close()
			}
		}
		for _, c := range p.keep {
			_ = c.Close()
		}
		if p.logger != nil {
			p.logger.stop()
		}
	})
}
