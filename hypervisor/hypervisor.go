// Package hypervisor is the one interface the rest of colo uses to run a VM.
// Drivers (qemu, clh) live in sub-packages; package driver picks one from
// the configuration (hypervisor.type). Nothing here knows about containers,
// nor about the agent's protocol: where the guest listens (GuestPort) and
// what its command line says come from the caller, so every driver serves
// the same guest.
package hypervisor

import (
	"context"
	"errors"
	"net"
	"os"
)

// ShareKind is how a host directory is exported to the guest.
type ShareKind string

const (
	// Share9P exports a host directory with QEMU's built-in 9p server.
	Share9P ShareKind = "9p"
	// ShareVirtioFS connects the guest to a running virtiofsd.
	ShareVirtioFS ShareKind = "virtio-fs"
)

// Share is a filesystem the guest mounts by Tag.
type Share struct {
	Tag  string
	Kind ShareKind
	// Path is the host directory for Share9P and the vhost-user socket of
	// virtiofsd for ShareVirtioFS.
	Path     string
	ReadOnly bool
}

// NIC is a network interface of the VM backed by a TAP device.
type NIC struct {
	// ID names the device; unique within the VM.
	ID  string
	MAC net.HardwareAddr
	// MTU is told to the guest driver where the device can (0: leave it).
	MTU int
	// TAP is an open queue of a TAP device made with IFF_TAP, IFF_NO_PI
	// and IFF_VNET_HDR. The driver hands a copy to the hypervisor; the
	// caller keeps and closes its own.
	TAP *os.File
	// Model is the guest NIC the driver emulates: "" or NICVirtio for
	// virtio-net, or an emulated physical NIC the guest drives like a
	// passed-through one (NICIGB, NICE1000E).
	Model string
}

// NIC models.
const (
	NICVirtio = "virtio-net"
	NICIGB    = "igb"
	NICE1000E = "e1000e"
)

// DiskBus is how a disk is attached to the guest.
type DiskBus string

const (
	// DiskVirtioBlk is a virtio-blk PCI device of its own (default).
	DiskVirtioBlk DiskBus = "virtio-blk"
	// DiskVirtioSCSI is a LUN on the VM's one virtio-scsi controller.
	DiskVirtioSCSI DiskBus = "virtio-scsi"
	// DiskNVMe is an emulated NVMe controller with the disk as its one
	// namespace: the guest finds it as it finds a passed-through NVMe.
	DiskNVMe DiskBus = "nvme"
)

// Disk is a host block device or image file the guest sees as a disk.
type Disk struct {
	// ID names the disk; unique within the VM.
	ID string
	// File is the open block device or image file. The driver hands a
	// copy to the hypervisor (it never opens a host path by name); the
	// caller keeps and closes its own.
	File     *os.File
	Bus      DiskBus
	ReadOnly bool
}

// GuestDevice says where the guest finds a device.
type GuestDevice struct {
	// PCIPath is the device's path from the guest's root PCI bus: the
	// slot and function on each bus from the root down, "03.0/00.0" for
	// device 0 behind the bridge (root port) at slot 3. Bus numbers are
	// the guest's to choose, so they are not part of it.
	PCIPath string
	// SCSIAddress is "<target>:<lun>" of a virtio-scsi disk on the
	// controller at PCIPath; empty for other devices.
	SCSIAddress string
}

// PCIDevice is a host PCI device passed through to the guest with VFIO.
type PCIDevice struct {
	// ID names the device; unique within the VM.
	ID string
	// Address is the host PCI address ("0000:45:00.0") of a device the
	// caller has bound to vfio-pci, with its whole IOMMU group.
	Address string
}

// AgentChannel is the transport of the agent's ttrpc service.
type AgentChannel string

const (
	ChannelVsock  AgentChannel = "vsock"
	ChannelSerial AgentChannel = "serial"
)

// GuestPort is where the guest listens for one host-to-guest channel: an
// AF_VSOCK port, or a virtio-serial port the guest finds by its name
// under /sys/class/virtio-ports. The caller sets what the guest listens
// on (the agent protocol's constants); the driver connects the one its
// VMM has: a driver with vsock but no virtio-serial (Cloud Hypervisor)
// needs Vsock, one that puts the channel on virtio-serial needs Serial.
// The zero GuestPort is no channel.
type GuestPort struct {
	Vsock  uint32
	Serial string
}

// IsZero tells whether p names no port.
func (p GuestPort) IsZero() bool { return p == GuestPort{} }

