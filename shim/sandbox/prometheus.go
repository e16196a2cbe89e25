package sandbox

import (
	"context"
	"math"
	"net/http"
	"net/http/pprof"
	"os"
	"regexp"
	"strconv"
	"time"

	cgroupsv1 "github.com/containerd/cgroups/v3/cgroup1/stats"
	cgroupsv2 "github.com/containerd/cgroups/v3/cgroup2/stats"
	"github.com/containerd/log"
	"github.com/containerd/typeurl/v2"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/colo-runtime/colo/agentproto"
	"github.com/colo-runtime/colo/internal/procfs"
)

// The metrics of the management socket's GET /metrics, in families by
// what they describe (docs/operations.md lists them):
//
//	colo_shim_*       the shim process: its task API calls, threads, fds, memory
//	colo_hypervisor_* the hypervisor process and its vCPU threads, from the host
//	colo_agent_*      the agent: its calls seen from the host, its memory
//	colo_guest_*      the guest kernel's figures, one agent call a scrape
//	colo_container_*  each container's cgroup in the guest
//	colo_sandbox_*    the VM's size
//
// Every series carries the sandbox's id and its Kubernetes pod's name,
// namespace and uid (empty outside Kubernetes), so a node's scrapes can be
// told apart without relabelling.

// collectTimeout bounds what one scrape waits for the guest.
const collectTimeout = 5 * time.Second

// ShimMetrics are the shim process's own metrics, which every sandbox
// of the shim serves: the task API's calls by method.
type ShimMetrics struct {
	rpc *prometheus.HistogramVec
}

// NewShimMetrics makes the shim's metrics.
func NewShimMetrics() *ShimMetrics {
	return &ShimMetrics{rpc: prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Name:    "colo_shim_rpc_duration_seconds",
		Help:    "Time the shim took to answer containerd's calls (task and sandbox API), by method.",
		Buckets: prometheus.ExponentialBuckets(0.0005, 4, 10), // 0.5 ms to 2 min
	}, []string{"method"})}
}

// ObserveRPC records one call of containerd's.
func (m *ShimMetrics) ObserveRPC(method string, d time.Duration) {
	if m != nil {
		m.rpc.WithLabelValues(method).Observe(d.Seconds())
	}
}

// agentRPCMetric is a sandbox's agent call latencies.
func newAgentRPCMetric() *prometheus.HistogramVec {
	return prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Name:    "colo_agent_rpc_duration_seconds",
		Help:    "Round trip of the shim's calls to the guest agent, by method, as the shim sees it (calls that wait for the guest, such as a process's exit, are left out).",
		Buckets: prometheus.ExponentialBuckets(0.0001, 4, 10), // 0.1 ms to 26 s
	}, []string{"method"})
}

// metricsHandler serves the sandbox's registry.
func (s *Sandbox) metricsHandler() http.Handler {
	reg := prometheus.NewRegistry()
	pod := s.recorded().Pod
	if pod == nil {
		pod = &PodName{}
	}
	r := prometheus.WrapRegistererWith(prometheus.Labels{
		"sandbox_id": s.id, "pod_name": pod.Name, "pod_namespace": pod.Namespace, "pod_uid": pod.UID,
	}, reg)
	r.MustRegister(shimProcess{}, s.agentRPC, sandboxCollector{s})
	if s.shimMetrics != nil {
		r.MustRegister(s.shimMetrics.rpc)
	}
	return promhttp.HandlerFor(reg, promhttp.HandlerOpts{
		// A part that fails (the guest does not answer) costs its own
		// series, not the scrape.
		ErrorHandling: promhttp.ContinueOnError,
		ErrorLog:      promLogger{},
		Timeout:       2 * collectTimeout,
	})
}

func (s *Sandbox) handleMetrics(w http.ResponseWriter, r *http.Request) {
	s.metricsOnce.Do(func() { s.metrics = s.metricsHandler() })
	s.metrics.ServeHTTP(w, r)
}

