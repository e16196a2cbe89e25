package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/containerd/errdefs"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/colo-runtime/colo/agentproto"
	"github.com/colo-runtime/colo/testbed"
)

// guestNet is a network namespace standing in for the guest, and a service
// that configures it.
func guestNet(t *testing.T) (*Service, *netlink.Handle, net.HardwareAddr) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root for network namespaces")
	}
	path, remove, err := testbed.NewNetNS(fmt.Sprintf("colo-agent-test-%d", os.Getpid()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { remove() })
	ns, err := netns.GetFromPath(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ns.Close() })
	nl, err := netlink.NewHandleAt(ns)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nl.Close)
	// Both ends in the test namespace: "nic0" is the guest NIC, "eth0" a
	// NIC that holds the name the pod's interface has.
	if err := nl.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "nic0"}, PeerName: "eth0"}); err != nil {
		t.Fatal(err)
	}
	nic, err := nl.LinkByName("nic0")
	if err != nil {
		t.Fatal(err)
	}
	svc, err := NewService(ServiceConfig{StateDir: t.TempDir(), NoPivotRoot: true, NetNS: path})
	if err != nil {
		t.Fatal(err)
	}
	return svc, nl, nic.Attrs().HardwareAddr
}

// TestNetwork: the NIC found by MAC takes the pod interface's name (the
// NIC in the way is renamed), MTU and addresses and comes up; routes, a
// route MTU and neighbours follow; bad input names what was wrong.
func TestNetwork(t *testing.T) {
	svc, nl, mac := guestNet(t)
	ctx := context.Background()
	got, err := svc.UpdateInterface(ctx, &agentproto.UpdateInterfaceRequest{Interface: &agentproto.Interface{
		Name: "eth0", HwAddr: mac.String(), Mtu: 1400,
		Addresses: []*agentproto.IPAddress{{Address: "10.97.0.5", PrefixLen: 24}, {Address: "fd00:97::5", PrefixLen: 64}},
	}})
	if err != nil {
		t.Fatal(err)
	}
	if got.GetName() != "eth0" || got.GetMtu() != 1400 || len(got.GetAddresses()) < 2 {
		t.Errorf("interface %v, want eth0 with MTU 1400 and both addresses", got)
	}
	link, err := nl.LinkByName("eth0")
	if err != nil || link.Attrs().HardwareAddr.String() != mac.String() || link.Attrs().Flags&net.FlagUp == 0 {
		t.Fatalf("eth0 = %v, %v; want the NIC with %s, up", link, err, mac)
	}

	_, err = svc.UpdateRoutes(ctx, &agentproto.UpdateRoutesRequest{Routes: []*agentproto.Route{
		{Dest: "10.96.0.0/16", Gateway: "10.97.0.1", Device: "eth0", Mtu: 1300},
		{Gateway: "10.97.0.1", Device: "eth0"},
	}})
	if err != nil {
		t.Fatal(err)
	}
	routes, err := nl.RouteList(link, netlink.FAMILY_V4)
	if err != nil {
		t.Fatal(err)
	}
	var seen []string
	for _, r := range routes {
		seen = append(seen, fmt.Sprintf("%v via %v mtu %d", r.Dst, r.Gw, r.MTU))
	}
	all := strings.Join(seen, "; ")
	for _, want := range []string{"10.96.0.0/16 via 10.97.0.1 mtu 1300", "0.0.0.0/0 via 10.97.0.1 mtu 0"} {
		if !strings.Contains(all, want) {
			t.Errorf("routes %q lack %q", all, want)
		}
	}

	if _, err := svc.AddARPNeighbors(ctx, &agentproto.AddARPNeighborsRequest{Neighbors: []*agentproto.Neighbor{
		{IpAddress: "10.97.0.9", HwAddr: "02:00:00:00:00:09", Device: "eth0"},
	}}); err != nil {
		t.Fatal(err)
	}
	neighs, err := nl.NeighList(link.Attrs().Index, netlink.FAMILY_V4)
	if err != nil {
		t.Fatal(err)
	}
	found := false
	for _, n := range neighs {
		found = found || n.IP.String() == "10.97.0.9" && n.HardwareAddr.String() == "02:00:00:00:00:09" && n.State == netlink.NUD_PERMANENT
	}
	if !found {
		t.Errorf("no permanent neighbour 10.97.0.9 in %v", neighs)
	}

	list, err := svc.ListInterfaces(ctx, &agentproto.ListInterfacesRequest{})
	if err != nil || len(list.GetInterfaces()) != 2 {
		t.Errorf("ListInterfaces = %v, %v; want both NICs", list, err)
	}

	for _, tc := range []struct {
		name string
		call func() error
		want string
	}{
		{"bad MAC", func() error {
			_, err := svc.UpdateInterface(ctx, &agentproto.UpdateInterfaceRequest{Interface: &agentproto.Interface{Name: "x", HwAddr: "nope"}})
			return err
		}, `hw_addr "nope"`},
		{"bad address", func() error {
			_, err := svc.UpdateInterface(ctx, &agentproto.UpdateInterfaceRequest{Interface: &agentproto.Interface{Name: "x", HwAddr: mac.String(),
				Addresses: []*agentproto.IPAddress{{Address: "10.0.0.1", PrefixLen: 40}}}})
			return err
		}, "10.0.0.1/40"},
		{"unknown route device", func() error {
			_, err := svc.UpdateRoutes(ctx, &agentproto.UpdateRoutesRequest{Routes: []*agentproto.Route{{Gateway: "10.97.0.1", Device: "eth9"}}})
			return err
		}, `device "eth9"`},
		{"mixed families", func() error {
			_, err := svc.UpdateRoutes(ctx, &agentproto.UpdateRoutesRequest{Routes: []*agentproto.Route{{Dest: "fd00::/64", Gateway: "10.97.0.1", Device: "eth0"}}})
			return err
		}, `gateway "10.97.0.1"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if err := tc.call(); err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %v, want one naming %s", err, tc.want)
			}
		})
	}
}

// TestClasses: a guest cgroup per class with its cpuset and weight, and the
// topology file; bad classes are refused.
func TestClasses(t *testing.T) {
	root := t.TempDir() // stands in for the guest's cgroup2 mount
	svc, err := NewService(ServiceConfig{StateDir: t.TempDir(), NoPivotRoot: true, CgroupRoot: root, TopologyFile: filepath.Join(t.TempDir(), "topology.json")})
	if err != nil {
		t.Fatal(err)
	}
	classes := []*agentproto.CPUClass{
		{Name: "high", Cpus: []uint32{0}, Weight: 100},
		{Name: "low", Cpus: []uint32{1, 2}, Weight: 10, OomScoreAdj: 500},
	}
	if err := svc.setupClasses(context.Background(), classes); err != nil {
		t.Fatal(err)
	}
	for file, want := range map[string]string{
		"colo-classes/cgroup.subtree_control": "+cpu +cpuset",
		"colo-classes/high/cpuset.cpus":       "0",
		"colo-classes/high/cpu.weight":        "100",
		"colo-classes/low/cpuset.cpus":        "1,2",
		"colo-classes/low/cpu.weight":         "10",
	} {
		if b, err := os.ReadFile(filepath.Join(root, file)); err != nil || string(b) != want {
			t.Errorf("%s = %q, %v; want %q", file, b, err, want)
		}
	}
	b, err := os.ReadFile(svc.topologyFile)
	if err != nil {
		t.Fatal(err)
	}
	var topo Topology
	if err := json.Unmarshal(b, &topo); err != nil {
		t.Fatal(err)
	}
	if len(topo.CPUs) != 3 || topo.CPUs[0].Class != "high" || topo.CPUs[2].Class != "low" || topo.Classes[1].OOMScoreAdj != 500 {
		t.Errorf("topology %s", b)
	}
	for _, bad := range [][]*agentproto.CPUClass{
		{{Name: "x", Weight: 100}},
		{{Name: "../x", Cpus: []uint32{0}, Weight: 100}},
		{{Name: "a", Cpus: []uint32{0}, Weight: 0}},
		{{Name: "a", Cpus: []uint32{0}, Weight: 1}, {Name: "b", Cpus: []uint32{0}, Weight: 1}},
	} {
		if err := svc.setupClasses(context.Background(), bad); !errdefs.IsInvalidArgument(err) {
			t.Errorf("classes %v: %v, want invalid argument", bad, err)
		}
	}
}

// nicFixture is a sysfs and procfs standing in for a guest's: eth0 a
// virtio NIC (its vectors named in interrupts), eth1 an emulated or
// passed-through PCI NIC with MSI-X vectors, eth2 one on a legacy INTx
// line, eth3 one with no interrupt at all, lo no device.
func nicFixture(t *testing.T) (sysRoot, procRoot string) {
	t.Helper()
	sysRoot, procRoot = t.TempDir(), t.TempDir()
	pci := filepath.Join(sysRoot, "devices/pci0000:00")
	devs := map[string]string{ // interface -> device directory below pci
		"eth0": "0000:00:02.0/virtio1",
		"eth1": "0000:00:03.0/0000:01:00.0",
		"eth2": "0000:00:04.0",
		"eth3": "0000:00:05.0",
	}
	files := map[string]string{
		"0000:00:03.0/0000:01:00.0/irq":         "0\n", // MSI-X in use
		"0000:00:03.0/0000:01:00.0/msi_irqs/40": "msix\n",
		"0000:00:03.0/0000:01:00.0/msi_irqs/41": "msix\n",
		"0000:00:03.0/0000:01:00.0/msi_irqs/39": "msix\n",
		"0000:00:04.0/irq":                      "11\n",
		"0000:00:05.0/irq":                      "0\n",
	}
	for name, body := range files {
		p := filepath.Join(pci, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	for ifname, dev := range devs {
		if err := os.MkdirAll(filepath.Join(pci, dev), 0o755); err != nil {
			t.Fatal(err)
		}
		dir := filepath.Join(sysRoot, "class/net", ifname)
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Symlink(filepath.Join(pci, dev), filepath.Join(dir, "device")); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.MkdirAll(filepath.Join(sysRoot, "class/net/lo"), 0o755); err != nil {
		t.Fatal(err)
	}
	interrupts := `           CPU0       CPU1
 11:          0          0   IO-APIC  11-fasteoi   uhci_hcd
 24:          0          0  PCI-MSI 16384-edge      virtio1-config
 25:         10          0  PCI-MSI 16385-edge      virtio1-input.0
 26:          3          0  PCI-MSI 16386-edge      virtio1-output.0
 27:          0          0  PCI-MSI 16387-edge      virtio10-input.0
 39:          1          0  PCI-MSI 524288-edge      eth1-rx-0
`
	if err := os.WriteFile(filepath.Join(procRoot, "interrupts"), []byte(interrupts), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, irq := range []string{"11", "24", "25", "26", "27", "39", "40", "41"} {
		dir := filepath.Join(procRoot, "irq", irq)
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, "smp_affinity_list"), []byte("0-3\n"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return sysRoot, procRoot
}

// TestPinNICIRQs: every interrupt of a NIC's device, virtio or a PCI
// function of its own (MSI-X or INTx), and no other, gets the CPUs.
func TestPinNICIRQs(t *testing.T) {
	for _, tc := range []struct {
		ifname string
		want   []int
	}{
		{ifname: "eth0", want: []int{24, 25, 26}}, // not virtio10's
		{ifname: "eth1", want: []int{39, 40, 41}}, // msi_irqs, not irq's 0
		{ifname: "eth2", want: []int{11}},
		{ifname: "eth3"},
		{ifname: "lo"},
	} {
		t.Run(tc.ifname, func(t *testing.T) {
			sysRoot, procRoot := nicFixture(t)
			got, err := pinNICIRQs(sysRoot, procRoot, tc.ifname, "2,3")
			if err != nil {
				t.Fatal(err)
			}
			if fmt.Sprint(got) != fmt.Sprint(tc.want) {
				t.Errorf("pinned IRQs %v, want %v", got, tc.want)
			}
			entries, err := os.ReadDir(filepath.Join(procRoot, "irq"))
			if err != nil {
				t.Fatal(err)
			}
			for _, e := range entries {
				b, err := os.ReadFile(filepath.Join(procRoot, "irq", e.Name(), "smp_affinity_list"))
				if err != nil {
					t.Fatal(err)
				}
				want := "0-3\n"
				if irq, _ := strconv.Atoi(e.Name()); slices.Contains(tc.want, irq) {
					want = "2,3"
				}
				if string(b) != want {
					t.Errorf("IRQ %s affinity %q, want %q", e.Name(), b, want)
				}
			}
		})
	}
	// A bad irq file is an error naming it, not a guess.
	sysRoot, procRoot := nicFixture(t)
	if err := os.WriteFile(filepath.Join(sysRoot, "devices/pci0000:00/0000:00:05.0/irq"), []byte("x\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := pinNICIRQs(sysRoot, procRoot, "eth3", "0"); err == nil || !strings.Contains(err.Error(), "eth3/device/irq") {
		t.Errorf("bad irq file: %v", err)
	}
}

// TestLoadNICDrivers: the drivers of PCI network controllers without one
// are loaded, each once; other devices and bound ones are left alone.
func TestLoadNICDrivers(t *testing.T) {
	sysRoot := t.TempDir()
	devices := filepath.Join(sysRoot, "bus/pci/devices")
	for name, class := range map[string]string{
		"0000:00:02.0": "0x020000", // virtio-net, bound
		"0000:01:00.0": "0x020000", // e1000e, no driver
		"0000:02:00.0": "0x028000", // another network controller, no driver
		"0000:03:00.0": "0x010802", // NVMe, no driver: not ours
	} {
		dir := filepath.Join(devices, name)
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, "class"), []byte(class+"\n"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Symlink("../../bus/pci/drivers/virtio-pci", filepath.Join(devices, "0000:00:02.0/driver")); err != nil {
		t.Fatal(err)
	}
	var loaded []string
	failure := errors.New("module not found")
	load := func(ctx context.Context, dev string) error {
		loaded = append(loaded, filepath.Base(dev))
		if filepath.Base(dev) == "0000:02:00.0" {
			return failure
		}
		return nil
	}
	tried := make(map[string]error)
	for range 2 { // the second pass loads nothing again
		loadNICDrivers(context.Background(), sysRoot, tried, load)
	}
	if want := []string{"0000:01:00.0", "0000:02:00.0"}; fmt.Sprint(loaded) != fmt.Sprint(want) {
		t.Errorf("drivers loaded for %v, want %v", loaded, want)
	}
	if err := tried[filepath.Join(devices, "0000:02:00.0")]; !errors.Is(err, failure) {
		t.Errorf("failure recorded: %v", err)
	}
}
