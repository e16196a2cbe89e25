package qemu

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
	"unsafe"

	"github.com/mdlayher/vsock"
	"golang.org/x/sys/unix"

	"github.com/colo-runtime/colo/hypervisor"
)

// TestClonable: templates need q35, a template directory and no host PCI
// device; the agent channel does not matter.
func TestClonable(t *testing.T) {
	vm := hypervisor.VMConfig{ID: "pod", Dir: "/run/vm", TemplateDir: "/run/colo/templates", AgentPort: testAgentPort}
	for _, tc := range []struct {
		name    string
		machine string
		cfg     func(*hypervisor.VMConfig)
		want    bool
	}{
		{"q35 serial", "q35", func(c *hypervisor.VMConfig) { c.Channel = hypervisor.ChannelSerial }, true},
		{"q35 vsock", "q35", func(c *hypervisor.VMConfig) { c.Channel = hypervisor.ChannelVsock }, true},
		{"microvm", "microvm", func(c *hypervisor.VMConfig) { c.Channel = hypervisor.ChannelVsock }, false},
		{"no template dir", "q35", func(c *hypervisor.VMConfig) { c.Channel, c.TemplateDir = hypervisor.ChannelVsock, "" }, false},
		{"host PCI device", "q35", func(c *hypervisor.VMConfig) {
			c.Channel = hypervisor.ChannelVsock
			c.PCIDevices = []hypervisor.PCIDevice{{ID: "nvme0", Address: "0000:45:00.0"}}
		}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := &Driver{machine: tc.machine}
			if got := d.clonable(with(vm, tc.cfg)); got != tc.want {
				t.Errorf("clonable = %v, want %v", got, tc.want)
			}
		})
	}
}

// templateFiles are stand-ins for the QEMU binary, kernel and initrd a
// template key is made of.
func templateFiles(t *testing.T) (qemu, kernel, initrd string) {
	t.Helper()
	dir := t.TempDir()
	var files []string
	for _, name := range []string{"qemu", "vmlinux", "initrd.img"} {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(name), 0o644); err != nil {
			t.Fatal(err)
		}
		files = append(files, p)
	}
	return files[0], files[1], files[2]
}

// TestCloneVsockArgs: a vsock clone starts with its template's command line
// but for the device's guest CID and vhostfd, which are the clone's own
// (start reserves them); the template's launch has its own too.
func TestCloneVsockArgs(t *testing.T) {
	qemu, kernel, initrd := templateFiles(t)
	d := &Driver{path: qemu, machine: "q35", accel: accelTCG}
	cfg := hypervisor.VMConfig{
		ID: "pod", Dir: "/run/vm", VCPUs: 1, MemoryMB: 256, Channel: hypervisor.ChannelVsock, AgentPort: testAgentPort,
		Kernel: kernel, Initrd: initrd, TemplateDir: "/run/colo/templates",
	}
	tmpl := d.templateLaunch(cfg, "/run/colo/templates/key.tmp")
	tmpl.qmpFD, tmpl.vhostFD, tmpl.cid = 3, 4, 1234
	clone := d.launch(cfg)
	clone.snapshot = snapshotClone
	clone.memPath = "/run/colo/templates/key/memory"
	clone.qmpFD, clone.vhostFD, clone.cid = 3, 5, 5678

	device := func(args []string) string {
		for i, a := range args[:len(args)-1] {
			if a == "-device" && strings.HasPrefix(args[i+1], "vhost-vsock-pci,") {
				return args[i+1]
			}
		}
		return ""
	}
	for _, tc := range []struct {
		name string
		l    launch
		want string
	}{
		{"template", tmpl, "vhost-vsock-pci,id=vsock0,guest-cid=1234,vhostfd=4"},
		{"clone", clone, "vhost-vsock-pci,id=vsock0,guest-cid=5678,vhostfd=5"},
	} {
		args := tc.l.args()
		if got := device(args); got != tc.want {
			t.Errorf("%s: vsock device %q, want %q (args %q)", tc.name, got, tc.want, args)
		}
		if got, want := slices.Contains(args, "-incoming"), tc.l.snapshot == snapshotClone; got != want {
			t.Errorf("%s: -incoming in the args: %v, want %v", tc.name, got, want)
		}
	}
}

