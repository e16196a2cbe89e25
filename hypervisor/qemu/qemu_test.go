package qemu

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/log"
	"github.com/sirupsen/logrus"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/colo-runtime/colo/config"
	"github.com/colo-runtime/colo/hypervisor"
	"github.com/colo-runtime/colo/internal/procfs"
)

// The guest every test boots: the real Debian kernel and an initrd built by
// guest/build.sh with testdata/testinit as /init.
var guest struct {
	kernel, initrd string
}

// Environment of the test binary re-run as a controller that starts a VM
// and dies (TestCleanupOrphan).
const (
	controllerDirEnv    = "COLO_TEST_CONTROLLER_DIR"
	controllerKernelEnv = "COLO_TEST_CONTROLLER_KERNEL"
	controllerInitrdEnv = "COLO_TEST_CONTROLLER_INITRD"
)

func TestMain(m *testing.M) {
	if dir := os.Getenv(controllerDirEnv); dir != "" {
		os.Exit(controller(dir))
	}
	os.Exit(run(m))
}

// controller starts a VM and exits without stopping it, like a shim that
// crashed.
func controller(dir string) int {
	cfg := config.Default().Hypervisor
	cfg.Kernel, cfg.Initrd = os.Getenv(controllerKernelEnv), os.Getenv(controllerInitrdEnv)
	d, err := New(cfg)
	if err == nil {
		_, err = d.Start(context.Background(), hypervisor.VMConfig{ID: "orphan", Dir: dir, Channel: hypervisor.ChannelSerial, AgentPort: testAgentPort})
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	return 0
}

func run(m *testing.M) int {
	dir, err := os.MkdirTemp("", "colo-qemu-test-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)
	if err := buildGuest(dir); err != nil {
		fmt.Fprintln(os.Stderr, "building the test guest:", err)
		return 1
	}
	return m.Run()
}

func buildGuest(dir string) error {
	init := filepath.Join(dir, "testinit")
	build := exec.Command("go", "build", "-o", init, "./testdata/testinit")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		return fmt.Errorf("go build testinit: %w\n%s", err, out)
	}
	out := filepath.Join(dir, "guest")
	script := exec.Command("../../guest/build.sh", "--agent", init, "--out", out)
	if b, err := script.CombinedOutput(); err != nil {
		return fmt.Errorf("guest/build.sh: %w\n%s", err, b)
	}
	guest.kernel = filepath.Join(out, "vmlinux")
	guest.initrd = filepath.Join(out, "initrd.img")
	return nil
}

// logBuffer collects what the driver logs.
type logBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *logBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *logBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

func testContext(t *testing.T) (context.Context, *logBuffer) {
	t.Helper()
	logs := &logBuffer{}
	l := logrus.New()
	l.SetOutput(logs)
	l.SetLevel(logrus.DebugLevel)
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("driver log:\n%s", logs)
		}
	})
	return log.WithLogger(context.Background(), logrus.NewEntry(l)), logs
}

func newDriver(t *testing.T, machine string) *Driver {
	t.Helper()
	cfg := config.Default().Hypervisor
	cfg.Machine = machine
	cfg.Kernel, cfg.Initrd = guest.kernel, guest.initrd
	d, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return d
}

// vmDir is a short directory for the driver's sockets.
func vmDir(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "vm-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

// stopped stops vm and checks nothing is left: no process, no files.
func stopped(t *testing.T, vm hypervisor.VM, dir string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := vm.Stop(ctx); err != nil {
		t.Errorf("Stop: %v", err)
	}
	if err := vm.Err(); err != nil {
		t.Errorf("Err after Stop: %v", err)
	}
	gone(t, vm.Pid(), dir)
}

// gone checks that the process pid is not running and dir holds none of
// the driver's files.
func gone(t *testing.T, pid int, dir string) {
	t.Helper()
	if err := syscall.Kill(pid, 0); !errors.Is(err, syscall.ESRCH) {
		t.Errorf("qemu pid %d: kill 0: got %v, want ESRCH", pid, err)
	}
	for _, p := range driverFiles(dir) {
		if _, err := os.Lstat(p); !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("%s: still there (%v)", p, err)
		}
	}
}

