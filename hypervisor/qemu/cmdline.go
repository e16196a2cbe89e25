package qemu

import (
	"fmt"
	"strconv"
	"strings"

	"github.com/colo-runtime/colo/hypervisor"
)

// baseKernelParams make the Debian kernel boot fast and quietly on a
// virtual machine (measured in docs/platform-notes.md). panic=-1 reboots at
// once on a panic, and -no-reboot turns that reboot into QEMU's exit; once
// the guest's pvpanic driver is loaded, the panic pauses the VM instead
// (-action panic=pause, see args). loglevel=5 lets warnings and errors
// reach the console (three lines in a normal boot), and with them the
// stack traces of soft lockups, oopses and hung tasks: the shim logs the
// console when a start fails or the guest stops answering.
var baseKernelParams = []string{
	"console=ttyS0", "quiet", "loglevel=5", "mitigations=off", "tsc=reliable",
	"no_timer_check", "noreplace-smp", "cryptomgr.notests", "i8042.noaux",
	"i8042.nomux", "i8042.nopnp", "i8042.dumbkbd", "rcupdate.rcu_expedited=1",
	"random.trust_cpu=on", "pci=lastbus=0", "nokaslr", "audit=0",
	"8250.nr_uarts=1", "panic=-1",
}

// launch is everything the QEMU command line is made of.
type launch struct {
	vm      hypervisor.VMConfig
	machine string // "q35" or "microvm"
	accel   string // accelKVM or accelTCG
	// tscKHz is the host TSC frequency for microvm's tsc_early_khz; 0
	// leaves it out.
	tscKHz  int
	pidfile string
	// File descriptors as QEMU sees them (ExtraFiles start at 3).
	qmpFD   int
	agentFD int // listening socket of the serial channel
	vhostFD int // /dev/vhost-vsock with the guest CID already set
	cid     uint32
	// nicFDs are the TAP queues of vm.NICs, in order.
	nicFDs []int
	// vhostNet puts the NICs' data path in the host kernel.
	vhostNet bool
	// hotplugPorts are PCIe root ports for devices added later (q35).
	hotplugPorts int
	// snapshot is how the VM relates to a template: none (it boots),
	// template (it boots to be saved) or clone (it is restored).
	snapshot snapshotMode
	// memPath backs a template's or clone's memory with a file for
	// sharing pages between clones (see templateMemory).
	memPath string
	// sandbox turns on QEMU's seccomp filter (sandboxArg).
	sandbox bool
}

// sandboxArg is QEMU's seccomp filter with every optional group denied:
// obsolete system calls, changing ids (elevateprivileges), fork, exec and
// namespaces (spawn), and priorities and affinity (resourcecontrol; the
// shim places QEMU's threads from outside). colo's QEMU needs none of them:
// the shim starts the helpers, and TAPs and migration files come in as file
// descriptors. The guest is untrusted: one that breaks into device
// emulation then cannot run a program, switch ids or leave QEMU's
// namespaces, and mount, reboot and the like are denied in every mode.
const sandboxArg = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"

// snapshotMode says whether a VM boots, boots to become a template, or is
// restored from one.
type snapshotMode int

const (
	snapshotNone snapshotMode = iota
	snapshotTemplate
	snapshotClone
)

// hotplugged tells whether the share is added after a clone is restored:
// vhost-user devices cannot be migrated, so templates have none.
func (l launch) hotplugged(s hypervisor.Share) bool {
	return l.snapshot != snapshotNone && s.Kind == hypervisor.ShareVirtioFS
}

// kernelCmdline is the guest kernel's command line.
func (l launch) kernelCmdline() string {
	params := append([]string(nil), baseKernelParams...)
	if l.machine == "microvm" && l.tscKHz > 0 {
		params = append(params, "tsc_early_khz="+strconv.Itoa(l.tscKHz))
	}
	if l.sizing().virtioMem {
		// Plugged memory comes online at once, as movable memory that
		// can be unplugged again.
		params = append(params, "memhp_default_state=online_movable")
	}
	params = append(params, l.vm.KernelParams...)
	return strings.Join(params, " ")
}

