package cli

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/containerd/cgroups/v3"
	"golang.org/x/sys/unix"

	"github.com/colo-runtime/colo/config"
	"github.com/colo-runtime/colo/hypervisor"
	"github.com/colo-runtime/colo/hypervisor/clh"
	"github.com/colo-runtime/colo/hypervisor/driver"
	"github.com/colo-runtime/colo/hypervisor/qemu"
)

// status is a check's verdict. Only fail makes `colo check` exit 1: a
// warning names something colo works without, more slowly or with less.
type status int

const (
	statusOK status = iota
	statusWarn
	statusFail
)

func (s status) String() string {
	switch s {
	case statusOK:
		return "ok"
	case statusWarn:
		return "warn"
	}
	return "fail"
}

// result is one line of `colo check`.
type result struct {
	status status
	what   string
	detail string
}

func checkOK(what, format string, args ...any) result {
	return result{statusOK, what, fmt.Sprintf(format, args...)}
}

func checkWarn(what, format string, args ...any) result {
	return result{statusWarn, what, fmt.Sprintf(format, args...)}
}

func checkFail(what, format string, args ...any) result {
	return result{statusFail, what, fmt.Sprintf(format, args...)}
}

// report prints one line per result ("ok|warn|fail  what: detail") and
// returns an error naming the failed checks, if any: Run turns it into
// exit status 1.
func reportChecks(w io.Writer, results []result) error {
	var failed []string
	for _, r := range results {
		// The status padded to one width, so that the checks line up.
		fmt.Fprintf(w, "%-4s  %s: %s\n", r.status, r.what, r.detail)
		if r.status == statusFail {
			failed = append(failed, r.what)
		}
	}
	if len(failed) > 0 {
		return fmt.Errorf("%d failed: %s", len(failed), strings.Join(failed, ", "))
	}
	return nil
}

// commandTimeout bounds each external command a check runs: a QEMU that
// hangs (a broken install, a stuck NFS mount) must not hang the check.
const commandTimeout = 10 * time.Second

// checkHost is where the checks look. Tests point it at files of their own.
type checkHost struct {
	kvm         string // /dev/kvm
	cpuinfo     string // /proc/cpuinfo
	vsock       string // /dev/vhost-vsock
	vhostNet    string // /dev/vhost-net
	tun         string // /dev/net/tun
	filesystems string // /proc/filesystems
	sysModule   string // /sys/module
	libModules  string // /lib/modules
	cgroupRoot  string // /sys/fs/cgroup
	procCgroups string // /proc/cgroups
	release     string // the running kernel's (uname -r)
	timeout     time.Duration
	// cgroupMode is cgroups.Mode, which looks at /sys/fs/cgroup only.
	cgroupMode func() cgroups.CGMode
}

func realCheckHost() checkHost {
	var uts unix.Utsname
	_ = unix.Uname(&uts)
	return checkHost{
		release:     unix.ByteSliceToString(uts.Release[:]),
		kvm:         "/dev/kvm",
		cpuinfo:     "/proc/cpuinfo",
		vsock:       "/dev/vhost-vsock",
		vhostNet:    "/dev/vhost-net",
		tun:         "/dev/net/tun",
		filesystems: "/proc/filesystems",
		sysModule:   "/sys/module",
		libModules:  "/lib/modules",
		cgroupRoot:  "/sys/fs/cgroup",
		procCgroups: "/proc/cgroups",
		timeout:     commandTimeout,
		cgroupMode:  cgroups.Mode,
	}
}

// checkCmd tells whether this host can run colo with the configuration,
// and why not.
func checkCmd(ctx context.Context, e *env, args []string) error {
	if len(args) > 0 {
		return usageError("check takes no arguments, got %s", quoted(strings.Join(args, " ")))
	}
	return reportChecks(e.stdout, realCheckHost().checks(ctx, e.cfg))
}

