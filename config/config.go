// Package config is colo's one configuration struct, read from TOML.
//
// Every field has a built-in default, so no file is needed. The file is
// looked up in this order: the containerd runtime option ConfigPath, the
// COLO_CONFIG environment variable, then DefaultPath (silently skipped when
// it does not exist). docs/config.md documents every field.
package config

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/pelletier/go-toml/v2"

	"github.com/colo-runtime/colo/vfio"
)

// DefaultPath is where colo looks for its configuration when neither the
// runtime option nor COLO_CONFIG names a file.
const DefaultPath = "/etc/colo/config.toml"

// EnvPath names the environment variable that overrides DefaultPath.
const EnvPath = "COLO_CONFIG"

// Config is the whole configuration.
type Config struct {
	Hypervisor Hypervisor `toml:"hypervisor"`
	Agent      Agent      `toml:"agent"`
	Storage    Storage    `toml:"storage"`
	Runtime    Runtime    `toml:"runtime"`
	Colocation Colocation `toml:"colocation"`
	Devices    Devices    `toml:"devices"`
	Yield      Yield      `toml:"yield"`
}

// Yield configures offline yielding (docs/operations.md, "Offline
// yields"): `colo monitor` watches the CPU that everything but the offline
// vCPUs uses and lowers the offline vCPUs' CPU quota on the host so that
// HeadroomCPUs stay free, raising it again when online load falls. It
// works on the cgroups placement makes, <sandbox cgroup>/vcpu-<class>.
type Yield struct {
	// Enabled runs the controller in `colo monitor` (default false).
	Enabled bool `toml:"enabled"`
	// Interval is how often usage is sampled and the quota decided
	// (default 1s).
	Interval Duration `toml:"interval"`
	// HeadroomCPUs are the host CPUs kept free for online work on top of
	// what it uses now (default 1): the room a rising online load has
	// before the next interval lowers the offline quota.
	HeadroomCPUs float64 `toml:"headroom_cpus"`
	// FloorCPUs is the least quota each offline cgroup keeps, in CPUs
	// (default 0.1, at least 0.01: the kernel's least quota is 1 ms a
	// 100 ms period), so that offline pods slow down but never stop:
	// their guests' timers, agents and health checks go on.
	FloorCPUs float64 `toml:"floor_cpus"`
	// RaiseAfter is how many intervals in a row the allowance must stay
	// above the offline limit before it is raised (default 5); lowering is
	// at once. It keeps a bursty online load from having the offline
	// pods' quota follow each burst.
	RaiseAfter int `toml:"raise_after"`
	// RaiseStepCPUs bounds each raise (default 0.5): the limit climbs back
	// by at most this much an interval.
	RaiseStepCPUs float64 `toml:"raise_step_cpus"`
	// OfflineClasses are the co-location classes (colocation.classes)
	// whose vCPUs are offline and yield (default ["low"]).
	OfflineClasses []string `toml:"offline_classes"`
}

// Devices configures what of the host's devices pods may have in their VM
// (docs/devices.md).
type Devices struct {
	// PCI lists the host PCI addresses ("0000:45:00.0") that pods may
	// have passed through with VFIO (annotation io.colo.disks, where
	// colocation.annotations allows it); a pod asking for another is
	// refused (default: none).
	PCI []string `toml:"pci"`
	// DiskPaths lists the host block devices and image files, or the
	// directories holding them, that pods may have as disks (annotation
	// io.colo.disks); a pod naming any other path is refused (default:
	// none). Whoever may set the annotation can write to what is listed.
	DiskPaths []string `toml:"disk_paths"`
	// PassthroughNICs passes a physical NIC (an ENI, an SR-IOV VF) that
	// the CNI put in the pod's network namespace through to the VM with
	// VFIO, instead of mirroring it with tc (default true; it needs an
	// IOMMU, and the NIC's address in PCI).
	PassthroughNICs bool `toml:"passthrough_nics"`
}

