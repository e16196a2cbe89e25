package sandbox

import (
	"context"
	"encoding/json"
	"fmt"
	"path"
	"path/filepath"
	"sync"
	"time"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"github.com/containerd/log"
	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/colo-runtime/colo/agentproto"
	"github.com/colo-runtime/colo/storage"
)

// outputDrainTimeout bounds how long an exit waits for the process's output
// to be copied out. Output can only outlast the process if something else in
// the guest holds its pipes, or if nobody reads the fifos.
const outputDrainTimeout = 5 * time.Second

// Status of a process.
type Status string

const (
	StatusCreated Status = "created"
	StatusRunning Status = "running"
	StatusPaused  Status = "paused"
	StatusStopped Status = "stopped"
)

// ProcessState is a snapshot of a process.
type ProcessState struct {
	Status     Status
	ExitStatus uint32
	ExitedAt   time.Time
}

// Container is a container in a sandbox.
type Container struct {
	sb     *Sandbox
	id     string
	bundle string
	stdio  Stdio
	spec   *specs.Spec
	// binds are the guest sources of the spec's bind mounts (shareBinds).
	binds map[int]string
	// block is the rootfs as a disk of its own (disks.go); nil for a
	// rootfs in the share.
	block *blockRootfs
	init  *process

	execMu sync.Mutex
	execs  map[string]*process

	pausedMu sync.Mutex
	paused   bool

	removeMu sync.Mutex
	removed  bool // gone from the guest
}

// process is a process of a container: its init (execID "") or an exec.
type process struct {
	sb          *Sandbox
	containerID string
	execID      string
	io          *pipes
	stdio       Stdio
	spec        []byte // an exec's OCI process, as JSON

	mu       sync.Mutex
	state    ProcessState
	guestPid uint32
	waiting  bool // a WaitProcess is running for it
	starting bool // Start is asking the guest to start it
	done     chan struct{}
}

// prepareContainer does the host side of a new container: open its stdio
// and mount its rootfs in the shared directory, or open it as a disk for
// createInGuest to attach (a block rootfs, disks.go).
func (s *Sandbox) prepareContainer(ctx context.Context, cfg ContainerConfig) (_ *Container, retErr error) {
	if err := checkName("container id", cfg.ID); err != nil {
		return nil, err
	}
	// In the sandbox's record before anything of it is made; dropped
	// again by unmountRootfs, or here if it never got that far.
	if err := s.recordContainer(cfg.ID, cfg.Bundle); err != nil {
		return nil, err
	}
	defer func() {
		if retErr != nil {
			_ = s.forgetContainer(cfg.ID)
		}
	}()
	io, err := openPipes(ctx, cfg.Stdio, owner{cfg.ID, s.namespace})
	if err != nil {
		return nil, err
	}
	defer func() {
		if retErr != nil {
			io.close()
		}
	}()
	mounts := cfg.Rootfs
	if len(mounts) == 0 {
		root := cfg.Spec.Root.Path
		if !filepath.IsAbs(root) {
			root = filepath.Join(cfg.Bundle, root)
		}
		mounts = []mount.Mount{{Type: "bind", Source: root, Options: []string{"rbind", "rw"}}}
	}
	var block *blockRootfs
	blockMount, why := s.blockRootfsOf(mounts)
	if blockMount != nil {
		b, err := s.openBlockRootfs(cfg.ID, *blockMount)
		if err != nil {
			return nil, err
		}
		block = b
	} else {
		log.G(ctx).WithField("container", cfg.ID).Debugf("rootfs mounted on the host and shared: %s", why)
		rootfs := path.Join(containerMounts(cfg.ID), "rootfs")
		if err := s.recordMount(rootfs); err != nil {
			return nil, err
		}
	}
	defer func() {
		if retErr != nil {
			if err := s.unmountRootfs(context.WithoutCancel(ctx), cfg.ID); err != nil {
				log.G(ctx).WithError(err).Error("undo a container's mounts")
			}
		}
	}()
	if block == nil {
		if err := storage.MountRootfs(ctx, mounts, s.dir, path.Join(containerMounts(cfg.ID), "rootfs")); err != nil {
			return nil, err
		}
	}
	binds, err := s.shareBinds(cfg.Spec, cfg.ID)
	if err != nil {
		return nil, err
	}
	c := &Container{
		sb:     s,
		id:     cfg.ID,
		bundle: cfg.Bundle,
		stdio:  cfg.Stdio,
		spec:   cfg.Spec,
		binds:  binds,
		block:  block,
		execs:  make(map[string]*process),
	}
	c.init = &process{
		sb:          s,
		containerID: cfg.ID,
		io:          io,
		stdio:       cfg.Stdio,
		state:       ProcessState{Status: StatusCreated},
		done:        make(chan struct{}),
	}
	return c, nil
}

