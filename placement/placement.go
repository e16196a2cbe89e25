// Package placement puts a VM's threads into host cgroups by priority, for
// co-location: under the sandbox's cgroup (the pod's, from the spec's
// cgroupsPath) each vCPU class gets a child cgroup with its own CPU weight
// and optional cpuset, and the hypervisor's other threads and helper
// processes go into an "overhead" child, optionally at SCHED_IDLE. Threads
// are placed one by one (cgroup v1 tasks; cgroup v2 threaded cgroups);
// both cgroup versions go through github.com/containerd/cgroups/v3.
//
// The tree:
//
//	<parent>              the whole VM (memory, pids... and the pod weight)
//	<parent>/vcpu-<class> the vCPU threads of the class
//	<parent>/overhead     every other thread of the hypervisor, and helpers
package placement

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path"
	"slices"
	"strconv"
	"time"

	"github.com/containerd/cgroups/v3"
	"github.com/containerd/cgroups/v3/cgroup1"
	"github.com/containerd/cgroups/v3/cgroup2"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"
)

// OverheadGroup is the child cgroup of the hypervisor's non-vCPU threads.
const OverheadGroup = "overhead"

// ClassGroup is the child cgroup of a class's vCPU threads.
func ClassGroup(class string) string { return "vcpu-" + class }

// Class is a priority class of vCPUs.
type Class struct {
	Name string
	// Weight is the CPU weight, as cgroup v2's cpu.weight (1 to 10000,
	// 100 the default); cgroup v1 gets cpu.shares of 1024 per 100.
	Weight uint64
	// CPUs, if set, are the host CPUs its threads may run on ("0-3").
	CPUs string
}

// Plan is where a VM's threads go.
type Plan struct {
	// Parent is the sandbox's cgroup, as in a spec's cgroupsPath
	// ("/kubepods/besteffort/pod.../<id>"), or Scope's.
	Parent string
	// Scope, for a cgroupsPath of systemd's cgroup driver, is the scope
	// unit Parent is (SystemdScope); nil for a plain path.
	Scope *Scope
	// ParentWeight, if not 0, is the CPU weight of Parent itself.
	ParentWeight uint64
	Classes      []Class
	// VCPUClasses names the class of each vCPU, by index.
	VCPUClasses []string
	// OverheadWeight is the CPU weight of the overhead cgroup.
	OverheadWeight uint64
	// OverheadIdle runs the overhead threads under SCHED_IDLE.
	OverheadIdle bool
}

// Validate checks that the plan's classes and weights make sense for a VM
// with vcpus vCPUs; an empty Parent (nothing to place) is fine.
func (p Plan) Validate(vcpus int) error {
	if p.Parent != "" && (!path.IsAbs(p.Parent) || path.Clean(p.Parent) != p.Parent || p.Parent == "/") {
		return fmt.Errorf("cgroup %q: want an absolute path below the root", p.Parent)
	}
	if p.Scope != nil && path.Base(p.Parent) != p.Scope.Unit {
		return fmt.Errorf("cgroup %q: not the cgroup of systemd scope %s", p.Parent, p.Scope.Unit)
	}
	if len(p.VCPUClasses) != vcpus {
		return fmt.Errorf("%d vCPU classes %q for %d vCPUs: want one per vCPU", len(p.VCPUClasses), p.VCPUClasses, vcpus)
	}
	names := make(map[string]bool)
	for _, c := range p.Classes {
		if c.Name == "" || c.Name == OverheadGroup || !validName(c.Name) || names[c.Name] {
			return fmt.Errorf("class %q: want a unique name of letters, digits, '-' and '_' (not %q)", c.Name, OverheadGroup)
		}
		names[c.Name] = true
		if err := checkWeight("class "+c.Name, c.Weight); err != nil {
			return err
		}
	}
	for i, c := range p.VCPUClasses {
		if !names[c] {
			return fmt.Errorf("vCPU %d: no class %q (classes: %s)", i, c, classNames(p.Classes))
		}
	}
	if p.ParentWeight != 0 {
		if err := checkWeight("pod", p.ParentWeight); err != nil {
			return err
		}
	}
	return checkWeight("overhead", p.OverheadWeight)
}

func classNames(cs []Class) string {
	var n []string
	for _, c := range cs {
		n = append(n, c.Name)
	}
	return fmt.Sprint(n)
}

func validName(s string) bool {
	for _, r := range s {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-' || r == '_') {
			return false
		}
	}
	return true
}

