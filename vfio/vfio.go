// Package vfio hands host PCI devices to the vfio-pci driver, so that a VM
// can have them (passthrough), and gives them back to their host drivers.
// It is the one place colo rebinds host devices: storage (NVMe) and network
// (ENI NICs) both use it.
//
// VFIO's unit is the IOMMU group, not the device: a VM may only have a
// device whose whole group is safe to give it. Bind therefore works on the
// group of the device asked for. Its members are treated so:
//
//   - a PCI bridge or PCIe port (class 0x0604, or driven by pcieport) is
//     left alone: the kernel lets a group with bridges on their own drivers
//     be used;
//   - a member already on vfio-pci stays there and is not Bind's to give
//     back;
//   - every other member, endpoint siblings of the device included, is
//     bound to vfio-pci too (as Kata does), unbound ones also: a host driver
//     that probed one later would make the group unusable under the VM,
//     and driver_override keeps that from happening;
//   - a member the host uses (a block device below it that is mounted or
//     held, a network interface below it that is up) is an error naming it,
//     and so is a group of which some endpoints are on vfio-pci and others
//     on host drivers: someone else is half way through it.
//
// A Binding records each device Bind moved and the driver it came from, in
// JSON, so that Restore gives them back also after a crash, from a record
// alone.
package vfio

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/containerd/log"
	"github.com/moby/sys/mountinfo"
)

// Driver is the name of the kernel's VFIO PCI driver.
const Driver = "vfio-pci"

// Binding is what Bind did: the devices it moved to vfio-pci, each with
// the driver it had. It is complete before the first change (see Bind's
// record), and a record of it read back after a crash is enough for
// Restore.
type Binding struct {
	// Address is the device asked for.
	Address string `json:"address"`
	// Group is its IOMMU group; the VM opens /dev/vfio/<Group>.
	Group string `json:"group"`
	// Devices are the group's members Bind moves to vfio-pci, in the
	// order it does; Restore goes in reverse.
	Devices []Device `json:"devices,omitempty"`
}

// Device is a member of a group that Bind moved to vfio-pci.
type Device struct {
	Address string `json:"address"`
	// Driver is the host driver it had ("" if none); Restore gives it
	// back to that one.
	Driver string `json:"driver,omitempty"`
}

// AttrWriter writes a sysfs attribute. The kernel acts on the write
// (binding, unbinding), so tests put a fake kernel behind it.
type AttrWriter interface {
	// WriteAttr writes value to the attribute at path (absolute, under
	// the Binder's SysRoot).
	WriteAttr(ctx context.Context, path, value string) error
}

// Binder binds devices to vfio-pci and restores them.
type Binder struct {
	// SysRoot is where sysfs is mounted ("/sys").
	SysRoot string
	// DevRoot is where device nodes are ("/dev").
	DevRoot string
	// Mountinfo is the mount table that tells whether a block device
	// is mounted ("/proc/self/mountinfo").
	Mountinfo string
	// Attr writes sysfs attributes; nil writes the files.
	Attr AttrWriter
}

// NewBinder is a Binder of the host's devices.
func NewBinder() *Binder {
	return &Binder{SysRoot: "/sys", DevRoot: "/dev", Mountinfo: "/proc/self/mountinfo"}
}

// settleTimeout bounds waiting for the kernel to show a change it made
// (a driver link, a group's device node) when the caller's context sets no
// earlier deadline.
const settleTimeout = 5 * time.Second

// addressRE is a PCI address as sysfs names devices: domain:bus:slot.function.
var addressRE = regexp.MustCompile(`^[0-9a-f]{4}:[0-9a-f]{2}:[0-1][0-9a-f]\.[0-7]$`)

// CheckAddress tells whether addr is a PCI address as sysfs names devices
// ("0000:45:00.0", lower case).
func CheckAddress(addr string) error {
	if !addressRE.MatchString(addr) {
		return fmt.Errorf("vfio: %q is not a PCI address: want domain:bus:slot.function, lower-case hex (0000:45:00.0)", addr)
	}
	return nil
}

func (b *Binder) devicePath(addr string, elem ...string) string {
	return filepath.Join(append([]string{b.SysRoot, "bus", "pci", "devices", addr}, elem...)...)
}

