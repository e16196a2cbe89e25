package qemu

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"golang.org/x/sys/unix"

	"github.com/colo-runtime/colo/hypervisor"
)

// Disks (q35 only: microvm has no hot-plug ports). QEMU never opens a disk
// by name: the driver hands it the open file (QMP add-fd, into an fdset of
// its own) and the block node's filename is that fdset, /dev/fdset/N, which
// QEMU dups from. Each disk is a raw format node over a file (image) or
// host_device (block device) protocol node, and a device:
//
//	virtio-blk   virtio-blk-pci on a free hot-plug port
//	nvme         an emulated NVMe controller (nvme) on a free hot-plug
//	             port, with the disk as its namespace 1
//	virtio-scsi  scsi-hd, target N LUN 0, on the VM's one virtio-scsi-pci
//	             controller, made on a free hot-plug port for the first
//	             SCSI disk and kept for the VM's life (a later SCSI disk
//	             needs no port, and removing a disk waits for no guest)
//
// The device id is the disk's id + "-dev" (as a NIC's, nicDeviceID); the
// node names count up per VM, as a long id would not fit QEMU's 31 bytes.
//
// QEMU 7.2's nvme keeps its drive when its realize fails (the image
// locked by another writer, say): the undo of such an AddDisk cannot
// delete the block nodes (blockdev-del: in use), and logs that; virtio-blk
// and scsi-hd let go of theirs.
const (
	// scsiControllerID is the VM's virtio-scsi controller.
	scsiControllerID = "scsi0"
	// maxSCSITarget is virtio-scsi's highest target (QEMU's
	// VIRTIO_SCSI_MAX_TARGET).
	maxSCSITarget = 255
	// serialBytes is what virtio-blk and NVMe keep of a serial number.
	serialBytes = 20
	// deviceUnplugTimeout bounds waiting for the guest to let go of a
	// device when the caller's context allows longer.
	deviceUnplugTimeout = time.Minute
	// maxPCIDepth bounds the bridges pciPath climbs.
	maxPCIDepth = 8
	// peripheral is where QOM keeps the devices added with an id.
	peripheral = "/machine/peripheral/"
)

// diskState is a disk AddDisk added, and how far its making (or unmaking) got:
// what exists in QEMU is undone in reverse order.
type diskState struct {
	id     string
	bus    hypervisor.DiskBus
	dev    string // QEMU device id
	node   string // the raw format node; its protocol node is node + "-file"
	fdset  int64
	target int // SCSI target, virtio-scsi only

	fd, blockdev, device bool
}

// diskSet is a VM's disks, under VM.hotplugMu.
type diskSet struct {
	m map[string]*diskState
	// seq numbers the block nodes.
	seq int
	// scsi: the virtio-scsi controller is there.
	scsi bool
}

// deviceWaits are the waits for QEMU's DEVICE_DELETED, by device id.
type deviceWaits struct {
	mu sync.Mutex
	m  map[string]chan struct{}
}

// watch returns a channel closed when the device id is deleted, and its
// release. Called before device_del, so the event cannot come first.
func (w *deviceWaits) watch(id string) (<-chan struct{}, func()) {
	ch := make(chan struct{})
	w.mu.Lock()
	if w.m == nil {
		w.m = make(map[string]chan struct{})
	}
	w.m[id] = ch
	w.mu.Unlock()
	return ch, func() {
		w.mu.Lock()
		if w.m[id] == ch {
			delete(w.m, id)
		}
		w.mu.Unlock()
	}
}

