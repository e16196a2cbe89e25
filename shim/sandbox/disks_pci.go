package sandbox

import (
	"context"
	"fmt"

	"github.com/containerd/errdefs"

	"github.com/colo-runtime/colo/hypervisor"
)

// passthroughDisk passes the host PCI device at addr (an NVMe controller
// devices.pci lists) through to the VM with VFIO and says where the guest
// finds it; the sandbox records it and gives it back on teardown.
//
// VFIO passthrough is built elsewhere (package vfio, shim/sandbox/vfio.go)
// and wired in here when it lands.
func (s *Sandbox) passthroughDisk(ctx context.Context, addr string) (hypervisor.GuestDevice, error) {
	return hypervisor.GuestDevice{}, errdefs.ErrNotImplemented.WithMessage(fmt.Sprintf(
		"PCI device %s: passing a disk through with VFIO is not built yet", addr))
}
