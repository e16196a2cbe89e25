package agent

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	_ "github.com/opencontainers/cgroups/devices" // device rules in cgroups
	"github.com/opencontainers/runc/libcontainer"
	"github.com/opencontainers/runc/libcontainer/configs"
	"github.com/opencontainers/runc/libcontainer/devices"
	"github.com/opencontainers/runc/libcontainer/specconv"
	"github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"

	"github.com/colo-runtime/colo/agentproto"
)

// container is a libcontainer container and the processes the agent
// started in it. Its init process waits in "colo-agent init" from create
// until start, as with runc create/start.
type container struct {
	id     string
	lc     *libcontainer.Container
	mounts []string // storages mounted for the container, unmounted on remove
	init   *process

	mu      sync.Mutex // guards started and execs
	started bool
	execs   map[string]*process

	oomKilled atomic.Bool // the kernel's OOM killer struck in its cgroup
}

// process is a process of a container: its init (exec id "") or an exec.
type process struct {
	execID string
	lp     *libcontainer.Process
	pid    int
	stdio  *stdio

	exited   chan struct{} // closed once the process is reaped
	status   uint32        // set before exited is closed
	exitedAt time.Time     // set before exited is closed
}

// containerOptions are the agent-wide settings for new containers.
type containerOptions struct {
	stateDir    string // libcontainer's state root
	noPivotRoot bool
	sysRoot     string // sysfs, where the disks of storages are found
}

// createContainer mounts the container's storages, creates the container
// and starts its init process, which then waits for start.
func createContainer(ctx context.Context, opts containerOptions, id string, spec *specs.Spec, storages []*agentproto.Storage, want streams) (_ *container, retErr error) {
	if spec.Process == nil {
		return nil, fmt.Errorf("spec has no process: %w", errdefs.ErrInvalidArgument)
	}
	if spec.Root == nil || !filepath.IsAbs(spec.Root.Path) {
		return nil, fmt.Errorf("spec root.path must be an absolute guest path: %w", errdefs.ErrInvalidArgument)
	}
	mounts, err := mountStorages(ctx, opts.sysRoot, storages)
	if err != nil {
		return nil, err
	}
	defer func() {
		if retErr != nil {
			if err := unmountAll(ctx, mounts); err != nil {
				log.G(ctx).WithError(err).Warn("unmounting storages of a failed container")
			}
		}
	}()

	setCgroupsPath(spec, id)
	if err := addGuestDevices(spec, "/dev"); err != nil {
		return nil, err
	}
	if err := podSysctls(ctx, spec); err != nil {
		return nil, err
	}
	// Mount propagation between the pod's containers (propagation.go).
	if err := shareVolumes(ctx, id, spec); err != nil {
		return nil, err
	}
	defer func() {
		if retErr != nil {
			releaseVolumes(ctx, id)
		}
	}()
	config, err := specconv.CreateLibcontainerConfig(&specconv.CreateOpts{
		CgroupName:  id,
		NoPivotRoot: opts.noPivotRoot,
		Spec:        spec,
	})
	if err != nil {
		return nil, fmt.Errorf("convert spec: %w: %w", err, errdefs.ErrInvalidArgument)
	}
	setContainerOOMScoreAdj(config)
	lc, err := libcontainer.Create(opts.stateDir, id, config)
	if err != nil {
		if errors.Is(err, libcontainer.ErrExist) {
			err = fmt.Errorf("%w: %w", err, errdefs.ErrAlreadyExists)
		}
		return nil, fmt.Errorf("create container %s: %w", id, err)
	}
	defer func() {
		if retErr != nil {
			if err := lc.Destroy(); err != nil {
				log.G(ctx).WithError(err).Warn("destroying a failed container")
			}
		}
	}()
	initProc, err := startProcess(ctx, lc, "", spec.Process, want)
	if err != nil {
		return nil, err
	}
	c := &container{
		id:     id,
		lc:     lc,
		mounts: mounts,
		init:   initProc,
		execs:  make(map[string]*process),
	}
	if !config.Namespaces.Contains(configs.NEWPID) || config.Namespaces.PathOf(configs.NEWPID) != "" {
		// Without a PID namespace of its own, the container's other
		// processes outlive its init and would hold its output open; runc's
		// shim kills them, and so does the agent.
		go func() {
			<-initProc.exited
			if err := c.signal("", unix.SIGKILL, true); err != nil {
				log.G(ctx).WithError(err).WithField("container", id).Warn("kill the processes left after init exited")
			}
		}()
	}
	return c, nil
}

