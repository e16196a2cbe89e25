// Package qemu runs colo's VMs with QEMU: a PVH kernel and initrd booted
// directly (no firmware disk), virtio devices for the agent's channel and
// the shared directories, and QMP to control the process.
//
// The driver's files in VMConfig.Dir are qmp.sock, agent.sock (serial
// channel) and qemu.pid. Start creates the sockets itself and passes them
// to QEMU as file descriptors, so they exist, listening, before QEMU runs.
package qemu

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"
	"unsafe"

	"github.com/containerd/log"
	"golang.org/x/sys/unix"

	"github.com/colo-runtime/colo/config"
	"github.com/colo-runtime/colo/hypervisor"
)

// Names of the driver's files in VMConfig.Dir.
const (
	QMPSocket   = "qmp.sock"
	AgentSocket = "agent.sock"
	PidFile     = "qemu.pid"
)

// DefaultBinary is looked up in PATH when the configuration names none.
const DefaultBinary = "qemu-system-x86_64"

const (
	kvmDevice   = hypervisor.KVMDevice
	vsockDevice = "/dev/vhost-vsock"
	// vhostNetDevice moves virtio-net's data path into the host kernel;
	// hosts without it (nested ones) use QEMU's own.
	vhostNetDevice = "/dev/vhost-net"
	cpuinfo        = hypervisor.CPUInfo
)

// setprivBinary runs QEMU: Go's exec cannot shrink a child's capability
// bounding set (SysProcAttr has only ambient capabilities), and doing it on a
// locked thread of the shim would tie Pdeathsig to that thread. setpriv
// (util-linux, essential on Debian) sets the limits and execs QEMU in the
// same process, so the pid the driver records and QEMU's pid file agree.
const setprivBinary = "setpriv"

// qemuCapabilities are all QEMU keeps of root's capabilities. Its 9p server
// (security_model=none) acts on the host files as the guest asks, for any
// owner, and each is needed for that (measured with a guest driving a 9p
// share, one capability left out at a time):
//
//	chown         chown(2) to the guest's owner, also of files the guest
//	              creates as a user other than root (without it they
//	              silently stay root's)
//	dac_override  opening, writing and creating in files and directories
//	              whatever their mode
//	fowner        chmod, utimes, O_TRUNC and sticky-directory unlinks of
//	              files QEMU (root) does not own
//	fsetid        keeping a setgid bit whose group QEMU is not in
//
// Everything else goes. Not needed because QEMU gets its devices and TAP
// queues as open files, or opens root-owned /dev/kvm and /dev/vhost-net as
// their owner: net_admin, sys_admin, sys_rawio, sys_module, sys_boot,
// sys_time, sys_ptrace, sys_resource, sys_nice (the shim places and
// reprioritises QEMU's threads from outside). Dropped on purpose:
//
//	mknod            with security_model=none a guest's mknod makes a real
//	                 device node on a host filesystem, e.g. /dev/sda's, open
//	                 to whoever reaches the container's rootfs on the host
//	                 (QEMU 7.2 unlinks it again at once, after the fact)
//	dac_read_search  open_by_handle_at(2) opens any file of a filesystem
//	                 from a guessed handle, outside the shared directory;
//	                 dac_override covers what 9p reads
//	setuid, setgid   9p never switches ids (under the sandbox the call
//	                 would kill QEMU), so nothing needs them
//	setfcap          9p with security_model=none passes only user.*
//	                 attributes, so no file capabilities to set
var qemuCapabilities = []string{"chown", "dac_override", "fowner", "fsetid"}

// confinement are setpriv's options for QEMU: a bounding set of
// qemuCapabilities, which a root process's exec turns into its permitted and
// effective sets, with nothing inheritable or ambient to add back; and
// no_new_privs, so that no exec (of a setuid binary, say, were the sandbox
// off) gains privileges. No exec nor setuid call can undo either.
func confinement(extra ...string) []string {
	return []string{
		"--no-new-privs",
		"--inh-caps=-all",
		"--ambient-caps=-all",
		"--bounding-set=-all,+" + strings.Join(slices.Concat(qemuCapabilities, extra), ",+"),
	}
}

// maxSocketPath is the longest path a unix socket can bind (sun_path is
// 108 bytes with the terminating NUL).
const maxSocketPath = 107

