package e2e

import (
	"context"
	"fmt"
	"net"
	"os"
	osexec "os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/colo-runtime/colo/testbed"
)

// podNet is a pod network namespace as CNI leaves one, with veths whose
// peers sit in a second namespace standing in for the node.
type podNet struct {
	t          *testing.T
	pod, peer  string // namespace names
	podH, peeH *netlink.Handle
}

func newNamedNS(t *testing.T, name string) *netlink.Handle {
	t.Helper()
	path, remove, err := testbed.NewNetNS(name)
	if err != nil {
		t.Fatal(err)
	}
	ns, err := netns.GetFromPath(path)
	if err != nil {
		t.Fatal(err)
	}
	defer ns.Close()
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		h.Close()
		if err := remove(); err != nil {
			t.Errorf("delete netns %s: %v", name, err)
		}
	})
	return h
}

func newPodNet(t *testing.T, name string) *podNet {
	t.Helper()
	n := &podNet{t: t, pod: name, peer: name + "-peer"}
	n.podH = newNamedNS(t, n.pod)
	n.peeH = newNamedNS(t, n.peer)
	return n
}

func (n *podNet) path() string { return filepath.Join("/var/run/netns", n.pod) }

// addVeth adds the pod interface dev with address addr (CIDR) and MTU,
// and its peer with peerAddr, both up.
func (n *podNet) addVeth(dev, addr, peerAddr string, mtu int) {
	t := n.t
	t.Helper()
	peerNS, err := netns.GetFromName(n.peer)
	if err != nil {
		t.Fatal(err)
	}
	defer peerNS.Close()
	peerName := "p-" + dev
	if err := n.podH.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: dev, MTU: mtu}, PeerName: peerName,
		PeerNamespace: netlink.NsFd(peerNS)}); err != nil {
		t.Fatalf("veth %s: %v", dev, err)
	}
	for _, side := range []struct {
		h          *netlink.Handle
		name, addr string
	}{{n.podH, dev, addr}, {n.peeH, peerName, peerAddr}} {
		l, err := side.h.LinkByName(side.name)
		if err != nil {
			t.Fatal(err)
		}
		if err := side.h.LinkSetMTU(l, mtu); err != nil {
			t.Fatal(err)
		}
		a, err := netlink.ParseAddr(side.addr)
		if err != nil {
			t.Fatal(err)
		}
		if err := side.h.AddrAdd(l, a); err != nil {
			t.Fatal(err)
		}
		if err := side.h.LinkSetUp(l); err != nil {
			t.Fatal(err)
		}
	}
}

func (n *podNet) addRoute(dev, dst, gw string, mtu int) {
	n.t.Helper()
	l, err := n.podH.LinkByName(dev)
	if err != nil {
		n.t.Fatal(err)
	}
	r := &netlink.Route{LinkIndex: l.Attrs().Index, Gw: net.ParseIP(gw), MTU: mtu}
	if dst != "" {
		if _, r.Dst, err = net.ParseCIDR(dst); err != nil {
			n.t.Fatal(err)
		}
	}
	if err := n.podH.RouteAdd(r); err != nil {
		n.t.Fatalf("route %s via %s: %v", dst, gw, err)
	}
}

// leftovers lists what colo adds to a pod namespace: TAPs and ingress
// qdiscs (the redirect filters hang off them).
func (n *podNet) leftovers() []string {
	links, err := n.podH.LinkList()
	if err != nil {
		n.t.Fatal(err)
	}
	var out []string
	for _, l := range links {
		if l.Type() == "tuntap" {
			out = append(out, "TAP "+l.Attrs().Name)
		}
		qs, err := n.podH.QdiscList(l)
		if err != nil {
			n.t.Fatal(err)
		}
		for _, q := range qs {
			if q.Type() == "ingress" {
				out = append(out, "ingress qdisc on "+l.Attrs().Name)
			}
		}
	}
	return out
}