// Colocation configures CPU priority classes (docs/colocation.md): on the
// host, each class's vCPU threads get a cgroup of their own under the
// sandbox's, with the class's CPU weight; in the guest, containers that
// choose a class (annotation io.colo.class, where Annotations allows it)
// run on its vCPUs.
type Colocation struct {
	// Classes, from the highest priority to the lowest (default high:
	// weight 100, low: weight 10 and oom_score_adj 500). The guest's
	// network interrupts go to the first class's vCPUs.
	Classes []Class `toml:"classes"`
	// VCPUs names the class of each vCPU, in order (default: every vCPU
	// in the first class); vCPUs beyond the list, which a pod's size or a
	// resize adds, take its last class. Pod annotation io.colo.vcpus
	// ("high,low").
	VCPUs []string `toml:"vcpus"`
	// PodWeight, if not 0, is the CPU weight (1 to 10000) of the sandbox's
	// own host cgroup: low for offline pods. Pod annotation
	// io.colo.pod-weight.
	PodWeight uint64 `toml:"pod_weight"`
	// OverheadWeight is the CPU weight of the host cgroup of the
	// hypervisor's other threads and helpers (default 100).
	OverheadWeight uint64 `toml:"overhead_weight"`
	// OverheadIdle runs those under SCHED_IDLE. Pod annotation
	// io.colo.overhead-idle ("true").
	OverheadIdle bool `toml:"overhead_idle"`
	// Annotations are the io.colo.* annotations (ColocationAnnotations)
	// that pods and containers may set (default none): also the pod's
	// io.colo.host-namespaces, which lets a pod that asks for the node's
	// namespaces have the guest's instead (docs/kubernetes.md). They let a pod's
	// author move their work to better vCPUs or away from the node's
	// priorities, so the node's administrator opts in to each: one not
	// listed is ignored.
	Annotations []string `toml:"annotations"`
}

// ColocationAnnotations are the io.colo.* annotations colo knows, each of
// which colocation.annotations may allow: io.colo.class (a container's
// class), io.colo.vcpus, io.colo.pod-weight, io.colo.overhead-idle,
// io.colo.host-namespaces and io.colo.disks (a pod's). Any other io.colo.* annotation is an
// error, so that a typo is not mistaken for a setting that took effect.
func ColocationAnnotations() []string {
	return []string{"io.colo.class", "io.colo.vcpus", "io.colo.pod-weight", "io.colo.overhead-idle", "io.colo.host-namespaces", "io.colo.disks"}
}

// Class is a CPU priority class.
type Class struct {
	Name string `toml:"name"`
	// Weight is the CPU weight (1 to 10000; cgroup v1 gets 1024 shares
	// per 100) of the class's vCPU threads on the host.
	Weight uint64 `toml:"weight"`
	// CPUs, if set, are the host CPUs its vCPU threads may run on ("2-3").
	CPUs string `toml:"cpus"`
	// GuestWeight is the CPU weight of the class's guest cgroup (default:
	// Weight).
	GuestWeight uint64 `toml:"guest_weight"`
	// OOMScoreAdj is given to the processes of the class's containers, so
	// that the guest's OOM killer takes low classes first.
	OOMScoreAdj int `toml:"oom_score_adj"`
}