// readAgent dials the agent's channel and reads the test init's report up
// to "ready", then checks an echo.
func readAgent(t *testing.T, ctx context.Context, vm hypervisor.VM) []string {
	t.Helper()
	conn, err := vm.DialAgent(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	stop := context.AfterFunc(ctx, func() { conn.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	r := bufio.NewReader(conn)
	var report []string
	for {
		line, err := r.ReadString('\n')
		if err != nil {
			t.Fatalf("reading the agent channel after %q: %v", report, err)
		}
		line = strings.TrimSpace(line)
		if line == "ready" {
			break
		}
		report = append(report, line)
	}
	if _, err := conn.Write([]byte("ping\n")); err != nil {
		t.Fatal(err)
	}
	if line, err := r.ReadString('\n'); err != nil || line != "echo ping\n" {
		t.Fatalf("echo: got %q, %v", line, err)
	}
	return report
}

func TestBoot(t *testing.T) {
	for _, tc := range []struct {
		machine string
		share   hypervisor.ShareKind
	}{
		{"q35", hypervisor.Share9P},
		{"q35", hypervisor.ShareVirtioFS},
		{"microvm", hypervisor.Share9P},
		{"microvm", hypervisor.ShareVirtioFS},
	} {
		t.Run(tc.machine+"/"+string(tc.share), func(t *testing.T) {
			ctx, logs := testContext(t)
			d := newDriver(t, tc.machine)
			dir := vmDir(t)

			shared := filepath.Join(dir, "shared")
			if err := os.Mkdir(shared, 0o755); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(filepath.Join(shared, "hello"), []byte("hello from "+tc.machine+"\n"), 0o644); err != nil {
				t.Fatal(err)
			}
			share := hypervisor.Share{Tag: "colo-test", Kind: tc.share, Path: shared, ReadOnly: true}
			param := "testinit.9p=colo-test"
			if tc.share == hypervisor.ShareVirtioFS {
				share.Path = startVirtiofsd(t, dir, shared)
				param = "testinit.virtiofs=colo-test"
			}

			started := time.Now()
			vm, err := d.Start(ctx, hypervisor.VMConfig{
				AgentPort:    testAgentPort,
				ID:           "boot-" + tc.machine,
				Dir:          dir,
				VCPUs:        1,
				MemoryMB:     256,
				KernelParams: []string{param},
				Shares:       []hypervisor.Share{share},
				Channel:      hypervisor.ChannelSerial,
			})
			if err != nil {
				t.Fatal(err)
			}
			defer stopped(t, vm, dir)
			t.Logf("Start returned after %v", time.Since(started))
			confined(t, vm, dir, true)

			st, err := vm.(*VM).qmp.QueryStatus(ctx)
			if err != nil || st.Status != "running" {
				t.Fatalf("query-status: got %+v, %v, want running", st, err)
			}

			bootCtx, cancel := context.WithTimeout(ctx, 2*time.Minute)
			defer cancel()
			report := readAgent(t, bootCtx, vm)
			t.Logf("agent channel answered %v after launch", time.Since(started))
			want := fmt.Sprintf("%s colo-test: hello from %s", map[hypervisor.ShareKind]string{
				hypervisor.Share9P: "9p", hypervisor.ShareVirtioFS: "virtiofs",
			}[tc.share], tc.machine)
			if len(report) != 1 || report[0] != want {
				t.Fatalf("guest report: got %q, want [%q]", report, want)
			}
			for line := range strings.Lines(logs.String()) {
				if strings.Contains(line, "testinit: started") {
					t.Logf("console: %s", strings.TrimSpace(line))
				}
			}
			if l := logs.String(); !strings.Contains(l, "testinit: ready") {
				t.Errorf("the guest console line \"testinit: ready\" is not in the driver's log")
			}
		})
	}
}

// startVirtiofsd serves dir on a socket the way the storage package does.
func startVirtiofsd(t *testing.T, vmDir, dir string) string {
	t.Helper()
	sock := filepath.Join(vmDir, "virtiofsd.sock")
	cmd := exec.Command(config.Default().Storage.Virtiofsd, "--socket-path="+sock, "-o", "source="+dir, "-o", "cache=none")
	out := &logBuffer{}
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() {
		cmd.Wait()
		close(exited)
	}()
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-exited
		if t.Failed() {
			t.Logf("virtiofsd:\n%s", out)
		}
	})
	// virtiofsd has no readiness signal: wait for its socket.
	for {
		if _, err := os.Stat(sock); err == nil {
			return sock
		}
		select {
		case <-exited:
			t.Fatalf("virtiofsd exited: %s", out)
		case <-time.After(10 * time.Millisecond):
		}
	}
}

func TestCleanup(t *testing.T) {
	ctx, _ := testContext(t)
	dir := vmDir(t)

	// A VM whose controller "died": nobody stops it.
	vm, err := newDriver(t, "q35").Start(ctx, hypervisor.VMConfig{ID: "abandoned", Dir: dir, Channel: hypervisor.ChannelSerial, AgentPort: testAgentPort})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		vm.(*VM).kill()
		<-vm.Done()
	})

	if err := Cleanup(ctx, dir, procfs.Proc{}); err != nil {
		t.Fatal(err)
	}
	// This process is still QEMU's parent: Done tells it has exited.
	<-vm.Done()
	if err := vm.Err(); err == nil || !strings.Contains(err.Error(), "signal: killed") {
		t.Errorf("Err: got %v, want the kill", err)
	}
	gone(t, vm.Pid(), dir)

	// Nothing left: Cleanup is a no-op.
	if err := Cleanup(ctx, dir, procfs.Proc{}); err != nil {
		t.Fatalf("second Cleanup: %v", err)
	}
}

