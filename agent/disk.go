package agent

import (
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
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"golang.org/x/sys/unix"

	"github.com/colo-runtime/colo/agentproto"
)

const (
	// diskWait bounds the wait for a disk's block device when the
	// host's deadline is later or missing: under TCG a hot-plugged PCI
	// device takes a second or more to be enumerated, and its driver's
	// module to load.
	diskWait = time.Minute
	// scsiRescan is how often a virtio-scsi controller is asked to scan
	// for a LUN that has not shown up on its own (the controller reports
	// hot-plugged LUNs itself, when its event queue works).
	scsiRescan = time.Second
	// Limits of virtio-scsi addresses (QEMU's virtio-scsi-pci: target
	// 0-255, LUN 0-16383).
	maxSCSITarget = 255
	maxSCSILUN    = 16383
)

// diskFinder finds the block device of a disk the host attached, by the
// guest PCI path of its device.
type diskFinder struct {
	sysRoot string // sysfs (a fixture in tests)
	devRoot string // devtmpfs
	// loadDriver makes sure a driver is bound to a device
	// (loadDeviceDriver; a fake in tests).
	loadDriver func(ctx context.Context, sysfsDevDir string) error
}

// disk is a parsed disk Storage.
type disk struct {
	driver      string
	pciPath     []pciHop
	target, lun uint64 // virtio-scsi only
}

func (d disk) String() string {
	if d.driver == agentproto.StorageVirtioSCSI {
		return fmt.Sprintf("%s disk %d:%d on the controller at PCI path %s", d.driver, d.target, d.lun, formatPCIPath(d.pciPath))
	}
	return fmt.Sprintf("%s disk at PCI path %s", d.driver, formatPCIPath(d.pciPath))
}

// parseDisk checks a disk storage's source and SCSI address.
func parseDisk(st *agentproto.Storage) (disk, error) {
	d := disk{driver: st.GetDriver()}
	var err error
	if d.pciPath, err = parsePCIPath(st.GetSource()); err != nil {
		return disk{}, fmt.Errorf("%s storage: %w", d.driver, err)
	}
	addr := st.GetScsiAddress()
	if d.driver != agentproto.StorageVirtioSCSI {
		if addr != "" {
			return disk{}, fmt.Errorf("%s storage at %s: a SCSI address (%q) is for virtio-scsi only: %w", d.driver, st.GetSource(), addr, errdefs.ErrInvalidArgument)
		}
		return d, nil
	}
	t, l, ok := strings.Cut(addr, ":")
	target, err1 := parseDecimal(t, maxSCSITarget)
	lun, err2 := parseDecimal(l, maxSCSILUN)
	if !ok || err1 != nil || err2 != nil {
		return disk{}, fmt.Errorf("virtio-scsi storage at %s: SCSI address %q: want <target>:<lun>, target 0-%d, LUN 0-%d: %w",
			st.GetSource(), addr, maxSCSITarget, maxSCSILUN, errdefs.ErrInvalidArgument)
	}
	d.target, d.lun = target, lun
	return d, nil
}

// parseDecimal parses a decimal number from 0 to max, digits only.
func parseDecimal(s string, max uint64) (uint64, error) {
	if s == "" || strings.TrimLeft(s, "0123456789") != "" {
		return 0, fmt.Errorf("%q: not a decimal number", s)
	}
	n, err := strconv.ParseUint(s, 10, 64)
	if err != nil || n > max {
		return 0, fmt.Errorf("%q: want 0 to %d", s, max)
	}
	return n, nil
}

// find waits (bounded by ctx and diskWait) for the disk's block device,
// loading the drivers it needs on the way, and returns its device node.
func (f diskFinder) find(ctx context.Context, d disk) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, diskWait)
	defer cancel()
	start := time.Now()
	dev, err := waitPCIDevice(ctx, f.sysRoot, d.pciPath)
	if err != nil {
		return "", fmt.Errorf("%s: %w", d, err)
	}
	if err := f.loadDriver(ctx, dev); err != nil {
		return "", fmt.Errorf("%s: %w", d, err)
	}
	var block string // the disk's directory in sysfs's block class
	switch d.driver {
	case agentproto.StorageVirtioBlk:
		vdev, err := f.virtioDevice(ctx, dev)
		if err != nil {
			return "", fmt.Errorf("%s: %w", d, err)
		}
		block, err = waitBlockDevice(ctx, filepath.Join(vdev, "block"))
		if err != nil {
			return "", fmt.Errorf("%s: %w", d, err)
		}
	case agentproto.StorageNVMe:
		block, err = f.nvmeNamespace(ctx, dev)
		if err != nil {
			return "", fmt.Errorf("%s: %w", d, err)
		}
	case agentproto.StorageVirtioSCSI:
		vdev, err := f.virtioDevice(ctx, dev)
		if err != nil {
			return "", fmt.Errorf("%s: %w", d, err)
		}
		sdev, err := f.scsiDevice(ctx, vdev, d.target, d.lun)
		if err != nil {
			return "", fmt.Errorf("%s: %w", d, err)
		}
		if err := f.loadDriver(ctx, sdev); err != nil {
			return "", fmt.Errorf("%s: %w", d, err)
		}
		block, err = waitBlockDevice(ctx, filepath.Join(sdev, "block"))
		if err != nil {
			return "", fmt.Errorf("%s: %w", d, err)
		}
	default:
		return "", fmt.Errorf("storage driver %q: not a disk: %w", d.driver, errdefs.ErrInvalidArgument)
	}
	node, err := waitDeviceNode(ctx, f.devRoot, block)
	if err != nil {
		return "", fmt.Errorf("%s: %w", d, err)
	}
	log.G(ctx).WithFields(log.Fields{"disk": d.String(), "device": node, "took": time.Since(start)}).Debug("disk found")
	return node, nil
}

