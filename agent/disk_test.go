package agent

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"

	"github.com/colo-runtime/colo/agentproto"
)

func TestParseDisk(t *testing.T) {
	for _, tc := range []struct {
		driver, source, addr string
		want                 *disk // nil: invalid
	}{
		{driver: "virtio-blk", source: "03.0/00.0", want: &disk{driver: "virtio-blk", pciPath: []pciHop{{3, 0}, {0, 0}}}},
		{driver: "nvme", source: "04.0/00.0", want: &disk{driver: "nvme", pciPath: []pciHop{{4, 0}, {0, 0}}}},
		{driver: "virtio-scsi", source: "05.0/00.0", addr: "1:2", want: &disk{driver: "virtio-scsi", pciPath: []pciHop{{5, 0}, {0, 0}}, target: 1, lun: 2}},
		{driver: "virtio-scsi", source: "05.0/00.0", addr: "255:16383", want: &disk{driver: "virtio-scsi", pciPath: []pciHop{{5, 0}, {0, 0}}, target: 255, lun: 16383}},
		{driver: "virtio-blk", source: "03.0/00.0", addr: "0:0"},
		{driver: "virtio-blk", source: "vda"},
		{driver: "nvme", source: ""},
		{driver: "virtio-scsi", source: "05.0/00.0"},
		{driver: "virtio-scsi", source: "05.0/00.0", addr: "1"},
		{driver: "virtio-scsi", source: "05.0/00.0", addr: "1:"},
		{driver: "virtio-scsi", source: "05.0/00.0", addr: "1:x"},
		{driver: "virtio-scsi", source: "05.0/00.0", addr: "-1:0"},
		{driver: "virtio-scsi", source: "05.0/00.0", addr: "+1:0"},
		{driver: "virtio-scsi", source: "05.0/00.0", addr: "256:0"},
		{driver: "virtio-scsi", source: "05.0/00.0", addr: "0:16384"},
		{driver: "virtio-scsi", source: "05.0/00.0", addr: "0:0:0"},
	} {
		st := &agentproto.Storage{Driver: tc.driver, Source: tc.source, ScsiAddress: tc.addr}
		got, err := parseDisk(st)
		if tc.want == nil {
			if !errors.Is(err, errdefs.ErrInvalidArgument) {
				t.Errorf("parseDisk(%s %q %q) = %v, %v; want an invalid-argument error", tc.driver, tc.source, tc.addr, got, err)
			}
			continue
		}
		if err != nil || got.driver != tc.want.driver || !slices.Equal(got.pciPath, tc.want.pciPath) || got.target != tc.want.target || got.lun != tc.want.lun {
			t.Errorf("parseDisk(%s %q %q) = %+v, %v; want %+v", tc.driver, tc.source, tc.addr, got, err, *tc.want)
		}
	}
}

func TestMountStorageBadDisk(t *testing.T) {
	// Refused before anything is waited for or made.
	disks := diskFinder{sysRoot: t.TempDir(), devRoot: t.TempDir(), loadDriver: func(context.Context, string) error {
		t.Error("a driver loaded for a bad storage")
		return nil
	}}
	mp := filepath.Join(t.TempDir(), "mnt")
	for _, st := range []*agentproto.Storage{
		{Driver: "virtio-blk", Source: "03.0/00.0", MountPoint: mp},
		{Driver: "virtio-blk", Source: "03.0/00.0", Fstype: "ext4", Options: []string{"bind"}, MountPoint: mp},
		{Driver: "virtio-blk", Source: "3", Fstype: "ext4", MountPoint: mp},
		{Driver: "virtio-scsi", Source: "03.0/00.0", Fstype: "ext4", MountPoint: mp},
		{Driver: "nvme", Source: "03.0/00.0", Fstype: "ext4", MountPoint: "rel"},
	} {
		if err := mountStorage(context.Background(), disks, st); !errors.Is(err, errdefs.ErrInvalidArgument) {
			t.Errorf("mountStorage(%v): %v, want an invalid-argument error", st, err)
		}
	}
	if _, err := os.Lstat(mp); err == nil {
		t.Errorf("mount point %s made for bad storages", mp)
	}
}