// Hypervisor configures the VM.
type Hypervisor struct {
	// Type is the driver: "qemu" (default) or "clh" (Cloud Hypervisor,
	// docs/hypervisors.md). It was called name: a file that still says
	// so gets an error naming the new key. A sandbox state written before
	// the rename holds no Type, which means qemu, the one driver there was.
	Type string `toml:"type"`
	// Path of the hypervisor binary; empty means the driver's default
	// looked up in PATH (qemu-system-x86_64).
	Path string `toml:"path"`
	// Machine type: "q35" (default) or "microvm".
	Machine string `toml:"machine"`
	// Accel: "auto" (default: KVM where it can boot a guest, else TCG),
	// "kvm" or "tcg".
	Accel string `toml:"accel"`
	// VCPUs is the number of guest vCPUs of a pod without a CPU limit
	// (default 2: a container starts faster when the agent and the
	// container's init run side by side, and co-location gives vCPUs
	// different priorities). Templates are taken at this size.
	VCPUs int `toml:"vcpus"`
	// MemoryMB is the guest memory in MiB of a pod without a memory
	// limit (default 256). Templates are taken at this size.
	MemoryMB int `toml:"memory_mb"`
	// BaseVCPUs and BaseMemoryMB are the guest's own share, added to a
	// pod's limits: a pod limited to 2 CPUs and 1 GiB gets a VM of
	// BaseVCPUs+2 vCPUs and BaseMemoryMB+1024 MiB (defaults 0 and 256:
	// the guest kernel and agent need memory of their own, and a pod's
	// vCPUs are its CPU limit, as nproc shows inside it). BaseMemoryMB is
	// also the memory a VM boots with and never gives up (at most
	// MemoryMB); the rest is plugged and unplugged as the pod's size
	// changes.
	BaseVCPUs    int `toml:"base_vcpus"`
	BaseMemoryMB int `toml:"base_memory_mb"`
	// MaxVCPUs bounds a VM's vCPUs (default 0: the host's CPUs): a pod
	// that would need more is refused at create, a resize beyond it is an
	// error, and it is the hot-plug headroom every VM declares at launch.
	MaxVCPUs int `toml:"max_vcpus"`
	// MaxMemoryMB bounds a VM's memory in MiB in the same way (default
	// 0: the host's memory). The headroom costs the host no memory until
	// plugged.
	MaxMemoryMB int `toml:"max_memory_mb"`
	// MemoryOverheadMB is what a VM costs the host beyond its guest
	// memory (the hypervisor's own memory, page tables, virtio-fs daemon):
	// the sandbox's host cgroup is limited to the VM's memory plus this,
	// and follows resizes (default 0: no limit set by colo; kubelet's pod
	// cgroup limit still applies). docs/kubernetes.md has the figure to
	// declare as Pod Overhead.
	MemoryOverheadMB int `toml:"memory_overhead_mb"`
	// Kernel is the guest kernel: an uncompressed vmlinux with a PVH entry
	// (default /usr/share/colo/vmlinux).
	Kernel string `toml:"kernel"`
	// Initrd is the guest initrd holding colo-agent as /init (default
	// /usr/share/colo/initrd.img).
	Initrd string `toml:"initrd"`
	// KernelParams are appended to colo's own kernel command line: the
	// shim puts them in the VM's (hypervisor.VMConfig.KernelParams) after
	// the agent's channel, which they may override, and before its log
	// level.
	KernelParams string `toml:"kernel_params"`
	// BootTimeout bounds a sandbox's start, from virtiofsd and the VM's
	// launch until the agent answers and the guest is set up (default
	// 30s). A template made first has a bound of its own, twice this: it
	// is a boot and a save.
	BootTimeout Duration `toml:"boot_timeout"`
	// ShutdownTimeout bounds a graceful VM shutdown before SIGKILL
	// (default 5s).
	ShutdownTimeout Duration `toml:"shutdown_timeout"`
	// HotplugPorts is how many PCIe root ports a q35 VM gets for devices
	// added after boot: a pod's NICs and virtio-fs share when the VM comes
	// from a template, and interfaces that appear later (default 6;
	// microvm has none).
	HotplugPorts int `toml:"hotplug_ports"`
	// Template starts VMs from a snapshot of a guest booted once per
	// configuration and guest image (kept in runtime.template_dir),
	// instead of booting each (default true; q35 without host PCI devices
	// only, on either agent channel).
	Template bool `toml:"template"`
	// DumpDir is where the shim writes a vmcore of a guest whose kernel
	// panicked (an ELF core of the guest's memory, for crash), named
	// <sandbox id>-<time>.vmcore, before it fails the sandbox; only when
	// the directory's filesystem has at least twice the guest's memory
	// free (default "": no dump, the panic is logged).
	DumpDir string `toml:"dump_dir"`
	// DumpTimeout bounds writing one vmcore (default 5m); a dump cut short
	// is removed.
	DumpTimeout Duration `toml:"dump_timeout"`
	// NICModel is the guest NIC of the pod's mirrored interfaces:
	// "virtio-net" (default), or an emulated physical NIC, "e1000e", which
	// the guest drives as it would a passed-through one (q35 only). "igb"
	// is refused: QEMU 7.2 has no such device.
	NICModel string `toml:"nic_model"`
	// Sandbox runs QEMU under its seccomp filter (-sandbox on with
	// obsolete, elevateprivileges, spawn and resourcecontrol denied;
	// default true). Turning it off is unsafe: the guest is untrusted, and
	// QEMU's device emulation is what stands between it and the host, so
	// a guest that finds a bug there gets every system call a root process
	// may make. Off is for debugging QEMU only.
	Sandbox bool `toml:"sandbox"`
}