func checkWeight(what string, w uint64) error {
	if w < 1 || w > 10000 {
		return fmt.Errorf("%s: CPU weight %d: want 1 to 10000", what, w)
	}
	return nil
}

// shares is a cgroup v2 weight as cgroup v1 cpu.shares.
func shares(weight uint64) uint64 { return max(2, weight*1024/100) }

// Threads are what the plan places.
type Threads struct {
	// Pid is the hypervisor process; VCPUs its vCPU thread ids by index.
	Pid   int
	VCPUs []int
	// Helpers are processes (such as virtiofsd) that go to overhead.
	Helpers []int
}

// Apply creates the cgroups and moves the threads: the whole hypervisor
// process, and the helpers, into overhead, then each vCPU thread into its
// class. Threads the hypervisor starts later stay with the thread that
// starts them, in overhead. m is ToMake(p), which the caller has
// recorded: a scope's unit is started first with the processes in it
// (systemd makes its cgroup), or the missing slices are made with the
// rest. On error what it made is removed again (the caller moves nothing
// else in meanwhile).
func Apply(ctx context.Context, p Plan, m Made, t Threads) (retErr error) {
	if len(t.VCPUs) != len(p.VCPUClasses) {
		return fmt.Errorf("placement: %d vCPU threads for %d vCPU classes", len(t.VCPUs), len(p.VCPUClasses))
	}
	defer func() {
		if retErr != nil {
			// Out of the tree again, so it can be removed.
			_ = moveToRoot(t)
			_ = Remove(context.WithoutCancel(ctx), p.Parent, m)
			retErr = fmt.Errorf("placement in %s: %w", p.Parent, retErr)
		}
	}()
	if m.Unit != "" {
		if err := startScope(ctx, p, append([]int{t.Pid}, t.Helpers...)); err != nil {
			return err
		}
	}
	if cgroups.Mode() == cgroups.Unified {
		return applyV2(p, t)
	}
	return applyV1(p, t)
}

// cpuSubsystems are the v1 hierarchies threads are placed in one by one;
// in the others the whole process goes to the parent.
var cpuSubsystems = []cgroup1.Name{cgroup1.Cpu, cgroup1.Cpuacct, cgroup1.Cpuset}

func applyV1(p Plan, t Threads) error {
	res := &specs.LinuxResources{CPU: &specs.LinuxCPU{}}
	if p.ParentWeight != 0 {
		s := shares(p.ParentWeight)
		res.CPU.Shares = &s
	}
	parent, err := cgroup1.New(cgroup1.StaticPath(p.Parent), res)
	if err != nil {
		return err
	}
	if err := parent.AddProc(uint64(t.Pid)); err != nil {
		return err
	}
	for _, h := range t.Helpers {
		if err := parent.AddProc(uint64(h)); err != nil {
			return err
		}
	}
	child := func(name string, weight uint64, cpus string) (cgroup1.Cgroup, error) {
		s := shares(weight)
		return parent.New(name, &specs.LinuxResources{CPU: &specs.LinuxCPU{Shares: &s, Cpus: cpus}})
	}
	overhead, err := child(OverheadGroup, p.OverheadWeight, "")
	if err != nil {
		return err
	}
	tids, err := taskIDs(t.Pid)
	if err != nil {
		return err
	}
	for _, tid := range tids {
		if err := overhead.AddTask(cgroup1.Process{Pid: tid}, cpuSubsystems...); err != nil {
			return fmt.Errorf("thread %d: %w", tid, err)
		}
	}
	for _, h := range t.Helpers {
		if err := overhead.AddProc(uint64(h), cpuSubsystems...); err != nil {
			return fmt.Errorf("helper %d: %w", h, err)
		}
	}
	for _, c := range p.Classes {
		g, err := child(ClassGroup(c.Name), c.Weight, c.CPUs)
		if err != nil {
			return err
		}
		for i, tid := range t.VCPUs {
			if p.VCPUClasses[i] != c.Name {
				continue
			}
			if err := g.AddTask(cgroup1.Process{Pid: tid}, cpuSubsystems...); err != nil {
				return fmt.Errorf("vCPU %d thread %d: %w", i, tid, err)
			}
		}
	}
	return setIdle(p, t)
}

