package sandbox

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"

	"github.com/colo-runtime/colo/agentproto"
	"github.com/colo-runtime/colo/hypervisor"
	"github.com/colo-runtime/colo/placement"
)

// A VM's size follows its pod: it starts at sizeFor the pod's limits,
// grows when a container is added or updated beyond them, shrinks when an
// update lowers them, and an operator may set it outright (Resize, the
// management socket's PUT /resources) until the pod's limits next change.
//
// The order of each step is the guest's: vCPUs are plugged before the
// agent brings them online and moves its classes onto them, and taken
// from the classes before they are unplugged; memory is plugged before a
// container's limit is raised into it, and a container's limit is
// lowered before the memory under it goes.

// Resources are a size asked for a sandbox's VM; 0 leaves a part as it
// is.
type Resources struct {
	VCPUs    int `json:"vcpus,omitempty"`
	MemoryMB int `json:"memory_mb,omitempty"`
}

// colocation is the sandbox's current co-location set-up.
func (s *Sandbox) colocation() colocation {
	s.sizeMu.Lock()
	defer s.sizeMu.Unlock()
	return s.colo
}

func (s *Sandbox) currentSize() vmSize {
	s.sizeMu.Lock()
	defer s.sizeMu.Unlock()
	return s.size
}

// baseMemoryMB is the memory the VM never gives up (VMConfig.BaseMemoryMB).
func (s *Sandbox) baseMemoryMB() int {
	return min(s.cfg.Hypervisor.BaseMemoryMB, s.cfg.Hypervisor.MemoryMB)
}

// Size is the VM's size as the hypervisor sees it.
func (s *Sandbox) Size(ctx context.Context) (hypervisor.Size, error) {
	if !s.alive() {
		return hypervisor.Size{}, errdefs.ErrFailedPrecondition.WithMessage(fmt.Sprintf("sandbox %s: its VM is gone", s.id))
	}
	return s.vm.Size(ctx)
}

// Resize sets the VM's vCPUs and memory. A request the VM cannot meet
// (beyond hypervisor.max_vcpus or max_memory_mb, below the base memory,
// below what the guest or a container's limit needs) is an invalid
// argument and changes nothing.
func (s *Sandbox) Resize(ctx context.Context, r Resources) (hypervisor.Size, error) {
	if r.VCPUs < 0 || r.MemoryMB < 0 {
		return hypervisor.Size{}, errdefs.ErrInvalidArgument.WithMessage(fmt.Sprintf("resize to %d vCPUs and %d MiB: want positive sizes (0 leaves one as it is)", r.VCPUs, r.MemoryMB))
	}
	s.resizeMu.Lock()
	defer s.resizeMu.Unlock()
	want := s.currentSize()
	if r.VCPUs > 0 {
		want.vcpus = r.VCPUs
	}
	if r.MemoryMB > 0 {
		want.memoryMB = roundMemory(r.MemoryMB, s.baseMemoryMB())
	}
	if err := s.resize(ctx, want); err != nil {
		return hypervisor.Size{}, err
	}
	return s.vm.Size(ctx)
}

// demand is what the pod's limits ask of the VM: its own, or its
// containers' together where they ask for more.
func (s *Sandbox) demand() limits {
	s.sizeMu.Lock()
	defer s.sizeMu.Unlock()
	var sum limits
	for _, l := range s.limits {
		sum = sum.add(l)
	}
	return s.podLimits.atLeast(sum)
}

// setLimits records a container's new limits and returns a function that
// puts the old ones back. A sandbox's first container of Create is the
// pod (its limits are podLimits) unless the pod came with a pod config
// (CreatePod), whose containers are all added.
func (s *Sandbox) setLimits(id string, l limits) (undo func()) {
	s.sizeMu.Lock()
	defer s.sizeMu.Unlock()
	if id == s.id && s.pod == nil {
		old := s.podLimits
		s.podLimits = l
		return func() { s.sizeMu.Lock(); s.podLimits = old; s.sizeMu.Unlock() }
	}
	old, had := s.limits[id]
	s.limits[id] = l
	return func() {
		s.sizeMu.Lock()
		defer s.sizeMu.Unlock()
		if had {
			s.limits[id] = old
		} else {
			delete(s.limits, id)
		}
	}
}

