package sandbox

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/colo-runtime/colo/agentproto"
	"github.com/colo-runtime/colo/config"
	"github.com/colo-runtime/colo/storage"
)

// diskImage makes an image file (its content does not matter to the fake
// VM) under dir.
func diskImage(t *testing.T, dir, name string) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, make([]byte, 4096), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// openedBySelf counts this process's open files of path.
func openedBySelf(t *testing.T, path string) int {
	t.Helper()
	fds, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, fd := range fds {
		if target, err := os.Readlink(filepath.Join("/proc/self/fd", fd.Name())); err == nil && target == path {
			n++
		}
	}
	return n
}

// blockMount is the rootfs mount containerd's blockfile snapshotter gives.
func blockMount(source string) []mount.Mount {
	return []mount.Mount{{Type: "ext4", Source: source, Options: []string{"rw", "loop"}}}
}

// TestBlockRootfs: a rootfs that is one filesystem on an image file is
// attached as a disk (recorded while attached), mounted by the agent at
// the container's guest path with the snapshotter's options less "loop",
// and detached, closed and forgotten when its container goes; the share
// holds nothing of it.
func TestBlockRootfs(t *testing.T) {
	for _, driver := range []string{"virtio-blk", "virtio-scsi"} {
		t.Run(driver, func(t *testing.T) {
			e := newEnv(t, false)
			ctx := context.Background()
			cfg := e.config("9p")
			cfg.Storage.BlockDriver = driver
			images := t.TempDir()
			img1, img2 := diskImage(t, images, "c1.img"), diskImage(t, images, "c2.img")
			cc := e.container("true")
			cc.Rootfs = blockMount(img1)
			sb, _, err := Create(ctx, e.options(cfg), cc)
			if err != nil {
				t.Fatal(err)
			}
			c2 := e.container("true")
			c2.ID, c2.Stdio = "c2", Stdio{}
			c2.Rootfs = []mount.Mount{{Type: "ext4", Source: img2, Options: []string{"ro", "loop", "noatime"}}}
			if _, err := sb.AddContainer(ctx, c2); err != nil {
				t.Fatal(err)
			}

			for _, tc := range []struct {
				id, img string
				opts    []string
				ro      bool
			}{{"c1", img1, []string{"rw"}, false}, {"c2", img2, []string{"ro", "noatime"}, true}} {
				st := e.drv.agent.containerStorages[tc.id]
				wantDriver := map[string]string{"virtio-blk": agentproto.StorageVirtioBlk, "virtio-scsi": agentproto.StorageVirtioSCSI}[driver]
				if len(st) != 1 || st[0].GetDriver() != wantDriver || st[0].GetFstype() != "ext4" ||
					!slices.Equal(st[0].GetOptions(), tc.opts) || st[0].GetMountPoint() != agentproto.BlockRootfsPath(tc.id) ||
					!strings.HasSuffix(st[0].GetSource(), ".0/00.0") || (driver == "virtio-scsi") != (st[0].GetScsiAddress() != "") {
					t.Errorf("%s: storages %v, want one %s disk with options %q at %s", tc.id, st, wantDriver, tc.opts, agentproto.BlockRootfsPath(tc.id))
				}
				if g := e.drv.agent.spec(tc.id); g.Root.Path != agentproto.BlockRootfsPath(tc.id) {
					t.Errorf("%s: guest root %s, want %s", tc.id, g.Root.Path, agentproto.BlockRootfsPath(tc.id))
				}
				if n := openedBySelf(t, tc.img); n != 1 {
					t.Errorf("%s: %s open %d times, want once", tc.id, tc.img, n)
				}
				if _, err := os.Stat(filepath.Join(sb.Dir(), storage.ShareMounts, tc.id, "rootfs")); !errors.Is(err, os.ErrNotExist) {
					t.Errorf("%s: a rootfs directory in the share: %v", tc.id, err)
				}
			}
			vm := e.drv.vms[0]
			if got, want := vm.diskLog(), []string{"add " + diskID("c1") + " " + driver + " ro=false", "add " + diskID("c2") + " " + driver + " ro=true"}; !slices.Equal(got, want) {
				t.Errorf("disks %q, want %q", got, want)
			}
			st, err := ReadState(sb.Dir())
			if err != nil {
				t.Fatal(err)
			}
			if want := []DiskState{{ID: diskID("c1"), Container: "c1", Source: img1}, {ID: diskID("c2"), Container: "c2", Source: img2}}; !slices.Equal(st.Disks, want) {
				t.Errorf("recorded disks %+v, want %+v", st.Disks, want)
			}

			if _, err := sb.DeleteContainer(ctx, "c2"); err != nil {
				t.Fatal(err)
			}
			if got := vm.diskLog(); got[len(got)-1] != "remove "+diskID("c2") {
				t.Errorf("after c2's delete, disks %q: want it removed", got)
			}
			if n := openedBySelf(t, img2); n != 0 {
				t.Errorf("%s open %d times after its container's delete", img2, n)
			}
			st, err = ReadState(sb.Dir())
			if err != nil {
				t.Fatal(err)
			}
			if want := []DiskState{{ID: diskID("c1"), Container: "c1", Source: img1}}; !slices.Equal(st.Disks, want) {
				t.Errorf("recorded disks after c2's delete %+v, want %+v", st.Disks, want)
			}
			if _, err := sb.DeleteContainer(ctx, "c1"); err != nil {
				t.Fatal(err)
			}
			if n := openedBySelf(t, img1); n != 0 {
				t.Errorf("%s open %d times after the sandbox went", img1, n)
			}
		})
	}
}

