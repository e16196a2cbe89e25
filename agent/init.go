package agent

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"time"

	"github.com/containerd/log"
	"github.com/moby/sys/mountinfo"
	"golang.org/x/sys/unix"
)

const (
	// modulesList lists the kernel modules to load at boot, in order.
	modulesList = "/etc/colo/modules"
	// DefaultStateDir is libcontainer's state root in the guest.
	DefaultStateDir = "/run/colo-agent"
)

// BootParams are the agent's kernel command line parameters.
type BootParams struct {
	Channel  string // colo.channel=serial|vsock
	LogLevel string // colo.log=trace|debug|info|warn|error
}

// ParseCmdline reads the agent's parameters from a kernel command line.
// Bad values are reported and replaced by the defaults.
func ParseCmdline(cmdline string) (BootParams, []error) {
	p := BootParams{Channel: ChannelSerial, LogLevel: "warn"}
	var errs []error
	for _, field := range strings.Fields(cmdline) {
		key, value, _ := strings.Cut(field, "=")
		switch key {
		case "colo.channel":
			switch value {
			case ChannelSerial, ChannelVsock:
				p.Channel = value
			default:
				errs = append(errs, fmt.Errorf("colo.channel=%q: want %s or %s", value, ChannelSerial, ChannelVsock))
			}
		case "colo.log":
			switch value {
			case "trace", "debug", "info", "warn", "error":
				p.LogLevel = value
			default:
				errs = append(errs, fmt.Errorf("colo.log=%q: want trace, debug, info, warn or error", value))
			}
		}
	}
	return p, errs
}

// Init runs colo-agent as the guest's PID 1: it mounts the system
// filesystems, loads the kernel modules, starts the agent service as its
// child ("colo-agent serve ...") and reaps every orphan. It never returns: when
// the service exits, the guest powers off.
//
// Powering off rather than restarting the service: a new service would
// know none of the containers (they would run on, unmanaged), and over
// virtio-serial the host does not see the guest reconnect, so the shim's
// ttrpc session would break in confusing ways. A VM that stops is what the
// shim can detect and report, as with Kata, whose agent is PID 1 itself.
func Init(ctx context.Context) {
	if err := mountSystem(); err != nil {
		powerOff(ctx, fmt.Errorf("mount system filesystems: %w", err))
	}
	ensureConsole()
	// First thing once /proc is there: the service, started below,
	// inherits it (and sets it again itself).
	if err := protectFromOOM(); err != nil {
		log.G(ctx).WithError(err).Error("the guest OOM killer may pick PID 1")
	}

	cmdline, err := os.ReadFile("/proc/cmdline")
	if err != nil {
		log.G(ctx).WithError(err).Error("read kernel command line")
	}
	params, errs := ParseCmdline(string(cmdline))
	_ = log.SetLevel(params.LogLevel)
	for _, err := range errs {
		log.G(ctx).WithError(err).Warn("bad kernel command line parameter")
	}

	if err := loadModules(ctx, modulesList, "/lib/modules"); err != nil {
		log.G(ctx).WithError(err).Error("load kernel modules")
	}
	// The nodes of on-demand modules (/dev/net/tun), whose open loads them.
	if err := makeStaticNodes(moduleDir(), "/dev"); err != nil {
		log.G(ctx).WithError(err).Warn("create static device nodes")
	}
	enableControllers(ctx, "/sys/fs/cgroup")
	holdCgroupKeys(ctx, "/sys/fs/cgroup")
	if err := loopbackUp(); err != nil {
		log.G(ctx).WithError(err).Error("bring up loopback")
	}

	// The kernel drops signals to PID 1 that have no handler, but Go
	// handles them all and would exit; catch the usual ones instead.
	sigs := make(chan os.Signal, 8)
	signal.Notify(sigs, unix.SIGTERM, unix.SIGINT, unix.SIGHUP, unix.SIGUSR1, unix.SIGUSR2, unix.SIGPWR)
	go func() {
		for sig := range sigs {
			log.G(ctx).Warnf("ignoring signal %v", sig)
		}
	}()

	proc, err := os.StartProcess("/proc/self/exe",
		[]string{os.Args[0], "serve", "--channel", params.Channel, "--log-level", params.LogLevel, "--state-dir", DefaultStateDir},
		&os.ProcAttr{
			Env:   []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"},
			Files: []*os.File{os.Stdin, os.Stdout, os.Stderr},
		})
	if err != nil {
		powerOff(ctx, fmt.Errorf("start the agent service: %w", err))
	}
	servePid := proc.Pid
	// Reaped by the loop below, not by os.Process.Wait.
	proc.Release()
	log.G(ctx).Infof("agent service started, pid %d", servePid)

	for {
		var ws unix.WaitStatus
		pid, err := unix.Wait4(-1, &ws, 0, nil)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			powerOff(ctx, fmt.Errorf("wait for children: %w", err))
		}
		if pid == servePid {
			powerOff(ctx, fmt.Errorf("agent service exited: %s", describeWait(ws)))
		}
		log.G(ctx).Debugf("reaped orphan %d: %s", pid, describeWait(ws))
	}
}

