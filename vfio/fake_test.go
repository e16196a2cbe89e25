package vfio

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

// fakeKernel is a sysfs tree in a test's directory and the part of Linux's
// PCI core that acts on writes to it: driver_override, a driver's bind and
// unbind, and drivers_probe, which binds the override or else the device's
// native driver. vfio-pci makes /dev/vfio/<group> while a member is bound
// to it.
type fakeKernel struct {
	t    *testing.T
	root string // holds sys/, dev/ and mountinfo
	mu   sync.Mutex
	// native is the driver drivers_probe binds a device to without an
	// override ("" none).
	native map[string]string
	group  map[string]string
	// fail, when it returns an error for a write, makes that write fail
	// with it (before any effect).
	fail func(path, value string) error
	// refuse names drivers whose probe takes no device (the write
	// succeeds, the device stays unbound), as a driver that fails to
	// probe does.
	refuse map[string]bool
	writes []string
}

// fakeDevice is a PCI device of the fixture.
type fakeDevice struct {
	addr   string
	class  string // "0x010802" NVMe, "0x060400" bridge, "0x020000" NIC
	driver string // bound now and native
	group  string
}

func newFakeKernel(t *testing.T, devs ...fakeDevice) *fakeKernel {
	t.Helper()
	k := &fakeKernel{t: t, root: t.TempDir(), native: map[string]string{}, group: map[string]string{}, refuse: map[string]bool{}}
	for _, d := range []string{"sys/bus/pci/devices", "sys/class/block", "sys/class/net", "dev/vfio"} {
		k.mkdir(d)
	}
	k.file("sys/bus/pci/drivers_probe", "")
	k.file("mountinfo", "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n")
	for _, drv := range []string{Driver, "nvme", "pcieport", "ixgbe"} {
		k.addDriver(drv)
	}
	for _, d := range devs {
		k.addDevice(d)
	}
	return k
}

func (k *fakeKernel) path(rel string) string { return filepath.Join(k.root, rel) }

func (k *fakeKernel) mkdir(rel string) {
	k.t.Helper()
	if err := os.MkdirAll(k.path(rel), 0o755); err != nil {
		k.t.Fatal(err)
	}
}

func (k *fakeKernel) file(rel, content string) {
	k.t.Helper()
	k.mkdir(filepath.Dir(rel))
	if err := os.WriteFile(k.path(rel), []byte(content), 0o644); err != nil {
		k.t.Fatal(err)
	}
}

func (k *fakeKernel) symlink(target, rel string) {
	k.t.Helper()
	k.mkdir(filepath.Dir(rel))
	if err := os.Symlink(target, k.path(rel)); err != nil {
		k.t.Fatal(err)
	}
}

func (k *fakeKernel) addDriver(name string) {
	d := "sys/bus/pci/drivers/" + name
	k.file(d+"/bind", "")
	k.file(d+"/unbind", "")
}

// addDevice lays a device out as Linux does: its directory under
// sys/devices, a link to it in sys/bus/pci/devices and in its IOMMU
// group (none when group is "").
func (k *fakeKernel) addDevice(d fakeDevice) {
	dir := "sys/devices/pci0000:00/" + d.addr
	k.file(dir+"/class", d.class+"\n")
	k.file(dir+"/driver_override", "(null)\n")
	k.symlink("../../../devices/pci0000:00/"+d.addr, "sys/bus/pci/devices/"+d.addr)
	if d.group != "" {
		k.symlink("../../../../kernel/iommu_groups/"+d.group, dir+"/iommu_group")
		k.symlink("../../../../devices/pci0000:00/"+d.addr, "sys/kernel/iommu_groups/"+d.group+"/devices/"+d.addr)
	}
	k.native[d.addr] = d.driver
	k.group[d.addr] = d.group
	if d.driver != "" {
		k.bind(d.addr, d.driver)
	}
}

