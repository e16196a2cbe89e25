// Package driver picks the hypervisor driver the configuration names, and
// the cleanup of a VM left by a controller that died, from the name alone.
package driver

import (
	"context"
	"fmt"

	"github.com/colo-runtime/colo/config"
	"github.com/colo-runtime/colo/hypervisor"
	"github.com/colo-runtime/colo/hypervisor/qemu"
	"github.com/colo-runtime/colo/internal/procfs"
)

// New returns the driver for cfg.Name: "qemu" (also when empty) or "clh".
func New(cfg config.Hypervisor) (hypervisor.Driver, error) {
	switch cfg.Name {
	case "", "qemu":
		d, err := qemu.New(cfg)
		if err != nil {
			return nil, err
		}
		return d, nil
	case "clh":
		return nil, fmt.Errorf("hypervisor clh: not implemented yet")
	default:
		return nil, fmt.Errorf("hypervisor %q: want qemu or clh", cfg.Name)
	}
}

// Cleanup kills the VM of hypervisor name (as New takes it) that a dead
// controller left in dir (VMConfig.Dir) and removes the driver's files
// there; vm is the hypervisor process as recorded (its pid and start
// time), or zero if it was not. It makes no Driver: a crash's cleanup
// must work when the hypervisor's binary or devices no longer would. It
// is a no-op when nothing is left.
func Cleanup(ctx context.Context, name, dir string, vm procfs.Proc) error {
	switch name {
	case "", "qemu":
		return qemu.Cleanup(ctx, dir, vm)
	default:
		// New makes no other driver, so no VM of another name ran.
		return fmt.Errorf("hypervisor %q: no VM of it can have run", name)
	}
}
