package sandbox

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	cgroupsv2 "github.com/containerd/cgroups/v3/cgroup2/stats"
	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"
)

// running creates a sandbox whose container c1 runs until killed (the
// fake's "cat" without stdin), with exits going to e.exits.
func running(t *testing.T, e *env) (*Sandbox, *Container) {
	t.Helper()
	cc := e.container("cat")
	cc.Stdio = Stdio{}
	return started(t, e, cc)
}

// started creates a sandbox with the container and starts it; the sandbox
// goes when the test ends.
func started(t *testing.T, e *env, cc ContainerConfig) (*Sandbox, *Container) {
	t.Helper()
	ctx := context.Background()
	sb, c, err := Create(ctx, e.options(e.config("9p")), cc)
	if err != nil {
		t.Fatal(err)
	}
	shutdownAtEnd(t, sb)
	if err := c.Start(ctx, "", nil); err != nil {
		t.Fatal(err)
	}
	return sb, c
}

// shutdownAtEnd takes the sandbox down when the test ends, before env's
// cleanup checks that nothing is left.
func shutdownAtEnd(t *testing.T, sb *Sandbox) {
	t.Cleanup(func() {
		if err := sb.Shutdown(context.Background()); err != nil {
			t.Error(err)
		}
	})
}

func execSpec(exit int, args ...string) *specs.Process {
	return &specs.Process{Args: args, Cwd: "/", Env: []string{fmt.Sprintf("TEST_EXIT=%d", exit)}}
}

func TestExec(t *testing.T) {
	e := newEnv(t, false)
	ctx := context.Background()
	_, c := running(t, e)
	cs := openClientStdio(t, filepath.Join(filepath.Dir(e.bundle), "e1"), false)
	if err := c.Exec(ctx, "e1", execSpec(5, "echo", "hi"), cs.Stdio); err != nil {
		t.Fatal(err)
	}
	if err := c.Exec(ctx, "e1", execSpec(0, "true"), Stdio{}); !errdefs.IsAlreadyExists(err) {
		t.Errorf("second Exec e1: %v, want already exists", err)
	}
	if st, err := c.State("e1"); err != nil || st.Status != StatusCreated {
		t.Errorf("State before start = %+v, %v", st, err)
	}
	stdout, stderr := readAll(t, cs.stdout), readAll(t, cs.stderr)
	var started bool
	if err := c.Start(ctx, "e1", func() { started = true }); err != nil {
		t.Fatal(err)
	}
	x := waitExit(t, e.exits)
	if !started {
		t.Error("the start callback did not run before the exit was reported")
	}
	if x.ContainerID != "c1" || x.ExecID != "e1" || x.Status != 5 {
		t.Errorf("exit = %+v", x)
	}
	if out, errOut := <-stdout, <-stderr; out != "echo hi\n" || errOut != "err\n" {
		t.Errorf("stdout %q, stderr %q", out, errOut)
	}
	if st, err := c.Wait(ctx, "e1"); err != nil || st.Status != StatusStopped || st.ExitStatus != 5 {
		t.Errorf("Wait = %+v, %v", st, err)
	}
	if err := c.Kill(ctx, "e1", 9, false); !errdefs.IsNotFound(err) {
		t.Errorf("Kill after exit: %v, want not found", err)
	}
	if st, err := c.DeleteExec(ctx, "e1"); err != nil || st.ExitStatus != 5 {
		t.Errorf("DeleteExec = %+v, %v", st, err)
	}
	if !slices.Contains(e.drv.agent.callLog(), "RemoveProcess c1 e1") {
		t.Errorf("the guest was not told to remove the exec: %v", e.drv.agent.callLog())
	}
	if _, err := c.State("e1"); !errdefs.IsNotFound(err) {
		t.Errorf("State after delete: %v, want not found", err)
	}
	if st, _ := c.State(""); st.Status != StatusRunning {
		t.Errorf("container after the exec: %+v", st)
	}
}