// privilegedCaps are the capabilities that, with no masked and no
// read-only paths, make a spec privileged. Not "every capability": CRI
// gives a privileged container containerd's own (its WithPrivileged), which
// may lack some (the test bed's lack CAP_SYS_RESOURCE), and the newest
// depend on the host's kernel.
var privilegedCaps = []string{"CAP_SYS_ADMIN", "CAP_SYS_MODULE", "CAP_SYS_RAWIO", "CAP_NET_ADMIN", "CAP_MKNOD"}

// isPrivileged tells a privileged container's spec (CRI's and ctr's
// WithPrivileged: all capabilities, no masked or read-only paths) from
// others: its bounding set holds privilegedCaps and it has neither masked
// nor read-only paths. A container given all capabilities alone keeps its
// masked paths; one in a privileged pod without them, its capabilities.
func isPrivileged(spec *specs.Spec) bool {
	if spec.Process == nil || spec.Process.Capabilities == nil || spec.Linux == nil {
		return false
	}
	if len(spec.Linux.MaskedPaths) > 0 || len(spec.Linux.ReadonlyPaths) > 0 {
		return false
	}
	for _, c := range privilegedCaps {
		if !slices.Contains(spec.Process.Capabilities.Bounding, c) {
			return false
		}
	}
	return true
}

// addGuestDevices gives a privileged container the guest's devices, as
// runc gives one the host's: every device node under devDir (the guest's
// /dev, with runc's exceptions: pts, shm, mqueue, console) and access to
// every device. The host's devices never reach the guest (the shim refuses
// them), so this is what CRI's privileged_without_host_devices leaves out.
// Other containers' specs are left alone.
func addGuestDevices(spec *specs.Spec, devDir string) error {
	if !isPrivileged(spec) {
		return nil
	}
	devs, err := devices.GetDevices(devDir)
	if err != nil {
		return fmt.Errorf("list the guest's devices: %w", err)
	}
	have := map[string]bool{}
	for _, d := range spec.Linux.Devices {
		have[d.Path] = true
	}
	for _, d := range devs {
		p := filepath.Join("/dev", strings.TrimPrefix(d.Path, devDir))
		if have[p] {
			continue
		}
		mode := d.FileMode
		uid, gid := d.Uid, d.Gid
		spec.Linux.Devices = append(spec.Linux.Devices, specs.LinuxDevice{
			Path: p, Type: string(d.Type), Major: d.Major, Minor: d.Minor,
			FileMode: &mode, UID: &uid, GID: &gid,
		})
	}
	if spec.Linux.Resources == nil {
		spec.Linux.Resources = &specs.LinuxResources{}
	}
	spec.Linux.Resources.Devices = []specs.LinuxDeviceCgroup{{Allow: true, Access: "rwm"}}
	return nil
}

// podSysctls applies the net.* sysctls of a container that runs in the
// guest's own network namespace, which is its pod's (the pod's interfaces
// are the guest's), and takes them out of the spec: libcontainer refuses
// net.* sysctls in a namespace it does not create. CRI sets some for every
// pod (net.ipv4.ip_unprivileged_port_start, net.ipv4.ping_group_range).
func podSysctls(ctx context.Context, spec *specs.Spec) error {
	if spec.Linux == nil || len(spec.Linux.Sysctl) == 0 {
		return nil
	}
	for _, ns := range spec.Linux.Namespaces {
		if ns.Type == specs.NetworkNamespace {
			return nil
		}
	}
	for k, v := range spec.Linux.Sysctl {
		if !strings.HasPrefix(k, "net.") {
			continue
		}
		if strings.Contains(k, "/") || strings.Contains(k, "..") {
			return fmt.Errorf("sysctl %q: %w", k, errdefs.ErrInvalidArgument)
		}
		p := "/proc/sys/" + strings.ReplaceAll(k, ".", "/")
		if err := os.WriteFile(p, []byte(v), 0); err != nil {
			return fmt.Errorf("sysctl %s=%s: %w", k, v, err)
		}
		log.G(ctx).Debugf("sysctl %s=%s set for the pod", k, v)
		delete(spec.Linux.Sysctl, k)
	}
	return nil
}

