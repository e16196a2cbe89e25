package qemu

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/colo-runtime/colo/hypervisor"
)

// Resizing a running VM (q35 only; microvm has no hot-plug).
//
// vCPUs: with headroom (MaxVCPUs > VCPUs) the VM boots "-smp
// 1,sockets=1,cores=Max,threads=1,maxcpus=Max" and its other vCPUs are
// cold-plugged as "-device <cpu>,id=cpu<i>,socket-id=0,core-id=<i>,thread-id=0",
// so that every vCPU but the first is a device that device_del can unplug.
// vCPU index i is core i. SetVCPUs plugs the lowest free cores and unplugs
// the highest plugged ones; the guest ejects those through ACPI.
//
// Memory: with headroom (MaxMemoryMB > BaseMemoryMB) the VM boots with
// "-m Base,slots=1,maxmem=Max" and one virtio-mem device (vmem0) over a
// backend of Max-Base MiB that reserves nothing up front. The guest
// kernel's memhp_default_state=online_movable onlines what is plugged as
// movable memory, which it can unplug again. What the guest cannot unplug
// in time is taken by the balloon (balloon0, also reporting freed pages to
// the host), on every VM whose base memory is not a copy-on-write mapping
// of a template's memory file (see hasBalloon).
const (
	// blockMB is virtio-mem's block size: plugged memory is a multiple.
	blockMB = 2
	// vmemID is the virtio-mem device, vmemBackend its memory backend.
	vmemID      = "vmem0"
	vmemBackend = "vmem"
	// balloonID is the balloon device.
	balloonID = "balloon0"
	mib       = 1 << 20
)

// Bounds of the waits of SetVCPUs and SetMemory when the caller's context
// allows longer: nothing waits on the guest without a bound.
const (
	// unplugTimeout bounds waiting for the guest to eject vCPUs.
	unplugTimeout = time.Minute
	// plugTimeout bounds waiting for the guest to plug memory.
	plugTimeout = time.Minute
	// unplugMemoryWait is how long SetMemory lets the guest go without
	// unplugging any memory before the balloon takes the rest: a guest
	// that keeps unplugging (slowly, on a busy host) is waited for, up to
	// plugTimeout in all.
	unplugMemoryWait = 5 * time.Second
	// balloonTimeout bounds waiting for the balloon to reach its target.
	balloonTimeout = 30 * time.Second
	// pollInterval is how often a wait asks QEMU again; events (device
	// deleted, balloon and memory size changes) wake it earlier.
	pollInterval = 100 * time.Millisecond
)

// sizing is a launch's size and headroom, with VMConfig's zeros and
// microvm's lack of hot-plug resolved.
type sizing struct {
	vcpus, maxVCPUs int
	// baseMB is -m, memoryMB what the VM starts with (base + plugged),
	// maxMB the most it can have.
	baseMB, memoryMB, maxMB int
	// cpuHotplug: the VM boots one vCPU and cold-plugs the others.
	cpuHotplug bool
	// virtioMem: the VM has a virtio-mem device of maxMB-baseMB.
	virtioMem bool
	// balloon: the VM has a balloon.
	balloon bool
}

// sizing resolves the launch's sizes.
func (l launch) sizing() sizing {
	c := l.vm
	s := sizing{vcpus: c.VCPUs, maxVCPUs: c.VCPUs, baseMB: c.MemoryMB, memoryMB: c.MemoryMB, maxMB: c.MemoryMB}
	if l.machine == "q35" {
		s.maxVCPUs = max(c.MaxVCPUs, c.VCPUs)
		if c.BaseMemoryMB > 0 {
			s.baseMB = min(c.BaseMemoryMB, c.MemoryMB)
		}
		s.maxMB = max(c.MaxMemoryMB, c.MemoryMB)
		s.cpuHotplug = s.maxVCPUs > s.vcpus
		s.virtioMem = s.maxMB > s.baseMB
	}
	s.balloon = l.hasBalloon()
	return s
}