func TestExecMissingBinary(t *testing.T) {
	e := newEnv(t, false)
	ctx := context.Background()
	_, c := running(t, e)
	if err := c.Exec(ctx, "bad", execSpec(0, "/no/such/binary"), Stdio{}); err != nil {
		t.Fatal(err)
	}
	err := c.Start(ctx, "bad", func() { t.Error("a failed start ran the start callback") })
	if !errdefs.IsNotFound(err) || !strings.Contains(err.Error(), "agent ExecProcess: exec: \"/no/such/binary\": stat /no/such/binary") {
		t.Errorf("Start = %v", err)
	}
	if st, err := c.Wait(ctx, "bad"); err != nil || st.Status != StatusStopped || st.ExitStatus != VMExitStatus {
		t.Errorf("Wait after the failed start = %+v, %v", st, err)
	}
	if _, err := c.DeleteExec(ctx, "bad"); err != nil {
		t.Fatal(err)
	}
	if slices.Contains(e.drv.agent.callLog(), "RemoveProcess c1 bad") {
		t.Error("RemoveProcess for an exec the guest never ran")
	}
	// The container and the sandbox go on.
	if err := c.Exec(ctx, "good", execSpec(0, "true"), Stdio{}); err != nil {
		t.Fatal(err)
	}
	if err := c.Start(ctx, "good", nil); err != nil {
		t.Fatal(err)
	}
	if x := waitExit(t, e.exits); x.ExecID != "good" || x.Status != 0 {
		t.Errorf("exit = %+v", x)
	}
	if st, _ := c.State(""); st.Status != StatusRunning {
		t.Errorf("container after the execs: %+v", st)
	}
}

func TestExecInStoppedContainer(t *testing.T) {
	e := newEnv(t, false)
	ctx := context.Background()
	sb, c, err := Create(ctx, e.options(e.config("9p")), e.container("true"))
	if err != nil {
		t.Fatal(err)
	}
	shutdownAtEnd(t, sb)
	readAll(t, e.stdout)
	readAll(t, e.stderr)
	if err := c.Start(ctx, "", nil); err != nil {
		t.Fatal(err)
	}
	waitExit(t, e.exits)
	if err := c.Exec(ctx, "late", execSpec(0, "true"), Stdio{}); !errdefs.IsFailedPrecondition(err) {
		t.Errorf("Exec in a stopped container: %v, want failed precondition", err)
	}
	if _, err := sb.DeleteContainer(ctx, "c1"); err != nil {
		t.Fatal(err)
	}
}

// TestConcurrentExecs starts 50 execs that the fake guest only lets start
// together: starts must not be serialized. Each start's callback runs
// before its exit is reported.
func TestConcurrentExecs(t *testing.T) {
	const n = 50
	e := newEnv(t, false)
	ctx := context.Background()
	var mu sync.Mutex
	events := make(map[string][]string)
	note := func(id, what string) {
		mu.Lock()
		defer mu.Unlock()
		events[id] = append(events[id], what)
	}
	exits := make(chan Exit, n)
	opts := e.options(e.config("9p"))
	opts.OnExit = func(x Exit) {
		note(x.ExecID, fmt.Sprintf("exit %d", x.Status))
		exits <- x
	}
	cc := e.container("cat")
	cc.Stdio = Stdio{}
	sb, c, err := Create(ctx, opts, cc)
	if err != nil {
		t.Fatal(err)
	}
	shutdownAtEnd(t, sb)
	if err := c.Start(ctx, "", func() { note("", "start") }); err != nil {
		t.Fatal(err)
	}
	e.drv.agent.locked(func(a *fakeAgent) { a.execBarrier = newBarrier(n) })
	// Serialized starts would wait at the barrier until this deadline.
	startCtx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	outDir := t.TempDir()
	var wg sync.WaitGroup
	for i := range n {
		id := fmt.Sprintf("e%d", i)
		out := filepath.Join(outDir, id)
		if err := os.WriteFile(out, nil, 0o600); err != nil {
			t.Fatal(err)
		}
		if err := c.Exec(ctx, id, execSpec(i, "echo", id), Stdio{Stdout: out}); err != nil {
			t.Fatal(err)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := c.Start(startCtx, id, func() { note(id, "start") }); err != nil {
				t.Errorf("start %s: %v", id, err)
			}
		}()
	}
	wg.Wait()
	for range n {
		waitExit(t, exits)
	}
	for i := range n {
		id := fmt.Sprintf("e%d", i)
		if got, want := events[id], []string{"start", fmt.Sprintf("exit %d", i)}; !slices.Equal(got, want) {
			t.Errorf("%s: events %q, want %q", id, got, want)
		}
		if b, err := os.ReadFile(filepath.Join(outDir, id)); err != nil || string(b) != "echo "+id+"\n" {
			t.Errorf("%s: output %q, %v", id, b, err)
		}
		if _, err := c.DeleteExec(ctx, id); err != nil {
			t.Error(err)
		}
	}
	if err := c.Kill(ctx, "", 9, false); err != nil {
		t.Fatal(err)
	}
	waitExit(t, exits)
	if _, err := sb.DeleteContainer(ctx, "c1"); err != nil {
		t.Fatal(err)
	}
}