// dropLimits forgets a deleted container's limits. The VM keeps its size:
// the next change of limits sizes it again.
func (s *Sandbox) dropLimits(id string) {
	s.sizeMu.Lock()
	defer s.sizeMu.Unlock()
	delete(s.limits, id)
}

// wantedSize is the size the pod's limits ask for now.
func (s *Sandbox) wantedSize() (vmSize, error) {
	return sizeFor(s.cfg.Hypervisor, s.demand(), s.maxSize)
}

// growFor grows the VM for a container about to be added with limits l,
// where the pod's limits do not cover them already. It never shrinks.
func (s *Sandbox) growFor(ctx context.Context, id string, l limits) (undo func(), err error) {
	s.resizeMu.Lock()
	defer s.resizeMu.Unlock()
	undo = s.setLimits(id, l)
	want, err := s.wantedSize()
	if err != nil {
		undo()
		return nil, err
	}
	cur := s.currentSize()
	want = vmSize{vcpus: max(want.vcpus, cur.vcpus), memoryMB: max(want.memoryMB, cur.memoryMB)}
	if want != cur {
		if err := s.resize(ctx, want); err != nil {
			undo()
			return nil, err
		}
	}
	return undo, nil
}

// updateLimits changes a container's limits in the guest (apply) and the
// VM's size with them: the VM grows before a limit is raised into it and
// shrinks after a limit is lowered out of it.
func (s *Sandbox) updateLimits(ctx context.Context, id string, l limits, apply func() error) error {
	s.resizeMu.Lock()
	defer s.resizeMu.Unlock()
	undo := s.setLimits(id, l)
	want, err := s.wantedSize()
	if err != nil {
		undo()
		return err
	}
	cur := s.currentSize()
	if want.memoryMB >= cur.memoryMB {
		if err := s.resize(ctx, want); err != nil {
			undo()
			return err
		}
		if err := apply(); err != nil {
			undo()
			return err
		}
		return nil
	}
	if err := apply(); err != nil {
		undo()
		return err
	}
	return s.resize(ctx, want)
}

// awaitSize waits at boot until the guest has the VM's size: what a VM
// restored from a template of another size had plugged after restore,
// or what a booted VM plugged at launch, is online in the guest.
func (s *Sandbox) awaitSize(ctx context.Context) error {
	size := s.currentSize()
	if err := s.vm.SetMemory(ctx, size.memoryMB); err != nil {
		return resizeError(fmt.Sprintf("memory of %d MiB", size.memoryMB), err)
	}
	resp, err := s.agent.OnlineCPUMem(ctx, &agentproto.OnlineCPUMemRequest{NbCpus: uint32(size.vcpus), CpuClasses: s.colocation().classes})
	if err != nil {
		return agentError("OnlineCPUMem", err)
	}
	log.G(ctx).WithFields(log.Fields{"vcpus": resp.GetOnlineCpus(), "mem_total_bytes": resp.GetMemTotalBytes()}).Debug("guest has its size")
	return nil
}