// The VM's controller process died; QEMU lives on, its console pipe
// broken, until another process cleans up.
func TestCleanupOrphan(t *testing.T) {
	ctx, _ := testContext(t)
	dir := vmDir(t)

	// Orphans become our children again, so the test can reap QEMU and
	// check it is gone; without this they go to PID 1.
	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		t.Fatal(err)
	}
	defer unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)

	ctl := exec.Command(os.Args[0])
	ctl.Env = append(os.Environ(),
		controllerDirEnv+"="+dir, controllerKernelEnv+"="+guest.kernel, controllerInitrdEnv+"="+guest.initrd)
	if out, err := ctl.CombinedOutput(); err != nil {
		t.Fatalf("controller: %v\n%s", err, out)
	}
	b, err := os.ReadFile(filepath.Join(dir, PidFile))
	if err != nil {
		t.Fatal(err)
	}
	var pid int
	if _, err := fmt.Sscan(string(b), &pid); err != nil {
		t.Fatal(err)
	}
	reaped := false
	defer func() {
		if !reaped {
			syscall.Kill(pid, syscall.SIGKILL)
			unix.Wait4(pid, nil, 0, nil)
		}
	}()

	// The guest writes to the console after booting: QEMU must survive
	// writing to the dead controller's pipe.
	conn, err := (&net.Dialer{}).DialContext(ctx, "unix", filepath.Join(dir, AgentSocket))
	if err != nil {
		t.Fatal(err)
	}
	r := bufio.NewReader(conn)
	for {
		line, err := r.ReadString('\n')
		if err != nil {
			t.Fatalf("agent channel of the orphaned VM: %v", err)
		}
		if line == "ready\n" {
			break
		}
	}
	conn.Close()
	if err := syscall.Kill(pid, 0); err != nil {
		t.Fatalf("the orphaned QEMU died on its own: %v", err)
	}

	if err := Cleanup(ctx, dir, procfs.Proc{}); err != nil {
		t.Fatal(err)
	}
	// Cleanup returns once QEMU has exited: a zombie waiting for us.
	var ws unix.WaitStatus
	if _, err := unix.Wait4(pid, &ws, unix.WNOHANG, nil); err != nil || !ws.Signaled() || ws.Signal() != unix.SIGKILL {
		t.Fatalf("QEMU after Cleanup: wait4: %v, status %v; want killed by SIGKILL", err, ws)
	}
	reaped = true
	gone(t, pid, dir)
}

func TestCleanupPidReuse(t *testing.T) {
	ctx, _ := testContext(t)
	dir := vmDir(t)

	// The pid file names a process that is not QEMU (the pid was reused).
	other := exec.Command("sleep", "1000")
	if err := other.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		other.Process.Kill()
		other.Wait()
	})
	if err := os.WriteFile(filepath.Join(dir, PidFile), []byte(fmt.Sprintf("%d\n", other.Process.Pid)), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, QMPSocket), nil, 0o644); err != nil {
		t.Fatal(err)
	}

	if err := Cleanup(ctx, dir, procfs.Proc{}); err != nil {
		t.Fatal(err)
	}
	if err := other.Process.Signal(syscall.Signal(0)); err != nil {
		t.Errorf("Cleanup killed pid %d, which is not QEMU: %v", other.Process.Pid, err)
	}
	for _, p := range driverFiles(dir) {
		if _, err := os.Lstat(p); !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("%s: still there (%v)", p, err)
		}
	}
}

