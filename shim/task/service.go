// Package task is the containerd task service (task API v3 over ttrpc) of
// the colo shim. It maps tasks onto sandboxes: the tasks of one pod (CRI
// annotation io.kubernetes.cri.sandbox-id) share the pod's sandbox (VM);
// any other task gets a sandbox of its own.
//
// containerd is told the hypervisor's pid as the pid of every process, as
// Kata does: guest pids mean nothing on the host.
package task

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path"
	"sync"
	"time"

	eventstypes "github.com/containerd/containerd/api/events"
	sandboxAPI "github.com/containerd/containerd/api/runtime/sandbox/v1"
	taskAPI "github.com/containerd/containerd/api/runtime/task/v3"
	"github.com/containerd/containerd/api/types/runc/options"
	"github.com/containerd/containerd/api/types/task"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/runtime"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/containerd/v2/pkg/protobuf"
	"github.com/containerd/containerd/v2/pkg/shim"
	"github.com/containerd/containerd/v2/pkg/shutdown"
	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"github.com/containerd/log"
	"github.com/containerd/ttrpc"
	"github.com/containerd/typeurl/v2"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/emptypb"

	"github.com/colo-runtime/colo/shim/sandbox"
)

var _ shim.TTRPCService = (*service)(nil)

// NewTaskService returns the task service. Events go out through
// publisher; sd ends the shim. newDriver makes the hypervisor driver a
// configuration names (hypervisor/driver.New).
func NewTaskService(ctx context.Context, publisher shim.Publisher, sd shutdown.Service, newDriver sandbox.NewDriver) (taskAPI.TTRPCTaskService, error) {
	ns, err := namespaces.NamespaceRequired(ctx)
	if err != nil {
		return nil, err
	}
	s := &service{
		ctx:        ctx,
		namespace:  ns,
		newDriver:  newDriver,
		shutdown:   sd,
		events:     make(chan any, 128),
		stopEvents: make(chan struct{}),
		flushed:    make(chan struct{}),
		containers: make(map[string]*entry),
		sandboxes:  make(map[string]*sandbox.Sandbox),
		pods:       make(map[string]*podSandbox),
		metrics:    sandbox.NewShimMetrics(),
	}
	go s.forward(publisher)
	// The shim may be told to go (SIGTERM, or Shutdown) with sandboxes
	// still up: nothing may outlive it. The events that teardown and the
	// last Delete queued go out before the shim exits: pkg/shim exits as
	// soon as its callbacks return, and a /tasks/delete still in flight
	// was lost now and then.
	sd.RegisterCallback(func(ctx context.Context) error {
		err := s.destroyAll(ctx)
		close(s.stopEvents)
		ctx, cancel := context.WithTimeout(ctx, flushTimeout)
		defer cancel()
		select {
		case <-s.flushed:
		case <-ctx.Done():
			log.G(ctx).Warn("shim exiting with events not yet published")
		}
		return err
	})
	return s, nil
}

type service struct {
	ctx       context.Context
	namespace string
	newDriver sandbox.NewDriver
	shutdown  shutdown.Service
	events    chan any
	// stopEvents tells forward to publish what is queued and return;
	// flushed closes when it has.
	stopEvents chan struct{}
	flushed    chan struct{}

	mu         sync.Mutex
	containers map[string]*entry
	// sandboxes are the running sandboxes by pod (CRI sandbox id), for
	// the pod's later containers.
	sandboxes map[string]*sandbox.Sandbox
	// pods are the sandboxes of the sandbox API (sandbox.go), by id,
	// from CreateSandbox on.
	pods map[string]*podSandbox

	trim trimmer
	// metrics are the shim's own, served on its sandboxes' management
	// sockets.
	metrics *sandbox.ShimMetrics
}

// UnaryServerInterceptor times containerd's calls for the shim's metrics
// (the shim's ttrpc server chains it: pkg/shim's TTRPCServerUnaryOptioner).
func (s *service) UnaryServerInterceptor() ttrpc.UnaryServerInterceptor {
	return func(ctx context.Context, u ttrpc.Unmarshaler, info *ttrpc.UnaryServerInfo, m ttrpc.Method) (any, error) {
		start := time.Now()
		resp, err := m(ctx, u)
		s.metrics.ObserveRPC(path.Base(info.FullMethod), time.Since(start))
		return resp, err
	}
}

