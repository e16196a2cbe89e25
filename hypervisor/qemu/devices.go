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
