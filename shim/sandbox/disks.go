package sandbox

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"slices"
	"strings"
	"time"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"

	"github.com/colo-runtime/colo/agentproto"
	"github.com/colo-runtime/colo/hypervisor"
)

// A container's rootfs that the snapshotter hands over as one filesystem
// on a block device or image file (blockfile's image with "loop",
// devmapper's /dev/mapper device) is attached to the VM as a disk of its
// own, which the guest mounts (a block rootfs): nothing of it is mounted
// on the host or goes through the shared filesystem. Disks are hot-plugged
// (q35); the VM holds each by a copy of the shim's open file.

// disk is a disk of the sandbox's VM: opened, then attached.
type disk struct {
	id string
	// container is the container whose rootfs it is; "" for a pod's.
	container string
	source    string
	file      *os.File
	// attached: AddDisk succeeded, so RemoveDisk is owed.
	attached bool
}

// blockRootfs is a container's rootfs attached as a disk.
type blockRootfs struct {
	diskID string
	fstype string
	// options are the guest's mount options: the snapshotter's, less
	// "loop" (the guest mounts a disk, not a file).
	options  []string
	readOnly bool
}

// diskID names a container's rootfs disk in the VM: a hash of the
// container id, which may be long (CRI's are 64 hex digits) or hold
// characters the hypervisor's ids do not allow.
func diskID(containerID string) string {
	sum := sha256.Sum256([]byte(containerID))
	return "rootfs-" + hex.EncodeToString(sum[:6])
}

// blockRootfsOf tells whether a container's rootfs mounts are to be
// attached as a disk, and if not, why.
func (s *Sandbox) blockRootfsOf(mounts []mount.Mount) (*mount.Mount, string) {
	if len(mounts) != 1 {
		return nil, fmt.Sprintf("%d rootfs mounts, not one", len(mounts))
	}
	m := mounts[0]
	switch {
	case m.Type == "" || m.Type == "none" || isBindMount(m):
		return nil, "a bind mount"
	case m.Type == "overlay" || m.Type == "tmpfs" || strings.HasPrefix(m.Type, "fuse"):
		return nil, "a " + m.Type + " mount"
	}
	fi, err := os.Stat(m.Source)
	if err != nil {
		return nil, fmt.Sprintf("source: %v", err)
	}
	if !isDiskFile(fi.Mode()) {
		return nil, fmt.Sprintf("source %s is neither a block device nor a regular file", m.Source)
	}
	switch {
	case !s.cfg.Storage.BlockRootfs:
		return nil, "storage.block_rootfs is off"
	case s.cfg.Hypervisor.Machine != "q35":
		return nil, fmt.Sprintf("hypervisor.machine %s cannot hot-plug disks", s.cfg.Hypervisor.Machine)
	}
	return &m, ""
}

// isBindMount tells whether a containerd mount is a bind.
func isBindMount(m mount.Mount) bool {
	return m.Type == "bind" || m.Type == "rbind" || slices.Contains(m.Options, "bind") || slices.Contains(m.Options, "rbind")
}

// isDiskFile tells whether a file of mode can back a disk.
func isDiskFile(mode fs.FileMode) bool {
	return mode.IsRegular() || (mode&fs.ModeDevice != 0 && mode&fs.ModeCharDevice == 0)
}

// openBlockRootfs opens a container's block rootfs and registers it with
// the sandbox, to be attached by createInGuest; releaseDisk undoes it.
func (s *Sandbox) openBlockRootfs(containerID string, m mount.Mount) (*blockRootfs, error) {
	b := &blockRootfs{
		diskID:   diskID(containerID),
		fstype:   m.Type,
		readOnly: slices.Contains(m.Options, "ro"),
	}
	for _, o := range m.Options {
		if o != "loop" {
			b.options = append(b.options, o)
		}
	}
	if err := s.openDisk(b.diskID, containerID, m.Source, b.readOnly); err != nil {
		return nil, fmt.Errorf("rootfs of container %s: %w", containerID, err)
	}
	return b, nil
}

// openDisk opens a disk's source and registers it with the sandbox.
func (s *Sandbox) openDisk(id, containerID, source string, readOnly bool) error {
	flag := os.O_RDWR
	if readOnly {
		flag = os.O_RDONLY
	}
	f, err := os.OpenFile(source, flag, 0)
	if err != nil {
		return fmt.Errorf("open disk: %w", err)
	}
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return fmt.Errorf("open disk: %w", err)
	}
	if !isDiskFile(fi.Mode()) {
		f.Close()
		return errdefs.ErrInvalidArgument.WithMessage(fmt.Sprintf("disk %s is neither a block device nor a regular file", source))
	}
	s.disksMu.Lock()
	defer s.disksMu.Unlock()
	if s.disks == nil {
		s.disks = make(map[string]*disk)
	}
	if _, ok := s.disks[id]; ok {
		f.Close()
		return errdefs.ErrAlreadyExists.WithMessage(fmt.Sprintf("disk %s is attached already", id))
	}
	s.disks[id] = &disk{id: id, container: containerID, source: source, file: f}
	return nil
}