// VMConfig describes one VM to start.
type VMConfig struct {
	// ID names the VM in process lists and logs.
	ID string
	// Dir is a private, existing directory for the driver's sockets, pid
	// file and logs. Keep it short: unix socket paths are limited to 107
	// bytes.
	Dir string
	// VCPUs and MemoryMB are the size the VM starts at.
	VCPUs    int
	MemoryMB int
	// MaxVCPUs and MaxMemoryMB are how far SetVCPUs and SetMemory may
	// grow the VM while it runs; 0 (or less than VCPUs and MemoryMB)
	// means no growth beyond the starting size. The hypervisor declares
	// this headroom at launch.
	MaxVCPUs    int
	MaxMemoryMB int
	// BaseMemoryMB is the memory the VM has from boot and never gives up;
	// the rest, up to MemoryMB, is plugged (and may be unplugged) by the
	// driver. 0 means MemoryMB: nothing to unplug.
	BaseMemoryMB int
	// TemplateVCPUs and TemplateMemoryMB are the size templates are taken
	// at (TemplateDir): a VM of another size is restored from the one
	// template and then resized, so one template serves every size. 0
	// means VCPUs and MemoryMB.
	TemplateVCPUs    int
	TemplateMemoryMB int
	Kernel           string
	Initrd           string
	// KernelParams are appended to the driver's own kernel command line
	// (what the driver's machine needs to boot): the caller's, for the
	// guest's init, in the caller's order, hypervisor.kernel_params
	// among them, so that a driver need not know them.
	KernelParams []string
	Shares       []Share
	// NICs are attached at boot; AddNIC attaches more later.
	NICs []NIC
	// PCIDevices are passed through before Start returns (on root ports
	// planned for them, beside the hot-plug ports); GuestDevice tells
	// where the guest finds each.
	PCIDevices []PCIDevice
	// Channel is the transport DialAgent uses to reach AgentPort.
	Channel AgentChannel
	// AgentPort is where the guest's agent listens: Vsock for
	// ChannelVsock, Serial for ChannelSerial.
	AgentPort GuestPort
	// DebugConsole, unless zero, gives the guest a debug console
	// (DialConsole) on a port of its own, never the agent's.
	DebugConsole GuestPort
	// PortForward, unless zero, gives the guest a port-forward channel
	// (DialPortForward) on a port of its own, which carries connections
	// to the guest's loopback, for pods on the pod network.
	PortForward GuestPort
	// TemplateDir, if set, is where a Templater keeps snapshots of booted
	// guests, to start VMs of the same configuration from instead of
	// booting them. A driver that is no Templater ignores it and boots
	// every VM; the caller sets it only for a Templater.
	TemplateDir string
}