// hasBalloon tells whether the VM gets a balloon: every VM but those whose
// memory is a template's file that can lose pages. QEMU 7.2 discards a
// page the guest gives the balloon, or reports free, by punching a hole in
// the file behind it, even in a private (copy-on-write) mapping: in a
// clone that would zero the template's page under every other clone
// (measured: inflating a balloon in a VM on a share=off file shrank the
// file). On a ramfs the punch fails instead (ramfs.go). The template
// decides for its clones, which must have its devices: both look at the
// same directory.
func (l launch) hasBalloon() bool {
	return l.memPath == "" || onRAMFS(filepath.Dir(l.memPath))
}

// cpuDriver is QEMU's vCPU device type for the accelerator's -cpu.
func cpuDriver(accel string) string {
	if accel == accelKVM {
		return "host-x86_64-cpu"
	}
	return "max-x86_64-cpu"
}

// cpuID is the device id of the vCPU on core i.
func cpuID(core int) string { return "cpu" + strconv.Itoa(core) }

// sizeArgs are the command line's vCPU and memory arguments, before the
// memory backend of the base memory.
func (l launch) sizeArgs() []string {
	s := l.sizing()
	var a []string
	if s.cpuHotplug {
		a = append(a, "-smp", fmt.Sprintf("1,sockets=1,cores=%d,threads=1,maxcpus=%d", s.maxVCPUs, s.maxVCPUs))
	} else {
		a = append(a, "-smp", strconv.Itoa(s.vcpus))
	}
	if s.virtioMem {
		a = append(a, "-m", fmt.Sprintf("%dM,slots=1,maxmem=%dM", s.baseMB, s.maxMB))
	} else {
		a = append(a, "-m", strconv.Itoa(s.baseMB)+"M")
	}
	return a
}

// hotplugArgs are the cold-plugged vCPUs and the virtio-mem device with
// its backend, which shares memory when the base memory does (virtio-fs's
// daemon maps all guest memory).
func (l launch) hotplugArgs(sharedMemory bool) []string {
	s := l.sizing()
	var a []string
	if s.cpuHotplug {
		for i := 1; i < s.vcpus; i++ {
			a = append(a, "-device", fmt.Sprintf("%s,id=%s,socket-id=0,core-id=%d,thread-id=0", cpuDriver(l.accel), cpuID(i), i))
		}
	}
	if s.virtioMem {
		backend := fmt.Sprintf("memory-backend-ram,id=%s,size=%dM,reserve=off", vmemBackend, s.maxMB-s.baseMB)
		if sharedMemory {
			backend = fmt.Sprintf("memory-backend-memfd,id=%s,size=%dM,share=on,reserve=off", vmemBackend, s.maxMB-s.baseMB)
		}
		a = append(a,
			"-object", backend,
			"-device", fmt.Sprintf("virtio-mem-pci,id=%s,memdev=%s,block-size=%dM,requested-size=%dM", vmemID, vmemBackend, blockMB, s.memoryMB-s.baseMB),
		)
	}
	return a
}

// balloonArg is the balloon device: free-page-reporting hands the host
// what the guest frees, deflate-on-oom gives the guest back what it needs
// before its OOM killer runs.
func (l launch) balloonArg(transport string) []string {
	if !l.hasBalloon() {
		return nil
	}
	return []string{"-device", fmt.Sprintf("virtio-balloon-%s,id=%s,free-page-reporting=on,deflate-on-oom=on", transport, balloonID)}
}

