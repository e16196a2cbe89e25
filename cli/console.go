package cli

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/term"

	"github.com/colo-runtime/colo/shim/sandbox"
)

// consoleExitNotice starts the line the guest agent writes when the shell
// exited, followed by its exit status and "]" (agent.ConsoleExitNotice:
// keep them equal).
const consoleExitNotice = "[colo-agent: the shell exited with status "

// detachKey ends an interactive session from the keyboard: Ctrl-], as
// telnet's.
const detachKey = 0x1d

// defaultConsoleTimeout bounds a command run with `colo console POD -- CMD`.
const defaultConsoleTimeout = time.Minute

// consoleCmd connects to a sandbox's guest debug console: an interactive
// shell, or with "-- CMD ARGS" one command, whose output it prints and
// whose exit status it exits with.
func consoleCmd(ctx context.Context, e *env, args []string) error {
	fs := flag.NewFlagSet("console", flag.ContinueOnError)
	fs.SetOutput(e.stderr)
	timeout := fs.Duration("timeout", defaultConsoleTimeout, "how long a command (after --) may take")
	// The command follows "--"; the sandbox may come before or after
	// the flags.
	var rest []string
	for i, a := range args {
		if a == "--" {
			args, rest = args[:i], args[i+1:]
			if len(rest) == 0 {
				return usageError("no command after --")
			}
			break
		}
	}
	var ref string
	if len(args) > 0 && !strings.HasPrefix(args[0], "-") {
		ref, args = args[0], args[1:]
	}
	if err := fs.Parse(args); err != nil {
		return usageError("%v", err)
	}
	if ref == "" && fs.NArg() > 0 {
		ref = fs.Arg(0)
		if fs.NArg() > 1 {
			return usageError("unexpected %s: a command goes after --", quoted(strings.Join(fs.Args()[1:], " ")))
		}
	} else if fs.NArg() > 0 {
		return usageError("unexpected %s: a command goes after --", quoted(strings.Join(fs.Args(), " ")))
	}
	if *timeout <= 0 {
		return usageError("--timeout %s: want a positive duration", *timeout)
	}
	st, err := findSandbox(e.cfg.Runtime.StateDir, ref)
	if err != nil {
		return err
	}
	sock := filepath.Join(st.Dir, sandbox.ManageSocket)
	if len(rest) == 0 {
		return consoleInteractive(ctx, e, st.ID, sock)
	}
	ctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()
	code, err := consoleRun(ctx, sock, rest, e.stdout)
	if errors.Is(err, context.DeadlineExceeded) {
		err = fmt.Errorf("no answer within %s (--timeout)", *timeout)
	}
	if err != nil {
		return fmt.Errorf("sandbox %s: %w", st.ID, err)
	}
	if code != 0 {
		return exitStatus(code)
	}
	return nil
}

