package task

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"os"
	goruntime "runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	sandboxAPI "github.com/containerd/containerd/api/runtime/sandbox/v1"
	"github.com/containerd/containerd/api/types"
	"github.com/containerd/containerd/v2/pkg/protobuf"
	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"github.com/containerd/log"
	"github.com/containerd/typeurl/v2"
	criapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/colo-runtime/colo/config"
	"github.com/colo-runtime/colo/hypervisor"
	"github.com/colo-runtime/colo/shim/sandbox"
)

// The sandbox service (containerd.runtime.sandbox.v1.Sandbox) is what
// containerd's "shim" sandbox controller drives when a CRI runtime handler
// sets sandboxer = "shim": a pod is a VM with no pause container.
// CreateSandbox takes the pod's configuration, StartSandbox boots the VM
// (sandbox.CreatePod), and the pod's containers then come as tasks on the
// same connection, which the task service puts into that VM (their CRI
// annotation io.kubernetes.cri.sandbox-id names the pod). StopSandbox
// stops the VM; ShutdownSandbox forgets the sandbox and lets the shim exit
// once nothing is left.
//
// The pid containerd is told for the sandbox is the hypervisor's: the
// process whose life is the sandbox's (it ends when the VM stops, as a
// pause container's would) and whose resources are the pod's, and the pid
// the task service reports for each of the pod's processes, so containerd
// sees the same in both sandboxer modes (the namespace paths
// /proc/<pid>/ns/... of the containers' specs, NRI's pod pid).

var _ sandboxAPI.TTRPCSandboxService = (*sandboxService)(nil)

// sandboxService serves the sandbox API on the task service's sandboxes.
type sandboxService struct {
	s *service
}

// podSandbox is a sandbox of the sandbox API, from CreateSandbox until the
// shim exits.
type podSandbox struct {
	id      string
	created time.Time
	config  config.Config
	driver  hypervisor.Driver
	pod     sandbox.PodConfig

	// op serializes start, stop and shutdown, which take long; status
	// calls take only mu.
	op sync.Mutex

	mu        sync.Mutex
	sb        *sandbox.Sandbox // once started
	stopped   bool             // StopSandbox or ShutdownSandbox came
	stoppedAt time.Time
	shutdown  bool // ShutdownSandbox came
	// settled is closed once the sandbox started, or was stopped before
	// it did.
	settled chan struct{}
}

func (p *podSandbox) settle() {
	select {
	case <-p.settled:
	default:
		close(p.settled)
	}
}

