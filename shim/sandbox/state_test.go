package sandbox

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/colo-runtime/colo/hypervisor"
	"github.com/colo-runtime/colo/hypervisor/driver"
	"github.com/colo-runtime/colo/internal/procfs"
	"github.com/colo-runtime/colo/storage"
	"github.com/colo-runtime/colo/testbed"
)

func TestReadStateVersion(t *testing.T) {
	dir := t.TempDir()
	for _, tc := range []struct {
		name    string
		json    string
		wantErr string
		want    func(State) bool
	}{{
		name: "current",
		json: fmt.Sprintf(`{"version": %d, "dir": %q, "config": {"Hypervisor": {"Type": "qemu"}}, "hypervisor_pid": 7, "hypervisor_start": 8}`, StateVersion, dir),
		want: func(st State) bool {
			return st.Version == StateVersion && st.Config.Hypervisor.Type == "qemu" && st.HypervisorPid == 7 && st.HypervisorStart == 8
		},
	}, {
		// An earlier shim's record: no version, the hypervisor's
		// configuration on its own.
		name: "unversioned",
		json: fmt.Sprintf(`{"dir": %q, "hypervisor": {"Name": "qemu", "Path": "/old/qemu"}, "hypervisor_pid": 7, "mounts": ["mounts"]}`, dir),
		want: func(st State) bool {
			return st.Version == StateVersion && st.Config.Hypervisor.Type == "qemu" &&
				st.Config.Hypervisor.Path == "/old/qemu" && st.HypervisorPid == 7 && len(st.Mounts) == 1
		},
	}, {
		name: "a systemd scope and the slices made for it",
		json: fmt.Sprintf(`{"version": %d, "dir": %q, "cgroup": "/a.slice/a-b.slice/x-1.scope", "cgroup_made": {"unit": "x-1.scope", "slices": ["/sys/fs/cgroup/cpu/a.slice/a-b.slice"]}}`, StateVersion, dir),
		want: func(st State) bool {
			return st.Cgroup == "/a.slice/a-b.slice/x-1.scope" && st.CgroupMade.Unit == "x-1.scope" && len(st.CgroupMade.Slices) == 1
		},
	}, {
		// Version 2 had a cgroup only: nothing else made for it.
		name: "version 2",
		json: fmt.Sprintf(`{"version": 2, "dir": %q, "config": {"Hypervisor": {"Type": "qemu"}}, "cgroup": "/k8s.io/x"}`, dir),
		want: func(st State) bool {
			return st.Version == 2 && st.Cgroup == "/k8s.io/x" && st.CgroupMade.Unit == "" && st.CgroupMade.Slices == nil
		},
	}, {
		// Written before hypervisor.name became hypervisor.type.
		name: "hypervisor name",
		json: fmt.Sprintf(`{"version": %d, "dir": %q, "config": {"Hypervisor": {"Name": "clh"}}, "hypervisor_pid": 7}`, StateVersion, dir),
		want: func(st State) bool { return st.Config.Hypervisor.Type == "clh" },
	}, {
		name:    "newer",
		json:    fmt.Sprintf(`{"version": %d, "dir": %q}`, StateVersion+1, dir),
		wantErr: fmt.Sprintf("version %d is newer than this shim's %d", StateVersion+1, StateVersion),
	}, {
		name:    "newer, in a shape this shim cannot decode",
		json:    fmt.Sprintf(`{"version": %d, "dir": %q, "mounts": {"rootfs": {"kind": "erofs"}}}`, StateVersion+1, dir),
		wantErr: fmt.Sprintf("version %d is newer than this shim's %d", StateVersion+1, StateVersion),
	}, {
		name:    "negative",
		json:    fmt.Sprintf(`{"version": -1, "dir": %q}`, dir),
		wantErr: "version -1",
	}, {
		name:    "another directory",
		json:    fmt.Sprintf(`{"version": %d, "dir": "/elsewhere"}`, StateVersion),
		wantErr: `names directory "/elsewhere"`,
	}} {
		t.Run(tc.name, func(t *testing.T) {
			if err := os.WriteFile(filepath.Join(dir, stateFile), []byte(tc.json), 0o600); err != nil {
				t.Fatal(err)
			}
			st, err := ReadState(dir)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("got %v, want an error with %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !tc.want(st) {
				t.Errorf("read %+v", st)
			}
		})
	}
}