// TestTerminal: a terminal process has stdin and stdout in the guest and no
// stderr, even when a stderr path is given; resizes reach the guest.
func TestTerminal(t *testing.T) {
	e := newEnv(t, true)
	ctx := context.Background()
	cc := e.container("cat")
	cc.Stdio.Terminal = true
	sb, c, err := Create(ctx, e.options(e.config("9p")), cc)
	if err != nil {
		t.Fatal(err)
	}
	shutdownAtEnd(t, sb)
	a := e.drv.agent
	var streams string
	var winSize [2]uint32
	a.locked(func(a *fakeAgent) { streams = a.streams[procKey{"c1", ""}] })
	if want := "stdin=true stdout=true stderr=false terminal=true"; streams != want {
		t.Errorf("init streams: %s, want %s", streams, want)
	}
	stdout := readAll(t, e.stdout)
	if err := c.Start(ctx, "", nil); err != nil {
		t.Fatal(err)
	}
	if err := c.ResizePty(ctx, "", 97, 41); err != nil {
		t.Fatal(err)
	}
	a.locked(func(a *fakeAgent) { winSize = a.winSizes[procKey{"c1", ""}] })
	if winSize != [2]uint32{41, 97} {
		t.Errorf("guest window size (rows, cols) = %v", winSize)
	}

	cs := openClientStdio(t, filepath.Join(filepath.Dir(e.bundle), "tty"), true)
	cs.Stdio.Terminal = true
	if err := c.Exec(ctx, "tty", &specs.Process{Args: []string{"cat"}, Cwd: "/", Terminal: true}, cs.Stdio); err != nil {
		t.Fatal(err)
	}
	execOut := readAll(t, cs.stdout)
	if err := c.Start(ctx, "tty", nil); err != nil {
		t.Fatal(err)
	}
	a.locked(func(a *fakeAgent) { streams = a.streams[procKey{"c1", "tty"}] })
	if want := "stdin=true stdout=true stderr=false terminal=true"; streams != want {
		t.Errorf("exec streams: %s, want %s", streams, want)
	}
	if err := c.ResizePty(ctx, "tty", 80, 24); err != nil {
		t.Fatal(err)
	}
	a.locked(func(a *fakeAgent) { winSize = a.winSizes[procKey{"c1", "tty"}] })
	if winSize != [2]uint32{24, 80} {
		t.Errorf("exec window size = %v", winSize)
	}
	write(t, cs.stdin, "typed")
	if err := c.CloseStdin(ctx, "tty"); err != nil {
		t.Fatal(err)
	}
	cs.stdin.Close()
	if x := waitExit(t, e.exits); x.ExecID != "tty" || x.Status != 0 {
		t.Errorf("exit = %+v", x)
	}
	if got := <-execOut; got != "typed" {
		t.Errorf("exec terminal output %q", got)
	}
	if _, err := c.DeleteExec(ctx, "tty"); err != nil {
		t.Fatal(err)
	}
	if err := c.Kill(ctx, "", 9, false); err != nil {
		t.Fatal(err)
	}
	waitExit(t, e.exits)
	<-stdout
	if _, err := sb.DeleteContainer(ctx, "c1"); err != nil {
		t.Fatal(err)
	}
}

// TestPauseResume: a paused container's processes report paused; resume
// sets the guest clock after thawing.
func TestPauseResume(t *testing.T) {
	e := newEnv(t, false)
	ctx := context.Background()
	_, c := running(t, e)
	a := e.drv.agent
	a.locked(func(a *fakeAgent) {
		if a.hostTime.IsZero() {
			t.Error("CreateSandbox carried no host time")
		}
	})
	if err := c.Exec(ctx, "x", execSpec(0, "cat"), Stdio{}); err != nil {
		t.Fatal(err)
	}
	if err := c.Start(ctx, "x", nil); err != nil {
		t.Fatal(err)
	}
	if err := c.Pause(ctx); err != nil {
		t.Fatal(err)
	}
	for _, id := range []string{"", "x"} {
		if st, _ := c.State(id); st.Status != StatusPaused {
			t.Errorf("process %q while paused: %s", id, st.Status)
		}
	}
	if err := c.Resume(ctx); err != nil {
		t.Fatal(err)
	}
	for _, id := range []string{"", "x"} {
		if st, _ := c.State(id); st.Status != StatusRunning {
			t.Errorf("process %q after resume: %s", id, st.Status)
		}
	}
	if got := a.callLog(); !slices.Equal(got, []string{"PauseContainer c1", "ResumeContainer c1"}) {
		t.Errorf("guest calls %q", got)
	}
	a.locked(func(a *fakeAgent) {
		if len(a.times) != 1 {
			t.Errorf("SetGuestTime calls after resume: %d, want 1", len(a.times))
		}
	})
	if err := c.Kill(ctx, "x", 9, false); err != nil {
		t.Fatal(err)
	}
	waitExit(t, e.exits)
}