func applyV2(p Plan, t Threads) error {
	res := &cgroup2.Resources{}
	if p.ParentWeight != 0 {
		w := p.ParentWeight
		res.CPU = &cgroup2.CPU{Weight: &w}
	}
	parent, err := cgroup2.NewManager("/sys/fs/cgroup", p.Parent, res)
	if err != nil {
		return err
	}
	// The children are threaded: cpu and cpuset work per thread there,
	// and the parent stays the process's domain (memory, pids, io).
	if err := parent.ToggleControllers([]string{"cpu", "cpuset"}, cgroup2.Enable); err != nil {
		return err
	}
	child := func(name string, weight uint64, cpus string) (*cgroup2.Manager, error) {
		g, err := parent.NewChild(name, nil)
		if err != nil {
			return nil, err
		}
		if err := g.SetType(cgroup2.Threaded); err != nil {
			return nil, err
		}
		w := weight
		r := &cgroup2.Resources{CPU: &cgroup2.CPU{Weight: &w, Cpus: cpus}}
		return g, g.Update(r)
	}
	overhead, err := child(OverheadGroup, p.OverheadWeight, "")
	if err != nil {
		return err
	}
	classes := make(map[string]*cgroup2.Manager)
	for _, c := range p.Classes {
		if classes[c.Name], err = child(ClassGroup(c.Name), c.Weight, c.CPUs); err != nil {
			return err
		}
	}
	for _, pid := range append([]int{t.Pid}, t.Helpers...) {
		if err := parent.AddProc(uint64(pid)); err != nil {
			return err
		}
		tids, err := taskIDs(pid)
		if err != nil {
			return err
		}
		for _, tid := range tids {
			if err := overhead.AddThread(uint64(tid)); err != nil {
				return fmt.Errorf("thread %d: %w", tid, err)
			}
		}
	}
	for i, tid := range t.VCPUs {
		if err := classes[p.VCPUClasses[i]].AddThread(uint64(tid)); err != nil {
			return fmt.Errorf("vCPU %d thread %d: %w", i, tid, err)
		}
	}
	return setIdle(p, t)
}

// setIdle puts every non-vCPU thread of the hypervisor, and the helpers'
// threads, under SCHED_IDLE: they run only when nothing else wants the
// CPU. The threads they start inherit it.
func setIdle(p Plan, t Threads) error {
	if !p.OverheadIdle {
		return nil
	}
	for _, pid := range append([]int{t.Pid}, t.Helpers...) {
		tids, err := taskIDs(pid)
		if err != nil {
			return err
		}
		for _, tid := range tids {
			if slices.Contains(t.VCPUs, tid) {
				continue
			}
			if err := unix.SchedSetAttr(tid, &unix.SchedAttr{Size: unix.SizeofSchedAttr, Policy: unix.SCHED_IDLE}, 0); err != nil && !errors.Is(err, unix.ESRCH) {
				return fmt.Errorf("SCHED_IDLE for thread %d: %w", tid, err)
			}
		}
	}
	return nil
}

// taskIDs lists the threads of a process.
func taskIDs(pid int) ([]int, error) {
	entries, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	if err != nil {
		return nil, err
	}
	var tids []int
	for _, e := range entries {
		if tid, err := strconv.Atoi(e.Name()); err == nil {
			tids = append(tids, tid)
		}
	}
	return tids, nil
}

