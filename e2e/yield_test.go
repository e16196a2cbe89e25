package e2e

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/cgroups/v3"
	"github.com/containerd/cgroups/v3/cgroup1"
	"github.com/containerd/cgroups/v3/cgroup2"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	dto "github.com/prometheus/client_model/go"

	"github.com/colo-runtime/colo/testbed"
)

// hostCPUQuota is a host cgroup's CPU quota in microseconds a period, -1
// for none: cgroup v1 cpu.cfs_quota_us, or v2 cpu.max.
func hostCPUQuota(t *testing.T, cgroup string) int64 {
	t.Helper()
	for _, p := range []string{filepath.Join("/sys/fs/cgroup/cpu", cgroup, "cpu.cfs_quota_us"), filepath.Join("/sys/fs/cgroup", cgroup, "cpu.max")} {
		b, err := os.ReadFile(p)
		if err != nil {
			continue
		}
		q := strings.Fields(string(b))
		if len(q) > 0 && q[0] == "max" {
			return -1
		}
		n, err := strconv.ParseInt(q[0], 10, 64)
		if err != nil {
			t.Fatalf("%s: %q", p, b)
		}
		return n
	}
	t.Fatalf("no CPU quota for cgroup %s", cgroup)
	return 0
}

// hostLoad is busy-looping processes in a host cgroup of their own: online
// load, to the yield controller.
type hostLoad struct {
	cgroup string
	add    func(pid int) error
	remove func() error
	procs  []*exec.Cmd
}

// newHostLoad makes the load's cgroup; the test's clean-up stops the load
// and removes it.
func newHostLoad(t *testing.T) *hostLoad {
	t.Helper()
	l := &hostLoad{cgroup: fmt.Sprintf("/colo-e2e-yield-load-%d", os.Getpid())}
	if cgroups.Mode() == cgroups.Unified {
		g, err := cgroup2.NewManager("/sys/fs/cgroup", l.cgroup, &cgroup2.Resources{})
		if err != nil {
			t.Fatal(err)
		}
		l.add = func(pid int) error { return g.AddProc(uint64(pid)) }
		l.remove = g.Delete
	} else {
		g, err := cgroup1.New(cgroup1.StaticPath(l.cgroup), &specs.LinuxResources{})
		if err != nil {
			t.Fatal(err)
		}
		l.add = func(pid int) error { return g.AddProc(uint64(pid)) }
		l.remove = g.Delete
	}
	t.Cleanup(func() {
		l.stop()
		if err := l.remove(); err != nil {
			t.Errorf("remove the load's cgroup %s: %v", l.cgroup, err)
		}
	})
	return l
}

// start runs n busy loops.
func (l *hostLoad) start(t *testing.T, n int) {
	t.Helper()
	for range n {
		c := exec.Command("sh", "-c", "while :; do :; done")
		if err := c.Start(); err != nil {
			t.Fatal(err)
		}
		l.procs = append(l.procs, c)
		if err := l.add(c.Process.Pid); err != nil {
			t.Fatalf("busy loop %d into cgroup %s: %v", c.Process.Pid, l.cgroup, err)
		}
	}
}

// stop kills the busy loops and reaps them.
func (l *hostLoad) stop() {
	for _, c := range l.procs {
		c.Process.Kill()
		c.Wait()
	}
	l.procs = nil
}

