package agent

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"path/filepath"
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
