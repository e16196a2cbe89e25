// Package yield makes offline work yield the host's CPU to online work, in
// the spirit of Koordinator's CPU suppression of BestEffort pods: a node's
// controller watches the CPU that everything but the offline vCPUs uses,
// and lowers the CPU quota (CFS bandwidth) of the offline vCPUs' host
// cgroups so that a configured headroom stays free; when online load
// falls, it raises the quota again, and lifts it once there is room for
// all the offline vCPUs can use.
//
// Offline vCPUs are those of the co-location classes config.Yield names:
// placement puts each class's vCPU threads of a sandbox in
// <sandbox cgroup>/vcpu-<class>. Each interval the controller lists the
// node's sandboxes again and reads
//
//	online    = host busy CPUs - offline CPUs
//	allowance = host CPUs - headroom - online
//
// and compares the allowance with what offline has now, the limit (or,
// with none, as many CPUs as the offline cgroups have vCPU threads):
//
//   - below it by more than the band: the limit drops to the allowance at
//     once;
//   - above it by more than the band for RaiseAfter intervals in a row:
//     the limit rises by at most RaiseStepCPUs an interval, and is lifted
//     (quota -1, "max") once it would reach what offline can use;
//   - otherwise it holds.
//
// The limit is split across the offline cgroups by their vCPU threads,
// and no cgroup gets less than FloorCPUs, so offline guests slow down but
// never stop. When the controller stops it lifts every quota it set.
package yield

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"math"
	"path"
	"slices"
	"time"

	"github.com/containerd/log"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/colo-runtime/colo/config"
	"github.com/colo-runtime/colo/placement"
)

// Sandbox is a sandbox of the node, as its record has it.
type Sandbox struct {
	ID string
	// Cgroup is the host cgroup its VM's threads were placed under
	// (placement.Plan.Parent); "" when nothing was placed.
	Cgroup string
}

// HostCPU is the host's CPU time since boot, busy and in all, in one unit
// (/proc/stat's ticks), and how many CPUs it is spread over.
type HostCPU struct {
	CPUs        int
	Busy, Total uint64
}

// CgroupCPU is what a cgroup's threads have used, and how many there are.
type CgroupCPU struct {
	Usage   time.Duration
	Threads int
}

// Source reads CPU use. An error that is fs.ErrNotExist means that the
// cgroup is not there (its sandbox is gone, or has no vCPU of the class).
type Source interface {
	Host(ctx context.Context) (HostCPU, error)
	Cgroup(ctx context.Context, path string) (CgroupCPU, error)
}

// Quota is a cgroup's CFS bandwidth: Quota microseconds of CPU time each
// Period microseconds; a negative Quota is no limit.
type Quota struct {
	Quota  int64
	Period uint64
}

// Unlimited is no quota.
var Unlimited = Quota{Quota: -1, Period: Period}

// Period is the CFS period the controller writes: the kernel's default.
const Period = 100000

// CPUs is the quota in CPUs, -1 when there is none.
func (q Quota) CPUs() float64 {
	if q.Quota < 0 || q.Period == 0 {
		return -1
	}
	return float64(q.Quota) / float64(q.Period)
}

func (q Quota) String() string {
	if q.Quota < 0 {
		return "max"
	}
	return fmt.Sprintf("%d/%d", q.Quota, q.Period)
}

// same tells whether two quotas limit alike: every unlimited one is.
func (q Quota) same(o Quota) bool {
	return q.Quota < 0 && o.Quota < 0 || q == o
}

// Setter reads and sets cgroups' CPU quota; fs.ErrNotExist as for Source.
type Setter interface {
	Quota(ctx context.Context, path string) (Quota, error)
	SetQuota(ctx context.Context, path string, q Quota) error
}

// Lister lists the node's sandboxes.
type Lister func(ctx context.Context) ([]Sandbox, error)