// setCgroupsPath picks the container's cgroup in the guest. The guest has
// no systemd, so a systemd-style path ("slice:prefix:name") from the host
// cannot be used.
func setCgroupsPath(spec *specs.Spec, id string) {
	if spec.Linux == nil {
		spec.Linux = &specs.Linux{}
	}
	if p := spec.Linux.CgroupsPath; p == "" || strings.Contains(p, ":") {
		spec.Linux.CgroupsPath = "/colo/" + id
	}
}

// startProcess starts an init process (execID "") with libcontainer's
// Start, which leaves it waiting for Exec, or an exec process with Run.
func startProcess(ctx context.Context, lc *libcontainer.Container, execID string, sp *specs.Process, want streams) (*process, error) {
	lp, err := newProcess(sp)
	if err != nil {
		return nil, err
	}
	lp.Init = execID == ""
	lp.LogLevel = strconv.Itoa(int(log.GetLevel()))

	config := lc.Config()
	rootUID, err := config.HostRootUID()
	if err != nil {
		return nil, err
	}
	rootGID, err := config.HostRootGID()
	if err != nil {
		return nil, err
	}
	want.terminal = want.terminal || sp.Terminal
	pio, closeChild, err := pipeStdio(lp, want, rootUID, rootGID)
	if err != nil {
		return nil, err
	}
	if lp.Init {
		err = lc.Start(lp)
	} else {
		err = lc.Run(lp)
	}
	closeChild()
	if err == nil {
		err = pio.receiveConsole()
		if err != nil {
			_ = lp.Signal(unix.SIGKILL)
			_, _ = lp.Wait()
		}
	}
	if err != nil {
		pio.Close()
		return nil, fmt.Errorf("start process %q of container %s: %w", execID, lc.ID(), err)
	}
	pid, err := lp.Pid()
	if err != nil {
		// Cannot happen after a successful start.
		pio.Close()
		return nil, err
	}
	p := &process{
		execID: execID,
		lp:     lp,
		pid:    pid,
		stdio:  pio,
		exited: make(chan struct{}),
	}
	go p.wait(context.WithoutCancel(ctx))
	return p, nil
}

// newProcess converts an OCI process like runc does.
func newProcess(sp *specs.Process) (*libcontainer.Process, error) {
	if len(sp.Args) == 0 {
		return nil, fmt.Errorf("process has no args: %w", errdefs.ErrInvalidArgument)
	}
	lp := &libcontainer.Process{
		Args:            sp.Args,
		Env:             sp.Env,
		UID:             int(sp.User.UID),
		GID:             int(sp.User.GID),
		Cwd:             sp.Cwd,
		Label:           sp.SelinuxLabel,
		NoNewPrivileges: &sp.NoNewPrivileges,
		AppArmorProfile: sp.ApparmorProfile,
		Scheduler:       sp.Scheduler,
		IOPriority:      sp.IOPriority,
	}
	if sp.ConsoleSize != nil {
		lp.ConsoleWidth, lp.ConsoleHeight = uint16(sp.ConsoleSize.Width), uint16(sp.ConsoleSize.Height)
	}
	for _, g := range sp.User.AdditionalGids {
		lp.AdditionalGroups = append(lp.AdditionalGroups, int(g))
	}
	if c := sp.Capabilities; c != nil {
		lp.Capabilities = &configs.Capabilities{
			Bounding:    c.Bounding,
			Effective:   c.Effective,
			Inheritable: c.Inheritable,
			Permitted:   c.Permitted,
			Ambient:     c.Ambient,
		}
	}
	for _, rl := range sp.Rlimits {
		t, ok := rlimits[rl.Type]
		if !ok {
			return nil, fmt.Errorf("rlimit %q: %w", rl.Type, errdefs.ErrInvalidArgument)
		}
		lp.Rlimits = append(lp.Rlimits, configs.Rlimit{Type: t, Hard: rl.Hard, Soft: rl.Soft})
	}
	aff, err := configs.ConvertCPUAffinity(sp.ExecCPUAffinity)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", err, errdefs.ErrInvalidArgument)
	}
	lp.CPUAffinity = aff
	return lp, nil
}

