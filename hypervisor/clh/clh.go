// Package clh runs colo's VMs with Cloud Hypervisor (CH), driven over its
// REST API on a unix socket: a PVH kernel and initrd booted directly,
// virtio devices for everything, hybrid vsock (a unix socket CH serves) for
// the agent, and virtio-mem and CPU hot-plug for resizing.
//
// The driver's files in VMConfig.Dir are clh-api.sock (the API), clh.sock
// (the guest's vsock as CH serves it to the host), clh-console (a FIFO the
// guest's serial console is written to) and clh.pid. CH creates the
// sockets; the driver creates the FIFO and the pid file.
//
// Not supported, with a clear error at Start or on the call: the serial
// agent channel and 9p shares (CH has neither virtio-serial nor 9p), NICs
// other than virtio-net, disks other than virtio-blk. Templates
// (VMConfig.TemplateDir) are ignored: every VM boots.
package clh

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/containerd/log"
	"golang.org/x/sys/unix"

	"github.com/colo-runtime/colo/config"
	"github.com/colo-runtime/colo/hypervisor"
	"github.com/colo-runtime/colo/vfio"
)

// Names of the driver's files in VMConfig.Dir.
const (
	APISocket   = "clh-api.sock"
	VsockSocket = "clh.sock"
	ConsoleFIFO = "clh-console"
	PidFile     = "clh.pid"
)

// DefaultBinary is looked up in PATH when the configuration names none.
const DefaultBinary = "cloud-hypervisor"

// maxSocketPath is the longest path a unix socket can bind (sun_path is
// 108 bytes with the terminating NUL).
const maxSocketPath = 107

// guestCID is the guest's vsock CID. CH's vsock is its own (hybrid: the
// host side is a unix socket), not the host kernel's, so every VM can have
// the same one, as Kata's do.
const guestCID = 3

// memoryBlockMB is the unit memory above the base is plugged in: virtio-mem
// in CH plugs 2 MiB blocks, and its region is sized in 128 MiB steps
// (hotplugAlignMB).
const (
	memoryBlockMB  = 2
	hotplugAlignMB = 128
)

// baseKernelParams are the QEMU driver's (docs/platform-notes.md) where they
// apply to CH's machine: its serial port is the 16550 at ttyS0, it has one
// PCI bus per segment and an i8042 (only for reset). Left out is panic=-1:
// QEMU turns the reboot into an exit (-no-reboot), CH reboots the guest,
// which would throw away a panicked guest's memory before Dump; without it
// the panicked guest stays as it is, and the pvpanic event says so.
var baseKernelParams = []string{
	"console=ttyS0", "quiet", "loglevel=5", "mitigations=off", "tsc=reliable",
	"no_timer_check", "noreplace-smp", "cryptomgr.notests", "i8042.noaux",
	"i8042.nomux", "i8042.nopnp", "i8042.dumbkbd", "rcupdate.rcu_expedited=1",
	"random.trust_cpu=on", "pci=lastbus=0", "nokaslr", "audit=0",
	"8250.nr_uarts=1",
}

// Driver starts Cloud Hypervisor VMs from one configuration.
type Driver struct {
	path        string
	bootTimeout time.Duration
	// Used when a VMConfig leaves them zero.
	vcpus    int
	memoryMB int
	kernel   string
	initrd   string
}

var _ hypervisor.Driver = (*Driver)(nil)

// Option changes how New makes a Driver.
type Option func(*options)

type options struct {
	kvmDevice, cpuinfo string
}

// WithKVM makes New look for KVM at device, and for the CPU's flags in
// cpuinfo, instead of the host's (hypervisor.KVMDevice and CPUInfo): for
// tests that run a fake CH on a host without KVM.
func WithKVM(device, cpuinfo string) Option {
	return func(o *options) { o.kvmDevice, o.cpuinfo = device, cpuinfo }
}