func TestStartErrors(t *testing.T) {
	notKernel := filepath.Join(t.TempDir(), "not-a-kernel")
	if err := os.WriteFile(notKernel, []byte("not an ELF file\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	_, vsockErr := os.Stat(vsockDevice)

	for _, tc := range []struct {
		name  string
		skip  bool
		setup func(dir string) // what is in the VM's dir already
		cfg   func(*hypervisor.VMConfig)
		want  []string
	}{{
		name: "leftover pid file",
		setup: func(dir string) {
			if err := os.WriteFile(filepath.Join(dir, PidFile), []byte("1\n"), 0o644); err != nil {
				t.Fatal(err)
			}
		},
		cfg:  func(*hypervisor.VMConfig) {},
		want: []string{"qemu.pid exists", "Cleanup"},
	}, {
		name: "missing kernel",
		cfg:  func(c *hypervisor.VMConfig) { c.Kernel = "/nonexistent/vmlinux" },
		want: []string{"kernel", "/nonexistent/vmlinux", "no such file"},
	}, {
		name: "missing initrd",
		cfg:  func(c *hypervisor.VMConfig) { c.Initrd = "/nonexistent/initrd.img" },
		want: []string{"initrd", "/nonexistent/initrd.img"},
	}, {
		name: "missing share",
		cfg: func(c *hypervisor.VMConfig) {
			c.Shares = []hypervisor.Share{{Tag: "t", Kind: hypervisor.Share9P, Path: "/nonexistent/share"}}
		},
		want: []string{"share t", "/nonexistent/share"},
	}, {
		name: "vsock without vhost-vsock",
		skip: vsockErr == nil,
		cfg:  func(c *hypervisor.VMConfig) { c.Channel = hypervisor.ChannelVsock },
		want: []string{"/dev/vhost-vsock"},
	}, {
		// QEMU itself refuses: its message and exit reach the error.
		name: "kernel QEMU cannot load",
		cfg:  func(c *hypervisor.VMConfig) { c.Kernel = notKernel },
		want: []string{"qemu exited: exit status 1", "last output:\n", "kernel"},
	}} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.skip {
				t.Skipf("%s exists on this host", vsockDevice)
			}
			ctx, _ := testContext(t)
			dir := vmDir(t)
			var before []string
			if tc.setup != nil {
				tc.setup(dir)
				entries, _ := os.ReadDir(dir)
				for _, e := range entries {
					before = append(before, filepath.Join(dir, e.Name()))
				}
			}
			cfg := hypervisor.VMConfig{ID: "bad", Dir: dir, Channel: hypervisor.ChannelSerial, AgentPort: testAgentPort}
			tc.cfg(&cfg)
			vm, err := newDriver(t, "q35").Start(ctx, cfg)
			if err == nil {
				vm.Stop(ctx)
				t.Fatal("Start succeeded")
			}
			t.Logf("error: %v", err)
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not contain %q", err, w)
				}
			}
			entries, _ := os.ReadDir(dir)
			for _, e := range entries {
				if p := filepath.Join(dir, e.Name()); !slices.Contains(before, p) {
					t.Errorf("left behind: %s", p)
				}
			}
			if pids := qemusFor(t, dir); len(pids) > 0 {
				t.Errorf("QEMU still running for %s: %v", dir, pids)
			}
		})
	}
}

// qemusFor lists the QEMU processes started with dir's pid file.
func qemusFor(t *testing.T, dir string) []string {
	t.Helper()
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	var pids []string
	for _, p := range procs {
		b, err := os.ReadFile(p)
		if err == nil && isQEMU(b, filepath.Join(dir, PidFile)) {
			pids = append(pids, filepath.Base(filepath.Dir(p)))
		}
	}
	return pids
}

// A guest that dies at boot (here: no init to run, so the kernel panics,
// panic=-1 reboots and -no-reboot ends QEMU) is reported with its console.
func TestGuestPanic(t *testing.T) {
	ctx, _ := testContext(t)
	dir := vmDir(t)
	vm, err := newDriver(t, "q35").Start(ctx, hypervisor.VMConfig{
		AgentPort:    testAgentPort,
		ID:           "panic",
		Dir:          dir,
		Channel:      hypervisor.ChannelSerial,
		KernelParams: []string{"rdinit=/nonexistent"},
	})
	if err != nil {
		// The panic may beat QMP on a slow host; the error must show it.
		if !strings.Contains(err.Error(), "Kernel panic") {
			t.Fatalf("Start: %v", err)
		}
		return
	}
	<-vm.Done()
	err = vm.Err()
	if err == nil {
		t.Fatal("Err is nil after the guest panicked")
	}
	t.Logf("Err: %v", err)
	for _, w := range []string{"Kernel panic", "exit status 0", "shutdown: guest-reset"} {
		if !strings.Contains(err.Error(), w) {
			t.Errorf("Err %q does not contain %q", err, w)
		}
	}
	if _, err := vm.DialAgent(ctx); err == nil || !strings.Contains(err.Error(), "Kernel panic") {
		t.Errorf("DialAgent after the exit: got %v, want the console in the error", err)
	}
	if err := vm.Stop(ctx); err != nil {
		t.Errorf("Stop: %v", err)
	}
	gone(t, vm.Pid(), dir)
}