const (
	// band is the change of the allowance, in CPUs, that the limit
	// follows: less is measurement noise, not worth a cgroup write
	// (and the headroom is there for it).
	band = 0.05
	// callTimeout bounds each call into the Source, Setter or Lister.
	callTimeout = 2 * time.Second
	// restoreTimeout bounds lifting the quotas when the controller stops.
	restoreTimeout = 10 * time.Second
)

// noLimit is the limit's value when offline runs unlimited.
const noLimit = -1.0

// Controller lowers and raises the offline cgroups' quota. Run drives it;
// Gather has its metrics.
type Controller struct {
	cfg  config.Yield
	list Lister
	src  Source
	set  Setter
	// now is the clock offline usage is measured against.
	now func() time.Time

	// What the last interval left, for the next's deltas.
	host   HostCPU
	groups map[string]*group
	// limit is the CPUs offline may use together, noLimit for none.
	limit float64
	// above counts the intervals in a row the allowance stayed above
	// the limit.
	above int

	reg       *prometheus.Registry
	online    prometheus.Gauge
	offline   prometheus.Gauge
	allowance prometheus.Gauge
	limitCPUs prometheus.Gauge
	quota     *prometheus.GaugeVec
	decisions *prometheus.CounterVec
	errs      *prometheus.CounterVec
}

// group is an offline cgroup the controller knows.
type group struct {
	sandbox string
	// usage and at are the last sample, sampled whether there is one.
	usage   time.Duration
	at      time.Time
	sampled bool
	threads int
	// quota is what the cgroup has, known when it was read or written
	// and nothing failed since.
	quota Quota
	known bool
}

// Decision directions, the values of colo_yield_decisions_total's label.
const (
	Lower   = "lower"
	Raise   = "raise"
	Release = "release"
)

// Operations that can fail, colo_yield_errors_total's label.
const (
	opList  = "list"
	opHost  = "host"
	opUsage = "usage"
	opQuota = "quota"
)

// New makes a controller; cfg is checked as config.Validate does.
func New(cfg config.Yield, list Lister, src Source, set Setter) (*Controller, error) {
	switch {
	case cfg.Interval <= 0:
		return nil, fmt.Errorf("yield: interval %s: want a positive duration", cfg.Interval)
	case cfg.FloorCPUs <= 0:
		return nil, fmt.Errorf("yield: floor %v CPUs: want more than 0", cfg.FloorCPUs)
	case cfg.RaiseAfter < 1:
		return nil, fmt.Errorf("yield: raise after %d intervals: want 1 or more", cfg.RaiseAfter)
	case cfg.RaiseStepCPUs <= 0:
		return nil, fmt.Errorf("yield: raise step %v CPUs: want more than 0", cfg.RaiseStepCPUs)
	case len(cfg.OfflineClasses) == 0:
		return nil, errors.New("yield: no offline classes")
	case list == nil || src == nil || set == nil:
		return nil, errors.New("yield: a lister, a source and a setter are needed")
	}
	c := &Controller{
		cfg: cfg, list: list, src: src, set: set, now: time.Now,
		groups: make(map[string]*group),
		limit:  noLimit,
		reg:    prometheus.NewRegistry(),
		online: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "colo_yield_online_cpus",
			Help: "Host CPUs used by everything but the offline vCPUs in the last interval.",
		}),
		offline: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "colo_yield_offline_cpus",
			Help: "Host CPUs used by the offline vCPUs (the offline classes' cgroups) in the last interval.",
		}),
		allowance: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "colo_yield_allowance_cpus",
			Help: "Host CPUs offline may use so that the headroom stays free: host CPUs - headroom - online.",
		}),
		limitCPUs: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "colo_yield_limit_cpus",
			Help: "The CPUs the offline cgroups may use together; -1 when they are not limited.",
		}),
		quota: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "colo_yield_offline_quota_cpus",
			Help: "Each offline cgroup's CPU quota as the controller set it, in CPUs; -1 when unlimited.",
		}, []string{"sandbox_id", "cgroup"}),
		decisions: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "colo_yield_decisions_total",
			Help: "Changes of the offline limit: lower (at once, online needs the CPU), raise (a bounded step after raise_after intervals with room), release (the limit lifted).",
		}, []string{"direction"}),
		errs: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "colo_yield_errors_total",
			Help: "Failed reads and writes of the controller, by operation: list (the sandboxes), host (/proc/stat), usage (a cgroup's), quota (reading or setting one).",
		}, []string{"op"}),
	}
	c.limitCPUs.Set(noLimit)
	for _, d := range []string{Lower, Raise, Release} {
		c.decisions.WithLabelValues(d)
	}
	for _, op := range []string{opList, opHost, opUsage, opQuota} {
		c.errs.WithLabelValues(op)
	}
	c.reg.MustRegister(c.online, c.offline, c.allowance, c.limitCPUs, c.quota, c.decisions, c.errs)
	return c, nil
}

