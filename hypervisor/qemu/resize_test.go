package qemu

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/colo-runtime/colo/hypervisor"
)

func TestCheckSize(t *testing.T) {
	cfg := hypervisor.VMConfig{VCPUs: 2, MemoryMB: 512}
	for _, tc := range []struct {
		name    string
		machine string
		cfg     hypervisor.VMConfig
		want    hypervisor.VMConfig // the sizes resolved
		err     string
	}{
		{"zeros: no headroom", "q35", cfg,
			hypervisor.VMConfig{VCPUs: 2, MemoryMB: 512, MaxVCPUs: 2, MaxMemoryMB: 512, BaseMemoryMB: 512, TemplateVCPUs: 2, TemplateMemoryMB: 512}, ""},
		{"headroom", "q35", with(cfg, func(c *hypervisor.VMConfig) {
			c.MaxVCPUs, c.BaseMemoryMB, c.MaxMemoryMB, c.TemplateVCPUs, c.TemplateMemoryMB = 4, 256, 4096, 1, 256
		}), hypervisor.VMConfig{VCPUs: 2, MemoryMB: 512, MaxVCPUs: 4, MaxMemoryMB: 4096, BaseMemoryMB: 256, TemplateVCPUs: 1, TemplateMemoryMB: 256}, ""},
		{"max below the start: no growth", "q35", with(cfg, func(c *hypervisor.VMConfig) { c.MaxVCPUs, c.MaxMemoryMB = 1, 256 }),
			hypervisor.VMConfig{VCPUs: 2, MemoryMB: 512, MaxVCPUs: 2, MaxMemoryMB: 512, BaseMemoryMB: 512, TemplateVCPUs: 2, TemplateMemoryMB: 512}, ""},
		{"microvm ignores headroom", "microvm", with(cfg, func(c *hypervisor.VMConfig) {
			c.MaxVCPUs, c.BaseMemoryMB, c.MaxMemoryMB = 4, 256, 4096
		}), hypervisor.VMConfig{VCPUs: 2, MemoryMB: 512, MaxVCPUs: 2, MaxMemoryMB: 512, BaseMemoryMB: 512, TemplateVCPUs: 2, TemplateMemoryMB: 512}, ""},
		{"memory below base", "q35", with(cfg, func(c *hypervisor.VMConfig) { c.BaseMemoryMB = 1024 }), hypervisor.VMConfig{}, "memory 512 MiB: below the base memory (1024 MiB)"},
		{"base too small", "q35", with(cfg, func(c *hypervisor.VMConfig) { c.BaseMemoryMB = 32 }), hypervisor.VMConfig{}, "base memory 32 MiB: want at least 64"},
		{"negative", "q35", with(cfg, func(c *hypervisor.VMConfig) { c.MaxVCPUs = -1 }), hypervisor.VMConfig{}, "max vcpus -1: want 0 or more"},
		{"template above max vcpus", "q35", with(cfg, func(c *hypervisor.VMConfig) { c.MaxVCPUs, c.TemplateVCPUs = 4, 5 }), hypervisor.VMConfig{}, "template vcpus 5: more than max vcpus (4)"},
		{"template above max memory", "q35", with(cfg, func(c *hypervisor.VMConfig) { c.BaseMemoryMB, c.MaxMemoryMB, c.TemplateMemoryMB = 256, 1024, 2048 }),
			hypervisor.VMConfig{}, "template memory 2048 MiB: want 256 to 1024 MiB"},
		{"template below base", "q35", with(cfg, func(c *hypervisor.VMConfig) { c.BaseMemoryMB, c.MaxMemoryMB, c.TemplateMemoryMB = 256, 1024, 128 }),
			hypervisor.VMConfig{}, "template memory 128 MiB: want 256 to 1024 MiB"},
		{"max not in blocks", "q35", with(cfg, func(c *hypervisor.VMConfig) { c.BaseMemoryMB, c.MaxMemoryMB = 256, 1025 }),
			hypervisor.VMConfig{}, "max memory 1025 MiB: 769 MiB above the base memory (256 MiB), want a multiple of 2 MiB"},
		{"memory not in blocks", "q35", with(cfg, func(c *hypervisor.VMConfig) { c.MemoryMB, c.BaseMemoryMB, c.MaxMemoryMB = 513, 256, 1024 }),
			hypervisor.VMConfig{}, "memory 513 MiB: 257 MiB above the base memory"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := checkSize(tc.cfg, tc.machine)
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("got %v, want an error with %q", err, tc.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			w := tc.cfg
			w.VCPUs, w.MemoryMB, w.MaxVCPUs, w.MaxMemoryMB, w.BaseMemoryMB, w.TemplateVCPUs, w.TemplateMemoryMB = tc.want.VCPUs, tc.want.MemoryMB, tc.want.MaxVCPUs, tc.want.MaxMemoryMB, tc.want.BaseMemoryMB, tc.want.TemplateVCPUs, tc.want.TemplateMemoryMB
			if !reflect.DeepEqual(got, w) {
				t.Errorf("got %+v, want %+v", got, tc.want)
			}
		})
	}
}

