package e2e

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/colo-runtime/colo/shim/sandbox"
	"github.com/colo-runtime/colo/testbed"
)

// mountOf finds the mount at mountPoint in a /proc/PID/mountinfo and
// returns its filesystem type and source ("" if there is none).
func mountOf(mountinfo, mountPoint string) (fstype, source string) {
	for _, line := range strings.Split(mountinfo, "\n") {
		// id parent major:minor root mountpoint options [optional...] - fstype source superoptions
		f := strings.Fields(line)
		sep := slices.Index(f, "-")
		if len(f) < 5 || sep < 0 || len(f) < sep+3 || f[4] != mountPoint {
			continue
		}
		// The last one at a mount point is what is seen there.
		fstype, source = f[sep+1], f[sep+2]
	}
	return fstype, source
}

// checkGuestDisk fails the test unless the mount at mountPoint, as the
// container sees it, is fstype on a guest disk whose device name starts
// with one of prefixes.
func checkGuestDisk(t *testing.T, mountinfo, mountPoint, fstype string, prefixes ...string) {
	t.Helper()
	gotType, source := mountOf(mountinfo, mountPoint)
	if gotType != fstype || !slices.ContainsFunc(prefixes, func(p string) bool { return strings.HasPrefix(source, p) }) {
		t.Errorf("%s in the container is %s on %q, want %s on one of %q; mountinfo:\n%s", mountPoint, gotType, source, fstype, prefixes, mountinfo)
	}
}

// recordedDisks are the disks the sandbox in dir has recorded.
func recordedDisks(t *testing.T, dir string) []sandbox.DiskState {
	t.Helper()
	st, err := sandbox.ReadState(dir)
	if err != nil {
		t.Fatal(err)
	}
	return st.Disks
}

// checkNothingOnHost fails the test if a blockfile snapshot of the test
// bed is on a host loop device (mounted on the host, not only attached to
// the VM).
func checkNothingOnHost(t *testing.T) {
	t.Helper()
	if loops := testbed.LoopDevicesOf(cd.Dir); len(loops) > 0 {
		t.Errorf("the test bed's files are on host loop devices: %q", loops)
	}
}

// rootfsDevices are the guest devices a block rootfs may be: virtio-blk
// or virtio-scsi (storage.block_driver).
var rootfsDevices = []string{"/dev/vd", "/dev/sd"}

// TestBlockRootfs runs a container from containerd's blockfile snapshotter
// with ctr, with each storage.block_driver: its / is the snapshot's ext4
// image attached to the VM as a disk of that kind (nothing of it is
// mounted on the host), writes survive from one exec to the next, and its
// removal leaves nothing: no loop device, mount or disk record.
func TestBlockRootfs(t *testing.T) {
	for _, tc := range []struct{ driver, device string }{
		{"virtio-blk", "/dev/vd"},
		{"virtio-scsi", "/dev/sd"},
	} {
		t.Run(tc.driver, func(t *testing.T) {
			id := "block-rootfs-" + tc.driver
			checkNoLeaks(t, id)
			cfg := coloConfig(t, "[storage]\nblock_driver = \""+tc.driver+"\"\n")
			r := ctr(t, "run", "-d", "--snapshotter", testbed.BlockfileSnapshotter, "--runtime", testbed.Runtime,
				"--runtime-config-path", cfg, testbed.BusyboxImage, id, "sleep", "3600")
			if r.ExitCode != 0 {
				t.Fatalf("ctr run: %s", r)
			}
			inCtr := func(cmdline string) string {
				t.Helper()
				r := ctr(t, "task", "exec", "--exec-id", "disk", id, "sh", "-c", cmdline)
				if r.ExitCode != 0 {
					t.Fatalf("%s: %s", cmdline, r)
				}
				return r.Stdout
			}
			checkGuestDisk(t, inCtr("cat /proc/self/mountinfo"), "/", "ext4", tc.device)
			if got := inCtr("cat " + testbed.BusyboxMarker); got != "colo busybox test image\n" {
				t.Errorf("the image's marker reads %q", got)
			}
			inCtr("echo written-in-the-guest > /colo-block-test && sync")
			if got := inCtr("cat /colo-block-test"); got != "written-in-the-guest\n" {
				t.Errorf("a file written by one exec reads %q in the next", got)
			}
			checkNothingOnHost(t)
			disks := recordedDisks(t, sandboxDir(cd.Namespace, id))
			if len(disks) != 1 || disks[0].Container != id || !strings.HasPrefix(disks[0].Source, cd.Dir+"/") {
				t.Errorf("recorded disks %+v, want the container's snapshot", disks)
			}

			killAndRemoveTask(t, id)
			if r := ctr(t, "container", "rm", id); r.ExitCode != 0 {
				t.Fatalf("container rm: %s", r)
			}
			checkNothingOnHost(t)
		})
	}
}

