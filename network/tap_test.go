package network

import (
	"bytes"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/colo-runtime/colo/testbed"
)

// testNet is a pod namespace with a veth "eth0" whose peer "peer0"
// (10.99.0.1/24) sits in a second namespace, like a CNI bridge's side.
type testNet struct {
	pod, peer string // namespace names
}

func newNamespace(t *testing.T, name string) {
	t.Helper()
	_, remove, err := testbed.NewNetNS(name)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { remove() })
}

func setupNet(t *testing.T) testNet {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root")
	}
	n := testNet{pod: fmt.Sprintf("colo-pod-%d", os.Getpid()), peer: fmt.Sprintf("colo-peer-%d", os.Getpid())}
	newNamespace(t, n.pod)
	newNamespace(t, n.peer)
	podNS, _ := netns.GetFromName(n.pod)
	defer podNS.Close()
	peerNS, _ := netns.GetFromName(n.peer)
	defer peerNS.Close()
	nl, err := netlink.NewHandleAt(podNS)
	if err != nil {
		t.Fatal(err)
	}
	defer nl.Close()
	veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "eth0", MTU: 1400}, PeerName: "peer0", PeerNamespace: netlink.NsFd(peerNS)}
	if err := nl.LinkAdd(veth); err != nil {
		t.Fatalf("veth: %v", err)
	}
	eth0, err := nl.LinkByName("eth0")
	if err != nil {
		t.Fatal(err)
	}
	if err := nl.LinkSetUp(eth0); err != nil {
		t.Fatal(err)
	}
	pnl, err := netlink.NewHandleAt(peerNS)
	if err != nil {
		t.Fatal(err)
	}
	defer pnl.Close()
	peer0, err := pnl.LinkByName("peer0")
	if err != nil {
		t.Fatal(err)
	}
	addr, _ := netlink.ParseAddr("10.99.0.1/24")
	if err := pnl.AddrAdd(peer0, addr); err != nil {
		t.Fatal(err)
	}
	if err := pnl.LinkSetUp(peer0); err != nil {
		t.Fatal(err)
	}
	return n
}

func (n testNet) path() string { return filepath.Join("/var/run/netns", n.pod) }

// rxPackets counts what peer0 received.
func (n testNet) rxPackets(t *testing.T) uint64 {
	t.Helper()
	ns, _ := netns.GetFromName(n.peer)
	defer ns.Close()
	nl, err := netlink.NewHandleAt(ns)
	if err != nil {
		t.Fatal(err)
	}
	defer nl.Close()
	l, err := nl.LinkByName("peer0")
	if err != nil {
		t.Fatal(err)
	}
	return l.Attrs().Statistics.RxPackets
}

// TestMirror: traffic from the peer reaches the TAP, frames the VM writes
// to the TAP reach the peer, and Close leaves the veth as it was.
func TestMirror(t *testing.T) {
	n := setupNet(t)
	m, err := NewMirror(n.path(), "eth0", "tap0")
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	tap, err := m.nl.LinkByName("tap0")
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(tap.Attrs().HardwareAddr, m.Veth.Attrs().HardwareAddr) || tap.Attrs().MTU != 1400 || tap.Attrs().OperState == netlink.OperDown {
		t.Errorf("TAP has MAC %s MTU %d state %s, want the veth's %s, 1400, up", tap.Attrs().HardwareAddr, tap.Attrs().MTU, tap.Attrs().OperState, m.Veth.Attrs().HardwareAddr)
	}

	// peer -> veth -> TAP: a datagram to 10.99.0.2 makes the peer ARP for it.
	peerNS, _ := netns.GetFromName(n.peer)
	defer peerNS.Close()
	if err := inNamespace(peerNS, func() error {
		c, err := net.Dial("udp", "10.99.0.2:9")
		if err != nil {
			return err
		}
		defer c.Close()
		_, err = c.Write([]byte("hello"))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	m.File.SetReadDeadline(time.Now().Add(10 * time.Second))
	buf := make([]byte, 2048)
	nr, err := m.File.Read(buf)
	if err != nil {
		t.Fatalf("read the TAP: %v", err)
	}
	const vnetHdr = 10
	frame := buf[vnetHdr:nr]
	if nr < vnetHdr+14 || !bytes.Equal(frame[:6], []byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}) || frame[12] != 0x08 || frame[13] != 0x06 {
		t.Fatalf("want a broadcast ARP request on the TAP, got % x", buf[:nr])
	}

	// TAP -> veth -> peer: the VM's frame arrives at the peer.
	before := n.rxPackets(t)
	out := append(make([]byte, vnetHdr), frame...)
	if _, err := m.File.Write(out); err != nil {
		t.Fatalf("write the TAP: %v", err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for n.rxPackets(t) == before && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	if n.rxPackets(t) == before {
		t.Error("a frame written to the TAP did not reach the peer")
	}

	veth := m.Veth
	if err := m.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	podNS, _ := netns.GetFromName(n.pod)
	defer podNS.Close()
	nl, err := netlink.NewHandleAt(podNS)
	if err != nil {
		t.Fatal(err)
	}
	defer nl.Close()
	if _, err := nl.LinkByName("tap0"); err == nil {
		t.Error("TAP left after Close")
	}
	qdiscs, err := nl.QdiscList(veth)
	if err != nil {
		t.Fatal(err)
	}
	for _, q := range qdiscs {
		if q.Type() == "ingress" {
			t.Errorf("ingress qdisc left on the veth: %v", q)
		}
	}
}

func TestMirrorErrors(t *testing.T) {
	n := setupNet(t)
	for _, tc := range []struct{ name, ns, veth, want string }{
		{"missing namespace", "/var/run/netns/nonexistent", "eth0", "/var/run/netns/nonexistent"},
		{"missing veth", n.path(), "eth9", "eth9"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := NewMirror(tc.ns, tc.veth, "tap0")
			if err == nil || !bytes.Contains([]byte(err.Error()), []byte(tc.want)) {
				t.Fatalf("error %v, want one naming %s", err, tc.want)
			}
			podNS, _ := netns.GetFromName(n.pod)
			defer podNS.Close()
			nl, _ := netlink.NewHandleAt(podNS)
			defer nl.Close()
			if _, err := nl.LinkByName("tap0"); err == nil {
				t.Error("TAP left after a failed NewMirror")
			}
		})
	}
}
