package agent

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/containerd/errdefs"
)

// Devices the host hot-plugs (disks, NICs, passed-through devices) are
// named by their guest PCI path (agentproto.Storage.source,
// hypervisor.GuestDevice.PCIPath): the slot and function of the device on
// each bus from the root bus down, "03.0/00.0" for the device at slot 0
// function 0 behind the bridge (a PCIe root port) at slot 3 function 0 of
// the root bus. The bus numbers are the guest's to choose as it enumerates
// bridges, so the path leaves them out and the agent follows the sysfs
// tree instead: /sys/devices/pci0000:00/0000:00:03.0/0000:<any bus>:00.0.

const (
	// pciRoot is the guest's one root bus below sysfs's devices (QEMU's
	// q35 has no other PCI domain or root bus).
	pciRoot = "devices/pci0000:00"
	// maxPCIPathHops bounds a PCI path: PCIe allows 256 buses, but a path
	// deeper than a few switches is a mistake.
	maxPCIPathHops = 8
)

// pciHop is one bus's part of a PCI path.
type pciHop struct {
	slot, function uint8
}

func (h pciHop) String() string { return fmt.Sprintf("%02x.%x", h.slot, h.function) }

// parsePCIPath parses a guest PCI path: one "SS.F" per bus, "/" between
// them; SS is the slot in two hex digits (00 to 1f), F the function (0 to
// 7).
func parsePCIPath(path string) ([]pciHop, error) {
	if path == "" {
		return nil, fmt.Errorf("empty PCI path (want slot.function per bus, such as 03.0/00.0): %w", errdefs.ErrInvalidArgument)
	}
	parts := strings.Split(path, "/")
	if len(parts) > maxPCIPathHops {
		return nil, fmt.Errorf("PCI path %q: %d buses deep, at most %d: %w", path, len(parts), maxPCIPathHops, errdefs.ErrInvalidArgument)
	}
	hops := make([]pciHop, 0, len(parts))
	for i, p := range parts {
		slot, fn, ok := strings.Cut(p, ".")
		if !ok || len(slot) != 2 || len(fn) != 1 {
			return nil, fmt.Errorf("PCI path %q: part %d %q: want slot.function, two hex digits and one digit (such as 03.0): %w", path, i+1, p, errdefs.ErrInvalidArgument)
		}
		s, err := strconv.ParseUint(slot, 16, 8)
		if err != nil || s > 0x1f {
			return nil, fmt.Errorf("PCI path %q: part %d %q: slot %q: want 00 to 1f: %w", path, i+1, p, slot, errdefs.ErrInvalidArgument)
		}
		f, err := strconv.ParseUint(fn, 10, 8)
		if err != nil || f > 7 {
			return nil, fmt.Errorf("PCI path %q: part %d %q: function %q: want 0 to 7: %w", path, i+1, p, fn, errdefs.ErrInvalidArgument)
		}
		hops = append(hops, pciHop{slot: uint8(s), function: uint8(f)})
	}
	return hops, nil
}

// findPCIDevice returns the sysfs directory of the device at the PCI path
// below sysRoot, or "" and what was there instead while the device is not
// (yet) there: hot-plugged devices appear a moment after the host's plug.
func findPCIDevice(sysRoot string, hops []pciHop) (dir, seen string, err error) {
	dir = filepath.Join(sysRoot, pciRoot)
	if _, err := os.Stat(dir); err != nil {
		return "", "", fmt.Errorf("PCI root bus: %w", err)
	}
	for i, hop := range hops {
		entries, err := os.ReadDir(dir)
		if err != nil {
			return "", "", fmt.Errorf("PCI bus below %s: %w", dir, err)
		}
		var match, others []string
		for _, e := range entries {
			// Devices are directories "DDDD:BB:SS.F" (domain, bus, slot,
			// function); links (subsystem, driver, ...) and attribute
			// files are skipped.
			addr, ok := parsePCIAddress(e.Name())
			if !ok || !e.IsDir() {
				continue
			}
			if i == 0 && addr.bus != 0 {
				continue
			}
			if addr.hop == hop {
				match = append(match, e.Name())
			} else {
				others = append(others, e.Name())
			}
		}
		switch len(match) {
		case 0:
			where := "on the root bus"
			if i > 0 {
				where = "behind " + filepath.Base(dir)
			}
			if len(others) == 0 {
				return "", fmt.Sprintf("no device %s %s, none at all", hop, where), nil
			}
			return "", fmt.Sprintf("no device %s %s, only %s", hop, where, strings.Join(others, " ")), nil
		case 1:
			dir = filepath.Join(dir, match[0])
		default:
			// A bridge has one secondary bus.
			return "", "", fmt.Errorf("PCI path %s: devices %s all match %s", formatPCIPath(hops), strings.Join(match, " "), hop)
		}
	}
	return dir, "", nil
}

func formatPCIPath(hops []pciHop) string {
	parts := make([]string, len(hops))
	for i, h := range hops {
		parts[i] = h.String()
	}
	return strings.Join(parts, "/")
}