// syncBuffer is a bytes.Buffer for a process's output that the test reads
// while it runs.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// TestYield: colo monitor with [yield] enabled lowers the CPU quota of a
// pod's offline vCPU (class low) on the host while busy loops on the host
// leave no room, lifts it (-1) once they stop, and lifts it again when the
// monitor exits with the load on; its decisions are in /metrics and its
// log. Everything it started and set is gone at the end.
func TestYield(t *testing.T) {
	const id = "colo-yield"
	checkNoLeaks(t, id)
	// vCPU 0 online (high), vCPU 1 offline (low): one vCPU thread of
	// offline, which the controller lets use all of a CPU when online
	// uses at most one of the two, and gives the floor when busy loops
	// take both. The monitor and the pod read the same file.
	cfg := coloConfig(t, "[colocation]\nvcpus = [\"high\", \"low\"]\n\n"+
		"[yield]\nenabled = true\ninterval = \"200ms\"\nheadroom_cpus = 0\nfloor_cpus = 0.1\nraise_after = 2\nraise_step_cpus = 1\n")
	startDetached(t, testbed.Runtime, id, []string{"--null-io", "--runtime-config-path", cfg}, "sleep", "3600")
	parent := "/" + cd.Namespace + "/" + id
	offline := parent + "/vcpu-low"
	if got := vcpuThreads(t, qemuIn(t, sandboxDir(cd.Namespace, id))); got[offline] != 1 || got[parent+"/vcpu-high"] != 1 {
		t.Fatalf("vCPU threads by cgroup %v, want one in %s and one in vcpu-high", got, offline)
	}
	if q := hostCPUQuota(t, offline); q != -1 {
		t.Fatalf("the offline cgroup has quota %d before the monitor runs", q)
	}
	load := newHostLoad(t)

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	sock := filepath.Join(t.TempDir(), "monitor.sock")
	var monOut syncBuffer
	mon := exec.CommandContext(ctx, "colo", "--config", cfg, "monitor", "--listen", sock)
	mon.Stdout, mon.Stderr = &monOut, &monOut
	if err := mon.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- mon.Wait() }()
	stopMonitor := func() error {
		mon.Process.Signal(syscall.SIGTERM)
		select {
		case err := <-exited:
			return err
		case <-time.After(time.Minute):
			mon.Process.Kill()
			<-exited
			return fmt.Errorf("colo monitor did not exit within a minute of SIGTERM")
		}
	}
	monitorStopped := false
	t.Cleanup(func() {
		if !monitorStopped {
			stopMonitor()
		}
		if t.Failed() {
			t.Logf("colo monitor's output:\n%s", testbed.Tail(monOut.String(), 100))
		}
	})

	client := &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", sock)
		},
	}}
	scrape := func() map[string]*dto.MetricFamily {
		t.Helper()
		for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(100 * time.Millisecond) {
			resp, err := client.Get("http://monitor/metrics")
			if err != nil {
				if time.Now().After(deadline) {
					t.Fatalf("scrape colo monitor: %v", err)
				}
				continue
			}
			body, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
			resp.Body.Close()
			if err != nil || resp.StatusCode != http.StatusOK {
				t.Fatalf("colo monitor: %s %v: %s", resp.Status, err, body)
			}
			return parseMetrics(t, string(body))
		}
	}
	// value is a series' value: the one with the label, or the first.
	value := func(families map[string]*dto.MetricFamily, name, key, want string) (float64, bool) {
		for _, m := range families[name].GetMetric() {
			if key == "" || label(m, key) == want {
				return m.GetGauge().GetValue() + m.GetCounter().GetValue(), true
			}
		}
		return 0, false
	}
	// waitQuota waits until the offline cgroup's quota is what ok wants.
	waitQuota := func(what string, ok func(q int64) bool) int64 {
		t.Helper()
		deadline := time.Now().Add(3 * time.Minute)
		for {
			q := hostCPUQuota(t, offline)
			if ok(q) {
				return q
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s: the offline cgroup's quota is %d after 3 minutes", what, q)
			}
			time.Sleep(200 * time.Millisecond)
		}
	}
	// Limited: more than nothing, less than the one CPU its one vCPU
	// thread could use.
	limited := func(q int64) bool { return q > 0 && q < 100000 }
	unlimited := func(q int64) bool { return q == -1 }

	// No load of ours: the monitor runs, and offline keeps (or gets
	// back, once other work on this machine leaves a CPU) no limit.
	waitQuota("no load", unlimited)

	load.start(t, 2)
	q := waitQuota("two busy loops on the host", limited)
	t.Logf("quota under load: %d us of %d", q, 100000)
	families := scrape()
	if v, ok := value(families, "colo_yield_offline_quota_cpus", "cgroup", offline); !ok || v <= 0 || v >= 1 {
		t.Errorf("colo_yield_offline_quota_cpus{cgroup=%q} = %v (listed %v), want a limit below 1 CPU", offline, v, ok)
	}
	if v, ok := value(families, "colo_yield_offline_quota_cpus", "sandbox_id", id); !ok || v <= 0 {
		t.Errorf("colo_yield_offline_quota_cpus{sandbox_id=%q} = %v (listed %v)", id, v, ok)
	}
	if v, _ := value(families, "colo_yield_decisions_total", "direction", "lower"); v < 1 {
		t.Errorf("lower decisions: %v, want 1 or more", v)
	}
	if v, ok := value(families, "colo_yield_online_cpus", "", ""); !ok || v <= 1 {
		t.Errorf("colo_yield_online_cpus = %v (listed %v) with two busy loops on two CPUs, want more than 1", v, ok)
	}
	if v, ok := value(families, "colo_monitor_sandbox_up", "sandbox_id", id); !ok || v != 1 {
		t.Errorf("the pod in the monitor's own series: up %v (listed %v)", v, ok)
	}

	load.stop()
	waitQuota("the busy loops stopped", unlimited)
	if v, _ := value(scrape(), "colo_yield_decisions_total", "direction", "release"); v < 1 {
		t.Errorf("release decisions: %v, want 1 or more", v)
	}

	// The monitor stops while offline is limited: it lifts the quota
	// before it exits.
	load.start(t, 2)
	waitQuota("two busy loops again", limited)
	monitorStopped = true
	if err := stopMonitor(); err != nil {
		t.Errorf("colo monitor: %v", err)
	}
	if q := hostCPUQuota(t, offline); q != -1 {
		t.Errorf("the offline cgroup's quota is %d after the monitor exited, want -1", q)
	}
	out := monOut.String()
	for _, want := range []string{"yield: lower the offline CPU limit", "yield: release the offline CPU limit", "yield: stopped, offline quotas lifted"} {
		if !strings.Contains(out, want) {
			t.Errorf("the monitor's log lacks %q", want)
		}
	}
	load.stop()

	killAndRemoveTask(t, id)
	if r := ctr(t, "container", "rm", id); r.ExitCode != 0 {
		t.Fatalf("container rm: %s", r)
	}
	if err := load.remove(); err != nil {
		t.Errorf("remove the load's cgroup: %v", err)
	}
	load.remove = func() error { return nil }
	for _, g := range []string{parent, load.cgroup} {
		dir := filepath.Join("/sys/fs/cgroup/cpu", g)
		if cgroups.Mode() == cgroups.Unified {
			dir = filepath.Join("/sys/fs/cgroup", g)
		}
		if _, err := os.Stat(dir); !os.IsNotExist(err) {
			t.Errorf("host cgroup %s left: %v", dir, err)
		}
	}
}