// diskFixture is a guest's sysfs with disks as the kernel shows them once
// their drivers are bound, and a /dev with their nodes; it returns both.
func diskFixture(t *testing.T) (sys, dev string) {
	if os.Geteuid() != 0 {
		t.Skip("mknod of block device nodes needs root")
	}
	pci := "devices/pci0000:00/"
	blk := pci + "0000:00:03.0/0000:01:00.0/"
	nvme := pci + "0000:00:04.0/0000:02:00.0/"
	mpath := pci + "0000:00:07.0/0000:06:00.0/"
	scsi := pci + "0000:00:05.0/0000:03:00.0/"
	sys = sysfsTree(t, []string{
		// A virtio-blk device without its disk (virtio_blk not bound).
		pci + "0000:00:06.0/0000:04:00.0/virtio4",
		// An NVMe controller with two namespaces.
		pci + "0000:00:08.0/0000:07:00.0/nvme/nvme2/nvme2n1",
		pci + "0000:00:08.0/0000:07:00.0/nvme/nvme2/nvme2n2",
		// A virtio-scsi controller without LUNs.
		pci + "0000:00:09.0/0000:08:00.0/virtio5/host1/scsi_host/host1",
		// An NVMe controller with no namespace.
		pci + "0000:00:0a.0/0000:09:00.0/nvme/nvme3",
	}, map[string]string{
		blk + "virtio2/block/vda/dev":                                        "252:0\n",
		blk + "virtio2/block/vda/vda1/dev":                                   "252:1\n",
		nvme + "nvme/nvme0/nvme0n1/dev":                                      "259:0\n",
		nvme + "nvme/nvme0/ng0n1/dev":                                        "241:0\n",
		"devices/virtual/nvme-subsystem/nvme-subsys1/nvme1n1/dev":            "259:1\n",
		mpath + "nvme/nvme1/nvme1c1n1/uevent":                                "",
		scsi + "virtio3/host0/scsi_host/host0/scan":                          "",
		scsi + "virtio3/host0/target0:0:0/0:0:0:0/block/sda/dev":             "8:0\n",
		scsi + "virtio3/host0/target0:0:1/0:0:1:2/block/sdb/dev":             "8:16\n",
		pci + "0000:00:09.0/0000:08:00.0/virtio5/host1/scsi_host/host1/scan": "",
		// A disk whose node is missing, and one whose node is another
		// device's.
		pci + "0000:00:0b.0/0000:0a:00.0/virtio6/block/vdb/dev": "252:16\n",
		pci + "0000:00:0c.0/0000:0b:00.0/virtio7/block/vdc/dev": "252:32\n",
	}, map[string]string{
		"class/block/nvme1n1": "../../devices/virtual/nvme-subsystem/nvme-subsys1/nvme1n1",
	})
	dev = t.TempDir()
	for name, num := range map[string][2]uint32{
		"vda": {252, 0}, "vda1": {252, 1}, "nvme0n1": {259, 0}, "nvme1n1": {259, 1}, "sda": {8, 0}, "sdb": {8, 16},
		"vdc": {252, 48},
	} {
		if err := unix.Mknod(filepath.Join(dev, name), unix.S_IFBLK|0o600, int(unix.Mkdev(num[0], num[1]))); err != nil {
			t.Fatal(err)
		}
	}
	return sys, dev
}