// Gather returns the controller's metrics (prometheus.Gatherer).
func (c *Controller) Gather() ([]*dto.MetricFamily, error) { return c.reg.Gather() }

// Run samples and decides every interval until ctx ends, then lifts every
// quota it set (within restoreTimeout) and returns.
func (c *Controller) Run(ctx context.Context) {
	log.G(ctx).WithField("config", fmt.Sprintf("%+v", c.cfg)).Info("yield: offline vCPUs yield to online load")
	t := time.NewTicker(time.Duration(c.cfg.Interval))
	defer t.Stop()
	for {
		c.tick(ctx)
		select {
		case <-ctx.Done():
			rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), restoreTimeout)
			c.restore(rctx)
			cancel()
			return
		case <-t.C:
		}
	}
}

// tick is one interval: list the offline cgroups, sample, decide, and set
// the quotas that must change. Failures are logged and counted; what
// could not be read this interval is left as it is.
func (c *Controller) tick(ctx context.Context) {
	if ctx.Err() != nil {
		return
	}
	sandboxes, err := call(ctx, callTimeout, c.list)
	if err != nil {
		c.fail(ctx, opList, "", err)
		return
	}
	present := c.offlineGroups(ctx, sandboxes)
	for p, g := range c.groups {
		if _, ok := present[p]; !ok {
			c.forget(ctx, p, g, true)
		}
	}

	now := c.now()
	offline, fresh := 0.0, true
	for p, sandboxID := range present {
		u, err := call(ctx, callTimeout, func(ctx context.Context) (CgroupCPU, error) { return c.src.Cgroup(ctx, p) })
		g := c.groups[p]
		if errors.Is(err, fs.ErrNotExist) {
			// No vCPU of the class, or the sandbox on its way out.
			if g != nil {
				c.forget(ctx, p, g, false)
			}
			continue
		}
		if err != nil {
			c.fail(ctx, opUsage, p, err)
			fresh = false
			continue
		}
		if g == nil {
			g = &group{sandbox: sandboxID}
			c.groups[p] = g
		}
		if g.sampled && u.Usage >= g.usage && now.After(g.at) {
			offline += (u.Usage - g.usage).Seconds() / now.Sub(g.at).Seconds()
		} else {
			// Its first sample (or a cgroup made anew at the same
			// path): what it used is not known yet.
			fresh = false
		}
		g.usage, g.at, g.sampled, g.threads = u.Usage, now, true, u.Threads
	}

	host, err := call(ctx, callTimeout, c.src.Host)
	if err != nil {
		c.fail(ctx, opHost, "", err)
		// The next interval samples again: its delta would span
		// more than the cgroups'.
		c.host = HostCPU{}
	} else {
		prev := c.host
		c.host = host
		if prev.Total > 0 && host.Total > prev.Total && host.Busy >= prev.Busy && host.CPUs > 0 {
			busy := float64(host.CPUs) * float64(host.Busy-prev.Busy) / float64(host.Total-prev.Total)
			online := max(0, busy-offline)
			allowance := float64(host.CPUs) - c.cfg.HeadroomCPUs - online
			c.online.Set(online)
			c.offline.Set(offline)
			c.allowance.Set(allowance)
			// An offline cgroup not measured this time makes
			// online look bigger than it is: a reason to lower,
			// never one to raise.
			c.decide(ctx, allowance, online, fresh)
		}
	}
	c.apply(ctx)
}

