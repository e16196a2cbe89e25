package vfio

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// These tests read the host's own sysfs and mount table (never writing):
// what the fixture's layout stands for must be what Linux shows.

// pciAncestor is the PCI device in a resolved sysfs path, the one nearest
// to its end.
func pciAncestor(path string) string {
	addr := ""
	for _, e := range strings.Split(path, "/") {
		if addressRE.MatchString(e) {
			addr = e
		}
	}
	return addr
}

// TestHostNoIOMMU: on a host without an IOMMU, Bind of any real device
// fails before it records or writes anything, and says what to enable.
func TestHostNoIOMMU(t *testing.T) {
	if entries, _ := os.ReadDir("/sys/kernel/iommu_groups"); len(entries) > 0 {
		t.Skip("the host has an IOMMU")
	}
	devs, err := os.ReadDir("/sys/bus/pci/devices")
	if err != nil || len(devs) == 0 {
		t.Skipf("no PCI devices: %v", err)
	}
	b := NewBinder()
	b.Attr = attrFunc(func(path, value string) error {
		t.Errorf("wrote %q to %s", value, path)
		return nil
	})
	for _, d := range devs {
		_, err := b.Bind(context.Background(), d.Name(), func(Binding) error {
			t.Errorf("%s: recorded", d.Name())
			return nil
		})
		if err == nil || !strings.Contains(err.Error(), "device "+d.Name()+" has no IOMMU group") || !strings.Contains(err.Error(), "intel_iommu=on") {
			t.Errorf("Bind(%s): %v", d.Name(), err)
		}
	}
}

type attrFunc func(path, value string) error

func (f attrFunc) WriteAttr(_ context.Context, path, value string) error { return f(path, value) }

// TestHostInUse: the PCI device of the host's root filesystem is in use by
// its mount, and that of an interface that is up by the interface.
func TestHostInUse(t *testing.T) {
	b := NewBinder()
	mounts, err := b.mountedDevices()
	if err != nil {
		t.Fatal(err)
	}
	var st unix.Stat_t
	if err := unix.Stat("/", &st); err != nil {
		t.Fatal(err)
	}
	block, err := filepath.EvalSymlinks(filepath.Join("/sys/dev/block", fmt.Sprintf("%d:%d", unix.Major(st.Dev), unix.Minor(st.Dev))))
	if err == nil {
		if addr := pciAncestor(block); addr != "" {
			drv, _ := b.driver(addr)
			err := b.checkUnused(member{addr: addr, driver: drv}, mounts)
			if want := "its block device " + filepath.Base(block) + " is mounted on "; err == nil || !strings.Contains(err.Error(), want) {
				t.Errorf("device %s of the root filesystem: %v, want %q", addr, err, want)
			}
		} else {
			t.Logf("the root filesystem (%s) is on no PCI device", block)
		}
	} else {
		t.Logf("the root filesystem is on no block device: %v", err)
	}

	ifaces, _ := os.ReadDir("/sys/class/net")
	checked := 0
	for _, i := range ifaces {
		path, err := filepath.EvalSymlinks(filepath.Join("/sys/class/net", i.Name()))
		addr := pciAncestor(path)
		flags, _ := os.ReadFile(filepath.Join(path, "flags"))
		if err != nil || addr == "" || !regexp.MustCompile(`^0x[0-9a-f]*[13579bdf]$`).MatchString(strings.TrimSpace(string(flags))) {
			continue // not on PCI, or not up
		}
		drv, _ := b.driver(addr)
		err = b.checkUnused(member{addr: addr, driver: drv}, mounts)
		if want := "its network interface " + i.Name() + " is up"; err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("device %s of %s: %v, want %q", addr, i.Name(), err, want)
		}
		checked++
	}
	t.Logf("%d interfaces that are up on PCI devices", checked)
}
