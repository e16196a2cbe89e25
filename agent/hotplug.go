package agent

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"golang.org/x/sys/unix"

	"github.com/colo-runtime/colo/agentproto"
)

// OnlineCPUMem: the guest follows the vCPUs and memory the host plugs and
// unplugs.
//
// The host calls it after plugging vCPUs or memory, and before unplugging
// vCPUs, with the vCPU count the guest is to have and, with classes, the
// classes for that count. Growing: plug, then call (the agent waits for the
// plugged vCPUs to show up). Shrinking: call, then unplug (the vCPUs are
// offline by then, so the ACPI eject is quick).
//
// The order within a call keeps every class on CPUs it owns:
//
//  1. The class cpusets are narrowed to their new CPUs that are online now
//     (a class with none keeps its cpuset for now). In cgroup v2 a cpuset
//     whose CPUs all go offline does not stay empty: its effective CPUs
//     fall back to its parent's, all the guest's online CPUs, and a
//     low-priority class would spread over the high class's vCPUs.
//  2. CPUs 0..nb_cpus-1 go online and the others offline; the call waits
//     until the kernel's online list is exactly 0..nb_cpus-1.
//  3. The cpusets are widened to the new classes (the kernel adds CPUs
//     only once they are online), the weights and the topology file
//     written, classes left out removed, and the network interrupts
//     pinned again to the first class.
//
// Processes see the new CPUs without help: the agent runs with the
// affinity the kernel gives init (every possible CPU), runc resets each
// container process's affinity to every CPU, and the kernel narrows it to
// the cgroup's cpuset, which it widens as CPUs come online. ensureAffinity
// checks the agent's and repairs it should something have pinned it.

const (
	// cpuWaitCap bounds the wait for the CPUs when the host's deadline is
	// later or missing (Service.cpuWait); under TCG a plugged vCPU takes
	// seconds to appear.
	cpuWaitCap = time.Minute
	// cpuPoll is how often the CPUs are looked at while waiting.
	cpuPoll = 20 * time.Millisecond
)

func (s *Service) OnlineCPUMem(ctx context.Context, req *agentproto.OnlineCPUMemRequest) (*agentproto.OnlineCPUMemResponse, error) {
	s.resizeMu.Lock()
	defer s.resizeMu.Unlock()
	start := time.Now()
	cpuDir := filepath.Join(s.sysRoot, "devices/system/cpu")
	n := req.GetNbCpus()
	if n == 0 {
		return nil, fmt.Errorf("nb_cpus 0: the guest needs at least one vCPU: %w", errdefs.ErrInvalidArgument)
	}
	possible, err := readCPUList(filepath.Join(cpuDir, "possible"))
	if err != nil {
		return nil, err
	}
	if !isPrefix(possible, int(n)) {
		return nil, fmt.Errorf("nb_cpus %d: the guest can have at most %d vCPUs (possible CPUs %s): %w", n, countPrefix(possible), formatCPUList(possible), errdefs.ErrInvalidArgument)
	}
	classes := req.GetCpuClasses()
	s.mu.Lock()
	err = s.checkClasses(classes, n)
	s.mu.Unlock()
	if err != nil {
		return nil, err
	}

	if len(classes) > 0 {
		online, err := readCPUList(filepath.Join(cpuDir, "online"))
		if err != nil {
			return nil, err
		}
		s.mu.Lock()
		err = s.writeClassCgroups(classes, func(cpu uint32) bool { return cpu < n && slices.Contains(online, int(cpu)) })
		s.mu.Unlock()
		if err != nil {
			return nil, fmt.Errorf("narrow the classes' cpusets: %w", err)
		}
	}
	online, err := setOnlineCPUs(ctx, cpuDir, int(n), s.cpuWait)
	if err != nil {
		return nil, err
	}
	if len(classes) > 0 {
		s.mu.Lock()
		err = s.setupClasses(ctx, classes)
		s.mu.Unlock()
		if err != nil {
			return nil, err
		}
		s.repinIRQs(ctx)
	}
	s.fixAffinity(ctx, online)

	if !req.GetCpuOnly() {
		// A fallback only: virtio-mem onlines what it plugs, and refuses
		// (EINVAL) blocks it is still bringing up or holds partly
		// unplugged. The host has checked the plugged size already.
		if err := onlineMemory(filepath.Join(s.sysRoot, "devices/system/memory")); err != nil {
			log.G(ctx).WithError(err).Warn("memory blocks left offline")
		}
	}
	memKB, err := statusKB(s.meminfo, "MemTotal")
	if err != nil {
		return nil, err
	}
	log.G(ctx).WithFields(log.Fields{"cpus": formatCPUList(online), "mem_total_kb": memKB, "classes": len(classes), "took": time.Since(start)}).Info("CPUs and memory online")
	return &agentproto.OnlineCPUMemResponse{OnlineCpus: uint32(len(online)), MemTotalBytes: memKB << 10}, nil
}