// Agent configures the channel to colo-agent.
type Agent struct {
	// Channel: "auto" (default: vsock where /dev/vhost-vsock exists, else
	// serial), "vsock" or "serial".
	Channel string `toml:"channel"`
	// LogLevel of the agent inside the guest: "debug", "info", "warn"
	// (default) or "error". Its log goes to the guest console, which the
	// shim logs at debug level.
	LogLevel string `toml:"log_level"`
	// CallTimeout bounds each agent call that answers at once: state,
	// signals, stats, pids, resize, stdin close, pause (default 10s).
	// Calls that wait for something in the guest (a process's exit, its
	// output, OOM events, stdin the container reads) have no deadline of
	// their own: they end when the sandbox does.
	CallTimeout Duration `toml:"call_timeout"`
	// CreateTimeout bounds each agent call that sets something up or
	// takes it down in the guest: container create, start and remove, an
	// exec's start, the sandbox's set-up and network (default 60s).
	CreateTimeout Duration `toml:"create_timeout"`
	// HealthInterval is how often the shim checks that the agent answers
	// (default 5s); after HealthFailures checks in a row without an
	// answer (default 3) the sandbox is declared failed: its processes
	// exit and the VM is torn down.
	HealthInterval Duration `toml:"health_interval"`
	HealthFailures int      `toml:"health_failures"`
	// DebugConsole gives every guest a shell outside its containers, as
	// root in the guest, on a port of its own (never the agent's
	// channel), reached through the sandbox's management socket: `colo
	// console` (default false). For debugging: whoever can reach the
	// management socket (root on the node) gets it.
	DebugConsole bool `toml:"debug_console"`
}

// Storage configures how container filesystems reach the guest.
type Storage struct {
	// SharedFS: "9p" (default) or "virtio-fs". With 9p, VMs restored
	// from a template share the pages of its memory; virtio-fs is faster
	// for file I/O, but its daemon maps all guest memory, so each VM's
	// memory is its own.
	SharedFS string `toml:"shared_fs"`
	// Virtiofsd is the virtio-fs daemon binary (default
	// /usr/lib/qemu/virtiofsd, shipped by Debian's qemu-system-common).
	Virtiofsd string `toml:"virtiofsd"`
	// BlockRootfs attaches a container rootfs that the snapshotter hands
	// over as a block device or image file (blockfile, devmapper) to the
	// VM as a disk, which the guest mounts: nothing of it is mounted on
	// the host or in the share (default true; false mounts it on the
	// host and shares it like any other). Needs hot-plug: q35.
	BlockRootfs bool `toml:"block_rootfs"`
	// BlockDriver is the disk a block rootfs is attached as:
	// "virtio-blk" (default: a PCI device per disk, on a hot-plug port)
	// or "virtio-scsi" (a LUN on one controller).
	BlockDriver string `toml:"block_driver"`
}

// Runtime configures the shim itself.
type Runtime struct {
	// StateDir holds one directory per sandbox with its sockets, pid files,
	// mounts and state.json (default /run/colo).
	StateDir string `toml:"state_dir"`
	// MaxParallelStarts is how many VMs (with their first container) the
	// host's shims start at once; the others wait their turn (default 0:
	// as many as the host has CPUs).
	MaxParallelStarts int `toml:"max_parallel_starts"`
	// Pprof serves Go's profiles of the shim at /debug/pprof/ on each
	// sandbox's management socket (default false).
	Pprof bool `toml:"pprof"`
	// TemplateDir keeps the VM templates (hypervisor.template), one per
	// VM configuration and guest image (default /run/colo/templates: a
	// tmpfs, as they are memory images).
	TemplateDir string `toml:"template_dir"`
}

