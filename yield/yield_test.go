package yield

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"math"
	"path"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"

	"github.com/colo-runtime/colo/config"
)

// node is a fake host: its CPUs, the online load on them, and the offline
// cgroups, each of which uses all its quota lets it (offline work is CPU
// hungry). It is the Lister, Source and Setter of the controller under
// test; the clock moves one second a step.
type node struct {
	mu        sync.Mutex
	cpus      int
	online    float64
	busy, all uint64 // nanoseconds of CPU time
	now       time.Time
	sandboxes []Sandbox
	groups    map[string]*fakeGroup
	// failures to give, by operation ("list", "host", "usage",
	// "quota", "set") and cgroup ("" for list and host).
	fail   map[string]error
	writes []string
}

type fakeGroup struct {
	threads int
	// idle: its threads use nothing.
	idle  bool
	usage time.Duration
	quota Quota
}

func newNode(cpus int) *node {
	return &node{cpus: cpus, now: time.Unix(1000, 0), groups: map[string]*fakeGroup{}, fail: map[string]error{}}
}

// addSandbox makes a sandbox with a cgroup vcpu-<class> for each class,
// of as many threads as given.
func (n *node) addSandbox(id string, threads map[string]int) {
	n.mu.Lock()
	defer n.mu.Unlock()
	cg := "/pods/" + id
	n.sandboxes = append(n.sandboxes, Sandbox{ID: id, Cgroup: cg})
	for class, t := range threads {
		n.groups[path.Join(cg, "vcpu-"+class)] = &fakeGroup{threads: t, quota: Unlimited}
	}
}

// removeSandbox drops the record, and the cgroups unless keepCgroups.
func (n *node) removeSandbox(id string, keepCgroups bool) {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.sandboxes = slices.DeleteFunc(n.sandboxes, func(s Sandbox) bool { return s.ID == id })
	if keepCgroups {
		return
	}
	for p := range n.groups {
		if strings.HasPrefix(p, "/pods/"+id+"/") {
			delete(n.groups, p)
		}
	}
}

// step lets one second pass under the online load.
func (n *node) step(online float64) {
	n.mu.Lock()
	defer n.mu.Unlock()
	offline := 0.0
	for _, g := range n.groups {
		if g.idle {
			continue
		}
		use := float64(g.threads)
		if q := g.quota.CPUs(); q >= 0 {
			use = min(use, q)
		}
		g.usage += time.Duration(use * 1e9)
		offline += use
	}
	n.online = online
	n.all += uint64(n.cpus) * 1e9
	n.busy += uint64((online + offline) * 1e9)
	n.now = n.now.Add(time.Second)
}

func (n *node) clock() time.Time {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.now
}

func (n *node) list(ctx context.Context) ([]Sandbox, error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if err := n.fail["list"]; err != nil {
		return nil, err
	}
	return slices.Clone(n.sandboxes), nil
}

func (n *node) Host(ctx context.Context) (HostCPU, error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if err := n.fail["host"]; err != nil {
		return HostCPU{}, err
	}
	return HostCPU{CPUs: n.cpus, Busy: n.busy, Total: n.all}, nil
}

func (n *node) group(op, p string) (*fakeGroup, error) {
	if err := n.fail[op+p]; err != nil {
		return nil, err
	}
	g, ok := n.groups[p]
	if !ok {
		return nil, fmt.Errorf("cgroup %s: %w", p, fs.ErrNotExist)
	}
	return g, nil
}

func (n *node) Cgroup(ctx context.Context, p string) (CgroupCPU, error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	g, err := n.group("usage", p)
	if err != nil {
		return CgroupCPU{}, err
	}
	return CgroupCPU{Usage: g.usage, Threads: g.threads}, nil
}

func (n *node) Quota(ctx context.Context, p string) (Quota, error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	g, err := n.group("quota", p)
	if err != nil {
		return Quota{}, err
	}
	return g.quota, nil
}

func (n *node) SetQuota(ctx context.Context, p string, q Quota) error {
	n.mu.Lock()
	defer n.mu.Unlock()
	g, err := n.group("set", p)
	if err != nil {
		return err
	}
	g.quota = q
	n.writes = append(n.writes, p+"="+q.String())
	return nil
}