// checkSize checks cfg's sizes (complete has filled in the defaults) and
// resolves its zeros: Max* at least the starting size, BaseMemoryMB
// MemoryMB when 0, Template* the starting size when 0.
func checkSize(cfg hypervisor.VMConfig, machine string) (hypervisor.VMConfig, error) {
	for _, f := range []struct {
		name string
		v    int
	}{{"max vcpus", cfg.MaxVCPUs}, {"max memory", cfg.MaxMemoryMB}, {"base memory", cfg.BaseMemoryMB}, {"template vcpus", cfg.TemplateVCPUs}, {"template memory", cfg.TemplateMemoryMB}} {
		if f.v < 0 {
			return cfg, fmt.Errorf("%s %d: want 0 or more", f.name, f.v)
		}
	}
	if cfg.BaseMemoryMB == 0 {
		cfg.BaseMemoryMB = cfg.MemoryMB
	}
	if cfg.TemplateVCPUs == 0 {
		cfg.TemplateVCPUs = cfg.VCPUs
	}
	if cfg.TemplateMemoryMB == 0 {
		cfg.TemplateMemoryMB = cfg.MemoryMB
	}
	if machine != "q35" {
		// No hot-plug: the VM keeps its starting size.
		cfg.MaxVCPUs, cfg.MaxMemoryMB, cfg.BaseMemoryMB = cfg.VCPUs, cfg.MemoryMB, cfg.MemoryMB
		cfg.TemplateVCPUs, cfg.TemplateMemoryMB = cfg.VCPUs, cfg.MemoryMB
		return cfg, nil
	}
	if cfg.BaseMemoryMB < 64 {
		return cfg, fmt.Errorf("base memory %d MiB: want at least 64", cfg.BaseMemoryMB)
	}
	cfg.MaxVCPUs = max(cfg.MaxVCPUs, cfg.VCPUs)
	cfg.MaxMemoryMB = max(cfg.MaxMemoryMB, cfg.MemoryMB)
	switch {
	case cfg.MemoryMB < cfg.BaseMemoryMB:
		return cfg, fmt.Errorf("memory %d MiB: below the base memory (%d MiB)", cfg.MemoryMB, cfg.BaseMemoryMB)
	case cfg.TemplateVCPUs > cfg.MaxVCPUs:
		return cfg, fmt.Errorf("template vcpus %d: more than max vcpus (%d)", cfg.TemplateVCPUs, cfg.MaxVCPUs)
	case cfg.TemplateMemoryMB < cfg.BaseMemoryMB || cfg.TemplateMemoryMB > cfg.MaxMemoryMB:
		return cfg, fmt.Errorf("template memory %d MiB: want %d to %d MiB (base to max memory)", cfg.TemplateMemoryMB, cfg.BaseMemoryMB, cfg.MaxMemoryMB)
	}
	if cfg.MaxMemoryMB > cfg.BaseMemoryMB {
		for _, f := range []struct {
			name string
			v    int
		}{{"max memory", cfg.MaxMemoryMB}, {"memory", cfg.MemoryMB}, {"template memory", cfg.TemplateMemoryMB}} {
			if (f.v-cfg.BaseMemoryMB)%blockMB != 0 {
				return cfg, fmt.Errorf("%s %d MiB: %d MiB above the base memory (%d MiB), want a multiple of %d MiB (virtio-mem's block)", f.name, f.v, f.v-cfg.BaseMemoryMB, cfg.BaseMemoryMB, blockMB)
			}
		}
	}
	return cfg, nil
}

// notifyResize wakes a wait of SetVCPUs or SetMemory on an event that may
// end it.
func (vm *VM) notifyResize(name string) {
	switch name {
	case "DEVICE_DELETED", "ACPI_DEVICE_OST", "BALLOON_CHANGE", "MEMORY_DEVICE_SIZE_CHANGE":
		select {
		case vm.resizeEvent <- struct{}{}:
		default:
		}
	}
}

// errWaitTimeout ends a wait that ran into its own bound.
var errWaitTimeout = errors.New("timed out")

