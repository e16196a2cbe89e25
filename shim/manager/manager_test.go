package manager

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	runtimeoptions "github.com/containerd/containerd/api/types/runtimeoptions/v1"
	"github.com/containerd/containerd/v2/pkg/protobuf/proto"
	"github.com/containerd/containerd/v2/pkg/shim"
	"github.com/containerd/typeurl/v2"
	"github.com/opencontainers/runtime-spec/specs-go/features"
	"golang.org/x/sys/unix"

	"github.com/colo-runtime/colo/config"
	"github.com/colo-runtime/colo/hypervisor/driver"
	"github.com/colo-runtime/colo/internal/procfs"
	"github.com/colo-runtime/colo/shim/sandbox"
	"github.com/colo-runtime/colo/storage"
)

func withBundle(bundle string) context.Context {
	return context.WithValue(context.Background(), shim.OptsKey{}, shim.Opts{BundlePath: bundle})
}

func TestStopWithoutSandbox(t *testing.T) {
	m := NewShimManager("io.containerd.colo.v2")
	st, err := m.Stop(withBundle(t.TempDir()), "t1")
	if err != nil {
		t.Fatal(err)
	}
	if st.ExitStatus != 137 || st.ExitedAt.IsZero() {
		t.Errorf("status = %+v", st)
	}
}

// TestStopCleansSandbox is `shim delete` after a shim died with its
// sandbox's shared dir and a rootfs still mounted, and with its VM running
// where a driver could no longer be made for it: the hypervisor gone from
// PATH or from its configured path, no PATH at all.
func TestStopCleansSandbox(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root (mounts)")
	}
	for _, tc := range []struct {
		name string
		// path is $PATH for `shim delete` ("-" keeps the test's).
		path string
		// qemu is the configured hypervisor binary ("" looks it up in PATH).
		qemu string
		// vm runs a process that is QEMU to its cleanup.
		vm bool
		// unversioned writes the record as shims before StateVersion 1 did.
		unversioned bool
	}{
		{name: "no VM", path: "-"},
		{name: "QEMU gone from PATH", path: t.TempDir(), vm: true},
		{name: "QEMU binary removed", path: "-", qemu: "/nonexistent/qemu-system-x86_64", vm: true},
		{name: "no PATH", path: "", vm: true},
		{name: "record of an older shim", path: "", vm: true, unversioned: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.path != "-" {
				t.Setenv("PATH", tc.path)
			}
			testStopCleansSandbox(t, tc.qemu, tc.vm, tc.unversioned)
		})
	}
}

func testStopCleansSandbox(t *testing.T, qemu string, vm, unversioned bool) {
	root, err := filepath.EvalSymlinks(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if left, _ := storage.MountsUnder(root); len(left) > 0 {
			t.Errorf("mounts left: %v", left)
			for _, m := range left {
				_ = unix.Unmount(m, unix.MNT_DETACH)
			}
		}
	})
	dir := filepath.Join(root, "state", "default", "t1")
	if err := os.MkdirAll(filepath.Join(dir, "vm"), 0o700); err != nil {
		t.Fatal(err)
	}
	cfg := config.Default()
	cfg.Hypervisor.Path = qemu
	st := sandbox.State{Version: sandbox.StateVersion, Dir: dir, ID: "t1", Config: cfg}
	// The premise: no driver can be made for the recorded hypervisor, except
	// in the case that has one.
	if _, err := driver.New(cfg.Hypervisor); err == nil && vm {
		t.Fatal("a driver can be made: the test proves nothing")
	}
	var qemuProc *exec.Cmd
	if vm {
		qemuProc = fakeQEMU(t, filepath.Join(dir, "vm"))
		p := procfs.Of(qemuProc.Process.Pid)
		st.HypervisorPid, st.HypervisorStart = p.Pid, p.Start
	}
	record := func(rel string) error {
		st.Mounts = append(st.Mounts, rel)
		return nil
	}
	if err := storage.SetupShare(dir, record); err != nil {
		t.Fatal(err)
	}
	rootfs := filepath.Join(dir, storage.ShareMounts, "t1", "rootfs")
	if err := os.MkdirAll(rootfs, 0o755); err != nil {
		t.Fatal(err)
	}
	_ = record(storage.ShareMounts + "/t1/rootfs")
	if err := unix.Mount("tmpfs", rootfs, "tmpfs", 0, ""); err != nil {
		t.Fatal(err)
	}
	var b []byte
	if unversioned {
		b, err = json.Marshal(map[string]any{
			"dir": st.Dir, "id": st.ID, "hypervisor": st.Config.Hypervisor,
			"hypervisor_pid": st.HypervisorPid, "mounts": st.Mounts,
		})
	} else {
		b, err = json.Marshal(st)
	}
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "state.json"), b, 0o600); err != nil {
		t.Fatal(err)
	}
	bundle := filepath.Join(root, "bundle")
	if err := os.Mkdir(bundle, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(bundle, sandbox.BundleFile), []byte(dir+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}

	m := NewShimManager("io.containerd.colo.v2")
	status, err := m.Stop(withBundle(bundle), "t1")
	if err != nil {
		t.Fatal(err)
	}
	if status.ExitStatus != 137 || status.Pid != st.HypervisorPid {
		t.Errorf("status = %+v, want 137 and pid %d", status, st.HypervisorPid)
	}
	if qemuProc != nil {
		if err := qemuProc.Wait(); err == nil || qemuProc.ProcessState.Sys().(syscall.WaitStatus).Signal() != syscall.SIGKILL {
			t.Errorf("the VM: %v, want killed", err)
		}
	}
	if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("sandbox dir left: %v", err)
	}
	if _, err := os.Stat(filepath.Join(bundle, sandbox.BundleFile)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("bundle file left: %v", err)
	}
	// Again, as containerd may retry: nothing to do.
	if _, err := m.Stop(withBundle(bundle), "t1"); err != nil {
		t.Fatal(err)
	}
}