// Driver starts QEMU VMs from one configuration.
type Driver struct {
	path         string
	machine      string
	accel        string
	accelReason  string
	tscKHz       int
	hotplugPorts int
	vhostNet     bool
	sandbox      bool
	bootTimeout  time.Duration
	// setpriv execs QEMU with its privileges cut down (see confinement).
	setpriv string
	// Used when a VMConfig leaves them zero.
	vcpus    int
	memoryMB int
	kernel   string
	initrd   string
}

var _ hypervisor.Templater = (*Driver)(nil)

// New checks the configuration and picks the accelerator. The VM-sized
// fields (vcpus, memory, kernel, initrd) are defaults for VMConfigs that
// leave them zero; kernel_params are the caller's to put in
// VMConfig.KernelParams, among the guest's own.
func New(cfg config.Hypervisor) (*Driver, error) {
	path := cfg.Path
	if path == "" {
		path = DefaultBinary
	}
	path, err := exec.LookPath(path)
	if err != nil {
		return nil, fmt.Errorf("qemu: %w", err)
	}
	setpriv, err := exec.LookPath(setprivBinary)
	if err != nil {
		return nil, fmt.Errorf("qemu: %s (util-linux) drops QEMU's capabilities: %w", setprivBinary, err)
	}
	d := &Driver{
		path:         path,
		machine:      cfg.Machine,
		hotplugPorts: cfg.HotplugPorts,
		vhostNet:     canOpen(vhostNetDevice),
		sandbox:      cfg.Sandbox,
		bootTimeout:  time.Duration(cfg.BootTimeout),
		setpriv:      setpriv,
		vcpus:        cfg.VCPUs,
		memoryMB:     cfg.MemoryMB,
		kernel:       cfg.Kernel,
		initrd:       cfg.Initrd,
	}
	if d.bootTimeout <= 0 {
		d.bootTimeout = 30 * time.Second
	}
	switch d.machine {
	case "":
		d.machine = "q35"
	case "q35", "microvm":
	default:
		return nil, fmt.Errorf("qemu: machine %q: want q35 or microvm", cfg.Machine)
	}
	d.accel, d.accelReason, err = ChooseAccel(cfg.Accel, kvmDevice, cpuinfo)
	if err != nil {
		return nil, fmt.Errorf("qemu: %w", err)
	}
	if model := cfg.NICModel; model != "" && model != hypervisor.NICVirtio {
		if d.machine == "microvm" {
			return nil, fmt.Errorf("qemu: hypervisor.nic_model %s is a PCI device: machine microvm has only virtio-net (use q35)", model)
		}
		if err := hasDevice(path, model); err != nil {
			return nil, fmt.Errorf("qemu: hypervisor.nic_model %s: %w", model, err)
		}
	}
	if d.machine == "microvm" {
		if d.tscKHz, err = hostKHz(cpuinfo); err != nil {
			return nil, fmt.Errorf("qemu: microvm needs the host TSC frequency: %w", err)
		}
	}
	return d, nil
}

// Start launches QEMU and returns once QMP answers query-status. With
// templates on (and a q35 VM without host PCI devices) the VM is restored
// from a snapshot of a booted guest, made on first use, instead of booting.
func (d *Driver) Start(ctx context.Context, cfg hypervisor.VMConfig) (hypervisor.VM, error) {
	cfg, err := d.complete(cfg)
	if err != nil {
		return nil, fmt.Errorf("qemu: vm %s: %w", cfg.ID, err)
	}
	l := d.launch(cfg)
	if d.clonable(cfg) {
		vm, err := d.startClone(ctx, l)
		if err == nil {
			return vm, nil
		}
		if !errors.Is(err, errTemplateUnusable) {
			return nil, fmt.Errorf("qemu: vm %s: %w", cfg.ID, err)
		}
		log.G(ctx).WithError(err).WithField("vm", cfg.ID).Warn("qemu: booting instead of restoring from a template")
	}
	vm, err := d.start(ctx, l)
	if err != nil {
		return nil, fmt.Errorf("qemu: vm %s: %w", cfg.ID, err)
	}
	return vm, nil
}

// launch is the launch of cfg with the driver's settings, booting.
func (d *Driver) launch(cfg hypervisor.VMConfig) launch {
	l := launch{
		vm:       cfg,
		machine:  d.machine,
		accel:    d.accel,
		tscKHz:   d.tscKHz,
		pidfile:  filepath.Join(cfg.Dir, PidFile),
		vhostNet: d.vhostNet,
		sandbox:  d.sandbox,
	}
	if d.machine == "q35" {
		l.hotplugPorts = d.hotplugPorts
	}
	return l
}

