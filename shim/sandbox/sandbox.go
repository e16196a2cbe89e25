// Package sandbox runs one VM with its helpers and the containers in it:
// the sandbox directory and state file, the shared filesystem, the VM, the
// one connection to its agent, and teardown, also after a crashed shim
// (Cleanup).
//
// A Sandbox holds many containers: the task service puts the containers
// of one pod in one sandbox, and gives any other container its own.
package sandbox

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"github.com/containerd/log"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/colo-runtime/colo/agentproto"
	"github.com/colo-runtime/colo/config"
	"github.com/colo-runtime/colo/hypervisor"
	"github.com/colo-runtime/colo/internal/procfs"
	"github.com/colo-runtime/colo/network"
	"github.com/colo-runtime/colo/placement"
	"github.com/colo-runtime/colo/storage"
	"github.com/colo-runtime/colo/vfio"
)

// unixPathMax is the longest unix socket path the kernel accepts.
const unixPathMax = 107

// virtiofsdStopTimeout bounds a graceful virtiofsd stop before SIGKILL.
const virtiofsdStopTimeout = 5 * time.Second

// VMExitStatus is the exit status reported for processes whose VM died,
// and for an exec that failed to start (containerd's status for an exit
// nobody saw).
const VMExitStatus = 255

// NewDriver makes the hypervisor driver a configuration names
// (hypervisor/driver.New).
type NewDriver func(config.Hypervisor) (hypervisor.Driver, error)

// Options configure a new sandbox.
type Options struct {
	// ID names the sandbox directory: the first container's ID.
	ID string
	// Namespace is the containerd namespace.
	Namespace string
	Config    config.Config
	Driver    hypervisor.Driver
	// OnExit is called once for every process that exits, after its
	// output has been copied out. It must not call back into the sandbox.
	OnExit func(Exit)
	// OnOOM is called with the id of a container that had an OOM kill.
	OnOOM func(containerID string)
	// ShimMetrics are the shim's own, served with the sandbox's (nil:
	// none).
	ShimMetrics *ShimMetrics
}

// Exit is a process's exit.
type Exit struct {
	ContainerID string
	ExecID      string
	// Pid is the hypervisor's (see Sandbox.Pid).
	Pid      uint32
	Status   uint32
	ExitedAt time.Time
}

// ContainerConfig describes a container to create in a sandbox.
type ContainerConfig struct {
	ID     string
	Bundle string
	Spec   *specs.Spec
	// Rootfs are containerd's mounts for the rootfs; empty means the
	// bundle's root.path is the rootfs already.
	Rootfs []mount.Mount
	Stdio  Stdio
}

// Sandbox is one VM with its helpers and containers.
type Sandbox struct {
	id        string
	dir       string
	cfg       config.Config
	driver    hypervisor.Driver
	namespace string
	onExit    func(Exit)
	onOOM     func(string)
	created   time.Time
	// ctx outlives requests: background copies and waits use it.
	ctx context.Context

	// Set while booting, before the sandbox is shared.
	vm        hypervisor.VM
	virtiofsd *storage.Virtiofsd
	agent     *agentConn
	net       *podNetwork // nil without a pod network namespace
	// vfio binds the host's PCI devices for passthrough (nil: the host's
	// sysfs; vfio.go).
	vfio *vfio.Binder
	// maxSize bounds the VM (sizeBounds); podLimits are the pod's own
	// (podLimitsOf its first spec).
	maxSize   vmSize
	podLimits limits

	// resizeMu serializes resizes (resize.go): one at a time, and none
	// while a container's limits are being changed.
	resizeMu sync.Mutex
	// sizeMu guards size, colo and limits: read by container creates
	// while a resize changes them.
	sizeMu sync.Mutex
	size   vmSize
	colo   colocation
	// limits are the limits of each container added to the pod (not the
	// first container of Create, which is the pod: podLimits).
	limits map[string]limits
	// manage serves the management socket (manage.go) once booted.
	manage *http.Server
	// The management socket's metrics (prometheus.go).
	shimMetrics *ShimMetrics
	agentRPC    *prometheus.HistogramVec
	metricsOnce sync.Once
	metrics     http.Handler

	stateMu sync.Mutex
	state   State
	// podDisks are the pod's disks (DisksAnnotation), attached at boot.
	podDisks podDisks
	// disksMu guards disks: the disks of the VM, by ID (disks.go).
	disksMu sync.Mutex
	disks   map[string]*disk
	// pod is set for a sandbox of containerd's sandbox API (CreatePod).
	pod *pod

	mu         sync.Mutex
	containers map[string]*Container

	stopOnce sync.Once
	stopping chan struct{} // closed once teardown begins: the VM's exit is expected
	// up is set once the sandbox has booted: from then on a lost agent
	// connection fails it.
	up atomic.Bool
	// dumping counts vmcores being written: the guest is paused.
	dumping atomic.Int32

	teardownMu sync.Mutex
	vmStopped  bool
	bundleFile string // <bundle>/colo-sandbox of one of its containers, removed last
	torn       bool
}

