package qemu

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/colo-runtime/colo/config"
	"github.com/colo-runtime/colo/hypervisor"
)

// absentDevice is a well-formed host PCI address no host has: bus 0xff,
// slot 0x1f, function 7 of domain 0.
const absentDevice = "0000:ff:1f.7"

func TestPCIDevicePlan(t *testing.T) {
	devs := []hypervisor.PCIDevice{{ID: "nvme0", Address: "0000:45:00.0"}, {ID: "nvme,1", Address: "0000:46:00.0"}}
	l := launch{machine: "q35", accel: accelTCG, hotplugPorts: 2, vm: hypervisor.VMConfig{ID: "p", PCIDevices: devs}}
	args := l.args()
	var ports, vfio []string
	for i, a := range args {
		if i > 0 && args[i-1] == "-device" && strings.HasPrefix(a, "pcie-root-port,") {
			ports = append(ports, a)
		}
		if i > 0 && args[i-1] == "-device" && strings.HasPrefix(a, "vfio-pci,") {
			vfio = append(vfio, a)
		}
	}
	wantPorts := []string{
		"pcie-root-port,id=hp0,bus=pcie.0,chassis=1",
		"pcie-root-port,id=hp1,bus=pcie.0,chassis=2",
		"pcie-root-port,id=hp2,bus=pcie.0,chassis=3",
		"pcie-root-port,id=hp3,bus=pcie.0,chassis=4",
	}
	wantVFIO := []string{
		"vfio-pci,host=0000:45:00.0,id=nvme0,bus=hp2",
		"vfio-pci,host=0000:46:00.0,id=nvme,,1,bus=hp3",
	}
	if !slices.Equal(ports, wantPorts) || !slices.Equal(vfio, wantVFIO) {
		t.Errorf("ports %q and devices %q; want %q and %q", ports, vfio, wantPorts, wantVFIO)
	}
	if got, want := l.ports(), []string{"", "", "nvme0", "nvme,1"}; !slices.Equal(got, want) {
		t.Errorf("ports() = %q, want %q", got, want)
	}
	if got := l.capabilities(); !slices.Equal(got, []string{memlockCapability}) {
		t.Errorf("capabilities() = %q, want %q", got, memlockCapability)
	}
	// Without devices: no extra port, no extra capability.
	l.vm.PCIDevices = nil
	if got := l.ports(); len(got) != 2 || l.capabilities() != nil {
		t.Errorf("without PCI devices: ports %q, capabilities %q", got, l.capabilities())
	}
	if a := l.pciDeviceArgs(); a != nil {
		t.Errorf("without PCI devices: %q", a)
	}
}

func TestCheckPCIDevices(t *testing.T) {
	dev := func(id, addr string) hypervisor.PCIDevice { return hypervisor.PCIDevice{ID: id, Address: addr} }
	many := make([]hypervisor.PCIDevice, 27)
	for i := range many {
		many[i] = dev("d"+string(rune('a'+i)), "0000:45:00.0")
	}
	for _, tc := range []struct {
		name    string
		machine string
		ports   int
		devs    []hypervisor.PCIDevice
		want    string
	}{
		{name: "none", machine: "microvm"},
		{name: "q35", machine: "q35", ports: 6, devs: []hypervisor.PCIDevice{dev("a", "0000:45:00.0"), dev("b", "0000:46:00.0")}},
		{name: "exactly 32 ports", machine: "q35", ports: 5, devs: many},
		{name: "33 ports", machine: "q35", ports: 6, devs: many, want: "27 PCI devices and hypervisor.hotplug_ports = 6 need 33 PCIe root ports: at most 32"},
		{name: "microvm", machine: "microvm", devs: []hypervisor.PCIDevice{dev("a", "0000:45:00.0")}, want: "machine microvm has no PCI bus"},
		{name: "bad address", machine: "q35", devs: []hypervisor.PCIDevice{dev("a", "45:00.0")}, want: `pci device a: vfio: "45:00.0" is not a PCI address`},
		{name: "bad id", machine: "q35", devs: []hypervisor.PCIDevice{dev("a,b", "0000:45:00.0")}, want: `pci device "a,b": want an id without commas`},
		{name: "empty id", machine: "q35", devs: []hypervisor.PCIDevice{dev("", "0000:45:00.0")}, want: `pci device "": want an id`},
		{name: "duplicate id", machine: "q35", devs: []hypervisor.PCIDevice{dev("a", "0000:45:00.0"), dev("a", "0000:46:00.0")}, want: "pci device a: duplicate id"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := checkPCIDevices(hypervisor.VMConfig{PCIDevices: tc.devs}, tc.machine, tc.ports)
			if tc.want == "" && err != nil || tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)) {
				t.Errorf("got %v, want %q", err, tc.want)
			}
		})
	}
}

// TestVFIOProperties: QEMU's own description of the devices has every
// property the driver sets on them.
func TestVFIOProperties(t *testing.T) {
	for driver, props := range map[string][]string{
		vfioDriver:       {"host"},
		"pcie-root-port": {"chassis"},
	} {
		out, err := exec.Command(DefaultBinary, "-device", driver+",help").CombinedOutput()
		if err != nil {
			t.Fatalf("%s -device %s,help: %v\n%s", DefaultBinary, driver, err, out)
		}
		for _, p := range props {
			if !regexp.MustCompile(`(?m)^\s+` + p + `=`).Match(out) {
				t.Errorf("%s has no property %s:\n%s", driver, p, out)
			}
		}
	}
}