// startedPodSandbox is the running sandbox of a sandbox of the sandbox
// API, or an error (for the API) if it is unknown or not started.
func (s *service) startedPodSandbox(id string) (*sandbox.Sandbox, error) {
	p, err := s.podSandbox(id)
	if err != nil {
		return nil, err
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.sb == nil {
		return nil, errgrpc.ToGRPC(errdefs.ErrFailedPrecondition.WithMessage(fmt.Sprintf("sandbox %s is not started", id)))
	}
	return p.sb, nil
}

// podSandbox returns a sandbox of the sandbox API.
func (s *service) podSandbox(id string) (*podSandbox, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	p, ok := s.pods[id]
	if !ok {
		return nil, errgrpc.ToGRPC(errdefs.ErrNotFound.WithMessage(fmt.Sprintf("sandbox %s not found", id)))
	}
	return p, nil
}

// CreateSandbox takes the pod's configuration (CRI's PodSandboxConfig in
// options) and checks it, and what colo's configuration names; the VM
// boots at StartSandbox.
func (ss *sandboxService) CreateSandbox(ctx context.Context, r *sandboxAPI.CreateSandboxRequest) (*sandboxAPI.CreateSandboxResponse, error) {
	s := ss.s
	ctx = log.WithLogger(ctx, log.G(ctx).WithField("sandbox", r.SandboxID))
	if r.SandboxID == "" {
		return nil, errgrpc.ToGRPC(errdefs.ErrInvalidArgument.WithMessage("no sandbox id"))
	}
	pc, err := podConfig(r)
	if err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	if len(r.Rootfs) > 0 {
		// containerd's CRI gives none; `ctr sandbox run` gives the
		// image's. The pod is a VM: its containers have their own rootfs.
		log.G(ctx).WithField("mounts", len(r.Rootfs)).Warn("the sandbox's rootfs is not used: colo's pod sandbox is a VM with no container of its own")
	}
	// CreateSandboxRequest has no runtime options: the configuration is
	// the one $COLO_CONFIG names, which `shim start` sets from them (the
	// handler's ConfigPath option), or the default.
	cfg, err := sandbox.LoadConfig(nil)
	if err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	drv, err := s.newDriver(cfg.Hypervisor)
	if err != nil {
		return nil, errgrpc.ToGRPC(fmt.Errorf("hypervisor %q: %w", cfg.Hypervisor.Type, err))
	}
	p := &podSandbox{
		id:      r.SandboxID,
		created: time.Now(),
		config:  cfg,
		driver:  drv,
		pod:     pc,
		settled: make(chan struct{}),
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.pods[r.SandboxID]; ok {
		return nil, errgrpc.ToGRPC(errdefs.ErrAlreadyExists.WithMessage(fmt.Sprintf("sandbox %s already exists", r.SandboxID)))
	}
	if _, ok := s.sandboxes[r.SandboxID]; ok {
		return nil, errgrpc.ToGRPC(errdefs.ErrAlreadyExists.WithMessage(fmt.Sprintf("pod %s already has a sandbox in this shim (a pause container's)", r.SandboxID)))
	}
	s.pods[r.SandboxID] = p
	log.G(ctx).WithFields(log.Fields{"netns": pc.NetNS, "cgroup_parent": pc.CgroupParent}).Info("sandbox created")
	return &sandboxAPI.CreateSandboxResponse{}, nil
}

// podConfig reads the pod's configuration from a CreateSandbox request:
// its options are CRI's PodSandboxConfig (containerd's CRI sends it, as
// typeurl), or none (other clients). The files CRI's podsandbox controller
// would make for the pod's containers are made as it makes them: the
// host's /etc/hosts, and resolv.conf from the pod's DNS config or else
// the host's.
func podConfig(r *sandboxAPI.CreateSandboxRequest) (sandbox.PodConfig, error) {
	p := sandbox.PodConfig{Bundle: r.BundlePath, NetNS: r.NetnsPath, Annotations: map[string]string{}}
	if r.Options == nil || r.Options.GetTypeUrl() == "" {
		maps.Copy(p.Annotations, r.Annotations)
		return p, nil
	}
	v, err := typeurl.UnmarshalAny(r.Options)
	if err != nil {
		return p, errdefs.ErrInvalidArgument.WithMessage(fmt.Sprintf("sandbox options of type %s: %v", r.Options.GetTypeUrl(), err))
	}
	c, ok := v.(*criapi.PodSandboxConfig)
	if !ok {
		return p, errdefs.ErrInvalidArgument.WithMessage(fmt.Sprintf("sandbox options of type %s: want CRI's PodSandboxConfig", r.Options.GetTypeUrl()))
	}
	maps.Copy(p.Annotations, c.GetAnnotations())
	maps.Copy(p.Annotations, r.Annotations)
	p.Hostname = c.GetHostname()
	p.CgroupParent = c.GetLinux().GetCgroupParent()
	p.Sysctls = maps.Clone(c.GetLinux().GetSysctls())
	// The pod's resources, as CRI annotates a pause container with them:
	// they size the VM.
	if res := c.GetLinux().GetResources(); res != nil {
		p.Annotations[sandbox.SandboxCPUQuotaAnnotation] = strconv.FormatInt(res.GetCpuQuota(), 10)
		p.Annotations[sandbox.SandboxCPUPeriodAnnotation] = strconv.FormatInt(res.GetCpuPeriod(), 10)
		p.Annotations[sandbox.SandboxMemoryAnnotation] = strconv.FormatInt(res.GetMemoryLimitInBytes(), 10)
	}
	nso := c.GetLinux().GetSecurityContext().GetNamespaceOptions()
	for _, ns := range []struct {
		mode criapi.NamespaceMode
		name string
	}{{nso.GetNetwork(), "network"}, {nso.GetPid(), "pid"}, {nso.GetIpc(), "ipc"}} {
		if ns.mode == criapi.NamespaceMode_NODE {
			p.HostNamespaces = append(p.HostNamespaces, ns.name)
		}
	}
	if p.Hosts, err = readHostFile("/etc/hosts"); err != nil {
		return p, err
	}
	if dns := c.GetDnsConfig(); dns != nil {
		p.ResolvConf = []byte(resolvConf(dns))
	} else if p.ResolvConf, err = readHostFile("/etc/resolv.conf"); err != nil {
		return p, err
	}
	return p, nil
}

// readHostFile reads one of the host's files a pod gets a copy of; a
// missing one is none.
func readHostFile(name string) ([]byte, error) {
	b, err := os.ReadFile(name)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read %s for the pod: %w", name, err)
	}
	return b, nil
}

// resolvConf is the resolv.conf of a pod's DNS config, as CRI writes it.
func resolvConf(dns *criapi.DNSConfig) string {
	var b strings.Builder
	if s := dns.GetSearches(); len(s) > 0 {
		fmt.Fprintf(&b, "search %s\n", strings.Join(s, " "))
	}
	for _, ns := range dns.GetServers() {
		fmt.Fprintf(&b, "nameserver %s\n", ns)
	}
	if o := dns.GetOptions(); len(o) > 0 {
		fmt.Fprintf(&b, "options %s\n", strings.Join(o, " "))
	}
	return b.String()
}

// StartSandbox boots the pod's VM. A second call returns what the first
// did.
func (ss *sandboxService) StartSandbox(ctx context.Context, r *sandboxAPI.StartSandboxRequest) (*sandboxAPI.StartSandboxResponse, error) {
	s := ss.s
	p, err := s.podSandbox(r.SandboxID)
	if err != nil {
		return nil, err
	}
	ctx = log.WithLogger(ctx, log.G(ctx).WithField("sandbox", r.SandboxID))
	p.op.Lock()
	defer p.op.Unlock()
	p.mu.Lock()
	sb, stopped := p.sb, p.stopped
	p.mu.Unlock()
	if sb == nil {
		if stopped {
			return nil, errgrpc.ToGRPC(errdefs.ErrFailedPrecondition.WithMessage(fmt.Sprintf("sandbox %s was stopped before it started", r.SandboxID)))
		}
		sb, err = sandbox.CreatePod(ctx, sandbox.Options{
			ID:        r.SandboxID,
			Namespace: s.namespace,
			Config:    p.config,
			Driver:    p.driver,
			OnExit:    s.exited,
			OnOOM:     s.oom,

			ShimMetrics: s.metrics,
		}, p.pod)
		if err != nil {
			log.G(ctx).WithError(err).Error("start sandbox")
			return nil, errgrpc.ToGRPC(err)
		}
		p.mu.Lock()
		p.sb = sb
		p.mu.Unlock()
		p.settle()
		s.mu.Lock()
		s.sandboxes[r.SandboxID] = sb
		s.mu.Unlock()
		s.trim.soon(s.ctx)
	}
	return &sandboxAPI.StartSandboxResponse{
		Pid:       uint32(sb.Pid()),
		CreatedAt: protobuf.ToTimestamp(p.created),
	}, nil
}

// Platform is what the guest runs: Linux on the host's architecture (the
// VM is not emulated across architectures).
func (ss *sandboxService) Platform(ctx context.Context, r *sandboxAPI.PlatformRequest) (*sandboxAPI.PlatformResponse, error) {
	if _, err := ss.s.podSandbox(r.SandboxID); err != nil {
		return nil, err
	}
	return &sandboxAPI.PlatformResponse{Platform: &types.Platform{OS: "linux", Architecture: goruntime.GOARCH}}, nil
}

// StopSandbox stops the pod's VM: gracefully for timeout_secs (if given,
// else hypervisor.shutdown_timeout), then killed, and everything else of
// it torn down. Containers left are stopped with it; their tasks stay
// until deleted.
func (ss *sandboxService) StopSandbox(ctx context.Context, r *sandboxAPI.StopSandboxRequest) (*sandboxAPI.StopSandboxResponse, error) {
	p, err := ss.s.podSandbox(r.SandboxID)
	if err != nil {
		return nil, err
	}
	ctx = log.WithLogger(ctx, log.G(ctx).WithField("sandbox", r.SandboxID))
	if r.TimeoutSecs > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, time.Duration(r.TimeoutSecs)*time.Second)
		defer cancel()
	}
	if err := p.stop(ctx); err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	return &sandboxAPI.StopSandboxResponse{}, nil
}

