package agent

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/moby/sys/mountinfo"
	"golang.org/x/sys/unix"

	"github.com/colo-runtime/colo/agentproto"
)

// ninePOptions are the 9p options measured to work well over virtio
// (docs: platform-notes.md); a storage's own options are appended.
const ninePOptions = "trans=virtio,version=9p2000.L,msize=262144"

// mountFlags maps the mount(8) options that are flags, not data.
var mountFlags = map[string]struct {
	clear bool
	flag  uintptr
}{
	"ro":          {false, unix.MS_RDONLY},
	"rw":          {true, unix.MS_RDONLY},
	"nosuid":      {false, unix.MS_NOSUID},
	"suid":        {true, unix.MS_NOSUID},
	"nodev":       {false, unix.MS_NODEV},
	"dev":         {true, unix.MS_NODEV},
	"noexec":      {false, unix.MS_NOEXEC},
	"exec":        {true, unix.MS_NOEXEC},
	"sync":        {false, unix.MS_SYNCHRONOUS},
	"async":       {true, unix.MS_SYNCHRONOUS},
	"noatime":     {false, unix.MS_NOATIME},
	"atime":       {true, unix.MS_NOATIME},
	"nodiratime":  {false, unix.MS_NODIRATIME},
	"diratime":    {true, unix.MS_NODIRATIME},
	"relatime":    {false, unix.MS_RELATIME},
	"norelatime":  {true, unix.MS_RELATIME},
	"strictatime": {false, unix.MS_STRICTATIME},
	"bind":        {false, unix.MS_BIND},
	"rbind":       {false, unix.MS_BIND | unix.MS_REC},
	"defaults":    {false, 0},
}

// parseMountOptions splits mount(8)-style options into mount(2) flags and
// the filesystem's data string.
func parseMountOptions(options []string) (uintptr, string) {
	var (
		flags uintptr
		data  []string
	)
	for _, o := range options {
		if f, ok := mountFlags[o]; ok {
			if f.clear {
				flags &^= f.flag
			} else {
				flags |= f.flag
			}
			continue
		}
		if o != "" {
			data = append(data, o)
		}
	}
	return flags, strings.Join(data, ",")
}

// mountStorages mounts each storage in order and returns the mount points
// for unmountAll. On error nothing stays mounted. Disks are found in sysfs
// below sysRoot.
func mountStorages(ctx context.Context, sysRoot string, storages []*agentproto.Storage) ([]string, error) {
	disks := diskFinder{sysRoot: sysRoot, devRoot: "/dev", loadDriver: loadDeviceDriver}
	var mounted []string
	for _, st := range storages {
		if err := mountStorage(ctx, disks, st); err != nil {
			if uerr := unmountAll(ctx, mounted); uerr != nil {
				log.G(ctx).WithError(uerr).Warn("cleaning up storages after a failed mount")
			}
			return nil, err
		}
		log.G(ctx).WithField("driver", st.GetDriver()).WithField("source", st.GetSource()).
			Debugf("mounted %s", st.GetMountPoint())
		mounted = append(mounted, st.GetMountPoint())
	}
	return mounted, nil
}

func mountStorage(ctx context.Context, disks diskFinder, st *agentproto.Storage) error {
	mp := st.GetMountPoint()
	if !filepath.IsAbs(mp) {
		return fmt.Errorf("storage %q: mount point %q is not an absolute path: %w", st.GetSource(), mp, errdefs.ErrInvalidArgument)
	}
	flags, data := parseMountOptions(st.GetOptions())
	source, fstype, isDir := st.GetSource(), "", true
	switch st.GetDriver() {
	case agentproto.StorageVirtioBlk, agentproto.StorageNVMe, agentproto.StorageVirtioSCSI:
		d, err := checkDiskStorage(st, flags)
		if err != nil {
			return err
		}
		// The filesystem's module, if one, is loaded by mount(2)'s
		// request_module("fs-<type>") (the agent is /sbin/modprobe).
		fstype = st.GetFstype()
		if source, err = disks.find(ctx, d); err != nil {
			return err
		}
	case "9p":
		fstype = "9p"
		data = joinOptions(ninePOptions, data)
	case "virtiofs":
		fstype = "virtiofs"
	case "tmpfs":
		fstype = "tmpfs"
		if source == "" {
			source = "tmpfs"
		}
	case "bind":
		fi, err := os.Stat(source)
		if err != nil {
			return fmt.Errorf("storage bind source: %w", err)
		}
		isDir = fi.IsDir()
		flags |= unix.MS_BIND
	default:
		return fmt.Errorf("storage driver %q: %w", st.GetDriver(), errdefs.ErrNotImplemented)
	}
	if err := makeMountPoint(mp, isDir); err != nil {
		return err
	}
	bind := flags&unix.MS_BIND != 0
	mflags := flags
	if bind {
		// A new bind mount ignores all flags but MS_REC: the others take a
		// remount of the new mount.
		mflags &= unix.MS_BIND | unix.MS_REC
	}
	if err := mountShare(source, mp, fstype, mflags, data); err != nil {
		return fmt.Errorf("mount %s storage %q on %s: %w", st.GetDriver(), source, mp, err)
	}
	if bind && flags&^(unix.MS_BIND|unix.MS_REC) != 0 {
		if err := unix.Mount("", mp, "", flags&^unix.MS_REC|unix.MS_REMOUNT, ""); err != nil {
			_ = unix.Unmount(mp, unix.MNT_DETACH)
			return fmt.Errorf("remount bind mount %s with %v: %w", mp, st.GetOptions(), err)
		}
	}
	return nil
}

