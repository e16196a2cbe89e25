package cli

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/containerd/cgroups/v3"

	"github.com/colo-runtime/colo/config"
)

// TestReport: one aligned line per check, and an error (exit status 1)
// only when a check failed; warnings pass.
func TestReport(t *testing.T) {
	var out bytes.Buffer
	err := reportChecks(&out, []result{
		checkOK("a", "fine"),
		checkWarn("b", "slow"),
	})
	if err != nil {
		t.Errorf("report with warnings only: %v, want nil", err)
	}
	if want := "ok    a: fine\nwarn  b: slow\n"; out.String() != want {
		t.Errorf("report printed %q, want %q", out.String(), want)
	}
	out.Reset()
	err = reportChecks(&out, []result{checkOK("a", "fine"), checkFail("b", "broken"), checkFail("c", "gone")})
	if err == nil || !strings.Contains(err.Error(), "2 failed: b, c") {
		t.Errorf("report with failures: %v, want an error naming b and c", err)
	}
	if want := "fail  b: broken\n"; !strings.Contains(out.String(), want) {
		t.Errorf("report printed %q, want a line %q", out.String(), want)
	}
}

// TestCheckExitStatus: colo check exits 1 and names the check that
// failed: here a guest kernel that is not there.
func TestCheckExitStatus(t *testing.T) {
	dir := t.TempDir()
	cfg := filepath.Join(dir, "config.toml")
	body := "[hypervisor]\nkernel = \"" + dir + "/no-vmlinux\"\n[runtime]\nstate_dir = \"" + dir + "\"\n"
	if err := os.WriteFile(cfg, []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
	var stdout, stderr bytes.Buffer
	code := Run(context.Background(), []string{"--config", cfg, "check"}, &stdout, &stderr)
	if code != 1 || !strings.Contains(stdout.String(), "fail  guest kernel: open "+dir+"/no-vmlinux") || !strings.Contains(stderr.String(), "guest kernel") {
		t.Errorf("colo check: exit %d, stdout %q, stderr %q; want exit 1 and the guest kernel failed", code, stdout.String(), stderr.String())
	}
	if code := Run(context.Background(), []string{"--config", cfg, "check", "extra"}, &stdout, &stderr); code != 2 {
		t.Errorf("colo check extra: exit %d, want 2", code)
	}
}

// fakeCheckHost is a host whose devices and /proc files are in a temp dir.
func fakeCheckHost(t *testing.T) (checkHost, string) {
	dir := t.TempDir()
	h := realCheckHost()
	h.kvm = filepath.Join(dir, "kvm")
	h.cpuinfo = filepath.Join(dir, "cpuinfo")
	h.vsock = filepath.Join(dir, "vhost-vsock")
	h.vhostNet = filepath.Join(dir, "vhost-net")
	h.tun = filepath.Join(dir, "tun")
	h.filesystems = filepath.Join(dir, "filesystems")
	h.sysModule = filepath.Join(dir, "sys-module")
	h.libModules = filepath.Join(dir, "lib-modules")
	h.cgroupRoot = filepath.Join(dir, "cgroup")
	h.procCgroups = filepath.Join(dir, "cgroups")
	h.release = "6.1.0-test"
	h.timeout = 300 * time.Millisecond
	return h, dir
}

func writeTestFile(t *testing.T, path, body string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, []byte(body), 0o755); err != nil {
		t.Fatal(err)
	}
}

// find is the result about what, or fails the test.
func findResult(t *testing.T, rs []result, what string) result {
	t.Helper()
	for _, r := range rs {
		if r.what == what {
			return r
		}
	}
	t.Fatalf("no check of %q in %v", what, rs)
	return result{}
}