// quotaOf is the fake cgroup's quota in CPUs, -1 unlimited, -2 gone.
func (n *node) quotaOf(p string) float64 {
	n.mu.Lock()
	defer n.mu.Unlock()
	g, ok := n.groups[p]
	if !ok {
		return -2
	}
	return g.quota.CPUs()
}

func testConfig() config.Yield {
	c := config.Default().Yield
	c.Enabled = true
	c.HeadroomCPUs = 1
	c.FloorCPUs = 0.1
	c.RaiseAfter = 3
	c.RaiseStepCPUs = 1
	return c
}

func newController(t *testing.T, n *node, cfg config.Yield) *Controller {
	t.Helper()
	c, err := New(cfg, n.list, n, n)
	if err != nil {
		t.Fatal(err)
	}
	c.now = n.clock
	return c
}

const (
	groupA = "/pods/a/vcpu-low"
	groupB = "/pods/b/vcpu-low"
)

// twoPods is an 8-CPU node with an offline cgroup of 2 vCPU threads (a)
// and one of 1 (b): 3 CPUs of offline capacity. Pod a's high vCPU (idle)
// is not offline.
func twoPods() *node {
	n := newNode(8)
	n.addSandbox("a", map[string]int{"low": 2, "high": 1})
	n.addSandbox("b", map[string]int{"low": 1})
	n.groups["/pods/a/vcpu-high"].idle = true
	return n
}

// near compares CPUs; quotas are whole microseconds of a 100 ms period.
func near(a, b float64) bool { return math.Abs(a-b) < 1e-5 }

// TestDecisions runs the controller through sequences of online loads on
// twoPods (headroom 1, so allowance = 7 - online), checking the limit
// after each interval.
func TestDecisions(t *testing.T) {
	type step struct {
		online float64
		limit  float64 // -1: none
	}
	tests := []struct {
		name      string
		steps     []step
		decisions map[string]float64
	}{
		{
			name:      "no pressure, no limit",
			steps:     []step{{0, -1}, {0, -1}, {3.9, -1}, {3.9, -1}},
			decisions: map[string]float64{Lower: 0, Raise: 0, Release: 0},
		},
		{
			name: "lowers at once",
			// The first interval only samples.
			steps:     []step{{6.5, -1}, {6.5, 0.5}, {6.0, 0.5}, {6.9, 0.1 * 2}},
			decisions: map[string]float64{Lower: 2},
		},
		{
			name: "raises after raise_after intervals, by a step, then releases",
			steps: []step{{0, -1}, {6.5, 0.5},
				{0, 0.5}, {0, 0.5}, {0, 1.5}, {0, 2.5}, {0, -1}, {0, -1}},
			decisions: map[string]float64{Lower: 1, Raise: 2, Release: 1},
		},
		{
			name: "raises no further than the allowance",
			steps: []step{{0, -1}, {6.5, 0.5},
				{5.2, 0.5}, {5.2, 0.5}, {5.2, 1.5}, {5.2, 1.8}, {5.2, 1.8}},
			decisions: map[string]float64{Lower: 1, Raise: 2},
		},
		{
			name: "holds within the band, and a dip starts the count again",
			steps: []step{{0, -1}, {6.5, 0.5},
				{6.47, 0.5}, {6.53, 0.5},
				{0, 0.5}, {0, 0.5}, {6.47, 0.5}, {0, 0.5}, {0, 0.5}, {0, 1.5}},
			decisions: map[string]float64{Lower: 1, Raise: 1},
		},
		{
			name: "lowers at once while raising",
			steps: []step{{0, -1}, {6.5, 0.5},
				{0, 0.5}, {0, 0.5}, {0, 1.5}, {6, 1}, {0, 1}, {0, 1}, {0, 2}},
			decisions: map[string]float64{Lower: 2, Raise: 2},
		},
		{
			name: "never below the floors",
			// Two offline cgroups: 0.2 CPUs at least.
			steps:     []step{{0, -1}, {8, 0.2}, {20, 0.2}, {8, 0.2}},
			decisions: map[string]float64{Lower: 1},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			n := twoPods()
			c := newController(t, n, testConfig())
			ctx := context.Background()
			for i, s := range tt.steps {
				n.step(s.online)
				c.tick(ctx)
				if !near(c.limit, s.limit) {
					t.Fatalf("step %d (online %v): limit %v, want %v", i, s.online, c.limit, s.limit)
				}
				// Each cgroup has its share by threads, at least
				// the floor, or no limit with none.
				for p, threads := range map[string]float64{groupA: 2, groupB: 1} {
					want := -1.0
					if s.limit >= 0 {
						want = max(0.1, s.limit*threads/3)
					}
					if got := n.quotaOf(p); math.Abs(got-want) > 1e-5 {
						t.Fatalf("step %d: %s quota %v CPUs, want %v", i, p, got, want)
					}
				}
				if got := n.quotaOf("/pods/a/vcpu-high"); got != -1 {
					t.Fatalf("step %d: the online class got quota %v", i, got)
				}
			}
			for d, want := range tt.decisions {
				if got := counter(t, c, "colo_yield_decisions_total", "direction", d); got != want {
					t.Errorf("%s decisions: %v, want %v", d, got, want)
				}
			}
			if errs := sumFamily(t, c, "colo_yield_errors_total"); errs != 0 {
				t.Errorf("%v errors", errs)
			}
		})
	}
}