// Stop kills a QEMU that does not quit in time.
func TestStopKills(t *testing.T) {
	ctx, _ := testContext(t)
	dir := vmDir(t)
	vm, err := newDriver(t, "q35").Start(ctx, hypervisor.VMConfig{ID: "stuck", Dir: dir, Channel: hypervisor.ChannelSerial, AgentPort: testAgentPort})
	if err != nil {
		t.Fatal(err)
	}
	// A stopped QEMU process answers no QMP command, quit included.
	if err := syscall.Kill(vm.Pid(), syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	stopCtx, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	if err := vm.Stop(stopCtx); err != nil {
		t.Errorf("Stop: %v", err)
	}
	gone(t, vm.Pid(), dir)
	if _, err := vm.DialAgent(ctx); err == nil {
		t.Error("DialAgent after Stop succeeded")
	}
}

// BenchmarkBoot measures launching QEMU until the guest's init answers on
// the agent channel (all modules loaded), then stops the VM untimed.
func BenchmarkBoot(b *testing.B) {
	for _, machine := range []string{"q35", "microvm"} {
		b.Run(machine, func(b *testing.B) {
			cfg := config.Default().Hypervisor
			cfg.Machine = machine
			cfg.Kernel, cfg.Initrd = guest.kernel, guest.initrd
			d, err := New(cfg)
			if err != nil {
				b.Fatal(err)
			}
			ctx := context.Background()
			for b.Loop() {
				dir, err := os.MkdirTemp("", "vm-")
				if err != nil {
					b.Fatal(err)
				}
				vm, err := d.Start(ctx, hypervisor.VMConfig{ID: "bench", Dir: dir, Channel: hypervisor.ChannelSerial, AgentPort: testAgentPort})
				if err != nil {
					b.Fatal(err)
				}
				conn, err := vm.DialAgent(ctx)
				if err == nil {
					r := bufio.NewReader(conn)
					for err == nil {
						var line string
						line, err = r.ReadString('\n')
						if line == "ready\n" {
							break
						}
					}
					conn.Close()
				}
				b.StopTimer()
				vm.Stop(ctx)
				os.RemoveAll(dir)
				if err != nil {
					b.Fatal(err)
				}
				b.StartTimer()
			}
		})
	}
}

// newTAP makes a TAP queue as the network package does, in this network
// namespace; it goes away with the last copy of its fd.
func newTAP(t *testing.T, name string) *os.File {
	t.Helper()
	tap := &netlink.Tuntap{
		LinkAttrs:  netlink.LinkAttrs{Name: name},
		Mode:       netlink.TUNTAP_MODE_TAP,
		Flags:      netlink.TUNTAP_NO_PI | netlink.TUNTAP_VNET_HDR | netlink.TUNTAP_ONE_QUEUE,
		Queues:     1,
		NonPersist: true,
	}
	if err := netlink.LinkAdd(tap); err != nil {
		t.Fatalf("TAP %s: %v", name, err)
	}
	t.Cleanup(func() { tap.Fds[0].Close() })
	return tap.Fds[0]
}

// TestNICs: a NIC at boot and one hot-plugged into a root port are QEMU
// devices with their MACs; with the ports taken, AddNIC fails clearly.
func TestNICs(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root for TAP devices")
	}
	ctx, _ := testContext(t)
	cfg := config.Default().Hypervisor
	cfg.Kernel, cfg.Initrd, cfg.HotplugPorts = guest.kernel, guest.initrd, 1
	d, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	dir := vmDir(t)
	prefix := fmt.Sprintf("ct%d", os.Getpid()%100000)
	boot := hypervisor.NIC{ID: "eth0", MAC: net.HardwareAddr{2, 0xc0, 0, 0, 0, 1}, MTU: 1400, TAP: newTAP(t, prefix+"a")}
	bootE := hypervisor.NIC{ID: "eth3", MAC: net.HardwareAddr{2, 0xc0, 0, 0, 0, 4}, MTU: 1400, TAP: newTAP(t, prefix+"d"), Model: hypervisor.NICE1000E}
	vm, err := d.Start(ctx, hypervisor.VMConfig{ID: "nics", Dir: dir, Channel: hypervisor.ChannelSerial, AgentPort: testAgentPort, NICs: []hypervisor.NIC{boot, bootE}})
	if err != nil {
		t.Fatal(err)
	}
	defer stopped(t, vm, dir)
	// With debug-threads QEMU names its vCPU threads "CPU <index>/TCG".
	tids, err := vm.VCPUThreads(ctx)
	if err != nil || len(tids) != cfg.VCPUs {
		t.Fatalf("VCPUThreads = %v, %v; want %d", tids, err, cfg.VCPUs)
	}
	for i, tid := range tids {
		comm, _ := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/comm", vm.Pid(), tid))
		if !strings.HasPrefix(string(comm), fmt.Sprintf("CPU %d/", i)) {
			t.Errorf("vCPU %d thread %d is %q", i, tid, comm)
		}
	}
	late := hypervisor.NIC{ID: "eth1", MAC: net.HardwareAddr{2, 0xc0, 0, 0, 0, 2}, MTU: 1400, TAP: newTAP(t, prefix+"b"), Model: hypervisor.NICE1000E}
	if err := vm.AddNIC(ctx, late); err != nil {
		t.Fatal(err)
	}
	confined(t, vm, dir, true)
	q := vm.(*VM).qmp
	for _, n := range []hypervisor.NIC{boot, bootE, late} {
		raw, err := q.Execute(ctx, "qom-get", map[string]any{"path": nicDeviceID(n.ID), "property": "mac"})
		if err != nil || string(raw) != `"`+n.MAC.String()+`"` {
			t.Errorf("nic %s: mac %s, %v; want %s", n.ID, raw, err, n.MAC)
		}
		want := "virtio-net-pci"
		if n.Model != "" {
			want = n.Model
		}
		if raw, err := q.Execute(ctx, "qom-get", map[string]any{"path": nicDeviceID(n.ID), "property": "type"}); err != nil || string(raw) != `"`+want+`"` {
			t.Errorf("nic %s: type %s, %v; want %s", n.ID, raw, err, want)
		}
	}
	extra := hypervisor.NIC{ID: "eth2", MAC: net.HardwareAddr{2, 0xc0, 0, 0, 0, 3}, TAP: newTAP(t, prefix+"c")}
	if err := vm.AddNIC(ctx, extra); err == nil || !strings.Contains(err.Error(), "no free hotplug port") {
		t.Errorf("AddNIC with every port taken: %v", err)
	}
	// The failed add left no backend behind: its id is free again.
	if _, err := q.Execute(ctx, "netdev_del", map[string]any{"id": "eth2"}); err == nil {
		t.Error("a netdev of the failed AddNIC is left")
	}
}