// TestTemplateKeyChannel: serial and vsock VMs never share a template, and
// vsock VMs share one whatever their CIDs (no CID is reserved for the key).
func TestTemplateKeyChannel(t *testing.T) {
	qemu, kernel, initrd := templateFiles(t)
	d := &Driver{path: qemu, machine: "q35", accel: accelTCG}
	base := hypervisor.VMConfig{
		VCPUs: 1, MemoryMB: 256, AgentPort: testAgentPort, Kernel: kernel, Initrd: initrd, TemplateDir: "/run/colo/templates",
	}
	key := func(id string, channel hypervisor.AgentChannel) string {
		t.Helper()
		cfg := base
		cfg.ID, cfg.Dir, cfg.Channel = id, "/run/"+id, channel
		k, err := d.templateKey(cfg)
		if err != nil {
			t.Fatal(err)
		}
		return k
	}
	serial, vsockA, vsockB := key("a", hypervisor.ChannelSerial), key("a", hypervisor.ChannelVsock), key("b", hypervisor.ChannelVsock)
	if serial == vsockA {
		t.Errorf("serial and vsock VMs share the template %s", serial)
	}
	if vsockA != vsockB {
		t.Errorf("two vsock VMs of one configuration: templates %s and %s, want one", vsockA, vsockB)
	}
}

// TestVsockDeviceProperties checks the vsock device's properties the
// command line sets against the QEMU installed (-device MODEL,help, which
// needs no /dev/vhost-vsock), on both machines.
func TestVsockDeviceProperties(t *testing.T) {
	path, err := exec.LookPath(DefaultBinary)
	if err != nil {
		t.Skipf("no QEMU: %v", err)
	}
	cfg := hypervisor.VMConfig{ID: "pod", Dir: "/run/vm", VCPUs: 1, MemoryMB: 256, Channel: hypervisor.ChannelVsock, AgentPort: testAgentPort, Kernel: "/k/vmlinux", Initrd: "/k/initrd.img"}
	for _, machine := range []string{"q35", "microvm"} {
		t.Run(machine, func(t *testing.T) {
			l := launch{vm: cfg, machine: machine, accel: accelTCG, pidfile: "/run/vm/qemu.pid", qmpFD: 3, vhostFD: 4, cid: 1234}
			args := l.args()
			var arg string
			for i, a := range args[:len(args)-1] {
				if a == "-device" && strings.HasPrefix(args[i+1], "vhost-vsock-") {
					arg = args[i+1]
				}
			}
			if arg == "" {
				t.Fatalf("no vhost-vsock device in %q", args)
			}
			driver, _, _ := strings.Cut(arg, ",")
			out, err := exec.Command(path, "-device", driver+",help").Output()
			if err != nil || !strings.HasPrefix(string(out), driver+" options:") {
				t.Fatalf("%s,help: %q, %v", driver, out, err)
			}
			var props []string
			for _, line := range strings.Split(string(out), "\n") {
				if name, _, ok := strings.Cut(strings.TrimSpace(line), "="); ok {
					props = append(props, name)
				}
			}
			var set []string
			for _, kv := range strings.Split(arg, ",")[1:] {
				name, _, _ := strings.Cut(kv, "=")
				set = append(set, name)
				if name != "id" && !slices.Contains(props, name) { // id: every device's
					t.Errorf("%s: %s has no property %s (it has %q)", arg, driver, name, props)
				}
			}
			// What a clone's own CID rests on.
			for _, name := range []string{"guest-cid", "vhostfd"} {
				if !slices.Contains(set, name) {
					t.Errorf("%s does not set %s", arg, name)
				}
			}
		})
	}
}