// fakeQEMU starts a process that QEMU's cleanup takes for the QEMU of
// vmDir (its name and -pidfile argument), which writes its pid file as
// QEMU does and then blocks until killed, opening a FIFO nobody writes.
func fakeQEMU(t *testing.T, vmDir string) *exec.Cmd {
	t.Helper()
	pidfile, hold := filepath.Join(vmDir, "qemu.pid"), filepath.Join(vmDir, "hold")
	if err := unix.Mkfifo(hold, 0o600); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("/bin/sh", "-c", `echo $$ > "$2"; read x < "$3"`, "qemu-system-x86_64", "-pidfile", pidfile, hold)
	cmd.Args[0] = "qemu-system-x86_64"
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		if b, err := os.ReadFile(pidfile); err == nil && strings.HasSuffix(string(b), "\n") {
			return cmd
		}
		if time.Now().After(deadline) {
			t.Fatalf("the fake QEMU wrote no %s", pidfile)
		}
	}
}

func TestStopRefusesBadBundleFile(t *testing.T) {
	bundle := t.TempDir()
	if err := os.WriteFile(filepath.Join(bundle, sandbox.BundleFile), []byte("/\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := NewShimManager("io.containerd.colo.v2").Stop(withBundle(bundle), "t1"); err == nil {
		t.Fatal("Stop accepted / as a sandbox dir")
	}
}

func TestInfo(t *testing.T) {
	m := NewShimManager("io.containerd.colo.v2")
	info, err := m.Info(context.Background(), bytes.NewReader(nil))
	if err != nil {
		t.Fatal(err)
	}
	if info.Name != "io.containerd.colo.v2" || info.Version == nil || info.Options != nil {
		t.Errorf("info = %+v", info)
	}
	fv, err := typeurl.UnmarshalAny(info.Features)
	if err != nil {
		t.Fatal(err)
	}
	if f, ok := fv.(*features.Features); !ok || !slices.Contains(f.MountOptions, "rro") {
		t.Errorf("features = %+v, want mount option rro (CRI's recursive read-only)", fv)
	}

	opts, err := typeurl.MarshalAnyToProto(&runtimeoptions.Options{ConfigPath: "/etc/colo/x.toml"})
	if err != nil {
		t.Fatal(err)
	}
	b, err := proto.Marshal(opts)
	if err != nil {
		t.Fatal(err)
	}
	info, err = m.Info(context.Background(), bytes.NewReader(b))
	if err != nil {
		t.Fatal(err)
	}
	v, err := typeurl.UnmarshalAny(info.Options)
	if err != nil {
		t.Fatal(err)
	}
	if o, ok := v.(*runtimeoptions.Options); !ok || o.ConfigPath != "/etc/colo/x.toml" {
		t.Errorf("options echoed = %+v", v)
	}
}
