package sandbox

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"time"

	cgroupsv1 "github.com/containerd/cgroups/v3/cgroup1/stats"
	cgroupsv2 "github.com/containerd/cgroups/v3/cgroup2/stats"
	"github.com/containerd/typeurl/v2"

	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/colo-runtime/colo/agentproto"
)

// process finds the init process (execID "") or an exec.
func (c *Container) process(execID string) (*process, error) {
	if execID == "" {
		return c.init, nil
	}
	c.execMu.Lock()
	defer c.execMu.Unlock()
	p, ok := c.execs[execID]
	if !ok {
		return nil, errdefs.ErrNotFound.WithMessage(fmt.Sprintf("exec %s of container %s not found", execID, c.id))
	}
	if p == nil {
		return nil, errdefs.ErrFailedPrecondition.WithMessage(fmt.Sprintf("exec %s of container %s is still being created", execID, c.id))
	}
	return p, nil
}

// processes are the init process and the execs.
func (c *Container) processes() []*process {
	c.execMu.Lock()
	defer c.execMu.Unlock()
	ps := []*process{c.init}
	for _, p := range c.execs {
		if p != nil {
			ps = append(ps, p)
		}
	}
	return ps
}

// Exec registers an exec process; Start runs it in the guest.
func (c *Container) Exec(ctx context.Context, execID string, spec *specs.Process, stdio Stdio) (retErr error) {
	if err := checkName("exec id", execID); err != nil {
		return err
	}
	if err := stdio.Validate(); err != nil {
		return err
	}
	if spec == nil || len(spec.Args) == 0 {
		return errdefs.ErrInvalidArgument.WithMessage(fmt.Sprintf("exec %s: process.args is empty", execID))
	}
	if st := c.init.State(); st.Status == StatusStopped {
		return errdefs.ErrFailedPrecondition.WithMessage(fmt.Sprintf("container %s is stopped: cannot exec in it", c.id))
	}
	b, err := json.Marshal(spec)
	if err != nil {
		return fmt.Errorf("encode exec process: %w", err)
	}
	c.execMu.Lock()
	_, exists := c.execs[execID]
	if !exists {
		c.execs[execID] = nil // reserved while its fifos open
	}
	c.execMu.Unlock()
	if exists {
		return errdefs.ErrAlreadyExists.WithMessage(fmt.Sprintf("exec %s of container %s already exists", execID, c.id))
	}
	defer func() {
		if retErr != nil {
			c.execMu.Lock()
			delete(c.execs, execID)
			c.execMu.Unlock()
		}
	}()
	// A logging binary gets the exec id as CONTAINER_ID, as with runc.
	io, err := openPipes(ctx, stdio, owner{execID, c.sb.namespace})
	if err != nil {
		return err
	}
	c.execMu.Lock()
	c.execs[execID] = &process{
		sb:          c.sb,
		containerID: c.id,
		execID:      execID,
		io:          io,
		stdio:       stdio,
		spec:        b,
		state:       ProcessState{Status: StatusCreated},
		done:        make(chan struct{}),
	}
	c.execMu.Unlock()
	return nil
}

// DeleteExec forgets an exec process that has exited or never started.
func (c *Container) DeleteExec(ctx context.Context, execID string) (ProcessState, error) {
	p, err := c.process(execID)
	if err != nil {
		return ProcessState{}, err
	}
	p.mu.Lock()
	st, started := p.state, p.waiting
	p.mu.Unlock()
	if st.Status == StatusRunning {
		return st, errdefs.ErrFailedPrecondition.WithMessage(fmt.Sprintf("exec %s of container %s is still running", execID, c.id))
	}
	if started && c.sb.alive() {
		_, err := c.sb.agent.RemoveProcess(ctx, &agentproto.RemoveProcessRequest{ContainerId: c.id, ExecId: execID})
		if err != nil && !errdefs.IsNotFound(errgrpc.ToNative(err)) {
			return st, agentError("RemoveProcess", err)
		}
	}
	p.io.close()
	c.execMu.Lock()
	delete(c.execs, execID)
	c.execMu.Unlock()
	return st, nil
}