// Create makes a sandbox and its first container: the sandbox directory,
// state file and bundle file, the shared directory with the rootfs, the
// virtio-fs daemon, the VM, the agent connection, and the container in the
// guest. Any failure undoes all of it. The sandbox goes when its last
// container is deleted.
func Create(ctx context.Context, opts Options, first ContainerConfig) (_ *Sandbox, _ *Container, retErr error) {
	if err := ValidateSpec(first.Spec); err != nil {
		return nil, nil, err
	}
	if err := first.Stdio.Validate(); err != nil {
		return nil, nil, err
	}
	if err := checkHostNamespaces(opts.Config, first.Spec.Annotations, hostNamespacesOf(first.Spec)); err != nil {
		return nil, nil, err
	}
	ctx = log.WithLogger(ctx, log.G(ctx).WithField("sandbox", opts.ID))
	s, err := newSandbox(ctx, opts, first.Spec)
	if err != nil {
		return nil, nil, err
	}
	if _, err := s.colocation().class(first.Spec); err != nil {
		return nil, nil, err
	}
	if err := s.makeDir(ctx, first.Bundle); err != nil {
		return nil, nil, err
	}
	defer func() {
		if retErr != nil {
			if err := s.teardown(context.WithoutCancel(ctx)); err != nil {
				log.G(ctx).WithError(err).Error("clean up after a failed create")
			}
		}
	}()
	release, err := startSlot(ctx, opts.Config.Runtime.StateDir, opts.Config.Runtime.MaxParallelStarts)
	if err != nil {
		return nil, nil, err
	}
	defer release()
	c, err := s.prepareContainer(ctx, first)
	if err != nil {
		return nil, nil, err
	}
	defer func() {
		if retErr != nil {
			c.init.io.close()
		}
	}()
	if err := s.boot(ctx, first.Spec); err != nil {
		return nil, nil, err
	}
	if err := s.createInGuest(ctx, c); err != nil {
		return nil, nil, err
	}
	s.watch()
	return s, c, nil
}

// newSandbox checks the options and makes the sandbox's value, with the
// co-location set-up read from spec (the first container's, or the pod's).
// Nothing is made on the host yet.
func newSandbox(ctx context.Context, opts Options, spec *specs.Spec) (*Sandbox, error) {
	if err := checkName("namespace", opts.Namespace); err != nil {
		return nil, err
	}
	if err := checkName("sandbox id", opts.ID); err != nil {
		return nil, err
	}
	if opts.Driver == nil {
		return nil, errors.New("sandbox: no hypervisor driver")
	}
	// The VM is the pod's size.
	maxSize, err := sizeBounds(opts.Config.Hypervisor)
	if err != nil {
		return nil, err
	}
	podLimits, err := podLimitsOf(spec)
	if err != nil {
		return nil, err
	}
	size, err := sizeFor(opts.Config.Hypervisor, podLimits, maxSize)
	if err != nil {
		return nil, err
	}
	colo, err := newColocation(ctx, opts.Config, spec, size.vcpus)
	if err != nil {
		return nil, err
	}
	disks, err := parsePodDisks(opts.Config, spec.Annotations)
	if err != nil {
		return nil, err
	}
	dir := filepath.Join(opts.Config.Runtime.StateDir, opts.Namespace, DirName(opts.ID))
	if err := checkSocketPaths(dir); err != nil {
		return nil, err
	}
	onExit := opts.OnExit
	if onExit == nil {
		onExit = func(Exit) {}
	}
	onOOM := opts.OnOOM
	if onOOM == nil {
		onOOM = func(string) {}
	}
	st := newState(dir, opts.ID, opts.Config)
	st.Pod = podNameOf(spec.Annotations)
	return &Sandbox{
		id:          opts.ID,
		dir:         dir,
		cfg:         opts.Config,
		driver:      opts.Driver,
		namespace:   opts.Namespace,
		onExit:      onExit,
		onOOM:       onOOM,
		created:     time.Now(),
		ctx:         context.WithoutCancel(ctx),
		containers:  make(map[string]*Container),
		stopping:    make(chan struct{}),
		colo:        colo,
		size:        size,
		maxSize:     maxSize,
		podLimits:   podLimits,
		limits:      make(map[string]limits),
		shimMetrics: opts.ShimMetrics,
		agentRPC:    newAgentRPCMetric(),
		state:       st,
		podDisks:    disks,
	}, nil
}

// makeDir makes the sandbox directory with its record, the bundle file in
// bundle that leads to it, and the share. Once it has returned nil, the
// caller tears the sandbox down on failure; before, it undoes itself.
func (s *Sandbox) makeDir(ctx context.Context, bundle string) (retErr error) {
	dir := s.dir
	if err := os.MkdirAll(filepath.Dir(dir), 0o711); err != nil {
		return fmt.Errorf("create state dir: %w", err)
	}
	// The bundle file is what leads `shim delete` to the sandbox, so it
	// comes first: no crash leaves a sandbox directory nothing leads to.
	prevDir, _ := ReadBundleFile(bundle)
	bundleFile, err := writeBundleFile(bundle, dir)
	if err != nil {
		return err
	}
	if err := os.Mkdir(dir, 0o700); err != nil {
		// Not ours: the bundle keeps only the record it had.
		if prevDir != dir {
			_ = os.Remove(bundleFile)
		}
		if errors.Is(err, os.ErrExist) {
			return errdefs.ErrAlreadyExists.WithMessage(fmt.Sprintf(
				"sandbox dir %s exists (a running sandbox, or one a crashed shim left: `shim delete` removes it)", dir))
		}
		return fmt.Errorf("create sandbox dir: %w", err)
	}
	s.bundleFile = bundleFile
	defer func() {
		if retErr != nil {
			if err := s.teardown(context.WithoutCancel(ctx)); err != nil {
				log.G(ctx).WithError(err).Error("clean up after a failed create")
			}
		}
	}()
	if err := writeState(dir, s.state); err != nil {
		return err
	}
	if err := storage.SetupShare(dir, s.recordMount); err != nil {
		return err
	}
	return nil
}