// waitUntil calls done until it says so, an error, QEMU exits, ctx ends or
// limit passes, asking again on events and every pollInterval.
func (vm *VM) waitUntil(ctx context.Context, limit time.Duration, done func(context.Context) (bool, error)) error {
	timeout := time.NewTimer(limit)
	defer timeout.Stop()
	for {
		ok, err := done(ctx)
		if err != nil || ok {
			return err
		}
		select {
		case <-ctx.Done():
			return context.Cause(ctx)
		case <-vm.done:
			return errExited
		case <-timeout.C:
			return fmt.Errorf("%w after %s", errWaitTimeout, limit)
		case <-vm.resizeEvent:
		case <-time.After(pollInterval):
		}
	}
}

// hotpluggableCPU is an entry of query-hotpluggable-cpus.
type hotpluggableCPU struct {
	Type    string         `json:"type"`
	Props   map[string]any `json:"props"`
	QOMPath string         `json:"qom-path"`
}

func (c hotpluggableCPU) core() int {
	n, _ := c.Props["core-id"].(float64)
	return int(n)
}

// cpuSlots are the VM's vCPU slots by core (vCPU index).
func (vm *VM) cpuSlots(ctx context.Context) ([]hotpluggableCPU, error) {
	raw, err := vm.qmp.Execute(ctx, "query-hotpluggable-cpus", nil)
	if err != nil {
		return nil, err
	}
	var slots []hotpluggableCPU
	if err := json.Unmarshal(raw, &slots); err != nil {
		return nil, fmt.Errorf("query-hotpluggable-cpus: %w", err)
	}
	slices.SortFunc(slots, func(a, b hotpluggableCPU) int { return cmp.Compare(a.core(), b.core()) })
	return slots, nil
}

// vcpuCount is how many vCPUs QEMU has.
func (vm *VM) vcpuCount(ctx context.Context) (int, error) {
	raw, err := vm.qmp.Execute(ctx, "query-cpus-fast", nil)
	if err != nil {
		return 0, err
	}
	var cpus []json.RawMessage
	if err := json.Unmarshal(raw, &cpus); err != nil {
		return 0, fmt.Errorf("query-cpus-fast: %w", err)
	}
	return len(cpus), nil
}

// SetVCPUs plugs vCPUs into the lowest free cores, or unplugs the highest
// plugged ones and waits (within ctx, at most unplugTimeout) until the
// guest has ejected them. Plugged vCPUs come up offline in the guest:
// onlining them is the agent's. The first vCPU is never unplugged.
//
// Under TCG, QEMU 7.2 corrupts its heap and dies when a vCPU is plugged
// after one was unplugged (measured: every time, hot- or cold-plugged), so
// a VM under TCG that unplugged a vCPU refuses to plug another.
func (vm *VM) SetVCPUs(ctx context.Context, n int) error {
	vm.resizeMu.Lock()
	defer vm.resizeMu.Unlock()
	if err := vm.setVCPUs(ctx, n, true); err != nil {
		return fmt.Errorf("qemu: vm %s: set vcpus to %d: %w", vm.id, n, err)
	}
	return nil
}

