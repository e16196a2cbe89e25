package sandbox

import (
	"context"
	"encoding/json"
	"errors"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"github.com/containerd/ttrpc"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"google.golang.org/protobuf/types/known/emptypb"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/colo-runtime/colo/agentproto"
	"github.com/colo-runtime/colo/config"
	"github.com/colo-runtime/colo/hypervisor"
)

// fakeDriver starts "VMs" that are a real process (sleep) standing for the
// hypervisor, serving a fakeAgent over a unix socket in the VM dir.
type fakeDriver struct {
	agent    *fakeAgent
	startErr error
	// dialFailures is how many DialAgent calls fail first, as vsock does
	// while the guest is not listening.
	dialFailures int

	mu       sync.Mutex
	vms      []*fakeVM
	cleanups []string
	lastCfg  hypervisor.VMConfig
}

func newFakeDriver() *fakeDriver {
	return &fakeDriver{agent: newFakeAgent()}
}

func (d *fakeDriver) Start(ctx context.Context, cfg hypervisor.VMConfig) (hypervisor.VM, error) {
	d.mu.Lock()
	d.lastCfg = cfg
	d.mu.Unlock()
	if d.startErr != nil {
		return nil, d.startErr
	}
	cmd := exec.Command("sleep", "1000")
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	vm := &fakeVM{cmd: cmd, dir: cfg.Dir, done: make(chan struct{}), dialFailures: d.dialFailures}
	if err := os.WriteFile(filepath.Join(cfg.Dir, "pid"), []byte(strconv.Itoa(cmd.Process.Pid)), 0o600); err != nil {
		return nil, err
	}
	srv, err := ttrpc.NewServer()
	if err != nil {
		return nil, err
	}
	agentproto.RegisterAgentService(srv, d.agent)
	l, err := net.Listen("unix", filepath.Join(cfg.Dir, "agent.sock"))
	if err != nil {
		_ = cmd.Process.Kill()
		return nil, err
	}
	go func() { _ = srv.Serve(context.Background(), l) }()
	vm.srv = srv
	go func() {
		vm.err = cmd.Wait()
		// The hypervisor's death closes the agent channel.
		_ = srv.Close()
		close(vm.done)
	}()
	d.mu.Lock()
	d.vms = append(d.vms, vm)
	d.mu.Unlock()
	return vm, nil
}

func (d *fakeDriver) Cleanup(ctx context.Context, dir string) error {
	d.mu.Lock()
	d.cleanups = append(d.cleanups, dir)
	d.mu.Unlock()
	b, err := os.ReadFile(filepath.Join(dir, "pid"))
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	pid, _ := strconv.Atoi(string(b))
	_ = syscall.Kill(pid, syscall.SIGKILL)
	for _, vm := range d.vms {
		if vm.Pid() == pid {
			<-vm.done
		}
	}
	return os.RemoveAll(dir)
}

type fakeVM struct {
	cmd          *exec.Cmd
	dir          string
	srv          *ttrpc.Server
	done         chan struct{}
	err          error
	mu           sync.Mutex
	dialFailures int
}

func (v *fakeVM) Pid() int { return v.cmd.Process.Pid }

func (v *fakeVM) DialAgent(ctx context.Context) (net.Conn, error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.dialFailures > 0 {
		v.dialFailures--
		return nil, errors.New("connection reset by peer")
	}
	var d net.Dialer
	return d.DialContext(ctx, "unix", filepath.Join(v.dir, "agent.sock"))
}

func (v *fakeVM) Stop(ctx context.Context) error {
	_ = v.cmd.Process.Kill()
	<-v.done
	return nil
}

func (v *fakeVM) Done() <-chan struct{} { return v.done }
func (v *fakeVM) Err() error            { return v.err }

// fakeAgent runs pretend containers: a container's init writes its args to
// stdout and "err" to stderr and exits with the status in its
// "test.exit" annotation; with args[0] "cat" it echoes stdin to stdout until
// stdin is closed. A signal ends it with 128+signal.
type fakeAgent struct {
	agentproto.AgentService // the calls not faked panic

	protocolVersion uint32
	checkErrors     int // Checks answered with an error first
	checkHang       bool
	createErr       error

	mu         sync.Mutex
	storages   []*agentproto.Storage
	specs      map[string]*specs.Spec
	procs      map[string]*fakeProc
	removed    []string
	destroyed  bool
	checkCalls int
}