// watch starts the goroutines of a sandbox that is up.
func (s *Sandbox) watch() {
	go s.watchVM()
	go s.watchOOM()
	go s.logGuest()
}

// logGuest logs what runs in the guest, for whoever reads the log after a
// problem (and for make bench): off the start's path, once the start is
// done, with the round trip of agent calls.
func (s *Sandbox) logGuest() {
	select {
	case <-s.stopping:
		return
	case <-time.After(guestLogDelay):
	}
	ctx, cancel := context.WithTimeout(s.ctx, time.Duration(s.cfg.Hypervisor.BootTimeout))
	defer cancel()
	rtts := make([]time.Duration, rttSamples)
	for i := range rtts {
		begin := time.Now()
		if _, err := s.agent.Check(ctx, &agentproto.CheckRequest{}); err != nil {
			log.G(ctx).WithError(err).Debug("agent check")
			return
		}
		rtts[i] = time.Since(begin)
	}
	slices.Sort(rtts)
	d, err := s.agent.GetGuestDetails(ctx, &agentproto.GetGuestDetailsRequest{})
	if err != nil {
		log.G(ctx).WithError(err).Debug("guest details")
		return
	}
	log.G(ctx).WithFields(log.Fields{
		"agent_version":  d.GetAgentVersion(),
		"kernel_release": d.GetKernelRelease(),
		"online_cpus":    d.GetOnlineCpus(),
		"mem_total":      d.GetMemTotalBytes(),
		"mem_used":       d.GetMemUsedBytes(),
		"agent_rss":      d.GetAgentRssBytes(),
		"agent_rtt":      rtts[len(rtts)/2].String(),
		"agent_rtt_min":  rtts[0].String(),
	}).Info("guest")
}

// guestLogDelay leaves the start that follows a create to itself.
const guestLogDelay = time.Second

// rttSamples agent round trips are timed one after another; the log has
// their median (agent_rtt) and the fastest.
const rttSamples = 21

// watchOOM relays the guest's OOM kills until the sandbox stops. The guest
// is not trusted to name containers: an event for one that is not this
// sandbox's is dropped, or a guest could raise OOMs for other tasks of
// the host's containerd.
func (s *Sandbox) watchOOM() {
	// pace is the least time between two events taken from the guest.
	const pace = 10 * time.Millisecond
	warnings := logLimit{burst: 10, every: time.Minute}
	for {
		resp, err := s.agent.GetOOMEvent(s.ctx, &agentproto.GetOOMEventRequest{})
		if err != nil {
			select {
			case <-s.stopping:
				return
			default:
			}
			if errdefs.IsNotImplemented(errgrpc.ToNative(err)) || !s.alive() {
				return
			}
			log.G(s.ctx).WithField("error", clip(err.Error())).Warn("OOM events from the guest")
			select {
			case <-s.stopping:
				return
			case <-time.After(time.Second):
			}
			continue
		}
		id := resp.GetContainerId()
		s.mu.Lock()
		_, ours := s.containers[id]
		s.mu.Unlock()
		if ok, held := warnings.allow(time.Now()); ok {
			l := log.G(s.ctx).WithField("container", clip(id))
			if held > 0 {
				l = l.WithField("not_logged", held)
			}
			if ours {
				l.Warn("OOM kill in the guest")
			} else {
				l.Warn("OOM event from the guest for a container not in this sandbox: dropped")
			}
		}
		if ours {
			s.onOOM(id)
		}
		// A guest answering at once, again and again, would keep the
		// shim busy on the host. The agent queues what comes faster, and
		// containerd needs one event to mark a task OOM-killed.
		select {
		case <-s.stopping:
			return
		case <-time.After(pace):
		}
	}
}

// maxDirName is the longest sandbox id used as its directory's name.
const maxDirName = 32

// DirName names the directory of the sandbox id: the id itself, or for a
// long one (CRI's are 64 hex digits) a hash of it, since the unix socket
// paths inside must fit in 107 bytes. state.json keeps the id.
func DirName(id string) string {
	if len(id) <= maxDirName {
		return id
	}
	sum := sha256.Sum256([]byte(id))
	return hex.EncodeToString(sum[:8])
}

func checkName(what, v string) error {
	if v == "" || v == "." || v == ".." || strings.ContainsAny(v, "/\x00") {
		return errdefs.ErrInvalidArgument.WithMessage(fmt.Sprintf("%s %q cannot name a directory", what, v))
	}
	return nil
}