// TestBlockRootfsRecordedFirst: the disk is in the record before the VM
// is asked to attach it.
func TestBlockRootfsRecordedFirst(t *testing.T) {
	e := newEnv(t, false)
	ctx := context.Background()
	cc := e.container("true")
	cc.Rootfs = blockMount(diskImage(t, t.TempDir(), "c1.img"))
	var recordedBeforeAttach bool
	stateWritten = func(st State) {
		if len(st.Disks) == 1 && len(e.drv.vms) == 1 && len(e.drv.vms[0].diskLog()) == 0 {
			recordedBeforeAttach = true
		}
	}
	t.Cleanup(func() { stateWritten = nil })
	sb, _, err := Create(ctx, e.options(e.config("9p")), cc)
	if err != nil {
		t.Fatal(err)
	}
	if !recordedBeforeAttach {
		t.Error("the disk was not recorded before it was attached")
	}
	if _, err := sb.DeleteContainer(ctx, "c1"); err != nil {
		t.Fatal(err)
	}
}

// TestBlockRootfsAttachFails: a disk the VM does not take fails the
// create, naming the container, and leaves nothing: no record, no open
// file, no sandbox (Create) or container (AddContainer).
func TestBlockRootfsAttachFails(t *testing.T) {
	e := newEnv(t, false)
	ctx := context.Background()
	images := t.TempDir()
	img := diskImage(t, images, "c1.img")
	e.drv.addDiskErr = errors.New("no free hot-plug port")
	cc := e.container("true")
	cc.Rootfs = blockMount(img)
	if _, _, err := Create(ctx, e.options(e.config("9p")), cc); err == nil || !strings.Contains(err.Error(), "rootfs of container c1") || !strings.Contains(err.Error(), "no free hot-plug port") {
		t.Errorf("Create with a disk the VM refuses: %v", err)
	}
	if n := openedBySelf(t, img); n != 0 {
		t.Errorf("%s open %d times after the failed create", img, n)
	}

	// A sandbox that runs, and a second container whose disk fails.
	e.drv.addDiskErr = nil
	sb, _, err := Create(ctx, e.options(e.config("9p")), e.container("true"))
	if err != nil {
		t.Fatal(err)
	}
	e.drv.vms[len(e.drv.vms)-1].mu.Lock()
	e.drv.vms[len(e.drv.vms)-1].addDiskErr = errors.New("no free hot-plug port")
	e.drv.vms[len(e.drv.vms)-1].mu.Unlock()
	c2 := e.container("true")
	c2.ID, c2.Stdio, c2.Rootfs = "c2", Stdio{}, blockMount(img)
	if _, err := sb.AddContainer(ctx, c2); err == nil || !strings.Contains(err.Error(), "no free hot-plug port") {
		t.Errorf("AddContainer with a disk the VM refuses: %v", err)
	}
	if n := openedBySelf(t, img); n != 0 {
		t.Errorf("%s open %d times after the failed AddContainer", img, n)
	}
	st, err := ReadState(sb.Dir())
	if err != nil {
		t.Fatal(err)
	}
	if len(st.Disks) != 0 || slices.ContainsFunc(st.Containers, func(c ContainerState) bool { return c.ID == "c2" }) {
		t.Errorf("record after the failed AddContainer: disks %+v, containers %+v", st.Disks, st.Containers)
	}
	if _, err := sb.Container("c2"); !errdefs.IsNotFound(err) {
		t.Errorf("c2 after its failed create: %v", err)
	}
	if _, err := sb.DeleteContainer(ctx, "c1"); err != nil {
		t.Fatal(err)
	}
}