type fakeProc struct {
	mu       sync.Mutex
	cond     *sync.Cond
	stdout   []byte
	stderr   []byte
	stdin    []byte // everything written to stdin
	outEOF   bool
	exited   bool
	status   uint32
	echo     bool
	exitCode uint32
}

func newFakeAgent() *fakeAgent {
	return &fakeAgent{
		protocolVersion: agentproto.ProtocolVersion,
		specs:           make(map[string]*specs.Spec),
		procs:           make(map[string]*fakeProc),
	}
}

func (a *fakeAgent) proc(id string) (*fakeProc, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	p, ok := a.procs[id]
	if !ok {
		return nil, errgrpc.ToGRPC(errdefs.ErrNotFound.WithMessage("no container " + id))
	}
	return p, nil
}

func (a *fakeAgent) Check(ctx context.Context, _ *agentproto.CheckRequest) (*agentproto.CheckResponse, error) {
	a.mu.Lock()
	a.checkCalls++
	hang := a.checkHang
	fail := a.checkErrors > 0
	if fail {
		a.checkErrors--
	}
	a.mu.Unlock()
	if hang {
		<-ctx.Done()
		return nil, ctx.Err()
	}
	if fail {
		return nil, errgrpc.ToGRPC(errdefs.ErrUnavailable.WithMessage("still booting"))
	}
	return &agentproto.CheckResponse{AgentVersion: "fake", ProtocolVersion: a.protocolVersion, BootId: "boot"}, nil
}

func (a *fakeAgent) GetGuestDetails(ctx context.Context, _ *agentproto.GetGuestDetailsRequest) (*agentproto.GetGuestDetailsResponse, error) {
	return &agentproto.GetGuestDetailsResponse{KernelRelease: "fake", AgentVersion: "fake"}, nil
}

// GetOOMEvent never reports one: the fake guest has no OOM killer.
func (a *fakeAgent) GetOOMEvent(ctx context.Context, _ *agentproto.GetOOMEventRequest) (*agentproto.GetOOMEventResponse, error) {
	<-ctx.Done()
	return nil, ctx.Err()
}

func (a *fakeAgent) CreateSandbox(ctx context.Context, r *agentproto.CreateSandboxRequest) (*emptypb.Empty, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.storages = r.GetStorages()
	return &emptypb.Empty{}, nil
}

func (a *fakeAgent) DestroySandbox(ctx context.Context, r *agentproto.DestroySandboxRequest) (*emptypb.Empty, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.destroyed = true
	return &emptypb.Empty{}, nil
}

