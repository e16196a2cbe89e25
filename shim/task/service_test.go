package task

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	eventstypes "github.com/containerd/containerd/api/events"
	taskAPI "github.com/containerd/containerd/api/runtime/task/v3"
	"github.com/containerd/containerd/api/types/task"
	"github.com/containerd/containerd/v2/core/events"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/containerd/v2/pkg/shutdown"
	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"github.com/containerd/fifo"
	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/colo-runtime/colo/config"
	"github.com/colo-runtime/colo/hypervisor"
	"github.com/colo-runtime/colo/hypervisor/driver"
	"github.com/colo-runtime/colo/storage"
)

// recorder is a publisher that keeps the events.
type recorder struct {
	mu     sync.Mutex
	events []any
	added  chan struct{}
}

func newRecorder() *recorder { return &recorder{added: make(chan struct{}, 64)} }

func (r *recorder) Publish(ctx context.Context, topic string, e events.Event) error {
	r.mu.Lock()
	r.events = append(r.events, e)
	r.mu.Unlock()
	select {
	case r.added <- struct{}{}:
	default: // waitFor has wake-ups pending
	}
	return nil
}

func (r *recorder) Close() error { return nil }

func (r *recorder) snapshot() []any {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]any(nil), r.events...)
}

// waitFor waits until n events were published.
func (r *recorder) waitFor(t *testing.T, n int) []any {
	t.Helper()
	for len(r.snapshot()) < n {
		select {
		case <-r.added:
		case <-time.After(60 * time.Second):
			t.Fatalf("only %d of %d events published: %+v", len(r.snapshot()), n, r.snapshot())
		}
	}
	return r.snapshot()
}

type harness struct {
	svc       taskAPI.TTRPCTaskService
	events    *recorder
	sd        shutdown.Service
	ctx       context.Context
	driverErr error
	drivers   int
}

func newHarness(t *testing.T, newDriver func(config.Hypervisor) (hypervisor.Driver, error)) *harness {
	t.Helper()
	h := &harness{events: newRecorder()}
	ctx := namespaces.WithNamespace(context.Background(), "testns")
	ctx, h.sd = shutdown.WithShutdown(ctx)
	h.ctx = ctx
	if newDriver == nil {
		newDriver = func(config.Hypervisor) (hypervisor.Driver, error) {
			h.drivers++
			return nil, h.driverErr
		}
	}
	svc, err := NewTaskService(ctx, h.events, h.sd, newDriver)
	if err != nil {
		t.Fatal(err)
	}
	h.svc = svc
	t.Cleanup(func() {
		h.sd.Shutdown()
		<-h.sd.Done()
	})
	return h
}

// writeBundle writes a bundle whose rootfs holds the static busybox.
func writeBundle(t *testing.T, dir string, s *specs.Spec) string {
	t.Helper()
	bundle := filepath.Join(dir, "bundle")
	if err := os.MkdirAll(filepath.Join(bundle, "rootfs", "bin"), 0o755); err != nil {
		t.Fatal(err)
	}
	b, err := json.Marshal(s)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(bundle, "config.json"), b, 0o600); err != nil {
		t.Fatal(err)
	}
	return bundle
}

func spec(args ...string) *specs.Spec {
	return &specs.Spec{
		Version: specs.Version,
		Process: &specs.Process{Args: args, Cwd: "/", Env: []string{"PATH=/bin"}},
		Root:    &specs.Root{Path: "rootfs"},
		Mounts: []specs.Mount{
			{Destination: "/proc", Type: "proc", Source: "proc"},
			{Destination: "/dev", Type: "tmpfs", Source: "tmpfs", Options: []string{"nosuid", "mode=755"}},
		},
		Linux: &specs.Linux{Namespaces: []specs.LinuxNamespace{
			{Type: specs.PIDNamespace}, {Type: specs.MountNamespace}, {Type: specs.IPCNamespace}, {Type: specs.UTSNamespace},
		}},
	}
}

func isCode(is func(error) bool) func(error) bool {
	return func(err error) bool { return is(errgrpc.ToNative(err)) }
}