// virtioDevice waits for the virtio device on the virtio PCI device dev
// (virtio_pci makes it as it binds) and for its driver.
func (f diskFinder) virtioDevice(ctx context.Context, dev string) (string, error) {
	var vdev string
	err := waitFor(ctx, "a virtio device on "+dev, func() (bool, string, error) {
		names, err := subdirs(dev, "virtio")
		if err != nil || len(names) == 0 {
			return false, "none (PCI device " + driverState(dev) + ")", err
		}
		if len(names) > 1 {
			return false, "", fmt.Errorf("PCI device %s has several virtio devices: %s", dev, strings.Join(names, " "))
		}
		vdev = filepath.Join(dev, names[0])
		return true, "", nil
	})
	if err != nil {
		return "", err
	}
	if err := f.loadDriver(ctx, vdev); err != nil {
		return "", err
	}
	return vdev, nil
}

// nvmeNameRe matches an NVMe namespace's disk: nvme<subsystem>n<namespace>,
// or nvme<subsystem>c<controller>n<namespace> for a path of a namespace
// shared between controllers (multipath), a hidden disk whose namespace
// is the disk nvme<subsystem>n<namespace> of the subsystem.
var nvmeNameRe = regexp.MustCompile(`^nvme([0-9]+)(c[0-9]+)?n([0-9]+)$`)

// nvmeNamespace waits for the namespace of the NVMe controller at the
// PCI device dev, its one namespace: a disk has no namespace id to choose
// by.
func (f diskFinder) nvmeNamespace(ctx context.Context, dev string) (string, error) {
	var block string
	err := waitFor(ctx, "an NVMe namespace of "+dev, func() (bool, string, error) {
		ctrls, err := subdirs(filepath.Join(dev, "nvme"), "nvme")
		if err != nil || len(ctrls) == 0 {
			return false, "no NVMe controller (PCI device " + driverState(dev) + ")", err
		}
		if len(ctrls) > 1 {
			return false, "", fmt.Errorf("PCI device %s has several NVMe controllers: %s", dev, strings.Join(ctrls, " "))
		}
		ctrl := filepath.Join(dev, "nvme", ctrls[0])
		entries, err := os.ReadDir(ctrl)
		if err != nil {
			return false, "", err
		}
		var disks []string
		for _, e := range entries {
			m := nvmeNameRe.FindStringSubmatch(e.Name())
			if m == nil || !e.IsDir() {
				continue
			}
			name := filepath.Join(ctrl, e.Name())
			if m[2] != "" {
				name = filepath.Join(f.sysRoot, "class/block", "nvme"+m[1]+"n"+m[3])
			}
			disks = append(disks, name)
		}
		switch len(disks) {
		case 0:
			return false, "controller " + ctrls[0] + " with no namespace", nil
		case 1:
			if _, err := os.Stat(filepath.Join(disks[0], "dev")); err != nil {
				return false, "namespace " + filepath.Base(disks[0]) + " not ready", nil
			}
			block = disks[0]
			return true, "", nil
		default:
			return false, "", fmt.Errorf("NVMe controller %s has several namespaces (%s): a disk is to have one", ctrls[0], baseNames(disks))
		}
	})
	return block, err
}