// args is QEMU's command line without the binary.
func (l launch) args() []string {
	// virtio devices sit on PCI on q35 and on virtio-mmio on microvm.
	transport := "pci"
	if l.machine == "microvm" {
		transport = "device"
	}
	dev := func(name string) string { return name + "-" + transport }

	virtioFS := false
	for _, s := range l.vm.Shares {
		virtioFS = virtioFS || s.Kind == hypervisor.ShareVirtioFS
	}
	machine := l.machine
	if virtioFS || l.snapshot != snapshotNone {
		// vhost-user devices need guest memory the daemon can map;
		// templates keep their memory in a file or a migration stream.
		machine += ",memory-backend=mem"
	}

	a := []string{"-name", "guest=" + escape(l.vm.ID) + ",debug-threads=on"}
	if l.sandbox {
		a = append(a, "-sandbox", sandboxArg)
	}
	a = append(a, "-machine", machine)
	if l.machine == "microvm" {
		// Modern virtio-mmio: vhost-user devices (virtio-fs) do not work
		// over the legacy interface QEMU defaults to.
		a = append(a, "-global", "virtio-mmio.force-legacy=false")
	}
	if l.accel == accelKVM {
		a = append(a, "-accel", "kvm", "-cpu", "host")
	} else {
		a = append(a, "-accel", "tcg,thread=multi", "-cpu", "max")
	}
	a = append(a, l.sizeArgs()...)
	baseMB := l.sizing().baseMB
	sharedMemory := false
	switch {
	case l.memPath != "":
		// A template writes its memory to the file (share=on); each
		// clone maps it copy-on-write (share=off), so clones share the
		// pages they do not change.
		share := "on"
		if l.snapshot == snapshotClone {
			share = "off"
		}
		a = append(a, "-object", fmt.Sprintf("memory-backend-file,id=mem,size=%dM,mem-path=%s,share=%s", baseMB, escape(l.memPath), share))
	case virtioFS || l.snapshot != snapshotNone:
		a = append(a, "-object", fmt.Sprintf("memory-backend-memfd,id=mem,size=%dM,share=on", baseMB))
		sharedMemory = true
	}
	a = append(a, l.hotplugArgs(sharedMemory)...)
	a = append(a,
		"-kernel", l.vm.Kernel,
		"-initrd", l.vm.Initrd,
		"-append", l.kernelCmdline(),
		"-nodefaults", "-no-user-config", "-nographic", "-no-reboot", "-vga", "none",
		"-serial", "stdio",
		"-pidfile", l.pidfile,
		"-chardev", fmt.Sprintf("socket,id=qmp,fd=%d,server=on,wait=off", l.qmpFD),
		"-mon", "chardev=qmp,mode=control",
		// A guest kernel that panics tells the pvpanic device (on the ISA
		// bus of both machines; the guest's pvpanic_mmio driver finds it
		// through ACPI) before panic=-1 would reboot it: QEMU then pauses
		// the VM with its memory as it was and sends GUEST_PANICKED, so
		// the shim can dump it (panic.go). A panic before the driver is
		// loaded still ends QEMU through -no-reboot.
		"-action", "panic=pause",
		"-device", "pvpanic",
	)

	switch l.vm.Channel {
	case hypervisor.ChannelSerial:
		a = append(a,
			"-device", dev("virtio-serial")+",id=vser0",
			"-chardev", fmt.Sprintf("socket,id=agent,fd=%d,server=on,wait=off", l.agentFD),
			// The id makes QEMU report the guest opening the port
			// (VSERPORT_CHANGE): a template is saved once its agent listens.
			"-device", "virtserialport,bus=vser0.0,chardev=agent,name="+escape(l.vm.AgentPort.Serial)+",id="+agentPortID,
		)
	case hypervisor.ChannelVsock:
		a = append(a, "-device", fmt.Sprintf("%s,id=vsock0,guest-cid=%d,vhostfd=%d", dev("vhost-vsock"), l.cid, l.vhostFD))
	}
	a = append(a, l.consoleArgs(dev)...)     // console.go
	a = append(a, l.portForwardArgs(dev)...) // portforward.go

	for i, n := range l.vm.NICs {
		if l.snapshot != snapshotNone {
			break // hot-plugged into a clone
		}
		a = append(a,
			"-netdev", netdevArg(n.ID, strconv.Itoa(l.nicFDs[i]), l.vhostNet && isVirtioNIC(n)),
			"-device", nicDeviceArg(nicDriver(n, transport), n, ""),
		)
	}
	if l.machine == "q35" {
		for i := range l.hotplugPorts {
			a = append(a, "-device", fmt.Sprintf("pcie-root-port,id=%s,bus=pcie.0,chassis=%d", hotplugPort(i), i+1))
		}
		a = append(a, l.pciDeviceArgs()...) // vfio.go
		// A new generation id for every VM: the guest kernel reseeds its
		// RNG when it changes, so clones of one template do not share
		// random state (or boot ids).
		a = append(a, "-device", "vmgenid,guid=auto")
	}
	a = append(a, l.balloonArg(transport)...)

	for i, s := range l.vm.Shares {
		switch s.Kind {
		case hypervisor.Share9P:
			// The share holds a mount per container rootfs and volume:
			// multidevs=remap keeps their inode numbers apart in the guest.
			fsdev := fmt.Sprintf("local,id=fs%d,path=%s,security_model=none,multidevs=remap", i, escape(s.Path))
			if s.ReadOnly {
				fsdev += ",readonly=on"
			}
			a = append(a,
				"-fsdev", fsdev,
				"-device", fmt.Sprintf("%s,fsdev=fs%d,mount_tag=%s", dev("virtio-9p"), i, escape(s.Tag)),
			)
		case hypervisor.ShareVirtioFS:
			// Read-only is up to virtiofsd and the guest's mount: the
			// device has no such switch.
			if l.snapshot == snapshotTemplate {
				continue
			}
			a = append(a, "-chardev", fmt.Sprintf("socket,id=fs%d,path=%s", i, escape(s.Path)))
			if !l.hotplugged(s) {
				a = append(a, "-device", virtioFSDeviceArg(dev("vhost-user-fs"), i, s.Tag, ""))
			}
		}
	}
	if l.snapshot == snapshotClone {
		a = append(a, "-incoming", "defer")
	}
	return a
}

