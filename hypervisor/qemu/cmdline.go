package qemu

import (
	"fmt"
	"strconv"
	"strings"

	"github.com/colo-runtime/colo/agentproto"
	"github.com/colo-runtime/colo/hypervisor"
)

// baseKernelParams make the Debian kernel boot fast and quietly on a
// virtual machine (measured in docs/platform-notes.md). panic=-1 reboots at
// once on a panic, and -no-reboot turns that reboot into QEMU's exit.
var baseKernelParams = []string{
	"console=ttyS0", "quiet", "loglevel=1", "mitigations=off", "tsc=reliable",
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
	tscKHz int
	// kernelParams come from the configuration and go between the
	// driver's own parameters and the VM's.
	kernelParams []string
	pidfile      string
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
}

// kernelCmdline is the guest kernel's command line.
func (l launch) kernelCmdline() string {
	params := append([]string(nil), baseKernelParams...)
	params = append(params, "colo.channel="+string(l.vm.Channel))
	if l.machine == "microvm" && l.tscKHz > 0 {
		params = append(params, "tsc_early_khz="+strconv.Itoa(l.tscKHz))
	}
	params = append(params, l.kernelParams...)
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
	if virtioFS {
		// vhost-user devices need guest memory the daemon can map.
		machine += ",memory-backend=mem"
	}

	a := []string{
		"-name", "guest=" + escape(l.vm.ID) + ",debug-threads=on",
		"-machine", machine,
	}
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
	a = append(a,
		"-smp", strconv.Itoa(l.vm.VCPUs),
		"-m", strconv.Itoa(l.vm.MemoryMB)+"M",
	)
	if virtioFS {
		a = append(a, "-object", fmt.Sprintf("memory-backend-memfd,id=mem,size=%dM,share=on", l.vm.MemoryMB))
	}
	a = append(a,
		"-kernel", l.vm.Kernel,
		"-initrd", l.vm.Initrd,
		"-append", l.kernelCmdline(),
		"-nodefaults", "-no-user-config", "-nographic", "-no-reboot", "-vga", "none",
		"-serial", "stdio",
		"-pidfile", l.pidfile,
		"-chardev", fmt.Sprintf("socket,id=qmp,fd=%d,server=on,wait=off", l.qmpFD),
		"-mon", "chardev=qmp,mode=control",
	)

	switch l.vm.Channel {
	case hypervisor.ChannelSerial:
		a = append(a,
			"-device", dev("virtio-serial")+",id=vser0",
			"-chardev", fmt.Sprintf("socket,id=agent,fd=%d,server=on,wait=off", l.agentFD),
			"-device", "virtserialport,bus=vser0.0,chardev=agent,name="+agentproto.SerialPortName,
		)
	case hypervisor.ChannelVsock:
		a = append(a, "-device", fmt.Sprintf("%s,id=vsock0,guest-cid=%d,vhostfd=%d", dev("vhost-vsock"), l.cid, l.vhostFD))
	}

	for i, n := range l.vm.NICs {
		a = append(a,
			"-netdev", netdevArg(n.ID, strconv.Itoa(l.nicFDs[i]), l.vhostNet),
			"-device", nicDeviceArg(dev("virtio-net"), n, ""),
		)
	}
	if l.machine == "q35" {
		for i := range l.hotplugPorts {
			a = append(a, "-device", fmt.Sprintf("pcie-root-port,id=%s,bus=pcie.0,chassis=%d", hotplugPort(i), i+1))
		}
	}

	for i, s := range l.vm.Shares {
		switch s.Kind {
		case hypervisor.Share9P:
			fsdev := fmt.Sprintf("local,id=fs%d,path=%s,security_model=none", i, escape(s.Path))
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
			a = append(a,
				"-chardev", fmt.Sprintf("socket,id=fs%d,path=%s", i, escape(s.Path)),
				"-device", fmt.Sprintf("%s,chardev=fs%d,tag=%s", dev("vhost-user-fs"), i, escape(s.Tag)),
			)
		}
	}
	return a
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

// nicDeviceArg is the guest NIC on netdev n.ID; bus may be empty.
func nicDeviceArg(driver string, n hypervisor.NIC, bus string) string {
	d := fmt.Sprintf("%s,netdev=%s,id=%s,mac=%s", driver, escape(n.ID), escape(nicDeviceID(n.ID)), n.MAC)
	if n.MTU > 0 {
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
