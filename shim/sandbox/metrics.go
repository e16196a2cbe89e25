package sandbox

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"

	"github.com/containerd/cgroups/v3"
	"github.com/containerd/cgroups/v3/cgroup1"
	"github.com/containerd/cgroups/v3/cgroup2"
	cgroupsv2 "github.com/containerd/cgroups/v3/cgroup2/stats"
	"github.com/containerd/errdefs"
)

// clockTicks is USER_HZ, the unit of /proc/<pid>/stat's times: 100 on
// every architecture Linux runs colo on.
const clockTicks = 100

// Metrics is what the sandbox's VM uses of the host, from the host's side,
// in containerd's cgroup metrics types as task stats are: the statistics
// of the VM's host cgroup (cgroup v2 or v1) where it has one (co-location
// places it below the pod's cgroup, as the pause container would be), and
// otherwise the hypervisor's and virtiofsd's processes read from /proc as
// cgroup v2 metrics (CPU time, resident memory, threads), which is all that
// is the VM's alone then. What runs in the guest is in its containers'
// stats.
func (s *Sandbox) Metrics() (any, error) {
	if s.vm == nil || s.isTorn() {
		return nil, errdefs.ErrFailedPrecondition.WithMessage(fmt.Sprintf("sandbox %s is not running", s.id))
	}
	s.stateMu.Lock()
	cg := s.state.Cgroup
	s.stateMu.Unlock()
	if cg != "" {
		if cgroups.Mode() == cgroups.Unified {
			m, err := cgroup2.Load(cg)
			if err != nil {
				return nil, fmt.Errorf("VM cgroup %s: %w", cg, err)
			}
			return m.Stat()
		}
		c, err := cgroup1.Load(cgroup1.StaticPath(cg))
		if err != nil {
			return nil, fmt.Errorf("VM cgroup %s: %w", cg, err)
		}
		return c.Stat(cgroup1.IgnoreNotExist)
	}
	pids := []int{s.vm.Pid()}
	if s.virtiofsd != nil {
		pids = append(pids, s.virtiofsd.Pid())
	}
	return processMetrics(pids...)
}

// processMetrics sums the CPU time, resident memory and threads of
// processes, as cgroup v2 metrics.
func processMetrics(pids ...int) (*cgroupsv2.Metrics, error) {
	m := &cgroupsv2.Metrics{CPU: &cgroupsv2.CPUStat{}, Memory: &cgroupsv2.MemoryStat{}, Pids: &cgroupsv2.PidsStat{}}
	for _, pid := range pids {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if err != nil {
			return nil, fmt.Errorf("process %d: %w", pid, err)
		}
		// Fields after the command name, which is in parentheses and may
		// hold anything: state is field 3, utime 14, stime 15,
		// num_threads 20.
		i := bytes.LastIndexByte(b, ')')
		if i < 0 {
			return nil, fmt.Errorf("malformed /proc/%d/stat", pid)
		}
		f := strings.Fields(string(b[i+1:]))
		if len(f) < 18 {
			return nil, fmt.Errorf("malformed /proc/%d/stat", pid)
		}
		utime, err1 := strconv.ParseUint(f[11], 10, 64)
		stime, err2 := strconv.ParseUint(f[12], 10, 64)
		threads, err3 := strconv.ParseUint(f[17], 10, 64)
		if err := errors.Join(err1, err2, err3); err != nil {
			return nil, fmt.Errorf("/proc/%d/stat: %w", pid, err)
		}
		m.CPU.UserUsec += utime * 1e6 / clockTicks
		m.CPU.SystemUsec += stime * 1e6 / clockTicks
		m.Pids.Current += threads
		rss, err := statusBytes(pid, "VmRSS")
		if err != nil {
			return nil, err
		}
		m.Memory.Usage += rss
	}
	m.CPU.UsageUsec = m.CPU.UserUsec + m.CPU.SystemUsec
	return m, nil
}

// statusBytes reads a "key: N kB" line of /proc/<pid>/status.
func statusBytes(pid int, key string) (uint64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, fmt.Errorf("process %d: %w", pid, err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		k, v, ok := strings.Cut(line, ":")
		if ok && k == key {
			kb, err := strconv.ParseUint(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			if err != nil {
				return 0, fmt.Errorf("/proc/%d/status: %s: %w", pid, key, err)
			}
			return kb << 10, nil
		}
	}
	return 0, fmt.Errorf("/proc/%d/status: no %s", pid, key)
}