// start runs QEMU as l describes and connects to QMP. On error nothing is
// left running.
func (d *Driver) start(ctx context.Context, l launch) (_ *VM, retErr error) {
	cfg := l.vm
	var err error
	// files are what QEMU inherits; the parent's copies are closed once it
	// runs. created are removed again when Start fails.
	var files []*os.File
	created := []string{l.pidfile}
	defer func() {
		for _, f := range files {
			f.Close()
		}
		if retErr != nil {
			removeFiles(ctx, created)
		}
	}()
	pass := func(f *os.File) int {
		files = append(files, f)
		return 2 + len(files) // ExtraFiles start at fd 3
	}
	listen := func(name string) (int, error) {
		path := filepath.Join(cfg.Dir, name)
		f, err := listenUnix(path)
		if err != nil {
			return 0, err
		}
		created = append(created, path)
		return pass(f), nil
	}

	if l.qmpFD, err = listen(QMPSocket); err != nil {
		return nil, err
	}
	switch cfg.Channel {
	case hypervisor.ChannelSerial:
		if l.agentFD, err = listen(AgentSocket); err != nil {
			return nil, err
		}
	case hypervisor.ChannelVsock:
		f, cid, err := reserveCID()
		if err != nil {
			return nil, err
		}
		l.vhostFD, l.cid = pass(f), cid
	}

	if l.snapshot == snapshotNone {
		for _, n := range cfg.NICs {
			// A dup: QEMU's copy is closed with the others once it runs,
			// the caller's stays the caller's.
			fd, err := unix.FcntlInt(n.TAP.Fd(), unix.F_DUPFD_CLOEXEC, 0)
			if err != nil {
				return nil, fmt.Errorf("nic %s: %w", n.ID, err)
			}
			l.nicFDs = append(l.nicFDs, pass(os.NewFile(uintptr(fd), "tap-"+n.ID)))
		}
	}

	args := l.args()
	logger := log.G(ctx).WithField("vm", cfg.ID)
	logger.WithFields(log.Fields{
		"accel":    d.accel,
		"reason":   d.accelReason,
		"snapshot": l.snapshot,
	}).Infof("qemu: starting %s", d.machine)
	logger.Debugf("qemu: %s %q", d.path, args)

	cmd := exec.Command(d.setpriv, slices.Concat(confinement(l.capabilities()...), []string{"--", d.path}, args)...)
	cmd.Dir = cfg.Dir
	cmd.ExtraFiles = files
	// Its own process group, so signals meant for the shim's group do not
	// reach it; no Pdeathsig, so VMs outlive a shim upgrade. A template VM
	// lives only while it is being made: it dies with its maker.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if l.snapshot == snapshotTemplate {
		cmd.SysProcAttr.Pdeathsig = syscall.SIGKILL
	}
	vm, err := startVM(ctx, cmd, l)
	if err != nil {
		return nil, err
	}
	// Only QEMU holds the listening sockets now: if it dies, connecting
	// fails at once instead of waiting in a backlog nobody serves.
	for _, f := range files {
		f.Close()
	}
	files = nil
	if err := vm.connect(ctx, filepath.Join(cfg.Dir, QMPSocket)); err != nil {
		vm.kill()
		<-vm.done
		return nil, fmt.Errorf("%w; %s", err, vm.describeExit())
	}
	logger.WithField("pid", vm.Pid()).Debug("qemu: running")
	return vm, nil
}