// TestPodNetwork: a task that joins a network namespace with two
// interfaces gets both in its VM, with their MACs, MTUs, addresses and
// routes (a route's MTU too), and reaches the peers through the TAP
// mirrors; an interface added later is hot-plugged when the pod's next
// container is created; nothing of colo is left in the namespace after.
func TestPodNetwork(t *testing.T) {
	pod, second := "net-pod", "net-pod-c2"
	n := newPodNet(t, fmt.Sprintf("colo-e2e-%d", os.Getpid()))
	n.addVeth("eth0", "10.77.1.2/24", "10.77.1.1/24", 1450)
	n.addVeth("eth1", "10.77.2.2/24", "10.77.2.1/24", 1400)
	n.addRoute("eth0", "", "10.77.1.1", 0)
	n.addRoute("eth1", "10.78.0.0/16", "10.77.2.1", 1300)
	// Cleanups run last first: the tasks go, then the namespace is
	// checked, then it goes.
	t.Cleanup(func() {
		if left := n.leftovers(); len(left) > 0 {
			t.Errorf("left in the pod's network namespace: %v", left)
		}
	})
	checkNoLeaks(t, second, pod)
	// A tool busybox lacks, shared read-only from the host by a bind mount.
	root, err := testbed.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	tools := t.TempDir()
	build := osexec.Command("go", "build", "-o", filepath.Join(tools, "routes"), filepath.Join(root, "e2e", "testdata", "routes"))
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build routes: %v: %s", err, out)
	}
	withNS := "--with-ns=network:" + n.path()
	annotations := func(kind string) []string {
		return []string{"--null-io", withNS, "--mount", "type=bind,src=" + tools + ",dst=/colo-tools,options=rbind:ro",
			"--annotation", "io.kubernetes.cri.container-type=" + kind,
			"--annotation", "io.kubernetes.cri.sandbox-id=" + pod}
	}
	startDetached(t, testbed.Runtime, pod, annotations("sandbox"), "sleep", "1000")

	exec := func(id, cmdline string) string {
		t.Helper()
		r := ctr(t, "task", "exec", "--exec-id", "net", id, "sh", "-c", cmdline)
		if r.ExitCode != 0 {
			t.Fatalf("%s in %s: %s", cmdline, id, r)
		}
		return r.Stdout
	}
	links := exec(pod, "ip -o link")
	addrs := exec(pod, "ip -o -4 addr")
	routes := exec(pod, "ip route")
	for dev, want := range map[string][]string{
		"eth0": {"mtu 1450", macOf(t, n.podH, "eth0")},
		"eth1": {"mtu 1400", macOf(t, n.podH, "eth1")},
	} {
		line := lineWith(links, ": "+dev+":")
		for _, w := range want {
			if !strings.Contains(line, w) {
				t.Errorf("guest %s: %q lacks %q (all: %s)", dev, line, w, links)
			}
		}
	}
	for _, want := range []string{"eth0    inet 10.77.1.2/24", "eth1    inet 10.77.2.2/24"} {
		if !strings.Contains(strings.Join(strings.Fields(addrs), " "), strings.Join(strings.Fields(want), " ")) {
			t.Errorf("guest addresses lack %q: %s", want, addrs)
		}
	}
	for _, want := range []string{"default via 10.77.1.1 dev eth0", "10.78.0.0/16 via 10.77.2.1 dev eth1"} {
		if !strings.Contains(routes, want) {
			t.Errorf("guest routes lack %q: %s", want, routes)
		}
	}
	if line := lineWith(exec(pod, "/colo-tools/routes"), "10.78.0.0/16"); line != "10.78.0.0/16 eth1 1300" {
		t.Errorf("the route's MTU did not reach the guest: %q", line)
	}
	if r := ctr(t, "task", "exec", "--exec-id", "ro", pod, "touch", "/colo-tools/x"); r.ExitCode == 0 {
		t.Error("a read-only bind mount is writable in the guest")
	}
	for _, peer := range []string{"10.77.1.1", "10.77.2.1"} {
		exec(pod, "ping -c 1 -W 10 "+peer)
	}

	// A third interface, after boot: the pod's next container brings it in.
	n.addVeth("eth2", "10.77.3.2/24", "10.77.3.1/24", 1500)
	startDetached(t, testbed.Runtime, second, annotations("container"), "sleep", "1000")
	if line := lineWith(exec(second, "ip -o -4 addr"), "eth2"); !strings.Contains(line, "10.77.3.2/24") {
		t.Errorf("hot-plugged eth2 in the guest: %q", line)
	}
	exec(second, "ping -c 1 -W 10 10.77.3.1")

	for _, id := range []string{second, pod} {
		ctr(t, "task", "kill", "-s", "SIGKILL", id)
		waitStopped(t, id)
		ctr(t, "task", "rm", id)
		ctr(t, "container", "rm", id)
	}
}

func macOf(t *testing.T, h *netlink.Handle, dev string) string {
	t.Helper()
	l, err := h.LinkByName(dev)
	if err != nil {
		t.Fatal(err)
	}
	return l.Attrs().HardwareAddr.String()
}

func lineWith(text, s string) string {
	for _, l := range strings.Split(text, "\n") {
		if strings.Contains(l, s) {
			return l
		}
	}
	return ""
}

// TestPodNetworkShimKilled: after a shim dies with its VM's network up,
// containerd's `shim delete` also takes colo's TAP and tc set-up out of the
// pod's namespace.
func TestPodNetworkShimKilled(t *testing.T) {
	id := "net-killed"
	n := newPodNet(t, fmt.Sprintf("colo-e2e-k%d", os.Getpid()))
	n.addVeth("eth0", "10.77.4.2/24", "10.77.4.1/24", 1500)
	checkNoLeaks(t, id)
	startDetached(t, testbed.Runtime, id, []string{"--null-io", "--with-ns=network:" + n.path()}, "sleep", "1000")
	if left := n.leftovers(); len(left) != 3 {
		t.Fatalf("a running pod should have a TAP and two ingress qdiscs, has %v", left)
	}
	pids := cd.ShimPids(id)
	if len(pids) != 1 {
		t.Fatalf("want one shim for %s, found %v", id, pids)
	}
	if err := syscall.Kill(pids[0], syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	for len(cd.Leaks()) > 0 || len(n.leftovers()) > 0 {
		if ctx.Err() != nil {
			t.Fatalf("after the shim died, still there: %v %v", cd.Leaks(), n.leftovers())
		}
		time.Sleep(100 * time.Millisecond)
	}
}