// entry is a task: a container and the sandbox it runs in. c is nil while
// the task is being created.
type entry struct {
	sb *sandbox.Sandbox
	c  *sandbox.Container
}

// RegisterTTRPC serves the task API and the sandbox API (sandbox.go) on
// the shim's server: containerd drives a pod's sandbox and its containers'
// tasks over the same connection, and both act on the same sandboxes.
func (s *service) RegisterTTRPC(server *ttrpc.Server) error {
	taskAPI.RegisterTTRPCTaskService(server, s)
	sandboxAPI.RegisterTTRPCSandboxService(server, &sandboxService{s: s})
	return nil
}

func (s *service) get(id string) (*entry, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	e, ok := s.containers[id]
	if !ok || e.c == nil {
		return nil, errgrpc.ToGRPC(errdefs.ErrNotFound.WithMessage(fmt.Sprintf("task %s not found", id)))
	}
	return e, nil
}

func notImplemented(what string) error {
	return errgrpc.ToGRPC(errdefs.ErrNotImplemented.WithMessage(what + " is not supported by colo yet"))
}

// notUnimplemented turns a create's "not implemented" into "failed
// precondition", message kept: containerd takes Unimplemented from Create
// for a shim of an older task API, retries with that API, and then cannot
// delete the task, so the shim was left running.
func notUnimplemented(err error) error {
	if st, ok := status.FromError(err); ok && st.Code() == codes.Unimplemented {
		return status.Error(codes.FailedPrecondition, st.Message())
	}
	return err
}

// Create makes a sandbox for the task and creates the container in it.
func (s *service) Create(ctx context.Context, r *taskAPI.CreateTaskRequest) (_ *taskAPI.CreateTaskResponse, retErr error) {
	ctx = log.WithLogger(ctx, log.G(ctx).WithField("id", r.ID))
	if r.Checkpoint != "" || r.ParentCheckpoint != "" {
		return nil, notUnimplemented(notImplemented("restoring from a checkpoint"))
	}
	s.mu.Lock()
	if _, ok := s.containers[r.ID]; ok {
		s.mu.Unlock()
		return nil, errgrpc.ToGRPC(errdefs.ErrAlreadyExists.WithMessage(fmt.Sprintf("task %s already exists", r.ID)))
	}
	s.containers[r.ID] = &entry{} // reserved while creating
	s.mu.Unlock()
	defer func() {
		if retErr != nil {
			s.mu.Lock()
			delete(s.containers, r.ID)
			s.mu.Unlock()
			log.G(ctx).WithError(retErr).Error("create task")
			retErr = notUnimplemented(retErr)
		}
	}()

	cfg, err := sandbox.LoadConfig(r.Options)
	if err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	spec, err := sandbox.ReadSpec(r.Bundle)
	if err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	stdio := sandbox.Stdio{Stdin: r.Stdin, Stdout: r.Stdout, Stderr: r.Stderr, Terminal: r.Terminal}
	// Fail on what colo cannot run before a driver is even made.
	if err := sandbox.ValidateSpec(spec); err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	if err := stdio.Validate(); err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	ccfg := sandbox.ContainerConfig{
		ID:     r.ID,
		Bundle: r.Bundle,
		Spec:   spec,
		Rootfs: mount.FromProto(r.Rootfs),
		Stdio:  stdio,
	}
	pod := sandbox.PodID(spec)
	s.mu.Lock()
	sb := s.sandboxes[pod]
	_, isPod := s.pods[pod]
	s.mu.Unlock()
	if sb == nil && isPod {
		// The sandbox API's: its VM is not up, or no more.
		return nil, errgrpc.ToGRPC(errdefs.ErrFailedPrecondition.WithMessage(fmt.Sprintf("sandbox %s of task %s is not running", pod, r.ID)))
	}
	var c *sandbox.Container
	if sb != nil {
		// A later container of a pod whose VM this shim runs.
		if c, err = sb.AddContainer(ctx, ccfg); err != nil {
			return nil, errgrpc.ToGRPC(err)
		}
	} else {
		drv, err := s.newDriver(cfg.Hypervisor)
		if err != nil {
			return nil, errgrpc.ToGRPC(fmt.Errorf("hypervisor %q: %w", cfg.Hypervisor.Type, err))
		}
		sb, c, err = sandbox.Create(ctx, sandbox.Options{
			ID:        r.ID,
			Namespace: s.namespace,
			Config:    cfg,
			Driver:    drv,
			OnExit:    s.exited,
			OnOOM:     s.oom,

			ShimMetrics: s.metrics,
		}, ccfg)
		if err != nil {
			return nil, errgrpc.ToGRPC(err)
		}
		if pod != "" {
			s.mu.Lock()
			s.sandboxes[pod] = sb
			s.mu.Unlock()
		}
	}
	s.mu.Lock()
	s.containers[r.ID] = &entry{sb: sb, c: c}
	s.mu.Unlock()

	pid := uint32(sb.Pid())
	s.send(&eventstypes.TaskCreate{
		ContainerID: r.ID,
		Bundle:      r.Bundle,
		Rootfs:      r.Rootfs,
		IO: &eventstypes.TaskIO{
			Stdin:    r.Stdin,
			Stdout:   r.Stdout,
			Stderr:   r.Stderr,
			Terminal: r.Terminal,
		},
		Checkpoint: r.Checkpoint,
		Pid:        pid,
	})
	s.trim.soon(s.ctx)
	return &taskAPI.CreateTaskResponse{Pid: pid}, nil
}