func (vm *VM) setVCPUs(ctx context.Context, n int, wait bool) error {
	s := vm.size
	if !s.cpuHotplug {
		have, err := vm.vcpuCount(ctx)
		if err != nil {
			return err
		}
		if n == have {
			return nil
		}
		return fmt.Errorf("%w: the VM has %d vCPUs and no headroom to plug or unplug any (%s)", hypervisor.ErrNotResizable, have, vm.noHeadroom("max vcpus"))
	}
	if n < 1 || n > s.maxVCPUs {
		return fmt.Errorf("want 1 to %d vCPUs (max vcpus %d)", s.maxVCPUs, s.maxVCPUs)
	}
	slots, err := vm.cpuSlots(ctx)
	if err != nil {
		return err
	}
	var plugged, free []hotpluggableCPU
	for _, c := range slots {
		if c.QOMPath != "" {
			plugged = append(plugged, c)
		} else {
			free = append(free, c)
		}
	}
	switch {
	case n > len(plugged):
		if vm.tcg && vm.cpuUnplugged {
			return fmt.Errorf("%w: under TCG, QEMU 7.2 crashes when a vCPU is plugged after one was unplugged, and this VM unplugged one", hypervisor.ErrNotResizable)
		}
		for _, c := range free[:n-len(plugged)] {
			dev := map[string]any{"driver": c.Type, "id": cpuID(c.core())}
			for k, v := range c.Props {
				dev[k] = v
			}
			if _, err := vm.qmp.Execute(ctx, "device_add", dev); err != nil {
				return fmt.Errorf("vCPU %d: %w", c.core(), err)
			}
			vm.logger.WithField("vcpu", c.core()).Debug("qemu: vCPU plugged")
		}
	case n < len(plugged):
		gone := plugged[n:]
		for _, c := range gone {
			id, ok := strings.CutPrefix(c.QOMPath, "/machine/peripheral/")
			if !ok {
				return fmt.Errorf("vCPU %d (%s) is no device that can be unplugged", c.core(), c.QOMPath)
			}
			vm.cpuUnplugged = true
			if _, err := vm.qmp.Execute(ctx, "device_del", map[string]any{"id": id}); err != nil {
				return fmt.Errorf("vCPU %d: %w", c.core(), err)
			}
		}
		if !wait {
			return nil
		}
		// QEMU 7.2 sends DEVICE_DELETED for a vCPU's lapic but not for
		// the vCPU: its slot emptying in query-hotpluggable-cpus is
		// what tells it went.
		var left []hotpluggableCPU
		err := vm.waitUntil(ctx, unplugTimeout, func(ctx context.Context) (bool, error) {
			slots, err := vm.cpuSlots(ctx)
			if err != nil {
				return false, err
			}
			left = left[:0]
			for _, c := range slots {
				if c.QOMPath != "" && c.core() >= n {
					left = append(left, c)
				}
			}
			if len(left) > 0 {
				return false, nil
			}
			// The slot empties before the vCPU's thread is gone from
			// query-cpus-fast (seen on a loaded host): VCPUThreads
			// needs both.
			tids, err := vm.VCPUThreads(ctx)
			return err == nil && len(tids) == n, nil
		})
		if err != nil {
			var names []string
			for _, c := range left {
				names = append(names, strconv.Itoa(c.core()))
			}
			if len(names) == 0 {
				return err
			}
			return fmt.Errorf("the guest did not eject vCPU %s (ACPI): %w", strings.Join(names, ", "), err)
		}
		vm.logger.WithField("vcpus", n).Debug("qemu: vCPUs unplugged")
	}
	return nil
}

// noHeadroom says why the VM cannot be resized.
func (vm *VM) noHeadroom(what string) string {
	if vm.machine != "q35" {
		return vm.machine + " has no hot-plug"
	}
	return what + " declared no more than the starting size"
}

// Size asks QEMU for the vCPUs, the plugged memory and the balloon.
func (vm *VM) Size(ctx context.Context) (hypervisor.Size, error) {
	sz, err := vm.currentSize(ctx)
	if err != nil {
		return sz, fmt.Errorf("qemu: vm %s: size: %w", vm.id, err)
	}
	return sz, nil
}

func (vm *VM) currentSize(ctx context.Context) (hypervisor.Size, error) {
	var sz hypervisor.Size
	var err error
	if sz.VCPUs, err = vm.vcpuCount(ctx); err != nil {
		return sz, err
	}
	if vm.size.virtioMem {
		b, err := vm.pluggedBytes(ctx)
		if err != nil {
			return sz, err
		}
		sz.PluggedMB = int(b / mib)
	}
	if vm.size.balloon {
		actual, err := vm.balloonActual(ctx)
		if err != nil {
			return sz, err
		}
		sz.BalloonMB = int((int64(vm.size.baseMB)*mib - actual + mib/2) / mib)
	}
	sz.MemoryMB = vm.size.baseMB + sz.PluggedMB - sz.BalloonMB
	return sz, nil
}

