package yield

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/containerd/cgroups/v3"
	"github.com/containerd/cgroups/v3/cgroup1"
	"github.com/containerd/cgroups/v3/cgroup2"
	specs "github.com/opencontainers/runtime-spec/specs-go"
)

// Host is the real Source and Setter: /proc/stat, and the host's cgroups
// (v1 or v2) through containerd's cgroups package; the quota is read from
// the files, which that package does not read. Its methods do not wait on
// ctx: the Controller bounds every call.
type Host struct {
	// procStat is /proc/stat (a file of the same form in tests).
	procStat string
	// v1 are the cpu and cpuacct hierarchies, nil on cgroup v2.
	v1 []cgroup1.Subsystem
	// cpuDir is the v1 cpu hierarchy's mount point.
	cpuDir string
}

// NewHost finds the host's cgroups.
func NewHost() (*Host, error) {
	h := &Host{procStat: "/proc/stat"}
	switch cgroups.Mode() {
	case cgroups.Unified:
		return h, nil
	case cgroups.Unavailable:
		return nil, errors.New("yield: no cgroups on this host")
	}
	all, err := cgroup1.Default()
	if err != nil {
		return nil, fmt.Errorf("yield: cgroup v1 hierarchies: %w", err)
	}
	for _, s := range all {
		switch s.Name() {
		case cgroup1.Cpu:
			p, ok := s.(interface{ Path(string) string })
			if !ok {
				return nil, errors.New("yield: cgroup v1 cpu hierarchy without a path")
			}
			h.cpuDir = p.Path("/")
			h.v1 = append(h.v1, s)
		case cgroup1.Cpuacct:
			h.v1 = append(h.v1, s)
		}
	}
	if h.cpuDir == "" || len(h.v1) != 2 {
		return nil, errors.New("yield: the cgroup v1 cpu and cpuacct hierarchies are not both mounted")
	}
	return h, nil
}

// maxProcStatLine bounds a line of /proc/stat that is read; the cpu lines
// come first and are short, the long ones (intr) are never reached.
const maxProcStatLine = 4096

// Host reads the "cpu" line of /proc/stat and counts the "cpuN" lines,
// the online CPUs. Busy is all but idle and iowait; guest time is in user
// and nice already.
func (h *Host) Host(ctx context.Context) (HostCPU, error) {
	f, err := os.Open(h.procStat)
	if err != nil {
		return HostCPU{}, err
	}
	defer f.Close()
	return parseProcStat(f)
}

func parseProcStat(r io.Reader) (HostCPU, error) {
	var out HostCPU
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, maxProcStatLine), maxProcStatLine)
	seen := false
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) == 0 || !strings.HasPrefix(f[0], "cpu") {
			break
		}
		if f[0] != "cpu" {
			out.CPUs++
			continue
		}
		if len(f) < 9 {
			return out, fmt.Errorf("/proc/stat: cpu line with %d fields, want 8 or more", len(f)-1)
		}
		var v [8]uint64
		for i := range v {
			n, err := strconv.ParseUint(f[i+1], 10, 64)
			if err != nil {
				return out, fmt.Errorf("/proc/stat: cpu line: %w", err)
			}
			v[i] = n
		}
		// user nice system idle iowait irq softirq steal
		out.Busy = v[0] + v[1] + v[2] + v[5] + v[6] + v[7]
		out.Total = out.Busy + v[3] + v[4]
		seen = true
	}
	// A line too long to read after the cpu lines is one of the others
	// (intr, on a host with many interrupts).
	if err := sc.Err(); err != nil && !(seen && errors.Is(err, bufio.ErrTooLong)) {
		return out, fmt.Errorf("/proc/stat: %w", err)
	}
	if !seen || out.CPUs == 0 {
		return out, errors.New("/proc/stat: no cpu lines")
	}
	return out, nil
}

// Cgroup reads the CPU time the cgroup's threads used and counts them.
func (h *Host) Cgroup(ctx context.Context, path string) (CgroupCPU, error) {
	if h.v1 == nil {
		g, err := h.load2(path)
		if err != nil {
			return CgroupCPU{}, err
		}
		st, err := g.StatFiltered(cgroup2.StatCPU)
		if err != nil {
			return CgroupCPU{}, notExist(err)
		}
		threads, err := g.Threads(false)
		if err != nil {
			return CgroupCPU{}, notExist(err)
		}
		return CgroupCPU{Usage: time.Duration(st.GetCPU().GetUsageUsec()) * time.Microsecond, Threads: len(threads)}, nil
	}
	g, err := h.load1(path)
	if err != nil {
		return CgroupCPU{}, err
	}
	st, err := g.Stat()
	if err != nil {
		return CgroupCPU{}, notExist(err)
	}
	tasks, err := g.Tasks(cgroup1.Cpu, false)
	if err != nil {
		return CgroupCPU{}, notExist(err)
	}
	return CgroupCPU{Usage: time.Duration(st.GetCPU().GetUsage().GetTotal()), Threads: len(tasks)}, nil
}