// Start starts the task's init process or one of its execs.
func (s *service) Start(ctx context.Context, r *taskAPI.StartRequest) (*taskAPI.StartResponse, error) {
	e, err := s.get(r.ID)
	if err != nil {
		return nil, err
	}
	ctx = log.WithLogger(ctx, log.G(ctx).WithFields(log.Fields{"id": r.ID, "exec": r.ExecID}))
	pid := uint32(e.sb.Pid())
	// The event is queued before the process's exit can be: no lock
	// across tasks, so that many starts (execs) run at once.
	err = e.c.Start(ctx, r.ExecID, func() {
		if r.ExecID != "" {
			s.send(&eventstypes.TaskExecStarted{ContainerID: r.ID, ExecID: r.ExecID, Pid: pid})
		} else {
			s.send(&eventstypes.TaskStart{ContainerID: r.ID, Pid: pid})
		}
	})
	if err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	return &taskAPI.StartResponse{Pid: pid}, nil
}

// oom publishes a container's OOM kill.
func (s *service) oom(id string) {
	s.send(&eventstypes.TaskOOM{ContainerID: id})
}

// exited publishes a process exit; the sandbox calls it once the output is
// copied out.
func (s *service) exited(x sandbox.Exit) {
	id := x.ExecID
	if id == "" {
		id = x.ContainerID
	}
	s.send(&eventstypes.TaskExit{
		ContainerID: x.ContainerID,
		ID:          id,
		Pid:         x.Pid,
		ExitStatus:  x.Status,
		ExitedAt:    protobuf.ToTimestamp(x.ExitedAt),
	})
}

// Delete removes an exec, or the task; the last task takes its sandbox
// down.
func (s *service) Delete(ctx context.Context, r *taskAPI.DeleteRequest) (*taskAPI.DeleteResponse, error) {
	e, err := s.get(r.ID)
	if err != nil {
		return nil, err
	}
	if r.ExecID != "" {
		st, err := e.c.DeleteExec(ctx, r.ExecID)
		if err != nil {
			return nil, errgrpc.ToGRPC(err)
		}
		return &taskAPI.DeleteResponse{
			Pid:        uint32(e.sb.Pid()),
			ExitStatus: st.ExitStatus,
			ExitedAt:   protobuf.ToTimestamp(st.ExitedAt),
		}, nil
	}
	st, err := e.sb.DeleteContainer(log.WithLogger(ctx, log.G(ctx).WithField("id", r.ID)), r.ID)
	if err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	s.mu.Lock()
	delete(s.containers, r.ID)
	s.forgetSandboxLocked(e.sb)
	s.mu.Unlock()
	pid := uint32(e.sb.Pid())
	s.send(&eventstypes.TaskDelete{
		ContainerID: r.ID,
		Pid:         pid,
		ExitStatus:  st.ExitStatus,
		ExitedAt:    protobuf.ToTimestamp(st.ExitedAt),
	})
	return &taskAPI.DeleteResponse{
		Pid:        pid,
		ExitStatus: st.ExitStatus,
		ExitedAt:   protobuf.ToTimestamp(st.ExitedAt),
	}, nil
}