// checkSocketPaths fails early when the sockets in the sandbox dir would
// exceed the unix socket path limit.
func checkSocketPaths(dir string) error {
	for _, p := range []string{
		filepath.Join(dir, virtiofsdSocket),
		filepath.Join(dir, ManageSocket),
		filepath.Join(dir, vmDir, "agent.sock"), // the driver's longest name
	} {
		if len(p) > unixPathMax {
			return errdefs.ErrInvalidArgument.WithMessage(fmt.Sprintf(
				"socket path %s is longer than %d bytes: use a shorter runtime.state_dir", p, unixPathMax))
		}
	}
	return nil
}

// Dir is the sandbox directory.
func (s *Sandbox) Dir() string { return s.dir }

// Pid is the hypervisor process: containerd is told it as every process's
// pid, since guest pids mean nothing on the host.
func (s *Sandbox) Pid() int {
	if s.vm == nil {
		return 0
	}
	return s.vm.Pid()
}

// boot starts the shared filesystem server, mirrors the pod's network
// interfaces (if the spec joins a network namespace), starts the VM and the
// agent session, and sets the guest up.
func (s *Sandbox) boot(ctx context.Context, spec *specs.Spec) (retErr error) {
	bootTimeout := time.Duration(s.cfg.Hypervisor.BootTimeout)
	// reached is the last step done, for an error at the deadline:
	// "deadline exceeded" alone does not say where the time went.
	reached := "nothing"
	step := func(name string) {
		reached = fmt.Sprintf("%s, %s after the start", name, time.Since(s.created).Round(time.Millisecond))
	}
	// The guest gets the read-only view; mounts are made in the
	// host-only tree (storage.SetupShare).
	shared := filepath.Join(s.dir, storage.ShareView)
	share := hypervisor.Share{Tag: agentproto.SharedTag, Kind: hypervisor.Share9P, Path: shared}
	storages := []*agentproto.Storage{{
		Driver:     "9p",
		Source:     agentproto.SharedTag,
		Fstype:     "9p",
		Options:    []string{"trans=virtio", "version=9p2000.L", "msize=262144"},
		MountPoint: agentproto.SharedMountPoint,
	}}
	virtiofs := s.cfg.Storage.SharedFS == string(hypervisor.ShareVirtioFS)
	if virtiofs {
		share = hypervisor.Share{Tag: agentproto.SharedTag, Kind: hypervisor.ShareVirtioFS, Path: filepath.Join(s.dir, virtiofsdSocket)}
		storages = []*agentproto.Storage{{
			Driver:     "virtiofs",
			Source:     agentproto.SharedTag,
			Fstype:     "virtiofs",
			MountPoint: agentproto.SharedMountPoint,
		}}
	}
	storages = append(storages, &agentproto.Storage{
		Driver:     "tmpfs",
		Fstype:     "tmpfs",
		Options:    []string{"nosuid", "nodev", "noexec", "mode=1777", "size=65536k"},
		MountPoint: agentproto.SandboxShm,
	})
	vmcfg := s.vmConfig(share)
	nsPath := netnsPath(spec)
	if nsPath != "" {
		vmcfg.PortForward = hypervisor.GuestPort{Serial: agentproto.PortForwardPortName} // portforward.go
	}
	if err := os.Mkdir(vmcfg.Dir, 0o700); err != nil {
		return fmt.Errorf("create VM dir: %w", err)
	}
	s.prepareTemplate(ctx, vmcfg, nsPath != "")

	// One deadline for the whole start: virtiofsd, the VM's launch (or
	// restore), the agent answering and the guest's set-up. The driver's
	// waits end with it; the VM process does not (the driver never ties
	// it to ctx).
	ctx, cancel := context.WithTimeoutCause(ctx, bootTimeout,
		fmt.Errorf("sandbox not up within %s (hypervisor.boot_timeout)", bootTimeout))
	defer cancel()
	defer func() {
		if retErr == nil || ctx.Err() == nil || errors.Is(retErr, context.Cause(ctx)) {
			return
		}
		if s.vm != nil {
			log.G(ctx).WithField("console", s.vm.Console()).Warn("the guest's console at the start's deadline")
		}
		retErr = fmt.Errorf("%w: last step done: %s: %w", context.Cause(ctx), reached, retErr)
	}()
	if virtiofs {
		// Until its pid is recorded, virtiofsd is found by its socket.
		if err := s.updateState(func(st *State) { st.Sockets = append(st.Sockets, virtiofsdSocket) }); err != nil {
			return err
		}
		v, err := storage.StartVirtiofsd(ctx, storage.VirtiofsdConfig{
			Binary:     s.cfg.Storage.Virtiofsd,
			SocketPath: share.Path,
			SharedDir:  shared,
		})
		if err != nil {
			return err
		}
		s.virtiofsd = v
		if err := s.updateState(func(st *State) { st.VirtiofsdPid = v.Pid() }); err != nil {
			return err
		}
	}

	var netcfg network.Config
	if nsPath != "" {
		s.net = &podNetwork{nsPath: nsPath, model: s.cfg.Hypervisor.NICModel, passthrough: s.cfg.Devices.PassthroughNICs}
		if err := s.updateState(func(st *State) { st.NetNS = nsPath }); err != nil {
			return err
		}
		nics, physical, cfg, err := s.net.attach(s.recordMirror)
		if err != nil {
			return err
		}
		vmcfg.NICs, netcfg = nics, cfg
		// Physical NICs are the VM's from its start (teardown gives them
		// back).
		for _, iface := range physical {
			if _, err := s.bindPCI(ctx, iface.PCIAddress); err != nil {
				return fmt.Errorf("pod network: pass %s through: %w", iface.Name, err)
			}
			vmcfg.PCIDevices = append(vmcfg.PCIDevices, hypervisor.PCIDevice{ID: pciDeviceID(iface.PCIAddress), Address: iface.PCIAddress})
		}
	}
	launched := time.Now()
	vm, err := s.driver.Start(ctx, vmcfg)
	if err != nil {
		return fmt.Errorf("start VM: %w", err)
	}
	s.vm = vm
	// Until now the driver's own files in the VM dir led to the VM
	// (driver.Cleanup). The process has only just started: its pid is not
	// anyone else's yet (pids are handed out in turn, not reused at once),
	// so the start time read is its own.
	proc := procfs.Of(vm.Pid())
	if err := s.updateState(func(st *State) { st.HypervisorPid, st.HypervisorStart = proc.Pid, proc.Start }); err != nil {
		return err
	}
	if err := s.place(ctx); err != nil {
		return err
	}
	stage(ctx, "vm-launched", s.created, log.Fields{"pid": vm.Pid(), "channel": vmcfg.Channel})
	step("VM launched")

	a, check, err := connectAgent(ctx, vm, vmcfg.Channel, bootTimeout, launched.Add(bootTimeout), s.timeouts(), s.agentLost)
	if err != nil {
		return err
	}
	s.agent = a
	stage(ctx, "agent-reachable", s.created, log.Fields{
		"since_launch":  time.Since(launched).String(),
		"agent_version": check.GetAgentVersion(),
		"boot_id":       check.GetBootId(),
	})
	step("agent reachable")
	// The pod's disks, hot-plugged into the running guest: the agent
	// mounts them with the sandbox.
	disks, err := s.attachPodDisks(ctx)
	if err != nil {
		return err
	}
	storages = append(storages, disks...)

	_, err = s.agent.CreateSandbox(ctx, &agentproto.CreateSandboxRequest{
		SandboxId:  s.id,
		Hostname:   spec.Hostname,
		CpuClasses: s.colocation().classes,
		Storages:   storages,
		HostTime:   timestamppb.Now(),

		// A pod without a pause container: the agent holds its
		// namespaces.
		PodNamespaces: s.pod != nil,
		PodSysctls:    s.podSysctls(),
	})
	if err != nil {
		return agentError("CreateSandbox", err)
	}
	step("agent's CreateSandbox")
	if err := configureGuest(ctx, s.agent, netcfg); err != nil {
		return err
	}
	step("guest network configured")
	if err := s.awaitSize(ctx); err != nil {
		return err
	}
	s.up.Store(true)
	if err := s.serveManagement(ctx); err != nil {
		return err
	}
	s.startPortForward() // portforward.go: pods on the pod network
	go s.watchHealth()
	go s.watchPanic()
	if s.virtiofsd != nil {
		go s.watchVirtiofsd()
	}
	return nil
}

