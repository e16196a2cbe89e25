package cli

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/colo-runtime/colo/shim/sandbox"
)

// consoleSandbox is a sandbox record and a management socket whose GET
// /console runs guest (on the upgraded connection), or answers errStatus
// with errMsg.
type consoleSandbox struct {
	cfg       string // colo config naming the state directory
	guest     func(conn net.Conn, r *bufio.Reader)
	errStatus int
	errMsg    string
}

func newConsoleSandbox(t *testing.T, id string, f *consoleSandbox) *consoleSandbox {
	t.Helper()
	state := filepath.Join(t.TempDir(), "colo")
	dir := filepath.Join(state, "default", id)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	b, _ := json.Marshal(map[string]any{"version": sandbox.StateVersion, "dir": dir, "id": id})
	if err := os.WriteFile(filepath.Join(dir, "state.json"), b, 0o600); err != nil {
		t.Fatal(err)
	}
	f.cfg = filepath.Join(state, "config.toml")
	if err := os.WriteFile(f.cfg, []byte(fmt.Sprintf("[runtime]\nstate_dir = %q\n", state)), 0o644); err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("unix", filepath.Join(dir, sandbox.ManageSocket))
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodGet || r.URL.Path != "/console" || r.Header.Get("Upgrade") != sandbox.ConsoleProtocol || !strings.EqualFold(r.Header.Get("Connection"), "upgrade") {
			http.Error(w, "bad request", http.StatusBadRequest)
			return
		}
		if f.errStatus != 0 {
			w.WriteHeader(f.errStatus)
			json.NewEncoder(w).Encode(sandbox.ErrorReply{Error: f.errMsg})
			return
		}
		conn, buf, err := w.(http.Hijacker).Hijack()
		if err != nil {
			return
		}
		defer conn.Close()
		io.WriteString(conn, "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: colo-console\r\n\r\n")
		f.guest(conn, buf.Reader)
	})}
	go srv.Serve(l)
	t.Cleanup(func() { srv.Close() })
	return f
}

var (
	setupLine   = regexp.MustCompile(`printf '%s%s\\n' __COLO_BEGIN_ ([0-9a-f]+)\n$`)
	commandLine = regexp.MustCompile(`^\((.*)\) </dev/null; printf '%s%s:%d\\n' __COLO_END_ ([0-9a-f]+) "\$\?"\n$`)
)

// scriptedShell plays the guest's shell for command mode: a prompt and the
// echo of the setup line, the begin marker, then for the command line the
// output and status that run gives, and the end marker.
func scriptedShell(t *testing.T, run func(cmd string) (string, int)) func(net.Conn, *bufio.Reader) {
	return func(conn net.Conn, r *bufio.Reader) {
		io.WriteString(conn, "colo-guest:/# ")
		line, err := r.ReadString('\n')
		if err != nil {
			return
		}
		m := setupLine.FindStringSubmatch(line)
		if m == nil {
			t.Errorf("setup line %q", line)
			return
		}
		// Echoed, as a terminal does before stty -echo runs.
		io.WriteString(conn, strings.ReplaceAll(line, "\n", "\r\n"))
		io.WriteString(conn, "__COLO_BEGIN_"+m[1]+"\n")
		line, err = r.ReadString('\n')
		if err != nil {
			return
		}
		c := commandLine.FindStringSubmatch(line)
		if c == nil || c[2] != m[1] {
			t.Errorf("command line %q", line)
			return
		}
		out, status := run(c[1])
		// In pieces, the marker split across writes.
		end := fmt.Sprintf("%s__COLO_END_%s:%d\n", out, c[2], status)
		for len(end) > 0 {
			n := min(len(end), 7)
			io.WriteString(conn, end[:n])
			end = end[n:]
			time.Sleep(time.Millisecond)
		}
		// The shell goes on; the client hangs up.
		io.Copy(io.Discard, r)
	}
}

// TestConsoleCommand: `colo console ID -- CMD` sends the command quoted,
// prints exactly its output (without the terminal's noise) and exits with
// its status.
func TestConsoleCommand(t *testing.T) {
	var got []string
	f := newConsoleSandbox(t, "sb1", &consoleSandbox{guest: scriptedShell(t, func(cmd string) (string, int) {
		got = append(got, cmd)
		switch cmd {
		case `'cat' '/proc/1/comm'`:
			return "init\n", 0
		case `'sh' '-c' 'echo it'\''s; exit 3'`:
			return "it's\n__COLO_END_ but not the marker\nno newline", 3
		}
		return "", 127
	})})
	for _, tc := range []struct {
		args []string
		out  string
		code int
	}{
		{args: []string{"console", "sb1", "--", "cat", "/proc/1/comm"}, out: "init\n"},
		{args: []string{"console", "--timeout", "20s", "sb", "--", "sh", "-c", "echo it's; exit 3"}, out: "it's\n__COLO_END_ but not the marker\nno newline", code: 3},
	} {
		var stdout, stderr bytes.Buffer
		code := Run(context.Background(), append([]string{"--config", f.cfg}, tc.args...), &stdout, &stderr)
		if code != tc.code || stdout.String() != tc.out || stderr.Len() > 0 {
			t.Errorf("colo %q: exit %d, stdout %q, stderr %q; want exit %d, stdout %q and no message", tc.args, code, stdout.String(), stderr.String(), tc.code, tc.out)
		}
	}
	if len(got) != 2 {
		t.Errorf("commands run: %q", got)
	}
}

