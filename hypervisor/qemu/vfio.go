package qemu

import (
	"context"
	"fmt"
	"slices"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/colo-runtime/colo/hypervisor"
	"github.com/colo-runtime/colo/vfio"
)

// Host PCI devices (VFIO). A q35 VM's PCIe root ports are planned at
// launch: hypervisor.hotplug_ports for devices added later (hp0 to
// hp<n-1>), then one each for VMConfig.PCIDevices (hp<n>, ...), which
// are on the command line. A cold-plugged device holds its port as a
// hot-plugged one does, so GuestDevice finds it the same way, and once
// RemovePCIDevice took it out the port serves the next hot-plug.
//
// A VM with a VFIO device is never saved as nor restored from a template:
// QEMU cannot migrate a device that is the host's hardware (clonable). Nor
// can microvm have one: it has no PCI bus.

// maxRootPorts bounds a VM's PCIe root ports, hot-plug and cold-plug ones
// together: each takes a slot of pcie.0 and a bus number (pci=lastbus=0
// leaves the guest no others to find).
const maxRootPorts = 32

// vfioDriver is QEMU's device of a host PCI device.
const vfioDriver = "vfio-pci"

// memlockCapability lets QEMU pin all of guest memory for the device's
// DMA: VFIO's IOMMU driver counts pinned pages against RLIMIT_MEMLOCK
// unless the process has it.
const memlockCapability = "ipc_lock"

// checkPCIDevices checks cfg's PCI devices against the machine and the
// hot-plug ports planned beside them.
func checkPCIDevices(cfg hypervisor.VMConfig, machine string, hotplugPorts int) error {
	if len(cfg.PCIDevices) == 0 {
		return nil
	}
	if machine != "q35" {
		return fmt.Errorf("pci device %s: machine %s has no PCI bus to pass a host device through on: use q35", cfg.PCIDevices[0].ID, machine)
	}
	if n := hotplugPorts + len(cfg.PCIDevices); n > maxRootPorts {
		return fmt.Errorf("%d PCI devices and hypervisor.hotplug_ports = %d need %d PCIe root ports: at most %d", len(cfg.PCIDevices), hotplugPorts, n, maxRootPorts)
	}
	ids := make(map[string]bool)
	for _, d := range cfg.PCIDevices {
		if err := checkPCIDevice(d); err != nil {
			return err
		}
		if ids[d.ID] {
			return fmt.Errorf("pci device %s: duplicate id", d.ID)
		}
		ids[d.ID] = true
	}
	return nil
}

// checkPCIDevice checks what QEMU would reject later, or misread: the id
// becomes an option value and a QOM name, the address a sysfs path.
func checkPCIDevice(d hypervisor.PCIDevice) error {
	if d.ID == "" || strings.ContainsAny(d.ID, ",= /") {
		return fmt.Errorf("pci device %q: want an id without commas, spaces, slashes or '='", d.ID)
	}
	if err := vfio.CheckAddress(d.Address); err != nil {
		return fmt.Errorf("pci device %s: %w", d.ID, err)
	}
	return nil
}

// pciDeviceArgs are the root ports of the cold-plugged devices and the
// devices on them, after the hot-plug ports.
func (l launch) pciDeviceArgs() []string {
	if l.machine != "q35" {
		return nil
	}
	var a []string
	for i, d := range l.vm.PCIDevices {
		n := l.hotplugPorts + i
		a = append(a,
			"-device", fmt.Sprintf("pcie-root-port,id=%s,bus=pcie.0,chassis=%d", hotplugPort(n), n+1),
			"-device", fmt.Sprintf("%s,host=%s,id=%s,bus=%s", vfioDriver, d.Address, escape(d.ID), hotplugPort(n)),
		)
	}
	return a
}

// ports is the VM's root ports as launched: the hot-plug ones free, then
// one held by each cold-plugged device.
func (l launch) ports() []string {
	p := make([]string, l.hotplugPorts)
	if l.machine != "q35" {
		return p
	}
	for _, d := range l.vm.PCIDevices {
		p = append(p, d.ID)
	}
	return p
}

