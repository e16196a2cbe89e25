package sandbox

import (
	"fmt"

	"github.com/containerd/cgroups/v3"
	"github.com/containerd/cgroups/v3/cgroup1"
	"github.com/containerd/cgroups/v3/cgroup2"
	cgroupsv2 "github.com/containerd/cgroups/v3/cgroup2/stats"
	"github.com/containerd/errdefs"

	"github.com/colo-runtime/colo/internal/procfs"
)

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
		u, err := procfs.ReadUsage(pid)
		if err != nil {
			return nil, fmt.Errorf("process %d: %w", pid, err)
		}
		m.CPU.UserUsec += u.UTime * 1e6 / procfs.ClockTicks
		m.CPU.SystemUsec += u.STime * 1e6 / procfs.ClockTicks
		m.Pids.Current += uint64(u.Threads)
		m.Memory.Usage += u.RSS
	}
	m.CPU.UsageUsec = m.CPU.UserUsec + m.CPU.SystemUsec
	return m, nil
}