// TestConsoleTimeout: a command that does not finish in --timeout is an
// error naming it, not a hang.
func TestConsoleTimeout(t *testing.T) {
	f := newConsoleSandbox(t, "slow", &consoleSandbox{guest: func(conn net.Conn, r *bufio.Reader) {
		io.Copy(io.Discard, r) // a shell that never answers
	}})
	var stdout, stderr bytes.Buffer
	begin := time.Now()
	code := Run(context.Background(), []string{"--config", f.cfg, "console", "slow", "--timeout", "300ms", "--", "sleep", "1000"}, &stdout, &stderr)
	if code != 1 || !strings.Contains(stderr.String(), "no answer within 300ms") {
		t.Errorf("exit %d, stderr %q; want exit 1 naming the timeout", code, stderr.String())
	}
	if d := time.Since(begin); d > 5*time.Second {
		t.Errorf("took %s", d)
	}
}

// TestConsoleOff: the management socket's refusal is the error, as it is.
func TestConsoleOff(t *testing.T) {
	f := newConsoleSandbox(t, "off", &consoleSandbox{errStatus: http.StatusConflict, errMsg: sandbox.ConsoleOffMessage})
	for _, args := range [][]string{{"console", "off", "--", "true"}, {"console", "off"}} {
		var stdout, stderr bytes.Buffer
		code := Run(context.Background(), append([]string{"--config", f.cfg}, args...), &stdout, &stderr)
		if code != 1 || !strings.Contains(stderr.String(), "set agent.debug_console = true") {
			t.Errorf("colo %q: exit %d, stderr %q; want exit 1 and the message", args, code, stderr.String())
		}
	}
}

// TestConsoleUsage: command-line mistakes, exit status 2.
func TestConsoleUsage(t *testing.T) {
	f := newConsoleSandbox(t, "sb", &consoleSandbox{})
	for _, tc := range []struct {
		args []string
		err  string
	}{
		{args: []string{"console"}, err: "no pod or sandbox named"},
		{args: []string{"console", "--", "ls"}, err: "no pod or sandbox named"},
		{args: []string{"console", "sb", "ls"}, err: "a command goes after --"},
		{args: []string{"console", "sb", "--"}, err: "no command after --"},
		{args: []string{"console", "sb", "--timeout", "0s", "--", "ls"}, err: "--timeout 0s"},
	} {
		var stdout, stderr bytes.Buffer
		code := Run(context.Background(), append([]string{"--config", f.cfg}, tc.args...), &stdout, &stderr)
		if code != 2 || !strings.Contains(stderr.String(), tc.err) {
			t.Errorf("colo %q: exit %d, stderr %q; want exit 2 naming %q", tc.args, code, stderr.String(), tc.err)
		}
	}
}

// TestConsoleSessionPiped: without a terminal, standard input goes to the
// shell, its end is a ^D, and the session ends on the agent's notice with
// the shell's status; all the output is shown.
func TestConsoleSessionPiped(t *testing.T) {
	client, guest := net.Pipe()
	defer client.Close()
	go func() {
		defer guest.Close()
		r := bufio.NewReader(guest)
		io.WriteString(guest, "# ")
		for {
			b, err := r.ReadByte()
			if err != nil {
				return
			}
			if b == 0x04 {
				io.WriteString(guest, "\r\n"+consoleExitNotice)
				io.WriteString(guest, "5]\r\n")
				io.Copy(io.Discard, r)
				return
			}
			guest.Write([]byte{b}) // the echo
		}
	}()
	var out bytes.Buffer
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	code, err := consoleSession(ctx, client, client, strings.NewReader("echo hi\n"), &out, false)
	if err != nil || code != 5 {
		t.Fatalf("consoleSession = %d, %v; want 5", code, err)
	}
	if want := "# echo hi\n\n\r\n" + consoleExitNotice + "5]\r\n"; out.String() != want {
		t.Errorf("output %q, want %q", out.String(), want)
	}
}

func TestMarkerReader(t *testing.T) {
	m := &markerReader{r: io.MultiReader(strings.NewReader("abcMA"), strings.NewReader("RKdefMARK"), strings.NewReader("ghi\n"))}
	var a, b bytes.Buffer
	if _, err := m.copyUntil(&a, "MARK"); err != nil || a.String() != "abc" {
		t.Fatalf("first: %q, %v", a.String(), err)
	}
	if _, err := m.copyUntil(&b, "MARK"); err != nil || b.String() != "def" {
		t.Fatalf("second: %q, %v", b.String(), err)
	}
	if _, err := m.copyUntil(io.Discard, "nothere"); err != io.EOF {
		t.Fatalf("missing marker: %v, want EOF", err)
	}
}

func TestShellQuote(t *testing.T) {
	if got, want := shellQuote([]string{"a b", "it's", "$x"}), `'a b' 'it'\''s' '$x'`; got != want {
		t.Errorf("shellQuote = %s, want %s", got, want)
	}
}