func TestFindDisk(t *testing.T) {
	pci := "devices/pci0000:00/"
	for _, tc := range []struct {
		name    string
		st      *agentproto.Storage
		want    string   // the node below dev
		loaded  []string // devices a driver was loaded for, below sys
		wantErr error
		errSays []string
	}{
		{name: "virtio-blk", st: &agentproto.Storage{Driver: "virtio-blk", Source: "03.0/00.0"}, want: "vda",
			loaded: []string{pci + "0000:00:03.0/0000:01:00.0", pci + "0000:00:03.0/0000:01:00.0/virtio2"}},
		{name: "nvme", st: &agentproto.Storage{Driver: "nvme", Source: "04.0/00.0"}, want: "nvme0n1",
			loaded: []string{pci + "0000:00:04.0/0000:02:00.0"}},
		{name: "nvme multipath", st: &agentproto.Storage{Driver: "nvme", Source: "07.0/00.0"}, want: "nvme1n1",
			loaded: []string{pci + "0000:00:07.0/0000:06:00.0"}},
		{name: "virtio-scsi", st: &agentproto.Storage{Driver: "virtio-scsi", Source: "05.0/00.0", ScsiAddress: "1:2"}, want: "sdb",
			loaded: []string{pci + "0000:00:05.0/0000:03:00.0", pci + "0000:00:05.0/0000:03:00.0/virtio3",
				pci + "0000:00:05.0/0000:03:00.0/virtio3/host0/target0:0:1/0:0:1:2"}},
		{name: "virtio-scsi lun 0", st: &agentproto.Storage{Driver: "virtio-scsi", Source: "05.0/00.0", ScsiAddress: "0:0"}, want: "sda"},
		{name: "never plugged", st: &agentproto.Storage{Driver: "virtio-blk", Source: "03.0/01.0"},
			wantErr: context.DeadlineExceeded, errSays: []string{"virtio-blk disk at PCI path 03.0/01.0", "waited for PCI device 03.0/01.0", "only 0000:01:00.0"}},
		{name: "no block device", st: &agentproto.Storage{Driver: "virtio-blk", Source: "06.0/00.0"},
			wantErr: context.DeadlineExceeded, errSays: []string{"the block device of", "virtio4", "no block device"}},
		{name: "not virtio", st: &agentproto.Storage{Driver: "virtio-blk", Source: "04.0/00.0"},
			wantErr: context.DeadlineExceeded, errSays: []string{"a virtio device on", "0000:02:00.0"}},
		{name: "nvme without namespace", st: &agentproto.Storage{Driver: "nvme", Source: "0a.0/00.0"},
			wantErr: context.DeadlineExceeded, errSays: []string{"an NVMe namespace", "nvme3 with no namespace"}},
		{name: "nvme with two namespaces", st: &agentproto.Storage{Driver: "nvme", Source: "08.0/00.0"},
			errSays: []string{"several namespaces (nvme2n1 nvme2n2)"}},
		{name: "lun never there", st: &agentproto.Storage{Driver: "virtio-scsi", Source: "09.0/00.0", ScsiAddress: "3:4"},
			wantErr: context.DeadlineExceeded, errSays: []string{"SCSI device 3:4", "host1 without it (devices: none)"}},
		{name: "lun not there", st: &agentproto.Storage{Driver: "virtio-scsi", Source: "05.0/00.0", ScsiAddress: "0:1"},
			wantErr: context.DeadlineExceeded, errSays: []string{"SCSI device 0:1", "devices: 0:0:0:0 0:0:1:2"}},
		{name: "no device node", st: &agentproto.Storage{Driver: "virtio-blk", Source: "0b.0/00.0"},
			wantErr: context.DeadlineExceeded, errSays: []string{"device node", "vdb (block 252:16)", "no such file"}},
		{name: "wrong device node", st: &agentproto.Storage{Driver: "virtio-blk", Source: "0c.0/00.0"},
			wantErr: context.DeadlineExceeded, errSays: []string{"vdc (block 252:32)", "device 252:48"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			sys, dev := diskFixture(t)
			var loaded []string
			f := diskFinder{sysRoot: sys, devRoot: dev, loadDriver: func(_ context.Context, dir string) error {
				rel, err := filepath.Rel(sys, dir)
				if err != nil || strings.HasPrefix(rel, "..") {
					t.Errorf("driver loaded for %s, outside sysfs", dir)
				}
				loaded = append(loaded, rel)
				return nil
			}}
			d, err := parseDisk(tc.st)
			if err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
			defer cancel()
			node, err := f.find(ctx, d)
			if tc.errSays != nil {
				if err == nil || tc.wantErr != nil && !errors.Is(err, tc.wantErr) {
					t.Fatalf("find = %q, %v; want an error %v", node, err, tc.wantErr)
				}
				for _, s := range tc.errSays {
					if !strings.Contains(err.Error(), s) {
						t.Errorf("error %q does not say %q", err, s)
					}
				}
				return
			}
			if err != nil || node != filepath.Join(dev, tc.want) {
				t.Fatalf("find = %q, %v; want %s", node, err, filepath.Join(dev, tc.want))
			}
			if tc.loaded != nil && !slices.Equal(loaded, tc.loaded) {
				t.Errorf("drivers loaded for %q, want %q", loaded, tc.loaded)
			}
		})
	}
}

