package qemu

import (
	"context"
	"errors"
	"fmt"

	"github.com/colo-runtime/colo/hypervisor"
)

// AddDisk is not built yet.
func (vm *VM) AddDisk(ctx context.Context, disk hypervisor.Disk) (hypervisor.GuestDevice, error) {
	return hypervisor.GuestDevice{}, fmt.Errorf("qemu: vm %s: disk %s: %w", vm.id, disk.ID, errors.ErrUnsupported)
}

// RemoveDisk is not built yet.
func (vm *VM) RemoveDisk(ctx context.Context, id string) error {
	return fmt.Errorf("qemu: vm %s: disk %s: %w", vm.id, id, errors.ErrUnsupported)
}

// AddPCIDevice is not built yet.
func (vm *VM) AddPCIDevice(ctx context.Context, dev hypervisor.PCIDevice) (hypervisor.GuestDevice, error) {
	return hypervisor.GuestDevice{}, fmt.Errorf("qemu: vm %s: device %s: %w", vm.id, dev.ID, errors.ErrUnsupported)
}

// RemovePCIDevice is not built yet.
func (vm *VM) RemovePCIDevice(ctx context.Context, id string) error {
	return fmt.Errorf("qemu: vm %s: device %s: %w", vm.id, id, errors.ErrUnsupported)
}

// GuestDevice is not built yet.
func (vm *VM) GuestDevice(ctx context.Context, id string) (hypervisor.GuestDevice, error) {
	return hypervisor.GuestDevice{}, fmt.Errorf("qemu: vm %s: device %s: %w", vm.id, id, errors.ErrUnsupported)
}