// TestStartAbsentPCIDevice: a VM with a host PCI device that does not
// exist fails to start with QEMU's own vfio error (so the device reached
// QEMU's vfio code, on its root port: an unknown bus would fail before),
// leaves nothing behind, and makes no template although templates are on.
func TestStartAbsentPCIDevice(t *testing.T) {
	ctx, _ := testContext(t)
	dir := vmDir(t)
	templates := t.TempDir()
	cfg := hypervisor.VMConfig{
		ID: "vfio", Dir: dir, Channel: hypervisor.ChannelSerial, AgentPort: testAgentPort, TemplateDir: templates,
		PCIDevices: []hypervisor.PCIDevice{{ID: "nvme0", Address: absentDevice}},
	}
	vm, err := newDriver(t, "q35").Start(ctx, cfg)
	if err == nil {
		stopped(t, vm, dir)
		t.Fatal("Start succeeded")
	}
	t.Logf("error: %v", err)
	for _, want := range []string{
		"vfio-pci,host=" + absentDevice + ",id=nvme0,bus=hp6", // QEMU quotes the option
		"vfio /sys/bus/pci/devices/" + absentDevice + ": no such host device",
	} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error does not contain %q", want)
		}
	}
	if entries, _ := os.ReadDir(dir); len(entries) > 0 {
		t.Errorf("left in the VM dir: %v", entries)
	}
	if entries, _ := os.ReadDir(templates); len(entries) > 0 {
		t.Errorf("a VM with a PCI device used templates: %v", entries)
	}
	if pids := qemusFor(t, dir); len(pids) > 0 {
		t.Errorf("QEMU still running for %s: %v", dir, pids)
	}

	d := newDriver(t, "microvm")
	if _, err := d.Start(ctx, cfg); err == nil || !strings.Contains(err.Error(), "machine microvm has no PCI bus") {
		t.Errorf("microvm Start: %v", err)
	}
	if entries, _ := os.ReadDir(dir); len(entries) > 0 {
		t.Errorf("left in the VM dir by microvm: %v", entries)
	}
}

// TestAddAbsentPCIDevice: hot-plugging a host PCI device that does not
// exist fails with QEMU's vfio error, and the port stays free for the next
// device. QEMU's QMP schema has the commands the driver uses.
func TestAddAbsentPCIDevice(t *testing.T) {
	ctx, _ := testContext(t)
	cfg := config.Default().Hypervisor
	cfg.Kernel, cfg.Initrd, cfg.HotplugPorts = guest.kernel, guest.initrd, 1
	d, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	dir := vmDir(t)
	vm, err := d.Start(ctx, hypervisor.VMConfig{ID: "vfio-hot", Dir: dir, Channel: hypervisor.ChannelSerial, AgentPort: testAgentPort})
	if err != nil {
		t.Fatal(err)
	}
	defer stopped(t, vm, dir)
	q := vm.(*VM).qmp

	raw, err := q.Execute(ctx, "query-qmp-schema", nil)
	if err != nil {
		t.Fatal(err)
	}
	var schema []struct {
		Name     string `json:"name"`
		MetaType string `json:"meta-type"`
	}
	if err := json.Unmarshal(raw, &schema); err != nil {
		t.Fatal(err)
	}
	for _, cmd := range []string{"device_add", "device_del", "qom-get"} {
		if !slices.ContainsFunc(schema, func(e struct {
			Name     string `json:"name"`
			MetaType string `json:"meta-type"`
		}) bool {
			return e.Name == cmd && e.MetaType == "command"
		}) {
			t.Errorf("query-qmp-schema has no command %s", cmd)
		}
	}

	limit := func() string {
		b, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(vm.Pid()), "limits"))
		if err != nil {
			t.Fatal(err)
		}
		return regexp.MustCompile(`(?m)^Max locked memory.*$`).FindString(string(b))
	}
	before := limit()
	_, err = vm.AddPCIDevice(ctx, hypervisor.PCIDevice{ID: "nvme0", Address: absentDevice})
	if err == nil || !strings.Contains(err.Error(), "vfio /sys/bus/pci/devices/"+absentDevice+": no such host device") {
		t.Fatalf("AddPCIDevice: got %v, want QEMU's vfio error", err)
	}
	t.Logf("error: %v", err)
	if got := vm.(*VM).ports; !slices.Equal(got, []string{""}) {
		t.Errorf("ports after the failed add: %q, want the one free", got)
	}
	if _, err := q.Execute(ctx, "qom-get", map[string]any{"path": "/machine/peripheral/nvme0", "property": "type"}); err == nil {
		t.Error("device nvme0 is in QEMU after the failed add")
	}
	if got := limit(); got != before {
		t.Errorf("QEMU's memlock limit after the failed add: %q, was %q", got, before)
	}
	// The port is still there to take a device.
	if err := vm.(*VM).plug(ctx, map[string]any{"driver": "virtio-rng-pci", "id": "rng0"}); err != nil {
		t.Errorf("plug into the port the failed add left: %v", err)
	}
	if gd, err := vm.GuestDevice(ctx, "rng0"); err != nil || !regexp.MustCompile(`^[0-1][0-9a-f]\.[0-7]/00\.0$`).MatchString(gd.PCIPath) {
		t.Errorf("GuestDevice(rng0) = %+v, %v", gd, err)
	}
	if _, err := vm.AddPCIDevice(ctx, hypervisor.PCIDevice{ID: "nvme1", Address: "0000:45:00.0,x"}); err == nil || !strings.Contains(err.Error(), "not a PCI address") {
		t.Errorf("AddPCIDevice with a bad address: %v", err)
	}
	if err := vm.RemovePCIDevice(ctx, "nvme0"); err == nil || !strings.Contains(err.Error(), "no pci device nvme0") {
		t.Errorf("RemovePCIDevice of a device never added: %v", err)
	}
}
