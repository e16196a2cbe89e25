package sandbox

import (
	"strings"
	"testing"

	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/colo-runtime/colo/config"
)

func TestVMSize(t *testing.T) {
	h := config.Default().Hypervisor // 2 vCPUs, 256 MiB; base 0 and 256 MiB
	bounds := vmSize{vcpus: 8, memoryMB: 4096}
	quota, period, mem := int64(150000), uint64(100000), int64(1<<30)
	withResources := func(s *specs.Spec) {
		s.Linux = &specs.Linux{Resources: &specs.LinuxResources{
			CPU:    &specs.LinuxCPU{Quota: &quota, Period: &period},
			Memory: &specs.LinuxMemory{Limit: &mem},
		}}
	}
	for _, tc := range []struct {
		name         string
		annotations  map[string]string
		spec         func(*specs.Spec)
		vcpus, memMB int
		err          string // a substring of the error; "" for none
	}{
		{name: "no limits: the configured size", vcpus: 2, memMB: 256},
		{
			name: "CRI's sandbox annotations",
			annotations: map[string]string{
				SandboxCPUQuotaAnnotation: "250000", SandboxCPUPeriodAnnotation: "100000", SandboxMemoryAnnotation: "1073741824",
			},
			vcpus: 3, memMB: 1280,
		},
		{
			name:        "zero annotations (a pod without limits)",
			annotations: map[string]string{SandboxCPUQuotaAnnotation: "0", SandboxCPUPeriodAnnotation: "100000", SandboxMemoryAnnotation: "0"},
			vcpus:       2, memMB: 256,
		},
		{name: "the spec's own limits (ctr)", spec: withResources, vcpus: 2, memMB: 1280},
		{
			name:        "annotations win over the spec",
			annotations: map[string]string{SandboxMemoryAnnotation: "536870912"},
			spec:        withResources, vcpus: 2, memMB: 768,
		},
		{
			name:        "a memory limit only: the configured vCPUs",
			annotations: map[string]string{SandboxMemoryAnnotation: "536870912"},
			vcpus:       2, memMB: 768,
		},
		{
			name:        "a fraction of a CPU rounds up",
			annotations: map[string]string{SandboxCPUQuotaAnnotation: "50000", SandboxCPUPeriodAnnotation: "100000"},
			vcpus:       1, memMB: 256,
		},
		{name: "a partial MiB rounds up to virtio-mem's 2 MiB", annotations: map[string]string{SandboxMemoryAnnotation: "1"}, vcpus: 2, memMB: 258},
		{
			name:        "more vCPUs than allowed",
			annotations: map[string]string{SandboxCPUQuotaAnnotation: "900000", SandboxCPUPeriodAnnotation: "100000"},
			err:         "max_vcpus",
		},
		{name: "more memory than allowed", annotations: map[string]string{SandboxMemoryAnnotation: "8589934592"}, err: "max_memory_mb"},
		{name: "not a number", annotations: map[string]string{SandboxMemoryAnnotation: "1Gi"}, err: SandboxMemoryAnnotation},
		{name: "negative", annotations: map[string]string{SandboxMemoryAnnotation: "-1"}, err: SandboxMemoryAnnotation},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := &specs.Spec{Annotations: tc.annotations}
			if tc.spec != nil {
				tc.spec(s)
			}
			l, err := podLimitsOf(s)
			var sz vmSize
			if err == nil {
				sz, err = sizeFor(h, l, bounds)
			}
			vcpus, memMB := sz.vcpus, sz.memoryMB
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) || !errdefs.IsInvalidArgument(err) {
					t.Fatalf("size %d, %d, %v; want an invalid-argument error naming %q", vcpus, memMB, err, tc.err)
				}
				return
			}
			if err != nil || vcpus != tc.vcpus || memMB != tc.memMB {
				t.Fatalf("size %d vCPUs, %d MiB, %v; want %d, %d", vcpus, memMB, err, tc.vcpus, tc.memMB)
			}
		})
	}
}

func TestHostMemoryMB(t *testing.T) {
	mb, err := hostMemoryMB()
	if err != nil || mb < 64 {
		t.Fatalf("hostMemoryMB = %d, %v", mb, err)
	}
}
