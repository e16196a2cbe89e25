package sandbox

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	cgroupsv2 "github.com/containerd/cgroups/v3/cgroup2/stats"

	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"github.com/containerd/ttrpc"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/emptypb"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/colo-runtime/colo/agentproto"
	"github.com/colo-runtime/colo/config"
	"github.com/colo-runtime/colo/hypervisor"
	"github.com/colo-runtime/colo/internal/procfs"
)

// fakeDriver starts "VMs" that are a real process (sleep) standing for the
// hypervisor, serving a fakeAgent over a unix socket in the VM dir.
type fakeDriver struct {
	agent    *fakeAgent
	startErr error
	// dialFailures is how many DialAgent calls fail first, as vsock does
	// while the guest is not listening.
	dialFailures int
	// launch, if set, starts the hypervisor process instead of sleep.
	launch func(hypervisor.VMConfig) (*exec.Cmd, error)
	// addDiskErr fails the VMs' AddDisk.
	addDiskErr error

	mu       sync.Mutex
	vms      []*fakeVM
	cleanups []string
	recorded []procfs.Proc // the VMs Cleanup was given
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
	var err error
	if d.launch != nil {
		cmd, err = d.launch(cfg)
	} else {
		err = cmd.Start()
	}
	if err != nil {
		return nil, err
	}
	vm := &fakeVM{cmd: cmd, dir: cfg.Dir, done: make(chan struct{}), dialFailures: d.dialFailures, size: hypervisor.Size{VCPUs: cfg.VCPUs, MemoryMB: cfg.MemoryMB}, addDiskErr: d.addDiskErr}
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

// Cleanup is the driver's CleanupVM: the fake VM is found by the pid
// file its Start wrote.
func (d *fakeDriver) Cleanup(ctx context.Context, name, dir string, vm procfs.Proc) error {
	if name != "qemu" {
		return fmt.Errorf("hypervisor %q", name)
	}
	d.mu.Lock()
	d.cleanups = append(d.cleanups, dir)
	d.recorded = append(d.recorded, vm)
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
	for _, v := range d.vms {
		if v.Pid() == pid {
			<-v.done
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
	// size is what SetVCPUs and SetMemory made it; resizes lists them
	// ("vcpus 4", "memory 1024").
	size    hypervisor.Size
	resizes []string
	// disks are those attached; diskCalls lists AddDisk's and
	// RemoveDisk's work; addDiskErr fails AddDisk.
	disks      map[string]hypervisor.Disk
	diskCalls  []string
	addDiskErr error
}

func (v *fakeVM) Pid() int { return v.cmd.Process.Pid }

func (v *fakeVM) SetVCPUs(_ context.Context, n int) error {
	v.mu.Lock()
	defer v.mu.Unlock()
	if n != v.size.VCPUs {
		v.resizes = append(v.resizes, fmt.Sprintf("vcpus %d", n))
	}
	v.size.VCPUs = n
	return nil
}

func (v *fakeVM) SetMemory(_ context.Context, mb int) error {
	v.mu.Lock()
	defer v.mu.Unlock()
	if mb != v.size.MemoryMB {
		v.resizes = append(v.resizes, fmt.Sprintf("memory %d", mb))
	}
	v.size.MemoryMB = mb
	return nil
}

func (v *fakeVM) DialConsole(context.Context) (net.Conn, error) {
	return nil, hypervisor.ErrNoConsole
}

func (v *fakeVM) DialPortForward(context.Context) (net.Conn, error) {
	return nil, errors.New("fake VM: no port-forward channel")
}

// AddDisk plugs a disk at a PCI path of its own ("0N.0/00.0"), or fails
// with addDiskErr; the disk's file must be open.
func (v *fakeVM) AddDisk(_ context.Context, d hypervisor.Disk) (hypervisor.GuestDevice, error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.addDiskErr != nil {
		return hypervisor.GuestDevice{}, v.addDiskErr
	}
	if _, err := d.File.Stat(); err != nil {
		return hypervisor.GuestDevice{}, fmt.Errorf("fake VM: disk %s: %w", d.ID, err)
	}
	if v.disks == nil {
		v.disks = make(map[string]hypervisor.Disk)
	}
	if _, ok := v.disks[d.ID]; ok {
		return hypervisor.GuestDevice{}, fmt.Errorf("fake VM: disk %s exists", d.ID)
	}
	v.disks[d.ID] = d
	v.diskCalls = append(v.diskCalls, fmt.Sprintf("add %s %s ro=%v", d.ID, d.Bus, d.ReadOnly))
	dev := hypervisor.GuestDevice{PCIPath: fmt.Sprintf("%02x.0/00.0", len(v.diskCalls))}
	if d.Bus == hypervisor.DiskVirtioSCSI {
		dev.SCSIAddress = "0:1"
	}
	return dev, nil
}

func (v *fakeVM) RemoveDisk(_ context.Context, id string) error {
	v.mu.Lock()
	defer v.mu.Unlock()
	if _, ok := v.disks[id]; !ok {
		return fmt.Errorf("fake VM: no disk %s", id)
	}
	delete(v.disks, id)
	v.diskCalls = append(v.diskCalls, "remove "+id)
	return nil
}

// diskLog is what AddDisk and RemoveDisk did, in order.
func (v *fakeVM) diskLog() []string {
	v.mu.Lock()
	defer v.mu.Unlock()
	return slices.Clone(v.diskCalls)
}

func (v *fakeVM) AddPCIDevice(context.Context, hypervisor.PCIDevice) (hypervisor.GuestDevice, error) {
	return hypervisor.GuestDevice{}, errors.New("fake VM: no PCI devices")
}

func (v *fakeVM) RemovePCIDevice(context.Context, string) error {
	return errors.New("fake VM: no PCI devices")
}

func (v *fakeVM) GuestDevice(context.Context, string) (hypervisor.GuestDevice, error) {
	return hypervisor.GuestDevice{}, errors.New("fake VM: no devices")
}

func (v *fakeVM) Panicked() <-chan struct{} { return nil }

func (v *fakeVM) Dump(context.Context, string) error { return errors.New("fake VM: no dump") }

func (v *fakeVM) Size(context.Context) (hypervisor.Size, error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.size, nil
}

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

func (v *fakeVM) AddNIC(context.Context, hypervisor.NIC) error {
	return errors.New("fake VM: no hot-plug")
}

func (v *fakeVM) VCPUThreads(context.Context) ([]int, error) {
	return []int{v.cmd.Process.Pid}, nil
}

func (v *fakeVM) Done() <-chan struct{} { return v.done }
func (v *fakeVM) Err() error            { return v.err }
func (v *fakeVM) Console() []string     { return []string{"fake console"} }

// fakeAgent runs pretend containers: a container's init writes its args to
// stdout and "err" to stderr and exits with the status in its
// "test.exit" annotation; with args[0] "cat" it echoes stdin to stdout until
// stdin is closed. Exec processes do the same, with their exit status in
// the TEST_EXIT environment variable; an exec of "/no/such/binary" fails
// to start. A signal ends a process with 128+signal.
type fakeAgent struct {
	agentproto.AgentService // the calls not faked panic

	protocolVersion uint32
	checkErrors     int // Checks answered with an error first
	checkHang       bool
	createErr       error
	// execBarrier, if set, holds every ExecProcess until that many are
	// in flight at once.
	execBarrier *barrier
	oomEvents   chan string

	mu         sync.Mutex
	sandboxReq *agentproto.CreateSandboxRequest
	storages   []*agentproto.Storage
	hostTime   time.Time
	specs      map[string]*specs.Spec
	procs      map[procKey]*fakeProc
	removed    []string
	destroyed  bool
	checkCalls int
	calls      []string // the calls that change a container, in order
	onlines    []*agentproto.OnlineCPUMemRequest
	resources  map[string]string
	times      []time.Time // SetGuestTime
	winSizes   map[procKey][2]uint32
	streams    map[procKey]string // the stdio a process was asked for
	// containerStorages are each CreateContainer's storages.
	containerStorages map[string][]*agentproto.Storage
}

type procKey struct{ container, exec string }

type fakeProc struct {
	mu       sync.Mutex
	cond     *sync.Cond
	args     []string
	stdout   []byte
	stderr   []byte
	stdin    []byte // everything written to stdin
	outEOF   bool
	exited   bool
	status   uint32
	echo     bool
	exitCode uint32
}

func newFakeProc(args []string, exitCode uint32) *fakeProc {
	p := &fakeProc{args: args, echo: args[0] == "cat", exitCode: exitCode}
	p.cond = sync.NewCond(&p.mu)
	return p
}

// run starts the process: unless it echoes stdin, it writes its output and
// exits.
func (p *fakeProc) run() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if !p.echo {
		p.stdout = append(p.stdout, strings.Join(p.args, " ")+"\n"...)
		p.stderr = append(p.stderr, "err\n"...)
		p.exitLocked(p.exitCode)
	}
	p.cond.Broadcast()
}

// barrier lets n callers through together.
type barrier struct {
	mu      sync.Mutex
	n       int
	arrived int
	all     chan struct{}
}

func newBarrier(n int) *barrier { return &barrier{n: n, all: make(chan struct{})} }

func (b *barrier) wait(ctx context.Context) error {
	b.mu.Lock()
	b.arrived++
	if b.arrived == b.n {
		close(b.all)
	}
	b.mu.Unlock()
	select {
	case <-b.all:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func newFakeAgent() *fakeAgent {
	return &fakeAgent{
		protocolVersion: agentproto.ProtocolVersion,
		specs:           make(map[string]*specs.Spec),
		procs:           make(map[procKey]*fakeProc),
		resources:       make(map[string]string),
		winSizes:        make(map[procKey][2]uint32),
		streams:         make(map[procKey]string),
		oomEvents:       make(chan string, 1),

		containerStorages: make(map[string][]*agentproto.Storage),
	}
}

func (a *fakeAgent) proc(containerID, execID string) (*fakeProc, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	p, ok := a.procs[procKey{containerID, execID}]
	if !ok {
		return nil, errgrpc.ToGRPC(errdefs.ErrNotFound.WithMessage(fmt.Sprintf("no process %q of container %s", execID, containerID)))
	}
	return p, nil
}

// locked runs f with the agent's state locked, for tests to read it.
func (a *fakeAgent) locked(f func(*fakeAgent)) {
	a.mu.Lock()
	defer a.mu.Unlock()
	f(a)
}

func (a *fakeAgent) record(call string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.calls = append(a.calls, call)
}

func (a *fakeAgent) callLog() []string {
	a.mu.Lock()
	defer a.mu.Unlock()
	return append([]string(nil), a.calls...)
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

func (a *fakeAgent) OnlineCPUMem(ctx context.Context, r *agentproto.OnlineCPUMemRequest) (*agentproto.OnlineCPUMemResponse, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.onlines = append(a.onlines, r)
	return &agentproto.OnlineCPUMemResponse{OnlineCpus: r.GetNbCpus()}, nil
}

func (a *fakeAgent) GetGuestDetails(ctx context.Context, _ *agentproto.GetGuestDetailsRequest) (*agentproto.GetGuestDetailsResponse, error) {
	return &agentproto.GetGuestDetailsResponse{KernelRelease: "fake", AgentVersion: "fake"}, nil
}

func (a *fakeAgent) SetGuestTime(ctx context.Context, r *agentproto.SetGuestTimeRequest) (*emptypb.Empty, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.times = append(a.times, r.GetTime().AsTime())
	return &emptypb.Empty{}, nil
}

// GetOOMEvent reports the container ids sent on oomEvents.
func (a *fakeAgent) GetOOMEvent(ctx context.Context, _ *agentproto.GetOOMEventRequest) (*agentproto.GetOOMEventResponse, error) {
	select {
	case id := <-a.oomEvents:
		return &agentproto.GetOOMEventResponse{ContainerId: id}, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

func (a *fakeAgent) CreateSandbox(ctx context.Context, r *agentproto.CreateSandboxRequest) (*emptypb.Empty, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.sandboxReq = r
	a.storages = r.GetStorages()
	a.hostTime = r.GetHostTime().AsTime()
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
	code, _ := strconv.Atoi(s.Annotations["test.exit"])
	a.mu.Lock()
	defer a.mu.Unlock()
	a.specs[r.GetContainerId()] = &s
	a.containerStorages[r.GetContainerId()] = r.GetStorages()
	k := procKey{r.GetContainerId(), ""}
	a.procs[k] = newFakeProc(s.Process.Args, uint32(code))
	a.streams[k] = streams(r.GetStdin(), r.GetStdout(), r.GetStderr(), r.GetTerminal())
	return &emptypb.Empty{}, nil
}

func (a *fakeAgent) StartContainer(ctx context.Context, r *agentproto.StartContainerRequest) (*agentproto.StartContainerResponse, error) {
	p, err := a.proc(r.GetContainerId(), "")
	if err != nil {
		return nil, err
	}
	p.run()
	return &agentproto.StartContainerResponse{Pid: 1}, nil
}

func (a *fakeAgent) ExecProcess(ctx context.Context, r *agentproto.ExecProcessRequest) (*agentproto.ExecProcessResponse, error) {
	a.mu.Lock()
	b := a.execBarrier
	a.mu.Unlock()
	if b != nil {
		if err := b.wait(ctx); err != nil {
			return nil, errgrpc.ToGRPC(err)
		}
	}
	var sp specs.Process
	if err := json.Unmarshal(r.GetProcess(), &sp); err != nil {
		return nil, errgrpc.ToGRPC(errdefs.ErrInvalidArgument.WithMessage(err.Error()))
	}
	if _, err := a.proc(r.GetContainerId(), ""); err != nil {
		return nil, err
	}
	if sp.Args[0] == "/no/such/binary" {
		return nil, errgrpc.ToGRPC(errdefs.ErrNotFound.WithMessage(`exec: "/no/such/binary": stat /no/such/binary: no such file or directory`))
	}
	var code int
	for _, e := range sp.Env {
		if v, ok := strings.CutPrefix(e, "TEST_EXIT="); ok {
			code, _ = strconv.Atoi(v)
		}
	}
	p := newFakeProc(sp.Args, uint32(code))
	k := procKey{r.GetContainerId(), r.GetExecId()}
	a.mu.Lock()
	a.procs[k] = p
	a.streams[k] = streams(r.GetStdin(), r.GetStdout(), r.GetStderr(), r.GetTerminal())
	a.mu.Unlock()
	p.run()
	return &agentproto.ExecProcessResponse{Pid: 2}, nil
}

func streams(stdin, stdout, stderr, terminal bool) string {
	return fmt.Sprintf("stdin=%v stdout=%v stderr=%v terminal=%v", stdin, stdout, stderr, terminal)
}

func (p *fakeProc) exitLocked(status uint32) {
	if p.exited {
		return
	}
	p.exited, p.outEOF, p.status = true, true, status
	p.cond.Broadcast()
}

func (a *fakeAgent) SignalProcess(ctx context.Context, r *agentproto.SignalProcessRequest) (*emptypb.Empty, error) {
	p, err := a.proc(r.GetContainerId(), r.GetExecId())
	if err != nil {
		return nil, err
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	p.exitLocked(128 + r.GetSignal())
	return &emptypb.Empty{}, nil
}

func (a *fakeAgent) WaitProcess(ctx context.Context, r *agentproto.WaitProcessRequest) (*agentproto.WaitProcessResponse, error) {
	p, err := a.proc(r.GetContainerId(), r.GetExecId())
	if err != nil {
		return nil, err
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	for !p.exited {
		p.cond.Wait()
	}
	return &agentproto.WaitProcessResponse{ExitStatus: p.status, ExitedAt: timestamppb.Now(), OomKilled: p.status == 137}, nil
}

func (a *fakeAgent) RemoveProcess(ctx context.Context, r *agentproto.RemoveProcessRequest) (*emptypb.Empty, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	k := procKey{r.GetContainerId(), r.GetExecId()}
	if _, ok := a.procs[k]; !ok || k.exec == "" {
		return nil, errgrpc.ToGRPC(errdefs.ErrNotFound.WithMessage("no exec " + k.exec))
	}
	delete(a.procs, k)
	a.calls = append(a.calls, "RemoveProcess "+k.container+" "+k.exec)
	return &emptypb.Empty{}, nil
}

func (a *fakeAgent) read(r *agentproto.ReadStreamRequest, stream func(*fakeProc) *[]byte) (*agentproto.ReadStreamResponse, error) {
	p, err := a.proc(r.GetContainerId(), r.GetExecId())
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
	p, err := a.proc(r.GetContainerId(), r.GetExecId())
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
	p, err := a.proc(r.GetContainerId(), r.GetExecId())
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

func (a *fakeAgent) TtyWinResize(ctx context.Context, r *agentproto.TtyWinResizeRequest) (*emptypb.Empty, error) {
	k := procKey{r.GetContainerId(), r.GetExecId()}
	if _, err := a.proc(k.container, k.exec); err != nil {
		return nil, err
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	a.winSizes[k] = [2]uint32{r.GetRows(), r.GetColumns()}
	return &emptypb.Empty{}, nil
}

func (a *fakeAgent) PauseContainer(ctx context.Context, r *agentproto.PauseContainerRequest) (*emptypb.Empty, error) {
	a.record("PauseContainer " + r.GetContainerId())
	return &emptypb.Empty{}, nil
}

func (a *fakeAgent) ResumeContainer(ctx context.Context, r *agentproto.ResumeContainerRequest) (*emptypb.Empty, error) {
	a.record("ResumeContainer " + r.GetContainerId())
	return &emptypb.Empty{}, nil
}

func (a *fakeAgent) UpdateContainer(ctx context.Context, r *agentproto.UpdateContainerRequest) (*emptypb.Empty, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.resources[r.GetContainerId()] = string(r.GetResources())
	return &emptypb.Empty{}, nil
}

// StatsContainer answers with cgroup v2 metrics whose pids.current is the
// number of processes the container has.
func (a *fakeAgent) StatsContainer(ctx context.Context, r *agentproto.StatsContainerRequest) (*agentproto.StatsContainerResponse, error) {
	ps, err := a.ListProcesses(ctx, &agentproto.ListProcessesRequest{ContainerId: r.GetContainerId()})
	if err != nil {
		return nil, err
	}
	m, err := anypb.New(&cgroupsv2.Metrics{Pids: &cgroupsv2.PidsStat{Current: uint64(len(ps.GetProcesses()))}})
	if err != nil {
		return nil, err
	}
	return &agentproto.StatsContainerResponse{Metrics: m}, nil
}

// ListProcesses lists the container's processes that have not exited:
// the init as pid 1, execs from pid 2 in exec id order.
func (a *fakeAgent) ListProcesses(ctx context.Context, r *agentproto.ListProcessesRequest) (*agentproto.ListProcessesResponse, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	var execs []string
	resp := &agentproto.ListProcessesResponse{}
	for k, p := range a.procs {
		p.mu.Lock()
		live := !p.exited
		p.mu.Unlock()
		switch {
		case k.container != r.GetContainerId() || !live:
		case k.exec == "":
			resp.Processes = append(resp.Processes, &agentproto.ProcessInfo{Pid: 1})
		default:
			execs = append(execs, k.exec)
		}
	}
	slices.Sort(execs)
	for i, id := range execs {
		resp.Processes = append(resp.Processes, &agentproto.ProcessInfo{Pid: uint32(2 + i), ExecId: id})
	}
	return resp, nil
}

func (a *fakeAgent) RemoveContainer(ctx context.Context, r *agentproto.RemoveContainerRequest) (*emptypb.Empty, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	for k, p := range a.procs {
		if k.container == r.GetContainerId() {
			p.mu.Lock()
			p.exitLocked(137)
			p.mu.Unlock()
			delete(a.procs, k)
		}
	}
	a.removed = append(a.removed, r.GetContainerId())
	return &emptypb.Empty{}, nil
}

func (a *fakeAgent) stdinSeen(containerID, execID string) string {
	p, err := a.proc(containerID, execID)
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
	c.Runtime.TemplateDir = filepath.Join(filepath.Dir(dir), "templates")
	c.Storage.SharedFS = sharedFS
	c.Agent.Channel = "serial"
	c.Hypervisor.BootTimeout = config.Duration(30 * time.Second)
	return c
}

// UpdateInterface accepts what the guest is told of a pod interface.
func (a *fakeAgent) UpdateInterface(ctx context.Context, r *agentproto.UpdateInterfaceRequest) (*agentproto.Interface, error) {
	return r.GetInterface(), nil
}

// GetMetrics answers guest figures, with names a hostile guest might send
// among them.
func (a *fakeAgent) GetMetrics(context.Context, *agentproto.GetMetricsRequest) (*agentproto.GetMetricsResponse, error) {
	nan := math.NaN()
	return &agentproto.GetMetricsResponse{
		MeminfoBytes:  map[string]uint64{"MemTotal": 256 << 20, "MemAvailable": 200 << 20, "Evil\"} 1\nx": 1},
		Cpus:          []*agentproto.CPUTime{{Cpu: 0, UserSeconds: 1.5}, {Cpu: 1, IdleSeconds: nan}, {Cpu: 1 << 30}},
		Load1:         0.5,
		Netdev:        []*agentproto.NetDevStats{{Name: "eth0", RxBytes: 10}, {Name: "bad name{}", RxBytes: 1}},
		Disks:         []*agentproto.DiskStats{{Name: "vda", Reads: 3}},
		Classes:       []*agentproto.ClassStats{{Name: "high", CpuUsageUsec: 2e6}, {Name: "injected", CpuUsageUsec: 1}},
		AgentRssBytes: 17 << 20,
	}, nil
}