// TestBlockRootfsCRI runs a pod through CRI with the blockfile handler:
// the pause container's and the app container's rootfs are disks of the
// pod's VM; an app container removed from the running pod takes its disk
// (hot-unplugged) and its record with it.
func TestBlockRootfsCRI(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), criTimeout)
	defer cancel()
	rs := criRuntime(t)
	p := runPod(ctx, t, rs, "block-rootfs", testbed.ColoBlockfileHandler)
	app := p.startWith(ctx, t, "app", func(c *runtimeapi.ContainerConfig) {
		c.Command = []string{"sh", "-c", `trap "exit 0" TERM; sleep 3600 & wait`}
	})
	mountinfo, errOut, code := execSync(ctx, t, rs, app, "cat", "/proc/self/mountinfo")
	if code != 0 {
		t.Fatalf("mountinfo: exit %d: %s", code, errOut)
	}
	checkGuestDisk(t, mountinfo, "/", "ext4", rootfsDevices...)
	if _, errOut, code := execSync(ctx, t, rs, app, "sh", "-c", "echo cri > /colo-block-test && sync"); code != 0 {
		t.Fatalf("write: exit %d: %s", code, errOut)
	}
	if out, errOut, code := execSync(ctx, t, rs, app, "cat", "/colo-block-test"); out != "cri\n" || code != 0 {
		t.Errorf("a file written by one exec reads %q (exit %d, %s) in the next", out, code, errOut)
	}
	checkNothingOnHost(t)
	dir := sandboxDir(testbed.CRINamespace, p.id)
	containers := func() []string {
		var ids []string
		for _, d := range recordedDisks(t, dir) {
			ids = append(ids, d.Container)
		}
		slices.Sort(ids)
		return ids
	}
	want := []string{p.id, app}
	slices.Sort(want)
	if got := containers(); !slices.Equal(got, want) {
		t.Errorf("disks recorded for containers %q, want the pause container's and the app's %q", got, want)
	}

	if err := rs.StopContainer(ctx, app, 30); err != nil {
		t.Fatal(err)
	}
	if err := rs.RemoveContainer(ctx, app); err != nil {
		t.Fatal(err)
	}
	if got := containers(); !slices.Equal(got, []string{p.id}) {
		t.Errorf("after the app's removal, disks recorded for %q, want the pause container's only", got)
	}
	// The pod goes on: another container starts in it.
	again := p.startWith(ctx, t, "again", func(c *runtimeapi.ContainerConfig) {
		c.Command = []string{"sh", "-c", `trap "exit 0" TERM; sleep 3600 & wait`}
	})
	if out, errOut, code := execSync(ctx, t, rs, again, "test", "-e", "/colo-block-test"); code == 0 {
		t.Errorf("a new container sees the removed one's file (%q %q): its rootfs is not its own", out, errOut)
	}
	checkNothingOnHost(t)
}

// diskImageWith makes an ext4 image file holding a file hello.txt.
func diskImageWith(t *testing.T, content string) string {
	t.Helper()
	dir := t.TempDir()
	files := filepath.Join(dir, "files")
	if err := os.Mkdir(files, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(files, "hello.txt"), []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
	img := filepath.Join(dir, "data.img")
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := testbed.MakeExt4Image(ctx, img, 16, files); err != nil {
		t.Fatal(err)
	}
	return img
}

// debugfsCat reads a file of an ext4 image without mounting it.
func debugfsCat(t *testing.T, img, name string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, "debugfs", "-R", "cat "+name, img).Output()
	if err != nil {
		t.Fatalf("debugfs %s: %v", img, err)
	}
	return string(out)
}