// A record of a later version is left alone: Cleanup does nothing it
// might get half right.
func TestCleanupRefusesNewerState(t *testing.T) {
	dir := t.TempDir()
	if err := writeState(dir, State{Version: StateVersion + 1, Dir: dir}); err != nil {
		t.Fatal(err)
	}
	called := false
	cleanupVM := func(context.Context, string, string, procfs.Proc) error { called = true; return nil }
	if _, err := Cleanup(context.Background(), dir, cleanupVM); err == nil || !strings.Contains(err.Error(), "newer") {
		t.Fatalf("Cleanup: %v, want the version refused", err)
	}
	if called {
		t.Error("Cleanup went ahead with a record it cannot read")
	}
	if _, err := os.Stat(filepath.Join(dir, stateFile)); err != nil {
		t.Errorf("record gone: %v", err)
	}
}

// A sandbox dir that exists already (a leftover, or another sandbox's) is
// refused, and the bundle gets no record pointing at it.
func TestCreateOverExistingDir(t *testing.T) {
	e := newEnv(t, false)
	dir := e.sandboxDir()
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	_, _, err := Create(context.Background(), e.options(e.config("9p")), e.container("true"))
	if !errdefs.IsAlreadyExists(err) {
		t.Fatalf("Create over an existing dir: %v", err)
	}
	if _, err := os.Stat(filepath.Join(e.bundle, BundleFile)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("bundle file after a refused create: %v", err)
	}
	if err := os.Remove(dir); err != nil {
		t.Fatal(err)
	}
}

// Environment of the test binary re-run as a shim that crashes
// (TestCrashAnywhere runs TestCrashingShim).
const (
	// crashAtEnv is where the shim kills itself: "<n>" right after the
	// n-th write of its record, or "launch" right after the hypervisor
	// process started, before anything wrote its pid anywhere.
	crashAtEnv     = "COLO_TEST_CRASH_AT"
	crashNetNSEnv  = "COLO_TEST_CRASH_NETNS"
	crashCgroupEnv = "COLO_TEST_CRASH_CGROUP"
)

// crash is a shim's SIGKILL: no deferred function runs.
func crash() {
	_ = syscall.Kill(os.Getpid(), syscall.SIGKILL)
	select {}
}

// TestCrashingShim is the shim TestCrashAnywhere kills: it creates a
// sandbox with everything a sandbox can have on the host (virtiofsd, a pod
// network with TAPs, a host cgroup, mounts, a hypervisor process that
// looks like QEMU to its cleanup) and dies where it is told to.
func TestCrashingShim(t *testing.T) {
	at := os.Getenv(crashAtEnv)
	if at == "" {
		t.Skip("run by TestCrashAnywhere")
	}
	e := newEnv(t, false)
	fmt.Printf("bundle=%s\n", e.bundle)
	cc := e.container("cat")
	cc.Spec.Linux.Namespaces = []specs.LinuxNamespace{{Type: specs.NetworkNamespace, Path: os.Getenv(crashNetNSEnv)}}
	cc.Spec.Linux.CgroupsPath = os.Getenv(crashCgroupEnv)
	e.drv.launch = func(cfg hypervisor.VMConfig) (*exec.Cmd, error) {
		cmd, err := fakeQEMU(cfg.Dir, at != "launch")
		if err != nil {
			return nil, err
		}
		if at == "launch" {
			crash()
		}
		return cmd, nil
	}
	writes := 0
	stateWritten = func(State) {
		writes++
		if strconv.Itoa(writes) == at {
			crash()
		}
	}
	cfg := e.config("virtio-fs")
	cfg.Hypervisor.VCPUs = 1 // the fake VM has one thread
	if _, _, err := Create(context.Background(), e.options(cfg), cc); err != nil {
		t.Fatal(err)
	}
	fmt.Println("created")
	crash()
}