// TestRestore: stopping lifts every quota the controller set, and only
// those: a cgroup it never limited is not written.
func TestRestore(t *testing.T) {
	n := twoPods()
	c := newController(t, n, testConfig())
	ctx := context.Background()
	for _, online := range []float64{0, 6.5} {
		n.step(online)
		c.tick(ctx)
	}
	if n.quotaOf(groupA) < 0 || n.quotaOf(groupB) < 0 {
		t.Fatalf("not limited: %v %v", n.quotaOf(groupA), n.quotaOf(groupB))
	}
	n.writes = nil
	c.restore(ctx)
	for _, p := range []string{groupA, groupB, "/pods/a/vcpu-high"} {
		if q := n.quotaOf(p); q != -1 {
			t.Errorf("%s: quota %v CPUs after restore, want none", p, q)
		}
	}
	if want := []string{groupA + "=max", groupB + "=max"}; !slices.Equal(n.writes, want) {
		t.Errorf("writes %q, want %q", n.writes, want)
	}
	if g := gauges(t, c, "colo_yield_offline_quota_cpus"); len(g) != 0 {
		t.Errorf("quota series left after restore: %v", g)
	}
}

// TestRun: Run ticks until its context ends, then restores; it returns
// within a bounded wait.
func TestRun(t *testing.T) {
	n := twoPods()
	n.step(7) // allowance 0 from the first delta on
	cfg := testConfig()
	cfg.Interval = config.Duration(time.Millisecond)
	c := newController(t, n, cfg)
	// Each tick sees one more second of load.
	c.now = func() time.Time { n.step(7); return n.clock() }
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { c.Run(ctx); close(done) }()
	deadline := time.Now().Add(10 * time.Second)
	for n.quotaOf(groupA) < 0 {
		if time.Now().After(deadline) {
			t.Fatal("Run did not lower the quota")
		}
		time.Sleep(time.Millisecond)
	}
	cancel()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("Run did not return")
	}
	if n.quotaOf(groupA) != -1 || n.quotaOf(groupB) != -1 {
		t.Errorf("quotas %v %v after Run, want none", n.quotaOf(groupA), n.quotaOf(groupB))
	}
}