// prepareTemplate has the driver make the template the VM starts from, if
// it has templates and there is none yet, before the start's deadline
// begins: making one boots a guest and saves it, which under load can take
// most of a boot_timeout by itself, and a start that pays for it would be
// cut short in its last steps. It gets a bound of its own, twice
// boot_timeout (the template's boot, then its save, or the wait for another
// shim making it). A failure is only logged: Start then makes the template
// itself or boots, and fails with the reason if the guest cannot start.
func (s *Sandbox) prepareTemplate(ctx context.Context, vmcfg hypervisor.VMConfig, podNetwork bool) {
	t, ok := s.driver.(hypervisor.Templater)
	if !ok || vmcfg.TemplateDir == "" {
		return
	}
	if podNetwork && s.cfg.Devices.PassthroughNICs {
		// Physical NICs may be passed through, and a VM with host
		// PCI devices cannot come from a template.
		return
	}
	bootTimeout := time.Duration(s.cfg.Hypervisor.BootTimeout)
	ctx, cancel := context.WithTimeoutCause(ctx, 2*bootTimeout,
		fmt.Errorf("template not made within %s (twice hypervisor.boot_timeout)", 2*bootTimeout))
	defer cancel()
	begin := time.Now()
	if err := t.PrepareTemplate(ctx, vmcfg); err != nil {
		log.G(ctx).WithError(err).Warn("prepare the VM's template: the start makes it or boots")
		return
	}
	stage(ctx, "template-ready", s.created, log.Fields{"took": time.Since(begin).String()})
}

// place puts the VM's threads into the host cgroups of their priority
// classes (package placement), the sandbox's cgroup, and a systemd scope
// or the slices made for it, recorded first.
func (s *Sandbox) place(ctx context.Context) error {
	p := s.colocation().plan
	if p.Parent == "" {
		return nil
	}
	made, err := placement.ToMake(p)
	if err != nil {
		return err
	}
	if err := s.updateState(func(st *State) { st.Cgroup, st.CgroupMade = p.Parent, made }); err != nil {
		return err
	}
	tids, err := s.vm.VCPUThreads(ctx)
	if err != nil {
		return err
	}
	t := placement.Threads{Pid: s.vm.Pid(), VCPUs: tids}
	if s.virtiofsd != nil {
		t.Helpers = append(t.Helpers, s.virtiofsd.Pid())
	}
	if err := placement.Apply(ctx, p, made, t); err != nil {
		return err
	}
	if err := s.limitHostMemory(s.size.memoryMB); err != nil {
		return err
	}
	log.G(ctx).WithFields(log.Fields{"cgroup": p.Parent, "vcpus": p.VCPUClasses}).Debug("VM threads placed")
	return nil
}