// TestTemplateVsock: two VMs restored from one vsock template run at once,
// each on a guest CID of its own (neither the template's nor the other's),
// and each answers on it; the template's CID is freed once it is saved.
// Needs vhost-vsock on the host.
func TestTemplateVsock(t *testing.T) {
	if _, err := os.Stat(vsockDevice); err != nil {
		t.Skipf("needs %s: %v (modprobe vhost_vsock)", vsockDevice, err)
	}
	ctx, logs := testContext(t)
	d := newDriver(t, "q35")
	templates := templateDir(t)
	type clone struct {
		vm  *VM
		dir string
	}
	var clones []clone
	for i := range 2 {
		dir := vmDir(t)
		vm, err := d.Start(ctx, hypervisor.VMConfig{
			ID: fmt.Sprintf("vsock%d", i), Dir: dir, Channel: hypervisor.ChannelVsock, AgentPort: testAgentPort, TemplateDir: templates,
			KernelParams: []string{fmt.Sprintf("testinit.vsock=%d", testAgentPort.Vsock)},
		})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { vm.Stop(context.Background()) })
		clones = append(clones, clone{vm.(*VM), dir})
	}
	if n := strings.Count(logs.String(), "qemu: template made"); n != 1 {
		t.Errorf("%d templates made for one configuration, want 1", n)
	}
	if n := strings.Count(logs.String(), "qemu: started from a template"); n != 2 {
		t.Errorf("%d VMs started from a template, want 2", n)
	}
	m := regexp.MustCompile(`guest=template,.*?guest-cid=(\d+),`).FindStringSubmatch(logs.String())
	if m == nil {
		t.Fatal("the template's command line (with its guest CID) is not in the driver's log")
	}
	templateCID := m[1]
	for i, c := range clones {
		args := strings.Join(c.vm.cmd.Args, " ")
		if !strings.Contains(args, "-incoming defer") {
			t.Errorf("clone %d was booted, not restored: %s", i, args)
		}
		own := fmt.Sprintf("guest-cid=%d,", c.vm.cid)
		if !strings.Contains(args, own) || fmt.Sprint(c.vm.cid) == templateCID {
			t.Errorf("clone %d: CID %d (the template's %s), command line %s: want a CID of its own on it", i, c.vm.cid, templateCID, args)
		}
		if free := cidFree(t, c.vm.cid); free {
			t.Errorf("clone %d: its CID %d is free: QEMU does not hold it", i, c.vm.cid)
		}
		bootCtx, cancel := context.WithTimeout(ctx, time.Minute)
		waitDialable(t, bootCtx, c.vm)
		if report := readAgent(t, bootCtx, c.vm); len(report) != 0 {
			t.Errorf("clone %d reported %q", i, report)
		}
		cancel()
	}
	if clones[0].vm.cid == clones[1].vm.cid {
		t.Errorf("both clones on CID %d", clones[0].vm.cid)
	}
	if cid, _ := strconv.ParseUint(templateCID, 10, 32); !cidFree(t, uint32(cid)) {
		t.Errorf("the template's CID %d is still held after it was saved", cid)
	}

	// The first clone gone, the second still answers on its CID, and
	// nothing answers on the first's.
	stopped(t, clones[0].vm, clones[0].dir)
	bootCtx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	readAgent(t, bootCtx, clones[1].vm)
	dialCtx, dialCancel := context.WithTimeout(ctx, 5*time.Second)
	defer dialCancel()
	if conn, err := vsock.DialContext(dialCtx, clones[0].vm.cid, testAgentPort.Vsock, nil); err == nil {
		conn.Close()
		t.Errorf("CID %d of the stopped clone answers", clones[0].vm.cid)
	}
	stopped(t, clones[1].vm, clones[1].dir)
}

// waitDialable dials the agent of a vsock clone until a connection is
// accepted: until the restored guest has taken its new CID (see
// startClone) a dial does not connect.
func waitDialable(t *testing.T, ctx context.Context, vm *VM) {
	t.Helper()
	for {
		conn, err := vm.DialAgent(ctx)
		if err == nil {
			conn.Close()
			return
		}
		select {
		case <-ctx.Done():
			t.Fatalf("vm %s: the agent did not answer on CID %d: %v", vm.id, vm.cid, err)
		case <-vm.done:
			t.Fatalf("vm %s: %s", vm.id, vm.describeExit())
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// cidFree tells whether the guest CID is free on this host: a vhost-vsock
// device of the test's own can claim it (and gives it back on close).
func cidFree(t *testing.T, cid uint32) bool {
	t.Helper()
	f, err := os.OpenFile(vsockDevice, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	c := uint64(cid)
	_, _, errno := unix.Syscall(unix.SYS_IOCTL, f.Fd(), vhostVsockSetGuestCID, uintptr(unsafe.Pointer(&c)))
	switch errno {
	case 0:
		return true
	case unix.EADDRINUSE:
		return false
	}
	t.Fatalf("set guest cid %d: %v", cid, errno)
	return false
}