// Default returns the built-in configuration.
func Default() Config {
	return Config{
		Hypervisor: Hypervisor{
			Type:            "qemu",
			Machine:         "q35",
			Accel:           "auto",
			VCPUs:           2,
			MemoryMB:        256,
			BaseMemoryMB:    256,
			Kernel:          "/usr/share/colo/vmlinux",
			Initrd:          "/usr/share/colo/initrd.img",
			BootTimeout:     Duration(30 * time.Second),
			ShutdownTimeout: Duration(5 * time.Second),
			DumpTimeout:     Duration(5 * time.Minute),
			HotplugPorts:    6,
			Template:        true,
			NICModel:        "virtio-net",
			Sandbox:         true,
		},
		Agent: Agent{
			Channel:        "auto",
			LogLevel:       "warn",
			CallTimeout:    Duration(10 * time.Second),
			CreateTimeout:  Duration(60 * time.Second),
			HealthInterval: Duration(5 * time.Second),
			HealthFailures: 3,
		},
		Storage: Storage{
			SharedFS:    "9p",
			Virtiofsd:   "/usr/lib/qemu/virtiofsd",
			BlockRootfs: true,
			BlockDriver: "virtio-blk",
		},
		Devices: Devices{
			PassthroughNICs: true,
		},
		Colocation: Colocation{
			Classes: []Class{
				{Name: "high", Weight: 100},
				{Name: "low", Weight: 10, OOMScoreAdj: 500},
			},
			OverheadWeight: 100,
		},
		Runtime: Runtime{
			StateDir:    "/run/colo",
			TemplateDir: "/run/colo/templates",
		},
		Yield: Yield{
			Interval:       Duration(time.Second),
			HeadroomCPUs:   1,
			FloorCPUs:      0.1,
			RaiseAfter:     5,
			RaiseStepCPUs:  0.5,
			OfflineClasses: []string{"low"},
		},
	}
}

// Load reads the configuration. path is the runtime option ConfigPath and
// may be empty.
func Load(path string) (Config, error) {
	explicit := true
	if path == "" {
		path = os.Getenv(EnvPath)
	}
	if path == "" {
		path, explicit = DefaultPath, false
	}
	data, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) && !explicit {
		c := Default()
		return c, c.Validate()
	}
	if err != nil {
		return Config{}, fmt.Errorf("config: %w", err)
	}
	c, err := Parse(data)
	if err != nil {
		return Config{}, fmt.Errorf("config %s: %w", path, err)
	}
	return c, nil
}

// renamedKeys are keys colo once had, by the key that replaced them: a
// file with one is refused (it would mean something else, or nothing, if
// read as it was written) with the new name in the error.
var renamedKeys = map[string]string{
	"hypervisor.name": "hypervisor.type",
}

// Parse decodes TOML over the defaults and validates the result. Unknown
// keys are errors, so a typo never silently falls back to a default.
func Parse(data []byte) (Config, error) {
	c := Default()
	dec := toml.NewDecoder(bytes.NewReader(data)).DisallowUnknownFields()
	if err := dec.Decode(&c); err != nil {
		var strict *toml.StrictMissingError
		if errors.As(err, &strict) {
			var keys []string
			for _, e := range strict.Errors {
				row, _ := e.Position()
				key := strings.Join(e.Key(), ".")
				if to, ok := renamedKeys[key]; ok {
					keys = append(keys, fmt.Sprintf("%s (line %d): renamed %s", key, row, to))
					continue
				}
				keys = append(keys, fmt.Sprintf("%s (line %d)", key, row))
			}
			return Config{}, fmt.Errorf("unknown key: %s", strings.Join(keys, ", "))
		}
		var de *toml.DecodeError
		if errors.As(err, &de) {
			row, col := de.Position()
			return Config{}, fmt.Errorf("line %d column %d: %w", row, col, err)
		}
		return Config{}, err
	}
	return c, c.Validate()
}

