package e2e

import (
	"context"
	"errors"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/colo-runtime/colo/testbed"
)

// coloConsole runs `colo console` with the given standard input, bounded,
// and returns its stdout, stderr and exit status.
func coloConsole(t *testing.T, cfg, stdin string, args ...string) (string, string, int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "colo", append([]string{"--config", cfg, "console"}, args...)...)
	cmd.Stdin = strings.NewReader(stdin)
	var stdout, stderr strings.Builder
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	var ee *exec.ExitError
	switch {
	case errors.As(err, &ee):
		return stdout.String(), stderr.String(), ee.ExitCode()
	case err != nil:
		t.Fatalf("colo console %q: %v", args, err)
	}
	return stdout.String(), stderr.String(), 0
}

// TestDebugConsole: with agent.debug_console, `colo console` reaches a root
// shell in the guest outside the containers: PID 1 is the agent, ps shows
// the container's process and the agent's service, a command's exit status
// is colo's, and a shell fed from a pipe ends with its own status. Without
// it, colo console says how to turn it on.
func TestDebugConsole(t *testing.T) {
	const id, off = "colo-console", "colo-console-off"
	checkNoLeaks(t, id, off)
	cfg := coloConfig(t, "[agent]\ndebug_console = true\n")
	startDetached(t, testbed.Runtime, id, []string{"--runtime-config-path", cfg}, "sleep", "3600")

	run := func(want int, args ...string) string {
		t.Helper()
		out, errOut, code := coloConsole(t, cfg, "", append([]string{id, "--"}, args...)...)
		if code != want {
			t.Fatalf("colo console %s -- %q: exit %d, want %d; stdout %q, stderr %q", id, args, code, want, out, errOut)
		}
		return out
	}
	if out := run(0, "cat", "/proc/1/comm"); out != "init\n" {
		t.Errorf("PID 1's comm: %q, want init (colo-agent is /init)", out)
	}
	if out := run(0, "readlink", "/proc/1/exe"); out != "/init\n" {
		t.Errorf("PID 1's exe: %q, want /init", out)
	}
	if out := run(0, "id", "-u"); out != "0\n" {
		t.Errorf("uid %q, want 0", out)
	}
	// Outside the container: its process is there, and so is the agent's
	// service, which the container cannot see.
	ps := run(0, "ps", "-o", "pid,args")
	if !strings.Contains(ps, "sleep 3600") || !strings.Contains(ps, " serve ") {
		t.Errorf("ps in the console shows no container process or no agent service:\n%s", ps)
	}
	if r := ctr(t, "task", "exec", "--exec-id", "ps", id, "ps", "-o", "args"); r.ExitCode != 0 || strings.Contains(r.Stdout, " serve ") {
		t.Errorf("ps in the container: %s; want no agent service", r)
	}
	run(3, "sh", "-c", "echo not the end; exit 3")

	// Piped: the lines go to the shell, the end of input ends it, and
	// colo exits with the shell's status.
	out, errOut, code := coloConsole(t, cfg, "echo pip''ed; exit 5\n", id)
	if code != 5 || !strings.Contains(out, "piped") {
		t.Errorf("colo console with a pipe: exit %d, stdout %q, stderr %q; want exit 5 and the output", code, out, errOut)
	}
	// Sessions one after the other: each gets a new shell.
	if out := run(0, "echo", "again"); out != "again\n" {
		t.Errorf("a later session: %q", out)
	}

	offCfg, err := cd.WriteColoConfig(t.Name()+"-off", "")
	if err != nil {
		t.Fatal(err)
	}
	startDetached(t, testbed.Runtime, off, []string{"--runtime-config-path", offCfg}, "sleep", "3600")
	out, errOut, code = coloConsole(t, offCfg, "", off, "--", "true")
	if code != 1 || !strings.Contains(errOut, "the debug console is off: set agent.debug_console = true in the colo config") {
		t.Errorf("colo console without the console: exit %d, stdout %q, stderr %q; want exit 1 and how to turn it on", code, out, errOut)
	}

	for _, c := range []string{id, off} {
		if r := ctr(t, "task", "kill", "-s", "KILL", c); r.ExitCode != 0 {
			t.Errorf("kill %s: %s", c, r)
		}
	}
}