// TestBlockRootfsOf: which rootfs mounts become a disk, and why the others
// do not.
func TestBlockRootfsOf(t *testing.T) {
	dir := t.TempDir()
	img := diskImage(t, dir, "img")
	q35 := config.Default()
	off := config.Default()
	off.Storage.BlockRootfs = false
	microvm := config.Default()
	microvm.Hypervisor.Machine = "microvm"
	for _, tc := range []struct {
		name   string
		cfg    config.Config
		mounts []mount.Mount
		why    string // "" for a disk
	}{
		{"blockfile", q35, blockMount(img), ""},
		{"device-mapper", q35, []mount.Mount{{Type: "xfs", Source: "/dev/loop0"}}, ""},
		{"overlay", q35, []mount.Mount{{Type: "overlay", Source: "overlay", Options: []string{"lowerdir=/a"}}}, "a overlay mount"},
		{"bind", q35, []mount.Mount{{Type: "bind", Source: dir, Options: []string{"rbind"}}}, "a bind mount"},
		{"bind option", q35, []mount.Mount{{Type: "none", Source: dir, Options: []string{"bind"}}}, "a bind mount"},
		{"two", q35, append(blockMount(img), blockMount(img)...), "2 rootfs mounts, not one"},
		{"directory", q35, []mount.Mount{{Type: "ext4", Source: dir}}, "neither a block device nor a regular file"},
		{"character device", q35, []mount.Mount{{Type: "ext4", Source: "/dev/null"}}, "neither a block device nor a regular file"},
		{"missing", q35, []mount.Mount{{Type: "ext4", Source: filepath.Join(dir, "none")}}, "no such file"},
		{"off", off, blockMount(img), "storage.block_rootfs is off"},
		{"microvm", microvm, blockMount(img), "hypervisor.machine microvm cannot hot-plug disks"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.name == "device-mapper" {
				if fi, err := os.Stat("/dev/loop0"); err != nil || fi.Mode()&os.ModeDevice == 0 {
					t.Skip("no /dev/loop0 block device")
				}
			}
			s := &Sandbox{cfg: tc.cfg}
			m, why := s.blockRootfsOf(tc.mounts)
			switch {
			case tc.why == "" && (m == nil || m.Source != tc.mounts[0].Source):
				t.Errorf("not a disk (%s), want one", why)
			case tc.why != "" && (m != nil || !strings.Contains(why, tc.why)):
				t.Errorf("disk %v, why %q; want none because %q", m, why, tc.why)
			}
		})
	}
}