// stop stops the sandbox, started or not, once.
func (p *podSandbox) stop(ctx context.Context) error {
	p.op.Lock()
	defer p.op.Unlock()
	p.mu.Lock()
	sb := p.sb
	p.mu.Unlock()
	if sb != nil {
		// Again after a failure: Stop resumes a teardown that failed.
		if err := sb.Stop(ctx); err != nil {
			log.G(ctx).WithError(err).Error("stop sandbox")
			return err
		}
	}
	p.mu.Lock()
	if !p.stopped {
		p.stopped, p.stoppedAt = true, time.Now()
		log.G(ctx).Info("sandbox stopped")
	}
	p.mu.Unlock()
	p.settle()
	return nil
}

// WaitSandbox blocks until the sandbox has stopped, or the request ends:
// exit status 0 for a stop that was asked for, 255 for a VM that failed or
// died.
func (ss *sandboxService) WaitSandbox(ctx context.Context, r *sandboxAPI.WaitSandboxRequest) (*sandboxAPI.WaitSandboxResponse, error) {
	p, err := ss.s.podSandbox(r.SandboxID)
	if err != nil {
		return nil, err
	}
	select {
	case <-p.settled:
	case <-ctx.Done():
		return nil, errgrpc.ToGRPC(ctx.Err())
	}
	p.mu.Lock()
	sb, stoppedAt := p.sb, p.stoppedAt
	p.mu.Unlock()
	if sb == nil {
		return &sandboxAPI.WaitSandboxResponse{ExitedAt: protobuf.ToTimestamp(stoppedAt)}, nil
	}
	status, at, err := sb.Wait(ctx)
	if err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	return &sandboxAPI.WaitSandboxResponse{ExitStatus: status, ExitedAt: protobuf.ToTimestamp(at)}, nil
}