func TestCreateErrors(t *testing.T) {
	dir := t.TempDir()
	good := writeBundle(t, filepath.Join(dir, "good"), spec("/bin/sh"))
	bad := writeBundle(t, filepath.Join(dir, "bad"), spec())
	for _, tc := range []struct {
		name      string
		req       *taskAPI.CreateTaskRequest
		driverErr error
		is        func(error) bool
		msg       string
		drivers   int
	}{
		{"no bundle", &taskAPI.CreateTaskRequest{ID: "t1", Bundle: filepath.Join(dir, "nope")}, nil, errdefs.IsInvalidArgument, "has no config.json", 0},
		{"bad spec", &taskAPI.CreateTaskRequest{ID: "t1", Bundle: bad}, nil, errdefs.IsInvalidArgument, "process.args is empty", 0},
		// Never Unimplemented: containerd would retry with an older task
		// API (notUnimplemented).
		{"checkpoint", &taskAPI.CreateTaskRequest{ID: "t1", Bundle: good, Checkpoint: "/x"}, nil, errdefs.IsFailedPrecondition, "checkpoint", 0},
		{"unknown stdio scheme", &taskAPI.CreateTaskRequest{ID: "t1", Bundle: good, Stdout: "syslog://x"}, nil, errdefs.IsFailedPrecondition, "syslog://", 0},
		{"driver", &taskAPI.CreateTaskRequest{ID: "t1", Bundle: good}, errors.New("no qemu here"), func(error) bool { return true }, "no qemu here", 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Setenv(config.EnvPath, "")
			h := newHarness(t, nil)
			h.driverErr = tc.driverErr
			_, err := h.svc.Create(h.ctx, tc.req)
			if err == nil || !isCode(tc.is)(err) || !strings.Contains(err.Error(), tc.msg) {
				t.Fatalf("Create = %v, want an error of the right kind containing %q", err, tc.msg)
			}
			if h.drivers != tc.drivers {
				t.Errorf("%d drivers made, want %d", h.drivers, tc.drivers)
			}
			// Not registered: the ID is free again.
			if _, err := h.svc.State(h.ctx, &taskAPI.StateRequest{ID: "t1"}); !isCode(errdefs.IsNotFound)(err) {
				t.Errorf("State after a failed create: %v", err)
			}
			if len(h.events.snapshot()) != 0 {
				t.Errorf("events published: %+v", h.events.snapshot())
			}
		})
	}
}

func TestUnknownTask(t *testing.T) {
	h := newHarness(t, nil)
	ctx := h.ctx
	for name, call := range map[string]func() error{
		"State":   func() error { _, err := h.svc.State(ctx, &taskAPI.StateRequest{ID: "x"}); return err },
		"Start":   func() error { _, err := h.svc.Start(ctx, &taskAPI.StartRequest{ID: "x"}); return err },
		"Kill":    func() error { _, err := h.svc.Kill(ctx, &taskAPI.KillRequest{ID: "x", Signal: 9}); return err },
		"Wait":    func() error { _, err := h.svc.Wait(ctx, &taskAPI.WaitRequest{ID: "x"}); return err },
		"Delete":  func() error { _, err := h.svc.Delete(ctx, &taskAPI.DeleteRequest{ID: "x"}); return err },
		"CloseIO": func() error { _, err := h.svc.CloseIO(ctx, &taskAPI.CloseIORequest{ID: "x", Stdin: true}); return err },
		"Pids":    func() error { _, err := h.svc.Pids(ctx, &taskAPI.PidsRequest{ID: "x"}); return err },
		"exec":    func() error { _, err := h.svc.State(ctx, &taskAPI.StateRequest{ID: "x", ExecID: "e1"}); return err },
		"Exec":    func() error { _, err := h.svc.Exec(ctx, &taskAPI.ExecProcessRequest{ID: "x", ExecID: "e"}); return err },
		"Pause":   func() error { _, err := h.svc.Pause(ctx, &taskAPI.PauseRequest{ID: "x"}); return err },
		"Resume":  func() error { _, err := h.svc.Resume(ctx, &taskAPI.ResumeRequest{ID: "x"}); return err },
		"Stats":   func() error { _, err := h.svc.Stats(ctx, &taskAPI.StatsRequest{ID: "x"}); return err },
		"Update":  func() error { _, err := h.svc.Update(ctx, &taskAPI.UpdateTaskRequest{ID: "x"}); return err },
		"ResizePty": func() error {
			_, err := h.svc.ResizePty(ctx, &taskAPI.ResizePtyRequest{ID: "x"})
			return err
		},
	} {
		if err := call(); !isCode(errdefs.IsNotFound)(err) {
			t.Errorf("%s of an unknown task: %v, want not found", name, err)
		}
	}
	for name, call := range map[string]func() error{
		"Checkpoint": func() error { _, err := h.svc.Checkpoint(ctx, &taskAPI.CheckpointTaskRequest{ID: "x"}); return err },
	} {
		if err := call(); !isCode(errdefs.IsNotImplemented)(err) {
			t.Errorf("%s: %v, want not implemented", name, err)
		}
	}
	resp, err := h.svc.Connect(ctx, &taskAPI.ConnectRequest{ID: "x"})
	if err != nil || resp.ShimPid != uint32(os.Getpid()) || resp.TaskPid != 0 {
		t.Errorf("Connect = %+v, %v", resp, err)
	}
	if _, err := h.svc.Shutdown(ctx, &taskAPI.ShutdownRequest{}); err != nil {
		t.Fatal(err)
	}
	select {
	case <-h.sd.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("Shutdown with no tasks did not shut the shim down")
	}
}