// TestParsePodDisks: the pod's disk annotation is checked before anything
// is made, each error naming what is wrong.
func TestParsePodDisks(t *testing.T) {
	dir := t.TempDir()
	img := diskImage(t, dir, "data.img")
	allowed := config.Default()
	allowed.Colocation.Annotations = []string{DisksAnnotation}
	allowed.Devices.PCI = []string{"0000:45:00.0"}
	allowed.Devices.DiskPaths = []string{dir, "/dev/null"}
	outside := diskImage(t, t.TempDir(), "outside.img")
	if err := os.Symlink(outside, filepath.Join(dir, "link.img")); err != nil {
		t.Fatal(err)
	}
	microvm := allowed
	microvm.Hypervisor.Machine = "microvm"
	disk := func(source, path, fstype string) string {
		return `[{"source": "` + source + `", "path": "` + path + `", "fstype": "` + fstype + `"}]`
	}
	for _, tc := range []struct {
		name  string
		cfg   config.Config
		value string
		err   string // "" for valid
	}{
		{"file", allowed, disk(img, "/data", "ext4"), ""},
		{"read-only", allowed, `[{"source": "` + img + `", "path": "/data", "fstype": "ext4", "readonly": true}]`, ""},
		{"listed PCI", allowed, disk("0000:45:00.0", "/data", "ext4"), ""},
		{"none", allowed, `[]`, ""},
		{"not allowed", config.Default(), disk(img, "/data", "ext4"), "not allowed on this node (colocation.annotations)"},
		{"not JSON", allowed, `{source: x}`, "want a JSON list"},
		{"unknown field", allowed, `[{"source": "` + img + `", "path": "/data", "fstype": "ext4", "mode": "rw"}]`, `unknown field "mode"`},
		{"trailing", allowed, disk(img, "/data", "ext4") + "[]", "found more after it"},
		{"relative path", allowed, disk(img, "data", "ext4"), `disk 0: path "data": want an absolute, clean path`},
		{"unclean path", allowed, disk(img, "/data/../etc", "ext4"), `path "/data/../etc": want an absolute, clean path`},
		{"root path", allowed, disk(img, "/", "ext4"), `path "/": want an absolute, clean path other than /`},
		{"no path", allowed, disk(img, "", "ext4"), "disk 0: no path"},
		{"no fstype", allowed, disk(img, "/data", ""), "disk 0: no fstype"},
		{"odd fstype", allowed, disk(img, "/data", "ext4,ro"), `fstype "ext4,ro"`},
		{"no source", allowed, disk("", "/data", "ext4"), "disk 0: no source"},
		{"relative source", allowed, disk("data.img", "/data", "ext4"), `source "data.img": want an absolute, clean host path or a PCI address`},
		{"missing source", allowed, disk(filepath.Join(dir, "none.img"), "/data", "ext4"), "none.img: no such file or directory"},
		{"directory source", allowed, disk(dir, "/data", "ext4"), "neither a block device nor a regular file"},
		{"character device", allowed, disk("/dev/null", "/data", "ext4"), "/dev/null: neither a block device nor a regular file"},
		{"unlisted file", allowed, disk(outside, "/data", "ext4"), "outside.img: not listed in devices.disk_paths"},
		{"symlink out of the listed directory", allowed, disk(filepath.Join(dir, "link.img"), "/data", "ext4"), "outside.img: not listed in devices.disk_paths"},
		{"unlisted PCI", allowed, disk("0000:46:00.0", "/data", "ext4"), "source 0000:46:00.0: PCI device not listed in devices.pci"},
		{"same path", allowed, `[{"source": "` + img + `", "path": "/data", "fstype": "ext4"}, {"source": "0000:45:00.0", "path": "/data", "fstype": "ext4"}]`, "disk 1: path /data: another disk has it"},
		{"same source", allowed, `[{"source": "` + img + `", "path": "/a", "fstype": "ext4"}, {"source": "` + img + `", "path": "/b", "fstype": "ext4"}]`, "another disk has it"},
		{"microvm", microvm, disk(img, "/data", "ext4"), "hypervisor.machine microvm cannot: use q35"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d, err := parsePodDisks(tc.cfg, map[string]string{DisksAnnotation: tc.value})
			if tc.err == "" {
				if err != nil {
					t.Fatalf("valid annotation refused: %v", err)
				}
				if d.value != tc.value {
					t.Errorf("value %q, want %q", d.value, tc.value)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.err) || !strings.Contains(err.Error(), DisksAnnotation) {
				t.Fatalf("error %v, want one naming %s with %q", err, DisksAnnotation, tc.err)
			}
			if !errdefs.IsInvalidArgument(err) && !errdefs.IsNotImplemented(err) {
				t.Errorf("error %v is neither an invalid argument nor not implemented", err)
			}
		})
	}
	if d, err := parsePodDisks(config.Default(), nil); err != nil || len(d.disks) != 0 {
		t.Errorf("no annotation: %+v, %v", d, err)
	}
}