// New checks the configuration and the host (Check: CH's binary and a
// usable KVM, so that a host without them fails at create, naming what is
// missing). As for QEMU, the VM-sized fields are defaults for VMConfigs
// that leave them zero; kernel_params are the caller's to put in
// VMConfig.KernelParams. QEMU's settings (machine, accel, sandbox,
// hotplug_ports) do not apply: CH always runs on KVM with its seccomp
// filter on, and hot-plugs on its PCI segment's bus.
func New(cfg config.Hypervisor, opts ...Option) (*Driver, error) {
	o := options{kvmDevice: hypervisor.KVMDevice, cpuinfo: hypervisor.CPUInfo}
	for _, opt := range opts {
		opt(&o)
	}
	path, err := check(cfg, o.kvmDevice, o.cpuinfo)
	if err != nil {
		return nil, err
	}
	if model := cfg.NICModel; model != "" && model != hypervisor.NICVirtio {
		return nil, fmt.Errorf("clh: hypervisor.nic_model %s: Cloud Hypervisor has only virtio-net", model)
	}
	d := &Driver{
		path:        path,
		bootTimeout: time.Duration(cfg.BootTimeout),
		vcpus:       cfg.VCPUs,
		memoryMB:    cfg.MemoryMB,
		kernel:      cfg.Kernel,
		initrd:      cfg.Initrd,
	}
	if d.bootTimeout <= 0 {
		d.bootTimeout = 30 * time.Second
	}
	return d, nil
}

// Start launches CH, waits for its API, creates the VM, adds the NICs with
// their TAP descriptors and boots it; it returns once CH reports the VM
// running. On error nothing it started is left. VMConfig.TemplateDir is
// ignored: CH's snapshots are not used yet, every VM boots.
func (d *Driver) Start(ctx context.Context, cfg hypervisor.VMConfig) (hypervisor.VM, error) {
	cfg, err := d.complete(cfg)
	if err != nil {
		return nil, fmt.Errorf("clh: vm %s: %w", cfg.ID, err)
	}
	vm, err := d.start(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("clh: vm %s: %w", cfg.ID, err)
	}
	return vm, nil
}

func (d *Driver) start(ctx context.Context, cfg hypervisor.VMConfig) (_ *VM, retErr error) {
	created := []string{filepath.Join(cfg.Dir, PidFile), filepath.Join(cfg.Dir, ConsoleFIFO)}
	var files []*os.File
	defer func() {
		for _, f := range files {
			f.Close()
		}
		if retErr != nil {
			removeFiles(ctx, driverFiles(cfg.Dir))
		}
	}()

	// The console is a FIFO, not a file: a guest that writes its console
	// without end cannot fill the host's disk. The driver holds it open
	// for reading and writing, so that neither CH's open nor the reads
	// ever wait for the other side, and a CH that exits is no EOF (the
	// reader stops when CH's exit is seen).
	fifo := created[1]
	if err := unix.Mkfifo(fifo, 0o600); err != nil {
		return nil, fmt.Errorf("console: %w", err)
	}
	console, err := os.OpenFile(fifo, os.O_RDWR|syscall.O_NONBLOCK, 0)
	if err != nil {
		return nil, fmt.Errorf("console: %w", err)
	}
	// CH writes each event as JSON into a pipe (--event-monitor fd=3).
	eventsR, eventsW, err := os.Pipe()
	if err != nil {
		console.Close()
		return nil, err
	}
	files = append(files, eventsW)

	args := []string{
		"--api-socket", "path=" + filepath.Join(cfg.Dir, APISocket),
		"--event-monitor", "fd=3",
		"--seccomp", "true",
	}
	logger := log.G(ctx).WithField("vm", cfg.ID)
	logger.Debugf("clh: %s %q", d.path, args)
	cmd := exec.Command(d.path, args...)
	cmd.Dir = cfg.Dir
	cmd.ExtraFiles = files
	// Its own process group, so signals meant for the shim's group do not
	// reach it; no Pdeathsig, so VMs outlive a shim upgrade.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	vm, err := startVM(ctx, cmd, cfg, console, eventsR)
	if err != nil {
		return nil, err
	}
	for _, f := range files {
		f.Close()
	}
	files = nil
	if err := os.WriteFile(created[0], []byte(strconv.Itoa(vm.Pid())+"\n"), 0o600); err != nil {
		vm.kill()
		<-vm.done
		return nil, err
	}
	if err := vm.boot(ctx, d.bootTimeout, d.vmConfig(cfg), cfg.NICs); err != nil {
		vm.kill()
		<-vm.done
		return nil, fmt.Errorf("%w; %s", err, vm.describeExit())
	}
	logger.WithField("pid", vm.Pid()).Debug("clh: running")
	return vm, nil
}

