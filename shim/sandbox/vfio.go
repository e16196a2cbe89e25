package sandbox

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"

	"github.com/colo-runtime/colo/hypervisor"
	"github.com/colo-runtime/colo/vfio"
)

// Host PCI devices passed through to the VM (VFIO): a pod's NVMe disk, by
// PCI address. Each is bound to vfio-pci with its IOMMU group (package
// vfio), recorded in the sandbox state before any of it changes, so that a
// crashed shim's Cleanup gives the devices back to their host drivers; and
// given back on teardown once the VM has let go of them.

// binder is the sandbox's way to the host's devices; tests set a fixture's.
func (s *Sandbox) binder() *vfio.Binder {
	if s.vfio != nil {
		return s.vfio
	}
	return vfio.NewBinder()
}

// pciDeviceID is the VM's device id of the host device at addr: QEMU ids
// take no colons.
func pciDeviceID(addr string) string {
	return "pci-" + strings.ReplaceAll(addr, ":", "-")
}

// passthroughDisk passes the host PCI device at addr (an NVMe controller)
// through to the running VM and says where the guest finds it. Only
// devices.pci's devices may be. A failure undoes all of it: the device is
// back on its host driver and the record without it.
func (s *Sandbox) passthroughDisk(ctx context.Context, addr string) (hypervisor.GuestDevice, error) {
	if !slices.Contains(s.cfg.Devices.PCI, addr) {
		return hypervisor.GuestDevice{}, errdefs.ErrPermissionDenied.WithMessage(fmt.Sprintf("PCI device %s: not in devices.pci, the host devices pods may have", addr))
	}
	return s.passthrough(ctx, addr)
}

// passthrough binds the device at addr to vfio-pci and hot-plugs it into
// the running VM; a failure gives it back.
func (s *Sandbox) passthrough(ctx context.Context, addr string) (hypervisor.GuestDevice, error) {
	if s.vm == nil {
		return hypervisor.GuestDevice{}, errdefs.ErrFailedPrecondition.WithMessage(fmt.Sprintf("PCI device %s: the sandbox has no VM", addr))
	}
	b, err := s.bindPCI(ctx, addr)
	if err != nil {
		return hypervisor.GuestDevice{}, err
	}
	gd, err := s.vm.AddPCIDevice(ctx, hypervisor.PCIDevice{ID: pciDeviceID(addr), Address: addr})
	if err != nil {
		s.giveBack(context.WithoutCancel(ctx), b)
		return hypervisor.GuestDevice{}, fmt.Errorf("PCI device %s: %w", addr, err)
	}
	return gd, nil
}

// bindPCI binds the device at addr, with its IOMMU group, to vfio-pci,
// recorded in the sandbox state before the first change; on error nothing
// of it stays bound or recorded.
func (s *Sandbox) bindPCI(ctx context.Context, addr string) (_ vfio.Binding, retErr error) {
	var (
		taken    bool
		recorded *vfio.Binding
	)
	record := func(b vfio.Binding) error {
		err := s.updateState(func(st *State) {
			if slices.ContainsFunc(st.VFIO, func(r vfio.Binding) bool { return r.Address == addr }) {
				taken = true
				return
			}
			st.VFIO = append(st.VFIO, b)
			recorded = &b
		})
		if taken {
			return errdefs.ErrAlreadyExists.WithMessage(fmt.Sprintf("PCI device %s: already passed through to the sandbox", addr))
		}
		return err
	}
	defer func() {
		if retErr != nil && recorded != nil {
			s.giveBack(context.WithoutCancel(ctx), *recorded)
		}
	}()
	b, err := s.binder().Bind(ctx, addr, record)
	if err != nil {
		return vfio.Binding{}, fmt.Errorf("PCI device %s: %w", addr, err)
	}
	return b, nil
}

// giveBack gives a device the VM does not have back to its host driver
// (again, after a Bind that undid itself: Restore is idempotent) and drops
// it from the record; one that does not go back stays recorded, for
// teardown or Cleanup to try again.
func (s *Sandbox) giveBack(ctx context.Context, b vfio.Binding) {
	if err := s.binder().Restore(ctx, b); err != nil {
		log.G(ctx).WithError(err).Error("give back a PCI device the VM did not take")
		return
	}
	s.forgetBinding(ctx, b.Address)
}

// releasePassthrough takes the device at addr out of the running VM and
// gives it back to its host driver.
func (s *Sandbox) releasePassthrough(ctx context.Context, addr string) error {
	i := slices.IndexFunc(s.recorded().VFIO, func(b vfio.Binding) bool { return b.Address == addr })
	if i < 0 {
		return errdefs.ErrNotFound.WithMessage(fmt.Sprintf("PCI device %s: not passed through to the sandbox", addr))
	}
	if err := s.vm.RemovePCIDevice(ctx, pciDeviceID(addr)); err != nil {
		return fmt.Errorf("PCI device %s: %w", addr, err)
	}
	if err := s.binder().Restore(ctx, s.recorded().VFIO[i]); err != nil {
		return err
	}
	s.forgetBinding(ctx, addr)
	return nil
}

// forgetBinding drops the device at addr from the record.
func (s *Sandbox) forgetBinding(ctx context.Context, addr string) {
	err := s.updateState(func(st *State) {
		st.VFIO = slices.DeleteFunc(st.VFIO, func(b vfio.Binding) bool { return b.Address == addr })
	})
	if err != nil {
		log.G(ctx).WithError(err).Warn("drop a given-back PCI device from the record")
	}
}

// restorePassthrough gives every recorded device back to its host driver,
// once the VM is gone; what could not be given back stays recorded.
func (s *Sandbox) restorePassthrough(ctx context.Context) error {
	var errs []error
	for _, b := range slices.Backward(s.recorded().VFIO) {
		if err := s.binder().Restore(ctx, b); err != nil {
			errs = append(errs, err)
			continue
		}
		s.forgetBinding(ctx, b.Address)
	}
	return errors.Join(errs...)
}

// restoreRecorded is Cleanup's restorePassthrough, from the record alone:
// it returns the bindings left.
func restoreRecorded(ctx context.Context, binder *vfio.Binder, bindings []vfio.Binding) ([]vfio.Binding, error) {
	var (
		left []vfio.Binding
		errs []error
	)
	for _, b := range slices.Backward(bindings) {
		if err := binder.Restore(ctx, b); err != nil {
			errs = append(errs, err)
			left = append([]vfio.Binding{b}, left...)
		}
	}
	return left, errors.Join(errs...)
}