func TestPidsStatsUpdate(t *testing.T) {
	e := newEnv(t, false)
	ctx := context.Background()
	_, c := running(t, e)
	if err := c.Exec(ctx, "x", execSpec(0, "cat"), Stdio{}); err != nil {
		t.Fatal(err)
	}
	if err := c.Start(ctx, "x", nil); err != nil {
		t.Fatal(err)
	}
	ps, err := c.Pids(ctx)
	if want := []GuestProcess{{Pid: 1}, {Pid: 2, ExecID: "x"}}; err != nil || !slices.Equal(ps, want) {
		t.Errorf("Pids = %v, %v; want %v", ps, err, want)
	}
	m, err := c.Stats(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var v2 cgroupsv2.Metrics
	if err := m.UnmarshalTo(&v2); err != nil || v2.GetPids().GetCurrent() != 2 {
		t.Errorf("stats %v: %v", m, err)
	}
	limit := int64(64 << 20)
	if err := c.Update(ctx, &specs.LinuxResources{Memory: &specs.LinuxMemory{Limit: &limit}}); err != nil {
		t.Fatal(err)
	}
	var res string
	e.drv.agent.locked(func(a *fakeAgent) { res = a.resources["c1"] })
	var got specs.LinuxResources
	if err := json.Unmarshal([]byte(res), &got); err != nil || got.Memory == nil || *got.Memory.Limit != limit {
		t.Errorf("resources in the guest: %s, %v", res, err)
	}
	if err := c.Kill(ctx, "x", 9, false); err != nil {
		t.Fatal(err)
	}
	waitExit(t, e.exits)
}

func TestOOMEvents(t *testing.T) {
	e := newEnv(t, false)
	ooms := make(chan string, 1)
	opts := e.options(e.config("9p"))
	opts.OnOOM = func(id string) { ooms <- id }
	cc := e.container("cat")
	cc.Stdio = Stdio{}
	sb, _, err := Create(context.Background(), opts, cc)
	if err != nil {
		t.Fatal(err)
	}
	shutdownAtEnd(t, sb)
	e.drv.agent.oomEvents <- "c1"
	select {
	case id := <-ooms:
		if id != "c1" {
			t.Errorf("OOM event for %q", id)
		}
	case <-time.After(30 * time.Second):
		t.Error("no OOM event")
	}
	if _, err := sb.DeleteContainer(context.Background(), "c1"); err != nil {
		t.Fatal(err)
	}
}

// TestLogURIs: file:// appends both streams to a file; binary:// and
// binary-v2:// hand them to a logging binary as the runc shim does.
func TestLogURIs(t *testing.T) {
	dir := t.TempDir()
	// A logger that copies fd 3 and 4 to BASE.out and BASE.err and records
	// its arguments and environment; binary-v2 also writes a ready byte.
	script := func(name, ready string) string {
		p := filepath.Join(dir, name)
		text := "#!/bin/sh\ntrap '' TERM\n/bin/cat <&3 >\"$2.out\" 5>&- &\n/bin/cat <&4 >\"$2.err\" 5>&- &\n" + ready +
			"exec 5>&-\nwait\necho \"$# $1 $CONTAINER_ID $CONTAINER_NAMESPACE $HOME\" >\"$2.env\"\n"
		if err := os.WriteFile(p, []byte(text), 0o755); err != nil {
			t.Fatal(err)
		}
		return p
	}
	v1, v2 := script("logger", ""), script("logger-v2", "printf x >&5\n")
	for _, tc := range []struct {
		name, uri string
		files     map[string]string
	}{
		{"file", "file://" + dir + "/f.log", map[string]string{"f.log": "echo hello\nerr\n"}},
		{"binary", "binary://" + v1 + "?out=" + dir + "/b", map[string]string{
			"b.out": "echo hello\n", "b.err": "err\n", "b.env": "2 out c1 testns \n"}},
		{"binary-v2", "binary-v2://" + v2 + "?out=" + dir + "/v2", map[string]string{
			"v2.out": "echo hello\n", "v2.err": "err\n", "v2.env": "2 out c1 testns \n"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t, false)
			ctx := context.Background()
			cc := e.container("echo", "hello")
			cc.Stdio = Stdio{Stdout: tc.uri, Stderr: tc.uri}
			sb, _ := started(t, e, cc)
			waitExit(t, e.exits)
			// The delete waits for a logger to finish.
			if _, err := sb.DeleteContainer(ctx, "c1"); err != nil {
				t.Fatal(err)
			}
			// Lines in any order: stdout and stderr share file://.
			lines := func(s string) []string {
				l := strings.SplitAfter(s, "\n")
				slices.Sort(l)
				return l
			}
			for name, want := range tc.files {
				b, err := os.ReadFile(filepath.Join(dir, name))
				if err != nil || !slices.Equal(lines(string(b)), lines(want)) {
					t.Errorf("%s = %q, %v; want %q", name, b, err, want)
				}
			}
		})
	}
	t.Run("binary-v2 not ready", func(t *testing.T) {
		e := newEnv(t, false)
		cc := e.container("echo", "hello")
		cc.Stdio = Stdio{Stdout: "binary-v2://" + v1 + "?out=" + dir + "/bad"}
		_, _, err := Create(context.Background(), e.options(e.config("9p")), cc)
		if err == nil || !strings.Contains(err.Error(), "closed its ready pipe without writing a byte") {
			t.Errorf("Create = %v", err)
		}
	})
}