var rlimits = map[string]int{
	"RLIMIT_CPU":        unix.RLIMIT_CPU,
	"RLIMIT_FSIZE":      unix.RLIMIT_FSIZE,
	"RLIMIT_DATA":       unix.RLIMIT_DATA,
	"RLIMIT_STACK":      unix.RLIMIT_STACK,
	"RLIMIT_CORE":       unix.RLIMIT_CORE,
	"RLIMIT_RSS":        unix.RLIMIT_RSS,
	"RLIMIT_NPROC":      unix.RLIMIT_NPROC,
	"RLIMIT_NOFILE":     unix.RLIMIT_NOFILE,
	"RLIMIT_MEMLOCK":    unix.RLIMIT_MEMLOCK,
	"RLIMIT_AS":         unix.RLIMIT_AS,
	"RLIMIT_LOCKS":      unix.RLIMIT_LOCKS,
	"RLIMIT_SIGPENDING": unix.RLIMIT_SIGPENDING,
	"RLIMIT_MSGQUEUE":   unix.RLIMIT_MSGQUEUE,
	"RLIMIT_NICE":       unix.RLIMIT_NICE,
	"RLIMIT_RTPRIO":     unix.RLIMIT_RTPRIO,
	"RLIMIT_RTTIME":     unix.RLIMIT_RTTIME,
}

// wait reaps the process. libcontainer's Process.Wait works only once, so
// this is the one caller; WaitProcess callers wait for exited.
func (p *process) wait(ctx context.Context) {
	st, err := p.lp.Wait()
	status := uint32(255)
	if st != nil {
		ws := st.Sys().(syscall.WaitStatus)
		if ws.Signaled() {
			status = 128 + uint32(ws.Signal())
		} else {
			status = uint32(ws.ExitStatus())
		}
	} else {
		log.G(ctx).WithError(err).Errorf("waiting for process %d", p.pid)
	}
	p.status, p.exitedAt = status, time.Now()
	close(p.exited)
	log.G(ctx).Debugf("process %d exited with status %d", p.pid, status)
}

func (p *process) hasExited() bool {
	select {
	case <-p.exited:
		return true
	default:
		return false
	}
}