// TestTemplate: PrepareTemplate makes a configuration's template once, and
// every VM of it is restored from it; clones run (their guest answers on
// the agent channel) and a 9p share is each clone's own.
func TestTemplate(t *testing.T) {
	ctx, logs := testContext(t)
	d := newDriver(t, "q35")
	templates := templateDir(t)
	for i := range 2 {
		dir := vmDir(t)
		shared := filepath.Join(dir, "shared")
		if err := os.Mkdir(shared, 0o755); err != nil {
			t.Fatal(err)
		}
		cfg := hypervisor.VMConfig{
			ID: fmt.Sprintf("clone%d", i), Dir: dir, Channel: hypervisor.ChannelSerial, AgentPort: testAgentPort, TemplateDir: templates,
			Shares: []hypervisor.Share{{Tag: "colo-test", Kind: hypervisor.Share9P, Path: shared}},
		}
		if err := d.PrepareTemplate(ctx, cfg); err != nil {
			t.Fatal(err)
		}
		if n := strings.Count(logs.String(), "qemu: template made"); n != 1 {
			t.Fatalf("after PrepareTemplate %d: %d templates made, want 1", i, n)
		}
		vm, err := d.Start(ctx, cfg)
		if err != nil {
			t.Fatal(err)
		}
		bootCtx, cancel := context.WithTimeout(ctx, time.Minute)
		if report := readAgent(t, bootCtx, vm); len(report) != 0 {
			t.Errorf("clone %d reported %q", i, report)
		}
		cancel()
		if args := strings.Join(vm.(*VM).cmd.Args, " "); !strings.Contains(args, "-incoming defer") || !strings.Contains(args, "path="+shared) {
			t.Errorf("clone %d was not restored with its own share: %s", i, args)
		}
		confined(t, vm, dir, true)
		stopped(t, vm, dir)
	}
	if n := strings.Count(logs.String(), "qemu: template made"); n != 1 {
		t.Errorf("%d templates made for one configuration, want 1", n)
	}
	entries, _ := os.ReadDir(templates)
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	if len(names) != 2 || !strings.HasSuffix(names[1], ".lock") {
		t.Fatalf("template dir holds %v, want a template and its lock", names)
	}
	for _, f := range []string{templateState, templateMemory, templateInputs} {
		if _, err := os.Stat(filepath.Join(templates, names[0], f)); err != nil {
			t.Errorf("template: %v", err)
		}
	}

	// A rebuilt guest image gets a template of its own, and the old one,
	// which no VM can come from any more, goes.
	initrd := filepath.Join(t.TempDir(), "initrd.img")
	b, err := os.ReadFile(guest.initrd)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(initrd, b, 0o644); err != nil {
		t.Fatal(err)
	}
	dir := vmDir(t)
	vm, err := d.Start(ctx, hypervisor.VMConfig{ID: "rebuilt", Dir: dir, Channel: hypervisor.ChannelSerial, AgentPort: testAgentPort, TemplateDir: templates, Initrd: initrd})
	if err != nil {
		t.Fatal(err)
	}
	stopped(t, vm, dir)
	if err := os.Chtimes(initrd, time.Now(), time.Now().Add(time.Hour)); err != nil {
		t.Fatal(err)
	}
	dir = vmDir(t)
	if vm, err = d.Start(ctx, hypervisor.VMConfig{ID: "rebuilt-again", Dir: dir, Channel: hypervisor.ChannelSerial, AgentPort: testAgentPort, TemplateDir: templates, Initrd: initrd}); err != nil {
		t.Fatal(err)
	}
	stopped(t, vm, dir)
	var dirs []string
	entries, _ = os.ReadDir(templates)
	for _, e := range entries {
		if e.IsDir() {
			dirs = append(dirs, e.Name())
		}
	}
	if len(dirs) != 2 || !slices.Contains(dirs, names[0]) {
		t.Errorf("templates %v, want the first one and the latest (the one in between is stale)", dirs)
	}
}

