package testbed

import (
	"fmt"
	"hash/fnv"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"

	"github.com/vishvananda/netlink"
)

func mustCIDR(t *testing.T, s string) *net.IPNet {
	t.Helper()
	_, n, err := net.ParseCIDR(s)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

func TestFreeSubnet(t *testing.T) {
	for _, tc := range []struct {
		name string
		seed uint32
		used []string
		want string // "" for an error
	}{
		{"the seed's", 7, nil, "10.242.7.0/24"},
		{"seed modulo 256", 256 + 7, nil, "10.242.7.0/24"},
		{"unrelated routes", 7, []string{"192.0.2.0/24", "10.243.7.0/24"}, "10.242.7.0/24"},
		{"routed: the next", 7, []string{"10.242.7.0/24"}, "10.242.8.0/24"},
		{"part routed", 7, []string{"10.242.7.128/25"}, "10.242.8.0/24"},
		{"wraps", 255, []string{"10.242.255.0/24"}, "10.242.0.0/24"},
		{"all covered", 7, []string{"10.0.0.0/8"}, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var used []*net.IPNet
			for _, u := range tc.used {
				used = append(used, mustCIDR(t, u))
			}
			got, err := freeSubnet(tc.seed, used)
			switch {
			case tc.want == "" && err == nil:
				t.Fatalf("freeSubnet = %v, want an error", got)
			case tc.want == "":
			case err != nil:
				t.Fatal(err)
			case got.String() != tc.want:
				t.Errorf("freeSubnet = %v, want %s", got, tc.want)
			}
		})
	}
}

func TestParseRoutes(t *testing.T) {
	table := "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n" +
		"eth0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n" +
		"eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n" +
		"br0\t0000F20A\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0\n"
	nets, err := parseRoutes(table)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, n := range nets {
		got = append(got, n.String())
	}
	if want := []string{"192.0.2.0/24", "10.242.0.0/16"}; !slices.Equal(got, want) {
		t.Errorf("parseRoutes = %v, want %v (the default route skipped)", got, want)
	}
	if _, err := parseRoutes("header\nshort line\n"); err == nil {
		t.Error("a short line parsed")
	}
}

// TestCRILeaksFindsWhatIsLeft plants what a pod could leave (a netns
// file, a shm mount, sandbox and container dirs, an IP allocation, a port
// on the bridge) and expects each reported; then stop must unmount and
// delete the bridge.
func TestCRILeaksFindsWhatIsLeft(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to mount and add links")
	}
	dir := t.TempDir()
	h := fnv.New32a()
	h.Write([]byte(dir))
	r := &CRI{
		Bridge:     fmt.Sprintf("colt%08x", h.Sum32()),
		dir:        dir,
		stateDir:   filepath.Join(dir, "state"),
		rootDir:    filepath.Join(dir, "root"),
		cniDataDir: filepath.Join(dir, "ipam"),
	}
	shm := filepath.Join(r.stateDir, "sandboxes", "pod1", "shm")
	container := filepath.Join(r.rootDir, "containers", "ctr1")
	netns := filepath.Join(r.stateDir, "netns", "cni-1")
	ip := filepath.Join(r.cniDataDir, cniNetwork, "10.242.0.2")
	sandboxBundle := filepath.Join(dir, "state", shimSandboxController, CRINamespace, "pod2")
	for _, d := range []string{shm, container, filepath.Dir(netns), filepath.Dir(ip), sandboxBundle} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	for _, f := range []string{netns, ip, filepath.Join(r.cniDataDir, cniNetwork, "lock")} {
		if err := os.WriteFile(f, nil, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if err := syscall.Mount("tmpfs", shm, "tmpfs", 0, ""); err != nil {
		t.Fatal(err)
	}
	defer syscall.Unmount(shm, syscall.MNT_DETACH)
	bridge := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: r.Bridge}}
	if err := netlink.LinkAdd(bridge); err != nil {
		t.Fatal(err)
	}
	defer netlink.LinkDel(bridge)
	// A veth, as CNI's bridge plugin adds (this kernel has no dummy links).
	port := &netlink.Veth{
		LinkAttrs: netlink.LinkAttrs{Name: fmt.Sprintf("colp%08x", h.Sum32()), MasterIndex: bridge.Index},
		PeerName:  fmt.Sprintf("colq%08x", h.Sum32()),
	}
	if err := netlink.LinkAdd(port); err != nil {
		t.Fatal(err)
	}
	defer netlink.LinkDel(port)

	leaks := strings.Join(r.leaks(), "\n")
	for _, want := range []string{
		"mount " + shm,
		"CRI directory " + filepath.Dir(shm),
		"CRI directory " + container,
		"network namespace " + netns,
		"IP address 10.242.0.2 allocated",
		"interface " + port.Name + " on bridge " + r.Bridge,
		"sandbox bundle " + sandboxBundle,
	} {
		if !strings.Contains(leaks, want) {
			t.Errorf("leaks %q lack %q", leaks, want)
		}
	}
	if strings.Contains(leaks, "lock") {
		t.Errorf("host-local's lock file is no leak: %q", leaks)
	}

	if err := r.stop(); err != nil {
		t.Fatal(err)
	}
	if _, err := netlink.LinkByName(r.Bridge); err == nil {
		t.Errorf("bridge %s still there after stop", r.Bridge)
	}
	if m := mountsUnder(r.stateDir); len(m) > 0 {
		t.Errorf("mounts %v still there after stop", m)
	}
	for _, p := range []string{filepath.Dir(shm), container, netns, ip, sandboxBundle} {
		if err := os.RemoveAll(p); err != nil {
			t.Fatal(err)
		}
	}
	netlink.LinkDel(port)
	if leaks := r.leaks(); len(leaks) != 0 {
		t.Errorf("after cleanup, still %v", leaks)
	}
}