func (s *Sandbox) vmConfig(share hypervisor.Share) hypervisor.VMConfig {
	h := s.cfg.Hypervisor
	channel := agentChannel(s.cfg.Agent.Channel, s.driver)
	// Templates are a capability of some drivers: the others boot every
	// VM, and get no directory for them.
	templateDir := ""
	if _, ok := s.driver.(hypervisor.Templater); ok && h.Template {
		templateDir = s.cfg.Runtime.TemplateDir
	}
	var console hypervisor.GuestPort
	if s.cfg.Agent.DebugConsole {
		console = hypervisor.GuestPort{Serial: agentproto.ConsolePortName}
	}
	return hypervisor.VMConfig{
		ID:       s.id,
		Dir:      filepath.Join(s.dir, vmDir),
		VCPUs:    s.size.vcpus,
		MemoryMB: s.size.memoryMB,
		// Every VM can grow to the bounds (resize.go); templates are
		// taken at the size of a pod without limits.
		MaxVCPUs:         s.maxSize.vcpus,
		MaxMemoryMB:      s.maxSize.memoryMB,
		BaseMemoryMB:     min(h.BaseMemoryMB, h.MemoryMB),
		TemplateVCPUs:    h.VCPUs,
		TemplateMemoryMB: h.MemoryMB,
		Kernel:           h.Kernel,
		Initrd:           h.Initrd,
		KernelParams:     guestKernelParams(s.cfg, channel),
		Shares:           []hypervisor.Share{share},
		Channel:          channel,
		AgentPort:        hypervisor.GuestPort{Vsock: agentproto.VsockPort, Serial: agentproto.SerialPortName},
		DebugConsole:     console,
		TemplateDir:      templateDir,
	}
}

// guestKernelParams are the guest's kernel parameters beyond the driver's
// own: the agent's channel and console, then hypervisor.kernel_params,
// which may override them (a test points the agent at another channel so),
// then the agent's log level, which agent.log_level sets.
func guestKernelParams(cfg config.Config, channel hypervisor.AgentChannel) []string {
	params := []string{"colo.channel=" + string(channel)}
	if cfg.Agent.DebugConsole {
		params = append(params, agentproto.ConsoleKernelParam)
	}
	params = append(params, strings.Fields(cfg.Hypervisor.KernelParams)...)
	return append(params, "colo.log="+cfg.Agent.LogLevel)
}

// watchVM turns an unexpected VM exit into a failed sandbox: exits of all
// its processes and a teardown.
func (s *Sandbox) watchVM() {
	select {
	case <-s.stopping:
	case <-s.vm.Done():
		s.fail(fmt.Errorf("VM exited unexpectedly: %w", s.vm.Err()))
	}
}

// Container returns a container of the sandbox.
func (s *Sandbox) Container(id string) (*Container, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	c, ok := s.containers[id]
	if !ok {
		return nil, errdefs.ErrNotFound.WithMessage(fmt.Sprintf("container %s not found", id))
	}
	return c, nil
}

// AddContainer creates another container in the running sandbox: its
// rootfs goes into the same shared directory, the container into the same
// guest.
func (s *Sandbox) AddContainer(ctx context.Context, cfg ContainerConfig) (_ *Container, retErr error) {
	if !s.alive() {
		return nil, errdefs.ErrFailedPrecondition.WithMessage(fmt.Sprintf("sandbox %s: its VM is gone", s.id))
	}
	if _, err := s.colocation().class(cfg.Spec); err != nil {
		return nil, err
	}
	s.mu.Lock()
	_, exists := s.containers[cfg.ID]
	s.mu.Unlock()
	if exists {
		return nil, errdefs.ErrAlreadyExists.WithMessage(fmt.Sprintf("container %s already exists in sandbox %s", cfg.ID, s.id))
	}
	if err := s.hotplugNetwork(ctx); err != nil {
		return nil, err
	}
	var limits limits
	if cfg.Spec.Linux != nil {
		limits = resourceLimits(cfg.Spec.Linux.Resources)
	}
	undoLimits, err := s.growFor(ctx, cfg.ID, limits)
	if err != nil {
		return nil, err
	}
	defer func() {
		if retErr != nil {
			undoLimits()
		}
	}()
	c, err := s.prepareContainer(ctx, cfg)
	if err != nil {
		return nil, err
	}
	defer func() {
		if retErr != nil {
			c.init.io.close()
			if err := s.unmountRootfs(context.WithoutCancel(ctx), cfg.ID); err != nil {
				log.G(ctx).WithError(err).Error("clean up after a failed create")
			}
		}
	}()
	if err := s.createInGuest(ctx, c); err != nil {
		return nil, err
	}
	return c, nil
}