// moveToRoot moves the processes back to the root cgroups, undoing a
// partial Apply.
func moveToRoot(t Threads) error {
	var errs []error
	for _, pid := range append([]int{t.Pid}, t.Helpers...) {
		if cgroups.Mode() == cgroups.Unified {
			root, err := cgroup2.Load("/")
			if err == nil {
				err = root.AddProc(uint64(pid))
			}
			errs = append(errs, err)
			continue
		}
		root, err := cgroup1.Load(cgroup1.RootPath)
		if err == nil {
			err = root.AddProc(uint64(pid))
		}
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// Remove deletes the tree at parent once its threads are gone (the
// hypervisor has exited), and what m (Apply's) names: a scope's unit is
// stopped, the children go, then parent, then the slices colo made that
// are empty. A tree that is not there counts as removed, so it also
// cleans up after a crash.
func Remove(ctx context.Context, parent string, m Made) error {
	// systemd removes a scope's cgroups when it stops it: what is left
	// are those in the v1 hierarchies it does not manage.
	var errs []error
	if m.Unit != "" {
		errs = append(errs, stopScope(ctx, m.Unit))
	}
	errs = append(errs, removeTree(parent))
	for _, dir := range slices.Backward(m.Slices) {
		errs = append(errs, removeSlice(parent, dir))
	}
	return errors.Join(errs...)
}

// removeTree deletes the tree at parent: the children, then parent.
func removeTree(parent string) error {
	if cgroups.Mode() == cgroups.Unified {
		return removeV2(parent)
	}
	var errs []error
	subsystems, err := cgroup1.Default()
	if err != nil {
		return err
	}
	for _, s := range subsystems {
		p, ok := s.(interface{ Path(string) string })
		if !ok {
			continue
		}
		dir := p.Path(parent)
		entries, _ := os.ReadDir(dir)
		for _, e := range entries {
			if e.IsDir() {
				errs = append(errs, rmdir(path.Join(dir, e.Name())))
			}
		}
		errs = append(errs, rmdir(dir))
	}
	return errors.Join(errs...)
}

func removeV2(parent string) error {
	dir := path.Join("/sys/fs/cgroup", parent)
	entries, _ := os.ReadDir(dir)
	var errs []error
	for _, e := range entries {
		if e.IsDir() {
			errs = append(errs, rmdir(path.Join(dir, e.Name())))
		}
	}
	return errors.Join(append(errs, rmdir(dir))...)
}

// rmdir removes an empty cgroup; one that is gone already is no error.
//
// A cgroup whose last task has just been killed is busy until the kernel
// has released it (an exited task not yet reaped holds it too), so a busy
// one is tried again for a moment.
func rmdir(dir string) error {
	deadline := time.Now().Add(rmdirBusyWait)
	for {
		err := unix.Rmdir(dir)
		switch {
		case err == nil || errors.Is(err, unix.ENOENT):
			return nil
		case errors.Is(err, unix.EBUSY) && time.Now().Before(deadline):
			time.Sleep(20 * time.Millisecond)
			continue
		}
		return fmt.Errorf("remove cgroup %s: %w", dir, err)
	}
}

// rmdirBusyWait bounds waiting for a busy cgroup to be released.
const rmdirBusyWait = 2 * time.Second

// PlaceVCPUs moves vCPU threads into the cgroups of their classes under a
// tree Apply made: vcpus[i] is the thread of vCPU first+i. It is for
// vCPUs plugged after Apply, which start in the cgroup of the thread that
// made them (overhead). A class that had no vCPUs until now gets its
// cgroup.
func PlaceVCPUs(p Plan, first int, vcpus []int) error {
	if first < 0 || first+len(vcpus) > len(p.VCPUClasses) {
		return fmt.Errorf("placement: vCPUs %d to %d, but classes for %d", first, first+len(vcpus)-1, len(p.VCPUClasses))
	}
	byName := make(map[string]Class)
	for _, c := range p.Classes {
		byName[c.Name] = c
	}
	for i, tid := range vcpus {
		c, ok := byName[p.VCPUClasses[first+i]]
		if !ok {
			return fmt.Errorf("placement: vCPU %d: no class %q", first+i, p.VCPUClasses[first+i])
		}
		if err := placeThread(p.Parent, c, tid); err != nil {
			return fmt.Errorf("placement: vCPU %d thread %d in %s: %w", first+i, tid, p.Parent, err)
		}
	}
	return nil
}

func placeThread(parent string, c Class, tid int) error {
	w := c.Weight
	if cgroups.Mode() == cgroups.Unified {
		g, err := cgroup2.Load(path.Join(parent, ClassGroup(c.Name)))
		if err != nil {
			return err
		}
		if err := g.Update(&cgroup2.Resources{CPU: &cgroup2.CPU{Weight: &w, Cpus: c.CPUs}}); err != nil {
			return err
		}
		return g.AddThread(uint64(tid))
	}
	s := shares(w)
	// New on an existing cgroup only sets its resources.
	g, err := cgroup1.New(cgroup1.StaticPath(path.Join(parent, ClassGroup(c.Name))), &specs.LinuxResources{CPU: &specs.LinuxCPU{Shares: &s, Cpus: c.CPUs}})
	if err != nil {
		return err
	}
	return g.AddTask(cgroup1.Process{Pid: tid}, cpuSubsystems...)
}

// SetMemoryLimit limits the memory of the whole tree at parent (the VM
// with its helpers) to limit bytes. Lowering it below what the tree uses
// makes the kernel reclaim first, and fails if it cannot.
func SetMemoryLimit(parent string, limit int64) error {
	if cgroups.Mode() == cgroups.Unified {
		g, err := cgroup2.Load(parent)
		if err != nil {
			return err
		}
		return g.Update(&cgroup2.Resources{Memory: &cgroup2.Memory{Max: &limit}})
	}
	g, err := cgroup1.Load(cgroup1.StaticPath(parent))
	if err != nil {
		return err
	}
	return g.Update(&specs.LinuxResources{Memory: &specs.LinuxMemory{Limit: &limit}})
}