// checks runs every check, in the order an operator fixes things: the
// accelerator and devices, the hypervisors, the guest image, the host
// kernel, then colo's own files and helpers. Both hypervisors are checked,
// so that the operator learns whether the other would work here; only the
// one hypervisor.type names can fail the check (required).
func (h checkHost) checks(ctx context.Context, cfg config.Config) []result {
	hv := cfg.Hypervisor
	var rs []result
	rs = append(rs, required(hv, "qemu", h.accel(hv.Accel))...)
	rs = append(rs, h.devices(cfg.Agent.Channel)...)
	rs = append(rs, required(hv, "qemu", h.qemu(ctx, hv))...)
	rs = append(rs, required(hv, "clh", h.cloudHypervisor(ctx, hv))...)
	rs = append(rs, h.driver(hv))
	rs = append(rs, checkReadable("guest kernel", hv.Kernel), checkReadable("guest initrd", hv.Initrd))
	rs = append(rs, h.cgroups()...)
	rs = append(rs, h.modules()...)
	rs = append(rs, h.filesystemTypes(hv)...)
	rs = append(rs, h.virtiofsd(ctx, cfg.Storage))
	rs = append(rs, checkWritable("state directory", cfg.Runtime.StateDir))
	rs = append(rs, required(hv, "qemu", []result{checkLookPath("setpriv", "setpriv", "QEMU is started through it to drop its capabilities")})...)
	return rs
}

// hypervisorType is the driver hv selects, as driver.New reads it.
func hypervisorType(hv config.Hypervisor) string {
	if hv.Type == "" {
		return "qemu"
	}
	return hv.Type
}

// required keeps the results of checks only hypervisor typ needs as they
// are when hv selects it, and turns their failures into warnings
// otherwise: the operator sees what the other hypervisor lacks here, and
// the exit status is about the configured one.
func required(hv config.Hypervisor, typ string, rs []result) []result {
	if hypervisorType(hv) == typ {
		return rs
	}
	for i := range rs {
		if rs[i].status == statusFail {
			rs[i].status = statusWarn
			rs[i].detail += fmt.Sprintf(" (needed only with hypervisor.type = %q)", typ)
		}
	}
	return rs
}

// accel tells which accelerator hypervisor.accel gives on this host, and
// why: the qemu driver's own choice. TCG works, only slower, so it is
// never a failure unless KVM was asked for.
func (h checkHost) accel(configured string) []result {
	var rs []result
	if err := hypervisor.OpenKVM(h.kvm); err != nil {
		rs = append(rs, checkWarn(h.kvm, "%v", err))
	} else {
		rs = append(rs, checkOK(h.kvm, "opens read-write"))
	}
	const what = "accelerator"
	accel, reason, err := qemu.ChooseAccel(configured, h.kvm, h.cpuinfo)
	switch {
	case err != nil:
		rs = append(rs, checkFail(what, "%v", err))
	case accel == "tcg" && configured != "tcg":
		rs = append(rs, checkWarn(what, "tcg, emulated and slower: %s", reason))
	default:
		rs = append(rs, checkOK(what, "%s: %s", accel, reason))
	}
	return rs
}

func openRW(path string) error {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	return f.Close()
}

// devices checks the device nodes QEMU and the shim open.
func (h checkHost) devices(channel string) []result {
	var rs []result
	err := openRW(h.vsock)
	switch {
	case channel == "serial":
		rs = append(rs, checkOK(h.vsock, "not needed (agent.channel = \"serial\")"))
	case err == nil:
		rs = append(rs, checkOK(h.vsock, "opens: the agent channel is vsock"))
	case channel == "vsock":
		rs = append(rs, checkFail(h.vsock, "agent.channel = \"vsock\" but %v", err))
	case errors.Is(err, os.ErrNotExist):
		rs = append(rs, checkWarn(h.vsock, "missing: the agent channel is virtio-serial (modprobe vhost_vsock for vsock)"))
	default:
		// The shim picks vsock by the node's existence, so QEMU would
		// fail to open it.
		rs = append(rs, checkFail(h.vsock, "exists, so agent.channel auto picks vsock, but %v", err))
	}
	if err := openRW(h.vhostNet); err != nil {
		rs = append(rs, checkWarn(h.vhostNet, "%v: NICs use QEMU's own virtio-net data path, slower (modprobe vhost_net)", err))
	} else {
		rs = append(rs, checkOK(h.vhostNet, "opens: NICs use vhost-net"))
	}
	if err := openRW(h.tun); err != nil {
		rs = append(rs, checkFail(h.tun, "%v: no TAP devices, so no pod with a network interface can start", err))
	} else {
		rs = append(rs, checkOK(h.tun, "opens: TAP devices for pods' interfaces"))
	}
	return rs
}

