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

// podLimits are a pod's CPU and memory limits; zero for none.
type podLimits struct {
	cpuQuota, cpuPeriod int64
	memory              int64 // bytes
}

// limitsOf reads a pod's limits: CRI's sandbox annotations where a pod
// has them, else the spec's own (a container run alone, by ctr).
func limitsOf(spec *specs.Spec) (podLimits, error) {
	var l podLimits
	for _, a := range []struct {
		key string
		v   *int64
	}{
		{SandboxCPUQuotaAnnotation, &l.cpuQuota},
		{SandboxCPUPeriodAnnotation, &l.cpuPeriod},
		{SandboxMemoryAnnotation, &l.memory},
	} {
		s, ok := spec.Annotations[a.key]
		if !ok {
			continue
		}
		n, err := strconv.ParseInt(s, 10, 64)
		if err != nil {
			return l, errdefs.ErrInvalidArgument.WithMessage(fmt.Sprintf("annotation %s=%q: want a whole number", a.key, clip(s)))
		}
		*a.v = n
	}
	if l != (podLimits{}) || spec.Linux == nil || spec.Linux.Resources == nil {
		return l, nil
	}
	r := spec.Linux.Resources
	if c := r.CPU; c != nil && c.Quota != nil && c.Period != nil {
		l.cpuQuota, l.cpuPeriod = *c.Quota, int64(*c.Period)
	}
	if m := r.Memory; m != nil && m.Limit != nil {
		l.memory = *m.Limit
	}
	return l, nil
}

// vmSize is the size of a pod's VM: the configured vCPUs and memory are
// the guest's own (and all a pod without limits gets); a pod's CPU limit,
// rounded up to whole vCPUs, and its memory limit come on top, as Kata
// sizes its VMs. The VM must fit hypervisor.max_vcpus and max_memory_mb
// (by default the host's CPUs and memory).
func vmSize(h config.Hypervisor, spec *specs.Spec) (vcpus, memoryMB int, err error) {
	l, err := limitsOf(spec)
	if err != nil {
		return 0, 0, err
	}
	vcpus, memoryMB = h.VCPUs, h.MemoryMB
	if l.cpuQuota > 0 && l.cpuPeriod > 0 {
		vcpus += int((l.cpuQuota + l.cpuPeriod - 1) / l.cpuPeriod)
	}
	const mib = 1 << 20
	if l.memory > 0 {
		memoryMB += int((l.memory + mib - 1) / mib)
	}
	maxVCPUs, maxMemoryMB := h.MaxVCPUs, h.MaxMemoryMB
	if maxVCPUs == 0 {
		maxVCPUs = runtime.NumCPU()
	}
	if maxMemoryMB == 0 {
		if maxMemoryMB, err = hostMemoryMB(); err != nil {
			return 0, 0, err
		}
	}
	if vcpus > maxVCPUs {
		return 0, 0, errdefs.ErrInvalidArgument.WithMessage(fmt.Sprintf(
			"the pod needs %d vCPUs (hypervisor.vcpus %d + its CPU limit %d/%d), more than hypervisor.max_vcpus allows (%d)",
			vcpus, h.VCPUs, l.cpuQuota, l.cpuPeriod, maxVCPUs))
	}
	if memoryMB > maxMemoryMB {
		return 0, 0, errdefs.ErrInvalidArgument.WithMessage(fmt.Sprintf(
			"the pod needs %d MiB of memory (hypervisor.memory_mb %d + its memory limit %d bytes), more than hypervisor.max_memory_mb allows (%d)",
			memoryMB, h.MemoryMB, l.memory, maxMemoryMB))
	}
	return vcpus, memoryMB, nil
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