// createInGuest creates the container in the guest and adds it to the
// sandbox: a block rootfs is attached first (its caller's cleanup,
// unmountRootfs or teardown, detaches it on error).
func (s *Sandbox) createInGuest(ctx context.Context, c *Container) error {
	colo := s.colocation()
	class, err := colo.class(c.spec)
	if err != nil {
		return err
	}
	disks, err := s.podDiskMounts(c.spec)
	if err != nil {
		return err
	}
	view := guestView{binds: c.binds, podPid: s.podPid(c), class: class, topology: len(colo.classes) > 0, disks: disks}
	if s.pod != nil {
		view.podNamespaces, view.podFiles, view.guestNamespaces = true, s.pod.files, s.pod.guestNamespaces
	}
	var storages []*agentproto.Storage
	if c.block != nil {
		st, err := s.attachRootfs(ctx, c)
		if err != nil {
			return err
		}
		storages = append(storages, st)
		view.rootfs = st.GetMountPoint()
	}
	g, err := GuestSpec(ctx, c.spec, c.id, view)
	if err != nil {
		return err
	}
	b, err := json.Marshal(g)
	if err != nil {
		return fmt.Errorf("encode OCI spec: %w", err)
	}
	callCtx, cancel := context.WithTimeout(ctx, time.Duration(s.cfg.Hypervisor.BootTimeout))
	defer cancel()
	st := c.stdio.streams()
	_, err = s.agent.CreateContainer(callCtx, &agentproto.CreateContainerRequest{
		ContainerId: c.id,
		OciSpec:     b,
		Storages:    storages,
		Stdin:       st.Stdin != "",
		Stdout:      st.Stdout != "",
		Stderr:      st.Stderr != "",
		Terminal:    st.Terminal,
	})
	if err != nil {
		return agentError("CreateContainer", err)
	}
	s.mu.Lock()
	s.containers[c.id] = c
	s.mu.Unlock()
	stage(ctx, "container-created", s.created, log.Fields{"container": c.id})
	return nil
}

// podPid is the guest pid of the init process of the sandbox's first
// container, whose namespaces the pod's later containers join (the CRI
// sandbox container), or 0 for the first container itself or when it does
// not run.
func (s *Sandbox) podPid(c *Container) uint32 {
	if c.id == s.id {
		return 0
	}
	s.mu.Lock()
	first := s.containers[s.id]
	s.mu.Unlock()
	if first == nil {
		return 0
	}
	first.init.mu.Lock()
	defer first.init.mu.Unlock()
	if first.init.state.Status != StatusRunning {
		return 0
	}
	return first.init.guestPid
}

// ID of the container.
func (c *Container) ID() string { return c.id }

// Bundle of the container.
func (c *Container) Bundle() string { return c.bundle }

// ProcessStdio are the stdio paths of the init process or an exec.
func (c *Container) ProcessStdio(execID string) (Stdio, error) {
	p, err := c.process(execID)
	if err != nil {
		return Stdio{}, err
	}
	return p.stdio, nil
}

// State of the container's init process (execID "") or of an exec. In a
// paused container every running process is paused, as runc reports.
func (c *Container) State(execID string) (ProcessState, error) {
	p, err := c.process(execID)
	if err != nil {
		return ProcessState{}, err
	}
	st := p.State()
	if st.Status == StatusRunning && c.isPaused() {
		st.Status = StatusPaused
	}
	return st, nil
}