func (b *Binder) driverPath(driver string, elem ...string) string {
	return filepath.Join(append([]string{b.SysRoot, "bus", "pci", "drivers", driver}, elem...)...)
}

// GroupDevice is the device node of an IOMMU group, which the hypervisor
// opens.
func (b *Binder) GroupDevice(group string) string {
	return filepath.Join(b.DevRoot, "vfio", group)
}

func (b *Binder) write(ctx context.Context, path, value string) error {
	if b.Attr != nil {
		return b.Attr.WriteAttr(ctx, path, value)
	}
	return writeAttr(ctx, path, value)
}

// writeAttr writes a sysfs attribute. A write that rebinds a driver can
// block in the kernel (an unbind from vfio-pci waits for the device's user
// to let go): the wait ends with ctx, and the write, which cannot be taken
// back, finishes by itself.
func writeAttr(ctx context.Context, path, value string) error {
	done := make(chan error, 1)
	go func() {
		f, err := os.OpenFile(path, os.O_WRONLY, 0)
		if err != nil {
			done <- err
			return
		}
		_, err = f.Write([]byte(value))
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		done <- err
	}()
	select {
	case err := <-done:
		if err != nil {
			return fmt.Errorf("write %q to %s: %w", value, path, err)
		}
		return nil
	case <-ctx.Done():
		return fmt.Errorf("write %q to %s: the kernel did not finish: %w", value, path, context.Cause(ctx))
	}
}

// member is a device of an IOMMU group as it is now.
type member struct {
	addr   string
	driver string // "" when unbound
	bridge bool
}

// driver is the device's current driver, "" if none.
func (b *Binder) driver(addr string) (string, error) {
	target, err := os.Readlink(b.devicePath(addr, "driver"))
	if errors.Is(err, fs.ErrNotExist) {
		return "", nil
	}
	if err != nil {
		return "", fmt.Errorf("vfio: device %s: driver: %w", addr, err)
	}
	return filepath.Base(target), nil
}

// group is the device's IOMMU group.
func (b *Binder) group(addr string) (string, error) {
	target, err := os.Readlink(b.devicePath(addr, "iommu_group"))
	if errors.Is(err, fs.ErrNotExist) {
		return "", fmt.Errorf("vfio: device %s has no IOMMU group: the host has no IOMMU enabled (boot it with intel_iommu=on or amd_iommu=on, and the IOMMU on in the firmware: VT-d, AMD-Vi), so no device can be passed through", addr)
	}
	if err != nil {
		return "", fmt.Errorf("vfio: device %s: IOMMU group: %w", addr, err)
	}
	g := filepath.Base(target)
	if _, err := strconv.Atoi(g); err != nil {
		return "", fmt.Errorf("vfio: device %s: IOMMU group %q is not a number", addr, g)
	}
	return g, nil
}

// members are the devices of IOMMU group g.
func (b *Binder) members(g string) ([]member, error) {
	dir := filepath.Join(b.SysRoot, "kernel", "iommu_groups", g, "devices")
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("vfio: IOMMU group %s: %w", g, err)
	}
	var ms []member
	for _, e := range entries {
		addr := e.Name()
		if CheckAddress(addr) != nil {
			return nil, fmt.Errorf("vfio: IOMMU group %s has member %q, which is not a PCI device: only PCI groups can be passed through", g, addr)
		}
		drv, err := b.driver(addr)
		if err != nil {
			return nil, err
		}
		class, err := os.ReadFile(b.devicePath(addr, "class"))
		if err != nil {
			return nil, fmt.Errorf("vfio: device %s: class: %w", addr, err)
		}
		// 0x0604xx: PCI-to-PCI bridge, which PCIe root and switch ports are.
		bridge := strings.HasPrefix(strings.TrimSpace(string(class)), "0x0604") || drv == "pcieport"
		ms = append(ms, member{addr: addr, driver: drv, bridge: bridge})
	}
	return ms, nil
}