// TestAccel: auto takes KVM only where /dev/kvm opens and the CPU has
// vmx or svm, and says why; TCG is a warning, never a failure, unless
// KVM was asked for.
func TestAccel(t *testing.T) {
	for _, tc := range []struct {
		name       string
		kvm        bool
		flags      string
		configured string
		status     status
		detail     string
	}{
		{name: "kvm", kvm: true, flags: "fpu vmx sse", configured: "auto", status: statusOK, detail: "kvm: auto:"},
		{name: "amd", kvm: true, flags: "fpu svm", configured: "", status: statusOK, detail: "kvm: auto: KVM opens and the CPU has hardware virtualization"},
		{name: "no vmx", kvm: true, flags: "fpu sse", configured: "auto", status: statusWarn, detail: "tcg, emulated and slower: auto: KVM opens but"},
		{name: "no kvm", kvm: false, flags: "vmx", configured: "auto", status: statusWarn, detail: "no such file or directory"},
		{name: "tcg asked", kvm: false, flags: "", configured: "tcg", status: statusOK, detail: "tcg: configured"},
		{name: "kvm asked", kvm: false, flags: "vmx", configured: "kvm", status: statusFail, detail: "accel kvm: open KVM"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h, _ := fakeCheckHost(t)
			if tc.kvm {
				writeTestFile(t, h.kvm, "")
			}
			writeTestFile(t, h.cpuinfo, "processor\t: 0\nflags\t\t: "+tc.flags+"\n")
			r := findResult(t, h.accel(tc.configured), "accelerator")
			detail := strings.ReplaceAll(tc.detail, "KVM", h.kvm)
			if r.status != tc.status || !strings.Contains(r.detail, detail) {
				t.Errorf("accelerator: %s %q, want %s naming %q", r.status, r.detail, tc.status, detail)
			}
		})
	}
}

// TestDevices: a missing vhost-vsock is a warning under agent.channel
// auto (serial is used) and a failure when vsock is asked for; a missing
// /dev/net/tun fails.
func TestDevices(t *testing.T) {
	h, _ := fakeCheckHost(t)
	writeTestFile(t, h.vhostNet, "")
	rs := h.devices("auto")
	if r := findResult(t, rs, h.vsock); r.status != statusWarn || !strings.Contains(r.detail, "virtio-serial") {
		t.Errorf("vsock missing, channel auto: %s %q, want a warning naming virtio-serial", r.status, r.detail)
	}
	if r := findResult(t, rs, h.vhostNet); r.status != statusOK {
		t.Errorf("vhost-net present: %s %q, want ok", r.status, r.detail)
	}
	if r := findResult(t, rs, h.tun); r.status != statusFail {
		t.Errorf("tun missing: %s %q, want fail", r.status, r.detail)
	}
	if r := findResult(t, h.devices("vsock"), h.vsock); r.status != statusFail {
		t.Errorf("vsock missing, channel vsock: %s %q, want fail", r.status, r.detail)
	}
}

// TestQEMU: the version and machine types come from the binary, and a
// binary that never answers costs its check the timeout, not the command.
func TestQEMU(t *testing.T) {
	h, dir := fakeCheckHost(t)
	good := filepath.Join(dir, "qemu-good")
	writeTestFile(t, good, `#!/bin/sh
case "$1" in
-version) echo "QEMU emulator version 9.9.9"; echo "Copyright";;
-machine) printf 'Supported machines are:\nmicrovm              microvm (i386)\nq35                  Standard PC (Q35 + ICH9, 2009) (alias of pc-q35-7.2)\npc-q35-7.2           Standard PC (Q35 + ICH9, 2009)\n';;
esac
`)
	rs := h.qemu(context.Background(), config.Hypervisor{Path: good, Machine: "q35"})
	if r := findResult(t, rs, "QEMU version"); r.status != statusOK || r.detail != "QEMU emulator version 9.9.9" {
		t.Errorf("QEMU version: %s %q", r.status, r.detail)
	}
	if r := findResult(t, rs, "QEMU machine q35"); r.status != statusOK {
		t.Errorf("QEMU machine q35: %s %q, want ok", r.status, r.detail)
	}
	rs = h.qemu(context.Background(), config.Hypervisor{Path: good, Machine: "pc-q35-9.9"})
	if r := findResult(t, rs, "QEMU machine pc-q35-9.9"); r.status != statusFail || !strings.Contains(r.detail, "not in") {
		t.Errorf("QEMU machine pc-q35-9.9: %s %q, want fail", r.status, r.detail)
	}
	rs = h.qemu(context.Background(), config.Hypervisor{Path: filepath.Join(dir, "no-qemu"), Machine: "q35"})
	if r := findResult(t, rs, "QEMU binary"); r.status != statusFail || !strings.Contains(r.detail, "hypervisor.path") {
		t.Errorf("QEMU binary missing: %s %q, want fail naming hypervisor.path", r.status, r.detail)
	}

	// The shell's child keeps the output pipe open after the shell is
	// killed: the check must not wait for it either.
	hung := filepath.Join(dir, "qemu-hung")
	writeTestFile(t, hung, "#!/bin/sh\nsleep 30\n")
	start := time.Now()
	rs = h.qemu(context.Background(), config.Hypervisor{Path: hung, Machine: "q35"})
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("a QEMU that never answers took %s", d)
	}
	if r := findResult(t, rs, "QEMU version"); r.status != statusFail || !strings.Contains(r.detail, "no answer within 300ms") {
		t.Errorf("QEMU that never answers: %s %q, want fail naming the timeout", r.status, r.detail)
	}
}