// TestTemplateVirtioFS: a clone's virtio-fs device is hot-plugged after the
// restore (vhost-user devices cannot be migrated), the sandbox allowing.
func TestTemplateVirtioFS(t *testing.T) {
	ctx, _ := testContext(t)
	dir := vmDir(t)
	shared := filepath.Join(dir, "shared")
	if err := os.Mkdir(shared, 0o755); err != nil {
		t.Fatal(err)
	}
	vm, err := newDriver(t, "q35").Start(ctx, hypervisor.VMConfig{
		ID: "fs-clone", Dir: dir, Channel: hypervisor.ChannelSerial, AgentPort: testAgentPort, TemplateDir: templateDir(t),
		Shares: []hypervisor.Share{{Tag: "colo-test", Kind: hypervisor.ShareVirtioFS, Path: startVirtiofsd(t, dir, shared)}},
		// Headroom, and a clone bigger than its template: the memory
		// virtio-mem plugs is shared with virtiofsd too.
		VCPUs: 2, MemoryMB: 512, MaxVCPUs: 2, MaxMemoryMB: 512, BaseMemoryMB: 256, TemplateVCPUs: 1, TemplateMemoryMB: 256,
	})
	if err != nil {
		t.Fatal(err)
	}
	defer stopped(t, vm, dir)
	if !slices.Contains(vm.(*VM).cmd.Args, "-incoming") {
		t.Fatalf("not restored from a template: %q", vm.(*VM).cmd.Args)
	}
	raw, err := vm.(*VM).qmp.Execute(ctx, "qom-get", map[string]any{"path": "fs0-dev", "property": "type"})
	if err != nil || string(raw) != `"vhost-user-fs-pci"` {
		t.Errorf("hot-plugged virtio-fs device: %s, %v", raw, err)
	}
	bootCtx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	readAgent(t, bootCtx, vm)
	want := hypervisor.Size{VCPUs: 2, MemoryMB: 512, PluggedMB: 256}
	var got hypervisor.Size
	if err := vm.(*VM).waitUntil(bootCtx, time.Minute, func(ctx context.Context) (bool, error) {
		got, err = vm.Size(ctx)
		return got == want, err
	}); err != nil {
		t.Errorf("size %+v, want %+v: %v", got, want, err)
	}
	confined(t, vm, dir, true)
}