// checkDiskStorage checks a disk storage before anything is waited for.
func checkDiskStorage(st *agentproto.Storage, flags uintptr) (disk, error) {
	d, err := parseDisk(st)
	if err != nil {
		return disk{}, err
	}
	if st.GetFstype() == "" {
		return disk{}, fmt.Errorf("%s: no filesystem type to mount it as: %w", d, errdefs.ErrInvalidArgument)
	}
	if flags&unix.MS_BIND != 0 {
		return disk{}, fmt.Errorf("%s: options %v: a disk is mounted, not bound: %w", d, st.GetOptions(), errdefs.ErrInvalidArgument)
	}
	return d, nil
}

// shareTimeout bounds the wait for a 9p or virtio-fs device to show up: a
// VM restored from a template gets its virtio-fs device hot-plugged just
// before the mount is asked for.
const shareTimeout = 10 * time.Second

// mountShare is mount(2), retried while a 9p or virtio-fs device with the
// tag is not there yet (ENOENT from 9p, EINVAL from virtio-fs).
func mountShare(source, target, fstype string, flags uintptr, data string) error {
	deadline := time.Now().Add(shareTimeout)
	for {
		err := unix.Mount(source, target, fstype, flags, data)
		share := fstype == "9p" || fstype == "virtiofs"
		if err == nil || !share || !(errors.Is(err, unix.ENOENT) || errors.Is(err, unix.EINVAL)) || time.Now().After(deadline) {
			return err
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func joinOptions(a, b string) string {
	if a == "" || b == "" {
		return a + b
	}
	return a + "," + b
}

func makeMountPoint(path string, dir bool) error {
	if dir {
		if err := os.MkdirAll(path, 0o755); err != nil {
			return fmt.Errorf("create mount point: %w", err)
		}
		return nil
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return fmt.Errorf("create mount point: %w", err)
	}
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDONLY|unix.O_CLOEXEC, 0o644)
	if err != nil {
		return fmt.Errorf("create mount point: %w", err)
	}
	return f.Close()
}

// unmountAll unmounts mount points in reverse order. A busy mount is
// detached so that the caller's teardown always completes.
func unmountAll(ctx context.Context, mountPoints []string) error {
	var errs []error
	for i := len(mountPoints) - 1; i >= 0; i-- {
		mp := mountPoints[i]
		err := unix.Unmount(mp, 0)
		if errors.Is(err, unix.EBUSY) {
			log.G(ctx).Warnf("%s is busy: detaching it", mp)
			err = unix.Unmount(mp, unix.MNT_DETACH)
		}
		if err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
			errs = append(errs, fmt.Errorf("unmount %s: %w", mp, err))
		}
	}
	return errors.Join(errs...)
}

// rootIsInitramfs tells whether / is the initramfs, where pivot_root(2)
// fails (EINVAL): containers must then use MS_MOVE and chroot.
func rootIsInitramfs() (bool, error) {
	mounts, err := mountinfo.GetMounts(mountinfo.SingleEntryFilter("/"))
	if err != nil {
		return false, fmt.Errorf("read mount table: %w", err)
	}
	if len(mounts) == 0 {
		return false, errors.New("no mount at / in the mount table")
	}
	// The last mount on / is the one in effect.
	return mounts[len(mounts)-1].FSType == "rootfs", nil
}
