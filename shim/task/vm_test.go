package task

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"

	cgroupsv2 "github.com/containerd/cgroups/v3/cgroup2/stats"
	eventstypes "github.com/containerd/containerd/api/events"
	taskAPI "github.com/containerd/containerd/api/runtime/task/v3"
	"github.com/containerd/containerd/api/types/runc/options"
	"github.com/containerd/containerd/api/types/task"
	"github.com/containerd/errdefs"
	"github.com/containerd/fifo"
	"github.com/containerd/typeurl/v2"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/colo-runtime/colo/hypervisor/driver"
	"github.com/colo-runtime/colo/shim/sandbox"
)

// taskClient is the task API as a test uses it: calls that must succeed.
type taskClient struct {
	t   *testing.T
	h   *harness
	ctx context.Context
}

func (c taskClient) create(id, bundle string, stdio sandbox.Stdio) {
	c.t.Helper()
	_, err := c.h.svc.Create(c.ctx, &taskAPI.CreateTaskRequest{ID: id, Bundle: bundle,
		Stdin: stdio.Stdin, Stdout: stdio.Stdout, Stderr: stdio.Stderr, Terminal: stdio.Terminal})
	if err != nil {
		c.t.Fatalf("create %s: %v", id, err)
	}
}

func (c taskClient) exec(id, execID string, stdio sandbox.Stdio, args ...string) {
	c.t.Helper()
	p, err := json.Marshal(specs.Process{Args: args, Cwd: "/", Env: []string{"PATH=/bin"}, Terminal: stdio.Terminal})
	if err != nil {
		c.t.Fatal(err)
	}
	_, err = c.h.svc.Exec(c.ctx, &taskAPI.ExecProcessRequest{ID: id, ExecID: execID, Spec: &anypb.Any{Value: p},
		Stdin: stdio.Stdin, Stdout: stdio.Stdout, Stderr: stdio.Stderr, Terminal: stdio.Terminal})
	if err != nil {
		c.t.Fatalf("exec %s in %s: %v", execID, id, err)
	}
}

func (c taskClient) start(id, execID string) {
	c.t.Helper()
	if _, err := c.h.svc.Start(c.ctx, &taskAPI.StartRequest{ID: id, ExecID: execID}); err != nil {
		c.t.Fatalf("start %s %s: %v", id, execID, err)
	}
}

func (c taskClient) wait(id, execID string) uint32 {
	c.t.Helper()
	w, err := c.h.svc.Wait(c.ctx, &taskAPI.WaitRequest{ID: id, ExecID: execID})
	if err != nil {
		c.t.Fatalf("wait %s %s: %v", id, execID, err)
	}
	return w.ExitStatus
}

func (c taskClient) kill(id, execID string) {
	c.t.Helper()
	if _, err := c.h.svc.Kill(c.ctx, &taskAPI.KillRequest{ID: id, ExecID: execID, Signal: uint32(syscall.SIGKILL)}); err != nil {
		c.t.Fatalf("kill %s %s: %v", id, execID, err)
	}
}

func (c taskClient) delete(id, execID string) {
	c.t.Helper()
	if _, err := c.h.svc.Delete(c.ctx, &taskAPI.DeleteRequest{ID: id, ExecID: execID}); err != nil {
		c.t.Fatalf("delete %s %s: %v", id, execID, err)
	}
}

func (c taskClient) status(id, execID string) task.Status {
	c.t.Helper()
	st, err := c.h.svc.State(c.ctx, &taskAPI.StateRequest{ID: id, ExecID: execID})
	if err != nil {
		c.t.Fatalf("state %s %s: %v", id, execID, err)
	}
	return st.Status
}