// Validate checks values that TOML types cannot.
func (c Config) Validate() error {
	var errs []error
	oneOf := func(field, v string, allowed ...string) {
		for _, a := range allowed {
			if v == a {
				return
			}
		}
		errs = append(errs, fmt.Errorf("%s = %q: want one of %q", field, v, allowed))
	}
	h := c.Hypervisor
	oneOf("hypervisor.type", h.Type, "qemu", "clh")
	oneOf("hypervisor.machine", h.Machine, "q35", "microvm")
	oneOf("hypervisor.accel", h.Accel, "auto", "kvm", "tcg")
	if h.NICModel == "igb" {
		// QEMU's igb came with 8.0; Debian 12's QEMU is 7.2.
		errs = append(errs, errors.New(`hypervisor.nic_model = "igb": QEMU 7.2 (Debian 12) has no igb device, QEMU 8.0 added it: use "e1000e"`))
	} else {
		oneOf("hypervisor.nic_model", h.NICModel, "virtio-net", "e1000e")
	}
	oneOf("storage.block_driver", c.Storage.BlockDriver, "virtio-blk", "virtio-scsi")
	for i, p := range c.Devices.DiskPaths {
		if !filepath.IsAbs(p) || filepath.Clean(p) != p || p == "/" {
			errs = append(errs, fmt.Errorf("devices.disk_paths[%d] = %q: want an absolute, clean path other than /", i, p))
		}
	}
	for i, a := range c.Devices.PCI {
		if vfio.CheckAddress(a) != nil {
			errs = append(errs, fmt.Errorf("devices.pci[%d] = %q: want a PCI address, domain:bus:slot.function (0000:45:00.0)", i, a))
		}
	}
	if h.VCPUs < 1 {
		errs = append(errs, fmt.Errorf("hypervisor.vcpus = %d: want at least 1", h.VCPUs))
	}
	if h.MemoryMB < 64 {
		errs = append(errs, fmt.Errorf("hypervisor.memory_mb = %d: want at least 64", h.MemoryMB))
	}
	if h.BaseVCPUs < 0 {
		errs = append(errs, fmt.Errorf("hypervisor.base_vcpus = %d: want 0 or more", h.BaseVCPUs))
	}
	if h.BaseMemoryMB < 64 {
		errs = append(errs, fmt.Errorf("hypervisor.base_memory_mb = %d: want at least 64", h.BaseMemoryMB))
	}
	if h.MemoryOverheadMB < 0 {
		errs = append(errs, fmt.Errorf("hypervisor.memory_overhead_mb = %d: want 0 (no limit) or more", h.MemoryOverheadMB))
	}
	if h.MaxVCPUs < 0 {
		errs = append(errs, fmt.Errorf("hypervisor.max_vcpus = %d: want 0 (the host's CPUs) or more", h.MaxVCPUs))
	}
	if h.MaxMemoryMB < 0 {
		errs = append(errs, fmt.Errorf("hypervisor.max_memory_mb = %d: want 0 (the host's memory) or more", h.MaxMemoryMB))
	}
	if h.HotplugPorts < 0 || h.HotplugPorts > 32 {
		errs = append(errs, fmt.Errorf("hypervisor.hotplug_ports = %d: want 0 to 32", h.HotplugPorts))
	}
	if h.BootTimeout <= 0 {
		errs = append(errs, fmt.Errorf("hypervisor.boot_timeout = %s: want a positive duration", h.BootTimeout))
	}
	if h.DumpTimeout <= 0 {
		errs = append(errs, fmt.Errorf("hypervisor.dump_timeout = %s: want a positive duration", h.DumpTimeout))
	}
	if h.DumpDir != "" && !filepath.IsAbs(h.DumpDir) {
		errs = append(errs, fmt.Errorf("hypervisor.dump_dir = %q: want an absolute path", h.DumpDir))
	}
	if h.ShutdownTimeout <= 0 {
		errs = append(errs, fmt.Errorf("hypervisor.shutdown_timeout = %s: want a positive duration", h.ShutdownTimeout))
	}
	for _, d := range []struct {
		key string
		v   Duration
	}{
		{"agent.call_timeout", c.Agent.CallTimeout},
		{"agent.create_timeout", c.Agent.CreateTimeout},
		{"agent.health_interval", c.Agent.HealthInterval},
	} {
		if d.v <= 0 {
			errs = append(errs, fmt.Errorf("%s = %s: want a positive duration", d.key, d.v))
		}
	}
	if c.Agent.HealthFailures < 1 {
		errs = append(errs, fmt.Errorf("agent.health_failures = %d: want 1 or more", c.Agent.HealthFailures))
	}
	for _, p := range []struct{ field, path string }{
		{"hypervisor.kernel", h.Kernel},
		{"hypervisor.initrd", h.Initrd},
		{"runtime.template_dir", c.Runtime.TemplateDir},
		{"runtime.state_dir", c.Runtime.StateDir},
	} {
		if !filepath.IsAbs(p.path) {
			errs = append(errs, fmt.Errorf("%s = %q: want an absolute path", p.field, p.path))
		}
	}
	if c.Runtime.MaxParallelStarts < 0 {
		errs = append(errs, fmt.Errorf("runtime.max_parallel_starts = %d: want 0 (the host's CPUs) or more", c.Runtime.MaxParallelStarts))
	}
	if len(c.Colocation.Classes) == 0 {
		errs = append(errs, errors.New("colocation.classes: want at least one class"))
	}
	for _, cl := range c.Colocation.Classes {
		if cl.OOMScoreAdj < -1000 || cl.OOMScoreAdj > 1000 {
			errs = append(errs, fmt.Errorf("colocation class %q: oom_score_adj %d: want -1000 to 1000", cl.Name, cl.OOMScoreAdj))
		}
	}
	for _, a := range c.Colocation.Annotations {
		oneOf("colocation.annotations", a, ColocationAnnotations()...)
	}
	errs = append(errs, c.validateYield()...)
	oneOf("agent.channel", c.Agent.Channel, "auto", "vsock", "serial")
	oneOf("agent.log_level", c.Agent.LogLevel, "debug", "info", "warn", "error")
	oneOf("storage.shared_fs", c.Storage.SharedFS, "virtio-fs", "9p")
	if h.Type == "clh" {
		// What Cloud Hypervisor has not (docs/hypervisors.md), refused
		// here with both keys named rather than at the first VM's start.
		for _, l := range []struct{ key, value, bad, lacks, want string }{
			{"storage.shared_fs", c.Storage.SharedFS, "9p", "9p", "virtio-fs"},
			{"storage.block_driver", c.Storage.BlockDriver, "virtio-scsi", "virtio-scsi", "virtio-blk"},
			{"agent.channel", c.Agent.Channel, "serial", "virtio-serial", "vsock"},
			{"hypervisor.nic_model", h.NICModel, "e1000e", "e1000e", "virtio-net"},
		} {
			if l.value == l.bad {
				errs = append(errs, fmt.Errorf("%s = %q with hypervisor.type = \"clh\": Cloud Hypervisor has no %s, set %s = %q", l.key, l.value, l.lacks, l.key, l.want))
			}
		}
	}
	return errors.Join(errs...)
}