// TestPod: a second container in a running sandbox shares its VM and
// shared directory; deleting the first leaves the VM to the second and
// hands it the sandbox's record, so that `shim delete` in the first one's
// bundle (containerd runs it after every task delete) leaves the VM alone.
func TestPod(t *testing.T) {
	e := newEnv(t, false)
	ctx := context.Background()
	_, c1 := running(t, e)
	sb := c1.sb
	bundle2 := filepath.Join(filepath.Dir(e.bundle), "bundle2")
	if err := os.MkdirAll(filepath.Join(bundle2, "rootfs"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(bundle2, "rootfs", "second"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	cc2 := ContainerConfig{ID: "c2", Bundle: bundle2, Spec: testSpec("cat")}
	c2, err := sb.AddContainer(ctx, cc2)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := sb.AddContainer(ctx, cc2); !errdefs.IsAlreadyExists(err) {
		t.Errorf("adding c2 again: %v, want already exists", err)
	}
	if _, err := os.Stat(filepath.Join(sb.Dir(), "shared", "c2", "rootfs", "second")); err != nil {
		t.Errorf("c2's rootfs is not in the shared directory: %v", err)
	}
	if err := c2.Start(ctx, "", nil); err != nil {
		t.Fatal(err)
	}
	if len(e.drv.vms) != 1 {
		t.Errorf("%d VMs for one pod", len(e.drv.vms))
	}

	if err := c1.Kill(ctx, "", 9, false); err != nil {
		t.Fatal(err)
	}
	waitExit(t, e.exits)
	if _, err := sb.DeleteContainer(ctx, "c1"); err != nil {
		t.Fatal(err)
	}
	if !sb.alive() {
		t.Fatal("deleting one of two containers stopped the VM")
	}
	if _, err := os.Stat(filepath.Join(sb.Dir(), "shared", "c1")); !os.IsNotExist(err) {
		t.Errorf("c1's rootfs left in the shared directory: %v", err)
	}
	if dir, err := ReadBundleFile(e.bundle); err != nil || dir != "" {
		t.Errorf("the deleted container's bundle still names the sandbox: %q, %v", dir, err)
	}
	if dir, err := ReadBundleFile(bundle2); err != nil || dir != sb.Dir() {
		t.Errorf("the remaining container's bundle names %q, %v; want %s", dir, err, sb.Dir())
	}

	if err := c2.Kill(ctx, "", 9, false); err != nil {
		t.Fatal(err)
	}
	waitExit(t, e.exits)
	if _, err := sb.DeleteContainer(ctx, "c2"); err != nil {
		t.Fatal(err)
	}
	if sb.alive() {
		t.Error("the VM outlived its last container")
	}
	if _, err := os.Stat(filepath.Join(bundle2, BundleFile)); !os.IsNotExist(err) {
		t.Errorf("bundle file left in the last container's bundle: %v", err)
	}
}