// fakeQEMU starts a process with QEMU's name and -pidfile argument in dir,
// as the QEMU driver's cleanup knows it, that blocks until killed (opening
// a FIFO nobody writes). With pidfile it writes its pid there, as QEMU does
// right after it starts.
func fakeQEMU(dir string, pidfile bool) (*exec.Cmd, error) {
	// The QEMU driver's file names (hypervisor/qemu): tests only.
	pf, hold := filepath.Join(dir, "qemu.pid"), filepath.Join(dir, "hold")
	if err := unix.Mkfifo(hold, 0o600); err != nil {
		return nil, err
	}
	script := `read x < "$3"`
	if pidfile {
		script = `echo $$ > "$2"; ` + script
	}
	cmd := exec.Command("/bin/sh", "-c", script, "qemu-system-x86_64", "-pidfile", pf, hold)
	cmd.Args[0] = "qemu-system-x86_64"
	return cmd, cmd.Start()
}

// TestCrashAnywhere kills a shim at every point of a sandbox's creation,
// right after each write of its record (so before the resource just
// recorded is made) and right after the hypervisor started (before its
// pid is known to anyone but the hypervisor), then does what `shim delete`
// does, from the bundle alone, with the real hypervisor cleanup and no
// driver: nothing may be left.
func TestCrashAnywhere(t *testing.T) {
	requireRoot(t)
	if _, err := os.Stat(virtiofsdBinary); err != nil {
		t.Skipf("no virtiofsd: %v", err)
	}
	nsName := fmt.Sprintf("colo-crash-test-%d", os.Getpid())
	nsPath, removeNS, err := testbed.NewNetNS(nsName)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = removeNS() })
	ns, err := netns.GetFromPath(nsPath)
	if err != nil {
		t.Fatal(err)
	}
	defer ns.Close()
	nl, err := netlink.NewHandleAt(ns)
	if err != nil {
		t.Fatal(err)
	}
	defer nl.Close()
	// Both ends in the pod's namespace: two interfaces to mirror.
	if err := nl.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "eth0"}, PeerName: "eth1"}); err != nil {
		t.Fatal(err)
	}

	run := func(t *testing.T, at string) (created bool) {
		root, err := filepath.EvalSymlinks(t.TempDir())
		if err != nil {
			t.Fatal(err)
		}
		// Runs before the temporary directory goes: never remove through
		// a mount. What a failed check left is killed too: it would hold
		// whatever the test binary inherited, such as a lock.
		cgroup := fmt.Sprintf("colo-crash-test-%d-%s", os.Getpid(), at)
		t.Cleanup(func() {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			for _, p := range procfs.Find(func(args []string) bool { return strings.Contains(strings.Join(args, " "), root) }) {
				_ = p.Kill()
				_ = procfs.WaitGone(ctx, p)
			}
			left, _ := storage.MountsUnder(root)
			for i := len(left) - 1; i >= 0; i-- {
				_ = unix.Unmount(left[i], unix.MNT_DETACH)
			}
			cgroups, _ := filepath.Glob(filepath.Join("/sys/fs/cgroup", "*", cgroup))
			for _, cg := range append(cgroups, filepath.Join("/sys/fs/cgroup", cgroup)) {
				// Children first.
				var dirs []string
				_ = filepath.WalkDir(cg, func(p string, d os.DirEntry, err error) error {
					if err == nil && d.IsDir() {
						dirs = append(dirs, p)
					}
					return nil
				})
				for i := len(dirs) - 1; i >= 0; i-- {
					_ = os.Remove(dirs[i])
				}
			}
		})
		shim := exec.Command(os.Args[0], "-test.run=^TestCrashingShim$")
		shim.Env = append(os.Environ(), "TMPDIR="+root, crashAtEnv+"="+at, crashNetNSEnv+"="+nsPath, crashCgroupEnv+"="+cgroup)
		var stderr strings.Builder
		shim.Stderr = &stderr
		out, err := shim.Output()
		var exit *exec.ExitError
		if !errors.As(err, &exit) || exit.Sys().(syscall.WaitStatus).Signal() != syscall.SIGKILL {
			t.Fatalf("the shim did not crash: %v\n%s\n%s", err, out, testbed.Tail(stderr.String(), 30))
		}
		var bundle string
		for _, line := range strings.Split(string(out), "\n") {
			if b, ok := strings.CutPrefix(line, "bundle="); ok {
				bundle = b
			}
			created = created || line == "created"
		}
		if bundle == "" {
			t.Fatalf("the shim crashed before its bundle was made:\n%s", out)
		}

		// `shim delete`, as the manager does it.
		dir, err := ReadBundleFile(bundle)
		if err != nil || dir == "" {
			t.Fatalf("bundle file: %q %v", dir, err)
		}
		// What the crash left, so that the checks below are seen to
		// matter: the fake QEMU without a pid anywhere at "launch", and
		// everything after a complete create.
		procs := processesMentioning(root)
		mounts, _ := storage.MountsUnder(root)
		st, _ := ReadState(dir)
		switch {
		case at == "launch":
			if _, err := os.Stat(filepath.Join(dir, vmDir, "qemu.pid")); len(procs) != 2 || st.HypervisorPid != 0 || err == nil {
				t.Fatalf("want virtiofsd and a fake QEMU nothing has the pid of; processes %v, recorded pid %d, pid file %v", procs, st.HypervisorPid, err)
			}
		case created:
			if len(procs) != 2 || len(mounts) < 3 || st.HypervisorStart == 0 || len(st.Mirrors) != 2 || st.Cgroup == "" {
				t.Fatalf("want virtiofsd, QEMU, mounts, TAPs and a cgroup; processes %v, mounts %v, state %+v", procs, mounts, st)
			}
		}
		t.Logf("left by the crash: %d processes, %d mounts", len(procs), len(mounts))
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		if _, err := Cleanup(ctx, dir, driver.Cleanup); err != nil {
			t.Fatalf("Cleanup: %v", err)
		}

		if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("sandbox dir left: %v", err)
		}
		if left, err := storage.MountsUnder(root); err != nil || len(left) > 0 {
			t.Errorf("mounts left: %v %v", left, err)
		}
		// The fake QEMU and virtiofsd name paths below root.
		if pids := processesMentioning(root); len(pids) > 0 {
			t.Errorf("processes left: %v", pids)
		}
		for _, name := range []string{"eth0", "eth1"} {
			l, err := nl.LinkByName(name)
			if err != nil {
				t.Fatal(err)
			}
			if qs, err := nl.QdiscList(l); err != nil {
				t.Error(err)
			} else {
				for _, q := range qs {
					if q.Type() == "ingress" {
						t.Errorf("%s: mirror's ingress qdisc left", name)
					}
				}
			}
		}
		if links, err := nl.LinkList(); err == nil {
			for _, l := range links {
				if l.Type() == "tuntap" {
					t.Errorf("TAP left: %s", l.Attrs().Name)
				}
			}
		}
		cgroups, _ := filepath.Glob(filepath.Join("/sys/fs/cgroup", "*", cgroup))
		if _, err := os.Stat(filepath.Join("/sys/fs/cgroup", cgroup)); err == nil {
			cgroups = append(cgroups, filepath.Join("/sys/fs/cgroup", cgroup))
		}
		if len(cgroups) > 0 {
			t.Errorf("host cgroups left: %v", cgroups)
		}
		return created
	}

	t.Run("launch", func(t *testing.T) { run(t, "launch") })
	for n := 1; ; n++ {
		created := false
		t.Run(fmt.Sprintf("write %d", n), func(t *testing.T) { created = run(t, strconv.Itoa(n)) })
		if created || t.Failed() {
			// Past the last write: the crash came after a complete create.
			break
		}
		if n == 100 {
			t.Fatal("no end to the record's writes")
		}
	}
}