// checkClasses validates the classes of an OnlineCPUMem call for n vCPUs
// before anything changes. Without classes, the sandbox's classes stay,
// so they must all be below n: a class would otherwise lose CPUs behind
// the topology file's back. The caller holds s.mu.
func (s *Service) checkClasses(classes []*agentproto.CPUClass, n uint32) error {
	if len(classes) == 0 {
		for _, c := range s.classes {
			for _, cpu := range c.GetCpus() {
				if cpu >= n {
					return fmt.Errorf("nb_cpus %d: class %s has CPU %d: give the classes for the new vCPUs: %w", n, c.GetName(), cpu, errdefs.ErrFailedPrecondition)
				}
			}
		}
		return nil
	}
	if err := validateClasses(classes, n); err != nil {
		return err
	}
	_, err := s.droppedClasses(classes)
	return err
}

// setOnlineCPUs brings CPUs 0..n-1 online and takes the others offline
// (highest first), then waits until the kernel's online list is exactly
// 0..n-1, bounded by ctx and wait. A CPU the host has just plugged
// appears (its cpuN directory) only after a while, so the CPUs are looked
// at again until then. It returns the online CPUs.
func setOnlineCPUs(ctx context.Context, dir string, n int, wait time.Duration) ([]int, error) {
	ctx, cancel := context.WithTimeout(ctx, wait)
	defer cancel()
	start := time.Now()
	for {
		writeErr, err := reconcileCPUs(dir, n)
		if err != nil {
			return nil, err
		}
		online, err := readCPUList(filepath.Join(dir, "online"))
		if err != nil {
			return nil, err
		}
		if isPrefix(online, n) && len(online) == n {
			return online, nil
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("online CPUs are %q after %v, want 0-%d: %w", formatCPUList(online), time.Since(start).Round(time.Millisecond), n-1, errors.Join(ctx.Err(), writeErr))
		case <-time.After(cpuPoll):
		}
	}
}

// reconcileCPUs writes the online file of every present CPU that is not
// as wanted: offline from n up (highest first), online below n. CPUs
// without an online file (cpu0, which never goes offline) are left alone.
// It returns the failed writes apart, as they may succeed on a later try.
func reconcileCPUs(dir string, n int) (writeErr, err error) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	var cpus []int
	for _, e := range entries {
		if i, err := strconv.Atoi(strings.TrimPrefix(e.Name(), "cpu")); err == nil && strings.HasPrefix(e.Name(), "cpu") && i >= 0 {
			cpus = append(cpus, i)
		}
	}
	slices.Sort(cpus)
	var order []int
	for _, i := range slices.Backward(cpus) {
		if i >= n {
			order = append(order, i)
		}
	}
	for _, i := range cpus {
		if i < n {
			order = append(order, i)
		}
	}
	var errs []error
	for _, i := range order {
		want := "1"
		if i >= n {
			want = "0"
		}
		f := filepath.Join(dir, "cpu"+strconv.Itoa(i), "online")
		b, err := os.ReadFile(f)
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err == nil && strings.TrimSpace(string(b)) == want {
			continue
		}
		if err == nil {
			err = os.WriteFile(f, []byte(want), 0)
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("cpu%d online = %s: %w", i, want, err))
		}
	}
	return errors.Join(errs...), nil
}