func describeWait(ws unix.WaitStatus) string {
	if ws.Signaled() {
		return fmt.Sprintf("killed by %v", ws.Signal())
	}
	return fmt.Sprintf("exit status %d", ws.ExitStatus())
}

// powerOff logs why and powers the guest off. PID 1 must never exit (the
// kernel would panic), so it does not return.
func powerOff(ctx context.Context, reason error) {
	log.G(ctx).WithError(reason).Error("powering off")
	unix.Sync()
	err := unix.Reboot(unix.LINUX_REBOOT_CMD_POWER_OFF)
	log.G(ctx).WithError(err).Error("power off failed")
	for {
		time.Sleep(time.Hour)
	}
}

type systemMount struct {
	source, target, fstype string
	flags                  uintptr
	data                   string
}

var systemMounts = []systemMount{
	{"proc", "/proc", "proc", unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC, ""},
	{"sysfs", "/sys", "sysfs", unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC, ""},
	{"devtmpfs", "/dev", "devtmpfs", unix.MS_NOSUID, "mode=0755"},
	{"devpts", "/dev/pts", "devpts", unix.MS_NOSUID | unix.MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620"},
	{"tmpfs", "/dev/shm", "tmpfs", unix.MS_NOSUID | unix.MS_NODEV, "mode=1777"},
	{"tmpfs", "/run", "tmpfs", unix.MS_NOSUID | unix.MS_NODEV, "mode=0755"},
	{"tmpfs", "/tmp", "tmpfs", unix.MS_NOSUID | unix.MS_NODEV, "mode=1777"},
	{"cgroup2", "/sys/fs/cgroup", "cgroup2", unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC, ""},
}

func mountSystem() error {
	for _, m := range systemMounts {
		if err := os.MkdirAll(m.target, 0o755); err != nil {
			return err
		}
		if mounted, err := mountinfo.Mounted(m.target); err == nil && mounted {
			continue
		}
		if err := unix.Mount(m.source, m.target, m.fstype, m.flags, m.data); err != nil {
			return fmt.Errorf("mount %s on %s: %w", m.fstype, m.target, err)
		}
	}
	for link, target := range map[string]string{
		"/dev/fd":     "/proc/self/fd",
		"/dev/stdin":  "/proc/self/fd/0",
		"/dev/stdout": "/proc/self/fd/1",
		"/dev/stderr": "/proc/self/fd/2",
	} {
		if err := os.Symlink(target, link); err != nil && !errors.Is(err, fs.ErrExist) {
			return err
		}
	}
	return nil
}

// ensureConsole gives PID 1 stdio on /dev/console when the kernel could
// not (an initramfs without /dev/console).
func ensureConsole() {
	if _, err := unix.FcntlInt(2, unix.F_GETFD, 0); err == nil {
		return
	}
	fd, err := unix.Open("/dev/console", unix.O_RDWR|unix.O_NOCTTY, 0)
	if err != nil {
		return
	}
	for i := 0; i < 3; i++ {
		_ = unix.Dup3(fd, i, 0)
	}
	if fd > 2 {
		unix.Close(fd)
	}
}

// enableControllers delegates every available cgroup v2 controller to
// child cgroups, one by one so that one refusal does not stop the rest.
func enableControllers(ctx context.Context, root string) {
	b, err := os.ReadFile(filepath.Join(root, "cgroup.controllers"))
	if err != nil {
		log.G(ctx).WithError(err).Warn("read cgroup controllers")
		return
	}
	for _, c := range strings.Fields(string(b)) {
		if err := os.WriteFile(filepath.Join(root, "cgroup.subtree_control"), []byte("+"+c), 0); err != nil {
			log.G(ctx).WithError(err).Debugf("enable cgroup controller %s", c)
		}
	}
}

// keysCgroup is the empty cgroup holdCgroupKeys keeps for the guest's life.
const keysCgroup = ".colo-keys"

// holdCgroupKeys makes an empty child cgroup of root, with every
// controller root gives its children, and keeps it. The first memory
// cgroup to come online, and the first of each kind for some other
// controllers (cpuset, socket accounting), switch static keys in the kernel:
// the kernel patches the code at every site of the key, on every CPU, with
// int3 and cross-CPU syncs (text_poke_bp), at hundreds of allocation sites
// for memcg_kmem_enabled_key. A VM restored from a template did that at its
// first CreateSandbox, when the CPU classes' cgroups are made, and under
// TCG about one start in a hundred never finished it: a vCPU looped in
// asm_exc_int3 at that key's site in kmem_cache_alloc, whose bytes were
// no longer an int3 (so the handler rewinds to it and the vCPU runs a
// stale translation of it again), with soft lockups reported on both
// vCPUs and the start cut short by boot_timeout. Switched at boot, while
// little else runs and before the template is saved, the keys stay on in
// every clone, and the pod's own cgroups only count up. A failure is
// logged: the guest works without it.
func holdCgroupKeys(ctx context.Context, root string) {
	if err := os.Mkdir(filepath.Join(root, keysCgroup), 0o755); err != nil && !errors.Is(err, fs.ErrExist) {
		log.G(ctx).WithError(err).Warn("make the cgroup that keeps the kernel's cgroup static keys on")
	}
}

// loadModules loads the modules named in listPath, in order. A line is a
// path relative to / or a module name found under moduleRoot/$(uname -r).
// One module failing does not stop the others.
func loadModules(ctx context.Context, listPath, moduleRoot string) error {
	f, err := os.Open(listPath)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	defer f.Close()
	entries, err := parseModuleList(f)
	if err != nil {
		return fmt.Errorf("read %s: %w", listPath, err)
	}
	var uts unix.Utsname
	if err := unix.Uname(&uts); err != nil {
		return err
	}
	r := &moduleResolver{dir: filepath.Join(moduleRoot, unix.ByteSliceToString(uts.Release[:]))}
	var errs []error
	for _, e := range entries {
		start := time.Now()
		path, err := r.resolve(e)
		if err == nil {
			err = loadModule(path)
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("module %s: %w", e, err))
			continue
		}
		log.G(ctx).Debugf("loaded module %s in %v", path, time.Since(start))
	}
	return errors.Join(errs...)
}

