package sandbox

import (
	"context"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/colo-runtime/colo/config"
	"github.com/colo-runtime/colo/hypervisor/driver"
)

// guestEnv names a directory with a guest's vmlinux and initrd.img
// (guest/build.sh --out DIR); the tests that boot a real VM need it.
const guestEnv = "COLO_TEST_GUEST"

// realConfig boots real VMs (QEMU under TCG) from $COLO_TEST_GUEST.
func realConfig(t *testing.T, e *env, sharedFS string) config.Config {
	t.Helper()
	guest := os.Getenv(guestEnv)
	if guest == "" {
		t.Skipf("set %s to a directory with vmlinux and initrd.img to boot real VMs", guestEnv)
	}
	cfg := e.config(sharedFS)
	cfg.Hypervisor.Kernel = filepath.Join(guest, "vmlinux")
	cfg.Hypervisor.Initrd = filepath.Join(guest, "initrd.img")
	cfg.Hypervisor.Accel = "tcg"
	cfg.Hypervisor.BootTimeout = config.Duration(60 * time.Second)
	return cfg
}

// busyboxSpec is containerd's default spec running a busybox shell command,
// with a rootfs holding only the static busybox.
func busyboxSpec(t *testing.T, e *env, script string) *specs.Spec {
	t.Helper()
	b, err := os.ReadFile("/bin/busybox")
	if err != nil {
		t.Skipf("no static busybox: %v", err)
	}
	bin := filepath.Join(e.bundle, "rootfs", "bin")
	if err := os.MkdirAll(bin, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(bin, "busybox"), b, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("busybox", filepath.Join(bin, "sh")); err != nil {
		t.Fatal(err)
	}
	// Like containerd's default spec (pkg/oci), which would pull in half
	// of containerd.
	return &specs.Spec{
		Version: specs.Version,
		Process: &specs.Process{
			Args: []string{"/bin/sh", "-c", script},
			Env:  []string{"PATH=/bin"},
			Cwd:  "/",
		},
		Root:     &specs.Root{Path: "rootfs"},
		Hostname: "c1",
		Mounts: []specs.Mount{
			{Destination: "/proc", Type: "proc", Source: "proc", Options: []string{"nosuid", "noexec", "nodev"}},
			{Destination: "/dev", Type: "tmpfs", Source: "tmpfs", Options: []string{"nosuid", "strictatime", "mode=755", "size=65536k"}},
			{Destination: "/dev/pts", Type: "devpts", Source: "devpts", Options: []string{"nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"}},
			{Destination: "/dev/shm", Type: "tmpfs", Source: "shm", Options: []string{"nosuid", "noexec", "nodev", "mode=1777", "size=65536k"}},
			{Destination: "/sys", Type: "sysfs", Source: "sysfs", Options: []string{"nosuid", "noexec", "nodev", "ro"}},
		},
		Linux: &specs.Linux{
			Namespaces: []specs.LinuxNamespace{
				{Type: specs.PIDNamespace}, {Type: specs.IPCNamespace}, {Type: specs.UTSNamespace},
				{Type: specs.MountNamespace}, {Type: specs.NetworkNamespace},
			},
			CgroupsPath: "/testns/c1",
		},
	}
}

// TestRealVM runs a container in a real VM with the real agent: output,
// exit status, and that nothing is left afterwards.
func TestRealVM(t *testing.T) {
	for _, fs := range []string{"9p", "virtio-fs"} {
		t.Run(fs, func(t *testing.T) {
			e := newEnv(t, true)
			cfg := realConfig(t, e, fs)
			ctx := context.Background()
			drv, err := driver.New(cfg.Hypervisor)
			if err != nil {
				t.Fatal(err)
			}
			opts := e.options(cfg)
			opts.Driver = drv
			cc := e.container()
			cc.Spec = busyboxSpec(t, e, "read line; echo out:$line; echo err >&2; ls /bin; exit 3")

			sb, c, err := Create(ctx, opts, cc)
			if err != nil {
				t.Fatal(err)
			}
			stdout, stderr := readAll(t, e.stdout), readAll(t, e.stderr)
			if err := c.Start(ctx, "", nil); err != nil {
				t.Fatal(err)
			}
			if _, err := io.WriteString(e.stdin, "hello\n"); err != nil {
				t.Fatal(err)
			}
			e.stdin.Close()
			x := waitExit(t, e.exits)
			if x.Status != 3 || int(x.Pid) != sb.Pid() {
				t.Errorf("exit = %+v, VM pid %d", x, sb.Pid())
			}
			out, errOut := <-stdout, <-stderr
			if !strings.HasPrefix(out, "out:hello\n") || !strings.Contains(out, "busybox") {
				t.Errorf("stdout = %q", out)
			}
			if errOut != "err\n" {
				t.Errorf("stderr = %q", errOut)
			}
			if _, err := sb.DeleteContainer(ctx, "c1"); err != nil {
				t.Fatal(err)
			}
			// env's cleanup checks QEMU, virtiofsd, mounts and files are gone.
		})
	}
}

// TestRealVMKill kills a running container and then checks the VM goes
// with the delete.
func TestRealVMKill(t *testing.T) {
	e := newEnv(t, false)
	cfg := realConfig(t, e, "virtio-fs")
	ctx := context.Background()
	drv, err := driver.New(cfg.Hypervisor)
	if err != nil {
		t.Fatal(err)
	}
	opts := e.options(cfg)
	opts.Driver = drv
	cc := e.container()
	cc.Spec = busyboxSpec(t, e, "echo started; exec sleep 1000")
	sb, c, err := Create(ctx, opts, cc)
	if err != nil {
		t.Fatal(err)
	}
	go io.Copy(io.Discard, e.stderr)
	if err := c.Start(ctx, "", nil); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, len("started\n"))
	if _, err := io.ReadFull(e.stdout, buf); err != nil || string(buf) != "started\n" {
		t.Fatalf("stdout = %q, %v", buf, err)
	}
	if err := c.Kill(ctx, "", 9, false); err != nil {
		t.Fatal(err)
	}
	if x := waitExit(t, e.exits); x.Status != 137 {
		t.Errorf("exit = %+v, want 137", x)
	}
	if _, err := sb.DeleteContainer(ctx, "c1"); err != nil {
		t.Fatal(err)
	}
}