// Pause freezes every process of the container.
func (c *Container) Pause(ctx context.Context) error {
	if _, err := c.sb.agent.PauseContainer(ctx, &agentproto.PauseContainerRequest{ContainerId: c.id}); err != nil {
		return agentError("PauseContainer", err)
	}
	c.pausedMu.Lock()
	c.paused = true
	c.pausedMu.Unlock()
	return nil
}

// Resume thaws the container and sets the guest clock, which a long pause
// of the host side may have left behind.
func (c *Container) Resume(ctx context.Context) error {
	if _, err := c.sb.agent.ResumeContainer(ctx, &agentproto.ResumeContainerRequest{ContainerId: c.id}); err != nil {
		return agentError("ResumeContainer", err)
	}
	c.pausedMu.Lock()
	c.paused = false
	c.pausedMu.Unlock()
	if _, err := c.sb.agent.SetGuestTime(ctx, &agentproto.SetGuestTimeRequest{Time: timestamppb.New(time.Now())}); err != nil {
		return agentError("SetGuestTime", err)
	}
	return nil
}

func (c *Container) isPaused() bool {
	c.pausedMu.Lock()
	defer c.pausedMu.Unlock()
	return c.paused
}

// Stats reads the container's cgroup metrics in the guest.
func (c *Container) Stats(ctx context.Context) (*anypb.Any, error) {
	resp, err := c.sb.agent.StatsContainer(ctx, &agentproto.StatsContainerRequest{ContainerId: c.id})
	if err != nil {
		return nil, agentError("StatsContainer", err)
	}
	// Handed to containerd as they are, so only the types containerd
	// expects from a runtime get through, and they must decode.
	m := resp.GetMetrics()
	if m == nil || !slices.Contains(metricsTypes, m.MessageName()) {
		return nil, fmt.Errorf("agent StatsContainer: metrics of type %q from the guest: %w", clip(m.GetTypeUrl()), errdefs.ErrUnknown)
	}
	if _, err := typeurl.UnmarshalAny(m); err != nil {
		return nil, fmt.Errorf("agent StatsContainer: metrics from the guest do not decode: %w", errdefs.ErrUnknown)
	}
	return m, nil
}

// metricsTypes are containerd's cgroup metrics, by message name.
var metricsTypes = []protoreflect.FullName{
	proto.MessageName(&cgroupsv1.Metrics{}),
	proto.MessageName(&cgroupsv2.Metrics{}),
}

// Update applies new resource limits to the container's cgroup in the
// guest, and resizes the VM to the pod's new limits (resize.go).
func (c *Container) Update(ctx context.Context, r *specs.LinuxResources) error {
	b, err := json.Marshal(r)
	if err != nil {
		return fmt.Errorf("encode resources: %w", err)
	}
	return c.sb.updateLimits(ctx, c.id, resourceLimits(r), func() error {
		if _, err := c.sb.agent.UpdateContainer(ctx, &agentproto.UpdateContainerRequest{ContainerId: c.id, Resources: b}); err != nil {
			return agentError("UpdateContainer", err)
		}
		return nil
	})
}

// ResizePty sets the window size of the process's terminal.
func (c *Container) ResizePty(ctx context.Context, execID string, width, height uint32) error {
	if _, err := c.process(execID); err != nil {
		return err
	}
	_, err := c.sb.agent.TtyWinResize(ctx, &agentproto.TtyWinResizeRequest{ContainerId: c.id, ExecId: execID, Rows: height, Columns: width})
	if err != nil {
		return agentError("TtyWinResize", err)
	}
	return nil
}

// GuestProcess is a process of the container as the guest sees it.
type GuestProcess struct {
	Pid    uint32
	ExecID string
}

// Pids lists the container's processes with their guest pids.
func (c *Container) Pids(ctx context.Context) ([]GuestProcess, error) {
	resp, err := c.sb.agent.ListProcesses(ctx, &agentproto.ListProcessesRequest{ContainerId: c.id})
	if err != nil {
		return nil, agentError("ListProcesses", err)
	}
	var out []GuestProcess
	for _, p := range resp.GetProcesses() {
		// Only an exec id the container has goes to containerd.
		exec := p.GetExecId()
		if exec != "" {
			if _, err := c.process(exec); err != nil {
				exec = ""
			}
		}
		out = append(out, GuestProcess{Pid: p.GetPid(), ExecID: exec})
	}
	return out, nil
}
