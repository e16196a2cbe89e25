package network

import (
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
)

// TestScan: the veth with its global addresses, routes (a route's own MTU
// too) and permanent neighbours; not loopback, not a bridge, not the
// kernel's routes for the addresses, not a TAP.
func TestScan(t *testing.T) {
	n := setupNet(t)
	ns, err := netns.GetFromName(n.pod)
	if err != nil {
		t.Fatal(err)
	}
	defer ns.Close()
	nl, err := netlink.NewHandleAt(ns)
	if err != nil {
		t.Fatal(err)
	}
	defer nl.Close()
	eth0, err := nl.LinkByName("eth0")
	if err != nil {
		t.Fatal(err)
	}
	for _, a := range []string{"10.99.0.2/24", "fd00:99::2/64"} {
		ad, _ := netlink.ParseAddr(a)
		ad.Flags = 0x02 // IFA_F_NODAD: usable at once
		if err := nl.AddrAdd(eth0, ad); err != nil {
			t.Fatalf("add %s: %v", a, err)
		}
	}
	_, extra, _ := net.ParseCIDR("10.98.0.0/16")
	for _, r := range []*netlink.Route{
		{LinkIndex: eth0.Attrs().Index, Gw: net.ParseIP("10.99.0.1")},
		{LinkIndex: eth0.Attrs().Index, Dst: extra, Gw: net.ParseIP("10.99.0.1"), MTU: 1300},
	} {
		if err := nl.RouteAdd(r); err != nil {
			t.Fatalf("route %v: %v", r, err)
		}
	}
	mac, _ := net.ParseMAC("02:00:00:00:00:01")
	if err := nl.NeighAdd(&netlink.Neigh{LinkIndex: eth0.Attrs().Index, IP: net.ParseIP("10.99.0.7"), HardwareAddr: mac,
		State: netlink.NUD_PERMANENT, Family: netlink.FAMILY_V4}); err != nil {
		t.Fatal(err)
	}
	if err := nl.LinkAdd(&netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: "br0"}}); err != nil {
		t.Fatal(err)
	}
	m, err := NewMirror(n.path(), "eth0", "tap0")
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()

	cfg, err := Scan(n.path())
	if err != nil {
		t.Fatal(err)
	}
	if len(cfg.Interfaces) != 1 {
		t.Fatalf("interfaces %+v, want eth0 only", cfg.Interfaces)
	}
	got := cfg.Interfaces[0]
	want := []netip.Prefix{netip.MustParsePrefix("10.99.0.2/24"), netip.MustParsePrefix("fd00:99::2/64")}
	slices.SortFunc(got.Addrs, func(a, b netip.Prefix) int { return a.Addr().Compare(b.Addr()) })
	if got.Name != "eth0" || got.MTU != 1400 || got.MAC.String() != eth0.Attrs().HardwareAddr.String() || !slices.Equal(got.Addrs, want) {
		t.Errorf("eth0 = %+v, want MTU 1400, its MAC and addresses %v", got, want)
	}
	wantRoutes := []Route{
		{Dest: netip.MustParsePrefix("10.98.0.0/16"), Gateway: netip.MustParseAddr("10.99.0.1"), Device: "eth0", MTU: 1300},
		{Gateway: netip.MustParseAddr("10.99.0.1"), Device: "eth0"},
	}
	var routes []Route
	for _, r := range cfg.Routes {
		if r.Dest.Addr().Is4() || !r.Dest.IsValid() && r.Gateway.Is4() {
			routes = append(routes, r)
		}
	}
	slices.SortFunc(routes, func(a, b Route) int { return b.Dest.Bits() - a.Dest.Bits() })
	if !slices.Equal(routes, wantRoutes) {
		t.Errorf("IPv4 routes %+v, want %+v", routes, wantRoutes)
	}
	if len(cfg.Neighbors) != 1 || cfg.Neighbors[0].IP != netip.MustParseAddr("10.99.0.7") || cfg.Neighbors[0].MAC.String() != mac.String() {
		t.Errorf("neighbours %+v, want 10.99.0.7 at %s", cfg.Neighbors, mac)
	}
}