// TestPodDisks: a pod's image file is attached as an NVMe disk when the
// sandbox is made, mounted by the agent with the sandbox, and bound where
// asked into each container that carries the annotation; a container
// with another value is refused; the file is closed when the sandbox
// goes. A PCI address this host lacks fails and leaves nothing.
func TestPodDisks(t *testing.T) {
	e := newEnv(t, false)
	ctx := context.Background()
	cfg := e.config("9p")
	cfg.Colocation.Annotations = []string{DisksAnnotation}
	cfg.Devices.PCI = []string{"0000:45:00.0"}
	img := diskImage(t, t.TempDir(), "data.img")
	cfg.Devices.DiskPaths = []string{filepath.Dir(img)}
	value := `[{"source": "` + img + `", "path": "/data", "fstype": "ext4", "readonly": true}]`
	cc := e.container("true")
	cc.Spec.Annotations = map[string]string{DisksAnnotation: value}
	sb, _, err := Create(ctx, e.options(cfg), cc)
	if err != nil {
		t.Fatal(err)
	}
	var disk *agentproto.Storage
	for _, st := range e.drv.agent.storages {
		if st.GetMountPoint() == agentproto.PodDiskPath(0) {
			disk = st
		}
	}
	if disk == nil || disk.GetDriver() != agentproto.StorageNVMe || disk.GetFstype() != "ext4" || !slices.Equal(disk.GetOptions(), []string{"ro"}) || disk.GetSource() == "" {
		t.Errorf("sandbox storages %v, want a read-only nvme ext4 disk at %s", e.drv.agent.storages, agentproto.PodDiskPath(0))
	}
	if got, want := e.drv.vms[0].diskLog(), []string{"add disk-0 nvme ro=true"}; !slices.Equal(got, want) {
		t.Errorf("disks %q, want %q", got, want)
	}
	wantBind := specs.Mount{Destination: "/data", Type: "bind", Source: agentproto.PodDiskPath(0), Options: []string{"rbind", "rprivate", "ro"}}
	if g := e.drv.agent.spec("c1"); !slices.ContainsFunc(g.Mounts, func(m specs.Mount) bool {
		return m.Destination == wantBind.Destination && m.Source == wantBind.Source && slices.Equal(m.Options, wantBind.Options)
	}) {
		t.Errorf("guest mounts %+v, want %+v", g.Mounts, wantBind)
	}
	st, err := ReadState(sb.Dir())
	if err != nil {
		t.Fatal(err)
	}
	if want := []DiskState{{ID: "disk-0", Source: img}}; !slices.Equal(st.Disks, want) {
		t.Errorf("recorded disks %+v, want %+v", st.Disks, want)
	}

	// A container without the annotation has no bind; one with another
	// value is refused.
	plain := e.container("true")
	plain.ID, plain.Stdio = "plain", Stdio{}
	if _, err := sb.AddContainer(ctx, plain); err != nil {
		t.Fatal(err)
	}
	if g := e.drv.agent.spec("plain"); slices.ContainsFunc(g.Mounts, func(m specs.Mount) bool { return m.Destination == "/data" }) {
		t.Errorf("a container without %s got the disk: %+v", DisksAnnotation, g.Mounts)
	}
	other := e.container("true")
	other.ID, other.Stdio = "other", Stdio{}
	other.Spec.Annotations = map[string]string{DisksAnnotation: `[]`}
	if _, err := sb.AddContainer(ctx, other); !errdefs.IsInvalidArgument(err) || !strings.Contains(err.Error(), "must be its pod's") {
		t.Errorf("a container with other disks: %v, want an invalid argument", err)
	}
	if _, err := sb.DeleteContainer(ctx, "plain"); err != nil {
		t.Fatal(err)
	}
	if n := openedBySelf(t, img); n != 1 {
		t.Errorf("%s open %d times while the pod runs, want once", img, n)
	}
	if _, err := sb.DeleteContainer(ctx, "c1"); err != nil {
		t.Fatal(err)
	}
	if n := openedBySelf(t, img); n != 0 {
		t.Errorf("%s open %d times after the sandbox went", img, n)
	}

	// A PCI disk this host does not have (VFIO, vfio.go): refused,
	// naming it (vfio_test.go passes one through on a fake sysfs).
	pci := e.container("true")
	pci.Spec.Annotations = map[string]string{DisksAnnotation: `[{"source": "0000:45:00.0", "path": "/data", "fstype": "ext4"}]`}
	if _, _, err := Create(ctx, e.options(cfg), pci); err == nil || !strings.Contains(err.Error(), "no PCI device 0000:45:00.0 on this host") {
		t.Errorf("Create with a PCI disk this host lacks: %v, want an error naming the device", err)
	}
}

// TestPodDisksNotAllowed: a pod asking for disks on a node that does not
// allow the annotation is refused before anything is made.
func TestPodDisksNotAllowed(t *testing.T) {
	e := newEnv(t, false)
	cc := e.container("true")
	cc.Spec.Annotations = map[string]string{DisksAnnotation: `[{"source": "/dev/null", "path": "/data", "fstype": "ext4"}]`}
	_, _, err := Create(context.Background(), e.options(e.config("9p")), cc)
	if !errdefs.IsInvalidArgument(err) || !strings.Contains(err.Error(), "not allowed on this node") {
		t.Errorf("Create: %v, want an invalid argument naming the allow-list", err)
	}
	if len(e.drv.vms) != 0 {
		t.Errorf("%d VMs started for a refused pod", len(e.drv.vms))
	}
}