// scsiDevice waits for the SCSI device target:lun on the virtio-scsi
// controller's host (channel 0: virtio-scsi has no other), asking the host
// to scan for it while it is not there.
func (f diskFinder) scsiDevice(ctx context.Context, vdev string, target, lun uint64) (string, error) {
	var (
		sdev     string
		lastScan time.Time
		scanErr  error
	)
	err := waitFor(ctx, fmt.Sprintf("SCSI device %d:%d on %s", target, lun, vdev), func() (bool, string, error) {
		hosts, err := subdirs(vdev, "host")
		if err != nil || len(hosts) == 0 {
			return false, "no SCSI host (virtio device " + driverState(vdev) + ")", err
		}
		if len(hosts) > 1 {
			return false, "", fmt.Errorf("virtio device %s has several SCSI hosts: %s", vdev, strings.Join(hosts, " "))
		}
		host := strings.TrimPrefix(hosts[0], "host")
		if _, err := strconv.ParseUint(host, 10, 32); err != nil {
			return false, "", fmt.Errorf("SCSI host %q: bad name", hosts[0])
		}
		hostDir := filepath.Join(vdev, hosts[0])
		// hostH/targetH:C:T/H:C:T:L
		id := fmt.Sprintf("%s:0:%d", host, target)
		dir := filepath.Join(hostDir, "target"+id, fmt.Sprintf("%s:%d", id, lun))
		if _, err := os.Stat(dir); err == nil {
			sdev = dir
			return true, "", nil
		}
		if time.Since(lastScan) >= scsiRescan {
			lastScan = time.Now()
			// The scan attribute: "<channel> <target> <lun>".
			scan := filepath.Join(hostDir, "scsi_host", hosts[0], "scan")
			scanErr = os.WriteFile(scan, []byte(fmt.Sprintf("0 %d %d", target, lun)), 0)
		}
		seen := fmt.Sprintf("SCSI host %s without it (devices: %s)", hosts[0], scsiDevices(hostDir))
		if scanErr != nil {
			seen += fmt.Sprintf("; its scan failed: %v", scanErr)
		}
		return false, seen, nil
	})
	return sdev, err
}

// scsiDevices lists the SCSI devices on the host at hostDir, for errors.
func scsiDevices(hostDir string) string {
	targets, _ := subdirs(hostDir, "target")
	var devs []string
	for _, t := range targets {
		entries, _ := os.ReadDir(filepath.Join(hostDir, t))
		for _, e := range entries {
			if e.IsDir() && strings.Count(e.Name(), ":") == 3 {
				devs = append(devs, e.Name())
			}
		}
	}
	if len(devs) == 0 {
		return "none"
	}
	return strings.Join(devs, " ")
}

// waitBlockDevice waits for the one disk in dir, the block directory of a
// virtio-blk or SCSI device, and returns its directory.
func waitBlockDevice(ctx context.Context, dir string) (string, error) {
	var block string
	dev := filepath.Dir(dir)
	err := waitFor(ctx, "the block device of "+dev, func() (bool, string, error) {
		entries, err := os.ReadDir(dir)
		if err != nil && !errors.Is(err, fs.ErrNotExist) {
			return false, "", err
		}
		switch len(entries) {
		case 0:
			return false, "no block device (device " + driverState(dev) + ")", nil
		case 1:
			d := filepath.Join(dir, entries[0].Name())
			if _, err := os.Stat(filepath.Join(d, "dev")); err != nil {
				return false, "block device " + entries[0].Name() + " not ready", nil
			}
			block = d
			return true, "", nil
		default:
			var names []string
			for _, e := range entries {
				names = append(names, e.Name())
			}
			return false, "", fmt.Errorf("device %s has several block devices: %s", dev, strings.Join(names, " "))
		}
	})
	return block, err
}

// waitDeviceNode waits for devtmpfs's node of the block device whose sysfs
// directory is block (its name, with the device number in block/dev) and
// returns its path.
func waitDeviceNode(ctx context.Context, devRoot, block string) (string, error) {
	name := filepath.Base(block)
	b, err := os.ReadFile(filepath.Join(block, "dev"))
	if err != nil {
		return "", fmt.Errorf("block device %s: %w", name, err)
	}
	maj, min, ok := strings.Cut(strings.TrimSpace(string(b)), ":")
	major, err1 := strconv.ParseUint(maj, 10, 32)
	minor, err2 := strconv.ParseUint(min, 10, 32)
	if !ok || err1 != nil || err2 != nil {
		return "", fmt.Errorf("block device %s: bad device number %q", name, b)
	}
	want := unix.Mkdev(uint32(major), uint32(minor))
	node := filepath.Join(devRoot, name)
	err = waitFor(ctx, fmt.Sprintf("device node %s (block %d:%d)", node, major, minor), func() (bool, string, error) {
		var st unix.Stat_t
		if err := unix.Lstat(node, &st); err != nil {
			return false, err.Error(), nil
		}
		if st.Mode&unix.S_IFMT != unix.S_IFBLK || st.Rdev != want {
			return false, fmt.Sprintf("%s of mode %#o, device %d:%d", node, st.Mode, unix.Major(st.Rdev), unix.Minor(st.Rdev)), nil
		}
		return true, "", nil
	})
	return node, err
}

// subdirs lists the directories in dir whose names start with prefix, in
// order; a missing dir has none.
func subdirs(dir, prefix string) ([]string, error) {
	entries, err := os.ReadDir(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var names []string
	for _, e := range entries {
		if e.IsDir() && strings.HasPrefix(e.Name(), prefix) {
			names = append(names, e.Name())
		}
	}
	slices.Sort(names)
	return names, nil
}

func baseNames(paths []string) string {
	names := make([]string, len(paths))
	for i, p := range paths {
		names[i] = filepath.Base(p)
	}
	return strings.Join(names, " ")
}