// Plan checks the group of the device at addr and says what Bind would do,
// changing nothing.
func (b *Binder) Plan(ctx context.Context, addr string) (Binding, error) {
	if err := CheckAddress(addr); err != nil {
		return Binding{}, err
	}
	if _, err := os.Lstat(b.devicePath(addr)); err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return Binding{}, fmt.Errorf("vfio: no PCI device %s on this host (%s)", addr, b.devicePath(addr))
		}
		return Binding{}, fmt.Errorf("vfio: device %s: %w", addr, err)
	}
	g, err := b.group(addr)
	if err != nil {
		return Binding{}, err
	}
	if _, err := os.Stat(b.driverPath(Driver)); err != nil {
		return Binding{}, fmt.Errorf("vfio: the %s driver is not loaded (modprobe %s): %w", Driver, Driver, err)
	}
	ms, err := b.members(g)
	if err != nil {
		return Binding{}, err
	}
	mounts, err := b.mountedDevices()
	if err != nil {
		return Binding{}, err
	}
	bnd := Binding{Address: addr, Group: g}
	var onVFIO, onHost []string
	for _, m := range ms {
		switch {
		case m.bridge:
			continue
		case m.driver == Driver:
			onVFIO = append(onVFIO, m.addr)
			continue
		case m.driver != "":
			onHost = append(onHost, m.addr+" ("+m.driver+")")
			if err := b.checkUnused(m, mounts); err != nil {
				return Binding{}, fmt.Errorf("vfio: device %s: IOMMU group %s: %w", addr, g, err)
			}
		}
		bnd.Devices = append(bnd.Devices, Device{Address: m.addr, Driver: m.driver})
	}
	if len(onVFIO) > 0 && len(onHost) > 0 {
		return Binding{}, fmt.Errorf("vfio: device %s: IOMMU group %s is partly bound to %s (%s) and partly to host drivers (%s): someone else is using or binding it", addr, g, Driver, strings.Join(onVFIO, ", "), strings.Join(onHost, ", "))
	}
	if len(onVFIO) > 0 {
		if err := b.checkGroupFree(g); err != nil {
			return Binding{}, fmt.Errorf("vfio: device %s: %w", addr, err)
		}
	}
	return bnd, nil
}

// checkGroupFree fails when the group's device node is open: VFIO lets one
// user open a group at a time, so a second open is EBUSY.
func (b *Binder) checkGroupFree(g string) error {
	f, err := os.OpenFile(b.GroupDevice(g), os.O_RDWR, 0)
	switch {
	case errors.Is(err, syscall.EBUSY):
		return fmt.Errorf("IOMMU group %s is in use (%s is open, by a VM?)", g, b.GroupDevice(g))
	case err != nil:
		// Not there yet, or not openable: whoever opens it next will say.
		return nil
	}
	return f.Close()
}

// mountedDevices are the major:minor of every mounted filesystem's device.
func (b *Binder) mountedDevices() (map[string]string, error) {
	f, err := os.Open(b.Mountinfo)
	if err != nil {
		return nil, fmt.Errorf("vfio: %w", err)
	}
	defer f.Close()
	infos, err := mountinfo.GetMountsFromReader(f, nil)
	if err != nil {
		return nil, fmt.Errorf("vfio: %s: %w", b.Mountinfo, err)
	}
	m := make(map[string]string)
	for _, i := range infos {
		m[fmt.Sprintf("%d:%d", i.Major, i.Minor)] = i.Mountpoint
	}
	return m, nil
}