// Quota reads the cgroup's CFS bandwidth: cpu.cfs_quota_us and
// cpu.cfs_period_us (v1), cpu.max (v2).
func (h *Host) Quota(ctx context.Context, path string) (Quota, error) {
	if err := checkPath(path); err != nil {
		return Quota{}, err
	}
	if h.v1 == nil {
		b, err := os.ReadFile(filepath.Join("/sys/fs/cgroup", path, "cpu.max"))
		if err != nil {
			return Quota{}, err
		}
		return parseCPUMax(string(b))
	}
	read := func(name string) (int64, error) {
		b, err := os.ReadFile(filepath.Join(h.cpuDir, path, name))
		if err != nil {
			return 0, err
		}
		return strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
	}
	quota, err := read("cpu.cfs_quota_us")
	if err != nil {
		return Quota{}, err
	}
	period, err := read("cpu.cfs_period_us")
	if err != nil {
		return Quota{}, err
	}
	if period <= 0 {
		return Quota{}, fmt.Errorf("cgroup %s: cpu.cfs_period_us %d", path, period)
	}
	return Quota{Quota: quota, Period: uint64(period)}, nil
}

// parseCPUMax reads cgroup v2's cpu.max, "max 100000" or "50000 100000".
func parseCPUMax(s string) (Quota, error) {
	f := strings.Fields(s)
	if len(f) != 2 {
		return Quota{}, fmt.Errorf("cpu.max %q: want a quota and a period", s)
	}
	period, err := strconv.ParseUint(f[1], 10, 64)
	if err != nil || period == 0 {
		return Quota{}, fmt.Errorf("cpu.max %q: bad period", s)
	}
	if f[0] == "max" {
		return Quota{Quota: -1, Period: period}, nil
	}
	quota, err := strconv.ParseInt(f[0], 10, 64)
	if err != nil || quota < 0 {
		return Quota{}, fmt.Errorf("cpu.max %q: bad quota", s)
	}
	return Quota{Quota: quota, Period: period}, nil
}

// SetQuota writes the cgroup's CFS bandwidth.
func (h *Host) SetQuota(ctx context.Context, path string, q Quota) error {
	if err := h.setQuota(path, q); err != nil {
		return fmt.Errorf("set CPU quota %s of cgroup %s: %w", q, path, err)
	}
	return nil
}

func (h *Host) setQuota(path string, q Quota) error {
	period := q.Period
	if h.v1 == nil {
		g, err := h.load2(path)
		if err != nil {
			return err
		}
		var quota *int64
		if q.Quota >= 0 {
			quota = &q.Quota
		}
		return notExist(g.Update(&cgroup2.Resources{CPU: &cgroup2.CPU{Max: cgroup2.NewCPUMax(quota, &period)}}))
	}
	g, err := h.load1(path)
	if err != nil {
		return err
	}
	quota := max(q.Quota, -1)
	return notExist(g.Update(&specs.LinuxResources{CPU: &specs.LinuxCPU{Quota: &quota, Period: &period}}))
}

func (h *Host) load1(path string) (cgroup1.Cgroup, error) {
	if err := checkPath(path); err != nil {
		return nil, err
	}
	g, err := cgroup1.Load(cgroup1.StaticPath(path), cgroup1.WithHierarchy(func() ([]cgroup1.Subsystem, error) { return h.v1, nil }))
	if err != nil {
		return nil, notExist(err)
	}
	return g, nil
}

func (h *Host) load2(path string) (*cgroup2.Manager, error) {
	if err := checkPath(path); err != nil {
		return nil, err
	}
	// Load makes no check that the cgroup is there.
	if _, err := os.Stat(filepath.Join("/sys/fs/cgroup", path)); err != nil {
		return nil, err
	}
	return cgroup2.Load(path)
}

// checkPath refuses a cgroup path that is not clean and absolute: it
// would leave the hierarchy.
func checkPath(p string) error {
	if !filepath.IsAbs(p) || filepath.Clean(p) != p || p == "/" {
		return fmt.Errorf("cgroup %q: want a clean absolute path below the root", p)
	}
	return nil
}

// notExist makes a cgroup that was removed fs.ErrNotExist.
func notExist(err error) error {
	if errors.Is(err, cgroup1.ErrCgroupDeleted) {
		return fmt.Errorf("%w: %w", fs.ErrNotExist, err)
	}
	return err
}
