package main

import (
	"os"
	"path/filepath"
	"strings"
)

// pciAt resolves a PCI path as the host's driver gives it ("03.0/00.0":
// slot.function on each bus from the root bus down) the way a guest
// agent would, through sysfs, and says what is there: "VENDOR:DEVICE" or
// "none". The device needs no driver of the guest's for that.
func pciAt(path string) string {
	dir := "/sys/devices/pci0000:00"
	for _, hop := range strings.Split(path, "/") {
		m, _ := filepath.Glob(dir + "/0000:??:" + hop)
		if len(m) != 1 {
			return "none"
		}
		dir = m[0]
	}
	vendor, _ := os.ReadFile(dir + "/vendor")
	device, _ := os.ReadFile(dir + "/device")
	return strings.TrimPrefix(strings.TrimSpace(string(vendor)), "0x") + ":" + strings.TrimPrefix(strings.TrimSpace(string(device)), "0x")
}