// TestPodDisks gives a container (its own pod) an ext4 image file as a
// disk with io.colo.disks: it sees the image's file at the path asked
// for, on an NVMe disk, and what it writes is in the image afterwards.
// Bad annotations fail the create with an error naming what is wrong, and
// leave nothing.
func TestPodDisks(t *testing.T) {
	allowedFor := func(img string) string {
		return fmt.Sprintf("[colocation]\nannotations = [\"io.colo.disks\"]\n\n[devices]\npci = [\"0000:45:00.0\"]\ndisk_paths = [%q]\n", filepath.Dir(img))
	}
	t.Run("image", func(t *testing.T) {
		const id = "pod-disk"
		checkNoLeaks(t, id)
		img := diskImageWith(t, "hello from the image\n")
		allowed := allowedFor(img)
		disks := `[{"source": "` + img + `", "path": "/data", "fstype": "ext4"}]`
		r := ctr(t, "run", "-d", "--runtime", testbed.Runtime, "--runtime-config-path", coloConfig(t, allowed),
			"--annotation", sandbox.DisksAnnotation+"="+disks, testbed.BusyboxImage, id, "sleep", "3600")
		if r.ExitCode != 0 {
			t.Fatalf("ctr run: %s", r)
		}
		inCtr := func(cmdline string) string {
			t.Helper()
			r := ctr(t, "task", "exec", "--exec-id", "disk", id, "sh", "-c", cmdline)
			if r.ExitCode != 0 {
				t.Fatalf("%s: %s", cmdline, r)
			}
			return r.Stdout
		}
		if got := inCtr("cat /data/hello.txt"); got != "hello from the image\n" {
			t.Errorf("/data/hello.txt reads %q", got)
		}
		checkGuestDisk(t, inCtr("cat /proc/self/mountinfo"), "/data", "ext4", "/dev/nvme")
		inCtr("echo written-by-the-pod > /data/out.txt && sync")
		if d := recordedDisks(t, sandboxDir(cd.Namespace, id)); len(d) != 1 || d[0].Source != img || d[0].Container != "" {
			t.Errorf("recorded disks %+v, want the pod's image", d)
		}
		killAndRemoveTask(t, id)
		if got := debugfsCat(t, img, "/out.txt"); got != "written-by-the-pod\n" {
			t.Errorf("the image holds %q in out.txt after the pod, want what the pod wrote", got)
		}
	})

	img := diskImageWith(t, "unused\n")
	allowed := allowedFor(img)
	other := diskImageWith(t, "not listed\n")
	for _, tc := range []struct {
		name, config, disks string
		want                []string
	}{
		{"not allowed", "", `[{"source": "` + img + `", "path": "/data", "fstype": "ext4"}]`,
			[]string{sandbox.DisksAnnotation, "not allowed on this node", "colocation.annotations"}},
		{"relative path", allowed, `[{"source": "` + img + `", "path": "data", "fstype": "ext4"}]`,
			[]string{sandbox.DisksAnnotation, `path "data"`, "absolute"}},
		{"missing source", allowed, `[{"source": "/nonexistent/disk.img", "path": "/data", "fstype": "ext4"}]`,
			[]string{sandbox.DisksAnnotation, "/nonexistent/disk.img", "no such file"}},
		{"path not listed", allowed, `[{"source": "` + other + `", "path": "/data", "fstype": "ext4"}]`,
			[]string{sandbox.DisksAnnotation, other, "devices.disk_paths"}},
		{"PCI not listed", allowed, `[{"source": "0000:46:00.0", "path": "/data", "fstype": "ext4"}]`,
			[]string{sandbox.DisksAnnotation, "0000:46:00.0", "devices.pci"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			id := "pod-disk-" + strings.ReplaceAll(tc.name, " ", "-")
			checkNoLeaks(t, id)
			flags := []string{"--runtime-config-path", coloConfig(t, tc.config), "--annotation", sandbox.DisksAnnotation + "=" + tc.disks}
			r := runColo(t, flags, id, "true")
			if r.ExitCode == 0 {
				t.Fatalf("ctr run succeeded, want an error: %s", r)
			}
			t.Logf("refused: %s", strings.TrimSpace(r.Stderr))
			for _, w := range tc.want {
				if !strings.Contains(r.Stderr, w) {
					t.Errorf("error lacks %q: %s", w, r.Stderr)
				}
			}
		})
	}
}

// killAndRemoveTask kills the task, waits until it is stopped and
// removes it.
func killAndRemoveTask(t *testing.T, id string) {
	t.Helper()
	if r := ctr(t, "task", "kill", "-s", "KILL", id); r.ExitCode != 0 {
		t.Fatalf("kill: %s", r)
	}
	waitStopped(t, id)
	if r := ctr(t, "task", "rm", id); r.ExitCode != 0 {
		t.Fatalf("task rm: %s", r)
	}
}