// VM is a running virtual machine.
type VM interface {
	// Pid is the hypervisor process.
	Pid() int
	// DialAgent opens a connection to the agent's channel. The guest may
	// not be listening yet: the caller retries its first request.
	DialAgent(ctx context.Context) (net.Conn, error)
	// AddNIC hot-plugs a network interface into the running VM.
	AddNIC(ctx context.Context, nic NIC) error
	// AddDisk hot-plugs a disk into the running VM and says where the
	// guest finds it. A failure undoes what was done.
	AddDisk(ctx context.Context, disk Disk) (GuestDevice, error)
	// RemoveDisk unplugs a disk AddDisk added and returns once the
	// hypervisor has let go of its file (the guest may have to release
	// it first: bounded by ctx).
	RemoveDisk(ctx context.Context, id string) error
	// AddPCIDevice hot-plugs a host PCI device (VFIO) into the running
	// VM and says where the guest finds it.
	AddPCIDevice(ctx context.Context, dev PCIDevice) (GuestDevice, error)
	// RemovePCIDevice unplugs a device AddPCIDevice or
	// VMConfig.PCIDevices added, and returns once the hypervisor has let
	// go of it.
	RemovePCIDevice(ctx context.Context, id string) error
	// GuestDevice says where the guest finds a device of the VM, by the
	// ID it was added with (a disk, PCI device or NIC).
	GuestDevice(ctx context.Context, id string) (GuestDevice, error)
	// VCPUThreads are the host thread ids of the vCPUs, by vCPU index.
	VCPUThreads(ctx context.Context) ([]int, error)
	// SetVCPUs plugs or unplugs vCPUs until the VM has n, from 1 to
	// VMConfig.MaxVCPUs. It returns once the hypervisor has them; the
	// guest brings plugged vCPUs online (the agent's OnlineCPUMem).
	// Unplugged vCPUs are the highest-numbered ones; a guest that does
	// not let go of one (ACPI eject) within the context is an error. A
	// change the hypervisor cannot make wraps ErrNotResizable.
	SetVCPUs(ctx context.Context, n int) error
	// SetMemory makes the guest's memory mb MiB, within
	// VMConfig.MaxMemoryMB and never below BaseMemoryMB: memory is
	// plugged or unplugged, and what the guest cannot unplug in time is
	// taken back by the balloon. It returns once the guest's memory is
	// mb MiB, or with an error (the VM then keeps the size it reached,
	// which Size tells).
	SetMemory(ctx context.Context, mb int) error
	// Size is the VM's vCPUs and memory as the hypervisor sees them now.
	Size(ctx context.Context) (Size, error)
	// Stop shuts the VM down, gracefully first and by SIGKILL after the
	// context's deadline, and returns once the process has exited.
	Stop(ctx context.Context) error
	// Done is closed when the hypervisor process has exited.
	Done() <-chan struct{}
	// Err tells why the process exited once Done is closed.
	Err() error
	// Console is the last lines of the guest console and the
	// hypervisor's own messages, for the log when something fails.
	Console() []string
	// DialConsole connects to the guest's debug console, a port of its
	// own (VMConfig.DebugConsole); an error wrapping ErrNoConsole when
	// the VM has none.
	DialConsole(ctx context.Context) (net.Conn, error)
	// DialPortForward connects to the guest's port-forward channel, a
	// port of its own that carries connections to the guest's loopback
	// (CRI PortForward); one client at a time.
	DialPortForward(ctx context.Context) (net.Conn, error)
	// Panicked is closed when the guest kernel has panicked (a pvpanic
	// device); the VM is then paused with its memory as it was, for
	// Dump, until it is stopped.
	Panicked() <-chan struct{}
	// Dump writes the guest's memory to path as an ELF vmcore (crash
	// and gdb read it), pausing the guest while it writes; it returns
	// once the file is complete, or when ctx ends (the dump is then
	// cancelled and the file removed).
	Dump(ctx context.Context, path string) error
}

// Size is a VM's current size.
type Size struct {
	VCPUs int
	// MemoryMB is the memory the guest can use: the base memory, plus
	// what is plugged, less what the balloon holds.
	MemoryMB int
	// PluggedMB is the memory plugged above BaseMemoryMB; BalloonMB what
	// the balloon holds back from the guest.
	PluggedMB, BalloonMB int
}

// ErrNotResizable is returned by SetVCPUs and SetMemory on a VM that
// cannot change that part of its size (a machine type without hot-plug,
// or no headroom declared at launch).
var ErrNotResizable = errors.New("the VM cannot be resized")

// ErrNoConsole is returned by DialConsole on a VM without a debug console.
var ErrNoConsole = errors.New("the VM has no debug console")

// Templater is a Driver that can start VMs from templates
// (VMConfig.TemplateDir): a capability the caller asks for with a type
// assertion, so that a driver without templates needs nothing of them.
type Templater interface {
	Driver
	// PrepareTemplate makes the template a VM of cfg starts from unless
	// it is there (or cfg cannot come from one), so that Start only
	// restores. Making one boots a guest and saves it: the caller bounds
	// it apart from the VM's own start, whose budget is one start's.
	PrepareTemplate(ctx context.Context, cfg VMConfig) error
	// ReleaseTemplates removes the templates kept in dir, and what holds
	// them (QEMU's: a ramfs mounted there), for whoever removes dir. A
	// dir without templates is left alone.
	ReleaseTemplates(dir string) error
}

// ChannelPicker is a Driver that picks the agent's channel where the
// configuration leaves it open (agent.channel = "auto"): which transports
// work depends on the VMM and the host (QEMU's vsock needs the host's
// vhost-vsock; Cloud Hypervisor has no virtio-serial). A caller with a
// driver that is no ChannelPicker takes ChannelVsock.
type ChannelPicker interface {
	Driver
	// PickChannel is the channel a VM of this driver gets when the
	// caller has no preference.
	PickChannel() AgentChannel
}

// Driver starts VMs of one hypervisor.
//
// Cleaning up after a controller that died is no method of a Driver: a
// Driver needs a working hypervisor installation to be made, which a
// crash's cleanup must not (package driver's Cleanup).
type Driver interface {
	// Start launches a VM and returns once the hypervisor is running and
	// controllable; the guest may still be booting. On error nothing it
	// started is left running.
	Start(ctx context.Context, cfg VMConfig) (VM, error)
}
