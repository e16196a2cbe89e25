// Package vfiotest is a fake Linux PCI core over a sysfs tree in a test's
// directory, for unit tests of package vfio and of its users: writes to the
// tree (through Kernel.WriteAttr, a vfio.AttrWriter) bind and unbind
// drivers as Linux does. No real device is involved, so a test against it
// is never the only test of a path that real hardware runs.
package vfiotest

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
)

// vfioDriver is the kernel's VFIO PCI driver.
const vfioDriver = "vfio-pci"

// Kernel is a sysfs tree in a test's directory and the part of Linux's
// PCI core that acts on writes to it: driver_override, a driver's bind and
// unbind, and drivers_probe, which binds the override or else the device's
// native driver. vfio-pci makes /dev/vfio/<group> while a member is bound
// to it.
type Kernel struct {
	// Fail, when it returns an error for a write (path relative to
	// Sys), makes that write fail with it, before any effect. It runs
	// with the Kernel locked: it must not call its methods.
	Fail func(path, value string) error
	// Refuse names drivers whose probe takes no device (the write
	// succeeds, the device stays unbound), as a driver that fails to
	// probe does.
	Refuse map[string]bool

	t    testing.TB
	root string // holds sys/, dev/ and mountinfo
	mu   sync.Mutex
	// native is the driver drivers_probe binds a device to without an
	// override ("" none).
	native map[string]string
	group  map[string]string
	writes []string
}

// Device is a PCI device of the fixture.
type Device struct {
	Addr   string
	Class  string // "0x010802" NVMe, "0x060400" bridge, "0x020000" NIC
	Driver string // bound now, and what drivers_probe binds it to
	Group  string // "": no IOMMU
}

// New makes the tree with the drivers vfio-pci, nvme, pcieport and ixgbe,
// and devs bound to theirs.
func New(t testing.TB, devs ...Device) *Kernel {
	t.Helper()
	k := &Kernel{t: t, root: t.TempDir(), native: map[string]string{}, group: map[string]string{}, Refuse: map[string]bool{}}
	for _, d := range []string{"sys/bus/pci/devices", "sys/class/block", "sys/class/net", "dev/vfio"} {
		k.mkdir(d)
	}
	k.file("sys/bus/pci/drivers_probe", "")
	k.file("mountinfo", "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n")
	for _, drv := range []string{vfioDriver, "nvme", "pcieport", "ixgbe"} {
		k.AddDriver(drv)
	}
	for _, d := range devs {
		k.AddDevice(d)
	}
	return k
}

// Path is rel in the fixture: "sys/...", "dev/..." or "mountinfo".
func (k *Kernel) Path(rel string) string { return filepath.Join(k.root, rel) }

// Sys, Dev and Mountinfo are the Binder's roots.
func (k *Kernel) Sys() string       { return k.Path("sys") }
func (k *Kernel) Dev() string       { return k.Path("dev") }
func (k *Kernel) Mountinfo() string { return k.Path("mountinfo") }

// Group is the IOMMU group of the device at addr.
func (k *Kernel) Group(addr string) string { return k.group[addr] }

// GroupExists tells whether /dev/vfio/<g> is there.
func (k *Kernel) GroupExists(g string) bool {
	_, err := os.Stat(k.Path("dev/vfio/" + g))
	return err == nil
}

// Writes are the writes made so far, "path=value" (path relative to Sys).
func (k *Kernel) Writes() []string {
	k.mu.Lock()
	defer k.mu.Unlock()
	return append([]string(nil), k.writes...)
}

func (k *Kernel) mkdir(rel string) {
	k.t.Helper()
	if err := os.MkdirAll(k.Path(rel), 0o755); err != nil {
		k.t.Fatal(err)
	}
}

func (k *Kernel) file(rel, content string) {
	k.t.Helper()
	k.mkdir(filepath.Dir(rel))
	if err := os.WriteFile(k.Path(rel), []byte(content), 0o644); err != nil {
		k.t.Fatal(err)
	}
}

func (k *Kernel) symlink(target, rel string) {
	k.t.Helper()
	k.mkdir(filepath.Dir(rel))
	if err := os.Symlink(target, k.Path(rel)); err != nil {
		k.t.Fatal(err)
	}
}

// AddDriver makes driver name.
func (k *Kernel) AddDriver(name string) {
	d := "sys/bus/pci/drivers/" + name
	k.file(d+"/bind", "")
	k.file(d+"/unbind", "")
}

// AddDevice lays a device out as Linux does: its directory under
// sys/devices, a link to it in sys/bus/pci/devices and in its IOMMU
// group (none when group is "").
func (k *Kernel) AddDevice(d Device) {
	dir := "sys/devices/pci0000:00/" + d.Addr
	k.file(dir+"/class", d.Class+"\n")
	k.file(dir+"/driver_override", "(null)\n")
	k.symlink("../../../devices/pci0000:00/"+d.Addr, "sys/bus/pci/devices/"+d.Addr)
	if d.Group != "" {
		k.symlink("../../../../kernel/iommu_groups/"+d.Group, dir+"/iommu_group")
		k.symlink("../../../../devices/pci0000:00/"+d.Addr, "sys/kernel/iommu_groups/"+d.Group+"/devices/"+d.Addr)
	}
	k.native[d.Addr] = d.Driver
	k.group[d.Addr] = d.Group
	if d.Driver != "" {
		k.bind(d.Addr, d.Driver)
	}
}

