// Package driver picks the hypervisor driver the configuration names.
package driver

import (
	"fmt"

	"github.com/colo-runtime/colo/config"
	"github.com/colo-runtime/colo/hypervisor"
	"github.com/colo-runtime/colo/hypervisor/qemu"
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