// capabilities are what QEMU keeps beyond qemuCapabilities.
func (l launch) capabilities() []string {
	if len(l.vm.PCIDevices) > 0 {
		return []string{memlockCapability}
	}
	return nil
}

// AddPCIDevice hot-plugs the host PCI device dev.Address, which the caller
// bound to vfio-pci with its IOMMU group, on a free root port, and says
// where the guest finds it. A failure undoes what was done.
func (vm *VM) AddPCIDevice(ctx context.Context, dev hypervisor.PCIDevice) (_ hypervisor.GuestDevice, retErr error) {
	if err := checkPCIDevice(dev); err != nil {
		return hypervisor.GuestDevice{}, fmt.Errorf("qemu: vm %s: %w", vm.id, err)
	}
	if err := vm.plugPCIDevice(ctx, dev); err != nil {
		return hypervisor.GuestDevice{}, err
	}
	defer func() {
		if retErr == nil {
			return
		}
		undo, cancel := context.WithTimeout(context.WithoutCancel(ctx), undoTimeout)
		defer cancel()
		vm.hotplugMu.Lock()
		defer vm.hotplugMu.Unlock()
		if err := vm.unplugLocked(undo, dev.ID); err != nil {
			vm.logger.WithError(err).Warn("qemu: undo device_add")
		}
	}()
	return vm.GuestDevice(ctx, dev.ID)
}

func (vm *VM) plugPCIDevice(ctx context.Context, dev hypervisor.PCIDevice) error {
	vm.hotplugMu.Lock()
	defer vm.hotplugMu.Unlock()
	if slices.Contains(vm.ports, dev.ID) {
		return fmt.Errorf("qemu: vm %s: pci device %s: a device of that id is plugged", vm.id, dev.ID)
	}
	// QEMU has no ipc_lock unless launched with a VFIO device: raise its
	// limit instead, from here (its seccomp filter denies it setrlimit).
	// Without CAP_SYS_RESOURCE that fails; a device that then cannot pin
	// the guest's memory fails in QEMU, and the error says why.
	unlimited := unix.Rlimit{Cur: unix.RLIM_INFINITY, Max: unix.RLIM_INFINITY}
	var old unix.Rlimit
	limitErr := unix.Prlimit(vm.Pid(), unix.RLIMIT_MEMLOCK, &unlimited, &old)
	if limitErr != nil {
		vm.logger.WithError(limitErr).Warn("qemu: cannot raise QEMU's RLIMIT_MEMLOCK for a VFIO device")
	}
	err := vm.plugLocked(ctx, map[string]any{"driver": vfioDriver, "host": dev.Address, "id": dev.ID})
	switch {
	case err != nil && limitErr != nil:
		return fmt.Errorf("%w (QEMU's RLIMIT_MEMLOCK, which bounds the guest memory VFIO can pin, could not be raised: %w)", err, limitErr)
	case err != nil:
		// Back to the limit QEMU had: unlimited already if it has a
		// VFIO device from before.
		if err := unix.Prlimit(vm.Pid(), unix.RLIMIT_MEMLOCK, &old, nil); err != nil {
			vm.logger.WithError(err).Warn("qemu: restore RLIMIT_MEMLOCK")
		}
	}
	return err
}

// RemovePCIDevice unplugs a device AddPCIDevice or VMConfig.PCIDevices
// added and returns once QEMU let go of it (the guest must release it
// first: bounded by ctx). Its port is free again.
func (vm *VM) RemovePCIDevice(ctx context.Context, id string) error {
	vm.hotplugMu.Lock()
	defer vm.hotplugMu.Unlock()
	if !slices.Contains(vm.ports, id) {
		return fmt.Errorf("qemu: vm %s: no pci device %s", vm.id, id)
	}
	return vm.unplugLocked(ctx, id)
}