// confined checks that the running QEMU of vm is confined: QEMU itself (the
// pid the driver reports, in the pid file, is not a wrapper's), its seccomp
// filter on every thread if sandbox, no_new_privs, and no capabilities but
// qemuCapabilities.
func confined(t *testing.T, vm hypervisor.VM, dir string, sandbox bool) {
	t.Helper()
	pid := vm.Pid()
	if b, err := os.ReadFile(filepath.Join(dir, PidFile)); err != nil || strings.TrimSpace(string(b)) != strconv.Itoa(pid) {
		t.Errorf("pid file holds %q (%v), the driver reports pid %d", b, err, pid)
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil {
		t.Fatal(err)
	}
	args := strings.Split(strings.TrimRight(string(b), "\x00"), "\x00")
	if !strings.Contains(filepath.Base(args[0]), "qemu") {
		t.Errorf("pid %d runs %q, not QEMU", pid, args[0])
	}
	i := slices.Index(args, "-sandbox")
	switch {
	case sandbox && (i < 0 || i+1 == len(args) || args[i+1] != "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"):
		t.Errorf("QEMU's command line has no -sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny: %q", args)
	case !sandbox && i >= 0:
		t.Errorf("QEMU's command line has -sandbox with the sandbox off: %q", args)
	}

	self := procStatus(t, "/proc/self/status")
	var keep uint64
	for _, c := range qemuCapabilities {
		bit, ok := capabilityBits[c]
		if !ok {
			t.Fatalf("capability %q: add its number to capabilityBits", c)
		}
		keep |= 1 << bit
	}
	keep &= parseCaps(t, self["CapBnd"])
	seccomp := "0"
	if sandbox {
		seccomp = "2" // SECCOMP_MODE_FILTER
	}
	tasks, err := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/status", pid))
	if err != nil || len(tasks) == 0 {
		t.Fatalf("threads of QEMU %d: %v", pid, err)
	}
	for _, task := range tasks {
		st := procStatus(t, task)
		if st["Seccomp"] != seccomp || st["NoNewPrivs"] != "1" {
			t.Errorf("%s: Seccomp %q, NoNewPrivs %q; want %s and 1", task, st["Seccomp"], st["NoNewPrivs"], seccomp)
		}
		for _, set := range []string{"CapBnd", "CapPrm", "CapEff", "CapInh", "CapAmb"} {
			got := parseCaps(t, st[set])
			want := keep
			if set == "CapInh" || set == "CapAmb" {
				want = 0
			}
			if got != want {
				t.Errorf("%s: %s %016x, want %016x (%s)", task, set, got, want, strings.Join(qemuCapabilities, ", "))
			}
			for _, c := range []string{"sys_admin", "net_admin", "mknod", "dac_read_search", "setuid", "sys_ptrace"} {
				if got&(1<<capabilityBits[c]) != 0 {
					t.Errorf("%s: %s has %s", task, set, c)
				}
			}
		}
	}
}

// capabilityBits are the numbers of the capabilities confined knows.
var capabilityBits = map[string]uint{
	"chown": unix.CAP_CHOWN, "dac_override": unix.CAP_DAC_OVERRIDE, "dac_read_search": unix.CAP_DAC_READ_SEARCH,
	"fowner": unix.CAP_FOWNER, "fsetid": unix.CAP_FSETID, "setuid": unix.CAP_SETUID,
	"sys_admin": unix.CAP_SYS_ADMIN, "net_admin": unix.CAP_NET_ADMIN, "mknod": unix.CAP_MKNOD,
	"sys_ptrace": unix.CAP_SYS_PTRACE,
}

// procStatus reads the fields of a /proc status file.
func procStatus(t *testing.T, path string) map[string]string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	fields := make(map[string]string)
	for line := range strings.Lines(string(b)) {
		k, v, _ := strings.Cut(line, ":")
		fields[k] = strings.TrimSpace(v)
	}
	return fields
}

func parseCaps(t *testing.T, hex string) uint64 {
	t.Helper()
	v, err := strconv.ParseUint(hex, 16, 64)
	if err != nil {
		t.Fatalf("capability set %q: %v", hex, err)
	}
	return v
}

// TestSandboxOff: hypervisor.sandbox = false leaves QEMU's seccomp filter
// out, but not the rest of its confinement.
func TestSandboxOff(t *testing.T) {
	ctx, _ := testContext(t)
	cfg := config.Default().Hypervisor
	cfg.Kernel, cfg.Initrd, cfg.Sandbox = guest.kernel, guest.initrd, false
	d, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	dir := vmDir(t)
	vm, err := d.Start(ctx, hypervisor.VMConfig{ID: "unsandboxed", Dir: dir, Channel: hypervisor.ChannelSerial, AgentPort: testAgentPort})
	if err != nil {
		t.Fatal(err)
	}
	defer stopped(t, vm, dir)
	bootCtx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	readAgent(t, bootCtx, vm)
	confined(t, vm, dir, false)
}
