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
	"time"

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
		case "file", "binary":
			if p.name == "stdin" {
				return errdefs.ErrInvalidArgument.WithMessage(fmt.Sprintf("stdin %q: a log URI is for output", p.path))
			}
		default:
			return errdefs.ErrNotImplemented.WithMessage(fmt.Sprintf(
				"%s %q: %s:// stdio is not supported: use a fifo, file:// or binary://", p.name, p.path, u.Scheme))
		}
	}
	return nil
}

// pipes connects one process's stdio fifos to its streams in the guest.
type pipes struct {
	stdin          io.ReadCloser
	stdout, stderr io.WriteCloser
	// Our own read ends of the output fifos: with them open, a client that
	// goes away and comes back (containerd restart, attach) never makes
	// our writes fail with EPIPE.
	keep []io.Closer

	outputs   sync.WaitGroup
	drained   chan struct{}
	closeOnce sync.Once

	// stdinKeep holds the stdin fifo open for writing when the process has
	// a terminal, so a client that detaches (ctr run -d -t) is no end of
	// input: the next one attaches. Only CloseIO ends it then.
	stdinKeep io.Closer

	// logger is the binary:// logging process, if any.
	logger *logger

	// stdinCopied is closed when the stdin copy loop has ended; nil until
	// it starts.
	stdinMu     sync.Mutex
	stdinCopied chan struct{}
}

// stdinDrainTimeout bounds how long CloseIO waits for what the client
// already wrote to stdin to reach the guest.
const stdinDrainTimeout = 2 * time.Second

// openPipes opens the fifos.
func openPipes(ctx context.Context, s Stdio, o owner) (_ *pipes, retErr error) {
	// The fifo package opens in the background and gives up when its
	// context ends; the request's context ends when the RPC returns,
	// possibly before the client opened its end.
	ctx = context.WithoutCancel(ctx)
	p := &pipes{drained: make(chan struct{})}
	defer func() {
		if retErr != nil {
			p.close()
		}
	}()
	if s.Stdin != "" {
		f, err := fifo.OpenFifo(ctx, s.Stdin, syscall.O_RDONLY|syscall.O_NONBLOCK, 0)
		if err != nil {
			return nil, fmt.Errorf("open stdin %s: %w", s.Stdin, err)
		}
		p.stdin = f
		if s.Terminal {
			// O_RDWR opens a fifo without waiting for a reader.
			keep, err := os.OpenFile(s.Stdin, os.O_RDWR, 0)
			if err != nil {
				return nil, fmt.Errorf("open stdin %s: %w", s.Stdin, err)
			}
			p.stdinKeep = keep
		}
	}
	if u, err := url.Parse(s.Stdout); err == nil && (u.Scheme == "file" || u.Scheme == "binary") {
		// A log URI takes both output streams.
		switch u.Scheme {
		case "file":
			p.stdout, p.stderr, err = openLogFile(u)
		case "binary":
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
		done := make(chan struct{})
		p.stdinMu.Lock()
		p.stdinCopied = done
		p.stdinMu.Unlock()
		go func() {
			defer close(done)
			copyInput(ctx, agent, containerID, execID, p.stdin)
		}()
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

// closeStdin ends the stdin stream. Clients (ctr) call CloseIO as their
// own input ends, just before they close the fifo, and possibly before the
// process has started: closing our end at once would lose what they wrote
// and we had not read yet. So the copy loop is left to reach the fifo's EOF;
// once it runs, closeStdin waits for that, and only after
// stdinDrainTimeout closes the fifo itself. The loop then closes stdin in
// the guest.
func (p *pipes) closeStdin() error {
	if p.stdin == nil {
		return nil
	}
	if p.stdinKeep != nil {
		p.stdinKeep.Close()
	}
	p.stdinMu.Lock()
	copied := p.stdinCopied
	p.stdinMu.Unlock()
	if copied == nil {
		return nil // not started: the copy loop will end at EOF
	}
	select {
	case <-copied:
	case <-time.After(stdinDrainTimeout):
	}
	return p.stdin.Close()
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
			p.logger.wait()
		}
	})
}