func TestScanMissingNamespace(t *testing.T) {
	if _, err := Scan("/var/run/netns/colo-nonexistent"); err == nil {
		t.Fatal("no error for a missing namespace")
	}
}

// TestRemoveMirror: what a crashed runtime's mirror left (qdiscs, filters,
// a TAP kept by another holder of its fd) goes; again is a no-op.
func TestRemoveMirror(t *testing.T) {
	n := setupNet(t)
	m, err := NewMirror(n.path(), "eth0", "tap0")
	if err != nil {
		t.Fatal(err)
	}
	// The runtime died: its handles are gone but nobody cleaned up.
	defer m.File.Close()
	for i := 0; i < 2; i++ {
		if err := RemoveMirror(n.path(), "eth0", "tap0"); err != nil {
			t.Fatalf("RemoveMirror #%d: %v", i+1, err)
		}
	}
	qdiscs, err := m.nl.QdiscList(m.Veth)
	if err != nil {
		t.Fatal(err)
	}
	for _, q := range qdiscs {
		if q.Type() == "ingress" {
			t.Errorf("ingress qdisc left on the veth: %v", q)
		}
	}
	if _, err := m.nl.LinkByName("tap0"); err == nil {
		t.Error("TAP left")
	}
	if err := RemoveMirror("/var/run/netns/colo-nonexistent", "eth0", "tap0"); err != nil {
		t.Errorf("RemoveMirror in a namespace that is gone: %v", err)
	}
}

// TestScanPCIAddress: an interface backed by a PCI function carries its
// address, as sysfs names the PCI device it hangs from (a virtio NIC's is
// its virtio-pci function); a virtual one (the pod's veth) carries none. The host's own namespace
// stands in for a pod's with a physical NIC: its devices are what this
// machine has.
func TestScanPCIAddress(t *testing.T) {
	n := setupNet(t)
	pod, err := Scan("/run/netns/" + n.pod)
	if err != nil {
		t.Fatal(err)
	}
	for _, i := range pod.Interfaces {
		if i.PCIAddress != "" {
			t.Errorf("veth %s: PCI address %q, want none", i.Name, i.PCIAddress)
		}
	}
	host, err := Scan("/proc/self/ns/net")
	if err != nil {
		t.Fatal(err)
	}
	for _, i := range host.Interfaces {
		want := pciAncestor(filepath.Join("/sys/class/net", i.Name, "device"))
		if i.PCIAddress != want {
			t.Errorf("%s: PCI address %q, want %q (from sysfs)", i.Name, i.PCIAddress, want)
		}
		t.Logf("%s: PCI address %q", i.Name, i.PCIAddress)
	}
}

// pciAncestor is the sysfs name of the PCI device at or above the device
// link, or "".
func pciAncestor(link string) string {
	dev, err := filepath.EvalSymlinks(link)
	if err != nil {
		return ""
	}
	for ; dev != "/" && dev != "."; dev = filepath.Dir(dev) {
		if sub, err := os.Readlink(filepath.Join(dev, "subsystem")); err == nil && filepath.Base(sub) == "pci" {
			return filepath.Base(dev)
		}
	}
	return ""
}

// TestSetDown: the pod's interface goes down (a NIC to pass through);
// one that is not there is an error naming it.
func TestSetDown(t *testing.T) {
	n := setupNet(t)
	ns := "/run/netns/" + n.pod
	if err := SetDown(ns, "eth0"); err != nil {
		t.Fatal(err)
	}
	h, err := netns.GetFromName(n.pod)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	nl, err := netlink.NewHandleAt(h)
	if err != nil {
		t.Fatal(err)
	}
	defer nl.Close()
	l, err := nl.LinkByName("eth0")
	if err != nil {
		t.Fatal(err)
	}
	if l.Attrs().Flags&net.FlagUp != 0 {
		t.Errorf("eth0 is still up: %v", l.Attrs().Flags)
	}
	if err := SetDown(ns, "eth9"); err == nil || !strings.Contains(err.Error(), "eth9") {
		t.Errorf("SetDown of a missing interface: %v, want an error naming it", err)
	}
}
