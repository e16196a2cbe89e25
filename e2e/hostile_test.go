package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/colo-runtime/colo/agentproto"
	"github.com/colo-runtime/colo/storage"
	"github.com/colo-runtime/colo/testbed"
)

// hostileTimeout bounds the hostile-guest test: a pod of three containers,
// a Go build, the attacks (a bounded fill through 9p under TCG) and the
// removals.
const hostileTimeout = 8 * time.Minute

// hostileFillBytes bounds what the fill attack writes into the share's
// root, so that a writable share cannot fill the host's disk.
const hostileFillBytes = 64 << 20

// hostileConfig is testdata/hostile's config.json (its Config).
type hostileConfig struct {
	Share         string `json:"share"`
	Victim        string `json:"victim"`
	VictimVolume  string `json:"victimVolume"`
	VolumeFile    string `json:"volumeFile"`
	VolumeContent string `json:"volumeContent"`
	CanaryDir     string `json:"canaryDir"`
	CanaryVolume  string `json:"canaryVolume"`
	CanaryFile    string `json:"canaryFile"`
	FillBytes     int64  `json:"fillBytes"`
}

// hostileReport is testdata/hostile's report.json (its Report).
type hostileReport struct {
	UID            int                  `json:"uid"`
	EUID           int                  `json:"euid"`
	Namespaces     map[string][2]string `json:"namespaces"`
	InitNamespaces bool                 `json:"initNamespaces"`
	Self           string               `json:"self"`
	Attacker       string               `json:"attacker"`
	Attacks        []struct {
		Name  string `json:"name"`
		Op    string `json:"op"`
		Errno string `json:"errno"`
		Err   string `json:"err"`
	} `json:"attacks"`
	Error    string `json:"error"`
	TimedOut bool   `json:"timedOut"`
}

// hostileAttempts are the helper's attempts and the results that mean the
// host held: "" is success (the controls: what the guest may do). Every
// one must be in the report, so that a lost helper cannot pass.
var hostileAttempts = []struct {
	name string
	want []string
}{
	{"control-read-victim-volume", []string{""}},
	{"control-create-in-own-rootfs", []string{""}},
	// Only rootfs mounts and writable volumes are writable in the share:
	// its root and the containers' directories are read-only (issue 9).
	{"create-at-share-root", []string{"EROFS"}},
	{"create-in-victim-dir", []string{"EROFS"}},
	{"create-in-victim-mounts", []string{"EROFS"}},
	{"create-in-own-dir", []string{"EROFS"}},
	{"mkdir-at-share-root", []string{"EROFS"}},
	{"fill-share-root", []string{"EROFS"}},
	{"symlink-slash-at-share-root", []string{"EROFS"}},
	// Across host mounts a link is EXDEV whatever the share allows.
	{"hardlink-volume-to-share-root", []string{"EROFS", "EXDEV"}},
	{"hardlink-volume-to-own-rootfs", []string{"EXDEV"}},
	// The guest resolves a host path in its own namespace: not there.
	{"hardlink-host-file-to-own-rootfs", []string{"ENOENT", "EXDEV", "EROFS"}},
	// A volume is a mount point (EBUSY on the host) or a directory the
	// guest sees exists (EEXIST before the host is asked).
	{"replace-volume-rename", []string{"EROFS", "EBUSY"}},
	{"replace-volume-rmdir", []string{"EROFS", "EBUSY"}},
	{"replace-volume-unlink", []string{"EROFS", "EISDIR", "EBUSY"}},
	{"replace-volume-symlink", []string{"EROFS", "EEXIST"}},
	{"replace-mounts-rename", []string{"EROFS", "EBUSY"}},
	{"replace-mounts-mkdir", []string{"EROFS", "EEXIST"}},
	{"replace-mounts-symlink", []string{"EROFS", "EEXIST"}},
	{"rename-victim-dir", []string{"EROFS", "EBUSY"}},
	// The helper skips this one (SKIPPED, a failure here) where the victim's
	// directory was renamed away in a writable share: a vulnerable host
	// would unmount and delete /.
	{"symlink-slash-for-victim-dir", []string{"EROFS", "EEXIST"}},
	{"symlink-host-dir-for-victim-dir", []string{"EROFS", "EEXIST"}},
}