// qemu checks the QEMU binary, its version, and that it has the
// configured machine type.
func (h checkHost) qemu(ctx context.Context, hv config.Hypervisor) []result {
	name := hv.Path
	key := "hypervisor.path = " + fmt.Sprintf("%q", hv.Path)
	if name == "" {
		name, key = qemu.DefaultBinary, "in PATH"
	}
	path, err := exec.LookPath(name)
	if err != nil {
		return []result{checkFail("QEMU binary", "%s (%s): %v", name, key, err)}
	}
	rs := []result{checkOK("QEMU binary", "%s", path)}
	out, err := h.run(ctx, path, "-version")
	if err != nil {
		return append(rs, checkFail("QEMU version", "%v", err))
	}
	version, _, _ := strings.Cut(strings.TrimSpace(out), "\n")
	rs = append(rs, checkOK("QEMU version", "%s", version))
	out, err = h.run(ctx, path, "-machine", "help")
	if err != nil {
		return append(rs, checkFail("QEMU machine "+hv.Machine, "%v", err))
	}
	if slices.Contains(qemuMachines(out), hv.Machine) {
		rs = append(rs, checkOK("QEMU machine "+hv.Machine, "in %s -machine help", filepath.Base(path)))
	} else {
		rs = append(rs, checkFail("QEMU machine "+hv.Machine, "hypervisor.machine = %q is not in %s -machine help", hv.Machine, path))
	}
	return rs
}

// cloudHypervisor checks what Cloud Hypervisor needs here: its binary
// (hypervisor.path when hypervisor.type is clh, else in PATH), its version,
// and a KVM it can run on (clh.Check's test: CH has no emulation to fall
// back on).
func (h checkHost) cloudHypervisor(ctx context.Context, hv config.Hypervisor) []result {
	name, key := clh.DefaultBinary, "in PATH"
	if hypervisorType(hv) == "clh" && hv.Path != "" {
		name, key = hv.Path, fmt.Sprintf("hypervisor.path = %q", hv.Path)
	}
	var rs []result
	if path, err := exec.LookPath(name); err != nil {
		rs = append(rs, checkFail("Cloud Hypervisor binary", "%s (%s): %v", name, key, err))
	} else {
		rs = append(rs, checkOK("Cloud Hypervisor binary", "%s", path))
		if out, err := h.run(ctx, path, "--version"); err != nil {
			rs = append(rs, checkFail("Cloud Hypervisor version", "%v", err))
		} else {
			rs = append(rs, checkOK("Cloud Hypervisor version", "%s", firstLine(strings.TrimSpace(out))))
		}
	}
	if err := hypervisor.CheckKVM(h.kvm, h.cpuinfo); err != nil {
		rs = append(rs, checkFail("KVM for Cloud Hypervisor", "%v: Cloud Hypervisor runs only on KVM", err))
	} else {
		rs = append(rs, checkOK("KVM for Cloud Hypervisor", "%s opens and the CPU has hardware virtualization", h.kvm))
	}
	return rs
}

// machines are the machine types in `qemu -machine help`: the first
// word of each line after the heading.
func qemuMachines(help string) []string {
	var out []string
	for line := range strings.Lines(help) {
		f := strings.Fields(line)
		if len(f) == 0 || strings.HasSuffix(line, ":\n") || strings.HasSuffix(line, ":") {
			continue
		}
		out = append(out, f[0])
	}
	return out
}

// run runs a command with the host's timeout and returns its standard
// output; an error names the command and has its standard error.
func (h checkHost) run(ctx context.Context, name string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, h.timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	// A child that keeps the pipes open after the command is killed
	// must not hold Wait either.
	cmd.WaitDelay = time.Second
	var stdout, stderr strings.Builder
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	line := strings.Join(append([]string{name}, args...), " ")
	if ctx.Err() == context.DeadlineExceeded {
		return "", fmt.Errorf("%s: no answer within %s", line, h.timeout)
	}
	if err != nil {
		if msg := strings.TrimSpace(stderr.String()); msg != "" {
			return "", fmt.Errorf("%s: %v: %s", line, err, firstLine(msg))
		}
		return "", fmt.Errorf("%s: %v", line, err)
	}
	return stdout.String(), nil
}

func firstLine(s string) string {
	l, _, _ := strings.Cut(s, "\n")
	return l
}