// pluggedBytes is the memory the guest has plugged (virtio-mem's size).
func (vm *VM) pluggedBytes(ctx context.Context) (int64, error) {
	raw, err := vm.qmp.Execute(ctx, "qom-get", map[string]any{"path": "/machine/peripheral/" + vmemID, "property": "size"})
	if err != nil {
		return 0, err
	}
	var b int64
	if err := json.Unmarshal(raw, &b); err != nil {
		return 0, fmt.Errorf("qom-get %s size: %w", vmemID, err)
	}
	return b, nil
}

// balloonActual is the base memory the balloon leaves the guest, in bytes
// (query-balloon's actual: -m less what the balloon holds).
func (vm *VM) balloonActual(ctx context.Context) (int64, error) {
	raw, err := vm.qmp.Execute(ctx, "query-balloon", nil)
	if err != nil {
		return 0, err
	}
	var b struct {
		Actual int64 `json:"actual"`
	}
	if err := json.Unmarshal(raw, &b); err != nil {
		return 0, fmt.Errorf("query-balloon: %w", err)
	}
	return b.Actual, nil
}

// setRequested asks the guest to plug mb MiB of virtio-mem memory.
func (vm *VM) setRequested(ctx context.Context, mb int) error {
	_, err := vm.qmp.Execute(ctx, "qom-set", map[string]any{"path": "/machine/peripheral/" + vmemID, "property": "requested-size", "value": int64(mb) * mib})
	return err
}

// SetMemory plugs or unplugs virtio-mem memory, and inflates or deflates
// the balloon, until the guest has mb MiB:
//
//   - the memory plugged is mb-base rounded up to virtio-mem's 2 MiB
//     block; the balloon takes the MiB rounding adds;
//   - to grow, the balloon is first deflated fully, then the guest plugs
//     (waited for within ctx, at most plugTimeout);
//   - to shrink, the guest gets unplugMemoryWait (within ctx) to unplug,
//     and the balloon takes what it did not (waited for within ctx, at
//     most balloonTimeout). Without a balloon (clones sharing their
//     template's memory) that is an error.
//
// On an error the VM keeps what it reached; virtio-mem's requested size
// and the balloon's target stay set, so the guest may get there later.
func (vm *VM) SetMemory(ctx context.Context, mb int) error {
	vm.resizeMu.Lock()
	defer vm.resizeMu.Unlock()
	if err := vm.setMemory(ctx, mb); err != nil {
		return fmt.Errorf("qemu: vm %s: set memory to %d MiB: %w", vm.id, mb, err)
	}
	return nil
}