// pciAddress is a sysfs PCI device name's bus and slot.function.
type pciAddress struct {
	bus uint8
	hop pciHop
}

// parsePCIAddress parses the name sysfs gives a PCI device, DDDD:BB:SS.F
// with domain 0000.
func parsePCIAddress(name string) (pciAddress, bool) {
	if len(name) != len("0000:00:00.0") || !strings.HasPrefix(name, "0000:") || name[7] != ':' || name[10] != '.' {
		return pciAddress{}, false
	}
	bus, err1 := strconv.ParseUint(name[5:7], 16, 8)
	slot, err2 := strconv.ParseUint(name[8:10], 16, 8)
	fn, err3 := strconv.ParseUint(name[11:], 10, 8)
	if err1 != nil || err2 != nil || err3 != nil || slot > 0x1f || fn > 7 {
		return pciAddress{}, false
	}
	return pciAddress{bus: uint8(bus), hop: pciHop{slot: uint8(slot), function: uint8(fn)}}, true
}

// waitPCIDevice waits (bounded by ctx) for the device at the PCI path and
// returns its sysfs directory.
func waitPCIDevice(ctx context.Context, sysRoot string, hops []pciHop) (string, error) {
	var dir string
	err := waitFor(ctx, "PCI device "+formatPCIPath(hops), func() (bool, string, error) {
		var (
			seen string
			err  error
		)
		dir, seen, err = findPCIDevice(sysRoot, hops)
		return dir != "", seen, err
	})
	return dir, err
}

// waitFor calls look until it finds what it looks for (true), fails, or
// ctx ends; the error of an ended ctx says what was waited for and what
// look saw last.
func waitFor(ctx context.Context, what string, look func() (found bool, seen string, err error)) error {
	var seen string
	err := poll(ctx, func() (bool, error) {
		var (
			ok  bool
			err error
		)
		ok, seen, err = look()
		return ok, err
	})
	if err != nil && ctx.Err() != nil && errors.Is(err, ctx.Err()) {
		if seen == "" {
			seen = "nothing"
		}
		return fmt.Errorf("waited for %s; last saw %s: %w", what, seen, err)
	}
	return err
}

// loadDeviceDriver makes sure a driver is bound to the device whose sysfs
// directory is sysfsDevDir (a PCI device, or a virtio or SCSI device on
// one): the guest has no udev, so the driver of a hot-plugged device that
// is a module not loaded yet is loaded here, by the device's modalias,
// with the agent's module loader (modprobe.go, the initrd's modules).
// It waits (bounded by ctx) for the driver to bind.
func loadDeviceDriver(ctx context.Context, sysfsDevDir string) error {
	p := modprober{dir: moduleDir(), sysModules: "/sys/module", load: loadModuleFile}
	return p.loadDeviceDriver(ctx, sysfsDevDir)
}

func (p *modprober) loadDeviceDriver(ctx context.Context, dev string) error {
	if _, ok := boundDriver(dev); ok {
		return nil
	}
	// A hot-plugged device's directory shows up in sysfs a moment
	// before its attributes: wait for the modalias, or for a driver that
	// was built in or loaded already to bind.
	var b []byte
	err := waitFor(ctx, "the modalias of device "+dev, func() (bool, string, error) {
		if _, ok := boundDriver(dev); ok {
			return true, "", nil
		}
		var err error
		b, err = os.ReadFile(filepath.Join(dev, "modalias"))
		if errors.Is(err, fs.ErrNotExist) || err == nil && len(bytes.TrimSpace(b)) == 0 {
			// An empty one is being written (a file that is not
			// sysfs's own, as in a test, is created before it is
			// written).
			b = nil
			return false, "no driver and no modalias", nil
		}
		return err == nil, "", err
	})
	if err != nil {
		return fmt.Errorf("device %s has no driver and no modalias to find one by: %w", dev, err)
	}
	if b == nil {
		return nil // a driver bound meanwhile
	}
	alias := strings.TrimSpace(string(b))
	if err := p.modprobe(alias); err != nil {
		return fmt.Errorf("load the driver of device %s (modalias %s): %w", dev, alias, err)
	}
	// A driver binds to the devices there as it registers, some (with
	// asynchronous probing) a moment later.
	return waitFor(ctx, "a driver of device "+dev+" (modalias "+alias+")", func() (bool, string, error) {
		_, ok := boundDriver(dev)
		return ok, "its module loaded and no driver bound (did the probe fail? see the guest's kernel log)", nil
	})
}

// boundDriver returns the name of the driver bound to the device at dev.
func boundDriver(dev string) (string, bool) {
	target, err := os.Readlink(filepath.Join(dev, "driver"))
	if err != nil {
		return "", false
	}
	return filepath.Base(target), true
}

// driverState says which driver is bound to the device at dev, for
// errors.
func driverState(dev string) string {
	if driver, ok := boundDriver(dev); ok {
		return "bound to " + driver
	}
	return "with no driver bound"
}