// TestHostileGuest is issue 9 (Kata's CVE-2020-2026 class): a privileged
// container becomes root in the guest's initial namespaces (its volume
// holds a static helper that it makes the guest kernel's core_pattern
// helper), where the pod's shared directory is mounted, and attacks the
// host through it: it renames another container's directory and puts a
// symlink to a host directory in its place, plants symlinks to /, fills
// the share's root, replaces a volume by a symlink, hard-links files. Then
// the victim container and the pod are removed: every host path outside
// the pod's state is unchanged, by content, and nothing is left behind.
// The files it tries to create where the share must be read-only fail
// with EROFS.
func TestHostileGuest(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), hostileTimeout)
	defer cancel()
	tools := buildHostile(ctx, t)
	c := newCanaries(t)
	before := c.snapshot(t)
	mountsBefore := c.mounts(t)

	rs := criRuntime(t)
	p := runPod(ctx, t, rs, "hostile", testbed.ColoHandler, privileged)
	// The victim: an ordinary container with a read-only volume.
	victim := startPodContainer(ctx, t, p, "victim", false, &runtimeapi.Mount{
		ContainerPath: "/victim-ro", HostPath: c.victimVolume, Readonly: true,
	})
	cfg := hostileConfig{
		Share:         agentproto.SharedMountPoint,
		Victim:        victim,
		VictimVolume:  "-victim-ro",
		VolumeFile:    "secret",
		VolumeContent: canaryContent("victim-ro/secret"),
		CanaryDir:     c.dir,
		CanaryVolume:  c.volume,
		CanaryFile:    c.file,
		FillBytes:     hostileFillBytes,
	}
	b, err := json.Marshal(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(tools, "config.json"), b, 0o644); err != nil {
		t.Fatal(err)
	}
	// The attacker: privileged, with the helper in a writable volume at a
	// short path (core_pattern keeps 127 bytes).
	attacker := startPodContainer(ctx, t, p, "attacker", true, &runtimeapi.Mount{
		ContainerPath: "/h", HostPath: tools,
	})

	stdout, stderr, err := rs.ExecSync(ctx, attacker, []string{"/h/hostile", "trigger", "/h"}, 4*time.Minute)
	t.Logf("hostile trigger: %v\nstdout:\n%s\nstderr:\n%s", err, stdout, stderr)
	if log, err := os.ReadFile(filepath.Join(tools, "hostile.log")); err == nil {
		t.Logf("helper log:\n%s", log)
	}
	rep := readHostileReport(t, tools)
	checkHostileReport(t, rep, attacker)
	c.check(t, "after the attacks", before, mountsBefore)

	// Removing the victim is where a host that follows the guest's
	// symlinks unmounts and deletes what they lead to.
	if err := rs.StopContainer(ctx, victim, 10); err != nil {
		t.Errorf("StopContainer victim: %v", err)
	}
	if err := rs.RemoveContainer(ctx, victim); err != nil {
		t.Errorf("RemoveContainer victim: %v", err)
	}
	c.check(t, "after removing the victim", before, mountsBefore)

	// Then the pod (stopped, then removed, as kubelet does); p's cleanup
	// then checks that nothing of it is left (checkCRILeaks).
	removePods(ctx, t, rs, p.uid)
	c.check(t, "after removing the pod", before, mountsBefore)
}

// buildHostile builds testdata/hostile, static (the guest has no libc),
// into a new directory for the attacker's volume.
func buildHostile(ctx context.Context, t *testing.T) string {
	t.Helper()
	root, err := testbed.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	tools := t.TempDir()
	build := exec.CommandContext(ctx, "go", "build", "-o", filepath.Join(tools, "hostile"), filepath.Join(root, "e2e", "testdata", "hostile"))
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build hostile: %v: %s", err, out)
	}
	return tools
}