// TestSandboxes: sandboxes come and go between intervals.
func TestSandboxes(t *testing.T) {
	ctx := context.Background()
	limited := func(t *testing.T) (*node, *Controller) {
		n := twoPods()
		c := newController(t, n, testConfig())
		for _, online := range []float64{0, 6.5} {
			n.step(online)
			c.tick(ctx)
		}
		return n, c
	}
	t.Run("a sandbox disappears", func(t *testing.T) {
		n, c := limited(t)
		n.removeSandbox("b", false)
		n.step(6.5)
		c.tick(ctx)
		// a alone has the limit now.
		if got := n.quotaOf(groupA); !near(got, 0.5) {
			t.Errorf("a's quota %v, want all of the 0.5 limit", got)
		}
		if g := gauges(t, c, "colo_yield_offline_quota_cpus"); len(g) != 1 || g[groupA] == 0 {
			t.Errorf("quota series %v, want a's only", g)
		}
		if errs := sumFamily(t, c, "colo_yield_errors_total"); errs != 0 {
			t.Errorf("%v errors for a sandbox that went", errs)
		}
	})
	t.Run("a record goes before its cgroup", func(t *testing.T) {
		n, c := limited(t)
		n.removeSandbox("b", true)
		n.step(6.5)
		c.tick(ctx)
		if got := n.quotaOf(groupB); got != -1 {
			t.Errorf("b's quota %v, want lifted", got)
		}
	})
	t.Run("a cgroup goes under the controller", func(t *testing.T) {
		n, c := limited(t)
		// Listed, but its cgroups went between the usage read and
		// the write.
		n.fail["set"+groupB] = fmt.Errorf("cgroup %s: %w", groupB, fs.ErrNotExist)
		n.step(7.5)
		c.tick(ctx)
		if !near(c.limit, 0.2) || !near(n.quotaOf(groupA), 0.2*2/3) {
			t.Errorf("limit %v, a's quota %v: want a lowered regardless", c.limit, n.quotaOf(groupA))
		}
		if errs := sumFamily(t, c, "colo_yield_errors_total"); errs != 0 {
			t.Errorf("%v errors for a cgroup that went", errs)
		}
	})
	t.Run("a sandbox appears", func(t *testing.T) {
		n, c := limited(t)
		n.addSandbox("c", map[string]int{"low": 1})
		// Room for a raise, but c is not measured yet: its share of
		// the same limit, and no raise.
		for range 2 {
			n.step(5)
			c.tick(ctx)
			if got := n.quotaOf("/pods/c/vcpu-low"); !near(got, 0.125) || !near(c.limit, 0.5) {
				t.Errorf("c's quota %v, limit %v: want 0.5/4 of 0.5", got, c.limit)
			}
		}
	})
	t.Run("a sandbox without a cgroup", func(t *testing.T) {
		n := newNode(2)
		n.sandboxes = []Sandbox{{ID: "bare"}, {ID: "escape", Cgroup: "/pods/../../x"}}
		c := newController(t, n, testConfig())
		n.step(2)
		c.tick(ctx)
		n.step(2)
		c.tick(ctx)
		if len(n.writes) != 0 || len(c.groups) != 0 {
			t.Errorf("writes %q, groups %v", n.writes, c.groups)
		}
	})
	t.Run("a quota left by a killed controller", func(t *testing.T) {
		n := twoPods()
		n.groups[groupA].quota = Quota{Quota: 10000, Period: Period}
		c := newController(t, n, testConfig())
		n.step(0)
		c.tick(ctx)
		if got := n.quotaOf(groupA); got != -1 {
			t.Errorf("a's stale quota %v, want lifted", got)
		}
	})
}

// TestFailures: a failed read or write is counted and logged, the rest
// goes on, and it is tried again at the next interval.
func TestFailures(t *testing.T) {
	ctx := context.Background()
	boom := errors.New("boom")
	tests := []struct {
		name, key, op string
		// check after the failing interval
		check func(n *node, c *Controller) error
	}{
		{"list", "list", opList, func(n *node, c *Controller) error {
			if !near(c.limit, 0.5) || n.quotaOf(groupA) < 0 {
				return fmt.Errorf("limit %v, a's quota %v: want both kept", c.limit, n.quotaOf(groupA))
			}
			return nil
		}},
		{"host", "host", opHost, func(n *node, c *Controller) error {
			if !near(c.limit, 0.5) {
				return fmt.Errorf("limit %v: want it held without a measure", c.limit)
			}
			return nil
		}},
		{"usage", "usage" + groupB, opUsage, func(n *node, c *Controller) error {
			if !near(c.limit, 0.5) || n.quotaOf(groupB) < 0 {
				return fmt.Errorf("limit %v, b's quota %v: want no raise, b kept", c.limit, n.quotaOf(groupB))
			}
			return nil
		}},
		{"set", "set" + groupA, opQuota, func(n *node, c *Controller) error {
			if !near(n.quotaOf(groupB), 0.2/3) && !near(n.quotaOf(groupB), 0.1) {
				return fmt.Errorf("b's quota %v: want b lowered regardless", n.quotaOf(groupB))
			}
			return nil
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			n := twoPods()
			c := newController(t, n, testConfig())
			for _, online := range []float64{0, 6.5} {
				n.step(online)
				c.tick(ctx)
			}
			n.fail[tt.key] = boom
			// Room for a raise (list, host, usage), or a lower (set).
			online := 0.0
			if tt.op == opQuota {
				online = 7.5
			}
			for range 3 {
				n.step(online)
				c.tick(ctx)
			}
			if err := tt.check(n, c); err != nil {
				t.Error(err)
			}
			if got := counter(t, c, "colo_yield_errors_total", "op", tt.op); got != 3 {
				t.Errorf("%s errors: %v, want 3", tt.op, got)
			}
			delete(n.fail, tt.key)
			n.step(online)
			c.tick(ctx)
			if tt.op == opQuota && !near(n.quotaOf(groupA), 0.2*2/3) {
				t.Errorf("a's quota %v after the write works again, want %v", n.quotaOf(groupA), 0.2*2/3)
			}
		})
	}
}

