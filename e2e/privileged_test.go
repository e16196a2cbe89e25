package e2e

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/colo-runtime/colo/testbed"
)

// onDemandModules are modules of the guest image that the guest must not
// load at boot, and that TestPrivileged makes the guest kernel load
// (through /sbin/modprobe, colo-agent): bridge (ip link add type bridge),
// nf_tables and nft_masq (the masquerade rule), tun (/dev/net/tun).
var onDemandModules = []string{"bridge", "nf_tables", "nft_masq", "tun"}

// TestPrivileged: a privileged container (CRI's SecurityContext.Privileged,
// in a privileged pod) administers the network as on runc: it creates a
// bridge with busybox's ip and with netlink, a TUN device through
// /dev/net/tun, and an nftables NAT masquerade rule, which it lists back;
// an ordinary container in the same pod doing the same is refused (EPERM)
// and has no /dev/net/tun. In colo's guest, the modules this needs are not
// loaded at boot and are loaded when the kernel asks for them. The runc
// handler runs the same for comparison.
func TestPrivileged(t *testing.T) {
	for _, h := range criHandlers {
		if h.shim {
			continue // the same guest as colo's: nothing more to see
		}
		t.Run(h.name, func(t *testing.T) { testPrivileged(t, h) })
	}
}

func testPrivileged(t *testing.T, h criHandler) {
	ctx, cancel := context.WithTimeout(context.Background(), criTimeout)
	defer cancel()
	tools := buildNetAdmin(ctx, t)
	rs := criRuntime(t)
	p := runPod(ctx, t, rs, "privileged", h.handler, privileged)
	volume := func() *runtimeapi.Mount {
		return &runtimeapi.Mount{ContainerPath: "/colo-tools", HostPath: tools, Readonly: true}
	}
	plain := startPodContainer(ctx, t, p, "plain", false, volume())
	admin := startPodContainer(ctx, t, p, "admin", true, volume())

	run := func(id string, cmd ...string) (string, string, int) {
		t.Helper()
		out, errOut, code := execSync(ctx, t, rs, id, cmd...)
		t.Logf("%s: %q: exit %d\n%s%s", map[string]string{plain: "plain", admin: "admin"}[id], cmd, code, out, errOut)
		return out, errOut, code
	}
	mustRun := func(id string, cmd ...string) string {
		t.Helper()
		out, errOut, code := run(id, cmd...)
		if code != 0 {
			t.Fatalf("%q: exit %d: %s%s", cmd, code, out, errOut)
		}
		return out
	}
	refused := func(id string, cmd ...string) {
		t.Helper()
		out, errOut, code := run(id, cmd...)
		if code == 0 || !strings.Contains(strings.ToLower(out+errOut), "operation not permitted") {
			t.Errorf("%q in an ordinary container: exit %d, %s%s; want EPERM", cmd, code, out, errOut)
		}
	}

	if h.vm {
		// The guest's memory and modules before anything loads one.
		meminfo := mustRun(plain, "cat", "/proc/meminfo")
		for _, line := range strings.Split(meminfo, "\n") {
			if k, _, _ := strings.Cut(line, ":"); slices.Contains([]string{"MemTotal", "MemFree", "MemAvailable", "Cached", "Shmem", "Unevictable"}, k) {
				t.Logf("idle guest: %s", line)
			}
		}
		loaded := loadedModules(mustRun(plain, "cat", "/proc/modules"))
		for _, m := range onDemandModules {
			if loaded[m] {
				t.Errorf("module %s loaded at boot; it should be loaded on demand", m)
			}
		}
	}

	// The ordinary container: refused, as on runc.
	refused(plain, "ip", "link", "add", "br-plain", "type", "bridge")
	refused(plain, "/colo-tools/netadmin", "bridge", "br-plain")
	refused(plain, "/colo-tools/netadmin", "masq")
	if _, _, code := run(plain, "test", "-e", "/dev/net/tun"); code == 0 {
		t.Errorf("an ordinary container has /dev/net/tun")
	}

	// The privileged one: as on runc.
	mustRun(admin, "ip", "link", "add", "br0", "type", "bridge")
	mustRun(admin, "test", "-d", "/sys/class/net/br0/bridge")
	mustRun(admin, "/colo-tools/netadmin", "bridge", "br1")
	mustRun(admin, "/colo-tools/netadmin", "tun", "colotun0")
	mustRun(admin, "/colo-tools/netadmin", "masq")
	if out := mustRun(admin, "/colo-tools/netadmin", "list"); !strings.Contains(out, "chain=postrouting type=nat") ||
		!strings.Contains(out, "masquerade") {
		t.Errorf("the masquerade rule not listed back: %q", out)
	}
	// The ordinary container shares the pod's network: it sees what the
	// privileged one made, and still may not change it.
	if out := mustRun(plain, "ip", "link", "show", "br0"); !strings.Contains(out, "br0") {
		t.Errorf("the pod's other container does not see br0: %s", out)
	}
	refused(plain, "ip", "link", "del", "br0")

	if h.vm {
		loaded := loadedModules(mustRun(admin, "cat", "/proc/modules"))
		for _, m := range onDemandModules {
			if !loaded[m] {
				t.Errorf("module %s not loaded on demand", m)
			}
		}
	}
}

// loadedModules returns the module names in /proc/modules.
func loadedModules(procModules string) map[string]bool {
	m := map[string]bool{}
	for _, line := range strings.Split(procModules, "\n") {
		if f := strings.Fields(line); len(f) > 0 {
			m[f[0]] = true
		}
	}
	return m
}

// buildNetAdmin builds testdata/netadmin, static (the guest has no libc),
// into a new directory for a read-only volume.
func buildNetAdmin(ctx context.Context, t *testing.T) string {
	t.Helper()
	root, err := testbed.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	tools := t.TempDir()
	build := exec.CommandContext(ctx, "go", "build", "-o", filepath.Join(tools, "netadmin"), filepath.Join(root, "e2e", "testdata", "netadmin"))
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build netadmin: %v: %s", err, out)
	}
	return tools
}
