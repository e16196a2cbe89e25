package agent

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/containerd/ttrpc"
	"github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/emptypb"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/colo-runtime/colo/agentproto"
)

// ServiceConfig configures the agent service.
type ServiceConfig struct {
	// Version is reported by Check and GetGuestDetails.
	Version string
	// StateDir is libcontainer's state root.
	StateDir string
	// NoPivotRoot makes every container use MS_MOVE and chroot instead of
	// pivot_root. It is implied when / is the initramfs.
	NoPivotRoot bool
	// NetNS is the network namespace whose interfaces the service
	// configures; empty is its own (the guest's).
	NetNS string
	// CgroupRoot is where the guest's cgroup v2 is mounted (default
	// /sys/fs/cgroup).
	CgroupRoot string
	// TopologyFile is where the CPU classes are published (default
	// agentproto.TopologyFile).
	TopologyFile string
	// SysfsRoot is where sysfs is mounted (default /sys): the CPUs and
	// memory blocks OnlineCPUMem brings online, the network devices whose
	// interrupts follow the first CPU class, the disks of storages.
	SysfsRoot string
}

// Service implements agentproto.AgentService.
type Service struct {
	version string
	opts    containerOptions

	mu sync.Mutex
	// A nil entry reserves the id while the container is being created.
	containers    map[string]*container
	sandbox       bool
	sandboxMounts []string
	// podNS holds the pod's namespaces when the sandbox has no pause
	// container (CreateSandboxRequest.pod_namespaces).
	podNS *podNamespaces

	// ooms queues the ids of containers that had an OOM kill, for
	// GetOOMEvent.
	ooms chan string

	netns string
	// netMu serializes changes to the guest's network.
	netMu sync.Mutex

	cgroupRoot, topologyFile string
	// classes are the sandbox's CPU classes, highest first (under mu).
	classes []*agentproto.CPUClass

	// sysRoot is sysfs, meminfo /proc/meminfo (a fake in tests).
	sysRoot, meminfo string
	// cpuWait bounds OnlineCPUMem's wait for the CPUs (cpuWaitCap).
	cpuWait time.Duration
	// resizeMu serializes OnlineCPUMem calls.
	resizeMu sync.Mutex
	// fixAffinity makes sure the agent's threads may run on the online
	// CPUs (ensureAffinity; a stub in tests, whose CPUs are fake).
	fixAffinity func(ctx context.Context, online []int)
}

// oomQueue bounds the OOM events not yet taken by the shim; more are
// dropped (and logged): the exit status still shows the kill.
const oomQueue = 128

var _ agentproto.AgentService = (*Service)(nil)

// NewService returns the agent service.
func NewService(cfg ServiceConfig) (*Service, error) {
	if cfg.StateDir == "" {
		return nil, errors.New("agent service: no state directory")
	}
	noPivot := cfg.NoPivotRoot
	if !noPivot {
		initramfs, err := rootIsInitramfs()
		if err != nil {
			return nil, err
		}
		noPivot = initramfs
	}
	sysRoot := cmp.Or(cfg.SysfsRoot, "/sys")
	return &Service{
		version:      cfg.Version,
		opts:         containerOptions{stateDir: cfg.StateDir, noPivotRoot: noPivot, sysRoot: sysRoot},
		containers:   make(map[string]*container),
		ooms:         make(chan string, oomQueue),
		netns:        cfg.NetNS,
		cgroupRoot:   cmp.Or(cfg.CgroupRoot, "/sys/fs/cgroup"),
		topologyFile: cmp.Or(cfg.TopologyFile, agentproto.TopologyFile),
		sysRoot:      sysRoot,
		meminfo:      "/proc/meminfo",
		fixAffinity:  ensureAffinity,
		cpuWait:      cpuWaitCap,
	}, nil
}

// watchOOM queues an event for every OOM kill in the container's cgroup;
// it ends when the container is destroyed.
func (s *Service) watchOOM(ctx context.Context, c *container) {
	ch, err := c.lc.NotifyOOM()
	if err != nil {
		log.G(ctx).WithError(err).WithField("container", c.id).Warn("no OOM notifications")
		return
	}
	go func() {
		for range ch {
			c.oomKilled.Store(true)
			select {
			case s.ooms <- c.id:
			default:
				log.G(ctx).WithField("container", c.id).Warn("OOM event queue full: event dropped")
			}
		}
	}()
}