// forgetSandboxLocked drops a pod's sandbox once none of its containers
// is left (the last delete took it down). A sandbox of the sandbox API
// stays until ShutdownSandbox.
func (s *service) forgetSandboxLocked(sb *sandbox.Sandbox) {
	for _, e := range s.containers {
		if e.sb == sb {
			return
		}
	}
	for pod, v := range s.sandboxes {
		if _, ok := s.pods[pod]; v == sb && !ok {
			delete(s.sandboxes, pod)
		}
	}
}

// State reports the task's init process or one of its execs.
func (s *service) State(ctx context.Context, r *taskAPI.StateRequest) (*taskAPI.StateResponse, error) {
	e, err := s.get(r.ID)
	if err != nil {
		return nil, err
	}
	st, err := e.c.State(r.ExecID)
	if err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	status := task.Status_UNKNOWN
	switch st.Status {
	case sandbox.StatusCreated:
		status = task.Status_CREATED
	case sandbox.StatusRunning:
		status = task.Status_RUNNING
	case sandbox.StatusPaused:
		status = task.Status_PAUSED
	case sandbox.StatusStopped:
		status = task.Status_STOPPED
	}
	stdio, err := e.c.ProcessStdio(r.ExecID)
	if err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	resp := &taskAPI.StateResponse{
		ID:         r.ID,
		ExecID:     r.ExecID,
		Bundle:     e.c.Bundle(),
		Pid:        uint32(e.sb.Pid()),
		Status:     status,
		Stdin:      stdio.Stdin,
		Stdout:     stdio.Stdout,
		Stderr:     stdio.Stderr,
		Terminal:   stdio.Terminal,
		ExitStatus: st.ExitStatus,
	}
	if st.Status == sandbox.StatusStopped {
		resp.ExitedAt = protobuf.ToTimestamp(st.ExitedAt)
	}
	return resp, nil
}

// Kill signals the task's init process or an exec (or all its processes).
func (s *service) Kill(ctx context.Context, r *taskAPI.KillRequest) (*emptypb.Empty, error) {
	e, err := s.get(r.ID)
	if err != nil {
		return nil, err
	}
	if err := e.c.Kill(ctx, r.ExecID, r.Signal, r.All); err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	return &emptypb.Empty{}, nil
}

// Wait blocks until the task's init process or an exec has exited.
func (s *service) Wait(ctx context.Context, r *taskAPI.WaitRequest) (*taskAPI.WaitResponse, error) {
	e, err := s.get(r.ID)
	if err != nil {
		return nil, err
	}
	st, err := e.c.Wait(ctx, r.ExecID)
	if err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	return &taskAPI.WaitResponse{
		ExitStatus: st.ExitStatus,
		ExitedAt:   protobuf.ToTimestamp(st.ExitedAt),
	}, nil
}

// CloseIO closes the stdin of the init process or an exec.
func (s *service) CloseIO(ctx context.Context, r *taskAPI.CloseIORequest) (*emptypb.Empty, error) {
	e, err := s.get(r.ID)
	if err != nil {
		return nil, err
	}
	if r.Stdin {
		if err := e.c.CloseStdin(ctx, r.ExecID); err != nil {
			return nil, errgrpc.ToGRPC(err)
		}
	}
	return &emptypb.Empty{}, nil
}

// Pids lists the container's processes with their pids in the guest, as
// `ctr task ps` shows them.
func (s *service) Pids(ctx context.Context, r *taskAPI.PidsRequest) (*taskAPI.PidsResponse, error) {
	e, err := s.get(r.ID)
	if err != nil {
		return nil, err
	}
	ps, err := e.c.Pids(ctx)
	if err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	resp := &taskAPI.PidsResponse{}
	for _, p := range ps {
		info := &task.ProcessInfo{Pid: p.Pid}
		if p.ExecID != "" {
			// As the runc shim tells which exec a pid is.
			if info.Info, err = typeurl.MarshalAnyToProto(&options.ProcessDetails{ExecID: p.ExecID}); err != nil {
				return nil, errgrpc.ToGRPC(fmt.Errorf("process %d: %w", p.Pid, err))
			}
		}
		resp.Processes = append(resp.Processes, info)
	}
	return resp, nil
}

