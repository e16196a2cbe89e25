package sandbox

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/fifo"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"

	"github.com/colo-runtime/colo/agentproto"
	"github.com/colo-runtime/colo/config"
	"github.com/colo-runtime/colo/hypervisor"
	"github.com/colo-runtime/colo/hypervisor/driver"
	"github.com/colo-runtime/colo/internal/procfs"
	"github.com/colo-runtime/colo/storage"
	"github.com/colo-runtime/colo/testbed"
)

const virtiofsdBinary = "/usr/lib/qemu/virtiofsd"

func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root (mounts)")
	}
}

// env is one test's state dir, bundle and stdio fifos, with containerd's
// ends of the fifos open. At the end it checks that nothing is left.
type env struct {
	t        *testing.T
	stateDir string
	bundle   string
	stdio    Stdio
	stdout   io.ReadCloser
	stderr   io.ReadCloser
	stdin    io.WriteCloser
	drv      *fakeDriver
	exits    chan Exit
}

func newEnv(t *testing.T, withStdin bool) *env {
	t.Helper()
	requireRoot(t)
	root, err := filepath.EvalSymlinks(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	e := &env{
		t:        t,
		stateDir: filepath.Join(root, "state"),
		bundle:   filepath.Join(root, "bundle"),
		drv:      newFakeDriver(),
		exits:    make(chan Exit, 16),
	}
	if err := os.MkdirAll(filepath.Join(e.bundle, "rootfs"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(e.bundle, "rootfs", "hello"), []byte("hi"), 0o644); err != nil {
		t.Fatal(err)
	}
	cs := openClientStdio(t, filepath.Join(root, "fifos"), withStdin)
	e.stdio, e.stdout, e.stderr, e.stdin = cs.Stdio, cs.stdout, cs.stderr, cs.stdin
	t.Cleanup(func() {
		// A real driver's templates may sit on a mount of their own.
		if err := driver.ReleaseTemplates(filepath.Join(root, "templates")); err != nil {
			t.Error(err)
		}
		for _, c := range []io.Closer{e.stdout, e.stderr, e.stdin} {
			if c != nil {
				c.Close()
			}
		}
		e.assertClean()
	})
	return e
}

// clientStdio are a process's stdio fifos with containerd's ends open.
type clientStdio struct {
	Stdio
	stdout, stderr io.ReadCloser
	stdin          io.WriteCloser
}

// openClientStdio creates stdio fifos in dir (made if needed) and opens
// containerd's ends, as containerd's cio does.
func openClientStdio(t *testing.T, dir string, withStdin bool) *clientStdio {
	t.Helper()
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	c := &clientStdio{Stdio: Stdio{Stdout: filepath.Join(dir, "stdout"), Stderr: filepath.Join(dir, "stderr")}}
	var err error
	if c.stdout, err = fifo.OpenFifo(ctx, c.Stdio.Stdout, syscall.O_RDONLY|syscall.O_CREAT|syscall.O_NONBLOCK, 0o700); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.stdout.Close() })
	if c.stderr, err = fifo.OpenFifo(ctx, c.Stdio.Stderr, syscall.O_RDONLY|syscall.O_CREAT|syscall.O_NONBLOCK, 0o700); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.stderr.Close() })
	if withStdin {
		c.Stdio.Stdin = filepath.Join(dir, "stdin")
		if c.stdin, err = fifo.OpenFifo(ctx, c.Stdio.Stdin, syscall.O_WRONLY|syscall.O_CREAT|syscall.O_NONBLOCK, 0o700); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.stdin.Close() })
	}
	return c
}

func (e *env) config(sharedFS string) config.Config {
	if sharedFS == "virtio-fs" {
		if _, err := os.Stat(virtiofsdBinary); err != nil {
			e.t.Skipf("no virtiofsd: %v", err)
		}
	}
	return testConfig(e.stateDir, sharedFS)
}

func (e *env) options(cfg config.Config) Options {
	return Options{
		ID:        "c1",
		Namespace: "testns",
		Config:    cfg,
		Driver:    e.drv,
		OnExit:    func(x Exit) { e.exits <- x },
	}
}

func (e *env) container(args ...string) ContainerConfig {
	return ContainerConfig{
		ID:     "c1",
		Bundle: e.bundle,
		Spec:   testSpec(args...),
		Stdio:  e.stdio,
	}
}

