package sandbox

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/colo-runtime/colo/agentproto"
)

// ReadSpec reads the OCI spec (config.json) of a bundle.
func ReadSpec(bundle string) (*specs.Spec, error) {
	b, err := os.ReadFile(filepath.Join(bundle, "config.json"))
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, errdefs.ErrInvalidArgument.WithMessage(fmt.Sprintf("bundle %s has no config.json", bundle))
		}
		return nil, fmt.Errorf("read OCI spec: %w", err)
	}
	var s specs.Spec
	if err := json.Unmarshal(b, &s); err != nil {
		return nil, errdefs.ErrInvalidArgument.WithMessage(fmt.Sprintf("bundle %s: config.json: %v", bundle, err))
	}
	return &s, nil
}

func invalidSpec(format string, args ...any) error {
	return errdefs.ErrInvalidArgument.WithMessage("invalid OCI spec: " + fmt.Sprintf(format, args...))
}

// ValidateSpec checks, on the host and before any VM starts, what the guest
// would otherwise reject late or what colo cannot do yet: among them hooks
// (checkHooks), host devices (checkDevices) and io.colo.* annotations colo
// does not know (checkAnnotations), none of which may be left out quietly.
// Errors are errdefs.ErrInvalidArgument or, for what is valid but not
// supported yet, errdefs.ErrNotImplemented.
func ValidateSpec(s *specs.Spec) error {
	if err := validateSpec(s); err != nil {
		return err
	}
	if err := checkHooks(s.Hooks); err != nil {
		return err
	}
	if err := checkDevices(s.Linux.Devices); err != nil {
		return err
	}
	return checkAnnotations(s)
}

func validateSpec(s *specs.Spec) error {
	if s == nil {
		return invalidSpec("empty")
	}
	p := s.Process
	switch {
	case p == nil:
		return invalidSpec("no process")
	case len(p.Args) == 0:
		return invalidSpec("process.args is empty")
	case p.Args[0] == "":
		return invalidSpec("process.args[0] is empty")
	case p.Cwd == "":
		return invalidSpec("process.cwd is empty")
	case !path.IsAbs(p.Cwd):
		return invalidSpec("process.cwd %q is not absolute", p.Cwd)
	case s.Root == nil || s.Root.Path == "":
		return invalidSpec("no root.path")
	case s.Linux == nil:
		return invalidSpec("no linux section")
	}
	for i, m := range s.Mounts {
		if m.Destination == "" || !path.IsAbs(m.Destination) {
			return invalidSpec("mounts[%d].destination %q is not absolute", i, m.Destination)
		}
		if isBind(m) && !filepath.IsAbs(m.Source) {
			return invalidSpec("mounts[%d] (%s): bind source %q is not an absolute host path", i, m.Destination, m.Source)
		}
	}
	return nil
}

// maxNamed is how many hooks or devices an error names before it only
// counts the rest: a privileged container can have hundreds of devices.
const maxNamed = 8

// namedList joins what an error names, at most maxNamed of them.
func namedList(names []string) string {
	if len(names) <= maxNamed {
		return strings.Join(names, ", ")
	}
	return fmt.Sprintf("%s and %d more", strings.Join(names[:maxNamed], ", "), len(names)-maxNamed)
}

// checkHooks refuses OCI hooks. A hook is a host binary that the runtime
// runs at a point of the container's creation or life, many of them in the
// container's namespaces, to act on its host resources (GPUs, network).
// colo's container is created and lives inside a VM, where no host binary
// can run and the host resources the hook would act on are not the
// container's. Dropping them would leave the container without whatever
// they were to set up, and no one the wiser.
func checkHooks(h *specs.Hooks) error {
	if h == nil {
		return nil
	}
	var named []string
	for _, kind := range []struct {
		name  string
		hooks []specs.Hook
	}{
		{"prestart", h.Prestart},
		{"createRuntime", h.CreateRuntime},
		{"createContainer", h.CreateContainer},
		{"startContainer", h.StartContainer},
		{"poststart", h.Poststart},
		{"poststop", h.Poststop},
	} {
		for i, hook := range kind.hooks {
			named = append(named, fmt.Sprintf("hooks.%s[%d] %s", kind.name, i, clip(hook.Path)))
		}
	}
	if len(named) == 0 {
		return nil
	}
	return errdefs.ErrNotImplemented.WithMessage(fmt.Sprintf(
		"OCI hooks cannot run with colo: %s: a hook is a host binary to run on the container's host resources, "+
			"and colo's container lives in a VM (hooks come from the CRI runtime handler's base_runtime_spec, "+
			"CDI devices or NRI plugins: keep them off colo's handler)", namedList(named)))
}

// guestDevice is a character device's number.
type guestDevice struct {
	major, minor int64
}