// resize makes the VM want's size; s.resizeMu is held. Requests are
// checked before anything changes; a step that fails is undone where it
// can be, and the sandbox's size is always what the VM has.
func (s *Sandbox) resize(ctx context.Context, want vmSize) error {
	if !s.alive() || s.vm == nil || s.agent == nil {
		return errdefs.ErrFailedPrecondition.WithMessage(fmt.Sprintf("sandbox %s: its VM is not running", s.id))
	}
	cur := s.currentSize()
	if want == cur {
		return nil
	}
	invalid := func(format string, args ...any) error {
		return errdefs.ErrInvalidArgument.WithMessage(fmt.Sprintf(format, args...))
	}
	base := s.baseMemoryMB()
	switch {
	case want.vcpus < 1:
		return invalid("%d vCPUs: want at least 1", want.vcpus)
	case want.vcpus > s.maxSize.vcpus:
		return invalid("%d vCPUs: more than hypervisor.max_vcpus allows (%d)", want.vcpus, s.maxSize.vcpus)
	case want.memoryMB < base:
		return invalid("%d MiB: less than the memory the VM boots with and keeps (%d MiB, hypervisor.base_memory_mb)", want.memoryMB, base)
	case want.memoryMB > s.maxSize.memoryMB:
		return invalid("%d MiB: more than hypervisor.max_memory_mb allows (%d)", want.memoryMB, s.maxSize.memoryMB)
	}
	colo, err := s.colocation().withVCPUs(want.vcpus)
	if err != nil {
		return invalid("%d vCPUs: co-location: %v", want.vcpus, err)
	}
	if want.memoryMB < cur.memoryMB {
		if err := s.checkShrink(ctx, want.memoryMB); err != nil {
			return err
		}
	}
	l := log.G(ctx).WithFields(log.Fields{"vcpus": want.vcpus, "memory_mb": want.memoryMB, "from_vcpus": cur.vcpus, "from_memory_mb": cur.memoryMB})

	if want.vcpus != cur.vcpus {
		if err := s.setVCPUs(ctx, cur.vcpus, want.vcpus, colo); err != nil {
			return err
		}
		s.sizeMu.Lock()
		s.size.vcpus, s.colo = want.vcpus, colo
		s.sizeMu.Unlock()
	}
	if want.memoryMB != cur.memoryMB {
		if err := s.setMemory(ctx, cur.memoryMB, want.memoryMB); err != nil {
			return err
		}
		s.sizeMu.Lock()
		s.size.memoryMB = want.memoryMB
		s.sizeMu.Unlock()
	}
	l.Info("VM resized")
	return nil
}

// setVCPUs plugs or unplugs vCPUs (from cur to n), with the guest's
// classes (colo) following.
func (s *Sandbox) setVCPUs(ctx context.Context, cur, n int, colo colocation) error {
	online := func(n int, classes []*agentproto.CPUClass) error {
		if _, err := s.agent.OnlineCPUMem(ctx, &agentproto.OnlineCPUMemRequest{NbCpus: uint32(n), CpuOnly: true, CpuClasses: classes}); err != nil {
			return agentError("OnlineCPUMem", err)
		}
		return nil
	}
	if n > cur {
		if err := s.vm.SetVCPUs(ctx, n); err != nil {
			return s.undoVCPUs(ctx, cur, resizeError("plug vCPUs", err))
		}
		if err := online(n, colo.classes); err != nil {
			return s.undoVCPUs(ctx, cur, err)
		}
		return s.placeVCPUs(ctx, cur, colo)
	}
	// The guest lets go of them first: its classes shrink and the
	// vCPUs go offline, so the unplug does not wait on the guest.
	if err := online(n, colo.classes); err != nil {
		return err
	}
	if err := s.vm.SetVCPUs(ctx, n); err != nil {
		if err2 := online(cur, s.colocation().classes); err2 != nil {
			log.G(ctx).WithError(err2).Warn("bring the guest's vCPUs back online after a failed unplug")
		}
		return resizeError("unplug vCPUs", err)
	}
	return nil
}

// undoTimeout bounds taking a VM back to its size after a failed resize.
const undoTimeout = 30 * time.Second

// undoVCPUs takes the VM back to cur vCPUs after a failed plug and
// returns err.
func (s *Sandbox) undoVCPUs(ctx context.Context, cur int, err error) error {
	// Even when the request's time is up: the VM goes back to the size
	// the sandbox records, within a bound of its own.
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), undoTimeout)
	defer cancel()
	if uerr := s.vm.SetVCPUs(ctx, cur); uerr != nil {
		log.G(ctx).WithError(uerr).Warn("unplug the vCPUs of a failed resize")
	}
	return err
}

// placeVCPUs puts the threads of vCPUs from first on in their classes'
// host cgroups.
func (s *Sandbox) placeVCPUs(ctx context.Context, first int, colo colocation) error {
	if colo.plan.Parent == "" {
		return nil
	}
	tids, err := s.vm.VCPUThreads(ctx)
	if err != nil {
		return err
	}
	if len(tids) < first {
		return fmt.Errorf("place vCPUs: %d vCPU threads, want more than %d", len(tids), first)
	}
	return placement.PlaceVCPUs(colo.plan, first, tids[first:])
}