func (e *env) sandboxDir() string { return filepath.Join(e.stateDir, "testns", "c1") }

func testSpec(args ...string) *specs.Spec {
	return &specs.Spec{
		Version: specs.Version,
		Process: &specs.Process{Args: args, Cwd: "/"},
		Root:    &specs.Root{Path: "rootfs"},
		Linux:   &specs.Linux{},
	}
}

// assertClean checks that no VM, virtiofsd, mount, sandbox dir or bundle
// file is left.
func (e *env) assertClean() {
	t := e.t
	t.Helper()
	for _, vm := range e.drv.vms {
		select {
		case <-vm.Done():
		case <-time.After(10 * time.Second):
			t.Errorf("fake VM %d still running", vm.Pid())
			_ = vm.Stop(context.Background())
		}
	}
	if left, err := storage.MountsUnder(filepath.Dir(e.stateDir)); err != nil || len(left) > 0 {
		t.Errorf("mounts left: %v %v", left, err)
		for _, m := range left {
			_ = unix.Unmount(m, unix.MNT_DETACH)
		}
	}
	if _, err := os.Stat(e.sandboxDir()); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("sandbox dir left: %v", err)
	}
	if _, err := os.Stat(filepath.Join(e.bundle, BundleFile)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("bundle file left: %v", err)
	}
	if pids := processesMentioning(e.stateDir); len(pids) > 0 {
		t.Errorf("processes left that mention %s: %v", e.stateDir, pids)
	}
}

// processesMentioning lists live processes with s in their command line.
func processesMentioning(s string) []string {
	cmdlines, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	var out []string
	for _, f := range cmdlines {
		b, err := os.ReadFile(f)
		if err != nil || !bytes.Contains(b, []byte(s)) {
			continue
		}
		st, err := os.ReadFile(filepath.Join(filepath.Dir(f), "stat"))
		if err == nil && strings.Contains(string(st), ") Z ") {
			continue // a zombie holds nothing
		}
		out = append(out, filepath.Base(filepath.Dir(f)))
	}
	return out
}

func readAll(t *testing.T, r io.Reader) <-chan string {
	ch := make(chan string, 1)
	go func() {
		b, err := io.ReadAll(r)
		if err != nil {
			t.Errorf("read output: %v", err)
		}
		ch <- string(b)
	}()
	return ch
}

// pending is the number of bytes waiting in a fifo.
func pending(t *testing.T, r io.Reader) int {
	t.Helper()
	sc, ok := r.(syscall.Conn)
	if !ok {
		t.Fatalf("%T has no fd", r)
	}
	raw, err := sc.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var n int
	var ierr error
	if err := raw.Control(func(fd uintptr) { n, ierr = unix.IoctlGetInt(int(fd), unix.TIOCINQ) }); err != nil {
		t.Fatal(err)
	}
	if ierr != nil {
		t.Fatal(ierr)
	}
	return n
}

func waitExit(t *testing.T, exits <-chan Exit) Exit {
	t.Helper()
	select {
	case x := <-exits:
		return x
	case <-time.After(30 * time.Second):
		t.Fatal("no exit reported")
		return Exit{}
	}
}