// TestCloudHypervisor: the binary (hypervisor.path only when
// hypervisor.type is clh), its version, and KVM with hardware
// virtualization, each named when missing.
func TestCloudHypervisor(t *testing.T) {
	h, dir := fakeCheckHost(t)
	bin := filepath.Join(dir, "bin")
	ch := filepath.Join(bin, "cloud-hypervisor")
	writeTestFile(t, ch, "#!/bin/sh\n[ \"$1\" = --version ] && echo \"cloud-hypervisor v41.0.0\"\n")
	writeTestFile(t, h.kvm, "")
	vmx := "processor\t: 0\nflags\t\t: fpu vmx\n"
	for _, tc := range []struct {
		name  string
		path  string // PATH
		hv    config.Hypervisor
		flags string
		want  map[string]string // check: status and a part of its detail
	}{
		{name: "usable", path: bin, hv: config.Hypervisor{Type: "clh"}, flags: vmx, want: map[string]string{
			"Cloud Hypervisor binary": "ok " + ch, "Cloud Hypervisor version": "ok cloud-hypervisor v41.0.0", "KVM for Cloud Hypervisor": "ok hardware virtualization",
		}},
		{name: "configured path", path: dir, hv: config.Hypervisor{Type: "clh", Path: ch}, flags: vmx, want: map[string]string{
			"Cloud Hypervisor binary": "ok " + ch,
		}},
		{name: "no binary", path: dir, hv: config.Hypervisor{Type: "clh"}, flags: vmx, want: map[string]string{
			"Cloud Hypervisor binary": "fail cloud-hypervisor (in PATH)",
		}},
		{name: "QEMU's path is not CH's", path: dir, hv: config.Hypervisor{Type: "qemu", Path: ch}, flags: vmx, want: map[string]string{
			"Cloud Hypervisor binary": "fail cloud-hypervisor (in PATH)",
		}},
		{name: "no hardware virtualization", path: bin, hv: config.Hypervisor{Type: "clh"}, flags: "processor\t: 0\nflags\t\t: fpu\n", want: map[string]string{
			"KVM for Cloud Hypervisor": "fail neither vmx nor svm",
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Setenv("PATH", tc.path)
			writeTestFile(t, h.cpuinfo, tc.flags)
			rs := h.cloudHypervisor(context.Background(), tc.hv)
			for what, want := range tc.want {
				st, detail, _ := strings.Cut(want, " ")
				if r := findResult(t, rs, what); r.status.String() != st || !strings.Contains(r.detail, detail) {
					t.Errorf("%s: %s %q, want %s naming %q", what, r.status, r.detail, st, detail)
				}
			}
		})
	}
}

// TestRequiredByType: both hypervisors are checked, and hypervisor.type
// decides which one's failures fail colo check; the other's are warnings
// that say so.
func TestRequiredByType(t *testing.T) {
	h, dir := fakeCheckHost(t)
	t.Setenv("PATH", dir) // neither QEMU nor Cloud Hypervisor
	writeTestFile(t, h.cpuinfo, "processor\t: 0\nflags\t\t: fpu\n")
	writeTestFile(t, h.filesystems, "nodev\ttmpfs\n")
	for _, tc := range []struct {
		typ        string
		fail, warn []string
	}{
		{typ: "qemu", fail: []string{"QEMU binary", "filesystem ramfs", "setpriv"}, warn: []string{"Cloud Hypervisor binary", "KVM for Cloud Hypervisor"}},
		{typ: "clh", fail: []string{"Cloud Hypervisor binary", "KVM for Cloud Hypervisor"}, warn: []string{"QEMU binary", "filesystem ramfs", "setpriv"}},
	} {
		t.Run(tc.typ, func(t *testing.T) {
			cfg := config.Default()
			cfg.Hypervisor.Type = tc.typ
			cfg.Runtime.StateDir = dir
			rs := h.checks(context.Background(), cfg)
			for _, what := range tc.fail {
				if r := findResult(t, rs, what); r.status != statusFail {
					t.Errorf("%s: %s %q, want fail", what, r.status, r.detail)
				}
			}
			for _, what := range tc.warn {
				if r := findResult(t, rs, what); r.status != statusWarn || !strings.Contains(r.detail, "needed only with hypervisor.type") {
					t.Errorf("%s: %s %q, want a warning that it is needed only with the other type", what, r.status, r.detail)
				}
			}
			// The driver check is the configured driver's.
			if r := findResult(t, rs, "hypervisor driver"); r.status != statusFail {
				t.Errorf("hypervisor driver: %s %q, want fail", r.status, r.detail)
			}
		})
	}
}

