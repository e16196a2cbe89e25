package sandbox

import (
	"context"
	"fmt"
	"strings"
	"testing"

	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/colo-runtime/colo/agentproto"
)

// TestResize: the VM follows resize requests and its containers' limits;
// requests it cannot meet are invalid arguments that change nothing.
func TestResize(t *testing.T) {
	e := newEnv(t, false)
	ctx := context.Background()
	cfg := e.config("9p")
	cfg.Hypervisor.MaxVCPUs, cfg.Hypervisor.MaxMemoryMB = 8, 4096
	sb, _, err := Create(ctx, e.options(cfg), e.container("true"))
	if err != nil {
		t.Fatal(err)
	}
	vm := e.drv.vms[0]
	resizes := func() string {
		vm.mu.Lock()
		defer vm.mu.Unlock()
		r := strings.Join(vm.resizes, ", ")
		vm.resizes = nil
		return r
	}
	lastOnline := func() string {
		a := e.drv.agent
		a.mu.Lock()
		defer a.mu.Unlock()
		// The last that moved the classes: a memory plug onlines
		// memory only.
		var r *agentproto.OnlineCPUMemRequest
		for _, o := range a.onlines {
			if len(o.GetCpuClasses()) > 0 {
				r = o
			}
		}
		var classes []string
		for _, c := range r.GetCpuClasses() {
			classes = append(classes, fmt.Sprintf("%s%v", c.GetName(), c.GetCpus()))
		}
		return fmt.Sprintf("%d %s", r.GetNbCpus(), strings.Join(classes, " "))
	}
	mib := func(n int64) *int64 { n <<= 20; return &n }

	steps := []struct {
		name    string
		do      func() error
		err     string // a substring of an invalid-argument error
		resizes string
		online  string // the last OnlineCPUMem: vCPUs and guest classes
		size    vmSize
	}{
		{name: "booted", do: func() error { return nil }, online: "2 high[0 1]", size: vmSize{2, 256}},
		{
			name: "grow", do: func() error { _, err := sb.Resize(ctx, Resources{VCPUs: 4, MemoryMB: 1024}); return err },
			resizes: "vcpus 4, memory 1024", online: "4 high[0 1 2 3]", size: vmSize{4, 1024},
		},
		{name: "beyond max_vcpus", do: func() error { _, err := sb.Resize(ctx, Resources{VCPUs: 9}); return err }, err: "max_vcpus", size: vmSize{4, 1024}},
		{name: "below the base", do: func() error { _, err := sb.Resize(ctx, Resources{MemoryMB: 128}); return err }, err: "base_memory_mb", size: vmSize{4, 1024}},
		{name: "beyond max_memory_mb", do: func() error { _, err := sb.Resize(ctx, Resources{MemoryMB: 5000}); return err }, err: "max_memory_mb", size: vmSize{4, 1024}},
		{
			name: "shrink", do: func() error { _, err := sb.Resize(ctx, Resources{VCPUs: 1, MemoryMB: 512}); return err },
			resizes: "vcpus 1, memory 512", online: "1 high[0]", size: vmSize{1, 512},
		},
		{
			name: "a container with a limit grows it",
			do: func() error {
				c := e.container("true")
				c.ID, c.Stdio = "c2", Stdio{}
				c.Spec.Linux.Resources = &specs.LinuxResources{Memory: &specs.LinuxMemory{Limit: mib(1024)}}
				_, err := sb.AddContainer(ctx, c)
				return err
			},
			// Without a CPU limit, the pod's vCPUs are hypervisor.vcpus.
			resizes: "vcpus 2, memory 1280", online: "2 high[0 1]", size: vmSize{2, 1280},
		},
		{
			name: "not below a container's limit", do: func() error { _, err := sb.Resize(ctx, Resources{MemoryMB: 768}); return err },
			err: "container c2 has a memory limit of 1024 MiB", size: vmSize{2, 1280},
		},
		{
			name: "an update lowers it",
			do: func() error {
				c, err := sb.Container("c2")
				if err != nil {
					return err
				}
				q, p := int64(150000), uint64(100000)
				return c.Update(ctx, &specs.LinuxResources{Memory: &specs.LinuxMemory{Limit: mib(512)}, CPU: &specs.LinuxCPU{Quota: &q, Period: &p}})
			},
			resizes: "memory 768", size: vmSize{2, 768},
		},
		{
			name: "an update of the pod's own container (ctr run alone)",
			do: func() error {
				c, err := sb.Container("c1")
				if err != nil {
					return err
				}
				return c.Update(ctx, &specs.LinuxResources{Memory: &specs.LinuxMemory{Limit: mib(1024)}})
			},
			resizes: "memory 1280", size: vmSize{2, 1280},
		},
		{
			name: "not below the pod's limit", do: func() error { _, err := sb.Resize(ctx, Resources{MemoryMB: 1024}); return err },
			err: "the pod has a memory limit of 1024 MiB", size: vmSize{2, 1280},
		},
	}
	for _, st := range steps {
		err := st.do()
		switch {
		case st.err != "":
			if !errdefs.IsInvalidArgument(err) || !strings.Contains(err.Error(), st.err) {
				t.Fatalf("%s: %v, want an invalid argument naming %q", st.name, err, st.err)
			}
		case err != nil:
			t.Fatalf("%s: %v", st.name, err)
		}
		if got := resizes(); got != st.resizes {
			t.Errorf("%s: VM resized %q, want %q", st.name, got, st.resizes)
		}
		if st.online != "" {
			if got := lastOnline(); got != st.online {
				t.Errorf("%s: guest told %q, want %q", st.name, got, st.online)
			}
		}
		if got := sb.currentSize(); got != st.size {
			t.Errorf("%s: size %+v, want %+v", st.name, got, st.size)
		}
	}
	for _, id := range []string{"c2", "c1"} {
		if _, err := sb.DeleteContainer(ctx, id); err != nil {
			t.Fatal(err)
		}
	}
	waitExit(t, e.exits)
	waitExit(t, e.exits)
}