// waitExit waits until the process has exited or ctx ends.
func (p *process) waitExit(ctx context.Context) error {
	select {
	case <-p.exited:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// process finds the init (execID "") or an exec process.
func (c *container) process(execID string) (*process, error) {
	if execID == "" {
		return c.init, nil
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	p, ok := c.execs[execID]
	if !ok || p == nil {
		return nil, fmt.Errorf("exec %q of container %s: %w", execID, c.id, errdefs.ErrNotFound)
	}
	return p, nil
}

// start lets the init process exec the container's program.
func (c *container) start() (int, error) {
	c.mu.Lock()
	started := c.started
	c.started = true
	c.mu.Unlock()
	if started {
		return 0, fmt.Errorf("container %s already started: %w", c.id, errdefs.ErrFailedPrecondition)
	}
	if err := c.lc.Exec(); err != nil {
		return 0, fmt.Errorf("start container %s: %w", c.id, err)
	}
	return c.init.pid, nil
}

// exec starts another process in the running container.
func (c *container) exec(ctx context.Context, execID string, sp *specs.Process, want streams) (*process, error) {
	if execID == "" {
		return nil, fmt.Errorf("exec id is empty: %w", errdefs.ErrInvalidArgument)
	}
	c.mu.Lock()
	_, exists := c.execs[execID]
	if !exists {
		c.execs[execID] = nil // reserved while it starts
	}
	c.mu.Unlock()
	if exists {
		return nil, fmt.Errorf("exec %q of container %s: %w", execID, c.id, errdefs.ErrAlreadyExists)
	}
	if c.init.hasExited() {
		c.unreserve(execID)
		return nil, fmt.Errorf("container %s is not running: %w", c.id, errdefs.ErrFailedPrecondition)
	}
	p, err := startProcess(ctx, c.lc, execID, sp, want)
	if err != nil {
		c.unreserve(execID)
		return nil, err
	}
	c.mu.Lock()
	c.execs[execID] = p
	c.mu.Unlock()
	return p, nil
}

func (c *container) unreserve(execID string) {
	c.mu.Lock()
	delete(c.execs, execID)
	c.mu.Unlock()
}

// removeExec frees an exited exec process: its stdio and its id.
func (c *container) removeExec(execID string) error {
	if execID == "" {
		return fmt.Errorf("the init process goes with RemoveContainer: %w", errdefs.ErrInvalidArgument)
	}
	p, err := c.process(execID)
	if err != nil {
		return err
	}
	if !p.hasExited() {
		return fmt.Errorf("exec %q of container %s is still running: %w", execID, c.id, errdefs.ErrFailedPrecondition)
	}
	c.unreserve(execID)
	p.stdio.Close()
	return nil
}

// signal signals one process, or with all every process of the container.
func (c *container) signal(execID string, sig unix.Signal, all bool) error {
	if all {
		pids, err := c.lc.Processes()
		if err != nil {
			return fmt.Errorf("list processes of container %s: %w", c.id, err)
		}
		for _, pid := range pids {
			if err := unix.Kill(pid, sig); err != nil && !errors.Is(err, unix.ESRCH) {
				return fmt.Errorf("signal process %d of container %s: %w", pid, c.id, err)
			}
		}
		return nil
	}
	p, err := c.process(execID)
	if err != nil {
		return err
	}
	if p.hasExited() {
		return fmt.Errorf("process %q of container %s already finished: %w", execID, c.id, errdefs.ErrNotFound)
	}
	if execID == "" {
		// libcontainer makes sure the pid is still the container's init.
		err = c.lc.Signal(sig)
	} else {
		// A pidfd underneath: no pid reuse race.
		err = p.lp.Signal(sig)
	}
	if errors.Is(err, libcontainer.ErrNotRunning) || errors.Is(err, os.ErrProcessDone) {
		return fmt.Errorf("process %q of container %s already finished: %w", execID, c.id, errdefs.ErrNotFound)
	}
	return err
}

// processes returns the processes to wait for and release, init first.
func (c *container) processes() []*process {
	c.mu.Lock()
	defer c.mu.Unlock()
	ps := []*process{c.init}
	for _, p := range c.execs {
		if p != nil {
			ps = append(ps, p)
		}
	}
	return ps
}

// remove kills what still runs, waits for it, and releases the cgroup,
// libcontainer's state, the stdio and the storages.
func (c *container) remove(ctx context.Context) error {
	ps := c.processes()
	if !c.init.hasExited() {
		// With a private PID namespace the kernel kills the rest along
		// with init; otherwise libcontainer kills through the cgroup.
		if err := c.lc.Signal(unix.SIGKILL); err != nil && !errors.Is(err, libcontainer.ErrNotRunning) {
			return fmt.Errorf("kill container %s: %w", c.id, err)
		}
	}
	for _, p := range ps[1:] {
		if !p.hasExited() {
			_ = p.lp.Signal(unix.SIGKILL)
		}
	}
	for _, p := range ps {
		if err := p.waitExit(ctx); err != nil {
			return fmt.Errorf("wait for process %d of container %s: %w", p.pid, c.id, err)
		}
	}
	var errs []error
	if err := c.lc.Destroy(); err != nil {
		errs = append(errs, err)
	}
	for _, p := range ps {
		p.stdio.Close()
	}
	if err := unmountAll(ctx, c.mounts); err != nil {
		errs = append(errs, err)
	}
	c.mounts = nil
	releaseVolumes(ctx, c.id)
	return errors.Join(errs...)
}