// Start starts the container's init process (execID "") or an exec that
// Exec registered. started is called once the process runs and before its
// exit can be reported, so that the caller's start event goes out first;
// it must not call back into the container.
func (c *Container) Start(ctx context.Context, execID string, started func()) error {
	begin := time.Now()
	p, err := c.process(execID)
	if err != nil {
		return err
	}
	// No lock is held across the agent call: State and Kill must answer
	// while a slow guest starts the process.
	p.mu.Lock()
	if p.state.Status != StatusCreated || p.starting {
		st := p.state.Status
		p.mu.Unlock()
		return errdefs.ErrFailedPrecondition.WithMessage(fmt.Sprintf("%s is %s, not created", p, st))
	}
	p.starting = true
	p.mu.Unlock()
	defer func() {
		p.mu.Lock()
		p.starting = false
		p.mu.Unlock()
	}()
	if !c.sb.alive() {
		return errdefs.ErrFailedPrecondition.WithMessage(fmt.Sprintf("%s: its VM is gone", p))
	}
	var guestPid uint32
	if execID == "" {
		resp, err := c.sb.agent.StartContainer(ctx, &agentproto.StartContainerRequest{ContainerId: c.id})
		if err != nil {
			return agentError("StartContainer", err)
		}
		guestPid = resp.GetPid()
	} else {
		st := p.stdio.streams()
		resp, err := c.sb.agent.ExecProcess(ctx, &agentproto.ExecProcessRequest{
			ContainerId: c.id,
			ExecId:      execID,
			Process:     p.spec,
			Stdin:       st.Stdin != "",
			Stdout:      st.Stdout != "",
			Stderr:      st.Stderr != "",
			Terminal:    st.Terminal,
		})
		if err != nil {
			// As with runc: an exec that never ran ends its waits, with
			// no exit event.
			p.mu.Lock()
			if p.state.Status != StatusStopped {
				p.state = ProcessState{Status: StatusStopped, ExitStatus: VMExitStatus, ExitedAt: time.Now()}
				close(p.done)
			}
			p.mu.Unlock()
			return agentError("ExecProcess", err)
		}
		guestPid = resp.GetPid()
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.state.Status != StatusCreated {
		// The sandbox failed meanwhile and ended the process.
		return errdefs.ErrFailedPrecondition.WithMessage(fmt.Sprintf("%s is %s: its sandbox failed while it started", p, p.state.Status))
	}
	p.state.Status = StatusRunning
	p.guestPid = guestPid
	p.io.start(c.sb.ctx, c.sb.agent, c.id, execID)
	p.startWaitLocked()
	if started != nil {
		started()
	}
	if execID == "" {
		stage(ctx, "process-started", c.sb.created, log.Fields{
			"container":   c.id,
			"guest_pid":   guestPid,
			"start_taken": time.Since(begin).String(),
		})
	}
	return nil
}

// Kill signals the container's init process (execID "") or an exec, or
// with all every process of the container. The agent call holds no lock,
// so State answers meanwhile.
func (c *Container) Kill(ctx context.Context, execID string, signal uint32, all bool) error {
	p, err := c.process(execID)
	if err != nil {
		return err
	}
	p.mu.Lock()
	status := p.state.Status
	p.mu.Unlock()
	if status == StatusStopped {
		return errdefs.ErrNotFound.WithMessage(fmt.Sprintf("%s: process already finished", p))
	}
	if execID != "" && status == StatusCreated {
		return errdefs.ErrFailedPrecondition.WithMessage(fmt.Sprintf("%s is not started", p))
	}
	if !c.sb.alive() {
		return errdefs.ErrNotFound.WithMessage(fmt.Sprintf("%s: its VM is gone", p))
	}
	_, err = c.sb.agent.SignalProcess(ctx, &agentproto.SignalProcessRequest{
		ContainerId: c.id,
		ExecId:      execID,
		Signal:      signal,
		All:         all,
	})
	if err != nil {
		return agentError("SignalProcess", err)
	}
	// A created container's init can die of a signal too; only a wait
	// notices.
	p.mu.Lock()
	if p.state.Status != StatusStopped {
		p.startWaitLocked()
	}
	p.mu.Unlock()
	return nil
}

// Wait blocks until the process has exited (and its output has been
// copied out) or ctx is done.
func (c *Container) Wait(ctx context.Context, execID string) (ProcessState, error) {
	p, err := c.process(execID)
	if err != nil {
		return ProcessState{}, err
	}
	select {
	case <-p.done:
		return p.State(), nil
	case <-ctx.Done():
		return ProcessState{}, ctx.Err()
	}
}

// CloseStdin serves CloseIO for the process (see pipes for when its stdin
// ends).
func (c *Container) CloseStdin(ctx context.Context, execID string) error {
	p, err := c.process(execID)
	if err != nil {
		return err
	}
	p.io.closeStdin()
	return nil
}

// remove removes the container from the guest, once.
func (c *Container) remove(ctx context.Context) error {
	c.removeMu.Lock()
	defer c.removeMu.Unlock()
	if c.removed {
		return nil
	}
	if c.sb.alive() {
		callCtx, cancel := context.WithTimeout(ctx, time.Duration(c.sb.cfg.Hypervisor.ShutdownTimeout))
		_, err := c.sb.agent.RemoveContainer(callCtx, &agentproto.RemoveContainerRequest{ContainerId: c.id})
		cancel()
		if err != nil && !errdefs.IsNotFound(errgrpc.ToNative(err)) {
			return agentError("RemoveContainer", err)
		}
	}
	c.removed = true
	for _, p := range c.processes() {
		p.io.close()
		if p.execID != "" {
			p.vmDied()
		}
	}
	return nil
}

// String names the process in errors.
func (p *process) String() string {
	if p.execID == "" {
		return "container " + p.containerID
	}
	return fmt.Sprintf("exec %s of container %s", p.execID, p.containerID)
}

// State of the process.
func (p *process) State() ProcessState {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.state
}

// startWaitLocked starts waiting for the process in the guest, once.
func (p *process) startWaitLocked() {
	if p.waiting {
		return
	}
	p.waiting = true
	go p.wait()
}

func (p *process) wait() {
	ctx := p.sb.ctx
	resp, err := p.sb.agent.WaitProcess(ctx, &agentproto.WaitProcessRequest{ContainerId: p.containerID, ExecId: p.execID})
	status, at := uint32(VMExitStatus), time.Now()
	if err != nil {
		select {
		case <-p.sb.stopping:
		default:
			log.G(ctx).WithError(agentError("WaitProcess", err)).WithField("container", p.containerID).Error("lost the process in the guest")
		}
	} else {
		status = resp.GetExitStatus()
		if resp.GetOomKilled() {
			log.G(ctx).WithFields(log.Fields{"container": p.containerID, "exec": p.execID, "exit_status": status}).Warn("process killed by the OOM killer")
		}
		// The guest's clock says when; a time the host knows cannot be
		// (before the sandbox, in the future) is the host's now.
		if g := resp.GetExitedAt().AsTime(); resp.GetExitedAt() != nil && !g.Before(p.sb.created) && !g.After(at) {
			at = g
		}
	}
	p.mu.Lock()
	running := p.state.Status == StatusRunning
	p.mu.Unlock()
	if running {
		select {
		case <-p.io.drained:
		case <-time.After(outputDrainTimeout):
			// Clients wait for the end of the output before they delete
			// the process (CRI does): give it to them.
			log.G(ctx).WithField("container", p.containerID).Warnf("output not drained %s after exit; closing it and reporting the exit", outputDrainTimeout)
			p.io.close()
		}
	}
	p.setExited(status, at)
}

// vmDied ends a process that no wait will end: one never started.
func (p *process) vmDied() {
	p.mu.Lock()
	waiting := p.waiting
	p.mu.Unlock()
	if !waiting {
		p.setExited(VMExitStatus, time.Now())
	}
}

// setExited records the exit, once, and reports it. It reports under p.mu
// and before Wait returns, so that the exit event goes out before any that
// a caller who saw the exit (State, Wait) causes, such as a delete's.
func (p *process) setExited(status uint32, at time.Time) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.state.Status == StatusStopped {
		return
	}
	p.state = ProcessState{Status: StatusStopped, ExitStatus: status, ExitedAt: at}
	p.sb.onExit(Exit{ContainerID: p.containerID, ExecID: p.execID, Pid: uint32(p.sb.Pid()), Status: status, ExitedAt: at})
	close(p.done)
}