// DeleteContainer removes a stopped (or never started) container. Deleting
// the last container shuts the sandbox down. A failed delete can be tried
// again.
func (s *Sandbox) DeleteContainer(ctx context.Context, id string) (ProcessState, error) {
	c, err := s.Container(id)
	if err != nil {
		return ProcessState{}, err
	}
	p := c.init
	if st := p.State(); st.Status == StatusRunning {
		return st, errdefs.ErrFailedPrecondition.WithMessage(fmt.Sprintf("container %s is running: kill it first", id))
	}
	if err := c.remove(ctx); err != nil {
		return p.State(), err
	}
	// A container deleted before it started never exits by itself.
	p.setExited(0, time.Now())

	s.mu.Lock()
	// A pod's sandbox (CreatePod) lives on without containers, until the
	// sandbox API stops it.
	last := len(s.containers) == 1 && s.pod == nil
	s.mu.Unlock()
	switch {
	case last:
		if err := s.Shutdown(ctx); err != nil {
			return p.State(), err
		}
	case s.isTorn():
		// Stopped: its mounts and record went with it.
	default:
		if err := s.unmountRootfs(ctx, id); err != nil {
			return p.State(), err
		}
		if err := s.handOverBundleFile(c); err != nil {
			return p.State(), err
		}
	}
	s.mu.Lock()
	delete(s.containers, id)
	s.mu.Unlock()
	s.dropLimits(id)
	return p.State(), nil
}

// handOverBundleFile moves the sandbox's record (BundleFile) from the
// bundle of a container being deleted to the bundle of one that stays.
// containerd runs `shim delete` in a task's bundle after every task delete:
// that must not take down a VM other containers still run in, while a
// crash later must still be cleaned up from a bundle that exists.
func (s *Sandbox) handOverBundleFile(leaving *Container) error {
	s.teardownMu.Lock()
	defer s.teardownMu.Unlock()
	if s.bundleFile != filepath.Join(leaving.bundle, BundleFile) {
		return nil
	}
	s.mu.Lock()
	var next *Container
	for _, c := range s.containers {
		if c != leaving {
			next = c
			break
		}
	}
	s.mu.Unlock()
	if next == nil {
		return nil
	}
	f, err := writeBundleFile(next.bundle, s.dir)
	if err != nil {
		return err
	}
	if err := os.Remove(s.bundleFile); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	s.bundleFile = f
	return nil
}

// unmountRootfs takes a container's rootfs and volumes out of the share
// of a sandbox whose VM goes on. They are detached lazily, as Kata does:
// the guest's 9p or virtio-fs client keeps files of a removed container
// open for a while, and waiting for them would be in vain.
func (s *Sandbox) unmountRootfs(ctx context.Context, id string) error {
	// A block rootfs is a disk: the agent unmounted it with the
	// container.
	if err := s.releaseDisk(ctx, diskID(id)); err != nil {
		return err
	}
	rel := containerMounts(id)
	if err := s.unmountRecorded(ctx, rel, true); err != nil {
		return err
	}
	if err := storage.RemoveBeneath(s.dir, rel); err != nil {
		return err
	}
	return s.forgetContainer(id)
}

// Shutdown destroys the sandbox: the guest is told first, then the VM is
// stopped (graceful up to hypervisor.shutdown_timeout or ctx's deadline,
// whichever comes first, then killed), then virtiofsd, mounts and the
// sandbox directory go. A canceled ctx makes it harsher, never partial. It
// can be called again after a failure, and after the VM died.
func (s *Sandbox) Shutdown(ctx context.Context) error {
	if s.alive() {
		callCtx, cancel := context.WithTimeout(ctx, time.Duration(s.cfg.Hypervisor.ShutdownTimeout))
		_, err := s.agent.DestroySandbox(callCtx, &agentproto.DestroySandboxRequest{})
		cancel()
		if err != nil {
			log.G(ctx).WithError(agentError("DestroySandbox", err)).Warn("guest did not destroy the sandbox; stopping the VM anyway")
		}
	}
	return s.teardown(ctx)
}

// alive reports whether the guest is still there to talk to.
func (s *Sandbox) alive() bool {
	if s.vm == nil || s.agent == nil {
		return false
	}
	select {
	case <-s.stopping:
		return false
	case <-s.vm.Done():
		return false
	default:
		return true
	}
}