// deleted handles a DEVICE_DELETED event.
func (w *deviceWaits) deleted(data json.RawMessage) {
	var d struct {
		Device string `json:"device"`
	}
	if json.Unmarshal(data, &d) != nil || d.Device == "" {
		return // a device without id, such as a virtio proxy's backend
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	if ch, ok := w.m[d.Device]; ok {
		close(ch)
		delete(w.m, d.Device)
	}
}

// diskDeviceID is the QEMU device id of disk id.
func diskDeviceID(id string) string { return id + "-dev" }

// wellFormed tells whether QEMU takes s as an id: a letter, then letters,
// digits, '-', '.' and '_' (QEMU's id_wellformed).
func wellFormed(s string) bool {
	for i, c := range s {
		letter := c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z'
		if !letter && (i == 0 || !(c >= '0' && c <= '9' || c == '-' || c == '.' || c == '_')) {
			return false
		}
	}
	return s != ""
}

// checkDisk checks what QEMU would reject later, or misread, and returns
// the protocol driver for the file: file for an image, host_device for a
// block device.
func checkDisk(d hypervisor.Disk) (string, error) {
	if !wellFormed(d.ID) {
		return "", fmt.Errorf("disk %q: want an id of a letter, then letters, digits, '-', '.' or '_': %w", d.ID, errdefs.ErrInvalidArgument)
	}
	switch d.Bus {
	case hypervisor.DiskVirtioBlk, hypervisor.DiskVirtioSCSI, hypervisor.DiskNVMe:
	default:
		return "", fmt.Errorf("disk %s: bus %q: want %q, %q or %q: %w", d.ID, d.Bus, hypervisor.DiskVirtioBlk, hypervisor.DiskVirtioSCSI, hypervisor.DiskNVMe, errdefs.ErrInvalidArgument)
	}
	if d.File == nil {
		return "", fmt.Errorf("disk %s: no file: %w", d.ID, errdefs.ErrInvalidArgument)
	}
	st, err := d.File.Stat()
	if err != nil {
		return "", fmt.Errorf("disk %s: %w: %w", d.ID, err, errdefs.ErrInvalidArgument)
	}
	driver := "file"
	switch {
	case st.Mode().IsRegular():
	case st.Mode()&os.ModeDevice != 0 && st.Mode()&os.ModeCharDevice == 0:
		driver = "host_device"
	default:
		what := "a " + st.Mode().Type().String() + " file"
		switch {
		case st.IsDir():
			what = "a directory"
		case st.Mode()&os.ModeCharDevice != 0:
			what = "a character device"
		}
		return "", fmt.Errorf("disk %s: %s is %s, want an image file or a block device: %w", d.ID, d.File.Name(), what, errdefs.ErrInvalidArgument)
	}
	flags, err := fileFlags(d.File)
	if err != nil {
		return "", fmt.Errorf("disk %s: %w", d.ID, err)
	}
	if mode := flags & unix.O_ACCMODE; mode != unix.O_RDWR && (mode != unix.O_RDONLY || !d.ReadOnly) {
		return "", fmt.Errorf("disk %s: %s is not open for reading and writing, as a writable disk needs: %w", d.ID, d.File.Name(), errdefs.ErrInvalidArgument)
	}
	return driver, nil
}

// fileFlags are f's open flags (F_GETFL).
func fileFlags(f *os.File) (int, error) {
	rc, err := f.SyscallConn()
	if err != nil {
		return 0, err
	}
	var flags int
	var ferr error
	if err := rc.Control(func(fd uintptr) { flags, ferr = unix.FcntlInt(fd, unix.F_GETFL, 0) }); err != nil {
		return 0, err
	}
	return flags, ferr
}

// readOnlyCopy is f opened again read-only: QEMU opens a read-only node's
// /dev/fdset/N read-only, and an fdset serves only opens of its fds'
// access mode. /proc/self/fd reopens the very file f is, whatever its
// name now is.
func readOnlyCopy(f *os.File) (*os.File, error) {
	rc, err := f.SyscallConn()
	if err != nil {
		return nil, err
	}
	var fd int
	var oerr error
	if err := rc.Control(func(raw uintptr) {
		fd, oerr = unix.Open("/proc/self/fd/"+strconv.Itoa(int(raw)), unix.O_RDONLY|unix.O_CLOEXEC, 0)
	}); err != nil {
		return nil, err
	}
	if oerr != nil {
		return nil, fmt.Errorf("reopen %s read-only: %w", f.Name(), oerr)
	}
	return os.NewFile(uintptr(fd), f.Name()), nil
}

// blockdevArgs are blockdev-add's arguments for d: a raw format node over
// a protocol node (driver) on fdset.
func blockdevArgs(d *diskState, driver string, readOnly bool) map[string]any {
	return map[string]any{
		"driver":    "raw",
		"node-name": d.node,
		"read-only": readOnly,
		"file": map[string]any{
			"driver":    driver,
			"node-name": d.node + "-file",
			"filename":  "/dev/fdset/" + strconv.FormatInt(d.fdset, 10),
			"read-only": readOnly,
		},
	}
}

// deviceArgs are device_add's arguments for d (bus is plugLocked's for
// the PCI devices).
func deviceArgs(d *diskState) map[string]any {
	serial := d.id[:min(len(d.id), serialBytes)]
	switch d.bus {
	case hypervisor.DiskVirtioSCSI:
		return map[string]any{
			"driver": "scsi-hd", "id": d.dev, "drive": d.node, "serial": serial,
			"bus": scsiControllerID + ".0", "channel": 0, "scsi-id": d.target, "lun": 0,
		}
	case hypervisor.DiskNVMe:
		// An NVMe controller needs a serial; the disk is namespace 1.
		return map[string]any{"driver": "nvme", "id": d.dev, "drive": d.node, "serial": serial}
	default:
		return map[string]any{"driver": "virtio-blk-pci", "id": d.dev, "drive": d.node, "serial": serial}
	}
}

// AddDisk hot-plugs disk.File: add-fd hands QEMU the file, blockdev-add
// makes its nodes, device_add the device. A failure undoes what was done.
func (vm *VM) AddDisk(ctx context.Context, disk hypervisor.Disk) (_ hypervisor.GuestDevice, retErr error) {
	driver, err := checkDisk(disk)
	if err != nil {
		return hypervisor.GuestDevice{}, fmt.Errorf("qemu: vm %s: %w", vm.id, err)
	}
	vm.hotplugMu.Lock()
	defer vm.hotplugMu.Unlock()
	d, err := vm.newDiskLocked(disk)
	if err != nil {
		return hypervisor.GuestDevice{}, fmt.Errorf("qemu: vm %s: disk %s: %w", vm.id, disk.ID, err)
	}
	defer func() {
		if retErr == nil {
			return
		}
		// The undo runs even when ctx ran out, with a bound of its own.
		undo, cancel := context.WithTimeout(context.WithoutCancel(ctx), undoTimeout)
		defer cancel()
		if err := vm.releaseDiskLocked(undo, d); err != nil {
			vm.logger.WithError(err).WithField("disk", d.id).Warn("qemu: undo AddDisk")
		}
	}()
	gd, err := vm.addDiskLocked(ctx, d, disk, driver)
	if err != nil {
		return hypervisor.GuestDevice{}, fmt.Errorf("qemu: vm %s: disk %s: %w", vm.id, disk.ID, err)
	}
	if vm.disks.m == nil {
		vm.disks.m = make(map[string]*diskState)
	}
	vm.disks.m[d.id] = d
	vm.logger.WithFields(log.Fields{"disk": d.id, "bus": d.bus, "pci": gd.PCIPath, "scsi": gd.SCSIAddress}).Debug("qemu: disk added")
	return gd, nil
}

// newDiskLocked checks that disk can be added now and names its parts.
func (vm *VM) newDiskLocked(disk hypervisor.Disk) (*diskState, error) {
	if vm.machine != "q35" {
		return nil, fmt.Errorf("%s has no hot-plug ports, disks need q35: %w", vm.machine, errdefs.ErrNotImplemented)
	}
	if _, ok := vm.disks.m[disk.ID]; ok {
		return nil, fmt.Errorf("a disk of that id is there: %w", errdefs.ErrAlreadyExists)
	}
	d := &diskState{id: disk.ID, bus: disk.Bus, dev: diskDeviceID(disk.ID), node: "disk" + strconv.Itoa(vm.disks.seq)}
	needsPort := true
	if d.bus == hypervisor.DiskVirtioSCSI {
		needsPort = !vm.disks.scsi
		targets := make(map[int]bool)
		for _, o := range vm.disks.m {
			if o.bus == hypervisor.DiskVirtioSCSI {
				targets[o.target] = true
			}
		}
		for targets[d.target] {
			d.target++
		}
		if d.target > maxSCSITarget {
			return nil, fmt.Errorf("the virtio-scsi controller has a disk on each of its %d targets: %w", maxSCSITarget+1, errdefs.ErrResourceExhausted)
		}
	}
	if needsPort && !slices.Contains(vm.ports, "") {
		return nil, fmt.Errorf("no free hotplug port (hypervisor.hotplug_ports = %d on q35): %w", len(vm.ports), errdefs.ErrResourceExhausted)
	}
	vm.disks.seq++
	return d, nil
}

// addDiskLocked makes d in QEMU, recording each part made.
func (vm *VM) addDiskLocked(ctx context.Context, d *diskState, disk hypervisor.Disk, driver string) (hypervisor.GuestDevice, error) {
	f := disk.File
	if disk.ReadOnly {
		ro, err := readOnlyCopy(f)
		if err != nil {
			return hypervisor.GuestDevice{}, err
		}
		defer ro.Close()
		f = ro
	}
	raw, err := vm.qmp.ExecuteWithFile(ctx, "add-fd", map[string]any{"opaque": "disk " + d.id}, f)
	if err != nil {
		return hypervisor.GuestDevice{}, err
	}
	var fd struct {
		FDSet int64 `json:"fdset-id"`
	}
	if err := json.Unmarshal(raw, &fd); err != nil {
		return hypervisor.GuestDevice{}, fmt.Errorf("add-fd: %w", err)
	}
	d.fdset, d.fd = fd.FDSet, true
	if _, err := vm.qmp.Execute(ctx, "blockdev-add", blockdevArgs(d, driver, disk.ReadOnly)); err != nil {
		return hypervisor.GuestDevice{}, err
	}
	d.blockdev = true
	if d.bus == hypervisor.DiskVirtioSCSI {
		if !vm.disks.scsi {
			if err := vm.plugLocked(ctx, map[string]any{"driver": "virtio-scsi-pci", "id": scsiControllerID}); err != nil {
				return hypervisor.GuestDevice{}, err
			}
			vm.disks.scsi = true
		}
		if _, err := vm.qmp.Execute(ctx, "device_add", deviceArgs(d)); err != nil {
			return hypervisor.GuestDevice{}, err
		}
	} else if err := vm.plugLocked(ctx, deviceArgs(d)); err != nil {
		return hypervisor.GuestDevice{}, err
	}
	d.device = true
	return vm.diskGuestDevice(ctx, d)
}

// RemoveDisk unplugs the disk and waits for QEMU to delete its device
// (the guest must let go of one on a PCIe port first: bounded by ctx and
// deviceUnplugTimeout), then deletes its block nodes and closes QEMU's
// copies of its file. Its hot-plug port is free again. A RemoveDisk that
// failed can be called again; it goes on from where it stopped.
func (vm *VM) RemoveDisk(ctx context.Context, id string) error {
	vm.hotplugMu.Lock()
	defer vm.hotplugMu.Unlock()
	d, ok := vm.disks.m[id]
	if !ok {
		return fmt.Errorf("qemu: vm %s: disk %q: %w", vm.id, id, errdefs.ErrNotFound)
	}
	if err := vm.releaseDiskLocked(ctx, d); err != nil {
		return fmt.Errorf("qemu: vm %s: disk %s: %w", vm.id, id, err)
	}
	delete(vm.disks.m, id)
	vm.logger.WithField("disk", id).Debug("qemu: disk removed")
	return nil
}

// releaseDiskLocked undoes what of d exists, last made first.
func (vm *VM) releaseDiskLocked(ctx context.Context, d *diskState) error {
	if d.device {
		if err := vm.unplugLocked(ctx, d.dev); err != nil {
			return err
		}
		d.device = false
	}
	if d.blockdev {
		// Deleting the format node deletes the protocol node made with it.
		if _, err := vm.qmp.Execute(ctx, "blockdev-del", map[string]any{"node-name": d.node}); err != nil {
			return err
		}
		d.blockdev = false
	}
	if d.fd {
		if _, err := vm.qmp.Execute(ctx, "remove-fd", map[string]any{"fdset-id": d.fdset}); err != nil {
			return err
		}
		d.fd = false
	}
	return nil
}

// unplugLocked unplugs the device id (a QEMU device id, as plugLocked's
// dev["id"]) and returns once QEMU has deleted it (DEVICE_DELETED), within
// ctx and at most deviceUnplugTimeout: a device on a PCIe port goes only
// when the guest lets go of it (pciehp or ACPI eject). Its hot-plug port,
// if it has one, is free again. A device that is already gone counts as
// unplugged. vm.hotplugMu is held.
func (vm *VM) unplugLocked(ctx context.Context, id string) error {
	deleted, stop := vm.unplugs.watch(id)
	defer stop()
	_, err := vm.qmp.Execute(ctx, "device_del", map[string]any{"id": id})
	var qerr *QMPError
	switch {
	case errors.As(err, &qerr) && qerr.Class == "DeviceNotFound":
		// Gone already: a wait before this one ran out just before.
	case err != nil:
		return fmt.Errorf("%s: %w", id, err)
	default:
		timer := time.NewTimer(deviceUnplugTimeout)
		defer timer.Stop()
		select {
		case <-deleted:
		case <-ctx.Done():
			return fmt.Errorf("%s: the guest did not let go of the device: %w", id, context.Cause(ctx))
		case <-timer.C:
			return fmt.Errorf("%s: the guest did not let go of the device: %w after %s", id, errWaitTimeout, deviceUnplugTimeout)
		case <-vm.done:
			return fmt.Errorf("%s: %w", id, errExited)
		}
	}
	if i := slices.Index(vm.ports, id); i >= 0 {
		vm.ports[i] = ""
	}
	vm.logger.WithField("device", id).Debug("qemu: device unplugged")
	return nil
}

// GuestDevice says where the guest finds a disk AddDisk added, or any
// other PCI device of the VM by the id it was added with: a NIC's or PCI
// device's (its QEMU device id being id + "-dev", or id).
func (vm *VM) GuestDevice(ctx context.Context, id string) (hypervisor.GuestDevice, error) {
	vm.hotplugMu.Lock()
	defer vm.hotplugMu.Unlock()
	if d, ok := vm.disks.m[id]; ok {
		gd, err := vm.diskGuestDevice(ctx, d)
		if err != nil {
			return gd, fmt.Errorf("qemu: vm %s: disk %s: %w", vm.id, id, err)
		}
		return gd, nil
	}
	if !wellFormed(id) {
		return hypervisor.GuestDevice{}, fmt.Errorf("qemu: vm %s: device %q: %w", vm.id, id, errdefs.ErrNotFound)
	}
	for _, dev := range []string{nicDeviceID(id), id} {
		p, err := vm.pciPath(ctx, dev)
		var qerr *QMPError
		if errors.As(err, &qerr) && qerr.Class == "DeviceNotFound" {
			continue
		}
		if err != nil {
			return hypervisor.GuestDevice{}, fmt.Errorf("qemu: vm %s: device %s: %w", vm.id, id, err)
		}
		return hypervisor.GuestDevice{PCIPath: p}, nil
	}
	return hypervisor.GuestDevice{}, fmt.Errorf("qemu: vm %s: device %q: %w", vm.id, id, errdefs.ErrNotFound)
}

// diskGuestDevice is where the guest finds d: its PCI device, or for
// virtio-scsi the controller and the disk's target and LUN.
func (vm *VM) diskGuestDevice(ctx context.Context, d *diskState) (hypervisor.GuestDevice, error) {
	if d.bus == hypervisor.DiskVirtioSCSI {
		p, err := vm.pciPath(ctx, scsiControllerID)
		if err != nil {
			return hypervisor.GuestDevice{}, err
		}
		return hypervisor.GuestDevice{PCIPath: p, SCSIAddress: strconv.Itoa(d.target) + ":0"}, nil
	}
	p, err := vm.pciPath(ctx, d.dev)
	return hypervisor.GuestDevice{PCIPath: p}, err
}

// pciPath is where the guest finds the PCI device id (a QEMU device id):
// the slot.function of the device and of each bridge above it, from the
// root bus down ("03.0/00.0"). QEMU tells each, not the guest: a PCI
// device's "addr" property is its devfn on the bus it sits on
// ("parent_bus"), and that bus's owner is the bridge above it, or the
// host bridge, which is no PCI device (has no "addr"), at the root.
func (vm *VM) pciPath(ctx context.Context, id string) (string, error) {
	obj := peripheral + id
	var hops []string
	for range maxPCIDepth {
		props, err := vm.qomProperties(ctx, obj)
		if err != nil {
			return "", err
		}
		if !props["addr"] {
			if len(hops) == 0 {
				return "", fmt.Errorf("%s is no PCI device", id)
			}
			slices.Reverse(hops)
			return strings.Join(hops, "/"), nil
		}
		var devfn int
		if err := vm.qomGet(ctx, obj, "addr", &devfn); err != nil {
			return "", err
		}
		if devfn < 0 || devfn > 0xff {
			return "", fmt.Errorf("%s: PCI address %d", obj, devfn)
		}
		hops = append(hops, fmt.Sprintf("%02x.%x", devfn>>3, devfn&7))
		var bus string
		if err := vm.qomGet(ctx, obj, "parent_bus", &bus); err != nil {
			return "", err
		}
		if !strings.HasPrefix(bus, "/") {
			return "", fmt.Errorf("%s: parent bus %q", obj, bus)
		}
		obj = path.Dir(bus)
	}
	return "", fmt.Errorf("%s: more than %d PCI bridges above it", id, maxPCIDepth)
}

// qomProperties are the names of the properties of the QOM object at
// path.
func (vm *VM) qomProperties(ctx context.Context, path string) (map[string]bool, error) {
	raw, err := vm.qmp.Execute(ctx, "qom-list", map[string]any{"path": path})
	if err != nil {
		return nil, err
	}
	var list []struct {
		Name string `json:"name"`
	}
	if err := json.Unmarshal(raw, &list); err != nil {
		return nil, fmt.Errorf("qom-list %s: %w", path, err)
	}
	props := make(map[string]bool, len(list))
	for _, p := range list {
		props[p.Name] = true
	}
	return props, nil
}

// qomGet reads the property of the QOM object at path into v.
func (vm *VM) qomGet(ctx context.Context, path, property string, v any) error {
	raw, err := vm.qmp.Execute(ctx, "qom-get", map[string]any{"path": path, "property": property})
	if err != nil {
		return err
	}
	if err := json.Unmarshal(raw, v); err != nil {
		return fmt.Errorf("qom-get %s %s: %w", path, property, err)
	}
	return nil
}
