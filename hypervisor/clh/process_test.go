package clh

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/colo-runtime/colo/config"
	"github.com/colo-runtime/colo/hypervisor"
	"github.com/colo-runtime/colo/hypervisor/clh/clhtest"
	"github.com/colo-runtime/colo/internal/procfs"
)

// fakeCH builds testdata/fakech as a "cloud-hypervisor" binary and returns
// a driver that runs it, and the file it logs requests to.
func fakeCH(t *testing.T, bootTimeout time.Duration) (*Driver, string) {
	t.Helper()
	bin, err := clhtest.BuildFakeCH(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	logPath := filepath.Join(t.TempDir(), "requests.jsonl")
	t.Setenv("FAKECH_LOG", logPath)
	d, err := New(config.Hypervisor{Path: bin, BootTimeout: config.Duration(bootTimeout)}, fakeKVM(t))
	if err != nil {
		t.Fatal(err)
	}
	return d, logPath
}

// fakeKVM is a KVM that Check finds usable, for a fake CH on a host
// without one: a device that opens read-write and a CPU with vmx.
func fakeKVM(t *testing.T) Option {
	dev, cpuinfo, err := clhtest.FakeKVM(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	return WithKVM(dev, cpuinfo)
}

// New makes no driver where CH cannot run, and says why.
func TestNewChecks(t *testing.T) {
	bin := filepath.Join(t.TempDir(), "cloud-hypervisor")
	if err := os.WriteFile(bin, []byte("#!/bin/sh\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	cfg := config.Hypervisor{Path: bin}
	if _, err := New(cfg, fakeKVM(t)); err != nil {
		t.Fatalf("New with a usable KVM: %v", err)
	}
	nokvm := filepath.Join(t.TempDir(), "kvm")
	if _, err := New(cfg, WithKVM(nokvm, "/proc/cpuinfo")); err == nil || !strings.Contains(err.Error(), "needs KVM") || !strings.Contains(err.Error(), nokvm) {
		t.Errorf("New without KVM: %v, want an error naming KVM and %s", err, nokvm)
	}
	cfg.Path = filepath.Join(t.TempDir(), "cloud-hypervisor")
	if _, err := New(cfg, fakeKVM(t)); err == nil || !strings.Contains(err.Error(), cfg.Path) {
		t.Errorf("New without the binary: %v, want an error naming %s", err, cfg.Path)
	}
}

func readLog(t *testing.T, path string) []clhtest.Record {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var recs []clhtest.Record
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		var r clhtest.Record
		if err := json.Unmarshal(sc.Bytes(), &r); err != nil {
			t.Fatal(err)
		}
		if r.Violation != "" {
			t.Errorf("request against the spec: %s", r.Violation)
		}
		recs = append(recs, r)
	}
	return recs
}

// vmConfig is a VM of the fake: the kernel and initrd only need to exist.
func testVMConfig(t *testing.T) hypervisor.VMConfig {
	dir := t.TempDir()
	for _, f := range []string{"vmlinux", "initrd"} {
		os.WriteFile(filepath.Join(dir, f), []byte("x"), 0o600)
	}
	vmDir := filepath.Join(dir, "vm")
	os.Mkdir(vmDir, 0o700)
	return hypervisor.VMConfig{
		ID: "t1", Dir: vmDir, VCPUs: 1, MaxVCPUs: 3, MemoryMB: 256, MaxMemoryMB: 512,
		Kernel: filepath.Join(dir, "vmlinux"), Initrd: filepath.Join(dir, "initrd"),
		KernelParams: []string{"colo.channel=vsock"},
		AgentPort:    hypervisor.GuestPort{Vsock: agentVsock},
	}
}

// The guest's vsock ports of the tests.
const (
	agentVsock   = 1024
	consoleVsock = 1025
	forwardVsock = 1026
)

// guestListener is a guest port fakech forwards to (FAKECH_VSOCK): each
// connection is greeted with hello.
func guestListener(t *testing.T, hello string) string {
	path := filepath.Join(t.TempDir(), "guest.sock")
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			c.Write([]byte(hello + "\n"))
			c.Close()
		}
	}()
	return path
}

// assertGone checks that the process and the driver's files are gone.
func assertGone(t *testing.T, p procfs.Proc, dir string) {
	t.Helper()
	if !p.Gone() {
		t.Errorf("pid %d still runs", p.Pid)
		p.Kill()
	}
	for _, f := range driverFiles(dir) {
		if _, err := os.Lstat(f); err == nil {
			t.Errorf("%s left behind", f)
		}
	}
}

func TestStartStop(t *testing.T) {
	d, logPath := fakeCH(t, 20*time.Second)
	// The agent's port echoes, the console's greets; nothing listens on
	// the port-forward channel's.
	t.Setenv("FAKECH_VSOCK", fmt.Sprintf("%d=echo,%d=%s", agentVsock, consoleVsock, guestListener(t, "console")))
	cfg := testVMConfig(t)
	cfg.DebugConsole = hypervisor.GuestPort{Vsock: consoleVsock, Serial: "console.0"}
	cfg.PortForward = hypervisor.GuestPort{Vsock: forwardVsock}
	tapR, tapW, _ := os.Pipe()
	defer tapR.Close()
	defer tapW.Close()
	mac, _ := net.ParseMAC("52:54:00:00:00:01")
	cfg.NICs = []hypervisor.NIC{{ID: "eth0", MAC: mac, TAP: tapR}}
	cfg.PCIDevices = []hypervisor.PCIDevice{{ID: "nic1", Address: "0000:45:00.1"}}
	fsSock := filepath.Join(t.TempDir(), "virtiofsd.sock")
	l, err := net.Listen("unix", fsSock)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	cfg.Shares = []hypervisor.Share{{Tag: "rootfs", Kind: hypervisor.ShareVirtioFS, Path: fsSock}}

	ctx := ctxT(t)
	hv, err := d.Start(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	vm := hv.(*VM)
	proc := procfs.Of(vm.Pid())
	defer func() {
		if err := vm.Stop(ctx); err != nil {
			t.Error(err)
		}
		if vm.Err() != nil {
			t.Errorf("Err after Stop: %v", vm.Err())
		}
		assertGone(t, proc, cfg.Dir)
		recs := readLog(t, logPath)
		var sawNet, sawCreate bool
		for _, r := range recs {
			switch r.Endpoint {
			case "vm.add-net":
				want, _ := clhtest.FDOf(tapR)
				sawNet = len(r.FDs) == 1 && r.FDs[0] == want
			case "vm.create":
				var c vmConfig
				json.Unmarshal(r.Body, &c)
				sawCreate = c.Memory.Shared && c.Memory.HotplugMethod == "VirtioMem" && len(c.FS) == 1 && len(c.Devices) == 1 && c.PVPanic
			}
		}
		if !sawNet {
			t.Error("the TAP did not reach CH with vm.add-net")
		}
		if !sawCreate {
			t.Error("vm.create without shared memory, virtio-mem, the share, the device or pvpanic")
		}
	}()

	conn, err := vm.DialAgent(ctx)
	if err != nil {
		t.Fatal(err)
	}
	conn.Write([]byte("ping\n"))
	line, err := bufio.NewReader(conn).ReadString('\n')
	conn.Close()
	if err != nil || line != "ping\n" {
		t.Errorf("agent echo: %q, %v", line, err)
	}

	// The console is read from the FIFO as the guest writes it.
	deadline := time.Now().Add(10 * time.Second)
	for !strings.Contains(strings.Join(vm.Console(), "\n"), "fake guest: booting") && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if c := strings.Join(vm.Console(), "\n"); !strings.Contains(c, "colo.channel=vsock") || !strings.Contains(c, "console=ttyS0") {
		t.Errorf("console %q: want the guest's line with the kernel command line", c)
	}

	for _, n := range []int{1, 3, 2} {
		if err := vm.SetVCPUs(ctx, n); err != nil {
			t.Fatal(err)
		}
		tids, err := vm.VCPUThreads(ctx)
		if err != nil || len(tids) != n {
			t.Fatalf("after SetVCPUs(%d): VCPUThreads = %v, %v", n, tids, err)
		}
		size, err := vm.Size(ctx)
		if err != nil || size.VCPUs != n {
			t.Fatalf("after SetVCPUs(%d): Size = %+v, %v", n, size, err)
		}
	}
	if err := vm.SetVCPUs(ctx, 4); err == nil {
		t.Error("SetVCPUs above max vcpus succeeded")
	}
	if dev, err := vm.GuestDevice(ctx, "nic1"); err != nil || dev.PCIPath == "" {
		t.Errorf("GuestDevice(nic1) = %+v, %v", dev, err)
	}

	select {
	case <-vm.Panicked():
		t.Fatal("Panicked before a panic")
	default:
	}
	syscall.Kill(vm.Pid(), syscall.SIGUSR1)
	select {
	case <-vm.Panicked():
	case <-ctx.Done():
		t.Fatal("no panic seen")
	}
	dump := filepath.Join(t.TempDir(), "vmcore")
	if err := vm.Dump(ctx, dump); err != nil {
		t.Errorf("Dump: %v", err)
	}
	if err := vm.Dump(ctx, dump); err == nil {
		t.Error("Dump over an existing file succeeded")
	}
	// Each channel is dialed on its own port.
	if c, err := vm.DialConsole(ctx); err != nil {
		t.Errorf("DialConsole: %v", err)
	} else {
		line, err := bufio.NewReader(c).ReadString('\n')
		c.Close()
		if line != "console\n" {
			t.Errorf("DialConsole reached %q (%v), want the console's port", line, err)
		}
	}
	if _, err := vm.DialPortForward(ctx); err == nil || !strings.Contains(err.Error(), "nothing listens") || !strings.Contains(err.Error(), fmt.Sprint(forwardVsock)) {
		t.Errorf("DialPortForward with no listener on port %d: %v", forwardVsock, err)
	}
}

// Without a vsock port for them, the console and the port-forward channel
// are none: CH has no virtio-serial.
func TestNoVsockChannels(t *testing.T) {
	vm := &VM{id: "t", dir: t.TempDir(), done: make(chan struct{})}
	if _, err := vm.DialConsole(ctxT(t)); !errors.Is(err, hypervisor.ErrNoConsole) {
		t.Errorf("DialConsole = %v, want ErrNoConsole", err)
	}
	if _, err := vm.DialPortForward(ctxT(t)); err == nil || !strings.Contains(err.Error(), "no port-forward channel") {
		t.Errorf("DialPortForward = %v, want no port-forward channel", err)
	}
}

func TestStartFails(t *testing.T) {
	for _, tc := range []struct {
		name, mode, wantErr string
	}{
		{name: "dies", mode: "die", wantErr: "told to die"},
		{name: "no api", mode: "noapi", wantErr: "not booted within"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d, _ := fakeCH(t, 2*time.Second)
			t.Setenv("FAKECH_MODE", tc.mode)
			cfg := testVMConfig(t)
			vm, err := d.Start(ctxT(t), cfg)
			if err == nil {
				vm.Stop(ctxT(t))
				t.Fatal("Start succeeded")
			}
			if !strings.Contains(err.Error(), tc.wantErr) {
				t.Errorf("Start: %v, want %q", err, tc.wantErr)
			}
			assertGone(t, procfs.Proc{}, cfg.Dir)
			if ps := procfs.Find(func(args []string) bool { return isCHArgs(args, filepath.Join(cfg.Dir, APISocket)) }); len(ps) > 0 {
				t.Errorf("left running: %v", ps)
			}
		})
	}
}

// A controller that died leaves CH running: Cleanup finds it by what was
// recorded, or by its command line, and kills it.
func TestCleanup(t *testing.T) {
	for _, tc := range []struct {
		name   string
		record bool
		pid    bool
	}{
		{name: "recorded", record: true, pid: true},
		{name: "pid file only", pid: true},
		{name: "command line only"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d, _ := fakeCH(t, 20*time.Second)
			cfg := testVMConfig(t)
			ctx := ctxT(t)
			hv, err := d.Start(ctx, cfg)
			if err != nil {
				t.Fatal(err)
			}
			proc := procfs.Of(hv.Pid())
			rec := procfs.Proc{}
			if tc.record {
				rec = proc
			}
			if !tc.pid {
				os.Remove(filepath.Join(cfg.Dir, PidFile))
			}
			if err := Cleanup(ctx, cfg.Dir, rec); err != nil {
				t.Fatal(err)
			}
			<-hv.Done()
			assertGone(t, proc, cfg.Dir)
			// Nothing left: a second one is a no-op.
			if err := Cleanup(ctx, cfg.Dir, rec); err != nil {
				t.Fatal(err)
			}
		})
	}
}