// onlineMemory brings every offline memory block online, movable when the
// kernel allows (so that it can be unplugged again), normal otherwise.
// The guest's kernel onlines virtio-mem's blocks itself
// (memhp_default_state=online_movable); this catches the rest.
func onlineMemory(dir string) error {
	states, err := filepath.Glob(filepath.Join(dir, "memory[0-9]*", "state"))
	if err != nil {
		return err
	}
	var errs []error
	for _, f := range states {
		b, err := os.ReadFile(f)
		if err != nil || strings.TrimSpace(string(b)) != "offline" {
			continue // gone meanwhile (unplugged), or online
		}
		if err := os.WriteFile(f, []byte("online_movable"), 0); err != nil {
			if err2 := os.WriteFile(f, []byte("online"), 0); err2 != nil {
				errs = append(errs, fmt.Errorf("memory block %s: online: %w", filepath.Base(filepath.Dir(f)), errors.Join(err, err2)))
			}
		}
	}
	return errors.Join(errs...)
}

// repinIRQs points the network interrupts at the first class again, after
// its CPUs changed.
func (s *Service) repinIRQs(ctx context.Context) {
	entries, err := os.ReadDir(filepath.Join(s.sysRoot, "class/net"))
	if err != nil {
		return
	}
	for _, e := range entries {
		if err := s.pinIRQs(ctx, e.Name()); err != nil {
			log.G(ctx).WithError(err).Warn("pin network interrupts to the high-priority vCPUs")
		}
	}
}

// ensureAffinity checks that the calling thread may run on every online
// CPU, as the processes the agent starts inherit its affinity. Should
// something have pinned it, every thread of the agent gets all CPUs back.
func ensureAffinity(ctx context.Context, online []int) {
	var set unix.CPUSet
	if err := unix.SchedGetaffinity(0, &set); err != nil {
		log.G(ctx).WithError(err).Warn("sched_getaffinity")
		return
	}
	var missing []int
	for _, cpu := range online {
		if !set.IsSet(cpu) {
			missing = append(missing, cpu)
		}
	}
	if len(missing) == 0 {
		return
	}
	log.G(ctx).Warnf("the agent may not run on online CPUs %s: widening its affinity", formatCPUList(missing))
	var all unix.CPUSet
	for i := range len(all) * 64 {
		all.Set(i)
	}
	tasks, err := os.ReadDir("/proc/self/task")
	if err != nil {
		log.G(ctx).WithError(err).Warn("list the agent's threads")
		return
	}
	for _, t := range tasks {
		if tid, err := strconv.Atoi(t.Name()); err == nil {
			if err := unix.SchedSetaffinity(tid, &all); err != nil {
				log.G(ctx).WithError(err).Warnf("sched_setaffinity of thread %d", tid)
			}
		}
	}
}

// readCPUList reads a kernel CPU list file.
func readCPUList(path string) ([]int, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	cpus, err := parseCPUList(string(b))
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return cpus, nil
}

// parseCPUList parses a kernel CPU list such as "0-3,6" ("" is none)
// into sorted CPU indices.
func parseCPUList(s string) ([]int, error) {
	s = strings.TrimSpace(s)
	if s == "" {
		return nil, nil
	}
	var cpus []int
	for _, part := range strings.Split(s, ",") {
		lo, hi, isRange := strings.Cut(part, "-")
		a, err := strconv.Atoi(lo)
		b := a
		if err == nil && isRange {
			b, err = strconv.Atoi(hi)
		}
		// 8192 is the kernel's largest NR_CPUS.
		if err != nil || a < 0 || b < a || b >= 8192 {
			return nil, fmt.Errorf("bad CPU list %q", s)
		}
		for i := a; i <= b; i++ {
			cpus = append(cpus, i)
		}
	}
	slices.Sort(cpus)
	return slices.Compact(cpus), nil
}

// formatCPUList writes sorted CPU indices as a kernel CPU list.
func formatCPUList(cpus []int) string {
	var parts []string
	for i := 0; i < len(cpus); {
		j := i
		for j+1 < len(cpus) && cpus[j+1] == cpus[j]+1 {
			j++
		}
		if j == i {
			parts = append(parts, strconv.Itoa(cpus[i]))
		} else {
			parts = append(parts, fmt.Sprintf("%d-%d", cpus[i], cpus[j]))
		}
		i = j + 1
	}
	return strings.Join(parts, ",")
}

// isPrefix tells whether sorted cpus start with 0..n-1.
func isPrefix(cpus []int, n int) bool {
	return countPrefix(cpus) >= n
}

// countPrefix is how many of sorted cpus are 0, 1, 2, ... in a row.
func countPrefix(cpus []int) int {
	n := 0
	for n < len(cpus) && cpus[n] == n {
		n++
	}
	return n
}