// emptyNetns is a new network namespace with loopback only, bound under
// /var/run/netns for the test.
func emptyNetns(t *testing.T) string {
	t.Helper()
	path, remove, err := testbed.NewNetNS(fmt.Sprintf("colo-sandbox-test-%d", os.Getpid()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { remove() })
	return path
}

func TestLifecycle(t *testing.T) {
	for _, fs := range []string{"9p", "virtio-fs"} {
		t.Run(fs, func(t *testing.T) {
			e := newEnv(t, false)
			ctx := context.Background()
			cfg := e.config(fs)
			cc := e.container("echo", "hello")
			cc.Spec.Root.Readonly = true
			cc.Spec.Annotations = map[string]string{"test.exit": "3"}
			cc.Spec.Linux.Namespaces = []specs.LinuxNamespace{
				{Type: specs.NetworkNamespace, Path: emptyNetns(t)},
				{Type: specs.PIDNamespace},
				{Type: specs.IPCNamespace, Path: "/proc/1/ns/ipc"},
			}

			sb, c, err := Create(ctx, e.options(cfg), cc)
			if err != nil {
				t.Fatal(err)
			}
			dir := e.sandboxDir()
			if sb.Dir() != dir {
				t.Errorf("Dir = %s, want %s", sb.Dir(), dir)
			}
			if st, err := os.Stat(dir); err != nil || st.Mode().Perm() != 0o700 {
				t.Errorf("sandbox dir: %v %v", st, err)
			}
			st, err := ReadState(dir)
			if err != nil {
				t.Fatal(err)
			}
			if st.HypervisorPid != sb.Pid() || sb.Pid() == 0 {
				t.Errorf("state hypervisor pid %d, VM pid %d", st.HypervisorPid, sb.Pid())
			}
			if vm := procfs.Of(sb.Pid()); st.HypervisorStart != vm.Start || vm.Start == 0 {
				t.Errorf("state hypervisor start %d, VM's %d", st.HypervisorStart, vm.Start)
			}
			if st.Version != StateVersion || st.Config.Hypervisor.Type != "qemu" || st.ID != "c1" {
				t.Errorf("state version %d, hypervisor %+v, id %q", st.Version, st.Config.Hypervisor, st.ID)
			}
			if (fs == "virtio-fs") != (st.VirtiofsdPid != 0) {
				t.Errorf("state virtiofsd pid = %d with %s", st.VirtiofsdPid, fs)
			}
			if (fs == "virtio-fs") != slices.Equal(st.Sockets, []string{virtiofsdSocket}) {
				t.Errorf("state sockets = %q with %s", st.Sockets, fs)
			}
			if want := []ContainerState{{ID: "c1", Bundle: e.bundle}}; !slices.Equal(st.Containers, want) {
				t.Errorf("state containers = %+v, want %+v", st.Containers, want)
			}
			if got, err := ReadBundleFile(e.bundle); err != nil || got != dir {
				t.Errorf("bundle file = %q, %v; want %q", got, err, dir)
			}
			if b, err := os.ReadFile(filepath.Join(dir, "shared", "c1", "rootfs", "hello")); err != nil || string(b) != "hi" {
				t.Errorf("rootfs not mounted in the shared dir: %q %v", b, err)
			}

			vmcfg := e.drv.lastCfg
			wantParams := []string{"colo.channel=serial", "colo.log=warn"}
			if !slices.Equal(vmcfg.KernelParams, wantParams) {
				t.Errorf("kernel params = %q, want %q", vmcfg.KernelParams, wantParams)
			}
			if vmcfg.Dir != filepath.Join(dir, "vm") || vmcfg.Channel != hypervisor.ChannelSerial {
				t.Errorf("VM config = %+v", vmcfg)
			}
			share := vmcfg.Shares[0]
			wantDriver := map[string]string{"9p": "9p", "virtio-fs": "virtiofs"}[fs]
			wantPath := map[string]string{"9p": filepath.Join(dir, "shared"), "virtio-fs": filepath.Join(dir, "virtiofsd.sock")}[fs]
			if share.Tag != agentproto.SharedTag || string(share.Kind) != fs || share.Path != wantPath {
				t.Errorf("share = %+v", share)
			}
			if s := e.drv.agent.storages; len(s) != 2 || s[0].GetDriver() != wantDriver || s[0].GetMountPoint() != agentproto.SharedMountPoint ||
				s[1].GetDriver() != "tmpfs" || s[1].GetMountPoint() != agentproto.SandboxShm {
				t.Errorf("sandbox storages = %v, want the share and the pod's shm", s)
			}
			if len(vmcfg.NICs) != 0 {
				t.Errorf("NICs %v for a network namespace without interfaces", vmcfg.NICs)
			}

			g := e.drv.agent.spec("c1")
			if g.Root.Path != "/run/colo/shared/c1/rootfs" || !g.Root.Readonly {
				t.Errorf("guest root = %+v", g.Root)
			}
			if g.Hooks != nil {
				t.Errorf("hooks reached the guest: %+v", g.Hooks)
			}
			wantNS := []specs.LinuxNamespace{{Type: specs.PIDNamespace}, {Type: specs.IPCNamespace}}
			if !slices.Equal(g.Linux.Namespaces, wantNS) {
				t.Errorf("guest namespaces = %+v, want %+v", g.Linux.Namespaces, wantNS)
			}

			if s := c.initState(); s.Status != StatusCreated {
				t.Errorf("state after create = %+v", s)
			}
			// Nothing reads the fifos until the exit is reported: what
			// the fifos hold then shows the output was copied first.
			if err := c.Start(ctx, "", nil); err != nil {
				t.Fatal(err)
			}
			x := waitExit(t, e.exits)
			if x.ContainerID != "c1" || x.ExecID != "" || x.Status != 3 {
				t.Errorf("exit = %+v", x)
			}
			if n := pending(t, e.stdout); n != len("echo hello\n") {
				t.Errorf("stdout fifo holds %d bytes when the exit is reported", n)
			}
			stdout, stderr := readAll(t, e.stdout), readAll(t, e.stderr)
			if out := <-stdout; out != "echo hello\n" {
				t.Errorf("stdout = %q", out)
			}
			if out := <-stderr; out != "err\n" {
				t.Errorf("stderr = %q", out)
			}
			ws, err := c.Wait(ctx, "")
			if err != nil || ws.Status != StatusStopped || ws.ExitStatus != 3 {
				t.Errorf("Wait = %+v, %v", ws, err)
			}
			if err := c.Start(ctx, "", nil); !errdefs.IsFailedPrecondition(err) {
				t.Errorf("second Start: %v, want failed precondition", err)
			}
			if err := c.Kill(ctx, "", 9, false); !errdefs.IsNotFound(err) {
				t.Errorf("Kill after exit: %v, want not found", err)
			}

			ds, err := sb.DeleteContainer(ctx, "c1")
			if err != nil {
				t.Fatal(err)
			}
			if ds.ExitStatus != 3 {
				t.Errorf("delete state = %+v", ds)
			}
			if !e.drv.agent.destroyed || !slices.Equal(e.drv.agent.removed, []string{"c1"}) {
				t.Errorf("guest not told: destroyed=%v removed=%v", e.drv.agent.destroyed, e.drv.agent.removed)
			}
			if _, err := sb.Container("c1"); !errdefs.IsNotFound(err) {
				t.Errorf("container after delete: %v", err)
			}
			if _, err := os.Stat(filepath.Join(e.bundle, "rootfs", "hello")); err != nil {
				t.Errorf("the bundle's rootfs lost its file: %v", err)
			}
		})
	}
}

// TestStdin: stdin ends when the client closes its end; with a terminal,
// whose clients come and go (attach), only after CloseIO too, as with runc.
func TestStdin(t *testing.T) {
	for _, tc := range []struct {
		name     string
		terminal bool
		steps    func(t *testing.T, e *env, c *Container)
	}{
		{"client closes", false, func(t *testing.T, e *env, c *Container) {
			write(t, e.stdin, "abc")
			e.stdin.Close()
		}},
		{"CloseIO then client", false, func(t *testing.T, e *env, c *Container) {
			write(t, e.stdin, "abc")
			closeStdin(t, c)
			e.stdin.Close()
		}},
		{"terminal reattached", true, func(t *testing.T, e *env, c *Container) {
			write(t, e.stdin, "ab")
			e.stdin.Close()
			var err error
			if e.stdin, err = os.OpenFile(e.stdio.Stdin, os.O_WRONLY, 0); err != nil {
				t.Fatal(err)
			}
			write(t, e.stdin, "c")
			e.stdin.Close()
			closeStdin(t, c)
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t, true)
			ctx := context.Background()
			cc := e.container("cat")
			cc.Stdio.Terminal = tc.terminal
			sb, c, err := Create(ctx, e.options(e.config("9p")), cc)
			if err != nil {
				t.Fatal(err)
			}
			stdout := readAll(t, e.stdout)
			go io.Copy(io.Discard, e.stderr)
			if err := c.Start(ctx, "", nil); err != nil {
				t.Fatal(err)
			}
			tc.steps(t, e, c)
			if x := waitExit(t, e.exits); x.Status != 0 {
				t.Errorf("exit = %+v", x)
			}
			if out := <-stdout; out != "abc" {
				t.Errorf("stdout = %q, want the stdin echoed", out)
			}
			if _, err := sb.DeleteContainer(ctx, "c1"); err != nil {
				t.Fatal(err)
			}
		})
	}
}