// vmConfig is the body of vm.create for cfg. NICs are not in it: vm.create
// takes no file descriptors, so they come with vm.add-net before the boot.
func (d *Driver) vmConfig(cfg hypervisor.VMConfig) vmConfig {
	params := slices.Clone(baseKernelParams)
	c := vmConfig{
		Payload: payloadConfig{Kernel: cfg.Kernel, Initramfs: cfg.Initrd},
		CPUs:    cpusConfig{BootVCPUs: cfg.VCPUs, MaxVCPUs: cfg.MaxVCPUs},
		Memory:  memoryConfig{Size: mib(cfg.BaseMemoryMB)},
		Serial:  &consoleConf{Mode: "File", File: filepath.Join(cfg.Dir, ConsoleFIFO)},
		// The virtio console (hvc0) would be a second console nobody reads.
		Console: &consoleConf{Mode: "Off"},
		Vsock:   &vsockConfig{CID: guestCID, Socket: filepath.Join(cfg.Dir, VsockSocket)},
		// Free page reporting hands what the guest frees back to the host;
		// the balloon itself starts empty, for SetMemory's shrinking.
		Balloon: &balloonConf{Size: 0, FreePageReporting: true},
		PVPanic: true,
	}
	if hot := hotplugMB(cfg); hot > 0 {
		c.Memory.HotplugMethod = "VirtioMem"
		c.Memory.HotplugSize = mib(hot)
		c.Memory.HotpluggedSize = mib(cfg.MemoryMB - cfg.BaseMemoryMB)
		// Plugged memory comes online at once, as movable memory that can
		// be unplugged again.
		params = append(params, "memhp_default_state=online_movable")
	}
	for _, s := range cfg.Shares {
		// virtiofsd maps the guest's memory: it must be shared.
		c.Memory.Shared = true
		c.FS = append(c.FS, fsConfig{Tag: s.Tag, Socket: s.Path, NumQueues: 1, QueueSize: 1024, ID: "fs-" + s.Tag})
	}
	for _, p := range cfg.PCIDevices {
		c.Devices = append(c.Devices, deviceConf{Path: sysfsPCI(p.Address), ID: p.ID})
	}
	c.Payload.Cmdline = strings.Join(append(params, cfg.KernelParams...), " ")
	return c
}

// hotplugMB is the virtio-mem region above the base memory: up to
// MaxMemoryMB, rounded up to CH's alignment of the region.
func hotplugMB(cfg hypervisor.VMConfig) int {
	hot := cfg.MaxMemoryMB - cfg.BaseMemoryMB
	if hot <= 0 {
		return 0
	}
	return (hot + hotplugAlignMB - 1) / hotplugAlignMB * hotplugAlignMB
}

func mib(mb int) int64 { return int64(mb) << 20 }

func sysfsPCI(addr string) string { return "/sys/bus/pci/devices/" + addr }