// guestDevices are the character devices the guest's kernel has with the
// same meaning as the host's: the node runc makes for one in the guest is
// the device the spec asked for. They are runc's default devices (which
// runc makes itself and containerd's specs often list), the console and
// ptmx, and fuse (the guest loads it for virtio-fs: guest/modules). Any
// other number names a host device, which in the guest would be another
// device or none.
var guestDevices = map[guestDevice]bool{
	{1, 3}:    true, // /dev/null
	{1, 5}:    true, // /dev/zero
	{1, 7}:    true, // /dev/full
	{1, 8}:    true, // /dev/random
	{1, 9}:    true, // /dev/urandom
	{5, 0}:    true, // /dev/tty
	{5, 1}:    true, // /dev/console
	{5, 2}:    true, // /dev/ptmx
	{10, 229}: true, // /dev/fuse
}

// checkDevices refuses the devices of linux.devices the guest cannot
// provide: a host's device node means nothing in the guest. Host PCI
// devices reach the VM another way (docs/devices.md): a pod's disk by
// annotation, a physical NIC from its network namespace; the
// /dev/vfio/<group> entries device plugins hand out are not taken yet.
func checkDevices(devices []specs.LinuxDevice) error {
	var named []string
	for i, d := range devices {
		switch d.Type {
		case "p":
			// A FIFO is a file the guest makes like any other.
			continue
		case "c", "u":
			if guestDevices[guestDevice{d.Major, d.Minor}] {
				continue
			}
		case "b":
		default:
			return invalidSpec("linux.devices[%d] %s: type %q: want c, u, b or p", i, clip(d.Path), clip(d.Type))
		}
		named = append(named, fmt.Sprintf("linux.devices[%d] %s (%s %d:%d)", i, clip(d.Path), d.Type, d.Major, d.Minor))
	}
	if len(named) == 0 {
		return nil
	}
	return errdefs.ErrNotImplemented.WithMessage(fmt.Sprintf(
		"host device nodes cannot be passed into colo's VM: %s (host PCI devices can, as a pod's disk or NIC: "+
			"docs/devices.md; /dev/vfio/<group> from device plugins is not supported yet. A privileged container gets all the "+
			"host's devices unless CRI's runtime handler sets privileged_without_host_devices = true, or with "+
			"ctr run --privileged-without-host-devices)", namedList(named)))
}

func isBind(m specs.Mount) bool {
	return m.Type == "bind" || slices.Contains(m.Options, "bind") || slices.Contains(m.Options, "rbind")
}

// RootfsPath is where a container's rootfs is in the guest.
func RootfsPath(containerID string) string {
	return path.Join(agentproto.SharedMountPoint, containerID, "rootfs")
}

// guestView is what GuestSpec needs to know of the sandbox.
type guestView struct {
	// binds maps the index of a bind mount in the spec to the guest path
	// its host source is shared at.
	binds map[int]string
	// podPid is the guest pid of the pod's first container, whose
	// namespaces the pod's other containers join; 0 for none.
	podPid uint32
	// podNamespaces: the pod has no pause container (CreatePod), and the
	// agent holds the namespaces its containers join
	// (agentproto.PodNamespace).
	podNamespaces bool
	// podFiles maps container paths (/etc/hosts) to the guest paths of
	// the pod's files, bound into containers that do not mount their own.
	podFiles map[string]string
	// guestNamespaces are the namespaces (by /proc/PID/ns name) a pod
	// without a pause container shares with the guest itself (hostPID,
	// hostIPC): a container asked to join the pod's gets none of its own.
	guestNamespaces []string
	// class is the container's CPU class, if it asks for one.
	class *agentproto.CPUClass
	// topology mounts the guest's topology file into the container.
	topology bool
	// rootfs is the guest path of a rootfs that is not in the share (a
	// block rootfs, mounted by the agent); "" for RootfsPath.
	rootfs string
	// disks are binds of the pod's disks (DisksAnnotation) into the
	// container, from their guest mount points.
	disks []specs.Mount
}

// nsProcName is a namespace's name under /proc/PID/ns.
var nsProcName = map[specs.LinuxNamespaceType]string{
	specs.PIDNamespace:    "pid",
	specs.IPCNamespace:    "ipc",
	specs.UTSNamespace:    "uts",
	specs.CgroupNamespace: "cgroup",
	specs.TimeNamespace:   "time",
}