// privileged makes a pod sandbox privileged, which CRI requires for a
// privileged container in it.
func privileged(c *runtimeapi.PodSandboxConfig) {
	c.Linux.SecurityContext.Privileged = true
}

// startPodContainer creates and starts a busybox container in p that waits
// for SIGTERM, with one volume, privileged or not.
func startPodContainer(ctx context.Context, t *testing.T, p *pod, name string, privileged bool, volume *runtimeapi.Mount) string {
	t.Helper()
	volume.Propagation = runtimeapi.MountPropagation_PROPAGATION_PRIVATE
	return p.startWith(ctx, t, name, func(c *runtimeapi.ContainerConfig) {
		c.Command = []string{"sh", "-c", `trap "exit 0" TERM; sleep 3600 & wait`}
		c.Mounts = []*runtimeapi.Mount{volume}
		c.Linux.SecurityContext.Privileged = privileged
	})
}

// readHostileReport reads the helper's report from the attacker's volume.
func readHostileReport(t *testing.T, tools string) hostileReport {
	t.Helper()
	var rep hostileReport
	b, err := os.ReadFile(filepath.Join(tools, "report.json"))
	if err != nil {
		t.Fatalf("the core_pattern helper wrote no report (it did not run as guest root): %v", err)
	}
	if err := json.Unmarshal(b, &rep); err != nil {
		t.Fatalf("report.json: %v\n%s", err, b)
	}
	t.Logf("report.json:\n%s", b)
	return rep
}

// checkHostileReport checks that the helper ran as root in the guest's
// initial namespaces, below the attacker's directory, made every attempt,
// and that each ended as the host holding requires.
func checkHostileReport(t *testing.T, rep hostileReport, attacker string) {
	t.Helper()
	if rep.UID != 0 || rep.EUID != 0 || !rep.InitNamespaces || len(rep.Namespaces) == 0 {
		t.Fatalf("the helper ran as uid %d (euid %d) in namespaces %v (initial: %v); want root in the guest's initial namespaces",
			rep.UID, rep.EUID, rep.Namespaces, rep.InitNamespaces)
	}
	if rep.Attacker != attacker {
		t.Errorf("the helper ran from container %q's volume, want the attacker %s", rep.Attacker, attacker)
	}
	if rep.Error != "" || rep.TimedOut {
		t.Errorf("the helper did not finish: error %q, timed out %v", rep.Error, rep.TimedOut)
	}
	got := map[string]int{}
	for i, a := range rep.Attacks {
		got[a.Name] = i
	}
	for _, w := range hostileAttempts {
		i, ok := got[w.name]
		if !ok {
			t.Errorf("%s: not attempted", w.name)
			continue
		}
		a := rep.Attacks[i]
		if slices.Contains(w.want, a.Errno) {
			continue
		}
		switch {
		case a.Errno == "":
			t.Errorf("%s: %s: succeeded from the guest; want %s", a.Name, a.Op, strings.Join(w.want, " or "))
		case slices.Equal(w.want, []string{""}):
			t.Errorf("%s: %s: %s (%s); want success (control)", a.Name, a.Op, a.Errno, a.Err)
		default:
			t.Errorf("%s: %s: %s (%s); want %s", a.Name, a.Op, a.Errno, a.Err, strings.Join(w.want, " or "))
		}
	}
	known := map[string]bool{}
	for _, w := range hostileAttempts {
		known[w.name] = true
	}
	for _, a := range rep.Attacks {
		if !known[a.Name] {
			t.Errorf("the helper reported %s, which the test does not know", a.Name)
		}
	}
}

