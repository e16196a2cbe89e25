package qemu

import (
	"context"
	"errors"
	"fmt"

	"github.com/colo-runtime/colo/hypervisor"
)

// AddPCIDevice is not built yet.
func (vm *VM) AddPCIDevice(ctx context.Context, dev hypervisor.PCIDevice) (hypervisor.GuestDevice, error) {
	return hypervisor.GuestDevice{}, fmt.Errorf("qemu: vm %s: device %s: %w", vm.id, dev.ID, errors.ErrUnsupported)
}

// RemovePCIDevice is not built yet.
func (vm *VM) RemovePCIDevice(ctx context.Context, id string) error {
	return fmt.Errorf("qemu: vm %s: device %s: %w", vm.id, id, errors.ErrUnsupported)
}