// One template serves every size: the key holds the template size and the
// headroom, not the VM's own size.
func TestTemplateKeySize(t *testing.T) {
	dir := t.TempDir()
	var files []string
	for _, name := range []string{"qemu", "vmlinux", "initrd.img"} {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(name), 0o644); err != nil {
			t.Fatal(err)
		}
		files = append(files, p)
	}
	d := &Driver{path: files[0], machine: "q35", accel: accelTCG}
	cfg := hypervisor.VMConfig{
		ID: "pod", Dir: "/run/vm", VCPUs: 2, MemoryMB: 768, Channel: hypervisor.ChannelSerial, AgentPort: testAgentPort,
		MaxVCPUs: 4, BaseMemoryMB: 256, MaxMemoryMB: 2048, TemplateVCPUs: 1, TemplateMemoryMB: 256,
		Kernel: files[1], Initrd: files[2], TemplateDir: dir,
	}
	key := func(c hypervisor.VMConfig) string {
		t.Helper()
		c, err := checkSize(c, "q35")
		if err != nil {
			t.Fatal(err)
		}
		k, err := d.templateKey(c)
		if err != nil {
			t.Fatal(err)
		}
		return k
	}
	k := key(cfg)
	if other := key(with(cfg, func(c *hypervisor.VMConfig) { c.VCPUs, c.MemoryMB = 3, 1024 })); other != k {
		t.Errorf("a VM of another size has another template key: %s, %s", k, other)
	}
	for name, f := range map[string]func(*hypervisor.VMConfig){
		"max vcpus":       func(c *hypervisor.VMConfig) { c.MaxVCPUs = 3 },
		"max memory":      func(c *hypervisor.VMConfig) { c.MaxMemoryMB = 4096 },
		"base memory":     func(c *hypervisor.VMConfig) { c.BaseMemoryMB = 128 },
		"template vcpus":  func(c *hypervisor.VMConfig) { c.TemplateVCPUs = 2 },
		"template memory": func(c *hypervisor.VMConfig) { c.TemplateMemoryMB = 512 },
	} {
		if key(with(cfg, f)) == k {
			t.Errorf("another %s, the same template key", name)
		}
	}
}