// canaries are host paths outside the pod's state that the guest names
// (symlinks to them), all under base: none of them may change.
type canaries struct {
	base string
	// dir is what the victim's directory is replaced by a symlink to; a
	// tmpfs is mounted at dirMount below it, so that a host unmounting
	// what the symlink leads to shows.
	dir, dirMount string
	// volume is what the victim's volume is replaced by a symlink to.
	volume string
	// file is a host file the guest tries to hard-link by its host path.
	file string
	// victimVolume is the victim's read-only volume.
	victimVolume string
}

// canaryContent is the content of the canary file at rel.
func canaryContent(rel string) string { return "canary " + rel + ": the host must keep this\n" }

func newCanaries(t *testing.T) *canaries {
	t.Helper()
	base, err := filepath.EvalSymlinks(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	c := &canaries{
		base:         base,
		dir:          filepath.Join(base, "canary-dir"),
		dirMount:     filepath.Join(base, "canary-dir", "mnt"),
		volume:       filepath.Join(base, "canary-volume"),
		file:         filepath.Join(base, "canary-file"),
		victimVolume: filepath.Join(base, "victim-ro"),
	}
	for _, d := range []string{"canary-dir/sub", "canary-dir/mnt", "canary-volume", "victim-ro"} {
		if err := os.MkdirAll(filepath.Join(base, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := unix.Mount("colo-canary", c.dirMount, "tmpfs", 0, "size=1m,mode=0755"); err != nil {
		t.Fatalf("mount the canary tmpfs: %v", err)
	}
	// Before t.TempDir's removal (cleanups run last first); EINVAL if a
	// vulnerable host unmounted it already.
	t.Cleanup(func() { _ = unix.Unmount(c.dirMount, unix.MNT_DETACH) })
	for _, f := range []string{"canary-dir/keep", "canary-dir/sub/keep", "canary-dir/mnt/keep", "canary-volume/keep", "canary-file", "victim-ro/secret"} {
		if err := os.WriteFile(filepath.Join(base, f), []byte(canaryContent(f)), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return c
}

// snapshot describes everything under base, mounts included: each path's
// type, mode, and content or symlink target.
func (c *canaries) snapshot(t *testing.T) map[string]string {
	t.Helper()
	s := map[string]string{}
	err := filepath.WalkDir(c.base, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			s[p] = "error " + err.Error()
			return nil
		}
		info, err := d.Info()
		if err != nil {
			s[p] = "error " + err.Error()
			return nil
		}
		desc := info.Mode().String()
		switch {
		case info.Mode()&fs.ModeSymlink != 0:
			target, err := os.Readlink(p)
			desc += fmt.Sprintf(" -> %q %v", target, err)
		case info.Mode().IsRegular():
			b, err := os.ReadFile(p)
			desc += fmt.Sprintf(" %q %v", b, err)
		}
		s[p] = desc
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// mounts lists the mount points under base.
func (c *canaries) mounts(t *testing.T) []string {
	t.Helper()
	m, err := storage.MountsUnder(c.base)
	if err != nil {
		t.Fatal(err)
	}
	sort.Strings(m)
	return m
}

// check fails the test if anything under base differs from before, or the
// mounts under it from mounts.
func (c *canaries) check(t *testing.T, when string, before map[string]string, mounts []string) {
	t.Helper()
	after := c.snapshot(t)
	var diffs []string
	for p, d := range before {
		if a, ok := after[p]; !ok {
			diffs = append(diffs, fmt.Sprintf("%s: gone (was %s)", p, d))
		} else if a != d {
			diffs = append(diffs, fmt.Sprintf("%s: %s, was %s", p, a, d))
		}
	}
	for p, a := range after {
		if _, ok := before[p]; !ok {
			diffs = append(diffs, fmt.Sprintf("%s: new: %s", p, a))
		}
	}
	sort.Strings(diffs)
	if len(diffs) > 0 {
		t.Errorf("%s, host paths outside the pod changed:\n  %s", when, strings.Join(diffs, "\n  "))
	}
	if m := c.mounts(t); !slices.Equal(m, mounts) {
		t.Errorf("%s, mounts under %s are %q, were %q", when, c.base, m, mounts)
	}
}