// checkShrink refuses to take memory the guest, or a container's limit,
// needs.
func (s *Sandbox) checkShrink(ctx context.Context, mb int) error {
	const mib = 1 << 20
	free := int64(mb-s.baseMemoryMB()) * mib
	s.sizeMu.Lock()
	pod := s.podLimits.memory
	for id, l := range s.limits {
		if l.memory > free {
			s.sizeMu.Unlock()
			return errdefs.ErrInvalidArgument.WithMessage(fmt.Sprintf(
				"%d MiB: container %s has a memory limit of %d MiB, more than the %d MiB the VM would have above its base; lower the limit first",
				mb, id, l.memory/mib, free/mib))
		}
	}
	s.sizeMu.Unlock()
	if pod > free {
		return errdefs.ErrInvalidArgument.WithMessage(fmt.Sprintf(
			"%d MiB: the pod has a memory limit of %d MiB, more than the %d MiB the VM would have above its base",
			mb, pod/mib, free/mib))
	}
	d, err := s.agent.GetGuestDetails(ctx, &agentproto.GetGuestDetailsRequest{})
	if err != nil {
		return agentError("GetGuestDetails", err)
	}
	// The guest needs room beyond what it uses now to keep running: its
	// page cache and the next allocation.
	const headroom = 64 * mib
	if used := int64(min(d.GetMemUsedBytes(), maxLimit)); used+headroom > int64(mb)*mib {
		return errdefs.ErrInvalidArgument.WithMessage(fmt.Sprintf(
			"%d MiB: the guest uses %d MiB, and needs %d MiB more to keep running", mb, used/mib, headroom/mib))
	}
	return nil
}

// setMemory grows or shrinks the guest's memory from cur to mb MiB, with
// the sandbox's host memory limit (hypervisor.memory_overhead_mb) raised
// before and lowered after.
func (s *Sandbox) setMemory(ctx context.Context, cur, mb int) error {
	if mb > cur {
		if err := s.limitHostMemory(mb); err != nil {
			return err
		}
		if err := s.vm.SetMemory(ctx, mb); err != nil {
			return s.undoMemory(ctx, cur, resizeError("plug memory", err))
		}
		// Memory the kernel did not online by itself (memhp_default_state).
		if _, err := s.agent.OnlineCPUMem(ctx, &agentproto.OnlineCPUMemRequest{NbCpus: uint32(s.currentSize().vcpus)}); err != nil {
			return agentError("OnlineCPUMem", err)
		}
		return nil
	}
	if err := s.vm.SetMemory(ctx, mb); err != nil {
		return s.undoMemory(ctx, cur, resizeError("unplug memory", err))
	}
	return s.limitHostMemory(mb)
}

func (s *Sandbox) undoMemory(ctx context.Context, cur int, err error) error {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), undoTimeout)
	defer cancel()
	if uerr := s.vm.SetMemory(ctx, cur); uerr != nil {
		log.G(ctx).WithError(uerr).Warn("take the VM back to its memory after a failed resize")
	}
	return err
}

// limitHostMemory limits the sandbox's host cgroup to a VM of mb MiB and
// its overhead, where the config asks for it and the VM is placed.
func (s *Sandbox) limitHostMemory(mb int) error {
	overhead := s.cfg.Hypervisor.MemoryOverheadMB
	parent := s.colocation().plan.Parent
	if overhead == 0 || parent == "" {
		return nil
	}
	if err := placement.SetMemoryLimit(parent, int64(mb+overhead)<<20); err != nil {
		return fmt.Errorf("host memory limit of %s: %w", parent, err)
	}
	return nil
}

// resizeError maps a VM that cannot change size at all (a machine type
// without hot-plug) to not implemented.
func resizeError(what string, err error) error {
	if errors.Is(err, hypervisor.ErrNotResizable) {
		return errdefs.ErrNotImplemented.WithMessage(fmt.Sprintf("%s: %v", what, err))
	}
	return fmt.Errorf("%s: %w", what, err)
}