// checkUnused fails when the host uses something below the device: a block
// device (or partition) that is mounted or held (device-mapper, md), or a
// network interface that is up. Taking the driver away would pull it from
// under its user. Other uses (an open block device, a GPU) are not seen.
func (b *Binder) checkUnused(m member, mounts map[string]string) error {
	root, err := filepath.EvalSymlinks(b.devicePath(m.addr))
	if err != nil {
		return fmt.Errorf("device %s: %w", m.addr, err)
	}
	return filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return fmt.Errorf("device %s: %w", m.addr, err)
		}
		if !d.IsDir() {
			return nil
		}
		sub, err := os.Readlink(filepath.Join(path, "subsystem"))
		if err != nil {
			return nil
		}
		name := filepath.Base(path)
		switch filepath.Base(sub) {
		case "block":
			dev, err := os.ReadFile(filepath.Join(path, "dev"))
			if err != nil {
				return fmt.Errorf("device %s: block device %s: %w", m.addr, name, err)
			}
			if mp, ok := mounts[strings.TrimSpace(string(dev))]; ok {
				return fmt.Errorf("device %s (%s) is in use by the host: its block device %s is mounted on %s", m.addr, m.driver, name, mp)
			}
			holders, _ := os.ReadDir(filepath.Join(path, "holders"))
			if len(holders) > 0 {
				var names []string
				for _, h := range holders {
					names = append(names, h.Name())
				}
				return fmt.Errorf("device %s (%s) is in use by the host: its block device %s is held by %s", m.addr, m.driver, name, strings.Join(names, ", "))
			}
		case "net":
			flags, err := os.ReadFile(filepath.Join(path, "flags"))
			if err != nil {
				return fmt.Errorf("device %s: network interface %s: %w", m.addr, name, err)
			}
			v, err := strconv.ParseUint(strings.TrimPrefix(strings.TrimSpace(string(flags)), "0x"), 16, 32)
			if err != nil {
				return fmt.Errorf("device %s: network interface %s: flags %q: %w", m.addr, name, flags, err)
			}
			if v&syscall.IFF_UP != 0 {
				return fmt.Errorf("device %s (%s) is in use by the host: its network interface %s is up (set it down, or move it out of the host's use)", m.addr, m.driver, name)
			}
		}
		return nil
	})
}

// Bind moves the device at addr and the rest of its IOMMU group (see the
// package comment) to vfio-pci, and returns once the group's device node
// is there. record, if not nil, is called with the Binding before anything
// is changed: the caller keeps it (the shim in its sandbox record) so that
// Restore can undo a Bind that a crash cut short. A failure undoes what was
// done, and is an error naming the device and step.
func (b *Binder) Bind(ctx context.Context, addr string, record func(Binding) error) (_ Binding, retErr error) {
	bnd, err := b.Plan(ctx, addr)
	if err != nil {
		return Binding{}, err
	}
	if record != nil {
		if err := record(bnd); err != nil {
			return Binding{}, err
		}
	}
	ctx, cancel := withSettleTimeout(ctx)
	defer cancel()
	var done []Device
	defer func() {
		if retErr == nil {
			return
		}
		// The undo runs even when ctx ran out, with a bound of its own.
		undo, cancel := context.WithTimeout(context.WithoutCancel(ctx), settleTimeout)
		defer cancel()
		if err := b.Restore(undo, Binding{Address: bnd.Address, Group: bnd.Group, Devices: done}); err != nil {
			retErr = fmt.Errorf("%w; undoing it: %w", retErr, err)
		}
	}()
	for _, d := range bnd.Devices {
		// Counted before the first write: a half-made change is undone too.
		done = append(done, d)
		if err := b.bindDevice(ctx, d); err != nil {
			return Binding{}, fmt.Errorf("vfio: bind %s (IOMMU group %s) to %s: %w", d.Address, bnd.Group, Driver, err)
		}
	}
	if err := waitFor(ctx, func() bool {
		_, err := os.Stat(b.GroupDevice(bnd.Group))
		return err == nil
	}); err != nil {
		return Binding{}, fmt.Errorf("vfio: device %s: %s did not appear: %w", addr, b.GroupDevice(bnd.Group), err)
	}
	log.G(ctx).WithFields(log.Fields{"device": addr, "group": bnd.Group, "bound": bnd.Devices}).Info("vfio: bound")
	return bnd, nil
}

// bindDevice moves one device from its driver to vfio-pci.
func (b *Binder) bindDevice(ctx context.Context, d Device) error {
	cur, err := b.driver(d.Address)
	if err != nil {
		return err
	}
	if cur != d.Driver {
		return fmt.Errorf("its driver changed to %q since the group was checked (was %q)", cur, d.Driver)
	}
	// driver_override makes vfio-pci the only driver that may take the
	// device, so no host driver grabs it between the unbind and the probe.
	if err := b.write(ctx, b.devicePath(d.Address, "driver_override"), Driver); err != nil {
		return err
	}
	if cur != "" {
		if err := b.write(ctx, b.driverPath(cur, "unbind"), d.Address); err != nil {
			return err
		}
	}
	if err := b.write(ctx, filepath.Join(b.SysRoot, "bus", "pci", "drivers_probe"), d.Address); err != nil {
		return err
	}
	return b.waitDriver(ctx, d.Address, Driver)
}