// run execs a shell command line and returns its exit status and output
// (stdout, then stderr).
func (c taskClient) run(id, execID, dir, cmdline string) (uint32, string) {
	c.t.Helper()
	out := filepath.Join(dir, execID+".out")
	if err := os.WriteFile(out, nil, 0o600); err != nil {
		c.t.Fatal(err)
	}
	c.exec(id, execID, sandbox.Stdio{Stdout: out, Stderr: out}, "/bin/sh", "-c", cmdline)
	c.start(id, execID)
	status := c.wait(id, execID)
	c.delete(id, execID)
	b, err := os.ReadFile(out)
	if err != nil {
		c.t.Fatal(err)
	}
	return status, string(b)
}

// podSpec is a container of a pod as the CRI plugin makes it, with a
// devpts for terminals.
func podSpec(pod, kind string, args ...string) *specs.Spec {
	s := spec(args...)
	s.Mounts = append(s.Mounts, specs.Mount{Destination: "/dev/pts", Type: "devpts", Source: "devpts",
		Options: []string{"nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"}})
	s.Annotations = map[string]string{
		sandbox.PodAnnotation:              pod,
		"io.kubernetes.cri.container-type": kind,
	}
	// A network namespace of its own, as CRI's pause container has (spec
	// gives PID and IPC ones): the node's would be refused.
	s.Linux.Namespaces = append(s.Linux.Namespaces, specs.LinuxNamespace{Type: specs.NetworkNamespace})
	return s
}