func parseModuleList(r io.Reader) ([]string, error) {
	var entries []string
	s := bufio.NewScanner(r)
	for s.Scan() {
		line := strings.TrimSpace(s.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		entries = append(entries, line)
	}
	return entries, s.Err()
}

// moduleSuffixes are the module file names the kernel can load; the
// compressed ones need its in-kernel decompression.
var moduleSuffixes = []string{".ko", ".ko.xz", ".ko.zst", ".ko.gz"}

type moduleResolver struct {
	dir    string
	byName map[string]string // normalized module name -> path
}

func (r *moduleResolver) resolve(entry string) (string, error) {
	if strings.Contains(entry, "/") {
		return filepath.Join("/", entry), nil
	}
	if r.byName == nil {
		r.byName = make(map[string]string)
		err := filepath.WalkDir(r.dir, func(path string, d fs.DirEntry, err error) error {
			if err != nil || d.IsDir() {
				return err
			}
			if name, ok := moduleName(d.Name()); ok {
				r.byName[name] = path
			}
			return nil
		})
		if err != nil {
			return "", fmt.Errorf("index modules: %w", err)
		}
	}
	name, ok := moduleName(entry)
	if !ok {
		name = normalizeModuleName(entry)
	}
	path, ok := r.byName[name]
	if !ok {
		return "", fmt.Errorf("not found under %s: %w", r.dir, fs.ErrNotExist)
	}
	return path, nil
}

// moduleName returns the module name of a module file name.
func moduleName(file string) (string, bool) {
	for _, suffix := range moduleSuffixes {
		if name, ok := strings.CutSuffix(file, suffix); ok {
			return normalizeModuleName(name), true
		}
	}
	return "", false
}

// normalizeModuleName: the kernel treats - and _ in module names alike.
func normalizeModuleName(name string) string {
	return strings.ReplaceAll(name, "-", "_")
}

func loadModule(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	return loadModuleFile(f)
}

// loadModuleFile loads the open module file f (compressed unless its name
// ends in .ko); a module loaded already is no error. Boot and
// /sbin/modprobe (modprobe.go) both load through it.
func loadModuleFile(f *os.File) error {
	flags := 0
	if !strings.HasSuffix(f.Name(), ".ko") {
		flags |= unix.MODULE_INIT_COMPRESSED_FILE
	}
	err := unix.FinitModule(int(f.Fd()), "", flags)
	if errors.Is(err, unix.EEXIST) {
		return nil
	}
	return err
}