// CRI's pod states, which containerd reads SandboxStatus's state as.
var (
	sandboxReady    = criapi.PodSandboxState_SANDBOX_READY.String()
	sandboxNotReady = criapi.PodSandboxState_SANDBOX_NOTREADY.String()
)

// SandboxStatus reports the sandbox: SANDBOX_READY while its VM runs,
// SANDBOX_NOTREADY before it started and after it stopped or failed.
// Verbose adds colo's view under info["colo"], as JSON.
func (ss *sandboxService) SandboxStatus(ctx context.Context, r *sandboxAPI.SandboxStatusRequest) (*sandboxAPI.SandboxStatusResponse, error) {
	p, err := ss.s.podSandbox(r.SandboxID)
	if err != nil {
		return nil, err
	}
	p.mu.Lock()
	sb, stopped, stoppedAt := p.sb, p.stopped, p.stoppedAt
	p.mu.Unlock()
	resp := &sandboxAPI.SandboxStatusResponse{
		SandboxID: r.SandboxID,
		State:     sandboxNotReady,
		CreatedAt: protobuf.ToTimestamp(p.created),
	}
	info := map[string]any{"netns": p.pod.NetNS, "cgroup_parent": p.pod.CgroupParent}
	switch {
	case sb != nil:
		resp.Pid = uint32(sb.Pid())
		if sb.Running() {
			resp.State = sandboxReady
		}
		if at := sb.Exited(); !at.IsZero() {
			resp.ExitedAt = protobuf.ToTimestamp(at)
		}
		ids := sb.ContainerIDs()
		slices.Sort(ids)
		info["sandbox_dir"], info["hypervisor_pid"], info["containers"] = sb.Dir(), sb.Pid(), ids
	case stopped:
		resp.ExitedAt = protobuf.ToTimestamp(stoppedAt)
	}
	if r.Verbose {
		b, err := json.Marshal(info)
		if err != nil {
			return nil, errgrpc.ToGRPC(fmt.Errorf("sandbox %s: info: %w", r.SandboxID, err))
		}
		resp.Info = map[string]string{"colo": string(b)}
	}
	return resp, nil
}