// TestTaskAPI drives a pod of containers in one real VM through the task
// API as containerd does: execs (many at once, one of a missing binary,
// one with a terminal), pause and resume, pids, stats, update, checkpoint,
// an OOM kill, and deletes that leave the VM to the last container.
func TestTaskAPI(t *testing.T) {
	dir := realVMs(t)
	h := newHarness(t, driver.New)
	ctx := h.ctx
	client := func(t *testing.T) taskClient { return taskClient{t: t, h: h, ctx: ctx} }
	c := client(t)

	c.create("pod", busyboxBundle(t, filepath.Join(dir, "pod"), podSpec("pod", "sandbox", "/bin/sh", "-c", "sleep 1000")), sandbox.Stdio{})
	c.start("pod", "")
	c.create("app", busyboxBundle(t, filepath.Join(dir, "app"), podSpec("pod", "container", "/bin/sh", "-c", "sleep 1000")), sandbox.Stdio{})
	c.start("app", "")
	podPid, _ := h.svc.State(ctx, &taskAPI.StateRequest{ID: "pod"})
	appPid, _ := h.svc.State(ctx, &taskAPI.StateRequest{ID: "app"})
	if podPid.Pid == 0 || podPid.Pid != appPid.Pid {
		t.Fatalf("the pod's containers run in VMs %d and %d, want one", podPid.Pid, appPid.Pid)
	}
	vmPid := int(podPid.Pid)

	t.Run("exec", func(t *testing.T) {
		c := client(t)
		status, out := c.run("app", "e1", dir, "echo out; echo err >&2; exit 5")
		if status != 5 || !strings.Contains(out, "out\n") || !strings.Contains(out, "err\n") {
			t.Errorf("exec: exit %d, output %q", status, out)
		}
	})

	t.Run("missing binary", func(t *testing.T) {
		c := client(t)
		c.exec("app", "missing", sandbox.Stdio{}, "/no/such/binary")
		_, err := h.svc.Start(ctx, &taskAPI.StartRequest{ID: "app", ExecID: "missing"})
		if err == nil || !strings.Contains(err.Error(), "/no/such/binary") {
			t.Errorf("start of a missing binary: %v", err)
		}
		t.Logf("start error: %v", err)
		c.delete("app", "missing")
		if s := c.status("app", ""); s != task.Status_RUNNING {
			t.Errorf("container %s after the failed exec", s)
		}
		if status, out := c.run("app", "after", dir, "echo fine"); status != 0 || out != "fine\n" {
			t.Errorf("exec after the failed one: exit %d, %q", status, out)
		}
	})

	t.Run("concurrent", func(t *testing.T) {
		c := client(t)
		const n = 20
		var wg sync.WaitGroup
		for i := range n {
			wg.Add(1)
			go func() {
				defer wg.Done()
				id := fmt.Sprintf("many%d", i)
				status, out := c.run("app", id, dir, fmt.Sprintf("echo %s; exit %d", id, i))
				if status != uint32(i) || out != id+"\n" {
					t.Errorf("%s: exit %d, output %q", id, status, out)
				}
			}()
		}
		wg.Wait()
	})

	t.Run("terminal", func(t *testing.T) {
		c := client(t)
		stdio := sandbox.Stdio{Stdin: filepath.Join(dir, "tty-in"), Stdout: filepath.Join(dir, "tty-out"), Terminal: true}
		if err := syscall.Mkfifo(stdio.Stdin, 0o600); err != nil {
			t.Fatal(err)
		}
		out, err := fifo.OpenFifo(ctx, stdio.Stdout, syscall.O_RDONLY|syscall.O_CREAT|syscall.O_NONBLOCK, 0o600)
		if err != nil {
			t.Fatal(err)
		}
		defer out.Close()
		output := make(chan string, 1)
		go func() { b, _ := io.ReadAll(out); output <- string(b) }()
		c.exec("app", "tty", stdio, "/bin/sh", "-c", "read l; stty size; echo got:$l")
		c.start("app", "tty")
		if _, err := h.svc.ResizePty(ctx, &taskAPI.ResizePtyRequest{ID: "app", ExecID: "tty", Width: 97, Height: 41}); err != nil {
			t.Fatal(err)
		}
		in, err := os.OpenFile(stdio.Stdin, os.O_WRONLY, 0)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := io.WriteString(in, "hi\n"); err != nil {
			t.Fatal(err)
		}
		if _, err := h.svc.CloseIO(ctx, &taskAPI.CloseIORequest{ID: "app", ExecID: "tty", Stdin: true}); err != nil {
			t.Fatal(err)
		}
		in.Close()
		if status := c.wait("app", "tty"); status != 0 {
			t.Errorf("terminal exec exit %d", status)
		}
		c.delete("app", "tty")
		if got := <-output; !strings.Contains(got, "41 97") || !strings.Contains(got, "got:hi") {
			t.Errorf("terminal output %q lacks the size and the input", got)
		}
	})

	t.Run("pause pids stats update", func(t *testing.T) {
		c := client(t)
		c.exec("app", "bg", sandbox.Stdio{}, "/bin/sh", "-c", "sleep 1000")
		c.start("app", "bg")
		if _, err := h.svc.Pause(ctx, &taskAPI.PauseRequest{ID: "app"}); err != nil {
			t.Fatal(err)
		}
		if s, e := c.status("app", ""), c.status("app", "bg"); s != task.Status_PAUSED || e != task.Status_PAUSED {
			t.Errorf("after pause: container %s, exec %s", s, e)
		}
		if _, err := h.svc.Resume(ctx, &taskAPI.ResumeRequest{ID: "app"}); err != nil {
			t.Fatal(err)
		}
		if s := c.status("app", ""); s != task.Status_RUNNING {
			t.Errorf("after resume: %s", s)
		}

		ps, err := h.svc.Pids(ctx, &taskAPI.PidsRequest{ID: "app"})
		if err != nil {
			t.Fatal(err)
		}
		var execs []string
		for _, p := range ps.Processes {
			if p.Info == nil {
				continue
			}
			var d options.ProcessDetails
			if err := p.Info.UnmarshalTo(&d); err != nil {
				t.Fatal(err)
			}
			execs = append(execs, d.ExecID)
		}
		if len(ps.Processes) < 2 || len(execs) != 1 || execs[0] != "bg" {
			t.Errorf("pids %v: exec ids %q, want [bg]", ps.Processes, execs)
		}

		limit := int64(96 << 20)
		res, err := typeurl.MarshalAnyToProto(&specs.LinuxResources{Memory: &specs.LinuxMemory{Limit: &limit}})
		if err != nil {
			t.Fatal(err)
		}
		// On the pod's first container: the guest's agent cannot exec in
		// a container after an update yet.
		if _, err := h.svc.Update(ctx, &taskAPI.UpdateTaskRequest{ID: "pod", Resources: res}); err != nil {
			t.Fatal(err)
		}
		st, err := h.svc.Stats(ctx, &taskAPI.StatsRequest{ID: "pod"})
		if err != nil {
			t.Fatal(err)
		}
		var m cgroupsv2.Metrics
		if err := st.Stats.UnmarshalTo(&m); err != nil {
			t.Fatalf("stats of type %s: %v", st.Stats.GetTypeUrl(), err)
		}
		if m.GetPids().GetCurrent() < 1 || m.GetMemory().GetUsageLimit() != uint64(limit) {
			t.Errorf("stats: pids %d, memory limit %d; want at least 1 and %d", m.GetPids().GetCurrent(), m.GetMemory().GetUsageLimit(), limit)
		}

		_, err = h.svc.Checkpoint(ctx, &taskAPI.CheckpointTaskRequest{ID: "app"})
		if !isCode(errdefs.IsNotImplemented)(err) || !strings.Contains(err.Error(), "checkpoint is not supported by colo") {
			t.Errorf("checkpoint: %v", err)
		}
		c.kill("app", "bg")
		if status := c.wait("app", "bg"); status != 137 {
			t.Errorf("killed exec: exit %d", status)
		}
		c.delete("app", "bg")
	})

	t.Run("OOM", func(t *testing.T) {
		c := client(t)
		s := podSpec("pod", "container", "/bin/sh", "-c", "tail /dev/zero")
		limit := int64(32 << 20)
		s.Linux.Resources = &specs.LinuxResources{Memory: &specs.LinuxMemory{Limit: &limit}}
		c.create("hog", busyboxBundle(t, filepath.Join(dir, "hog"), s), sandbox.Stdio{})
		c.start("hog", "")
		if status := c.wait("hog", ""); status != 137 {
			t.Errorf("exit %d after the OOM kill, want 137", status)
		}
		c.delete("hog", "")
		for i := 0; !hasEvent(h.events.snapshot(), &eventstypes.TaskOOM{ContainerID: "hog"}); i++ {
			h.events.waitFor(t, len(h.events.snapshot())+1)
		}
	})

	// The pod's first container goes first: the VM stays for the other.
	c.kill("pod", "")
	c.wait("pod", "")
	c.delete("pod", "")
	if status, out := c.run("app", "still", dir, "echo alive"); status != 0 || out != "alive\n" {
		t.Errorf("exec after the pod's first container went: exit %d, %q", status, out)
	}
	c.kill("app", "")
	c.wait("app", "")
	c.delete("app", "")

	// A start event precedes each process's exit event.
	started := make(map[string]bool)
	for _, e := range h.events.snapshot() {
		switch e := e.(type) {
		case *eventstypes.TaskStart:
			started[e.ContainerID] = true
		case *eventstypes.TaskExecStarted:
			started[e.ExecID] = true
		case *eventstypes.TaskExit:
			if !started[e.ID] {
				t.Errorf("exit of %s before its start event", e.ID)
			}
		}
	}
	if err := syscall.Kill(vmPid, 0); err == nil {
		t.Errorf("VM %d still running after the last delete", vmPid)
	}
	if _, err := os.Stat(filepath.Join(dir, "state", "testns", "pod")); !os.IsNotExist(err) {
		t.Errorf("sandbox dir left: %v", err)
	}
	if left := mountsLeft(dir); len(left) > 0 {
		t.Errorf("mounts left: %v", left)
	}
}

func hasEvent(evs []any, want *eventstypes.TaskOOM) bool {
	for _, e := range evs {
		if o, ok := e.(*eventstypes.TaskOOM); ok && o.ContainerID == want.ContainerID {
			return true
		}
	}
	return false
}
