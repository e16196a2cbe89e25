// Package driver picks the hypervisor driver the configuration names
// (hypervisor.type), and the cleanup of a VM left by a controller that
// died, from the type alone.
package driver

import (
	"context"
	"fmt"

	"github.com/colo-runtime/colo/config"
	"github.com/colo-runtime/colo/hypervisor"
	"github.com/colo-runtime/colo/hypervisor/clh"
	"github.com/colo-runtime/colo/hypervisor/qemu"
	"github.com/colo-runtime/colo/internal/procfs"
)

// New returns the driver for cfg.Type: "qemu" (also when empty) or "clh".
func New(cfg config.Hypervisor) (hypervisor.Driver, error) {
	switch cfg.Type {
	case "", "qemu":
		d, err := qemu.New(cfg)
		if err != nil {
			return nil, err
		}
		return d, nil
	case "clh":
		d, err := clh.New(cfg)
		if err != nil {
			return nil, err
		}
		return d, nil
	default:
		return nil, fmt.Errorf("hypervisor %q: want qemu or clh", cfg.Type)
	}
}

// Cleanup kills the VM of hypervisor typ (as New takes it) that a dead
// controller left in dir (VMConfig.Dir) and removes the driver's files
// there; vm is the hypervisor process as recorded (its pid and start
// time), or zero if it was not. It makes no Driver: a crash's cleanup
// must work when the hypervisor's binary or devices no longer would. It
// is a no-op when nothing is left.
func Cleanup(ctx context.Context, typ, dir string, vm procfs.Proc) error {
	switch typ {
	case "", "qemu":
		return qemu.Cleanup(ctx, dir, vm)
	case "clh":
		return clh.Cleanup(ctx, dir, vm)
	default:
		// New makes no other driver, so no VM of another type ran.
		return fmt.Errorf("hypervisor %q: no VM of it can have run", typ)
	}
}

// ReleaseTemplates gives back what the templates in dir (a
// runtime.template_dir) hold, as hypervisor.Templater does, for whoever
// removes dir without a Driver: a test, or an operator reclaiming the
// memory. Every driver with templates releases its own; a dir without any
// is left alone.
func ReleaseTemplates(dir string) error {
	return qemu.ReleaseTemplates(dir)
}