// complete fills in the driver's defaults and checks what CH cannot do or
// would reject with a less clear message.
func (d *Driver) complete(cfg hypervisor.VMConfig) (hypervisor.VMConfig, error) {
	if cfg.VCPUs == 0 {
		cfg.VCPUs = d.vcpus
	}
	if cfg.MemoryMB == 0 {
		cfg.MemoryMB = d.memoryMB
	}
	if cfg.Kernel == "" {
		cfg.Kernel = d.kernel
	}
	if cfg.Initrd == "" {
		cfg.Initrd = d.initrd
	}
	if cfg.ID == "" {
		cfg.ID = filepath.Base(cfg.Dir)
	}
	if cfg.Channel == "" {
		cfg.Channel = hypervisor.ChannelVsock
	}
	if !filepath.IsAbs(cfg.Dir) {
		return cfg, fmt.Errorf("dir %q: want an absolute path", cfg.Dir)
	}
	cfg.Dir = filepath.Clean(cfg.Dir)
	if st, err := os.Stat(cfg.Dir); err != nil {
		return cfg, fmt.Errorf("dir: %w", err)
	} else if !st.IsDir() {
		return cfg, fmt.Errorf("dir %s: not a directory", cfg.Dir)
	}
	if p := filepath.Join(cfg.Dir, APISocket); len(p) > maxSocketPath {
		return cfg, fmt.Errorf("dir %s: too long for a unix socket path (%s is %d bytes, the limit is %d)", cfg.Dir, p, len(p), maxSocketPath)
	}
	for _, p := range driverFiles(cfg.Dir) {
		if _, err := os.Lstat(p); err == nil {
			return cfg, fmt.Errorf("%s exists: a VM may still run there (Cleanup removes what a dead controller left)", p)
		}
	}
	if cfg.Channel != hypervisor.ChannelVsock {
		return cfg, fmt.Errorf("agent channel %q: Cloud Hypervisor has no virtio-serial, want %q", cfg.Channel, hypervisor.ChannelVsock)
	}
	if cfg.AgentPort.Vsock == 0 {
		return cfg, errors.New("agent channel vsock: no vsock port (AgentPort.Vsock)")
	}
	for _, f := range []struct{ what, path string }{{"kernel", cfg.Kernel}, {"initrd", cfg.Initrd}} {
		if f.path == "" {
			return cfg, fmt.Errorf("no %s configured", f.what)
		}
		st, err := os.Stat(f.path)
		if err != nil {
			return cfg, fmt.Errorf("%s: %w", f.what, err)
		}
		if !st.Mode().IsRegular() {
			return cfg, fmt.Errorf("%s %s: not a regular file", f.what, f.path)
		}
	}
	cfg, err := checkSize(cfg)
	if err != nil {
		return cfg, err
	}
	ids := make(map[string]bool)
	unique := func(what, id string) error {
		if ids[id] {
			return fmt.Errorf("%s %s: duplicate id", what, id)
		}
		ids[id] = true
		return nil
	}
	for _, n := range cfg.NICs {
		if err := checkNIC(n); err != nil {
			return cfg, err
		}
		if err := unique("nic", n.ID); err != nil {
			return cfg, err
		}
	}
	for _, p := range cfg.PCIDevices {
		if err := checkPCIDevice(p); err != nil {
			return cfg, err
		}
		if err := unique("pci device", p.ID); err != nil {
			return cfg, err
		}
	}
	tags := make(map[string]bool)
	for _, s := range cfg.Shares {
		if s.Tag == "" || tags[s.Tag] {
			return cfg, fmt.Errorf("share %s: empty or duplicate tag %q", s.Path, s.Tag)
		}
		tags[s.Tag] = true
		if s.Kind != hypervisor.ShareVirtioFS {
			return cfg, fmt.Errorf("share %s: kind %q: Cloud Hypervisor has only %q (no 9p server)", s.Tag, s.Kind, hypervisor.ShareVirtioFS)
		}
		st, err := os.Stat(s.Path)
		if err != nil {
			return cfg, fmt.Errorf("share %s: %w", s.Tag, err)
		}
		if st.Mode().Type() != fs.ModeSocket {
			return cfg, fmt.Errorf("share %s: virtio-fs needs virtiofsd's socket, %s is not a socket", s.Tag, s.Path)
		}
	}
	return cfg, nil
}