func write(t *testing.T, w io.Writer, s string) {
	t.Helper()
	if _, err := io.WriteString(w, s); err != nil {
		t.Fatal(err)
	}
}

func closeStdin(t *testing.T, c *Container) {
	t.Helper()
	if err := c.CloseStdin(context.Background(), ""); err != nil {
		t.Fatal(err)
	}
}

func TestKillBeforeStart(t *testing.T) {
	e := newEnv(t, false)
	ctx := context.Background()
	sb, c, err := Create(ctx, e.options(e.config("9p")), e.container("sleep", "1"))
	if err != nil {
		t.Fatal(err)
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

func TestDeleteBeforeStart(t *testing.T) {
	e := newEnv(t, false)
	ctx := context.Background()
	sb, c, err := Create(ctx, e.options(e.config("virtio-fs")), e.container("true"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := sb.DeleteContainer(ctx, "c1"); err != nil {
		t.Fatal(err)
	}
	if s := c.initState(); s.Status != StatusStopped {
		t.Errorf("state after delete = %+v", s)
	}
	waitExit(t, e.exits)
}

func TestDeleteRunning(t *testing.T) {
	e := newEnv(t, true)
	ctx := context.Background()
	sb, c, err := Create(ctx, e.options(e.config("9p")), e.container("cat"))
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Start(ctx, "", nil); err != nil {
		t.Fatal(err)
	}
	if _, err := sb.DeleteContainer(ctx, "c1"); !errdefs.IsFailedPrecondition(err) {
		t.Errorf("delete of a running container: %v, want failed precondition", err)
	}
	if err := c.Kill(ctx, "", 15, false); err != nil {
		t.Fatal(err)
	}
	if x := waitExit(t, e.exits); x.Status != 128+15 {
		t.Errorf("exit = %+v", x)
	}
	if _, err := sb.DeleteContainer(ctx, "c1"); err != nil {
		t.Fatal(err)
	}
}

func TestReadinessRetries(t *testing.T) {
	e := newEnv(t, false)
	ctx := context.Background()
	e.drv.dialFailures = 3
	e.drv.agent.checkErrors = 2
	sb, _, err := Create(ctx, e.options(e.config("9p")), e.container("true"))
	if err != nil {
		t.Fatal(err)
	}
	if n := e.drv.agent.checkCalls; n != 3 {
		t.Errorf("Check calls = %d, want 3", n)
	}
	if _, err := sb.DeleteContainer(ctx, "c1"); err != nil {
		t.Fatal(err)
	}
}

// templatingDriver is the fake driver with templates: it records when
// the template was ready and the deadline Start was given.
type templatingDriver struct {
	*fakeDriver
	prepared      []hypervisor.VMConfig
	preparedAt    time.Time
	startDeadline time.Time
}

func (d *templatingDriver) PrepareTemplate(ctx context.Context, cfg hypervisor.VMConfig) error {
	d.prepared = append(d.prepared, cfg)
	d.preparedAt = time.Now()
	return nil
}

func (d *templatingDriver) ReleaseTemplates(string) error { return nil }

func (d *templatingDriver) Start(ctx context.Context, cfg hypervisor.VMConfig) (hypervisor.VM, error) {
	d.startDeadline, _ = ctx.Deadline()
	return d.fakeDriver.Start(ctx, cfg)
}

// TestTemplateBeforeDeadline: the template is made before the start's
// deadline begins (making one is a boot and a save, which would eat the
// budget of the start itself), for the configuration the VM then starts
// with.
func TestTemplateBeforeDeadline(t *testing.T) {
	e := newEnv(t, false)
	ctx := context.Background()
	drv := &templatingDriver{fakeDriver: e.drv}
	opts := e.options(e.config("9p"))
	opts.Driver = drv
	sb, _, err := Create(ctx, opts, e.container("true"))
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		if _, err := sb.DeleteContainer(ctx, "c1"); err != nil {
			t.Fatal(err)
		}
	}()
	if len(drv.prepared) != 1 {
		t.Fatalf("PrepareTemplate called %d times, want once", len(drv.prepared))
	}
	budget := time.Duration(opts.Config.Hypervisor.BootTimeout)
	if started := drv.startDeadline.Add(-budget); started.Before(drv.preparedAt) {
		t.Errorf("the start's deadline (%s) began before the template was ready (%s)", started, drv.preparedAt)
	}
	got, want := drv.prepared[0], e.drv.lastCfg
	if got.TemplateDir == "" || got.TemplateDir != want.TemplateDir || got.Dir != want.Dir ||
		!slices.Equal(got.KernelParams, want.KernelParams) || !slices.Equal(got.Shares, want.Shares) {
		t.Errorf("template prepared for %+v, VM started with %+v", got, want)
	}
}

func TestCreateFailure(t *testing.T) {
	for _, tc := range []struct {
		name     string
		sharedFS string
		setup    func(*env, *ContainerConfig, *config.Config)
		is       func(error) bool
		msg      string
		noVM     bool
	}{
		{
			name:  "no args",
			setup: func(e *env, c *ContainerConfig, _ *config.Config) { c.Spec.Process.Args = nil },
			is:    errdefs.IsInvalidArgument, msg: "process.args is empty", noVM: true,
		},
		{
			name:  "missing logging binary",
			setup: func(e *env, c *ContainerConfig, _ *config.Config) { c.Stdio.Stdout = "binary:///nonexistent/logger" },
			is:    func(error) bool { return true }, msg: "start logging binary /nonexistent/logger", noVM: true,
		},
		{
			name:  "bad rootfs mount",
			setup: func(e *env, c *ContainerConfig, _ *config.Config) { c.Spec.Root.Path = "/does/not/exist" },
			is:    func(error) bool { return true }, msg: "mount rootfs", noVM: true,
		},
		{
			name:     "virtiofsd fails",
			sharedFS: "virtio-fs",
			setup:    func(e *env, c *ContainerConfig, cfg *config.Config) { cfg.Storage.Virtiofsd = "/bin/false" },
			is:       func(error) bool { return true }, msg: "virtiofsd exited before listening", noVM: true,
		},
		{
			name:  "driver fails",
			setup: func(e *env, c *ContainerConfig, _ *config.Config) { e.drv.startErr = errors.New("no qemu") },
			is:    func(error) bool { return true }, msg: "start VM: no qemu",
		},
		{
			name: "agent never answers",
			setup: func(e *env, c *ContainerConfig, cfg *config.Config) {
				e.drv.agent.checkHang = true
				cfg.Hypervisor.BootTimeout = config.Duration(2 * time.Second)
			},
			is: errdefs.IsUnavailable, msg: "VM did not answer within 2s (agent channel serial)",
		},
		{
			name:     "agent protocol mismatch",
			sharedFS: "virtio-fs",
			setup:    func(e *env, c *ContainerConfig, _ *config.Config) { e.drv.agent.protocolVersion = 99 },
			is:       errdefs.IsFailedPrecondition, msg: "protocol version 99",
		},
		{
			name: "guest rejects the container",
			setup: func(e *env, c *ContainerConfig, _ *config.Config) {
				e.drv.agent.createErr = errdefs.ErrInvalidArgument.WithMessage("no such user")
			},
			is: errdefs.IsInvalidArgument, msg: "agent CreateContainer: no such user",
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t, true)
			fs := tc.sharedFS
			if fs == "" {
				fs = "9p"
			}
			cfg := e.config(fs)
			cc := e.container("true")
			tc.setup(e, &cc, &cfg)
			_, _, err := Create(context.Background(), e.options(cfg), cc)
			if err == nil {
				t.Fatal("Create succeeded")
			}
			if !tc.is(err) || !strings.Contains(err.Error(), tc.msg) {
				t.Errorf("error = %v (%T), want one containing %q", err, err, tc.msg)
			}
			if tc.noVM && len(e.drv.vms) > 0 {
				t.Error("a VM was started")
			}
			// env's cleanup checks that nothing is left.
		})
	}
}

func TestVMExitDuringBoot(t *testing.T) {
	e := newEnv(t, false)
	e.drv.agent.checkHang = true
	cfg := e.config("9p")
	errc := make(chan error, 1)
	go func() {
		_, _, err := Create(context.Background(), e.options(cfg), e.container("true"))
		errc <- err
	}()
	for {
		e.drv.mu.Lock()
		n := len(e.drv.vms)
		e.drv.mu.Unlock()
		if n > 0 {
			break
		}
		time.Sleep(5 * time.Millisecond)
	}
	_ = e.drv.vms[0].cmd.Process.Kill()
	err := <-errc
	if err == nil || !strings.Contains(err.Error(), "VM exited before its agent answered") {
		t.Fatalf("error = %v", err)
	}
}

func TestSandboxDirExists(t *testing.T) {
	e := newEnv(t, false)
	if err := os.MkdirAll(e.sandboxDir(), 0o700); err != nil {
		t.Fatal(err)
	}
	_, _, err := Create(context.Background(), e.options(e.config("9p")), e.container("true"))
	if !errdefs.IsAlreadyExists(err) {
		t.Fatalf("error = %v, want already exists", err)
	}
	if _, err := os.Stat(e.sandboxDir()); err != nil {
		t.Fatalf("Create removed a sandbox dir it did not make: %v", err)
	}
	if err := os.Remove(e.sandboxDir()); err != nil {
		t.Fatal(err)
	}
}

func TestVMDies(t *testing.T) {
	e := newEnv(t, true)
	ctx := context.Background()
	sb, c, err := Create(ctx, e.options(e.config("virtio-fs")), e.container("cat"))
	if err != nil {
		t.Fatal(err)
	}
	go io.Copy(io.Discard, e.stdout)
	go io.Copy(io.Discard, e.stderr)
	if err := c.Start(ctx, "", nil); err != nil {
		t.Fatal(err)
	}
	_ = e.drv.vms[0].cmd.Process.Kill()
	if x := waitExit(t, e.exits); x.Status != VMExitStatus {
		t.Errorf("exit = %+v, want %d", x, VMExitStatus)
	}
	if err := c.Kill(ctx, "", 9, false); !errdefs.IsNotFound(err) {
		t.Errorf("Kill after the VM died: %v", err)
	}
	if _, err := sb.DeleteContainer(ctx, "c1"); err != nil {
		t.Fatal(err)
	}
}

func TestCleanupAfterCrash(t *testing.T) {
	e := newEnv(t, true)
	ctx := context.Background()
	_, c, err := Create(ctx, e.options(e.config("virtio-fs")), e.container("cat"))
	if err != nil {
		t.Fatal(err)
	}
	go io.Copy(io.Discard, e.stdout)
	go io.Copy(io.Discard, e.stderr)
	if err := c.Start(ctx, "", nil); err != nil {
		t.Fatal(err)
	}
	// What `shim delete` does after the shim died: only the bundle and
	// the disk are left to go by.
	dir, err := ReadBundleFile(e.bundle)
	if err != nil || dir != e.sandboxDir() {
		t.Fatalf("bundle file: %q %v", dir, err)
	}
	st, err := Cleanup(ctx, dir, e.drv.Cleanup)
	if err != nil {
		t.Fatal(err)
	}
	if st.HypervisorPid == 0 || st.VirtiofsdPid == 0 {
		t.Errorf("state = %+v", st)
	}
	if !slices.Equal(e.drv.cleanups, []string{filepath.Join(dir, "vm")}) {
		t.Errorf("driver cleanups = %v", e.drv.cleanups)
	}
	if want := (procfs.Proc{Pid: st.HypervisorPid, Start: st.HypervisorStart}); !slices.Equal(e.drv.recorded, []procfs.Proc{want}) || want.Start == 0 {
		t.Errorf("the VM cleanup got %v, want the recorded %v", e.drv.recorded, want)
	}
	// The living Sandbox object sees its VM die; let it settle.
	waitExit(t, e.exits)
	if err := os.Remove(filepath.Join(e.bundle, BundleFile)); err != nil && !errors.Is(err, os.ErrNotExist) {
		t.Fatal(err)
	}
	// Again: nothing left, nothing to do.
	if _, err := Cleanup(ctx, dir, nil); err != nil {
		t.Fatal(err)
	}
}

func TestCleanupRefusesForeignDir(t *testing.T) {
	dir := t.TempDir()
	keep := filepath.Join(dir, "precious")
	if err := os.WriteFile(keep, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := Cleanup(context.Background(), dir, nil); err == nil {
		t.Fatal("Cleanup accepted a directory without state")
	}
	// A state file naming another directory.
	if err := writeState(dir, State{Dir: "/somewhere/else"}); err != nil {
		t.Fatal(err)
	}
	if _, err := Cleanup(context.Background(), dir, nil); err == nil {
		t.Fatal("Cleanup accepted a state file naming another directory")
	}
	if _, err := os.Stat(keep); err != nil {
		t.Fatalf("Cleanup removed a file it does not own: %v", err)
	}
}

func TestReadBundleFile(t *testing.T) {
	for _, tc := range []struct {
		name, content, want string
		wantErr             bool
	}{
		{"missing", "", "", false},
		{"dir", "/run/colo/default/c1\n", "/run/colo/default/c1", false},
		{"root", "/", "", true},
		{"relative", "run/colo", "", true},
		{"unclean", "/run/colo/../etc", "", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			bundle := t.TempDir()
			if tc.name != "missing" {
				if err := os.WriteFile(filepath.Join(bundle, BundleFile), []byte(tc.content), 0o600); err != nil {
					t.Fatal(err)
				}
			}
			got, err := ReadBundleFile(bundle)
			if (err != nil) != tc.wantErr || got != tc.want {
				t.Errorf("ReadBundleFile = %q, %v; want %q, error %v", got, err, tc.want, tc.wantErr)
			}
		})
	}
}

func TestSocketPathLimit(t *testing.T) {
	e := newEnv(t, false)
	cfg := e.config("9p")
	cfg.Runtime.StateDir = "/run/" + strings.Repeat("x", 100)
	_, _, err := Create(context.Background(), e.options(cfg), e.container("true"))
	if !errdefs.IsInvalidArgument(err) || !strings.Contains(err.Error(), "runtime.state_dir") {
		t.Fatalf("error = %v", err)
	}
}

// initState is the init process's state, for tests.
func (c *Container) initState() ProcessState { return c.init.State() }

// TestBindMounts: a spec's host bind mounts reach the guest through the
// container's directory in the share, read-only where asked; /dev/shm
// becomes the pod's guest tmpfs; a missing source fails the create with
// its name and leaves nothing; a delete unmounts them.
func TestBindMounts(t *testing.T) {
	e := newEnv(t, false)
	ctx := context.Background()
	src := t.TempDir()
	if err := os.WriteFile(filepath.Join(src, "data"), []byte("from the host"), 0o644); err != nil {
		t.Fatal(err)
	}
	cc := e.container("echo", "hi")
	cc.Spec.Mounts = append(cc.Spec.Mounts,
		specs.Mount{Destination: "/data", Type: "bind", Source: src, Options: []string{"rbind", "ro"}},
		specs.Mount{Destination: "/dev/shm", Type: "bind", Source: src, Options: []string{"rbind"}},
	)
	n := len(cc.Spec.Mounts)

	bad := e.container("echo", "hi")
	bad.Spec.Mounts = append(bad.Spec.Mounts, specs.Mount{Destination: "/x", Type: "bind", Source: "/no/such/dir"})
	if _, _, err := Create(ctx, e.options(e.config("9p")), bad); !errdefs.IsInvalidArgument(err) || !strings.Contains(err.Error(), "/no/such/dir") {
		t.Fatalf("create with a missing bind source: %v", err)
	}
	if _, err := os.Stat(e.sandboxDir()); !os.IsNotExist(err) {
		t.Fatalf("sandbox dir left after the failed create: %v", err)
	}

	sb, c, err := Create(ctx, e.options(e.config("9p")), cc)
	if err != nil {
		t.Fatal(err)
	}
	g := e.drv.agent.spec("c1")
	data, shm := g.Mounts[n-2], g.Mounts[n-1]
	if !strings.HasPrefix(data.Source, agentproto.SharedMountPoint+"/c1/mounts/") || !slices.Contains(data.Options, "ro") {
		t.Errorf("guest /data mount %+v", data)
	}
	if shm.Source != agentproto.SandboxShm {
		t.Errorf("guest /dev/shm mount %+v, want the sandbox's tmpfs", shm)
	}
	host := filepath.Join(sb.Dir(), "shared", strings.TrimPrefix(data.Source, agentproto.SharedMountPoint+"/"))
	if b, err := os.ReadFile(filepath.Join(host, "data")); err != nil || string(b) != "from the host" {
		t.Errorf("bind source in the share: %q, %v", b, err)
	}
	if err := os.WriteFile(filepath.Join(host, "new"), nil, 0o644); !errors.Is(err, unix.EROFS) {
		t.Errorf("write into the read-only bind: %v", err)
	}
	if err := c.Start(ctx, "", nil); err != nil {
		t.Fatal(err)
	}
	waitExit(t, e.exits)
	if _, err := sb.DeleteContainer(ctx, "c1"); err != nil {
		t.Fatal(err)
	}
	if left, _ := storage.MountsUnder(filepath.Dir(e.sandboxDir())); len(left) > 0 {
		t.Errorf("mounts left: %v", left)
	}
}