// GuestSpec returns a copy of s for the guest: root.path points into the
// shared directory, or to where the agent mounts a block rootfs
// (root.readonly is kept), bind mounts take their sources from there too,
// the pod's disks are bound in, and host namespace paths are rewritten. A
// spec with hooks is refused (checkHooks), as ValidateSpec does earlier. A
// network namespace to join (the pod's, on the host) becomes the VM's own
// network namespace, where the pod's interfaces are. A pod's other namespaces to
// join (the sandbox's, by the pid containerd was told for it) become, in a
// pod without a pause container, those the agent holds for the pod (IPC,
// UTS, PID), and otherwise those of the pod's first container in the
// guest; anything else to join becomes new. A container of a pod without
// a pause container also gets what CRI gives it with one: the pod's
// /dev/shm where it joins the pod's IPC namespace, and the pod's
// /etc/hostname, /etc/hosts and /etc/resolv.conf unless it mounts its own.
func GuestSpec(ctx context.Context, s *specs.Spec, containerID string, v guestView) (*specs.Spec, error) {
	b, err := json.Marshal(s)
	if err != nil {
		return nil, fmt.Errorf("copy OCI spec: %w", err)
	}
	var g specs.Spec
	if err := json.Unmarshal(b, &g); err != nil {
		return nil, fmt.Errorf("copy OCI spec: %w", err)
	}
	if g.Root == nil {
		g.Root = &specs.Root{}
	}
	g.Root.Path = RootfsPath(containerID)
	if v.rootfs != "" {
		g.Root.Path = v.rootfs
	}
	for i, src := range v.binds {
		g.Mounts[i].Source = src
	}
	g.Mounts = append(g.Mounts, v.disks...)
	if err := setSharedVolumes(&g, s, v.binds); err != nil {
		return nil, err
	}
	// libcontainer in the guest would run them, from the guest's files:
	// refused here too, should a caller have skipped ValidateSpec.
	if err := checkHooks(g.Hooks); err != nil {
		return nil, err
	}
	g.Hooks = nil
	if v.topology {
		g.Mounts = append(g.Mounts, specs.Mount{Destination: agentproto.TopologyFile, Type: "bind",
			Source: agentproto.TopologyFile, Options: []string{"rbind", "ro"}})
	}
	if c := v.class; c != nil {
		if g.Linux == nil {
			g.Linux = &specs.Linux{}
		}
		g.Linux.CgroupsPath = path.Join(agentproto.ClassCgroup(c.GetName()), containerID)
		if g.Process != nil {
			adj := int(c.GetOomScoreAdj())
			g.Process.OOMScoreAdj = &adj
		}
	}
	podIPC := false
	if g.Linux != nil {
		var nss []specs.LinuxNamespace
		for _, ns := range g.Linux.Namespaces {
			if ns.Path != "" {
				if ns.Type == specs.NetworkNamespace {
					continue
				}
				host := ns.Path
				if v.podNamespaces && slices.Contains(v.guestNamespaces, nsProcName[ns.Type]) {
					log.G(ctx).WithFields(log.Fields{"type": ns.Type, "host": host}).Debug("the pod shares the guest's namespace")
					continue
				}
				ns.Path = guestNamespace(ns.Type, v)
				podIPC = podIPC || (ns.Type == specs.IPCNamespace && ns.Path != "")
				log.G(ctx).WithFields(log.Fields{"type": ns.Type, "host": host, "guest": ns.Path}).Debug("namespace path rewritten for the guest")
			}
			nss = append(nss, ns)
		}
		g.Linux.Namespaces = nss
	}
	if v.podNamespaces {
		addPodMounts(&g, podIPC, v.podFiles)
	}
	return &g, nil
}

// receivingPropagation are the propagation options under which a bind
// receives the mounts made below its source: with any other (rprivate,
// CRI's PROPAGATION_PRIVATE, or none) the container keeps today's private
// bind of its own share path.
var receivingPropagation = []string{"shared", "rshared", "slave", "rslave"}

// setSharedVolumes sets agentproto.SharedVolumesAnnotation in g for the bind mounts
// of s (binds: their guest sources) with a receiving propagation, and
// drops one the spec's author set: the shim alone says which mounts share
// a guest mount point.
func setSharedVolumes(g *specs.Spec, s *specs.Spec, binds map[int]string) error {
	delete(g.Annotations, agentproto.SharedVolumesAnnotation)
	vols := sharedVolumes(s, binds)
	if len(vols) == 0 {
		return nil
	}
	b, err := json.Marshal(vols)
	if err != nil {
		return fmt.Errorf("encode shared volumes: %w", err)
	}
	if g.Annotations == nil {
		g.Annotations = map[string]string{}
	}
	g.Annotations[agentproto.SharedVolumesAnnotation] = string(b)
	return nil
}

// sharedVolumes maps the index of each bind mount of s with a receiving
// propagation to its volume. The pod's /dev/shm is one guest tmpfs for all
// containers already.
func sharedVolumes(s *specs.Spec, binds map[int]string) map[string]agentproto.SharedVolume {
	vols := map[string]agentproto.SharedVolume{}
	for i, src := range binds {
		m := s.Mounts[i]
		if src == agentproto.SandboxShm || !slices.ContainsFunc(m.Options, func(o string) bool {
			return slices.Contains(receivingPropagation, o)
		}) {
			continue
		}
		// As shareBinds decides: "ro" or "rro" make the share path
		// read-only on the host.
		ro := slices.Contains(m.Options, "ro") || slices.Contains(m.Options, "rro")
		vols[strconv.Itoa(i)] = agentproto.SharedVolume{Key: volumeKey(m), ReadOnly: ro}
	}
	return vols
}