// complete fills in the driver's defaults and checks what QEMU would
// otherwise reject with a less clear message, or not at all.
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
		cfg.Channel = d.PickChannel()
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
	if p := filepath.Join(cfg.Dir, AgentSocket); len(p) > maxSocketPath {
		return cfg, fmt.Errorf("dir %s: too long for a unix socket path (%s is %d bytes, the limit is %d)", cfg.Dir, p, len(p), maxSocketPath)
	}
	for _, name := range []string{QMPSocket, AgentSocket, PidFile} {
		p := filepath.Join(cfg.Dir, name)
		if _, err := os.Lstat(p); err == nil {
			return cfg, fmt.Errorf("%s exists: a VM may still run there (Cleanup removes what a dead controller left)", p)
		}
	}
	if cfg.VCPUs < 1 {
		return cfg, fmt.Errorf("vcpus %d: want at least 1", cfg.VCPUs)
	}
	if cfg.MemoryMB < 64 {
		return cfg, fmt.Errorf("memory %d MiB: want at least 64", cfg.MemoryMB)
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
	switch cfg.Channel {
	case hypervisor.ChannelSerial:
	case hypervisor.ChannelVsock:
		if _, err := os.Stat(vsockDevice); err != nil {
			return cfg, fmt.Errorf("agent channel vsock needs %s (modprobe vhost_vsock), or use the serial channel: %w", vsockDevice, err)
		}
	default:
		return cfg, fmt.Errorf("agent channel %q: want %q or %q", cfg.Channel, hypervisor.ChannelSerial, hypervisor.ChannelVsock)
	}
	if err := checkPorts(cfg); err != nil {
		return cfg, err
	}
	cfg, err := checkSize(cfg, d.machine)
	if err != nil {
		return cfg, err
	}
	if err := checkPCIDevices(cfg, d.machine, d.launch(cfg).hotplugPorts); err != nil {
		return cfg, err
	}
	ids := make(map[string]bool)
	for _, n := range cfg.NICs {
		if err := checkNIC(n, d.machine); err != nil {
			return cfg, err
		}
		if ids[n.ID] {
			return cfg, fmt.Errorf("nic %s: duplicate id", n.ID)
		}
		ids[n.ID] = true
	}
	tags := make(map[string]bool)
	for _, s := range cfg.Shares {
		if s.Tag == "" || tags[s.Tag] {
			return cfg, fmt.Errorf("share %s: empty or duplicate tag %q", s.Path, s.Tag)
		}
		tags[s.Tag] = true
		st, err := os.Stat(s.Path)
		switch {
		case err != nil:
			return cfg, fmt.Errorf("share %s: %w", s.Tag, err)
		case s.Kind == hypervisor.Share9P && !st.IsDir():
			return cfg, fmt.Errorf("share %s: 9p needs a directory, %s is not one", s.Tag, s.Path)
		case s.Kind == hypervisor.ShareVirtioFS && st.Mode().Type() != fs.ModeSocket:
			return cfg, fmt.Errorf("share %s: virtio-fs needs virtiofsd's socket, %s is not a socket", s.Tag, s.Path)
		case s.Kind != hypervisor.Share9P && s.Kind != hypervisor.ShareVirtioFS:
			return cfg, fmt.Errorf("share %s: kind %q: want %q or %q", s.Tag, s.Kind, hypervisor.Share9P, hypervisor.ShareVirtioFS)
		}
	}
	return cfg, nil
}

// checkNIC checks what QEMU would reject later, or misread: ids become
// option values and QOM names. The emulated NICs are PCI devices, which
// microvm has no bus for.
func checkNIC(n hypervisor.NIC, machine string) error {
	switch {
	case !slices.Contains([]string{"", hypervisor.NICVirtio, hypervisor.NICE1000E, hypervisor.NICIGB}, n.Model):
		return fmt.Errorf("nic %s: model %q: want %q, %q or %q", n.ID, n.Model, hypervisor.NICVirtio, hypervisor.NICE1000E, hypervisor.NICIGB)
	case machine == "microvm" && !isVirtioNIC(n):
		return fmt.Errorf("nic %s: model %s is a PCI device: machine microvm has only virtio-net (use q35)", n.ID, n.Model)
	case n.ID == "" || strings.ContainsAny(n.ID, ",= /"):
		return fmt.Errorf("nic %q: want an id without commas, spaces, slashes or '='", n.ID)
	case len(n.MAC) != 6:
		return fmt.Errorf("nic %s: MAC %q: want 6 bytes", n.ID, n.MAC)
	case n.TAP == nil:
		return fmt.Errorf("nic %s: no TAP device", n.ID)
	case n.MTU < 0 || n.MTU > 65535:
		return fmt.Errorf("nic %s: MTU %d: want 0 to 65535", n.ID, n.MTU)
	}
	return nil
}

// probeTimeout bounds asking the QEMU binary about itself.
const probeTimeout = 10 * time.Second

// hasDevice tells whether the QEMU binary at path has the device model
// name: QEMU 7.2 (Debian 12) has e1000e but not igb, which came with 8.0.
func hasDevice(path, name string) error {
	ctx, cancel := context.WithTimeout(context.Background(), probeTimeout)
	defer cancel()
	var stdout, stderr strings.Builder
	cmd := exec.CommandContext(ctx, path, "-device", name+",help")
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	// QEMU 7.2 exits 0 for a device it does not know, saying so on
	// stderr; a known one's help starts with "<name> options:".
	if err == nil && strings.HasPrefix(stdout.String(), name+" options:") {
		return nil
	}
	msg := strings.TrimSpace(stderr.String())
	if err != nil {
		msg = fmt.Sprintf("%v: %s", err, msg)
	}
	if name == hypervisor.NICIGB {
		msg += " (QEMU has igb from 8.0 on; e1000e is in every version)"
	}
	return fmt.Errorf("%s has no %s device: %s", path, name, msg)
}