// checkSize fills in and checks the size fields as the QEMU driver does.
func checkSize(cfg hypervisor.VMConfig) (hypervisor.VMConfig, error) {
	for _, f := range []struct {
		name string
		v    int
	}{{"vcpus", cfg.VCPUs}, {"max vcpus", cfg.MaxVCPUs}, {"memory", cfg.MemoryMB}, {"max memory", cfg.MaxMemoryMB}, {"base memory", cfg.BaseMemoryMB}} {
		if f.v < 0 {
			return cfg, fmt.Errorf("%s %d: want 0 or more", f.name, f.v)
		}
	}
	if cfg.VCPUs < 1 {
		return cfg, fmt.Errorf("vcpus %d: want at least 1", cfg.VCPUs)
	}
	if cfg.BaseMemoryMB == 0 {
		cfg.BaseMemoryMB = cfg.MemoryMB
	}
	if cfg.BaseMemoryMB < 64 {
		return cfg, fmt.Errorf("base memory %d MiB: want at least 64", cfg.BaseMemoryMB)
	}
	cfg.MaxVCPUs = max(cfg.MaxVCPUs, cfg.VCPUs)
	cfg.MaxMemoryMB = max(cfg.MaxMemoryMB, cfg.MemoryMB)
	if cfg.MemoryMB < cfg.BaseMemoryMB {
		return cfg, fmt.Errorf("memory %d MiB: below the base memory (%d MiB)", cfg.MemoryMB, cfg.BaseMemoryMB)
	}
	if (cfg.MemoryMB-cfg.BaseMemoryMB)%memoryBlockMB != 0 {
		return cfg, fmt.Errorf("memory %d MiB: %d MiB above the base memory, want a multiple of %d MiB (virtio-mem's block)", cfg.MemoryMB, cfg.MemoryMB-cfg.BaseMemoryMB, memoryBlockMB)
	}
	return cfg, nil
}

// checkNIC checks what CH would reject later, or cannot do.
func checkNIC(n hypervisor.NIC) error {
	switch {
	case n.Model != "" && n.Model != hypervisor.NICVirtio:
		return fmt.Errorf("nic %s: model %q: Cloud Hypervisor has only %s (no emulated e1000e or igb)", n.ID, n.Model, hypervisor.NICVirtio)
	case !validID(n.ID):
		return fmt.Errorf("nic %q: want an id of letters, digits, '-', '_' and '.' (not starting with '_', CH's own)", n.ID)
	case len(n.MAC) != 6:
		return fmt.Errorf("nic %s: MAC %q: want 6 bytes", n.ID, n.MAC)
	case n.TAP == nil:
		return fmt.Errorf("nic %s: no TAP device", n.ID)
	case n.MTU < 0 || n.MTU > 65535:
		return fmt.Errorf("nic %s: MTU %d: want 0 to 65535", n.ID, n.MTU)
	}
	return nil
}

func checkPCIDevice(p hypervisor.PCIDevice) error {
	if !validID(p.ID) {
		return fmt.Errorf("pci device %q: want an id of letters, digits, '-', '_' and '.' (not starting with '_', CH's own)", p.ID)
	}
	if err := vfio.CheckAddress(p.Address); err != nil {
		return fmt.Errorf("pci device %s: %w", p.ID, err)
	}
	return nil
}

// validID tells whether id can name a CH device: CH names its own devices
// "_disk0", "_net1"..., and ids travel in JSON and in CH's option syntax.
func validID(id string) bool {
	if id == "" || id[0] == '_' || len(id) > 64 {
		return false
	}
	for _, r := range id {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-' || r == '_' || r == '.') {
			return false
		}
	}
	return true
}

func driverFiles(dir string) []string {
	return []string{
		filepath.Join(dir, APISocket),
		filepath.Join(dir, VsockSocket),
		filepath.Join(dir, ConsoleFIFO),
		filepath.Join(dir, PidFile),
	}
}

func removeFiles(ctx context.Context, paths []string) error {
	var errs []error
	for _, p := range paths {
		if err := os.Remove(p); err != nil && !errors.Is(err, fs.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	if err := errors.Join(errs...); err != nil {
		log.G(ctx).WithError(err).Warn("clh: removing files")
		return err
	}
	return nil
}
