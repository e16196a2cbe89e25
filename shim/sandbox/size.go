package sandbox

import (
	"bufio"
	"fmt"
	"os"
	"runtime"
	"strconv"
	"strings"

	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/colo-runtime/colo/config"
)

// CRI's annotations of a pod's resources on its sandbox (kubelet's
// PodSandboxConfig.linux.resources: what the pod's containers may use
// together).
const (
	SandboxCPUQuotaAnnotation  = "io.kubernetes.cri.sandbox-cpu-quota"
	SandboxCPUPeriodAnnotation = "io.kubernetes.cri.sandbox-cpu-period"
	SandboxMemoryAnnotation    = "io.kubernetes.cri.sandbox-memory"
)

// limits are CPU and memory limits; zero for none.
type limits struct {
	milliCPU int64 // thousandths of a CPU
	memory   int64 // bytes
}

// add is the limits of two parts of a pod together.
func (l limits) add(o limits) limits {
	return limits{milliCPU: l.milliCPU + o.milliCPU, memory: l.memory + o.memory}
}

// atLeast is l raised to o where o asks for more.
func (l limits) atLeast(o limits) limits {
	return limits{milliCPU: max(l.milliCPU, o.milliCPU), memory: max(l.memory, o.memory)}
}

// resourceLimits are the limits of a container's resources (cgroup CPU
// quota over period, memory limit).
func resourceLimits(r *specs.LinuxResources) limits {
	var l limits
	if r == nil {
		return l
	}
	if c := r.CPU; c != nil && c.Quota != nil && *c.Quota > 0 && c.Period != nil && *c.Period > 0 {
		l.milliCPU = cpuMillis(*c.Quota, int64(*c.Period))
	}
	if m := r.Memory; m != nil && m.Limit != nil && *m.Limit > 0 {
		l.memory = *m.Limit
	}
	return l
}

// cpuMillis is a CPU quota over period in thousandths of a CPU, rounded
// up.
func cpuMillis(quota, period int64) int64 {
	return (quota*1000 + period - 1) / period
}

// podLimitsOf reads a pod's limits: CRI's sandbox annotations where a pod
// has them (kubelet's sum of its containers' limits), else the spec's own
// (a container run alone, by ctr). CRI's cpu-shares annotation is a
// weight, not a size: it sizes nothing.
func podLimitsOf(spec *specs.Spec) (limits, error) {
	var quota, period, memory int64
	for _, a := range []struct {
		key string
		v   *int64
	}{
		{SandboxCPUQuotaAnnotation, &quota},
		{SandboxCPUPeriodAnnotation, &period},
		{SandboxMemoryAnnotation, &memory},
	} {
		s, ok := spec.Annotations[a.key]
		if !ok {
			continue
		}
		n, err := strconv.ParseInt(s, 10, 64)
		if err != nil || n < 0 || n > maxLimit {
			return limits{}, errdefs.ErrInvalidArgument.WithMessage(fmt.Sprintf("annotation %s=%q: want a whole number from 0 to %d", a.key, clip(s), int64(maxLimit)))
		}
		*a.v = n
	}
	var l limits
	if quota > 0 && period > 0 {
		l.milliCPU = cpuMillis(quota, period)
	}
	l.memory = memory
	if l != (limits{}) || spec.Linux == nil {
		return l, nil
	}
	return resourceLimits(spec.Linux.Resources), nil
}

// maxLimit bounds the numbers in limits so that sums cannot overflow.
const maxLimit = 1 << 50

// vmSize is a VM's vCPUs and memory.
type vmSize struct {
	vcpus, memoryMB int
}

// memoryBlockMB is the guest kernel's memory block on x86 (up to 64 GiB
// of memory).
const memoryBlockMB = 128

// memoryStepMB is the step memory is plugged in (virtio-mem's block):
// sizes above the base are rounded up to it.
const memoryStepMB = 2

// roundMemory rounds a memory size up to a whole step above base.
func roundMemory(mb, base int) int {
	if mb <= base {
		return mb
	}
	return base + (mb-base+memoryStepMB-1)/memoryStepMB*memoryStepMB
}

// sizeBounds are the most a VM may have: hypervisor.max_vcpus and
// max_memory_mb, by default the host's CPUs and memory.
func sizeBounds(h config.Hypervisor) (vmSize, error) {
	b := vmSize{vcpus: h.MaxVCPUs, memoryMB: h.MaxMemoryMB}
	if b.vcpus == 0 {
		b.vcpus = runtime.NumCPU()
	}
	if b.memoryMB == 0 {
		mb, err := hostMemoryMB()
		if err != nil {
			return b, err
		}
		// Whole memory blocks of the guest kernel: memory is plugged in
		// steps, and the host's odd MiB are no use to a VM.
		b.memoryMB = mb / memoryBlockMB * memoryBlockMB
	}
	return b, nil
}

// sizeFor is the size of the VM of a pod with limits l: the configured
// vCPUs and memory for a pod without limits, else the limits (CPUs
// rounded up to whole vCPUs) on top of the guest's own base. It must fit
// within bounds; more is an invalid argument naming what asked for it.
func sizeFor(h config.Hypervisor, l limits, bounds vmSize) (vmSize, error) {
	sz := vmSize{vcpus: h.VCPUs, memoryMB: h.MemoryMB}
	if l.milliCPU > 0 {
		sz.vcpus = h.BaseVCPUs + int(min((l.milliCPU+999)/1000, maxLimit))
	}
	const mib = 1 << 20
	if l.memory > 0 {
		sz.memoryMB = roundMemory(h.BaseMemoryMB+int(min((l.memory+mib-1)/mib, maxLimit)), h.BaseMemoryMB)
	}
	if sz.vcpus > bounds.vcpus {
		return vmSize{}, errdefs.ErrInvalidArgument.WithMessage(fmt.Sprintf(
			"the pod needs %d vCPUs (hypervisor.base_vcpus %d + its CPU limit of %.3g CPUs), more than hypervisor.max_vcpus allows (%d)",
			sz.vcpus, h.BaseVCPUs, float64(l.milliCPU)/1000, bounds.vcpus))
	}
	if sz.memoryMB > bounds.memoryMB {
		return vmSize{}, errdefs.ErrInvalidArgument.WithMessage(fmt.Sprintf(
			"the pod needs %d MiB of memory (hypervisor.base_memory_mb %d + its memory limit of %d bytes), more than hypervisor.max_memory_mb allows (%d)",
			sz.memoryMB, h.BaseMemoryMB, l.memory, bounds.memoryMB))
	}
	return sz, nil
}

// hostMemoryMB is the host's memory in MiB (MemTotal).
func hostMemoryMB() (int, error) {
	f, err := os.Open("/proc/meminfo")
	if err != nil {
		return 0, fmt.Errorf("host memory: %w", err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if rest, ok := strings.CutPrefix(sc.Text(), "MemTotal:"); ok {
			kb, err := strconv.Atoi(strings.TrimSuffix(strings.TrimSpace(rest), " kB"))
			if err != nil {
				return 0, fmt.Errorf("host memory: MemTotal %q: %w", rest, err)
			}
			return kb / 1024, nil
		}
	}
	return 0, fmt.Errorf("host memory: no MemTotal in /proc/meminfo")
}