// sizeIs checks the VM's size.
func sizeIs(t *testing.T, ctx context.Context, vm hypervisor.VM, want hypervisor.Size) {
	t.Helper()
	got, err := vm.Size(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if got != want {
		t.Errorf("size %+v, want %+v", got, want)
	}
}

// threadsAre checks VCPUThreads gives n distinct thread ids.
func threadsAre(t *testing.T, ctx context.Context, vm hypervisor.VM, n int) {
	t.Helper()
	tids, err := vm.VCPUThreads(ctx)
	if err != nil {
		t.Fatal(err)
	}
	distinct := slices.Compact(slices.Sorted(slices.Values(tids)))
	if len(tids) != n || len(distinct) != n || slices.Contains(tids, 0) {
		t.Errorf("vCPU threads %v, want %d distinct ones", tids, n)
	}
}

// TestResize grows and shrinks a booted guest's vCPUs and memory.
func TestResize(t *testing.T) {
	ctx, _ := testContext(t)
	d := newDriver(t, "q35")
	dir := vmDir(t)
	vm, err := d.Start(ctx, hypervisor.VMConfig{
		ID: "resize", Dir: dir, Channel: hypervisor.ChannelSerial, AgentPort: testAgentPort,
		VCPUs: 1, MaxVCPUs: 3, MemoryMB: 256, MaxMemoryMB: 1280,
	})
	if err != nil {
		t.Fatal(err)
	}
	defer stopped(t, vm, dir)
	// Every step is bounded by the driver; this bounds the whole test.
	ctx, cancel := context.WithTimeout(ctx, 5*time.Minute)
	defer cancel()
	readAgent(t, ctx, vm) // the guest's drivers are loaded
	sizeIs(t, ctx, vm, hypervisor.Size{VCPUs: 1, MemoryMB: 256})
	threadsAre(t, ctx, vm, 1)

	begin := time.Now()
	if err := vm.SetVCPUs(ctx, 2); err != nil {
		t.Fatal(err)
	}
	t.Logf("1 vCPU plugged in %v", time.Since(begin))
	if err := vm.SetVCPUs(ctx, 3); err != nil {
		t.Fatal(err)
	}
	sizeIs(t, ctx, vm, hypervisor.Size{VCPUs: 3, MemoryMB: 256})
	threadsAre(t, ctx, vm, 3)

	begin = time.Now()
	if err := vm.SetMemory(ctx, 768); err != nil {
		t.Fatal(err)
	}
	t.Logf("512 MiB plugged in %v", time.Since(begin))
	sizeIs(t, ctx, vm, hypervisor.Size{VCPUs: 3, MemoryMB: 768, PluggedMB: 512})

	// Out of range: an error naming the limit, and no change.
	for _, tc := range []struct {
		name string
		do   func() error
		want string
	}{
		{"no vCPUs", func() error { return vm.SetVCPUs(ctx, 0) }, "want 1 to 3 vCPUs (max vcpus 3)"},
		{"beyond max vcpus", func() error { return vm.SetVCPUs(ctx, 4) }, "want 1 to 3 vCPUs (max vcpus 3)"},
		{"below base memory", func() error { return vm.SetMemory(ctx, 128) }, "want 256 to 1280 MiB (base memory 256 MiB, max memory 1280 MiB)"},
		{"beyond max memory", func() error { return vm.SetMemory(ctx, 2048) }, "want 256 to 1280 MiB"},
	} {
		if err := tc.do(); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: got %v, want an error with %q", tc.name, err, tc.want)
		}
	}
	sizeIs(t, ctx, vm, hypervisor.Size{VCPUs: 3, MemoryMB: 768, PluggedMB: 512})

	begin = time.Now()
	if err := vm.SetMemory(ctx, 256); err != nil {
		t.Fatal(err)
	}
	t.Logf("512 MiB unplugged in %v", time.Since(begin))
	sizeIs(t, ctx, vm, hypervisor.Size{VCPUs: 3, MemoryMB: 256})

	begin = time.Now()
	if err := vm.SetMemory(ctx, 1280); err != nil {
		t.Fatal(err)
	}
	t.Logf("1 GiB plugged in %v", time.Since(begin))
	sizeIs(t, ctx, vm, hypervisor.Size{VCPUs: 3, MemoryMB: 1280, PluggedMB: 1024})

	// An odd size: virtio-mem plugs whole 2 MiB blocks, the balloon takes
	// the extra MiB.
	if err := vm.SetMemory(ctx, 257); err != nil {
		t.Fatal(err)
	}
	sizeIs(t, ctx, vm, hypervisor.Size{VCPUs: 3, MemoryMB: 257, PluggedMB: 2, BalloonMB: 1})
	if err := vm.SetMemory(ctx, 256); err != nil {
		t.Fatal(err)
	}
	sizeIs(t, ctx, vm, hypervisor.Size{VCPUs: 3, MemoryMB: 256})

	begin = time.Now()
	if err := vm.SetVCPUs(ctx, 1); err != nil {
		t.Fatal(err)
	}
	t.Logf("2 vCPUs unplugged in %v", time.Since(begin))
	sizeIs(t, ctx, vm, hypervisor.Size{VCPUs: 1, MemoryMB: 256})
	threadsAre(t, ctx, vm, 1)

	if d.accel == accelTCG {
		// QEMU 7.2 under TCG dies plugging a vCPU after an unplug: the
		// driver refuses instead.
		if err := vm.SetVCPUs(ctx, 2); !errors.Is(err, hypervisor.ErrNotResizable) {
			t.Errorf("plugging a vCPU after an unplug under TCG: got %v, want ErrNotResizable", err)
		}
		sizeIs(t, ctx, vm, hypervisor.Size{VCPUs: 1, MemoryMB: 256})
	}
	// The guest still runs.
	readAgent(t, ctx, vm)
}

// TestResizeMicrovm: microvm has no hot-plug; asking for the size it has is
// fine, anything else ErrNotResizable.
func TestResizeMicrovm(t *testing.T) {
	ctx, _ := testContext(t)
	dir := vmDir(t)
	vm, err := newDriver(t, "microvm").Start(ctx, hypervisor.VMConfig{
		ID: "resize-microvm", Dir: dir, Channel: hypervisor.ChannelSerial, AgentPort: testAgentPort,
		VCPUs: 1, MaxVCPUs: 2, MemoryMB: 256, MaxMemoryMB: 512,
	})
	if err != nil {
		t.Fatal(err)
	}
	defer stopped(t, vm, dir)
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	if err := vm.SetVCPUs(ctx, 1); err != nil {
		t.Errorf("SetVCPUs to the current size: %v", err)
	}
	if err := vm.SetMemory(ctx, 256); err != nil {
		t.Errorf("SetMemory to the current size: %v", err)
	}
	if err := vm.SetVCPUs(ctx, 2); !errors.Is(err, hypervisor.ErrNotResizable) {
		t.Errorf("SetVCPUs: got %v, want ErrNotResizable", err)
	}
	if err := vm.SetMemory(ctx, 512); !errors.Is(err, hypervisor.ErrNotResizable) {
		t.Errorf("SetMemory: got %v, want ErrNotResizable", err)
	}
	sizeIs(t, ctx, vm, hypervisor.Size{VCPUs: 1, MemoryMB: 256})
	readAgent(t, ctx, vm) // a balloon does not keep it from booting
}