// TestFindDiskHotPlug: the disk's devices appear only as their drivers
// bind, after the wait began, and a virtio-scsi LUN only once its host
// is asked to scan for it.
func TestFindDiskHotPlug(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("mknod of block device nodes needs root")
	}
	sys := sysfsTree(t, []string{"devices/pci0000:00/0000:00:05.0"}, nil, nil)
	dev := t.TempDir()
	ctrl := filepath.Join(sys, "devices/pci0000:00/0000:00:05.0/0000:03:00.0")
	host := filepath.Join(ctrl, "virtio3/host0")
	scan := filepath.Join(host, "scsi_host/host0/scan")
	lun := filepath.Join(host, "target0:0:1/0:0:1:2")
	// What each driver's binding makes appear.
	binds := map[string]func() error{
		ctrl: func() error { return os.MkdirAll(filepath.Dir(scan), 0o755) }, // virtio_pci: virtio3
		filepath.Join(ctrl, "virtio3"): func() error { // virtio_scsi: host0, its scan attribute
			return os.WriteFile(scan, nil, 0o644)
		},
		lun: func() error { // sd_mod: the disk
			if err := os.MkdirAll(filepath.Join(lun, "block/sdb"), 0o755); err != nil {
				return err
			}
			if err := unix.Mknod(filepath.Join(dev, "sdb"), unix.S_IFBLK|0o600, int(unix.Mkdev(8, 16))); err != nil {
				return err
			}
			return os.WriteFile(filepath.Join(lun, "block/sdb/dev"), []byte("8:16\n"), 0o644)
		},
	}
	f := diskFinder{sysRoot: sys, devRoot: dev, loadDriver: func(_ context.Context, dir string) error {
		bind, ok := binds[dir]
		if !ok {
			t.Errorf("driver loaded for %s", dir)
			return nil
		}
		return bind()
	}}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	// The host: plugs the controller, and adds the LUN when asked to scan.
	go func() {
		time.Sleep(20 * time.Millisecond)
		os.Mkdir(ctrl, 0o755)
		for ctx.Err() == nil {
			if b, _ := os.ReadFile(scan); string(b) == "0 1 2" {
				os.MkdirAll(lun, 0o755)
				return
			}
			time.Sleep(5 * time.Millisecond)
		}
	}()
	d, err := parseDisk(&agentproto.Storage{Driver: "virtio-scsi", Source: "05.0/00.0", ScsiAddress: "1:2"})
	if err != nil {
		t.Fatal(err)
	}
	node, err := f.find(ctx, d)
	if err != nil || node != filepath.Join(dev, "sdb") {
		t.Fatalf("find = %q, %v; want %s", node, err, filepath.Join(dev, "sdb"))
	}
}