// offlineGroups are the offline cgroups of the sandboxes, with their
// sandboxes' ids.
func (c *Controller) offlineGroups(ctx context.Context, sandboxes []Sandbox) map[string]string {
	out := make(map[string]string)
	for _, sb := range sandboxes {
		if sb.Cgroup == "" {
			continue
		}
		// The record is the shim's, but a cgroup path that leaves
		// the hierarchy is never written to.
		if !path.IsAbs(sb.Cgroup) || path.Clean(sb.Cgroup) != sb.Cgroup || sb.Cgroup == "/" {
			log.G(ctx).WithField("sandbox", sb.ID).Warnf("yield: sandbox cgroup %q is not a clean absolute path: skipped", sb.Cgroup)
			continue
		}
		for _, class := range c.cfg.OfflineClasses {
			out[path.Join(sb.Cgroup, placement.ClassGroup(class))] = sb.ID
		}
	}
	return out
}

// capacity is what the offline cgroups can use without a limit, one CPU
// a vCPU thread, and how many cgroups have threads.
func (c *Controller) capacity() (cpus float64, groups int) {
	for _, g := range c.groups {
		if g.threads > 0 {
			cpus += float64(g.threads)
			groups++
		}
	}
	return cpus, groups
}

// decide moves the limit towards the allowance: down at once, up after
// raise_after intervals and by a bounded step. fresh says that every
// offline cgroup was measured: without that, the limit is never raised.
func (c *Controller) decide(ctx context.Context, allowance, online float64, fresh bool) {
	capacity, groups := c.capacity()
	if groups == 0 {
		// Nothing offline runs: nothing to limit.
		c.above = 0
		if c.limit != noLimit {
			c.change(ctx, Release, noLimit, allowance, online)
		}
		return
	}
	// The floors are what offline keeps, whatever online needs.
	target := max(allowance, c.cfg.FloorCPUs*float64(groups))
	current := capacity
	if c.limit != noLimit && c.limit < capacity {
		current = c.limit
	}
	switch {
	case target < current-band:
		c.above = 0
		c.change(ctx, Lower, target, allowance, online)
	case target > current+band && fresh:
		if c.limit == noLimit {
			c.above = 0
			return
		}
		c.above++
		if c.above < c.cfg.RaiseAfter {
			return
		}
		next := min(current+c.cfg.RaiseStepCPUs, target)
		if next >= capacity-band {
			c.above = 0
			c.change(ctx, Release, noLimit, allowance, online)
			return
		}
		c.change(ctx, Raise, next, allowance, online)
	default:
		// Within the band, or not measured in full: hold.
		c.above = 0
	}
}

func (c *Controller) change(ctx context.Context, direction string, limit, allowance, online float64) {
	log.G(ctx).WithFields(log.Fields{
		"from": c.limit, "to": limit, "allowance": round(allowance), "online": round(online),
	}).Infof("yield: %s the offline CPU limit", direction)
	c.limit = limit
	c.limitCPUs.Set(limit)
	c.decisions.WithLabelValues(direction).Inc()
}

func round(v float64) float64 { return math.Round(v*1000) / 1000 }

// want is the quota the limit gives g: its share by vCPU threads, at
// least the floor.
func (c *Controller) want(g *group, capacity float64) Quota {
	if c.limit == noLimit || g.threads == 0 || capacity == 0 {
		return Unlimited
	}
	cpus := max(c.cfg.FloorCPUs, c.limit*float64(g.threads)/capacity)
	cpus = min(cpus, float64(g.threads))
	return Quota{Quota: int64(math.Round(cpus * Period)), Period: Period}
}