// dialConsole opens GET /console on the management socket sock and returns
// the upgraded connection, and a reader of it that has what came with the
// answer. The context bounds only the dial and the answer.
func dialConsole(ctx context.Context, sock string) (net.Conn, io.Reader, error) {
	conn, err := (&net.Dialer{}).DialContext(ctx, "unix", sock)
	if err != nil {
		return nil, nil, fmt.Errorf("management socket %s: %w", sock, err)
	}
	stop := context.AfterFunc(ctx, func() { conn.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	req, err := http.NewRequest(http.MethodGet, "http://sandbox/console", nil)
	if err != nil {
		conn.Close()
		return nil, nil, err
	}
	req.Header.Set("Connection", "Upgrade")
	req.Header.Set("Upgrade", sandbox.ConsoleProtocol)
	br := bufio.NewReader(conn)
	var resp *http.Response
	if err = req.Write(conn); err == nil {
		resp, err = http.ReadResponse(br, req)
	}
	if err != nil {
		conn.Close()
		if ctx.Err() != nil {
			err = ctx.Err()
		}
		return nil, nil, fmt.Errorf("management socket %s: %w", sock, err)
	}
	if resp.StatusCode != http.StatusSwitchingProtocols {
		defer conn.Close()
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
		var e sandbox.ErrorReply
		if json.Unmarshal(b, &e) == nil && e.Error != "" {
			return nil, nil, errors.New(e.Error)
		}
		return nil, nil, fmt.Errorf("GET /console: %s", resp.Status)
	}
	if !stop() {
		conn.Close()
		return nil, nil, ctx.Err()
	}
	return conn, br, nil
}

// consoleRun runs argv in the guest's shell and copies its output (stdout
// and stderr, as the terminal merges them) to out, until ctx ends. The
// shell is told to stop echoing and prompting, then runs the command with
// no input; markers with a random nonce, which the typed lines do not
// contain as they are printed, frame its output and carry its status.
func consoleRun(ctx context.Context, sock string, argv []string, out io.Writer) (int, error) {
	conn, r, err := dialConsole(ctx, sock)
	if err != nil {
		return 0, err
	}
	defer conn.Close()
	stop := context.AfterFunc(ctx, func() { conn.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	nonce := make([]byte, 8)
	rand.Read(nonce)
	id := hex.EncodeToString(nonce)
	begin := "__COLO_BEGIN_" + id
	end := "__COLO_END_" + id + ":"

	// The new shell speaks first (its banner): what is typed before may
	// still reach the last session's shell, which is ending.
	m := &markerReader{r: r}
	if err := m.wait(); err != nil {
		return 0, wrapCtx(ctx, fmt.Errorf("the shell did not start: %w", err))
	}
	// -onlcr: the output as the command wrote it, without \r added.
	setup := fmt.Sprintf("stty -echo -onlcr 2>/dev/null; PS1=''; PS2=''; printf '%%s%%s\\n' __COLO_BEGIN_ %s\n", id)
	if _, err := io.WriteString(conn, setup); err != nil {
		return 0, wrapCtx(ctx, err)
	}
	if _, err := m.copyUntil(io.Discard, begin); err != nil {
		return 0, wrapCtx(ctx, fmt.Errorf("the shell did not start: %w", err))
	}
	if _, err := m.copyUntil(io.Discard, "\n"); err != nil {
		return 0, wrapCtx(ctx, err)
	}
	line := fmt.Sprintf("(%s) </dev/null; printf '%%s%%s:%%d\\n' __COLO_END_ %s \"$?\"\n", shellQuote(argv), id)
	if _, err := io.WriteString(conn, line); err != nil {
		return 0, wrapCtx(ctx, err)
	}
	if _, err := m.copyUntil(out, end); err != nil {
		return 0, wrapCtx(ctx, err)
	}
	var status bytes.Buffer
	if _, err := m.copyUntil(&status, "\n"); err != nil {
		return 0, wrapCtx(ctx, err)
	}
	code, err := strconv.Atoi(strings.TrimSpace(status.String()))
	if err != nil {
		return 0, fmt.Errorf("exit status %q: %w", status.String(), err)
	}
	return code, nil
}

// wrapCtx names the context's end as the cause of an error it caused.
func wrapCtx(ctx context.Context, err error) error {
	if ctx.Err() != nil {
		return ctx.Err()
	}
	if errors.Is(err, io.EOF) {
		return errors.New("the console closed (the sandbox stopped?)")
	}
	return err
}

// markerReader reads a stream up to markers.
type markerReader struct {
	r   io.Reader
	buf []byte // read, not yet consumed
}

// wait reads until something has come, and keeps it.
func (m *markerReader) wait() error {
	chunk := make([]byte, 4<<10)
	for len(m.buf) == 0 {
		n, err := m.r.Read(chunk)
		m.buf = append(m.buf, chunk[:n]...)
		if err != nil && len(m.buf) == 0 {
			return err
		}
	}
	return nil
}

// copyUntil copies to w what comes before marker and consumes the marker.
// What may be the marker's beginning is held back until it is known not to
// be.
func (m *markerReader) copyUntil(w io.Writer, marker string) (int64, error) {
	var n int64
	chunk := make([]byte, 32<<10)
	for {
		if i := bytes.Index(m.buf, []byte(marker)); i >= 0 {
			k, err := w.Write(m.buf[:i])
			n += int64(k)
			m.buf = m.buf[i+len(marker):]
			return n, err
		}
		if keep := len(marker) - 1; len(m.buf) > keep {
			k, err := w.Write(m.buf[:len(m.buf)-keep])
			n += int64(k)
			m.buf = append(m.buf[:0], m.buf[len(m.buf)-keep:]...)
			if err != nil {
				return n, err
			}
		}
		r, err := m.r.Read(chunk)
		m.buf = append(m.buf, chunk[:r]...)
		if err != nil && r == 0 {
			return n, err
		}
	}
}

// shellQuote quotes argv for a POSIX shell.
func shellQuote(argv []string) string {
	q := make([]string, len(argv))
	for i, a := range argv {
		q[i] = "'" + strings.ReplaceAll(a, "'", `'\''`) + "'"
	}
	return strings.Join(q, " ")
}

// exitNotice matches the agent's line when the shell exited.
var exitNotice = regexp.MustCompile(regexp.QuoteMeta(consoleExitNotice) + `(\d+)\]`)

// consoleInteractive connects the terminal to the guest's shell until the
// shell exits, the user detaches (Ctrl-]), the sandbox stops or ctx ends
// (a signal). A terminal is put in raw mode, so that keys reach the
// guest's terminal as they are, and restored on the way out. Without a
// terminal standard input is sent as it comes, then an end-of-file
// character ends the shell.
func consoleInteractive(ctx context.Context, e *env, id, sock string) error {
	dial, cancel := context.WithTimeout(ctx, 30*time.Second)
	conn, r, err := dialConsole(dial, sock)
	cancel()
	if err != nil {
		return fmt.Errorf("sandbox %s: %w", id, err)
	}
	defer conn.Close()
	stdin := os.Stdin
	fd := int(stdin.Fd())
	tty := term.IsTerminal(fd)
	restore := func() {}
	if tty {
		old, err := term.MakeRaw(fd)
		if err != nil {
			return fmt.Errorf("terminal: %w", err)
		}
		restore = sync.OnceFunc(func() {
			term.Restore(fd, old)
			fmt.Fprintln(e.stderr)
		})
		defer restore()
		fmt.Fprintf(e.stderr, "colo: the guest of sandbox %s, outside its containers; Ctrl-] detaches\r\n", id)
	}
	code, err := consoleSession(ctx, conn, r, stdin, e.stdout, tty)
	restore()
	if err != nil {
		return fmt.Errorf("sandbox %s: %w", id, err)
	}
	if code > 0 {
		return exitStatus(code)
	}
	return nil
}

// consoleSession copies in to conn and conn (r) to out until the shell
// exits (its status), the user detaches (-1) or the connection or ctx
// ends.
func consoleSession(ctx context.Context, conn net.Conn, r io.Reader, in io.Reader, out io.Writer, tty bool) (int, error) {
	stop := context.AfterFunc(ctx, func() { conn.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	detached := make(chan struct{})
	go func() {
		buf := make([]byte, 4096)
		for {
			n, err := in.Read(buf)
			if tty {
				if i := bytes.IndexByte(buf[:n], detachKey); i >= 0 {
					conn.Write(buf[:i])
					close(detached)
					conn.SetDeadline(time.Unix(1, 0))
					return
				}
			}
			if n > 0 {
				if _, err := conn.Write(buf[:n]); err != nil {
					return
				}
			}
			if err != nil {
				if !tty {
					// The end of the input: ^D (the terminal's
					// VEOF) at the start of a line ends the shell.
					conn.Write([]byte("\n\x04"))
				}
				return
			}
		}
	}()
	// Output, watched for the agent's notice across reads.
	var tail []byte
	buf := make([]byte, 32<<10)
	for {
		n, err := r.Read(buf)
		if n > 0 {
			if _, werr := out.Write(buf[:n]); werr != nil {
				return 0, werr
			}
			tail = append(tail, buf[:n]...)
			if m := exitNotice.FindSubmatch(tail); m != nil {
				code, _ := strconv.Atoi(string(m[1]))
				return code, nil
			}
			if keep := len(consoleExitNotice) + 8; len(tail) > keep {
				tail = append(tail[:0], tail[len(tail)-keep:]...)
			}
		}
		if err != nil {
			select {
			case <-detached:
				return -1, nil
			default:
			}
			if ctx.Err() != nil {
				return 0, ctx.Err()
			}
			if errors.Is(err, io.EOF) {
				return 0, errors.New("the console closed (the sandbox stopped?)")
			}
			return 0, err
		}
	}
}