// Connect tells containerd the shim's and the task's pids.
func (s *service) Connect(ctx context.Context, r *taskAPI.ConnectRequest) (*taskAPI.ConnectResponse, error) {
	var pid uint32
	if e, err := s.get(r.ID); err == nil {
		pid = uint32(e.sb.Pid())
	}
	return &taskAPI.ConnectResponse{ShimPid: uint32(os.Getpid()), TaskPid: pid}, nil
}

// Shutdown ends the shim once it has no tasks left, nor a sandbox of the
// sandbox API that ShutdownSandbox has not ended.
func (s *service) Shutdown(ctx context.Context, r *taskAPI.ShutdownRequest) (*emptypb.Empty, error) {
	s.exitIfIdle(ctx)
	return &emptypb.Empty{}, nil
}

// exitIfIdle ends the shim if it has no tasks and no sandbox of the
// sandbox API that is not shut down.
func (s *service) exitIfIdle(ctx context.Context) {
	s.mu.Lock()
	n := len(s.containers)
	for _, p := range s.pods {
		p.mu.Lock()
		if !p.shutdown {
			n++
		}
		p.mu.Unlock()
	}
	s.mu.Unlock()
	if n > 0 {
		return
	}
	log.G(ctx).Debug("nothing left: shim exiting")
	s.shutdown.Shutdown()
}

// Exec registers an exec process of the task; Start runs it.
func (s *service) Exec(ctx context.Context, r *taskAPI.ExecProcessRequest) (*emptypb.Empty, error) {
	e, err := s.get(r.ID)
	if err != nil {
		return nil, err
	}
	var spec specs.Process
	if err := json.Unmarshal(r.Spec.GetValue(), &spec); err != nil {
		return nil, errgrpc.ToGRPC(errdefs.ErrInvalidArgument.WithMessage(fmt.Sprintf("exec %s: process spec: %v", r.ExecID, err)))
	}
	stdio := sandbox.Stdio{Stdin: r.Stdin, Stdout: r.Stdout, Stderr: r.Stderr, Terminal: r.Terminal}
	if err := e.c.Exec(ctx, r.ExecID, &spec, stdio); err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	s.send(&eventstypes.TaskExecAdded{ContainerID: r.ID, ExecID: r.ExecID})
	return &emptypb.Empty{}, nil
}

// ResizePty resizes the terminal of the init process or an exec.
func (s *service) ResizePty(ctx context.Context, r *taskAPI.ResizePtyRequest) (*emptypb.Empty, error) {
	e, err := s.get(r.ID)
	if err != nil {
		return nil, err
	}
	if err := e.c.ResizePty(ctx, r.ExecID, r.Width, r.Height); err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	return &emptypb.Empty{}, nil
}

// Pause freezes the task's processes in the guest.
func (s *service) Pause(ctx context.Context, r *taskAPI.PauseRequest) (*emptypb.Empty, error) {
	e, err := s.get(r.ID)
	if err != nil {
		return nil, err
	}
	if err := e.c.Pause(ctx); err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	s.send(&eventstypes.TaskPaused{ContainerID: r.ID})
	return &emptypb.Empty{}, nil
}

// Resume thaws the task's processes.
func (s *service) Resume(ctx context.Context, r *taskAPI.ResumeRequest) (*emptypb.Empty, error) {
	e, err := s.get(r.ID)
	if err != nil {
		return nil, err
	}
	if err := e.c.Resume(ctx); err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	s.send(&eventstypes.TaskResumed{ContainerID: r.ID})
	return &emptypb.Empty{}, nil
}

// Stats returns the container's cgroup metrics from the guest, in
// containerd's cgroup v2 (or v1) metrics types.
func (s *service) Stats(ctx context.Context, r *taskAPI.StatsRequest) (*taskAPI.StatsResponse, error) {
	e, err := s.get(r.ID)
	if err != nil {
		return nil, err
	}
	m, err := e.c.Stats(ctx)
	if err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	return &taskAPI.StatsResponse{Stats: m}, nil
}