// teardown undoes Create, in reverse, as far as it got. Each step is done
// once; a failed step is tried again by the next call. The bundle file goes
// last, and only when everything else is gone, so that `shim delete` can
// still find what is left.
func (s *Sandbox) teardown(ctx context.Context) error {
	s.teardownMu.Lock()
	defer s.teardownMu.Unlock()
	if s.torn {
		return nil
	}
	s.stopOnce.Do(func() { close(s.stopping) })
	s.stopManagement()
	var errs []error
	if s.vm != nil && !s.vmStopped {
		stopCtx, cancel := context.WithTimeout(ctx, time.Duration(s.cfg.Hypervisor.ShutdownTimeout))
		err := s.vm.Stop(stopCtx)
		cancel()
		select {
		case <-s.vm.Done():
			s.vmStopped = true
		default:
			errs = append(errs, fmt.Errorf("stop VM: %w", err))
		}
	}
	if s.agent != nil {
		s.agent.Close()
	}
	// Only once QEMU let go: an unbind from vfio-pci waits for it.
	if s.vm == nil || s.vmStopped {
		if err := s.restorePassthrough(ctx); err != nil {
			errs = append(errs, err)
		}
	}
	if s.virtiofsd != nil {
		stopCtx, cancel := context.WithTimeout(ctx, virtiofsdStopTimeout)
		if err := s.virtiofsd.Stop(stopCtx); err != nil {
			errs = append(errs, err)
		}
		cancel()
	}
	if st := s.recorded(); st.Cgroup != "" && (s.vm == nil || s.vmStopped) && len(errs) == 0 {
		if err := placement.Remove(ctx, st.Cgroup, st.CgroupMade); err != nil {
			errs = append(errs, err)
		}
	}
	// The TAPs go once the VM's copies are closed too.
	if s.net != nil && (s.vm == nil || s.vmStopped) {
		if err := s.net.close(); err != nil {
			errs = append(errs, err)
		}
	}
	s.mu.Lock()
	for _, c := range s.containers {
		c.init.io.close()
	}
	s.mu.Unlock()
	// The VM's copies of the disks' files went with it.
	if s.vm == nil || s.vmStopped {
		if err := s.closeDisks(); err != nil {
			errs = append(errs, err)
		}
	}
	if len(errs) == 0 {
		if err := s.unmountRecorded(ctx, "", false); err != nil {
			errs = append(errs, err)
		} else if err := storage.RemoveDir(s.dir); err != nil {
			errs = append(errs, err)
		}
	}
	if len(errs) == 0 && s.bundleFile != "" {
		if err := os.Remove(s.bundleFile); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("tear down sandbox %s: %w", s.id, err)
	}
	s.torn = true
	log.G(ctx).WithField("sandbox", s.id).Info("sandbox torn down")
	return nil
}

// CleanupVM kills the VM a dead shim left and removes the hypervisor
// driver's files in dir (the VM dir), from the hypervisor's name and the
// hypervisor process as recorded (zero if it was not): driver.Cleanup of
// package hypervisor/driver. It must not need a working hypervisor.
type CleanupVM func(ctx context.Context, name, dir string, vm procfs.Proc) error

// Cleanup removes what a crashed shim left of the sandbox in dir, from its
// record alone: the VM (cleanupVM, with the hypervisor named in the
// record), virtiofsd, the TAPs, the host cgroup, the mounts and the
// directory. No configuration is read and no hypervisor driver made, so
// a hypervisor that was upgraded, moved or removed since, or a /dev/kvm
// that is gone, does not stop it. It is a no-op for a directory that is
// gone, and refuses one that has no matching state file beyond removing it
// if empty. What it could not undo stays recorded, for the next try.
func Cleanup(ctx context.Context, dir string, cleanupVM CleanupVM) (State, error) {
	return cleanup(ctx, dir, cleanupVM, vfio.NewBinder())
}

// cleanup is Cleanup with the host's devices behind binder.
func cleanup(ctx context.Context, dir string, cleanupVM CleanupVM, binder *vfio.Binder) (State, error) {
	st, err := ReadState(dir)
	if errors.Is(err, os.ErrNotExist) {
		// Created the directory, crashed before the state file: nothing
		// was started. Only an empty directory is ours to remove.
		if err := os.Remove(dir); err != nil && !errors.Is(err, os.ErrNotExist) {
			return st, fmt.Errorf("sandbox dir %s has no %s; not removing it: %w", dir, stateFile, err)
		}
		return st, nil
	}
	if err != nil {
		return st, err
	}
	var errs []error
	// Always: the VM may have been launched but not yet recorded, and the
	// hypervisor's cleanup finds it by its own files then.
	vm := procfs.Proc{Pid: st.HypervisorPid, Start: st.HypervisorStart}
	if cleanupVM == nil {
		errs = append(errs, errors.New("clean up VM: no hypervisor cleanup given"))
	} else if err := cleanupVM(ctx, st.Config.Hypervisor.Type, filepath.Join(dir, vmDir), vm); err != nil {
		errs = append(errs, fmt.Errorf("clean up VM: %w", err))
	}
	// Only once the VM is gone: an unbind from vfio-pci waits for it.
	if len(errs) == 0 && len(st.VFIO) > 0 {
		left, err := restoreRecorded(ctx, binder, st.VFIO)
		if err != nil {
			st.VFIO = left
			errs = append(errs, err, writeState(dir, st))
		}
	}
	if err := storage.CleanupVirtiofsd(ctx, st.VirtiofsdPid, filepath.Join(dir, virtiofsdSocket)); err != nil {
		errs = append(errs, err)
	}
	for _, m := range st.Mirrors {
		if err := network.RemoveMirror(st.NetNS, m.Interface, m.Tap); err != nil {
			errs = append(errs, err)
		}
	}
	if st.Cgroup != "" && len(errs) == 0 {
		if err := placement.Remove(ctx, st.Cgroup, st.CgroupMade); err != nil {
			errs = append(errs, err)
		}
	}
	if len(errs) == 0 {
		left, err := unmountRecorded(ctx, dir, st.Mounts, "", false)
		if err != nil {
			st.Mounts = left
			errs = append(errs, err, writeState(dir, st))
		} else if err := storage.RemoveDir(dir); err != nil {
			errs = append(errs, err)
		}
	}
	return st, errors.Join(errs...)
}
