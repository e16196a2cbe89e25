package qemu

// Stand-ins for unplugLocked and GuestDevice, which another branch builds:
// only so that this branch compiles and its tests run. The integrator
// deletes this file at the merge.

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"time"

	"github.com/colo-runtime/colo/hypervisor"
)

// unplugLocked asks QEMU to remove device id, waits (bounded by ctx) until
// it is gone, and frees its port.
func (vm *VM) unplugLocked(ctx context.Context, id string) error {
	port := slices.Index(vm.ports, id)
	if port < 0 {
		return fmt.Errorf("qemu: vm %s: %s: not on a hotplug port", vm.id, id)
	}
	if _, err := vm.qmp.Execute(ctx, "device_del", map[string]any{"id": id}); err != nil {
		return fmt.Errorf("qemu: vm %s: %s: %w", vm.id, id, err)
	}
	for {
		_, err := vm.qmp.Execute(ctx, "qom-get", map[string]any{"path": "/machine/peripheral/" + id, "property": "type"})
		if err != nil && ctx.Err() == nil {
			break // gone
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("qemu: vm %s: %s: not released by the guest: %w", vm.id, id, ctx.Err())
		case <-time.After(20 * time.Millisecond):
		}
	}
	vm.ports[port] = ""
	return nil
}

// GuestDevice is where the guest finds device id: behind the root port it
// is on.
func (vm *VM) GuestDevice(ctx context.Context, id string) (hypervisor.GuestDevice, error) {
	vm.hotplugMu.Lock()
	port := slices.Index(vm.ports, id)
	if port < 0 {
		port = slices.Index(vm.ports, nicDeviceID(id))
	}
	vm.hotplugMu.Unlock()
	if port < 0 {
		return hypervisor.GuestDevice{}, fmt.Errorf("qemu: vm %s: no device %s on a root port", vm.id, id)
	}
	raw, err := vm.qmp.Execute(ctx, "qom-get", map[string]any{"path": "/machine/peripheral/" + hotplugPort(port), "property": "addr"})
	if err != nil {
		return hypervisor.GuestDevice{}, fmt.Errorf("qemu: vm %s: %s: %w", vm.id, id, err)
	}
	var devfn int
	if err := json.Unmarshal(raw, &devfn); err != nil || devfn < 0 {
		return hypervisor.GuestDevice{}, fmt.Errorf("qemu: vm %s: %s: port address %s", vm.id, id, raw)
	}
	return hypervisor.GuestDevice{PCIPath: fmt.Sprintf("%02x.%x/00.0", devfn>>3, devfn&7)}, nil
}