// routePprof serves Go's profiles of the shim (runtime.pprof).
func (s *Sandbox) routePprof(mux *http.ServeMux) {
	mux.HandleFunc("GET /debug/pprof/", pprof.Index)
	mux.HandleFunc("GET /debug/pprof/cmdline", pprof.Cmdline)
	mux.HandleFunc("GET /debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("GET /debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("GET /debug/pprof/trace", pprof.Trace)
}

type promLogger struct{}

func (promLogger) Println(v ...any) { log.L.Debug(v...) }

// metric makes a constant metric; names and label sets are fixed here, so
// an error is a bug in this file.
func metric(ch chan<- prometheus.Metric, name, help string, t prometheus.ValueType, v float64, labels ...string) {
	var keys, values []string
	for i := 0; i+1 < len(labels); i += 2 {
		keys, values = append(keys, labels[i]), append(values, labels[i+1])
	}
	m, err := prometheus.NewConstMetric(prometheus.NewDesc(name, help, keys, nil), t, v, values...)
	if err != nil {
		log.L.WithError(err).Warn("metric " + name)
		return
	}
	ch <- m
}

// processMetrics writes a process's usage as the family prefix's.
func processFamily(ch chan<- prometheus.Metric, prefix, what string, u procfs.Usage) {
	metric(ch, prefix+"_cpu_seconds_total", "CPU time of "+what+", by mode.", prometheus.CounterValue, float64(u.UTime)/procfs.ClockTicks, "mode", "user")
	metric(ch, prefix+"_cpu_seconds_total", "CPU time of "+what+", by mode.", prometheus.CounterValue, float64(u.STime)/procfs.ClockTicks, "mode", "system")
	metric(ch, prefix+"_resident_memory_bytes", "Resident memory of "+what+".", prometheus.GaugeValue, float64(u.RSS))
	metric(ch, prefix+"_proportional_memory_bytes", "Proportional set size (PSS) of "+what+": shared pages counted by their share.", prometheus.GaugeValue, float64(u.PSS))
	metric(ch, prefix+"_threads", "Threads of "+what+".", prometheus.GaugeValue, float64(u.Threads))
	metric(ch, prefix+"_open_fds", "Open file descriptors of "+what+".", prometheus.GaugeValue, float64(u.FDs))
	metric(ch, prefix+"_io_read_bytes_total", "Bytes "+what+" read from storage.", prometheus.CounterValue, float64(u.ReadBytes))
	metric(ch, prefix+"_io_write_bytes_total", "Bytes "+what+" wrote to storage.", prometheus.CounterValue, float64(u.WriteBytes))
}

// shimProcess is the shim process's usage.
type shimProcess struct{}

func (shimProcess) Describe(chan<- *prometheus.Desc) {} // unchecked: read at each scrape

func (shimProcess) Collect(ch chan<- prometheus.Metric) {
	u, err := procfs.ReadUsage(os.Getpid())
	if err != nil {
		return
	}
	processFamily(ch, "colo_shim", "the shim", u)
}

// sandboxCollector reads the sandbox's VM, guest and containers at each
// scrape. It is unchecked: the guest's interfaces, disks and containers
// come and go.
type sandboxCollector struct{ s *Sandbox }

func (sandboxCollector) Describe(chan<- *prometheus.Desc) {}

func (c sandboxCollector) Collect(ch chan<- prometheus.Metric) {
	s := c.s
	if !s.alive() {
		return
	}
	ctx, cancel := context.WithTimeout(s.ctx, collectTimeout)
	defer cancel()
	size := s.currentSize()
	metric(ch, "colo_sandbox_vcpus", "vCPUs of the sandbox's VM.", prometheus.GaugeValue, float64(size.vcpus))
	metric(ch, "colo_sandbox_memory_bytes", "Memory of the sandbox's VM.", prometheus.GaugeValue, float64(size.memoryMB<<20))
	if u, err := procfs.ReadUsage(s.vm.Pid()); err == nil {
		processFamily(ch, "colo_hypervisor", "the hypervisor", u)
	}
	if tids, err := s.vm.VCPUThreads(ctx); err == nil {
		for i, tid := range tids {
			st, err := procfs.ReadSchedstat(s.vm.Pid(), tid)
			if err != nil {
				continue
			}
			vcpu := strconv.Itoa(i)
			metric(ch, "colo_hypervisor_vcpu_run_seconds_total", "Time the vCPU's thread ran on a host CPU.", prometheus.CounterValue, st.Run.Seconds(), "vcpu", vcpu)
			metric(ch, "colo_hypervisor_vcpu_wait_seconds_total", "Time the vCPU's thread was ready but waited for a host CPU: the guest's steal.", prometheus.CounterValue, st.Wait.Seconds(), "vcpu", vcpu)
		}
	}
	s.collectGuest(ctx, ch)
	s.mu.Lock()
	containers := make([]*Container, 0, len(s.containers))
	for _, ct := range s.containers {
		containers = append(containers, ct)
	}
	s.mu.Unlock()
	for _, ct := range containers {
		any, err := ct.Stats(ctx)
		if err != nil {
			continue
		}
		v, err := typeurl.UnmarshalAny(any)
		if err != nil {
			continue
		}
		containerFamily(ch, ct.id, v)
	}
}

// containerFamily writes a container's cgroup statistics (cgroup v2 in
// the guest; v1 where the agent runs on such a kernel).
func containerFamily(ch chan<- prometheus.Metric, id string, v any) {
	var cpu, mem, limit, pids float64
	switch m := v.(type) {
	case *cgroupsv2.Metrics:
		cpu = float64(m.GetCPU().GetUsageUsec()) / 1e6
		mem, limit = float64(m.GetMemory().GetUsage()), float64(m.GetMemory().GetUsageLimit())
		pids = float64(m.GetPids().GetCurrent())
	case *cgroupsv1.Metrics:
		cpu = float64(m.GetCPU().GetUsage().GetTotal()) / 1e9
		mem, limit = float64(m.GetMemory().GetUsage().GetUsage()), float64(m.GetMemory().GetUsage().GetLimit())
		pids = float64(m.GetPids().GetCurrent())
	default:
		return
	}
	metric(ch, "colo_container_cpu_usage_seconds_total", "CPU time of the container's cgroup in the guest.", prometheus.CounterValue, cpu, "container_id", id)
	metric(ch, "colo_container_memory_usage_bytes", "Memory of the container's cgroup in the guest.", prometheus.GaugeValue, mem, "container_id", id)
	metric(ch, "colo_container_memory_limit_bytes", "Memory limit of the container's cgroup in the guest.", prometheus.GaugeValue, limit, "container_id", id)
	metric(ch, "colo_container_pids", "Processes and threads in the container's cgroup.", prometheus.GaugeValue, pids, "container_id", id)
}

// guestMeminfo are the /proc/meminfo fields exported, so that what the
// guest names does not become a series of its choosing.
var guestMeminfo = []string{
	"MemTotal", "MemFree", "MemAvailable", "Buffers", "Cached", "SwapCached",
	"Active", "Inactive", "Active(anon)", "Inactive(anon)", "Active(file)", "Inactive(file)",
	"Unevictable", "Mlocked", "SwapTotal", "SwapFree", "Dirty", "Writeback", "AnonPages",
	"Mapped", "Shmem", "KReclaimable", "Slab", "SReclaimable", "SUnreclaim", "KernelStack",
	"PageTables", "CommitLimit", "Committed_AS",
}

// guestDeviceName is an interface or disk name as Linux makes them; the
// guest is untrusted, and a name it sends that is not one is dropped.
var guestDeviceName = regexp.MustCompile(`^[A-Za-z0-9._@+!-]{1,31}$`)

// guestCPUs bounds the CPUs of a guest's figures.
const guestCPUs = 1024

// collectGuest writes the guest's figures, from one agent call; a guest
// that does not answer in time costs these series only. The numbers are
// the guest's and taken as such; names and label values are checked.
func (s *Sandbox) collectGuest(ctx context.Context, ch chan<- prometheus.Metric) {
	m, err := s.agent.GetMetrics(ctx, &agentproto.GetMetricsRequest{})
	if err != nil {
		log.G(ctx).WithError(err).Debug("metrics: no guest figures")
		return
	}
	gauge := func(name, help string, v float64, labels ...string) {
		if !math.IsNaN(v) && !math.IsInf(v, 0) && v >= 0 {
			metric(ch, name, help, prometheus.GaugeValue, v, labels...)
		}
	}
	counter := func(name, help string, v float64, labels ...string) {
		if !math.IsNaN(v) && !math.IsInf(v, 0) && v >= 0 {
			metric(ch, name, help, prometheus.CounterValue, v, labels...)
		}
	}
	mem := m.GetMeminfoBytes()
	for _, f := range guestMeminfo {
		if v, ok := mem[f]; ok {
			gauge("colo_guest_meminfo_bytes", "The guest's /proc/meminfo, by field.", float64(v), "field", f)
		}
	}
	cpuTimes := func(cpu string, t *agentproto.CPUTime) {
		for _, mode := range []struct {
			name string
			v    float64
		}{
			{"user", t.GetUserSeconds()}, {"nice", t.GetNiceSeconds()}, {"system", t.GetSystemSeconds()},
			{"idle", t.GetIdleSeconds()}, {"iowait", t.GetIowaitSeconds()}, {"irq", t.GetIrqSeconds()},
			{"softirq", t.GetSoftirqSeconds()}, {"steal", t.GetStealSeconds()},
		} {
			counter("colo_guest_cpu_seconds_total", "The guest's CPU time (its /proc/stat), by vCPU and mode.", mode.v, "cpu", cpu, "mode", mode.name)
		}
	}
	seen := make(map[uint32]bool)
	for _, c := range m.GetCpus() {
		if c.GetCpu() < guestCPUs && !seen[c.GetCpu()] {
			seen[c.GetCpu()] = true
			cpuTimes(strconv.Itoa(int(c.GetCpu())), c)
		}
	}
	counter("colo_guest_context_switches_total", "Context switches in the guest.", float64(m.GetContextSwitches()))
	counter("colo_guest_forks_total", "Processes and threads the guest created.", float64(m.GetForks()))
	gauge("colo_guest_procs_running", "Runnable tasks in the guest.", float64(m.GetProcsRunning()))
	gauge("colo_guest_procs_blocked", "Tasks blocked on I/O in the guest.", float64(m.GetProcsBlocked()))
	gauge("colo_guest_uptime_seconds", "Time since the guest booted.", m.GetUptimeSeconds())
	for _, l := range []struct {
		name string
		v    float64
	}{{"colo_guest_load1", m.GetLoad1()}, {"colo_guest_load5", m.GetLoad5()}, {"colo_guest_load15", m.GetLoad15()}} {
		gauge(l.name, "The guest's load average.", l.v)
	}
	names := make(map[string]bool)
	for _, n := range m.GetNetdev() {
		name := n.GetName()
		if !guestDeviceName.MatchString(name) || names["if/"+name] {
			continue
		}
		names["if/"+name] = true
		for _, c := range []struct {
			metric string
			v      uint64
		}{
			{"receive_bytes", n.GetRxBytes()}, {"receive_packets", n.GetRxPackets()}, {"receive_errors", n.GetRxErrors()}, {"receive_drops", n.GetRxDropped()},
			{"transmit_bytes", n.GetTxBytes()}, {"transmit_packets", n.GetTxPackets()}, {"transmit_errors", n.GetTxErrors()}, {"transmit_drops", n.GetTxDropped()},
		} {
			counter("colo_guest_network_"+c.metric+"_total", "The guest's network interfaces (its /proc/net/dev).", float64(c.v), "interface", name)
		}
	}
	for _, d := range m.GetDisks() {
		name := d.GetName()
		if !guestDeviceName.MatchString(name) || names["disk/"+name] {
			continue
		}
		names["disk/"+name] = true
		help := "The guest's block devices (its /proc/diskstats)."
		counter("colo_guest_disk_reads_completed_total", help, float64(d.GetReads()), "device", name)
		counter("colo_guest_disk_writes_completed_total", help, float64(d.GetWrites()), "device", name)
		counter("colo_guest_disk_read_bytes_total", help, float64(d.GetReadBytes()), "device", name)
		counter("colo_guest_disk_written_bytes_total", help, float64(d.GetWrittenBytes()), "device", name)
		counter("colo_guest_disk_read_time_seconds_total", help, float64(d.GetReadTimeMs())/1000, "device", name)
		counter("colo_guest_disk_write_time_seconds_total", help, float64(d.GetWriteTimeMs())/1000, "device", name)
		counter("colo_guest_disk_io_time_seconds_total", help, float64(d.GetIoTimeMs())/1000, "device", name)
	}
	classes := make(map[string]bool)
	for _, c := range s.colocation().classes {
		classes[c.GetName()] = true
	}
	for _, c := range m.GetClasses() {
		name := c.GetName()
		if !classes[name] {
			continue
		}
		delete(classes, name) // once each
		help := "The co-location class's cgroup in the guest."
		counter("colo_guest_class_cpu_usage_seconds_total", help, float64(c.GetCpuUsageUsec())/1e6, "class", name)
		counter("colo_guest_class_cpu_user_seconds_total", help, float64(c.GetCpuUserUsec())/1e6, "class", name)
		counter("colo_guest_class_cpu_system_seconds_total", help, float64(c.GetCpuSystemUsec())/1e6, "class", name)
		counter("colo_guest_class_cpu_throttled_periods_total", help, float64(c.GetCpuNrThrottled()), "class", name)
		counter("colo_guest_class_cpu_throttled_seconds_total", help, float64(c.GetCpuThrottledUsec())/1e6, "class", name)
		if c.MemoryCurrentBytes != nil {
			gauge("colo_guest_class_memory_bytes", help, float64(c.GetMemoryCurrentBytes()), "class", name)
		}
	}
	gauge("colo_agent_resident_memory_bytes", "Resident memory of the agent in the guest (PID 1 and its service).", float64(m.GetAgentRssBytes()))
	gauge("colo_agent_goroutines", "Goroutines of the agent's service.", float64(m.GetAgentGoroutines()))
	gauge("colo_agent_open_fds", "Open file descriptors of the agent's service.", float64(m.GetAgentOpenFds()))
	gauge("colo_guest_metrics_skipped", "Figures the agent could not read or left out in this scrape (0 when healthy).", float64(m.GetSkipped()))
}