// waitDriver waits until the device's driver is want.
func (b *Binder) waitDriver(ctx context.Context, addr, want string) error {
	var cur string
	err := waitFor(ctx, func() bool {
		cur, _ = b.driver(addr)
		return cur == want
	})
	if err != nil {
		if cur == "" {
			cur = "none"
		}
		return fmt.Errorf("device %s: driver is %s, not %s: %w", addr, cur, want, err)
	}
	return nil
}

// Restore gives every device of the Binding back to the driver it had:
// unbound from vfio-pci, driver_override cleared, probed, and checked. It
// works from a Binding read back from a record, whatever state a crash left
// the devices in, and again on devices already given back. The VM must
// have let go of the group first: the kernel's unbind from vfio-pci waits
// for its user (bounded here by ctx). A device that is gone from the host
// is skipped. Errors name each device that could not be given back; the
// others are given back all the same.
func (b *Binder) Restore(ctx context.Context, bnd Binding) error {
	if _, err := strconv.Atoi(bnd.Group); err != nil && len(bnd.Devices) > 0 {
		return fmt.Errorf("vfio: give %s back: IOMMU group %q is not a number", bnd.Address, bnd.Group)
	}
	// Fail fast, rather than have the kernel's unbind wait for the VM.
	if err := b.checkGroupFree(bnd.Group); err != nil && len(bnd.Devices) > 0 {
		return fmt.Errorf("vfio: give %s back: %w: stop the VM first", bnd.Address, err)
	}
	ctx, cancel := withSettleTimeout(ctx)
	defer cancel()
	var errs []error
	for _, d := range slices.Backward(bnd.Devices) {
		if err := b.restoreDevice(ctx, d); err != nil {
			errs = append(errs, fmt.Errorf("vfio: give %s back to %s: %w", d.Address, orNone(d.Driver), err))
		}
	}
	if err := errors.Join(errs...); err != nil {
		return err
	}
	if len(bnd.Devices) > 0 {
		log.G(ctx).WithFields(log.Fields{"device": bnd.Address, "group": bnd.Group}).Info("vfio: given back")
	}
	return nil
}

func orNone(driver string) string {
	if driver == "" {
		return "no driver"
	}
	return driver
}

func (b *Binder) restoreDevice(ctx context.Context, d Device) error {
	if CheckAddress(d.Address) != nil {
		return fmt.Errorf("not a PCI address")
	}
	if _, err := os.Lstat(b.devicePath(d.Address)); errors.Is(err, fs.ErrNotExist) {
		log.G(ctx).WithField("device", d.Address).Warn("vfio: device gone from the host, nothing to give back")
		return nil
	}
	cur, err := b.driver(d.Address)
	if err != nil {
		return err
	}
	if cur == Driver {
		if err := b.write(ctx, b.driverPath(Driver, "unbind"), d.Address); err != nil {
			return err
		}
		cur = ""
	}
	override, err := os.ReadFile(b.devicePath(d.Address, "driver_override"))
	if err != nil {
		return err
	}
	if string(bytes.TrimSpace(override)) == Driver {
		// A newline clears it.
		if err := b.write(ctx, b.devicePath(d.Address, "driver_override"), "\n"); err != nil {
			return err
		}
	}
	if cur != "" || d.Driver == "" {
		// On a driver someone else gave it, or to be left unbound.
		return nil
	}
	if err := b.write(ctx, filepath.Join(b.SysRoot, "bus", "pci", "drivers_probe"), d.Address); err != nil {
		return err
	}
	return b.waitDriver(ctx, d.Address, d.Driver)
}

func withSettleTimeout(ctx context.Context) (context.Context, context.CancelFunc) {
	if dl, ok := ctx.Deadline(); ok && time.Until(dl) < settleTimeout {
		return context.WithCancel(ctx)
	}
	return context.WithTimeout(ctx, settleTimeout)
}

// waitFor polls cond until it holds or ctx ends.
func waitFor(ctx context.Context, cond func() bool) error {
	for {
		if cond() {
			return nil
		}
		select {
		case <-ctx.Done():
			return context.Cause(ctx)
		case <-time.After(10 * time.Millisecond):
		}
	}
}