// volumeKey names a volume in the guest: the mounts of one host source
// that shareBinds binds alike (recursively or not, which changes what the
// share path shows) share a guest mount point. A hash, so that the guest
// does not learn host paths.
func volumeKey(m specs.Mount) string {
	src := path.Clean(m.Source)
	if slices.Contains(m.Options, "rbind") {
		src += "\x00rbind"
	}
	sum := sha256.Sum256([]byte(src))
	return hex.EncodeToString(sum[:16])
}

// guestNamespace is the guest path of the pod's namespace of type t that a
// container's spec joins on the host, or "" for a new one.
func guestNamespace(t specs.LinuxNamespaceType, v guestView) string {
	name, ok := nsProcName[t]
	switch {
	case !ok:
		return ""
	case v.podNamespaces:
		if slices.Contains(agentproto.PodNamespaces, name) {
			return agentproto.PodNamespace(name)
		}
		return ""
	case v.podPid != 0:
		return fmt.Sprintf("/proc/%d/ns/%s", v.podPid, name)
	}
	return ""
}

// podShmOptions are the options of the bind of the pod's /dev/shm, as
// CRI's pause container has it.
var podShmOptions = []string{"rbind", "nosuid", "nodev", "noexec"}

// addPodMounts gives a container of a pod without a pause container what
// CRI would have bound from the pause container's files: the pod's shared
// /dev/shm in place of a /dev/shm of its own, if it joins the pod's IPC
// namespace (POSIX shared memory is shared with the IPC namespace's other
// users only through it), and the pod's files (podFiles) where it has no
// mount of its own.
func addPodMounts(g *specs.Spec, podIPC bool, files map[string]string) {
	for i, m := range g.Mounts {
		if podIPC && path.Clean(m.Destination) == "/dev/shm" && !isBind(m) {
			g.Mounts[i] = specs.Mount{Destination: "/dev/shm", Type: "bind", Source: agentproto.SandboxShm, Options: podShmOptions}
		}
	}
	for _, dest := range slices.Sorted(maps.Keys(files)) {
		if slices.ContainsFunc(g.Mounts, func(m specs.Mount) bool { return path.Clean(m.Destination) == dest }) {
			continue
		}
		// Read-only: the guest sees the share read-only anyway.
		g.Mounts = append(g.Mounts, specs.Mount{Destination: dest, Type: "bind", Source: files[dest],
			Options: []string{"rbind", "rprivate", "ro"}})
	}
}

// maxLogged is the longest string from the guest or a spec that colo logs
// or puts in an error whole: a hostile guest or pod author must not fill
// the host's logs.
const maxLogged = 128

// maxErrorText is the longest error text from the guest passed on: the
// agent's own errors (libcontainer's) can be long and are worth reading.
const maxErrorText = 1024

// clip makes a string from the guest or a spec fit to be logged: at most
// maxLogged bytes, unprintable characters replaced.
func clip(s string) string { return clipTo(s, maxLogged) }

// clipTo is clip to at most max bytes.
func clipTo(s string, max int) string {
	cut := ""
	if len(s) > max {
		n := max
		for n > 0 && !utf8.RuneStart(s[n]) {
			n--
		}
		cut = fmt.Sprintf("...(%d bytes)", len(s))
		s = s[:n]
	}
	return strings.Map(func(r rune) rune {
		if unicode.IsPrint(r) {
			return r
		}
		return '?'
	}, s) + cut
}

// logLimit lets a few warnings through, then one per interval with the
// count of those it held back, so that what the guest sends, however
// often, cannot flood the shim's log. It is for one goroutine.
type logLimit struct {
	burst int
	every time.Duration

	logged     int
	last       time.Time
	suppressed int
}

// allow tells whether to log now and how many warnings were held back
// since the last one logged.
func (l *logLimit) allow(now time.Time) (bool, int) {
	if l.logged < l.burst || now.Sub(l.last) >= l.every {
		held := l.suppressed
		l.logged++
		l.last, l.suppressed = now, 0
		return true, held
	}
	l.suppressed++
	return false, 0
}

// PodAnnotation is the CRI annotation naming a container's pod sandbox;
// containers of one pod share one VM.
const PodAnnotation = "io.kubernetes.cri.sandbox-id"

// PodID is the pod a container belongs to, or "" outside a pod (ctr run).
func PodID(spec *specs.Spec) string {
	return spec.Annotations[PodAnnotation]
}