// addBlock puts block device name (major:minor dev) below device addr.
func (k *fakeKernel) addBlock(addr, name, dev string, holders ...string) {
	dir := "sys/devices/pci0000:00/" + addr + "/nvme/nvme0/" + name
	k.file(dir+"/dev", dev+"\n")
	k.symlink("../../../../../../class/block", dir+"/subsystem")
	k.mkdir(dir + "/holders")
	for _, h := range holders {
		k.symlink("../../"+h, dir+"/holders/"+h)
	}
}

// addNetdev puts network interface name with flags below device addr.
func (k *fakeKernel) addNetdev(addr, name, flags string) {
	dir := "sys/devices/pci0000:00/" + addr + "/net/" + name
	k.file(dir+"/flags", flags+"\n")
	k.symlink("../../../../../class/net", dir+"/subsystem")
}

func (k *fakeKernel) mount(dev, at string) {
	f, err := os.OpenFile(k.path("mountinfo"), os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		k.t.Fatal(err)
	}
	defer f.Close()
	fmt.Fprintf(f, "99 22 %s / %s rw - ext4 /dev/x rw\n", dev, at)
}

func (k *fakeKernel) binder() *Binder {
	return &Binder{SysRoot: k.path("sys"), DevRoot: k.path("dev"), Mountinfo: k.path("mountinfo"), Attr: k}
}

func (k *fakeKernel) devLink(addr string) string {
	return k.path("sys/devices/pci0000:00/" + addr + "/driver")
}

// driverOf is the device's driver as the fixture has it.
func (k *fakeKernel) driverOf(addr string) string {
	t, err := os.Readlink(k.devLink(addr))
	if err != nil {
		return ""
	}
	return filepath.Base(t)
}

func (k *fakeKernel) override(addr string) string {
	b, err := os.ReadFile(k.path("sys/devices/pci0000:00/" + addr + "/driver_override"))
	if err != nil {
		k.t.Fatal(err)
	}
	return strings.TrimSpace(string(b))
}

func (k *fakeKernel) bind(addr, driver string) {
	k.symlink("../../../bus/pci/drivers/"+driver, "sys/devices/pci0000:00/"+addr+"/driver")
	if driver == Driver {
		k.file("dev/vfio/"+k.group[addr], "")
	}
}

func (k *fakeKernel) unbind(addr string) {
	drv := k.driverOf(addr)
	if err := os.Remove(k.devLink(addr)); err != nil {
		k.t.Fatal(err)
	}
	if drv != Driver {
		return
	}
	g := k.group[addr]
	for a, other := range k.group {
		if other == g && k.driverOf(a) == Driver {
			return
		}
	}
	os.Remove(k.path("dev/vfio/" + g))
}

// WriteAttr acts on a write as Linux does.
func (k *fakeKernel) WriteAttr(_ context.Context, path, value string) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	rel, err := filepath.Rel(k.path("sys"), path)
	if err != nil || strings.HasPrefix(rel, "..") {
		return fmt.Errorf("fake kernel: write outside sysfs: %s", path)
	}
	k.writes = append(k.writes, rel+"="+strings.TrimSpace(value))
	if k.fail != nil {
		if err := k.fail(rel, value); err != nil {
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
		if k.driverOf(addr) != "" {
			return nil
		}
		drv := k.native[addr]
		if o := k.override(addr); o != "(null)" {
			drv = o
		}
		if drv != "" && !k.refuse[drv] {
			k.bind(addr, drv)
		}
	case len(parts) == 5 && parts[2] == "drivers" && parts[4] == "unbind":
		addr := strings.TrimSpace(value)
		if k.driverOf(addr) != parts[3] {
			return fmt.Errorf("fake kernel: unbind %s from %s: %w", addr, parts[3], os.ErrNotExist)
		}
		k.unbind(addr)
	default:
		return fmt.Errorf("fake kernel: write to %s: %w", rel, errors.ErrUnsupported)
	}
	return nil
}