func TestCompleteRejects(t *testing.T) {
	d := &Driver{}
	mac, _ := net.ParseMAC("52:54:00:00:00:01")
	r, w, _ := os.Pipe()
	defer r.Close()
	defer w.Close()
	for _, tc := range []struct {
		name    string
		edit    func(*hypervisor.VMConfig)
		wantErr string
	}{
		{name: "9p", edit: func(c *hypervisor.VMConfig) {
			c.Shares = []hypervisor.Share{{Tag: "a", Kind: hypervisor.Share9P, Path: c.Dir}}
		}, wantErr: "no 9p server"},
		{name: "e1000e", edit: func(c *hypervisor.VMConfig) {
			c.NICs = []hypervisor.NIC{{ID: "e", MAC: mac, TAP: r, Model: hypervisor.NICE1000E}}
		}, wantErr: "only virtio-net"},
		{name: "serial channel", edit: func(c *hypervisor.VMConfig) { c.Channel = hypervisor.ChannelSerial }, wantErr: "no virtio-serial"},
		{name: "no agent port", edit: func(c *hypervisor.VMConfig) { c.AgentPort = hypervisor.GuestPort{Serial: "agent.0"} }, wantErr: "no vsock port (AgentPort.Vsock)"},
		{name: "long dir", edit: func(c *hypervisor.VMConfig) {
			c.Dir = filepath.Join(c.Dir, strings.Repeat("d", 100))
			os.Mkdir(c.Dir, 0o700)
		}, wantErr: "too long for a unix socket path"},
		{name: "leftover", edit: func(c *hypervisor.VMConfig) {
			os.WriteFile(filepath.Join(c.Dir, PidFile), nil, 0o600)
		}, wantErr: "a VM may still run there"},
		{name: "memory block", edit: func(c *hypervisor.VMConfig) { c.BaseMemoryMB = 255 }, wantErr: "multiple of 2 MiB"},
		{name: "CH's id", edit: func(c *hypervisor.VMConfig) {
			c.PCIDevices = []hypervisor.PCIDevice{{ID: "_disk0", Address: "0000:45:00.0"}}
		}, wantErr: "want an id"},
		{name: "duplicate id", edit: func(c *hypervisor.VMConfig) {
			c.NICs = []hypervisor.NIC{{ID: "x", MAC: mac, TAP: r}}
			c.PCIDevices = []hypervisor.PCIDevice{{ID: "x", Address: "0000:45:00.0"}}
		}, wantErr: "duplicate id"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := testVMConfig(t)
			tc.edit(&cfg)
			if _, err := d.complete(cfg); err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Errorf("complete: %v, want %q", err, tc.wantErr)
			}
		})
	}
}