func TestMachines(t *testing.T) {
	got := qemuMachines("Supported machines are:\nmicrovm              microvm (i386)\nq35                  Standard PC\nnone                 empty machine\n")
	if strings.Join(got, " ") != "microvm q35 none" {
		t.Errorf("machines = %q", got)
	}
}

// TestHostFiles: the checks that read /proc and the module directories.
func TestHostFiles(t *testing.T) {
	h, dir := fakeCheckHost(t)
	writeTestFile(t, h.filesystems, "nodev\tsysfs\nnodev\ttmpfs\n\text4\n")
	rs := h.filesystemTypes(config.Default().Hypervisor)
	if r := findResult(t, rs, "filesystem tmpfs"); r.status != statusOK {
		t.Errorf("tmpfs listed: %s %q", r.status, r.detail)
	}
	if r := findResult(t, rs, "filesystem ramfs"); r.status != statusFail || !strings.Contains(r.detail, "templates") {
		t.Errorf("ramfs missing: %s %q, want fail naming templates", r.status, r.detail)
	}

	// v1: cpuset enabled but in no hierarchy is not available.
	writeTestFile(t, h.procCgroups, "#subsys_name\thierarchy\tnum_cgroups\tenabled\ncpuset\t0\t1\t1\ncpu\t3\t2\t1\n")
	h.cgroupMode = func() cgroups.CGMode { return cgroups.Legacy }
	rs = h.cgroups()
	if r := findResult(t, rs, "cgroup controller cpu"); r.status != statusOK {
		t.Errorf("v1 cpu: %s %q", r.status, r.detail)
	}
	if r := findResult(t, rs, "cgroup controller cpuset"); r.status != statusFail {
		t.Errorf("v1 cpuset in no hierarchy: %s %q, want fail", r.status, r.detail)
	}
	writeTestFile(t, filepath.Join(h.cgroupRoot, "cgroup.controllers"), "cpuset cpu io memory pids\n")
	h.cgroupMode = func() cgroups.CGMode { return cgroups.Unified }
	for _, r := range h.cgroups() {
		if r.status != statusOK {
			t.Errorf("v2 with cpu and cpuset: %s: %s %q", r.what, r.status, r.detail)
		}
	}

	// tun loaded, vhost_net loadable, vhost_vsock nowhere.
	if err := os.MkdirAll(filepath.Join(h.sysModule, "tun"), 0o755); err != nil {
		t.Fatal(err)
	}
	writeTestFile(t, filepath.Join(h.libModules, h.release, "modules.dep"), "kernel/drivers/vhost/vhost_net.ko.xz: kernel/drivers/vhost/vhost.ko.xz\n")
	rs = h.modules()
	if r := findResult(t, rs, "kernel module tun"); r.status != statusOK {
		t.Errorf("tun in /sys/module: %s %q", r.status, r.detail)
	}
	if r := findResult(t, rs, "kernel module vhost_net"); r.status != statusWarn || r.detail != "not loaded: modprobe vhost_net" {
		t.Errorf("vhost_net loadable: %s %q", r.status, r.detail)
	}
	if r := findResult(t, rs, "kernel module vhost_vsock"); r.status != statusWarn || !strings.HasPrefix(r.detail, "not in kernel") {
		t.Errorf("vhost_vsock nowhere: %s %q", r.status, r.detail)
	}

	if r := checkWritable("state directory", filepath.Join(dir, "state", "colo")); r.status != statusOK || !strings.Contains(r.detail, "does not exist yet") {
		t.Errorf("state directory to be made: %s %q", r.status, r.detail)
	}
	if r := checkWritable("state directory", h.filesystems); r.status != statusFail {
		t.Errorf("state directory a file: %s %q, want fail", r.status, r.detail)
	}
	if r := checkReadable("guest kernel", h.filesystems); r.status != statusOK {
		t.Errorf("guest kernel readable: %s %q", r.status, r.detail)
	}
	if r := checkReadable("guest kernel", dir); r.status != statusFail {
		t.Errorf("guest kernel a directory: %s %q, want fail", r.status, r.detail)
	}
}
