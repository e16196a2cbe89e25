package agent

import (
	"bytes"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"
)

// fakeModules writes a modules directory as depmod would, with modules
// that escape it (a dependency path with "..", a module file that is a
// symlink), and returns it.
func fakeModules(t *testing.T) string {
	t.Helper()
	root := t.TempDir()
	dir := filepath.Join(root, "lib", "modules", "6.1.0-test")
	files := map[string]string{
		"modules.dep": `kernel/net/bridge/bridge.ko: kernel/net/802/stp.ko kernel/net/llc/llc.ko
kernel/net/802/stp.ko: kernel/net/llc/llc.ko
kernel/net/llc/llc.ko:
kernel/net/netfilter/nft_chain_nat.ko: kernel/net/netfilter/nf_nat.ko kernel/net/netfilter/nf_conntrack.ko kernel/net/netfilter/nf_tables.ko kernel/net/netfilter/nfnetlink.ko
kernel/net/netfilter/nf_nat.ko: kernel/net/netfilter/nf_conntrack.ko
kernel/net/netfilter/nf_conntrack.ko:
kernel/net/netfilter/nf_tables.ko: kernel/net/netfilter/nfnetlink.ko
kernel/net/netfilter/nfnetlink.ko:
kernel/drivers/net/tun.ko:
kernel/drivers/virtio/virtio_pci.ko:
kernel/drivers/net/ipvlan/ipvlan-test.ko:
kernel/evil.ko: ../../../../outside.ko
kernel/link.ko:
`,
		"modules.alias": `# Aliases extracted from modules themselves.
alias rtnl-link-bridge bridge
alias nft-chain-2-nat nft_chain_nat
alias net-pf-16-proto-12 nfnetlink
alias char-major-10-200 tun
alias devname:net/tun tun
alias pci:v00001AF4d*sv*sd*bc*sc*i* virtio_pci
alias rtnl-link-ipvlan ipvlan_test
alias fs-evil evil
alias fs-link link
alias fs-gone gone
`,
		"modules.builtin": "kernel/net/ipv6/ipv6.ko\nkernel/net/unix/unix.ko\n",
	}
	for _, m := range []string{
		"kernel/net/bridge/bridge.ko", "kernel/net/802/stp.ko", "kernel/net/llc/llc.ko",
		"kernel/net/netfilter/nft_chain_nat.ko", "kernel/net/netfilter/nf_nat.ko",
		"kernel/net/netfilter/nf_conntrack.ko", "kernel/net/netfilter/nf_tables.ko",
		"kernel/net/netfilter/nfnetlink.ko", "kernel/drivers/net/tun.ko",
		"kernel/drivers/virtio/virtio_pci.ko", "kernel/drivers/net/ipvlan/ipvlan-test.ko", "kernel/evil.ko",
	} {
		files[m] = "module " + m
	}
	for name, content := range files {
		p := filepath.Join(dir, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	// Outside the modules directory: never to be loaded.
	if err := os.WriteFile(filepath.Join(root, "lib", "outside.ko"), []byte("outside"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("../../outside.ko", filepath.Join(dir, "kernel", "link.ko")); err != nil {
		t.Fatal(err)
	}
	return dir
}

func TestModprobe(t *testing.T) {
	bridge := []string{"kernel/net/llc/llc.ko", "kernel/net/802/stp.ko", "kernel/net/bridge/bridge.ko"}
	nat := []string{"kernel/net/netfilter/nfnetlink.ko", "kernel/net/netfilter/nf_tables.ko",
		"kernel/net/netfilter/nf_conntrack.ko", "kernel/net/netfilter/nf_nat.ko", "kernel/net/netfilter/nft_chain_nat.ko"}
	for _, tc := range []struct {
		name    string
		request string
		loaded  []string // already loaded (/sys/module/<name>/initstate)
		want    []string // loaded, in order
		wantErr error    // errors.Is; nil: success
	}{
		{name: "module", request: "bridge", want: bridge},
		{name: "alias", request: "rtnl-link-bridge", want: bridge},
		{name: "alias underscores", request: "rtnl_link_bridge", want: bridge},
		{name: "nat chain alias", request: "nft-chain-2-nat", want: nat},
		{name: "dependencies loaded", request: "nft-chain-2-nat", loaded: []string{"nfnetlink", "nf_conntrack"},
			want: []string{"kernel/net/netfilter/nf_tables.ko", "kernel/net/netfilter/nf_nat.ko", "kernel/net/netfilter/nft_chain_nat.ko"}},
		{name: "all loaded", request: "bridge", loaded: []string{"llc", "stp", "bridge"}, want: nil},
		{name: "net-pf alias", request: "net-pf-16-proto-12", want: []string{"kernel/net/netfilter/nfnetlink.ko"}},
		{name: "char-major alias", request: "char-major-10-200", want: []string{"kernel/drivers/net/tun.ko"}},
		{name: "glob alias", request: "pci:v00001AF4d00001041sv00001AF4sd00001100bc02sc00i00", want: []string{"kernel/drivers/virtio/virtio_pci.ko"}},
		{name: "dash in file name", request: "ipvlan_test", want: []string{"kernel/drivers/net/ipvlan/ipvlan-test.ko"}},
		{name: "alias to dashed file", request: "rtnl-link-ipvlan", want: []string{"kernel/drivers/net/ipvlan/ipvlan-test.ko"}},
		{name: "builtin", request: "ipv6", want: nil},
		{name: "unknown", request: "rtnl-link-nope", wantErr: fs.ErrNotExist},
		{name: "alias of missing module", request: "fs-gone", wantErr: fs.ErrNotExist},
		{name: "slash", request: "../bridge", wantErr: fs.ErrInvalid},
		{name: "empty", request: "", wantErr: fs.ErrInvalid},
		{name: "dependency outside", request: "fs-evil", wantErr: fs.ErrInvalid},
		{name: "symlink", request: "fs-link", wantErr: unix.ELOOP},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := fakeModules(t)
			sys := t.TempDir()
			for _, m := range tc.loaded {
				if err := os.MkdirAll(filepath.Join(sys, m), 0o755); err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(filepath.Join(sys, m, "initstate"), []byte("live\n"), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			var got []string
			p := modprober{dir: dir, sysModules: sys, load: func(f *os.File) error {
				rel, err := filepath.Rel(dir, f.Name())
				if err != nil || strings.HasPrefix(rel, "..") {
					t.Fatalf("loading %s, outside %s", f.Name(), dir)
				}
				got = append(got, rel)
				return nil
			}}
			err := p.modprobe(tc.request)
			if tc.wantErr != nil {
				if !errors.Is(err, tc.wantErr) {
					t.Fatalf("modprobe %q: error %v, want %v", tc.request, err, tc.wantErr)
				}
				if slices.ContainsFunc(got, func(s string) bool { return strings.Contains(s, "evil") || strings.Contains(s, "link.ko") }) {
					t.Errorf("loaded %v", got)
				}
				return
			}
			if err != nil {
				t.Fatalf("modprobe %q: %v", tc.request, err)
			}
			if !slices.Equal(got, tc.want) {
				t.Errorf("modprobe %q loaded %v, want %v", tc.request, got, tc.want)
			}
		})
	}
}

func TestModprobeLoadError(t *testing.T) {
	dir := fakeModules(t)
	var got []string
	p := modprober{dir: dir, sysModules: t.TempDir(), load: func(f *os.File) error {
		got = append(got, filepath.Base(f.Name()))
		if strings.HasSuffix(f.Name(), "stp.ko") {
			return unix.ENOEXEC
		}
		return nil
	}}
	if err := p.modprobe("bridge"); !errors.Is(err, unix.ENOEXEC) {
		t.Fatalf("modprobe bridge: %v, want ENOEXEC", err)
	}
	// Nothing after the dependency that failed.
	if want := []string{"llc.ko", "stp.ko"}; !slices.Equal(got, want) {
		t.Errorf("loaded %v, want %v", got, want)
	}
}

func TestRunModprobeArgs(t *testing.T) {
	for _, tc := range []struct {
		args      []string
		wantEmpty bool // nothing on stderr
	}{
		{args: nil},
		{args: []string{"-q"}, wantEmpty: true},
		{args: []string{"-r", "bridge"}},
		{args: []string{"-q", "-r", "bridge"}, wantEmpty: true},
		{args: []string{"bridge", "param=1"}},
		{args: []string{"-q", "--", "bridge", "x"}, wantEmpty: true},
		{args: []string{"-q", "--", "no/such"}, wantEmpty: true},
	} {
		var stderr bytes.Buffer
		if code := RunModprobe(tc.args, &stderr); code != 1 {
			t.Errorf("modprobe %q: exit %d, want 1", tc.args, code)
		}
		if (stderr.Len() == 0) != tc.wantEmpty {
			t.Errorf("modprobe %q: stderr %q", tc.args, stderr.String())
		}
	}
}

func TestMakeStaticNodes(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("mknod needs root")
	}
	mods, dev := t.TempDir(), t.TempDir()
	devname := "# Device nodes to trigger on-demand module loading.\nfuse fuse c10:229\ntun net/tun c10:200\n"
	if err := os.WriteFile(filepath.Join(mods, "modules.devname"), []byte(devname), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := makeStaticNodes(mods, dev); err != nil {
		t.Fatal(err)
	}
	// Again: the nodes exist.
	if err := makeStaticNodes(mods, dev); err != nil {
		t.Fatal(err)
	}
	var st unix.Stat_t
	if err := unix.Lstat(filepath.Join(dev, "net", "tun"), &st); err != nil {
		t.Fatal(err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFCHR || unix.Major(st.Rdev) != 10 || unix.Minor(st.Rdev) != 200 || st.Mode&0o777 != 0o666 {
		t.Errorf("net/tun: mode %o rdev %d:%d, want a character device 10:200, 0666", st.Mode, unix.Major(st.Rdev), unix.Minor(st.Rdev))
	}
	if err := os.WriteFile(filepath.Join(mods, "modules.devname"), []byte("evil ../evil c1:3\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := makeStaticNodes(mods, dev); err == nil {
		t.Error("a node outside the device directory: no error")
	}
	if err := makeStaticNodes(t.TempDir(), dev); err != nil {
		t.Errorf("no modules.devname: %v", err)
	}
}

// TestAddGuestDevices: a privileged container's spec gets the guest's
// device nodes and access to every device; other specs are unchanged.
// (In this file as it is the guest-device side of on-demand modules:
// /dev/net/tun loads tun.)
func TestAddGuestDevices(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("mknod needs root")
	}
	dev := t.TempDir()
	for _, d := range []struct {
		path         string
		major, minor uint32
	}{{"null", 1, 3}, {"net/tun", 10, 200}, {"console", 5, 1}, {"pts/0", 136, 0}, {"kmsg", 1, 11}} {
		p := filepath.Join(dev, d.path)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := unix.Mknod(p, unix.S_IFCHR|0o600, int(unix.Mkdev(d.major, d.minor))); err != nil {
			t.Fatal(err)
		}
	}
	allCaps := []string{"CAP_CHOWN", "CAP_KILL", "CAP_SYS_ADMIN", "CAP_SYS_MODULE", "CAP_SYS_RAWIO",
		"CAP_NET_ADMIN", "CAP_MKNOD", "CAP_SYS_RESOURCE", "CAP_PERFMON", "CAP_BPF"}
	defaultCaps := []string{"CAP_CHOWN", "CAP_NET_BIND_SERVICE", "CAP_KILL"}
	spec := func(caps []string, masked []string) *specs.Spec {
		return &specs.Spec{
			Process: &specs.Process{Capabilities: &specs.LinuxCapabilities{Bounding: caps}},
			Linux: &specs.Linux{
				MaskedPaths: masked,
				Devices:     []specs.LinuxDevice{{Path: "/dev/null", Type: "c", Major: 1, Minor: 3}},
				Resources:   &specs.LinuxResources{Devices: []specs.LinuxDeviceCgroup{{Allow: false, Access: "rwm"}}},
			},
		}
	}
	for _, tc := range []struct {
		name       string
		spec       *specs.Spec
		privileged bool
	}{
		{"privileged", spec(allCaps, nil), true},
		{"privileged, fewer capabilities", spec(privilegedCaps, nil), true},
		{"no CAP_SYS_ADMIN", spec(slices.DeleteFunc(slices.Clone(allCaps), func(c string) bool { return c == "CAP_SYS_ADMIN" }), nil), false},
		{"all capabilities, masked paths", spec(allCaps, []string{"/proc/kcore"}), false},
		{"default", spec(defaultCaps, []string{"/proc/kcore"}), false},
		{"default, no masked paths", spec(defaultCaps, nil), false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if err := addGuestDevices(tc.spec, dev); err != nil {
				t.Fatal(err)
			}
			var paths []string
			for _, d := range tc.spec.Linux.Devices {
				paths = append(paths, d.Path)
			}
			slices.Sort(paths)
			rules := tc.spec.Linux.Resources.Devices
			if !tc.privileged {
				if !slices.Equal(paths, []string{"/dev/null"}) || len(rules) != 1 || rules[0].Allow {
					t.Errorf("not privileged: devices %v, rules %+v changed", paths, rules)
				}
				return
			}
			// Not console (libcontainer's), not pts; null once.
			if want := []string{"/dev/kmsg", "/dev/net/tun", "/dev/null"}; !slices.Equal(paths, want) {
				t.Errorf("devices %v, want %v", paths, want)
			}
			if len(rules) != 1 || !rules[0].Allow || rules[0].Access != "rwm" || rules[0].Type != "" {
				t.Errorf("device rules %+v, want all allowed", rules)
			}
			for _, d := range tc.spec.Linux.Devices {
				if d.Path == "/dev/net/tun" && (d.Type != "c" || d.Major != 10 || d.Minor != 200 || d.FileMode == nil || *d.FileMode != 0o600) {
					t.Errorf("tun: %+v", d)
				}
			}
		})
	}
}
