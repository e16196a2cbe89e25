package e2e

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/moby/sys/mountinfo"
	"golang.org/x/sys/unix"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// sharedVolume returns a temporary directory that is its own shared mount
// point, as kubelet's /var/lib/kubelet is: CRI refuses Bidirectional and
// HostToContainer volumes whose host path is on a private mount. What is
// mounted below it (runc's containers propagate their mounts there) goes
// with it at cleanup.
func sharedVolume(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	if err := unix.Mount(dir, dir, "", unix.MS_BIND, ""); err != nil {
		t.Fatalf("bind %s onto itself: %v", dir, err)
	}
	// Registered after TempDir's: runs before the directory is removed.
	t.Cleanup(func() {
		if err := unix.Unmount(dir, unix.MNT_DETACH); err != nil {
			t.Errorf("unmount the volume: %v", err)
		}
	})
	if err := unix.Mount("", dir, "", unix.MS_SHARED, ""); err != nil {
		t.Fatalf("make %s shared: %v", dir, err)
	}
	return dir
}

// hostMounted tells whether something is mounted at path on the host.
func hostMounted(t *testing.T, path string) bool {
	t.Helper()
	mounts, err := mountinfo.GetMounts(mountinfo.SingleEntryFilter(path))
	if err != nil {
		t.Fatal(err)
	}
	return len(mounts) > 0
}

// TestMountPropagation: in a pod whose containers share a volume, a mount
// that a privileged container with a Bidirectional volume makes below it
// appears in a container whose volume is HostToContainer or Bidirectional,
// and not in one whose volume is private, on colo as on runc. What colo
// cannot do is cross the VM: the container's mount does not reach the host
// (docs/kubernetes.md).
func TestMountPropagation(t *testing.T) {
	for _, h := range criHandlers {
		t.Run(h.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), criTimeout)
			defer cancel()
			rs := criRuntime(t)
			volume := sharedVolume(t)
			p := runPod(ctx, t, rs, "propagation-"+h.name, h.handler, privileged)

			start := func(name string, prop runtimeapi.MountPropagation, privileged bool) string {
				return p.startWith(ctx, t, name, func(c *runtimeapi.ContainerConfig) {
					c.Command = []string{"sh", "-c", `trap "exit 0" TERM; sleep 3600 & wait`}
					c.Mounts = []*runtimeapi.Mount{{ContainerPath: "/data", HostPath: volume, Propagation: prop}}
					c.Linux.SecurityContext.Privileged = privileged
				})
			}
			// Kubernetes lets only a privileged container have a
			// Bidirectional volume.
			mounter := start("mounter", runtimeapi.MountPropagation_PROPAGATION_BIDIRECTIONAL, true)
			slave := start("slave", runtimeapi.MountPropagation_PROPAGATION_HOST_TO_CONTAINER, false)
			peer := start("peer", runtimeapi.MountPropagation_PROPAGATION_BIDIRECTIONAL, true)
			private := start("private", runtimeapi.MountPropagation_PROPAGATION_PRIVATE, false)

			if out, errOut, code := execSync(ctx, t, rs, mounter, "sh", "-c",
				"mkdir -p /data/sub && mount -t tmpfs -o size=1m propagated /data/sub && echo hello-mount >/data/sub/f"); code != 0 {
				t.Fatalf("mounting a tmpfs below the volume in the mounter: %q, stderr %q, exit %d", out, errOut, code)
			}

			// The mount itself arrives, not only the directory: its file
			// and its entry (source "propagated") in the mount table.
			for name, id := range map[string]string{"slave (HostToContainer)": slave, "peer (Bidirectional)": peer} {
				out, errOut, code := execSync(ctx, t, rs, id, "sh", "-c", "cat /data/sub/f && grep -c ' /data/sub .* propagated ' /proc/self/mountinfo")
				if code != 0 || out != "hello-mount\n1\n" {
					t.Errorf("%s: reading the mounter's tmpfs: %q, stderr %q, exit %d; want its file and one mount at /data/sub", name, out, errOut, code)
				}
			}
			out, errOut, code := execSync(ctx, t, rs, private, "sh", "-c", "ls -A /data/sub; grep -c ' /data/sub ' /proc/self/mountinfo")
			if out != "0\n" {
				t.Errorf("private: /data/sub and the mounts there: %q, stderr %q, exit %d; want an empty directory and no mount", out, errOut, code)
			}

			// Container to host: runc's mount reaches the host through
			// the shared volume; colo's stays in the VM.
			sub := filepath.Join(volume, "sub")
			_, statErr := os.Stat(filepath.Join(sub, "f"))
			switch {
			case !h.vm && (!hostMounted(t, sub) || statErr != nil):
				t.Errorf("runc: the mount did not reach the host (mounted: %v, file: %v)", hostMounted(t, sub), statErr)
			case h.vm && (hostMounted(t, sub) || statErr == nil):
				t.Errorf("%s: the guest's mount reached the host (mounted: %v, file: %v)", h.name, hostMounted(t, sub), statErr)
			}

			// The mounter's unmount propagates too.
			// busybox's umount applet has no link in the image.
			if out, errOut, code := execSync(ctx, t, rs, mounter, "busybox", "umount", "/data/sub"); code != 0 {
				t.Fatalf("unmounting in the mounter: %q, stderr %q, exit %d", out, errOut, code)
			}
			out, errOut, code = execSync(ctx, t, rs, slave, "sh", "-c", "ls -A /data/sub; grep -c ' /data/sub ' /proc/self/mountinfo")
			if strings.TrimSpace(out) != "0" {
				t.Errorf("slave after the unmount: %q, stderr %q, exit %d; want no mount at /data/sub", out, errOut, code)
			}
		})
	}
}