func (a *fakeAgent) CreateContainer(ctx context.Context, r *agentproto.CreateContainerRequest) (*emptypb.Empty, error) {
	if a.createErr != nil {
		return nil, errgrpc.ToGRPC(a.createErr)
	}
	var s specs.Spec
	if err := json.Unmarshal(r.GetOciSpec(), &s); err != nil {
		return nil, errgrpc.ToGRPC(errdefs.ErrInvalidArgument.WithMessage(err.Error()))
	}
	p := &fakeProc{echo: s.Process.Args[0] == "cat"}
	p.cond = sync.NewCond(&p.mu)
	if code, err := strconv.Atoi(s.Annotations["test.exit"]); err == nil {
		p.exitCode = uint32(code)
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	a.specs[r.GetContainerId()] = &s
	a.procs[r.GetContainerId()] = p
	return &emptypb.Empty{}, nil
}

func (a *fakeAgent) StartContainer(ctx context.Context, r *agentproto.StartContainerRequest) (*agentproto.StartContainerResponse, error) {
	p, err := a.proc(r.GetContainerId())
	if err != nil {
		return nil, err
	}
	a.mu.Lock()
	args := a.specs[r.GetContainerId()].Process.Args
	a.mu.Unlock()
	p.mu.Lock()
	defer p.mu.Unlock()
	if !p.echo {
		p.stdout = append(p.stdout, strings.Join(args, " ")+"\n"...)
		p.stderr = append(p.stderr, "err\n"...)
		p.exitLocked(p.exitCode)
	}
	p.cond.Broadcast()
	return &agentproto.StartContainerResponse{Pid: 1}, nil
}

func (p *fakeProc) exitLocked(status uint32) {
	if p.exited {
		return
	}
	p.exited, p.outEOF, p.status = true, true, status
	p.cond.Broadcast()
}

func (a *fakeAgent) SignalProcess(ctx context.Context, r *agentproto.SignalProcessRequest) (*emptypb.Empty, error) {
	p, err := a.proc(r.GetContainerId())
	if err != nil {
		return nil, err
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	p.exitLocked(128 + r.GetSignal())
	return &emptypb.Empty{}, nil
}

func (a *fakeAgent) WaitProcess(ctx context.Context, r *agentproto.WaitProcessRequest) (*agentproto.WaitProcessResponse, error) {
	p, err := a.proc(r.GetContainerId())
	if err != nil {
		return nil, err
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	for !p.exited {
		p.cond.Wait()
	}
	return &agentproto.WaitProcessResponse{ExitStatus: p.status, ExitedAt: timestamppb.Now()}, nil
}

func (a *fakeAgent) read(r *agentproto.ReadStreamRequest, stream func(*fakeProc) *[]byte) (*agentproto.ReadStreamResponse, error) {
	p, err := a.proc(r.GetContainerId())
	if err != nil {
		return nil, err
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	buf := stream(p)
	for len(*buf) == 0 && !p.outEOF {
		p.cond.Wait()
	}
	n := min(len(*buf), int(r.GetLen()))
	data := append([]byte(nil), (*buf)[:n]...)
	*buf = (*buf)[n:]
	return &agentproto.ReadStreamResponse{Data: data, Eof: n == 0 && p.outEOF}, nil
}

func (a *fakeAgent) ReadStdout(ctx context.Context, r *agentproto.ReadStreamRequest) (*agentproto.ReadStreamResponse, error) {
	return a.read(r, func(p *fakeProc) *[]byte { return &p.stdout })
}

func (a *fakeAgent) ReadStderr(ctx context.Context, r *agentproto.ReadStreamRequest) (*agentproto.ReadStreamResponse, error) {
	return a.read(r, func(p *fakeProc) *[]byte { return &p.stderr })
}

func (a *fakeAgent) WriteStdin(ctx context.Context, r *agentproto.WriteStreamRequest) (*agentproto.WriteStreamResponse, error) {
	p, err := a.proc(r.GetContainerId())
	if err != nil {
		return nil, err
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	p.stdout = append(p.stdout, r.GetData()...)
	p.stdin = append(p.stdin, r.GetData()...)
	p.cond.Broadcast()
	return &agentproto.WriteStreamResponse{Len: uint32(len(r.GetData()))}, nil
}

func (a *fakeAgent) CloseStdin(ctx context.Context, r *agentproto.CloseStdinRequest) (*emptypb.Empty, error) {
	p, err := a.proc(r.GetContainerId())
	if err != nil {
		return nil, err
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.echo {
		p.exitLocked(0)
	}
	return &emptypb.Empty{}, nil
}

func (a *fakeAgent) RemoveContainer(ctx context.Context, r *agentproto.RemoveContainerRequest) (*emptypb.Empty, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if p, ok := a.procs[r.GetContainerId()]; ok {
		p.mu.Lock()
		p.exitLocked(137)
		p.mu.Unlock()
	}
	delete(a.procs, r.GetContainerId())
	a.removed = append(a.removed, r.GetContainerId())
	return &emptypb.Empty{}, nil
}

func (a *fakeAgent) stdinSeen(id string) string {
	p, err := a.proc(id)
	if err != nil {
		return ""
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	return string(p.stdin)
}

func (a *fakeAgent) spec(id string) *specs.Spec {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.specs[id]
}

// testConfig is the default configuration with its state under dir.
func testConfig(dir, sharedFS string) config.Config {
	c := config.Default()
	c.Runtime.StateDir = dir
	c.Storage.SharedFS = sharedFS
	c.Agent.Channel = "serial"
	c.Hypervisor.BootTimeout = config.Duration(30 * time.Second)
	return c
}