// Close removes every container and unmounts the sandbox's storages.
func (s *Service) Close(ctx context.Context) error {
	err := s.removeAll(ctx)
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.podNS != nil {
		if perr := s.podNS.close(ctx); perr != nil {
			err = errors.Join(err, perr)
		}
		s.podNS = nil
	}
	if uerr := unmountAll(ctx, s.sandboxMounts); uerr != nil {
		err = errors.Join(err, uerr)
	}
	s.sandboxMounts, s.sandbox = nil, false
	return err
}

func (s *Service) removeAll(ctx context.Context) error {
	s.mu.Lock()
	var cs []*container
	for _, c := range s.containers {
		if c != nil {
			cs = append(cs, c)
		}
	}
	s.mu.Unlock()
	var errs []error
	for _, c := range cs {
		if err := s.remove(ctx, c); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

func (s *Service) remove(ctx context.Context, c *container) error {
	if err := c.remove(ctx); err != nil {
		return err
	}
	s.mu.Lock()
	delete(s.containers, c.id)
	s.mu.Unlock()
	return nil
}

func (s *Service) container(id string) (*container, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	c := s.containers[id]
	if c == nil {
		return nil, fmt.Errorf("container %q: %w", id, errdefs.ErrNotFound)
	}
	return c, nil
}

func (s *Service) process(containerID, execID string) (*process, error) {
	c, err := s.container(containerID)
	if err != nil {
		return nil, err
	}
	return c.process(execID)
}

func (s *Service) Check(ctx context.Context, req *agentproto.CheckRequest) (*agentproto.CheckResponse, error) {
	bootID, err := readBootID()
	if err != nil {
		return nil, err
	}
	return &agentproto.CheckResponse{
		AgentVersion:    s.version,
		ProtocolVersion: agentproto.ProtocolVersion,
		BootId:          bootID,
	}, nil
}

func readBootID() (string, error) {
	b, err := os.ReadFile("/proc/sys/kernel/random/boot_id")
	if err != nil {
		return "", fmt.Errorf("read boot id: %w", err)
	}
	return strings.TrimSpace(string(b)), nil
}

func (s *Service) GetGuestDetails(ctx context.Context, req *agentproto.GetGuestDetailsRequest) (*agentproto.GetGuestDetailsResponse, error) {
	var uts unix.Utsname
	if err := unix.Uname(&uts); err != nil {
		return nil, fmt.Errorf("uname: %w", err)
	}
	var si unix.Sysinfo_t
	if err := unix.Sysinfo(&si); err != nil {
		return nil, fmt.Errorf("sysinfo: %w", err)
	}
	var cpus unix.CPUSet
	if err := unix.SchedGetaffinity(0, &cpus); err != nil {
		return nil, fmt.Errorf("sched_getaffinity: %w", err)
	}
	bootID, err := readBootID()
	if err != nil {
		return nil, err
	}
	var rss uint64
	for _, p := range []string{"/proc/1/status", "/proc/self/status"} {
		v, err := statusKB(p, "VmRSS")
		if err != nil {
			return nil, err
		}
		rss += v << 10
	}
	total, err := statusKB("/proc/meminfo", "MemTotal")
	if err != nil {
		return nil, err
	}
	avail, err := statusKB("/proc/meminfo", "MemAvailable")
	if err != nil {
		return nil, err
	}
	return &agentproto.GetGuestDetailsResponse{
		KernelRelease: unix.ByteSliceToString(uts.Release[:]),
		OnlineCpus:    uint32(cpus.Count()),
		MemTotalBytes: uint64(si.Totalram) * uint64(si.Unit),
		AgentVersion:  s.version,
		BootId:        bootID,
		AgentRssBytes: rss,
		MemUsedBytes:  (total - avail) << 10,
	}, nil
}

// statusKB reads the "key: N kB" line of a /proc file such as
// /proc/PID/status or /proc/meminfo.
func statusKB(path, key string) (uint64, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		k, v, ok := strings.Cut(line, ":")
		if ok && k == key {
			return strconv.ParseUint(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
		}
	}
	return 0, fmt.Errorf("%s: no %s", path, key)
}

func (s *Service) SetGuestTime(ctx context.Context, req *agentproto.SetGuestTimeRequest) (*emptypb.Empty, error) {
	if req.GetTime() == nil {
		return nil, fmt.Errorf("no time given: %w", errdefs.ErrInvalidArgument)
	}
	if err := setTime(req.GetTime().AsTime()); err != nil {
		return nil, err
	}
	return &emptypb.Empty{}, nil
}

func setTime(t time.Time) error {
	tv := unix.NsecToTimeval(t.UnixNano())
	if err := unix.Settimeofday(&tv); err != nil {
		return fmt.Errorf("settimeofday: %w", err)
	}
	return nil
}

func (s *Service) CreateSandbox(ctx context.Context, req *agentproto.CreateSandboxRequest) (*emptypb.Empty, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.sandbox {
		return nil, fmt.Errorf("sandbox already created: %w", errdefs.ErrAlreadyExists)
	}
	if t := req.GetHostTime(); t != nil {
		if err := setTime(t.AsTime()); err != nil {
			return nil, err
		}
	}
	if h := req.GetHostname(); h != "" {
		if err := unix.Sethostname([]byte(h)); err != nil {
			return nil, fmt.Errorf("set hostname %q: %w", h, err)
		}
	}
	if len(req.GetPodSysctls()) > 0 && !req.GetPodNamespaces() {
		return nil, fmt.Errorf("pod sysctls without pod namespaces: %w", errdefs.ErrInvalidArgument)
	}
	if err := s.setupClasses(ctx, req.GetCpuClasses()); err != nil {
		return nil, err
	}
	mounts, err := mountStorages(ctx, s.sysRoot, req.GetStorages())
	if err != nil {
		return nil, err
	}
	if req.GetPodNamespaces() {
		// After the hostname: the pod's UTS namespace starts as a copy
		// of the guest's.
		if s.podNS, err = startPodNamespaces(ctx, req.GetPodSysctls()); err != nil {
			if uerr := unmountAll(ctx, mounts); uerr != nil {
				log.G(ctx).WithError(uerr).Warn("unmount the sandbox's storages after a failed create")
			}
			return nil, err
		}
	}
	s.sandbox, s.sandboxMounts = true, mounts
	log.G(ctx).WithField("sandbox", req.GetSandboxId()).Info("sandbox created")
	return &emptypb.Empty{}, nil
}

// DestroySandbox removes the containers left and unmounts the sandbox's
// storages.
func (s *Service) DestroySandbox(ctx context.Context, req *agentproto.DestroySandboxRequest) (*emptypb.Empty, error) {
	if err := s.Close(ctx); err != nil {
		return nil, err
	}
	return &emptypb.Empty{}, nil
}

func (s *Service) CreateContainer(ctx context.Context, req *agentproto.CreateContainerRequest) (*emptypb.Empty, error) {
	id := req.GetContainerId()
	var spec specs.Spec
	if err := json.Unmarshal(req.GetOciSpec(), &spec); err != nil {
		return nil, fmt.Errorf("container %q: parse OCI spec: %w: %w", id, err, errdefs.ErrInvalidArgument)
	}
	s.mu.Lock()
	_, exists := s.containers[id]
	if !exists {
		s.containers[id] = nil
	}
	s.mu.Unlock()
	if exists {
		return nil, fmt.Errorf("container %q: %w", id, errdefs.ErrAlreadyExists)
	}
	c, err := createContainer(ctx, s.opts, id, &spec, req.GetStorages(), streams{
		stdin:    req.GetStdin(),
		stdout:   req.GetStdout(),
		stderr:   req.GetStderr(),
		terminal: req.GetTerminal(),
	})
	s.mu.Lock()
	if err != nil {
		delete(s.containers, id)
	} else {
		s.containers[id] = c
	}
	s.mu.Unlock()
	if err != nil {
		return nil, err
	}
	s.watchOOM(context.WithoutCancel(ctx), c)
	log.G(ctx).WithField("container", id).Infof("container created, init pid %d", c.init.pid)
	return &emptypb.Empty{}, nil
}

func (s *Service) StartContainer(ctx context.Context, req *agentproto.StartContainerRequest) (*agentproto.StartContainerResponse, error) {
	c, err := s.container(req.GetContainerId())
	if err != nil {
		return nil, err
	}
	pid, err := c.start()
	if err != nil {
		return nil, err
	}
	return &agentproto.StartContainerResponse{Pid: uint32(pid)}, nil
}

func (s *Service) RemoveContainer(ctx context.Context, req *agentproto.RemoveContainerRequest) (*emptypb.Empty, error) {
	c, err := s.container(req.GetContainerId())
	if err != nil {
		return nil, err
	}
	if err := s.remove(ctx, c); err != nil {
		return nil, err
	}
	log.G(ctx).WithField("container", c.id).Info("container removed")
	return &emptypb.Empty{}, nil
}

func (s *Service) PauseContainer(ctx context.Context, req *agentproto.PauseContainerRequest) (*emptypb.Empty, error) {
	c, err := s.container(req.GetContainerId())
	if err != nil {
		return nil, err
	}
	if err := c.lc.Pause(); err != nil {
		return nil, fmt.Errorf("pause container %s: %w", c.id, err)
	}
	return &emptypb.Empty{}, nil
}

func (s *Service) ResumeContainer(ctx context.Context, req *agentproto.ResumeContainerRequest) (*emptypb.Empty, error) {
	c, err := s.container(req.GetContainerId())
	if err != nil {
		return nil, err
	}
	if err := c.lc.Resume(); err != nil {
		return nil, fmt.Errorf("resume container %s: %w", c.id, err)
	}
	return &emptypb.Empty{}, nil
}

func (s *Service) ListProcesses(ctx context.Context, req *agentproto.ListProcessesRequest) (*agentproto.ListProcessesResponse, error) {
	c, err := s.container(req.GetContainerId())
	if err != nil {
		return nil, err
	}
	pids, err := c.lc.Processes()
	if err != nil {
		return nil, fmt.Errorf("list processes of container %s: %w", c.id, err)
	}
	execs := make(map[int]string)
	for _, p := range c.processes() {
		execs[p.pid] = p.execID
	}
	resp := &agentproto.ListProcessesResponse{}
	for _, pid := range pids {
		resp.Processes = append(resp.Processes, &agentproto.ProcessInfo{Pid: uint32(pid), ExecId: execs[pid]})
	}
	return resp, nil
}

func (s *Service) ExecProcess(ctx context.Context, req *agentproto.ExecProcessRequest) (*agentproto.ExecProcessResponse, error) {
	c, err := s.container(req.GetContainerId())
	if err != nil {
		return nil, err
	}
	var sp specs.Process
	if err := json.Unmarshal(req.GetProcess(), &sp); err != nil {
		return nil, fmt.Errorf("exec %q: parse OCI process: %w: %w", req.GetExecId(), err, errdefs.ErrInvalidArgument)
	}
	p, err := c.exec(ctx, req.GetExecId(), &sp, streams{
		stdin:    req.GetStdin(),
		stdout:   req.GetStdout(),
		stderr:   req.GetStderr(),
		terminal: req.GetTerminal(),
	})
	if err != nil {
		return nil, err
	}
	return &agentproto.ExecProcessResponse{Pid: uint32(p.pid)}, nil
}

func (s *Service) SignalProcess(ctx context.Context, req *agentproto.SignalProcessRequest) (*emptypb.Empty, error) {
	c, err := s.container(req.GetContainerId())
	if err != nil {
		return nil, err
	}
	if err := c.signal(req.GetExecId(), unix.Signal(req.GetSignal()), req.GetAll()); err != nil {
		return nil, err
	}
	return &emptypb.Empty{}, nil
}

func (s *Service) WaitProcess(ctx context.Context, req *agentproto.WaitProcessRequest) (*agentproto.WaitProcessResponse, error) {
	p, err := s.process(req.GetContainerId(), req.GetExecId())
	if err != nil {
		return nil, err
	}
	if err := p.waitExit(ctx); err != nil {
		return nil, err
	}
	c, _ := s.container(req.GetContainerId())
	return &agentproto.WaitProcessResponse{
		ExitStatus: p.status,
		ExitedAt:   timestamppb.New(p.exitedAt),
		// A SIGKILL in a container that had an OOM kill.
		OomKilled: p.status == 128+9 && c != nil && c.oomKilled.Load(),
	}, nil
}

func (s *Service) WriteStdin(ctx context.Context, req *agentproto.WriteStreamRequest) (*agentproto.WriteStreamResponse, error) {
	p, err := s.process(req.GetContainerId(), req.GetExecId())
	if err != nil {
		return nil, err
	}
	n, err := p.stdio.Write(req.GetData())
	if err != nil {
		return nil, err
	}
	return &agentproto.WriteStreamResponse{Len: uint32(n)}, nil
}

func (s *Service) CloseStdin(ctx context.Context, req *agentproto.CloseStdinRequest) (*emptypb.Empty, error) {
	p, err := s.process(req.GetContainerId(), req.GetExecId())
	if err != nil {
		return nil, err
	}
	if err := p.stdio.CloseStdin(); err != nil {
		return nil, err
	}
	return &emptypb.Empty{}, nil
}

func (s *Service) ReadStdout(ctx context.Context, req *agentproto.ReadStreamRequest) (*agentproto.ReadStreamResponse, error) {
	return s.read(ctx, req, "stdout", func(sio *stdio) *stream { return sio.stdout })
}

func (s *Service) ReadStderr(ctx context.Context, req *agentproto.ReadStreamRequest) (*agentproto.ReadStreamResponse, error) {
	return s.read(ctx, req, "stderr", func(sio *stdio) *stream { return sio.stderr })
}

func (s *Service) read(ctx context.Context, req *agentproto.ReadStreamRequest, name string, pick func(*stdio) *stream) (*agentproto.ReadStreamResponse, error) {
	p, err := s.process(req.GetContainerId(), req.GetExecId())
	if err != nil {
		return nil, err
	}
	st := pick(p.stdio)
	if st == nil {
		return nil, fmt.Errorf("%s was not requested: %w", name, errdefs.ErrFailedPrecondition)
	}
	data, eof, err := st.Read(ctx, readLen(req.GetLen()))
	if err != nil {
		return nil, err
	}
	return &agentproto.ReadStreamResponse{Data: data, Eof: eof}, nil
}

// GetOOMEvent waits for the next OOM kill in any container.
func (s *Service) GetOOMEvent(ctx context.Context, _ *agentproto.GetOOMEventRequest) (*agentproto.GetOOMEventResponse, error) {
	select {
	case id := <-s.ooms:
		return &agentproto.GetOOMEventResponse{ContainerId: id}, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// GetMetrics answers the guest's figures (metrics.go). It never fails:
// what cannot be read is left out and counted in skipped.
func (s *Service) GetMetrics(ctx context.Context, _ *agentproto.GetMetricsRequest) (*agentproto.GetMetricsResponse, error) {
	return collectMetrics(procRoot, s.cgroupRoot, s.classNames(ctx)), nil
}

func (s *Service) UpdateContainer(ctx context.Context, req *agentproto.UpdateContainerRequest) (*emptypb.Empty, error) {
	c, err := s.container(req.GetContainerId())
	if err != nil {
		return nil, err
	}
	var r specs.LinuxResources
	if err := json.Unmarshal(req.GetResources(), &r); err != nil {
		return nil, fmt.Errorf("update %s: parse resources: %w: %w", c.id, err, errdefs.ErrInvalidArgument)
	}
	if err := c.update(&r); err != nil {
		return nil, err
	}
	return &emptypb.Empty{}, nil
}

func (s *Service) StatsContainer(ctx context.Context, req *agentproto.StatsContainerRequest) (*agentproto.StatsContainerResponse, error) {
	c, err := s.container(req.GetContainerId())
	if err != nil {
		return nil, err
	}
	m, err := c.stats()
	if err != nil {
		return nil, err
	}
	return &agentproto.StatsContainerResponse{Metrics: m}, nil
}

func (s *Service) RemoveProcess(ctx context.Context, req *agentproto.RemoveProcessRequest) (*emptypb.Empty, error) {
	c, err := s.container(req.GetContainerId())
	if err != nil {
		return nil, err
	}
	if err := c.removeExec(req.GetExecId()); err != nil {
		return nil, err
	}
	return &emptypb.Empty{}, nil
}

func (s *Service) TtyWinResize(ctx context.Context, req *agentproto.TtyWinResizeRequest) (*emptypb.Empty, error) {
	p, err := s.process(req.GetContainerId(), req.GetExecId())
	if err != nil {
		return nil, err
	}
	if err := p.stdio.resize(req.GetRows(), req.GetColumns()); err != nil {
		return nil, err
	}
	return &emptypb.Empty{}, nil
}

// statusInterceptor turns the errdefs errors of the service into ttrpc
// status codes, so the shim can tell e.g. NotFound and Unimplemented from
// failures.
func statusInterceptor(ctx context.Context, unmarshal ttrpc.Unmarshaler, info *ttrpc.UnaryServerInfo, method ttrpc.Method) (any, error) {
	resp, err := method(ctx, unmarshal)
	if err == nil {
		return resp, nil
	}
	log.G(ctx).WithError(err).Debugf("%s failed", info.FullMethod)
	return nil, toStatus(err)
}

func toStatus(err error) error {
	if _, ok := status.FromError(err); ok {
		return err
	}
	code := codes.Unknown
	switch {
	case errors.Is(err, context.Canceled):
		code = codes.Canceled
	case errors.Is(err, context.DeadlineExceeded):
		code = codes.DeadlineExceeded
	case errdefs.IsNotFound(err):
		code = codes.NotFound
	case errdefs.IsAlreadyExists(err):
		code = codes.AlreadyExists
	case errdefs.IsInvalidArgument(err):
		code = codes.InvalidArgument
	case errdefs.IsFailedPrecondition(err):
		code = codes.FailedPrecondition
	case errdefs.IsNotImplemented(err):
		code = codes.Unimplemented
	case errdefs.IsUnavailable(err):
		code = codes.Unavailable
	}
	return status.Error(code, err.Error())
}