func canOpen(path string) bool {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return false
	}
	f.Close()
	return true
}

// listenUnix creates a listening unix socket at path and returns it as a
// file for QEMU to inherit. The socket file stays when the parent's copy
// is closed.
func listenUnix(path string) (*os.File, error) {
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, err
	}
	l.SetUnlinkOnClose(false)
	f, err := l.File()
	l.Close()
	if err != nil {
		os.Remove(path)
		return nil, err
	}
	return f, nil
}

// vhostVsockSetGuestCID is VHOST_VSOCK_SET_GUEST_CID, _IOW(0xAF, 0x60, __u64).
const vhostVsockSetGuestCID = 0x4008af60

// reserveCID opens the vhost-vsock device and claims a random free guest
// CID on it. QEMU gets the open device (vhostfd), so the CID stays claimed
// from here on and two VMs started at once cannot pick the same one. Each
// VM reserves its own, a template's clones too: the CID is not part of the
// migration stream (see startClone).
func reserveCID() (*os.File, uint32, error) {
	f, err := os.OpenFile(vsockDevice, os.O_RDWR, 0)
	if err != nil {
		return nil, 0, fmt.Errorf("vsock: %w", err)
	}
	for range 64 {
		var b [4]byte
		rand.Read(b[:])
		// 0-2 are the hypervisor, local and host; 0xffffffff is "any".
		cid := uint64(binary.LittleEndian.Uint32(b[:])%(0xffffffff-3) + 3)
		_, _, errno := unix.Syscall(unix.SYS_IOCTL, f.Fd(), vhostVsockSetGuestCID, uintptr(unsafe.Pointer(&cid)))
		switch errno {
		case 0:
			return f, uint32(cid), nil
		case unix.EADDRINUSE:
			continue
		default:
			f.Close()
			return nil, 0, fmt.Errorf("vsock: set guest cid %d: %w", cid, errno)
		}
	}
	f.Close()
	return nil, 0, errors.New("vsock: no free guest cid found")
}

func removeFiles(ctx context.Context, paths []string) error {
	var errs []error
	for _, p := range paths {
		if err := os.Remove(p); err != nil && !errors.Is(err, fs.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	if err := errors.Join(errs...); err != nil {
		log.G(ctx).WithError(err).Warn("qemu: removing files")
		return err
	}
	return nil
}

// checkPorts checks that every channel the guest listens on is one QEMU
// can connect: the agent's on the channel's transport, and the debug
// console and port-forward channel on virtio-serial ports (QEMU's ends
// are unix sockets in the VM directory).
func checkPorts(cfg hypervisor.VMConfig) error {
	switch {
	case cfg.Channel == hypervisor.ChannelSerial && cfg.AgentPort.Serial == "":
		return errors.New("agent channel serial: no virtio-serial port name (AgentPort.Serial)")
	case cfg.Channel == hypervisor.ChannelVsock && cfg.AgentPort.Vsock == 0:
		return errors.New("agent channel vsock: no vsock port (AgentPort.Vsock)")
	case !cfg.DebugConsole.IsZero() && cfg.DebugConsole.Serial == "":
		return errors.New("debug console: QEMU's is a virtio-serial port, and DebugConsole.Serial names none")
	case !cfg.PortForward.IsZero() && cfg.PortForward.Serial == "":
		return errors.New("port-forward channel: QEMU's is a virtio-serial port, and PortForward.Serial names none")
	}
	return nil
}

// PickChannel is vsock where the host has vhost-vsock, which QEMU's vsock
// device needs, and virtio-serial elsewhere: hypervisor.ChannelPicker.
func (d *Driver) PickChannel() hypervisor.AgentChannel {
	if _, err := os.Stat(vsockDevice); err == nil {
		return hypervisor.ChannelVsock
	}
	return hypervisor.ChannelSerial
}

var _ hypervisor.ChannelPicker = (*Driver)(nil)

// ReleaseTemplates unmounts the ramfs of a template directory, with the
// templates: hypervisor.Templater.
func (d *Driver) ReleaseTemplates(dir string) error { return ReleaseTemplates(dir) }