// agentPortID is the device id of the agent's virtio-serial port.
const agentPortID = "agentport"

// virtioFSDeviceArg is the virtio-fs device on chardev fs<i>; bus may be
// empty.
func virtioFSDeviceArg(driver string, i int, tag, bus string) string {
	d := fmt.Sprintf("%s,chardev=fs%d,tag=%s,id=fs%d-dev", driver, i, escape(tag), i)
	if bus != "" {
		d += ",bus=" + bus
	}
	return d
}

// hotplugPort names the i-th PCIe root port for hot-plugged devices.
func hotplugPort(i int) string { return "hp" + strconv.Itoa(i) }

// netdevArg is a TAP backend on an inherited (or getfd-named) fd.
func netdevArg(id, fd string, vhost bool) string {
	v := "off"
	if vhost {
		v = "on"
	}
	return fmt.Sprintf("tap,id=%s,fd=%s,vhost=%s", escape(id), escape(fd), v)
}

// isVirtioNIC tells whether n is a virtio-net device rather than an
// emulated physical NIC.
func isVirtioNIC(n hypervisor.NIC) bool {
	return n.Model == "" || n.Model == hypervisor.NICVirtio
}

// nicDriver is QEMU's device for n's model; transport is "pci" or
// "device" (virtio-mmio), for virtio-net. The emulated NICs are PCI
// devices only: checkNIC keeps them off microvm.
func nicDriver(n hypervisor.NIC, transport string) string {
	if isVirtioNIC(n) {
		return "virtio-net-" + transport
	}
	return n.Model // NICE1000E and NICIGB are QEMU's own names
}

// nicDeviceArg is the guest NIC on netdev n.ID; bus may be empty. Only
// virtio-net has host_mtu: the emulated NICs get their MTU from the
// agent alone.
func nicDeviceArg(driver string, n hypervisor.NIC, bus string) string {
	d := fmt.Sprintf("%s,netdev=%s,id=%s,mac=%s", driver, escape(n.ID), escape(nicDeviceID(n.ID)), n.MAC)
	if n.MTU > 0 && isVirtioNIC(n) {
		d += ",host_mtu=" + strconv.Itoa(n.MTU)
	}
	if bus != "" {
		d += ",bus=" + bus
	}
	return d
}

// nicDeviceID is the device id of the NIC on netdev id.
func nicDeviceID(id string) string { return id + "-dev" }

// escape quotes a value inside a QEMU option list, where a comma ends the
// value unless doubled.
func escape(v string) string {
	return strings.ReplaceAll(v, ",", ",,")
}