// attachDisk hot-plugs a disk openDisk registered, recorded in the state
// first, and says where the guest finds it. On error the record is
// dropped again; the file stays open, for releaseDisk.
func (s *Sandbox) attachDisk(ctx context.Context, id string, bus hypervisor.DiskBus, readOnly bool) (hypervisor.GuestDevice, error) {
	s.disksMu.Lock()
	d := s.disks[id]
	s.disksMu.Unlock()
	if d == nil {
		return hypervisor.GuestDevice{}, fmt.Errorf("disk %s was not opened", id)
	}
	if err := s.recordDisk(DiskState{ID: id, Container: d.container, Source: d.source}); err != nil {
		return hypervisor.GuestDevice{}, err
	}
	// QEMU and the guest answer within the set-up bound.
	ctx, cancel := context.WithTimeout(ctx, time.Duration(s.cfg.Agent.CreateTimeout))
	defer cancel()
	dev, err := s.vm.AddDisk(ctx, hypervisor.Disk{ID: id, File: d.file, Bus: bus, ReadOnly: readOnly})
	if err != nil {
		if ferr := s.forgetDisk(id); ferr != nil {
			log.G(ctx).WithError(ferr).WithField("disk", id).Warn("drop the record of a disk not attached")
		}
		return hypervisor.GuestDevice{}, fmt.Errorf("attach disk %s (%s): %w", id, d.source, err)
	}
	s.disksMu.Lock()
	d.attached = true
	s.disksMu.Unlock()
	log.G(ctx).WithFields(log.Fields{"disk": id, "source": d.source, "bus": bus, "guest_pci_path": dev.PCIPath}).Debug("disk attached")
	return dev, nil
}

// releaseDisk detaches a disk (from a VM that goes on: the guest must
// have unmounted it), closes its file and drops its record. A disk it
// does not know is no error; one the VM did not let go of stays, for the
// next try.
func (s *Sandbox) releaseDisk(ctx context.Context, id string) error {
	s.disksMu.Lock()
	d := s.disks[id]
	s.disksMu.Unlock()
	if d == nil {
		return nil
	}
	if d.attached && s.alive() {
		rmCtx, cancel := context.WithTimeout(ctx, time.Duration(s.cfg.Agent.CreateTimeout))
		err := s.vm.RemoveDisk(rmCtx, id)
		cancel()
		if err != nil {
			return fmt.Errorf("detach disk %s (%s): %w", id, d.source, err)
		}
	}
	s.disksMu.Lock()
	delete(s.disks, id)
	s.disksMu.Unlock()
	d.file.Close()
	return s.forgetDisk(id)
}

// closeDisks closes the files of every disk once the VM is gone (or never
// ran), and drops their records.
func (s *Sandbox) closeDisks() error {
	s.disksMu.Lock()
	disks := s.disks
	s.disks = nil
	s.disksMu.Unlock()
	var errs []error
	for id, d := range disks {
		d.file.Close()
		if err := s.forgetDisk(id); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// attachRootfs attaches a container's block rootfs and returns the
// storage the agent mounts it as.
func (s *Sandbox) attachRootfs(ctx context.Context, c *Container) (*agentproto.Storage, error) {
	bus := hypervisor.DiskVirtioBlk
	if s.cfg.Storage.BlockDriver == string(hypervisor.DiskVirtioSCSI) {
		bus = hypervisor.DiskVirtioSCSI
	}
	dev, err := s.attachDisk(ctx, c.block.diskID, bus, c.block.readOnly)
	if err != nil {
		return nil, fmt.Errorf("rootfs of container %s: %w", c.id, err)
	}
	return &agentproto.Storage{
		Driver:      storageDriver(bus),
		Source:      dev.PCIPath,
		ScsiAddress: dev.SCSIAddress,
		Fstype:      c.block.fstype,
		Options:     c.block.options,
		MountPoint:  agentproto.BlockRootfsPath(c.id),
	}, nil
}

// storageDriver is the agent's storage driver of a disk on bus.
func storageDriver(bus hypervisor.DiskBus) string {
	switch bus {
	case hypervisor.DiskVirtioSCSI:
		return agentproto.StorageVirtioSCSI
	case hypervisor.DiskNVMe:
		return agentproto.StorageNVMe
	}
	return agentproto.StorageVirtioBlk
}