// AddBlock puts block device name (major:minor dev) below device addr.
func (k *Kernel) AddBlock(addr, name, dev string, holders ...string) {
	dir := "sys/devices/pci0000:00/" + addr + "/nvme/nvme0/" + name
	k.file(dir+"/dev", dev+"\n")
	k.symlink("../../../../../../class/block", dir+"/subsystem")
	k.mkdir(dir + "/holders")
	for _, h := range holders {
		k.symlink("../../"+h, dir+"/holders/"+h)
	}
}

// AddNetdev puts network interface name with flags below device addr.
func (k *Kernel) AddNetdev(addr, name, flags string) {
	dir := "sys/devices/pci0000:00/" + addr + "/net/" + name
	k.file(dir+"/flags", flags+"\n")
	k.symlink("../../../../../class/net", dir+"/subsystem")
}

// Mount adds a mount of device dev (major:minor) at at.
func (k *Kernel) Mount(dev, at string) {
	f, err := os.OpenFile(k.Path("mountinfo"), os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		k.t.Fatal(err)
	}
	defer f.Close()
	fmt.Fprintf(f, "99 22 %s / %s rw - ext4 /dev/x rw\n", dev, at)
}

func (k *Kernel) devLink(addr string) string {
	return k.Path("sys/devices/pci0000:00/" + addr + "/driver")
}

// DriverOf is the device's driver as the fixture has it.
func (k *Kernel) DriverOf(addr string) string {
	t, err := os.Readlink(k.devLink(addr))
	if err != nil {
		return ""
	}
	return filepath.Base(t)
}

// Override is the device's driver_override ("(null)" when clear).
func (k *Kernel) Override(addr string) string {
	b, err := os.ReadFile(k.Path("sys/devices/pci0000:00/" + addr + "/driver_override"))
	if err != nil {
		k.t.Fatal(err)
	}
	return strings.TrimSpace(string(b))
}

func (k *Kernel) bind(addr, driver string) {
	k.symlink("../../../bus/pci/drivers/"+driver, "sys/devices/pci0000:00/"+addr+"/driver")
	if driver == vfioDriver {
		k.file("dev/vfio/"+k.group[addr], "")
	}
}

func (k *Kernel) unbind(addr string) {
	drv := k.DriverOf(addr)
	if err := os.Remove(k.devLink(addr)); err != nil {
		k.t.Fatal(err)
	}
	if drv != vfioDriver {
		return
	}
	g := k.group[addr]
	for a, other := range k.group {
		if other == g && k.DriverOf(a) == vfioDriver {
			return
		}
	}
	os.Remove(k.Path("dev/vfio/" + g))
}

// WriteAttr acts on a write as Linux does.
func (k *Kernel) WriteAttr(_ context.Context, path, value string) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	rel, err := filepath.Rel(k.Path("sys"), path)
	if err != nil || strings.HasPrefix(rel, "..") {
		return fmt.Errorf("fake kernel: write outside sysfs: %s", path)
	}
	k.writes = append(k.writes, rel+"="+strings.TrimSpace(value))
	if k.Fail != nil {
		if err := k.Fail(rel, value); err != nil {
			return err
		}
	}
	parts := strings.Split(rel, "/")
	switch {
	case len(parts) == 5 && parts[0] == "bus" && parts[2] == "devices" && parts[4] == "driver_override":
		v := strings.TrimSpace(value)
		if v == "" {
			v = "(null)"
		}
		k.file("sys/devices/pci0000:00/"+parts[3]+"/driver_override", v+"\n")
	case rel == "bus/pci/drivers_probe":
		addr := strings.TrimSpace(value)
		if _, ok := k.native[addr]; !ok {
			return fmt.Errorf("fake kernel: drivers_probe %s: %w", addr, os.ErrNotExist)
		}
		if k.DriverOf(addr) != "" {
			return nil
		}
		drv := k.native[addr]
		if o := k.Override(addr); o != "(null)" {
			drv = o
		}
		if drv != "" && !k.Refuse[drv] {
			k.bind(addr, drv)
		}
	case len(parts) == 5 && parts[2] == "drivers" && parts[4] == "unbind":
		addr := strings.TrimSpace(value)
		if k.DriverOf(addr) != parts[3] {
			return fmt.Errorf("fake kernel: unbind %s from %s: %w", addr, parts[3], os.ErrNotExist)
		}
		k.unbind(addr)
	default:
		return fmt.Errorf("fake kernel: write to %s: %w", rel, errors.ErrUnsupported)
	}
	return nil
}