// validateYield checks the [yield] section. Its classes must be
// colocation's only when it is enabled: a node that renamed its classes
// and does not yield need not say so.
func (c Config) validateYield() []error {
	var errs []error
	y := c.Yield
	if y.Interval <= 0 {
		errs = append(errs, fmt.Errorf("yield.interval = %s: want a positive duration", y.Interval))
	}
	if !(y.HeadroomCPUs >= 0) || math.IsInf(y.HeadroomCPUs, 0) {
		errs = append(errs, fmt.Errorf("yield.headroom_cpus = %v: want 0 or more CPUs", y.HeadroomCPUs))
	}
	if !(y.FloorCPUs >= 0.01) || math.IsInf(y.FloorCPUs, 0) {
		errs = append(errs, fmt.Errorf("yield.floor_cpus = %v: want at least 0.01 CPUs (offline pods never stop; the kernel's least quota is 1 ms a 100 ms period)", y.FloorCPUs))
	}
	if y.RaiseAfter < 1 {
		errs = append(errs, fmt.Errorf("yield.raise_after = %d: want 1 or more intervals", y.RaiseAfter))
	}
	if !(y.RaiseStepCPUs > 0) || math.IsInf(y.RaiseStepCPUs, 0) {
		errs = append(errs, fmt.Errorf("yield.raise_step_cpus = %v: want more than 0 CPUs", y.RaiseStepCPUs))
	}
	if !y.Enabled {
		return errs
	}
	if len(y.OfflineClasses) == 0 {
		errs = append(errs, errors.New("yield.offline_classes: want at least one class with yield.enabled = true"))
	}
	var names []string
	for _, cl := range c.Colocation.Classes {
		names = append(names, cl.Name)
	}
	seen := make(map[string]bool)
	for i, name := range y.OfflineClasses {
		switch {
		case !slices.Contains(names, name):
			errs = append(errs, fmt.Errorf("yield.offline_classes[%d] = %q: no such class in colocation.classes %q", i, name, names))
		case seen[name]:
			errs = append(errs, fmt.Errorf("yield.offline_classes[%d] = %q: listed twice", i, name))
		}
		seen[name] = true
	}
	return errs
}

// Duration is a time.Duration written in TOML as a string such as "30s".
type Duration time.Duration

func (d Duration) String() string { return time.Duration(d).String() }

// MarshalText writes the duration as "30s".
func (d Duration) MarshalText() ([]byte, error) { return []byte(d.String()), nil }

// UnmarshalText reads a duration such as "30s" or "1m30s".
func (d *Duration) UnmarshalText(b []byte) error {
	v, err := time.ParseDuration(string(b))
	if err != nil {
		return fmt.Errorf("duration %q: %w", b, err)
	}
	*d = Duration(v)
	return nil
}