func TestNewRefuses(t *testing.T) {
	n := newNode(2)
	for _, tt := range []struct {
		name   string
		change func(*config.Yield)
	}{
		{"interval", func(c *config.Yield) { c.Interval = 0 }},
		{"floor", func(c *config.Yield) { c.FloorCPUs = 0 }},
		{"raise after", func(c *config.Yield) { c.RaiseAfter = 0 }},
		{"step", func(c *config.Yield) { c.RaiseStepCPUs = 0 }},
		{"classes", func(c *config.Yield) { c.OfflineClasses = nil }},
	} {
		cfg := testConfig()
		tt.change(&cfg)
		if _, err := New(cfg, n.list, n, n); err == nil {
			t.Errorf("%s: no error", tt.name)
		}
	}
}

// TestMetrics: the gauges say what the last interval measured and set.
func TestMetrics(t *testing.T) {
	n := twoPods()
	c := newController(t, n, testConfig())
	for _, online := range []float64{0, 6.5} {
		n.step(online)
		c.tick(context.Background())
	}
	for name, want := range map[string]float64{
		"colo_yield_online_cpus":    6.5,
		"colo_yield_offline_cpus":   3,
		"colo_yield_allowance_cpus": 0.5,
		"colo_yield_limit_cpus":     0.5,
	} {
		if got := gauges(t, c, name)[""]; !near(got, want) {
			t.Errorf("%s = %v, want %v", name, got, want)
		}
	}
	q := gauges(t, c, "colo_yield_offline_quota_cpus")
	if math.Abs(q[groupA]-0.5*2/3) > 1e-4 || math.Abs(q[groupB]-0.5/3) > 1e-4 {
		t.Errorf("quota series %v", q)
	}
}

// family returns a gathered family by name.
func family(t *testing.T, c *Controller, name string) *dto.MetricFamily {
	t.Helper()
	fams, err := c.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range fams {
		if f.GetName() == name {
			return f
		}
	}
	return nil
}

func counter(t *testing.T, c *Controller, name, label, value string) float64 {
	t.Helper()
	for _, m := range family(t, c, name).GetMetric() {
		for _, l := range m.GetLabel() {
			if l.GetName() == label && l.GetValue() == value {
				return m.GetCounter().GetValue()
			}
		}
	}
	return -1
}

func sumFamily(t *testing.T, c *Controller, name string) float64 {
	t.Helper()
	sum := 0.0
	for _, m := range family(t, c, name).GetMetric() {
		sum += m.GetCounter().GetValue()
	}
	return sum
}

// gauges are a gauge family's values by their cgroup label ("" without).
func gauges(t *testing.T, c *Controller, name string) map[string]float64 {
	t.Helper()
	out := map[string]float64{}
	for _, m := range family(t, c, name).GetMetric() {
		key := ""
		for _, l := range m.GetLabel() {
			if l.GetName() == "cgroup" {
				key = l.GetValue()
			}
		}
		out[key] = m.GetGauge().GetValue()
	}
	return out
}

// TestCall: a call that does not return in time is given up on, with an
// error that says so; one that does passes its answer on.
func TestCall(t *testing.T) {
	release := make(chan struct{})
	defer close(release)
	_, err := call(context.Background(), 10*time.Millisecond, func(ctx context.Context) (int, error) { <-release; return 1, nil })
	if !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), "no answer within 10ms") {
		t.Errorf("a hung call: %v, want the deadline", err)
	}
	v, err := call(context.Background(), time.Minute, func(ctx context.Context) (int, error) { return 7, nil })
	if v != 7 || err != nil {
		t.Errorf("a call that answers: %v, %v", v, err)
	}
}