// Update applies new resource limits to the container's cgroup in the
// guest, and resizes the VM to the pod's new limits (sandbox.Container.Update).
func (s *service) Update(ctx context.Context, r *taskAPI.UpdateTaskRequest) (*emptypb.Empty, error) {
	e, err := s.get(r.ID)
	if err != nil {
		return nil, err
	}
	v, err := typeurl.UnmarshalAny(r.Resources)
	if err != nil {
		return nil, errgrpc.ToGRPC(errdefs.ErrInvalidArgument.WithMessage(fmt.Sprintf("update %s: resources: %v", r.ID, err)))
	}
	res, ok := v.(*specs.LinuxResources)
	if !ok {
		return nil, errgrpc.ToGRPC(errdefs.ErrInvalidArgument.WithMessage(fmt.Sprintf("update %s: resources of type %T, want Linux resources", r.ID, v)))
	}
	if err := e.c.Update(ctx, res); err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	return &emptypb.Empty{}, nil
}

// Checkpoint is not supported: a VM's container cannot be handed to CRIU
// on the host.
func (s *service) Checkpoint(ctx context.Context, r *taskAPI.CheckpointTaskRequest) (*emptypb.Empty, error) {
	return nil, errgrpc.ToGRPC(errdefs.ErrNotImplemented.WithMessage("checkpoint is not supported by colo"))
}

// destroyTimeout bounds destroyAll, so a shim told to go is gone within
// seconds (pkg/shim would wait 30s for its shutdown callbacks).
const destroyTimeout = 4 * time.Second

// destroyAll shuts down every sandbox still up; it runs as the shim exits.
func (s *service) destroyAll(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, destroyTimeout)
	defer cancel()
	s.mu.Lock()
	seen := make(map[*sandbox.Sandbox]bool)
	var sbs []*sandbox.Sandbox
	for _, e := range s.containers {
		if e.sb != nil && !seen[e.sb] {
			seen[e.sb] = true
			sbs = append(sbs, e.sb)
		}
	}
	// The sandbox API's, with no container left too, are stopped as
	// StopSandbox would.
	var pods []*podSandbox
	for _, p := range s.pods {
		pods = append(pods, p)
	}
	s.mu.Unlock()
	var errs []error
	for _, p := range pods {
		p.mu.Lock()
		sb := p.sb
		p.mu.Unlock()
		if sb != nil && sb.Running() {
			log.G(ctx).WithField("sandbox", sb.Dir()).Warn("shim exiting with a sandbox up: stopping it")
		}
		if err := p.stop(ctx); err != nil {
			errs = append(errs, err)
		}
		delete(seen, sb)
	}
	for _, sb := range sbs {
		if _, ok := seen[sb]; !ok {
			continue // a pod's, stopped above
		}
		log.G(ctx).WithField("sandbox", sb.Dir()).Warn("shim exiting with a sandbox up: destroying it")
		if err := sb.Shutdown(ctx); err != nil {
			errs = append(errs, err)
		}
	}
	if len(errs) > 0 {
		return fmt.Errorf("destroy sandboxes: %v", errs)
	}
	return nil
}

// flushTimeout bounds the wait for the last events: a containerd that
// does not take them must not keep the shim.
const flushTimeout = 3 * time.Second

func (s *service) send(evt any) {
	select {
	case s.events <- evt:
	case <-s.stopEvents:
	}
}

// forward publishes events in order; once told to stop it flushes what is
// queued.
func (s *service) forward(publisher shim.Publisher) {
	ctx := namespaces.WithNamespace(context.Background(), s.namespace)
	defer close(s.flushed)
	defer publisher.Close()
	publish := func(e any) {
		if err := publisher.Publish(ctx, runtime.GetTopic(e), e); err != nil {
			log.G(ctx).WithError(err).Error("post event")
		}
	}
	for {
		select {
		case e := <-s.events:
			publish(e)
		case <-s.stopEvents:
			for {
				select {
				case e := <-s.events:
					publish(e)
				default:
					return
				}
			}
		}
	}
}