// realVMs configures real VMs from $COLO_TEST_GUEST (see shim/sandbox)
// with their state under a new directory, which it returns.
func realVMs(t *testing.T) string {
	t.Helper()
	guest := os.Getenv("COLO_TEST_GUEST")
	if guest == "" || os.Geteuid() != 0 {
		t.Skip("set COLO_TEST_GUEST (and run as root) to boot real VMs")
	}
	if _, err := os.Stat("/bin/busybox"); err != nil {
		t.Skipf("no static busybox: %v", err)
	}
	dir, err := filepath.EvalSymlinks(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	cfgPath := filepath.Join(dir, "colo.toml")
	cfgText := "[hypervisor]\naccel = \"tcg\"\nkernel = \"" + filepath.Join(guest, "vmlinux") + "\"\ninitrd = \"" +
		filepath.Join(guest, "initrd.img") + "\"\nboot_timeout = \"60s\"\n[runtime]\nstate_dir = \"" + filepath.Join(dir, "state") + "\"\ntemplate_dir = \"" + filepath.Join(dir, "templates") + "\"\n"
	if err := os.WriteFile(cfgPath, []byte(cfgText), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Setenv(config.EnvPath, cfgPath)
	t.Cleanup(func() {
		if err := driver.ReleaseTemplates(filepath.Join(dir, "templates")); err != nil {
			t.Error(err)
		}
	})
	return dir
}

// mountsLeft are the mounts under a realVMs directory but the templates'
// ramfs, which outlives sandboxes.
func mountsLeft(dir string) []string {
	left, _ := storage.MountsUnder(dir)
	return slices.DeleteFunc(left, func(m string) bool { return m == filepath.Join(dir, "templates") })
}

// busyboxBundle writes a bundle in dir whose rootfs holds the static
// busybox as /bin/sh.
func busyboxBundle(t *testing.T, dir string, s *specs.Spec) string {
	t.Helper()
	busybox, err := os.ReadFile("/bin/busybox")
	if err != nil {
		t.Fatal(err)
	}
	bundle := writeBundle(t, dir, s)
	if err := os.WriteFile(filepath.Join(bundle, "rootfs", "bin", "busybox"), busybox, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("busybox", filepath.Join(bundle, "rootfs", "bin", "sh")); err != nil {
		t.Fatal(err)
	}
	return bundle
}

// TestTaskLifecycle runs a task in a real VM and checks the events
// containerd gets, in order.
func TestTaskLifecycle(t *testing.T) {
	dir := realVMs(t)
	stateDir := filepath.Join(dir, "state")
	bundle := busyboxBundle(t, dir, spec("/bin/sh", "-c", "echo hi; exit 7"))
	stdoutPath := filepath.Join(dir, "stdout")
	stdout, err := fifo.OpenFifo(context.Background(), stdoutPath, syscall.O_RDONLY|syscall.O_CREAT|syscall.O_NONBLOCK, 0o700)
	if err != nil {
		t.Fatal(err)
	}
	defer stdout.Close()

	h := newHarness(t, driver.New)
	ctx := h.ctx
	created, err := h.svc.Create(ctx, &taskAPI.CreateTaskRequest{ID: "t1", Bundle: bundle, Stdout: stdoutPath})
	if err != nil {
		t.Fatal(err)
	}
	vmPid := created.Pid
	if vmPid == 0 {
		t.Fatal("no pid")
	}
	if _, err := h.svc.Create(ctx, &taskAPI.CreateTaskRequest{ID: "t1", Bundle: bundle}); !isCode(errdefs.IsAlreadyExists)(err) {
		t.Errorf("second Create: %v", err)
	}
	st, err := h.svc.State(ctx, &taskAPI.StateRequest{ID: "t1"})
	if err != nil || st.Status != task.Status_CREATED || st.Pid != vmPid || st.Stdout != stdoutPath || st.Bundle != bundle {
		t.Errorf("State after create = %+v, %v", st, err)
	}
	out := make(chan string, 1)
	go func() { b, _ := io.ReadAll(stdout); out <- string(b) }()
	started, err := h.svc.Start(ctx, &taskAPI.StartRequest{ID: "t1"})
	if err != nil || started.Pid != vmPid {
		t.Fatalf("Start = %+v, %v", started, err)
	}
	w, err := h.svc.Wait(ctx, &taskAPI.WaitRequest{ID: "t1"})
	if err != nil || w.ExitStatus != 7 {
		t.Errorf("Wait = %+v, %v", w, err)
	}
	if s := <-out; s != "hi\n" {
		t.Errorf("stdout = %q", s)
	}
	st, err = h.svc.State(ctx, &taskAPI.StateRequest{ID: "t1"})
	if err != nil || st.Status != task.Status_STOPPED || st.ExitStatus != 7 || st.ExitedAt == nil {
		t.Errorf("State after exit = %+v, %v", st, err)
	}
	if _, err := h.svc.Shutdown(ctx, &taskAPI.ShutdownRequest{}); err != nil {
		t.Fatal(err)
	}
	select {
	case <-h.sd.Done():
		t.Fatal("Shutdown with a task left shut the shim down")
	default:
	}
	d, err := h.svc.Delete(ctx, &taskAPI.DeleteRequest{ID: "t1"})
	if err != nil || d.ExitStatus != 7 || d.Pid != vmPid {
		t.Fatalf("Delete = %+v, %v", d, err)
	}

	evs := h.events.waitFor(t, 4)
	if c, ok := evs[0].(*eventstypes.TaskCreate); !ok || c.ContainerID != "t1" || c.Pid != vmPid || c.Bundle != bundle {
		t.Errorf("event 0 = %+v", evs[0])
	}
	if s, ok := evs[1].(*eventstypes.TaskStart); !ok || s.Pid != vmPid {
		t.Errorf("event 1 = %+v", evs[1])
	}
	if x, ok := evs[2].(*eventstypes.TaskExit); !ok || x.ContainerID != "t1" || x.ID != "t1" || x.ExitStatus != 7 || x.Pid != vmPid {
		t.Errorf("event 2 = %+v", evs[2])
	}
	if x, ok := evs[3].(*eventstypes.TaskDelete); !ok || x.ExitStatus != 7 {
		t.Errorf("event 3 = %+v", evs[3])
	}

	if _, err := os.Stat(filepath.Join(stateDir, "testns", "t1")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("sandbox dir left: %v", err)
	}
	if left := mountsLeft(dir); len(left) > 0 {
		t.Errorf("mounts left: %v", left)
	}
	if _, err := os.Stat(filepath.Join(bundle, "colo-sandbox")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("bundle file left: %v", err)
	}
	if err := syscall.Kill(int(vmPid), 0); err == nil {
		t.Errorf("VM %d still running", vmPid)
	}
}

// TestDropExecutablePages: the shim's read-only executable pages leave its
// resident set, and it runs on as before.
func TestDropExecutablePages(t *testing.T) {
	exeRSS := func() int {
		exe, err := os.Executable()
		if err != nil {
			t.Fatal(err)
		}
		b, err := os.ReadFile("/proc/self/smaps")
		if err != nil {
			t.Fatal(err)
		}
		total, mine := 0, false
		for _, line := range strings.Split(string(b), "\n") {
			f := strings.Fields(line)
			switch {
			case len(f) >= 5 && strings.Contains(f[0], "-"):
				mine = len(f) == 6 && f[5] == exe && !strings.ContainsRune(f[1], 'w')
			case mine && len(f) == 3 && f[0] == "Rss:":
				kb, _ := strconv.Atoi(f[1])
				total += kb
			}
		}
		return total
	}
	before := exeRSS()
	if err := dropExecutablePages(); err != nil {
		t.Fatal(err)
	}
	after := exeRSS()
	if before == 0 || after >= before {
		t.Errorf("read-only executable pages resident: %d kB before, %d kB after", before, after)
	}
	t.Logf("executable pages resident: %d kB before, %d kB after", before, after)
}