// PingSandbox answers if the VM runs and its agent answers.
func (ss *sandboxService) PingSandbox(ctx context.Context, r *sandboxAPI.PingRequest) (*sandboxAPI.PingResponse, error) {
	sb, err := ss.s.startedPodSandbox(r.SandboxID)
	if err != nil {
		return nil, err
	}
	if err := sb.Ping(ctx); err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	return &sandboxAPI.PingResponse{}, nil
}

// ShutdownSandbox stops the sandbox if it runs and forgets it; the shim
// exits once it has no tasks and no other sandbox. An unknown sandbox is
// fine: containerd shuts down the shim of a sandbox whose create failed.
func (ss *sandboxService) ShutdownSandbox(ctx context.Context, r *sandboxAPI.ShutdownSandboxRequest) (*sandboxAPI.ShutdownSandboxResponse, error) {
	s := ss.s
	ctx = log.WithLogger(ctx, log.G(ctx).WithField("sandbox", r.SandboxID))
	s.mu.Lock()
	p := s.pods[r.SandboxID]
	s.mu.Unlock()
	if p != nil {
		if err := p.stop(ctx); err != nil {
			return nil, errgrpc.ToGRPC(err)
		}
		p.mu.Lock()
		p.shutdown = true
		sb := p.sb
		p.mu.Unlock()
		s.mu.Lock()
		if sb != nil && s.sandboxes[r.SandboxID] == sb {
			delete(s.sandboxes, r.SandboxID)
		}
		s.mu.Unlock()
	}
	// After the answer has gone out: containerd's sandbox controller fails
	// the pod's removal on a lost ShutdownSandbox answer (unlike a lost
	// task Shutdown answer), and the shim's exit closes the connection.
	ctx = context.WithoutCancel(ctx)
	time.AfterFunc(exitDelay, func() { s.exitIfIdle(ctx) })
	return &sandboxAPI.ShutdownSandboxResponse{}, nil
}

// exitDelay is how long the shim waits after answering ShutdownSandbox
// before it exits.
const exitDelay = 100 * time.Millisecond

// SandboxMetrics is what the pod's VM uses of the host
// (Sandbox.Metrics), in containerd's cgroup metrics types.
func (ss *sandboxService) SandboxMetrics(ctx context.Context, r *sandboxAPI.SandboxMetricsRequest) (*sandboxAPI.SandboxMetricsResponse, error) {
	sb, err := ss.s.startedPodSandbox(r.SandboxID)
	if err != nil {
		return nil, err
	}
	m, err := sb.Metrics()
	if err != nil {
		return nil, errgrpc.ToGRPC(err)
	}
	data, err := typeurl.MarshalAnyToProto(m)
	if err != nil {
		return nil, errgrpc.ToGRPC(fmt.Errorf("sandbox %s: metrics: %w", r.SandboxID, err))
	}
	return &sandboxAPI.SandboxMetricsResponse{Metrics: &types.Metric{
		Timestamp: protobuf.ToTimestamp(time.Now()),
		ID:        r.SandboxID,
		Data:      data,
	}}, nil
}