// TestTemplateResize: a template taken at the smallest size serves a clone
// of a bigger size, and then one of its own size.
func TestTemplateResize(t *testing.T) {
	ctx, logs := testContext(t)
	d := newDriver(t, "q35")
	templates := templateDir(t)
	cfg := hypervisor.VMConfig{
		Channel: hypervisor.ChannelSerial, AgentPort: testAgentPort, TemplateDir: templates,
		MaxVCPUs: 3, MaxMemoryMB: 1280, BaseMemoryMB: 256, TemplateVCPUs: 1, TemplateMemoryMB: 256,
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Minute)
	defer cancel()
	for i, size := range []hypervisor.Size{{VCPUs: 2, MemoryMB: 768, PluggedMB: 512}, {VCPUs: 1, MemoryMB: 256}} {
		dir := vmDir(t)
		c := cfg
		c.ID, c.Dir, c.VCPUs, c.MemoryMB = "clone"+string(rune('0'+i)), dir, size.VCPUs, size.MemoryMB
		begin := time.Now()
		vm, err := d.Start(ctx, c)
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("clone %d of %+v started in %v", i, size, time.Since(begin))
		if !slices.Contains(vm.(*VM).cmd.Args, "-incoming") {
			t.Errorf("clone %d: not restored from a template: %q", i, vm.(*VM).cmd.Args)
		}
		// QEMU has the vCPUs at once; the guest plugs the memory soon.
		if got, err := vm.Size(ctx); err != nil || got.VCPUs != size.VCPUs {
			t.Errorf("clone %d: size %+v (%v), want %d vCPUs at once", i, got, err, size.VCPUs)
		}
		var got hypervisor.Size
		err = vm.(*VM).waitUntil(ctx, time.Minute, func(ctx context.Context) (bool, error) {
			got, err = vm.Size(ctx)
			return got == size, err
		})
		if err != nil {
			t.Errorf("clone %d: size %+v, want %+v: %v", i, got, size, err)
		}
		t.Logf("clone %d at its size %v after Start", i, time.Since(begin))
		readAgent(t, ctx, vm)
		threadsAre(t, ctx, vm, size.VCPUs)
		if i == 0 {
			// The restored virtio-mem device unplugs too; a clone has no
			// balloon (its memory is the template's file).
			if err := vm.SetMemory(ctx, 512); err != nil {
				t.Error(err)
			}
			sizeIs(t, ctx, vm, hypervisor.Size{VCPUs: 2, MemoryMB: 512, PluggedMB: 256})
		}
		stopped(t, vm, dir)
	}
	if n := strings.Count(logs.String(), "qemu: template made"); n != 1 {
		t.Errorf("%d templates made for two sizes, want 1", n)
	}
	if n := strings.Count(logs.String(), "qemu: started from a template"); n != 2 {
		t.Errorf("%d VMs started from a template, want 2", n)
	}
}

// TestResizeColdPlugged: the vCPUs a VM boots with beyond the first are
// devices, which a running guest ejects.
func TestResizeColdPlugged(t *testing.T) {
	ctx, _ := testContext(t)
	dir := vmDir(t)
	vm, err := newDriver(t, "q35").Start(ctx, hypervisor.VMConfig{
		ID: "cold-plugged", Dir: dir, Channel: hypervisor.ChannelSerial, AgentPort: testAgentPort,
		VCPUs: 2, MaxVCPUs: 3, MemoryMB: 256,
	})
	if err != nil {
		t.Fatal(err)
	}
	defer stopped(t, vm, dir)
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	readAgent(t, ctx, vm)
	sizeIs(t, ctx, vm, hypervisor.Size{VCPUs: 2, MemoryMB: 256})
	threadsAre(t, ctx, vm, 2)
	begin := time.Now()
	if err := vm.SetVCPUs(ctx, 1); err != nil {
		t.Fatal(err)
	}
	t.Logf("a vCPU online in the guest unplugged in %v", time.Since(begin))
	sizeIs(t, ctx, vm, hypervisor.Size{VCPUs: 1, MemoryMB: 256})
	threadsAre(t, ctx, vm, 1)
	readAgent(t, ctx, vm)
}

// templateDir is a template directory for a test: the driver mounts a
// ramfs on it (ramfs.go), which goes before the directory is removed.
func templateDir(t *testing.T) string {
	dir := t.TempDir()
	t.Cleanup(func() {
		if err := ReleaseTemplates(dir); err != nil {
			t.Error(err)
		}
	})
	return dir
}
