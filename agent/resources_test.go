package agent_test

import (
	"bytes"
	"context"
	"encoding/json"
	"testing"
	"time"

	v1 "github.com/containerd/cgroups/v3/cgroup1/stats"
	v2 "github.com/containerd/cgroups/v3/cgroup2/stats"
	"github.com/containerd/typeurl/v2"
	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/colo-runtime/colo/agentproto"
)

// TestStatsAndUpdate: a busy container's metrics come back as containerd's
// cgroup types with real values, and an update's memory limit shows in them.
func TestStatsAndUpdate(t *testing.T) {
	ctx := context.Background()
	a := startAgent(t)
	id := "stats"
	spec := newSpec(makeRootfs(t), id, "sh", "-c", "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; exec sleep 1000")
	a.createContainer(t, id, spec, &agentproto.CreateContainerRequest{})
	if _, err := a.StartContainer(ctx, &agentproto.StartContainerRequest{ContainerId: id}); err != nil {
		t.Fatal(err)
	}
	defer a.remove(t, id)
	time.Sleep(time.Second) // let the loop burn some CPU

	stats := func() (cpu, mem, limit, pids uint64) {
		t.Helper()
		resp, err := a.StatsContainer(ctx, &agentproto.StatsContainerRequest{ContainerId: id})
		if err != nil {
			t.Fatalf("StatsContainer: %v", err)
		}
		m, err := typeurl.UnmarshalAny(resp.Metrics)
		if err != nil {
			t.Fatalf("metrics %s: %v", resp.Metrics.GetTypeUrl(), err)
		}
		switch m := m.(type) {
		case *v1.Metrics:
			return m.CPU.Usage.Total, m.Memory.Usage.Usage, m.Memory.Usage.Limit, m.Pids.Current
		case *v2.Metrics:
			return m.CPU.UsageUsec, m.Memory.Usage, m.Memory.UsageLimit, m.Pids.Current
		default:
			t.Fatalf("metrics of type %T", m)
		}
		return
	}
	cpu, mem, _, pids := stats()
	if cpu == 0 || mem == 0 || pids == 0 {
		t.Errorf("cpu %d, memory %d, pids %d: want all non-zero", cpu, mem, pids)
	}

	limit := int64(64 << 20)
	b, err := json.Marshal(specs.LinuxResources{Memory: &specs.LinuxMemory{Limit: &limit}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := a.UpdateContainer(ctx, &agentproto.UpdateContainerRequest{ContainerId: id, Resources: b}); err != nil {
		t.Fatalf("UpdateContainer: %v", err)
	}
	if _, _, got, _ := stats(); got != uint64(limit) {
		t.Errorf("memory limit after update %d, want %d", got, limit)
	}
}

// TestOOM: a container over its memory limit is OOM-killed; GetOOMEvent
// names it and its wait says so.
func TestOOM(t *testing.T) {
	ctx := context.Background()
	a := startAgent(t)
	id := "oom"
	spec := newSpec(makeRootfs(t), id, "sh", "-c", "exec busybox tail /dev/zero")
	limit := int64(32 << 20)
	spec.Linux.Resources = &specs.LinuxResources{Memory: &specs.LinuxMemory{Limit: &limit}}
	a.createContainer(t, id, spec, &agentproto.CreateContainerRequest{})
	defer a.remove(t, id)
	if _, err := a.StartContainer(ctx, &agentproto.StartContainerRequest{ContainerId: id}); err != nil {
		t.Fatal(err)
	}
	evCtx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	ev, err := a.GetOOMEvent(evCtx, &agentproto.GetOOMEventRequest{})
	if err != nil || ev.ContainerId != id {
		t.Fatalf("GetOOMEvent = %v, %v; want %s", ev, err, id)
	}
	w, err := a.WaitProcess(ctx, &agentproto.WaitProcessRequest{ContainerId: id})
	if err != nil || w.ExitStatus != 137 || !w.OomKilled {
		t.Errorf("WaitProcess = %v, %v; want 137, OOM-killed", w, err)
	}
}

// TestTerminal: a process with a terminal gets a pty whose size follows
// TtyWinResize; stdin and the output both go through it.
func TestTerminal(t *testing.T) {
	ctx := context.Background()
	a := startAgent(t)
	id := "tty"
	spec := newSpec(makeRootfs(t), id, "sh", "-c", "tty; read x; busybox stty size; echo got:$x; exit 3")
	spec.Process.Terminal = true
	a.createContainer(t, id, spec, &agentproto.CreateContainerRequest{Stdin: true, Stdout: true, Terminal: true})
	defer a.remove(t, id)
	if _, err := a.StartContainer(ctx, &agentproto.StartContainerRequest{ContainerId: id}); err != nil {
		t.Fatal(err)
	}
	if _, err := a.TtyWinResize(ctx, &agentproto.TtyWinResizeRequest{ContainerId: id, Rows: 30, Columns: 100}); err != nil {
		t.Fatalf("TtyWinResize: %v", err)
	}
	if _, err := a.WriteStdin(ctx, &agentproto.WriteStreamRequest{ContainerId: id, Data: []byte("hello\n")}); err != nil {
		t.Fatalf("WriteStdin: %v", err)
	}
	var out []byte
	for {
		r, err := a.ReadStdout(ctx, &agentproto.ReadStreamRequest{ContainerId: id})
		if err != nil {
			t.Fatalf("ReadStdout: %v", err)
		}
		out = append(out, r.Data...)
		if r.Eof {
			break
		}
	}
	for _, want := range []string{"/dev/pts/", "30 100", "got:hello"} {
		if !bytes.Contains(out, []byte(want)) {
			t.Errorf("terminal output %q lacks %q", out, want)
		}
	}
	w, err := a.WaitProcess(ctx, &agentproto.WaitProcessRequest{ContainerId: id})
	if err != nil || w.ExitStatus != 3 {
		t.Errorf("WaitProcess = %v, %v; want 3", w, err)
	}
}