// driver makes the hypervisor driver as the shim does, which checks the
// configuration against the host in the driver's own terms.
func (h checkHost) driver(hv config.Hypervisor) result {
	if _, err := driver.New(hv); err != nil {
		return checkFail("hypervisor driver", "%v", err)
	}
	return checkOK("hypervisor driver", "%s accepts the configuration", hv.Type)
}

// readable checks that a file of the guest image is a non-empty regular
// file that opens for reading.
func checkReadable(what, path string) result {
	f, err := os.Open(path)
	if err != nil {
		return checkFail(what, "%v (make guest builds it)", err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return checkFail(what, "%v", err)
	}
	if !fi.Mode().IsRegular() || fi.Size() == 0 {
		return checkFail(what, "%s is not a non-empty regular file", path)
	}
	if _, err := f.Read(make([]byte, 1)); err != nil {
		return checkFail(what, "read %s: %v", path, err)
	}
	return checkOK(what, "%s (%d MiB)", path, (fi.Size()+1<<20-1)>>20)
}

// cgroups checks the cgroup version and that the cpu and cpuset
// controllers, which co-location places vCPU threads with, are there in
// the version colo uses (v1 hierarchies on a hybrid host).
func (h checkHost) cgroups() []result {
	mode := h.cgroupMode()
	var name string
	switch mode {
	case cgroups.Unified:
		name = "v2"
	case cgroups.Hybrid:
		name = "v1 (hybrid: colo uses the v1 hierarchies)"
	case cgroups.Legacy:
		name = "v1"
	default:
		return []result{checkFail("cgroups", "no cgroup filesystem on %s", h.cgroupRoot)}
	}
	rs := []result{checkOK("cgroups", "%s", name)}
	have, err := h.controllers(mode == cgroups.Unified)
	if err != nil {
		return append(rs, checkFail("cgroup controllers", "%v", err))
	}
	for _, c := range []string{"cpu", "cpuset"} {
		if have[c] {
			rs = append(rs, checkOK("cgroup controller "+c, "available"))
		} else {
			rs = append(rs, checkFail("cgroup controller "+c, "not available: co-location cannot place vCPU threads"))
		}
	}
	return rs
}

// controllers are the cgroup controllers available: v2's root
// cgroup.controllers, or the v1 controllers enabled and mounted in a
// hierarchy of their own (hierarchy 0 in /proc/cgroups is none).
func (h checkHost) controllers(v2 bool) (map[string]bool, error) {
	have := make(map[string]bool)
	if v2 {
		p := filepath.Join(h.cgroupRoot, "cgroup.controllers")
		b, err := os.ReadFile(p)
		if err != nil {
			return nil, err
		}
		for _, c := range strings.Fields(string(b)) {
			have[c] = true
		}
		return have, nil
	}
	b, err := os.ReadFile(h.procCgroups)
	if err != nil {
		return nil, err
	}
	for line := range strings.Lines(string(b)) {
		f := strings.Fields(line)
		if len(f) < 4 || strings.HasPrefix(f[0], "#") {
			continue
		}
		have[f[0]] = f[1] != "0" && f[3] == "1"
	}
	return have, nil
}

// modules checks the host kernel's modules QEMU's devices need. Each is
// a warning only: colo falls back (serial channel, QEMU's own network
// path), and a missing tun shows as /dev/net/tun's failure.
func (h checkHost) modules() []result {
	release := h.release
	var rs []result
	for _, m := range []struct{ name, device string }{
		{"tun", h.tun}, {"vhost_net", h.vhostNet}, {"vhost_vsock", h.vsock},
	} {
		what := "kernel module " + m.name
		switch where := h.module(release, m.name); {
		case where != "":
			rs = append(rs, checkOK(what, "%s", where))
		case pathExists(m.device):
			// Built in without parameters: no /sys/module entry, and
			// no modules.builtin on hosts without /lib/modules.
			rs = append(rs, checkOK(what, "in the kernel (%s exists)", m.device))
		case h.loadable(release, m.name):
			rs = append(rs, checkWarn(what, "not loaded: modprobe %s", m.name))
		case !pathExists(filepath.Join(h.libModules, release)):
			rs = append(rs, checkWarn(what, "not loaded, and no %s to load it from", filepath.Join(h.libModules, release)))
		default:
			rs = append(rs, checkWarn(what, "not in kernel %s", release))
		}
	}
	return rs
}

// module tells how module name is in the running kernel ("loaded",
// "built in"), or "" if it is not known to be.
func (h checkHost) module(release, name string) string {
	if pathExists(filepath.Join(h.sysModule, name)) {
		return "loaded or built in (" + filepath.Join(h.sysModule, name) + ")"
	}
	if listsModule(filepath.Join(h.libModules, release, "modules.builtin"), name) {
		return "built in"
	}
	return ""
}

// loadable tells whether modules.dep has the module.
func (h checkHost) loadable(release, name string) bool {
	return listsModule(filepath.Join(h.libModules, release, "modules.dep"), name)
}

// listsModule tells whether a modules.builtin or modules.dep file has a
// line for module name ("kernel/drivers/net/tun.ko[.xz][: deps]"); file
// names may spell underscores as dashes.
func listsModule(file, name string) bool {
	f, err := os.Open(file)
	if err != nil {
		return false
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		p, _, _ := strings.Cut(sc.Text(), ":")
		base := filepath.Base(p)
		base, _, _ = strings.Cut(base, ".ko")
		if strings.ReplaceAll(base, "-", "_") == name {
			return true
		}
	}
	return false
}

func pathExists(path string) bool {
	_, err := os.Stat(path)
	return err == nil
}

// filesystemTypes checks /proc/filesystems for ramfs (QEMU's templates
// keep their memory on one) and tmpfs.
func (h checkHost) filesystemTypes(hv config.Hypervisor) []result {
	b, err := os.ReadFile(h.filesystems)
	if err != nil {
		return []result{checkFail("filesystems", "%v", err)}
	}
	have := make(map[string]bool)
	for line := range strings.Lines(string(b)) {
		f := strings.Fields(line)
		if len(f) > 0 {
			have[f[len(f)-1]] = true
		}
	}
	var rs []result
	for _, fs := range []struct{ name, why, driver string }{
		{"ramfs", "QEMU's VM templates keep their memory on it", "qemu"},
		{"tmpfs", "runtime.state_dir and template_dir are meant to be on one (/run), emptied at boot", ""},
	} {
		r := checkOK("filesystem "+fs.name, "in %s", h.filesystems)
		if !have[fs.name] {
			r = checkFail("filesystem "+fs.name, "not in %s: %s", h.filesystems, fs.why)
		}
		if fs.driver != "" {
			r = required(hv, fs.driver, []result{r})[0]
		}
		rs = append(rs, r)
	}
	return rs
}

// virtiofsd checks the virtio-fs daemon when storage.shared_fs needs it.
func (h checkHost) virtiofsd(ctx context.Context, s config.Storage) result {
	const what = "virtiofsd"
	if s.SharedFS != "virtio-fs" {
		return checkOK(what, "not needed (storage.shared_fs = %q)", s.SharedFS)
	}
	path, err := exec.LookPath(s.Virtiofsd)
	if err != nil {
		return checkFail(what, "storage.shared_fs = \"virtio-fs\" needs storage.virtiofsd: %v", err)
	}
	out, err := h.run(ctx, path, "--version")
	if err != nil {
		// Some builds have no --version; the binary is there all the
		// same.
		return checkOK(what, "%s", path)
	}
	return checkOK(what, "%s (%s)", path, firstLine(strings.TrimSpace(out)))
}

// writable checks that the shim can make files in dir, or make dir in
// its nearest existing parent, by doing so: permission bits do not tell
// of a read-only mount.
func checkWritable(what, dir string) result {
	d := dir
	for !pathExists(d) {
		parent := filepath.Dir(d)
		if parent == d {
			break
		}
		d = parent
	}
	fi, err := os.Stat(d)
	if err != nil {
		return checkFail(what, "%s: %v", dir, err)
	}
	if !fi.IsDir() {
		return checkFail(what, "%s: %s is not a directory", dir, d)
	}
	tmp, err := os.MkdirTemp(d, ".colo-check-")
	if err != nil {
		return checkFail(what, "%s: cannot write: %v", dir, err)
	}
	os.Remove(tmp)
	if d != dir {
		return checkOK(what, "%s does not exist yet; the shim can make it in %s", dir, d)
	}
	return checkOK(what, "%s is writable", dir)
}

// lookPath checks a helper binary in PATH.
func checkLookPath(what, name, why string) result {
	p, err := exec.LookPath(name)
	if err != nil {
		return checkFail(what, "%v: %s", err, why)
	}
	return checkOK(what, "%s", p)
}
