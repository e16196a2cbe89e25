package clh

import (
	"context"
	"fmt"
	"net/http"
	"time"

	"github.com/colo-runtime/colo/hypervisor"
)

// CH resizes vCPUs asynchronously: while the guest has not ejected a vCPU
// it was asked to give up, vm.resize answers 429 (CH commit d0225fe6; CH
// calls retrying the client's job, cloud-hypervisor#7305).
const (
	resizeRetries = 50
	resizeBackoff = 20 * time.Millisecond
)

// vcpuPoll is how often SetVCPUs looks at CH's vCPU threads.
const vcpuPoll = 20 * time.Millisecond

// resize is vm.resize, retried while CH answers 429, bounded by ctx and
// resizeRetries.
func (vm *VM) resize(ctx context.Context, r vmResize) error {
	var err error
	for range resizeRetries {
		err = vm.api.call(ctx, http.MethodPut, "vm.resize", r, nil)
		if statusOf(err) != http.StatusTooManyRequests {
			return err
		}
		t := time.NewTimer(resizeBackoff)
		select {
		case <-ctx.Done():
			t.Stop()
			return fmt.Errorf("%w (%w)", context.Cause(ctx), err)
		case <-t.C:
		}
	}
	return fmt.Errorf("%w (still after %d tries)", err, resizeRetries)
}

// SetVCPUs asks CH for n vCPUs and waits until CH runs n vCPU threads:
// plugged ones start at once, an unplugged one's thread ends when the
// guest has ejected it.
func (vm *VM) SetVCPUs(ctx context.Context, n int) error {
	if vm.size.MaxVCPUs <= vm.size.VCPUs && n != vm.size.VCPUs {
		return vm.fail(fmt.Errorf("%w: the VM has %d vCPUs and no headroom to plug or unplug any (max vcpus %d at launch)", hypervisor.ErrNotResizable, vm.size.VCPUs, vm.size.MaxVCPUs))
	}
	if n < 1 || n > vm.size.MaxVCPUs {
		return vm.fail(fmt.Errorf("vcpus %d: want 1 to %d (max vcpus)", n, vm.size.MaxVCPUs))
	}
	vm.resizeMu.Lock()
	defer vm.resizeMu.Unlock()
	if err := vm.resize(ctx, vmResize{DesiredVCPUs: &n}); err != nil {
		return vm.fail(err)
	}
	t := time.NewTicker(vcpuPoll)
	defer t.Stop()
	for {
		tids, err := vcpuThreads(vm.Pid())
		if err == nil && len(tids) == n {
			return nil
		}
		select {
		case <-ctx.Done():
			return vm.fail(fmt.Errorf("vcpus %d: Cloud Hypervisor runs %d vCPU threads (%v): %w", n, len(tids), err, context.Cause(ctx)))
		case <-vm.done:
			return vm.fail(errExited)
		case <-t.C:
		}
	}
}

// SetMemory asks CH for mb MiB of guest memory (vm.resize desired_ram):
// virtio-mem plugs what is above the base memory, and asks the guest to
// unplug it again on a shrink. CH's API tells when a shrink is requested,
// not when the guest has given the memory back: SetMemory returns then.
func (vm *VM) SetMemory(ctx context.Context, mb int) error {
	base, maxMB := vm.size.BaseMemoryMB, vm.size.MaxMemoryMB
	if maxMB <= base && mb != base {
		return vm.fail(fmt.Errorf("%w: the VM has %d MiB and no headroom to plug or unplug memory (max memory %d MiB at launch)", hypervisor.ErrNotResizable, base, maxMB))
	}
	if mb < base || mb > maxMB {
		return vm.fail(fmt.Errorf("memory %d MiB: want %d to %d MiB (base to max memory)", mb, base, maxMB))
	}
	if (mb-base)%memoryBlockMB != 0 {
		return vm.fail(fmt.Errorf("memory %d MiB: %d MiB above the base memory, want a multiple of %d MiB (virtio-mem's block)", mb, mb-base, memoryBlockMB))
	}
	vm.resizeMu.Lock()
	defer vm.resizeMu.Unlock()
	ram := mib(mb)
	if err := vm.resize(ctx, vmResize{DesiredRAM: &ram}); err != nil {
		return vm.fail(err)
	}
	return nil
}

// Size is the VM's size as CH's vm.info tells it.
func (vm *VM) Size(ctx context.Context) (hypervisor.Size, error) {
	info, err := vm.info(ctx)
	if err != nil {
		return hypervisor.Size{}, vm.fail(err)
	}
	s := hypervisor.Size{
		VCPUs:     info.Config.CPUs.BootVCPUs,
		MemoryMB:  int(info.MemoryActualSize >> 20),
		PluggedMB: int(info.Config.Memory.HotpluggedSize >> 20),
	}
	if b := info.Config.Balloon; b != nil {
		s.BalloonMB = int(b.Size >> 20)
	}
	return s, nil
}