func (vm *VM) setMemory(ctx context.Context, mb int) error {
	s := vm.size
	cur, err := vm.currentSize(ctx)
	if err != nil {
		return err
	}
	if !s.virtioMem {
		if mb == cur.MemoryMB {
			return nil
		}
		return fmt.Errorf("%w: the VM has %d MiB and no headroom to plug or unplug memory (%s)", hypervisor.ErrNotResizable, cur.MemoryMB, vm.noHeadroom("max memory"))
	}
	if mb < s.baseMB || mb > s.maxMB {
		return fmt.Errorf("want %d to %d MiB (base memory %d MiB, max memory %d MiB)", s.baseMB, s.maxMB, s.baseMB, s.maxMB)
	}
	plug := (mb - s.baseMB + blockMB - 1) / blockMB * blockMB
	if mb > cur.MemoryMB && cur.BalloonMB > 0 {
		if err := vm.setBalloon(ctx, 0); err != nil {
			return fmt.Errorf("deflating the balloon: %w", err)
		}
	}
	if err := vm.setRequested(ctx, plug); err != nil {
		return err
	}
	var plugged int64
	if plug != cur.PluggedMB {
		// Unplugging stalls where the guest cannot move what is in a
		// block; progress resets the stall clock.
		last, progress := int64(cur.PluggedMB)*mib, time.Now()
		err := vm.waitUntil(ctx, plugTimeout, func(ctx context.Context) (bool, error) {
			var err error
			if plugged, err = vm.pluggedBytes(ctx); err != nil {
				return false, err
			}
			if plugged == int64(plug)*mib {
				return true, nil
			}
			if plug < cur.PluggedMB {
				if plugged < last {
					last, progress = plugged, time.Now()
				} else if time.Since(progress) > unplugMemoryWait {
					return false, fmt.Errorf("%w: no memory unplugged for %s", errWaitTimeout, unplugMemoryWait)
				}
			}
			return false, nil
		})
		switch {
		case err == nil:
		case plug < cur.PluggedMB && errors.Is(err, errWaitTimeout):
			// The balloon takes the rest.
		case plug > cur.PluggedMB:
			return fmt.Errorf("the guest plugged %d of %d MiB (virtio-mem): %w", plugged/mib, plug, err)
		default:
			return err
		}
	} else if plugged, err = vm.pluggedBytes(ctx); err != nil {
		return err
	}
	// What the guest has beyond mb: the rounding, or what it did not
	// unplug.
	extra := s.baseMB + int((plugged+mib-1)/mib) - mb
	if extra > 0 && !s.balloon {
		return fmt.Errorf("the guest still has %d MiB plugged (%d MiB more than asked) and the VM has no balloon to take them", plugged/mib, extra)
	}
	if extra > s.baseMB {
		return fmt.Errorf("the guest still has %d MiB plugged, more than the balloon can take (%d MiB more than asked)", plugged/mib, extra)
	}
	if s.balloon && (extra > 0 || cur.BalloonMB > 0) {
		if err := vm.setBalloon(ctx, max(extra, 0)); err != nil {
			return fmt.Errorf("the guest unplugged down to %d MiB; the balloon: %w", plugged/mib, err)
		}
	}
	vm.logger.WithFields(map[string]any{"memory_mb": mb, "plugged_mb": plugged / mib, "balloon_mb": max(extra, 0)}).Debug("qemu: memory resized")
	return nil
}

// setBalloon makes the balloon hold mb MiB of the guest's memory and
// waits until it does (within ctx, at most balloonTimeout).
func (vm *VM) setBalloon(ctx context.Context, mb int) error {
	target := int64(vm.size.baseMB-mb) * mib
	if _, err := vm.qmp.Execute(ctx, "balloon", map[string]any{"value": target}); err != nil {
		return err
	}
	var actual int64
	err := vm.waitUntil(ctx, balloonTimeout, func(ctx context.Context) (bool, error) {
		var err error
		actual, err = vm.balloonActual(ctx)
		return actual == target, err
	})
	if err != nil {
		return fmt.Errorf("it holds %d MiB, the target is %d MiB: %w", int64(vm.size.baseMB)-actual/mib, mb, err)
	}
	return nil
}

// resizeClone takes a VM restored from a template of another size to
// vcpus and memoryMB without waiting for the guest: vCPUs are plugged (or
// unplugged) and virtio-mem's requested size set; the guest plugs the
// memory as it gets to it.
func (vm *VM) resizeClone(ctx context.Context, vcpus, memoryMB int) error {
	vm.resizeMu.Lock()
	defer vm.resizeMu.Unlock()
	if vm.size.cpuHotplug && vcpus != vm.size.vcpus {
		if err := vm.setVCPUs(ctx, vcpus, false); err != nil {
			return fmt.Errorf("vcpus %d: %w", vcpus, err)
		}
	}
	if vm.size.virtioMem && memoryMB != vm.size.memoryMB {
		if err := vm.setRequested(ctx, memoryMB-vm.size.baseMB); err != nil {
			return fmt.Errorf("memory %d MiB: %w", memoryMB, err)
		}
	}
	return nil
}