// apply sets each offline cgroup's quota to what the limit gives it,
// where it has another. A cgroup seen for the first time is read first:
// one left limited by a controller that was killed is lifted or taken
// over.
func (c *Controller) apply(ctx context.Context) {
	capacity, _ := c.capacity()
	for p, g := range c.groups {
		if !g.known {
			q, err := call(ctx, callTimeout, func(ctx context.Context) (Quota, error) { return c.set.Quota(ctx, p) })
			if errors.Is(err, fs.ErrNotExist) {
				c.forget(ctx, p, g, false)
				continue
			}
			if err != nil {
				c.fail(ctx, opQuota, p, err)
				continue
			}
			g.quota, g.known = q, true
		}
		want := c.want(g, capacity)
		if g.quota.same(want) {
			c.quota.WithLabelValues(g.sandbox, p).Set(g.quota.CPUs())
			continue
		}
		err := c.setQuota(ctx, p, want)
		if errors.Is(err, fs.ErrNotExist) {
			c.forget(ctx, p, g, false)
			continue
		}
		if err != nil {
			// Read it again next time: the write may have
			// half happened.
			g.known = false
			c.fail(ctx, opQuota, p, err)
			continue
		}
		log.G(ctx).WithFields(log.Fields{"sandbox": g.sandbox, "cgroup": p, "from": g.quota.String(), "to": want.String()}).Debug("yield: quota set")
		g.quota = want
		c.quota.WithLabelValues(g.sandbox, p).Set(want.CPUs())
	}
}

// forget drops a cgroup that is no longer offline; if it may still be
// there (its sandbox's record went first), its quota is lifted.
func (c *Controller) forget(ctx context.Context, p string, g *group, lift bool) {
	delete(c.groups, p)
	c.quota.DeleteLabelValues(g.sandbox, p)
	if !lift || g.known && g.quota.Quota < 0 {
		return
	}
	if err := c.setQuota(ctx, p, Unlimited); err != nil && !errors.Is(err, fs.ErrNotExist) {
		c.fail(ctx, opQuota, p, err)
	}
}

// restore lifts the quota of every offline cgroup the controller knows
// and forgets them, when Run stops.
func (c *Controller) restore(ctx context.Context) {
	paths := make([]string, 0, len(c.groups))
	for p := range c.groups {
		paths = append(paths, p)
	}
	slices.Sort(paths)
	for _, p := range paths {
		c.forget(ctx, p, c.groups[p], true)
	}
	c.limit = noLimit
	c.limitCPUs.Set(noLimit)
	c.above = 0
	log.G(ctx).WithField("cgroups", len(paths)).Info("yield: stopped, offline quotas lifted")
}

func (c *Controller) setQuota(ctx context.Context, p string, q Quota) error {
	_, err := call(ctx, callTimeout, func(ctx context.Context) (struct{}, error) { return struct{}{}, c.set.SetQuota(ctx, p, q) })
	return err
}

// call runs f, a call into the Lister, Source or Setter, and stops
// waiting for it after timeout: a write to a cgroup waits for the kernel's
// cgroup lock, which another process may hold, and a file read cannot be
// cancelled. What f does is not undone, and a late result is dropped.
func call[T any](ctx context.Context, timeout time.Duration, f func(context.Context) (T, error)) (T, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	type result struct {
		v   T
		err error
	}
	done := make(chan result, 1)
	go func() {
		v, err := f(ctx)
		done <- result{v, err}
	}()
	select {
	case r := <-done:
		return r.v, r.err
	case <-ctx.Done():
		var zero T
		return zero, fmt.Errorf("no answer within %s: %w", timeout, ctx.Err())
	}
}

func (c *Controller) fail(ctx context.Context, op, cgroup string, err error) {
	c.errs.WithLabelValues(op).Inc()
	l := log.G(ctx).WithError(err).WithField("op", op)
	if cgroup != "" {
		l = l.WithField("cgroup", cgroup)
	}
	l.Warn("yield: failed")
}
