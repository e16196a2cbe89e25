package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/colo-runtime/colo/shim/sandbox"
	"github.com/colo-runtime/colo/testbed"
)

// The co-location benchmark (make bench-colo): an online HTTP service in a
// runc container, driven open loop from the host, beside an offline batch
// load in a runc container or a colo pod, in runs one after another (see
// colocationRuns). Everything runs under one parent cgroup, the containerd
// namespace's (/bench-colo): the service in /bench-colo/online at the
// default CPU weight, the load in /bench-colo/<id>, both where ctr puts
// them.

const (
	colocationNamespace = "bench-colo"
	// colocationConfig is added to the test bed's colo config: the pods
	// at offline priority set their own weights.
	colocationConfig = "[colocation]\nannotations = [\"io.colo.vcpus\", \"io.colo.pod-weight\", \"io.colo.overhead-idle\"]\n"

	// onlineID is the service's container, and so its cgroup's name.
	onlineID = "online"
	// onlineWork is the CPU work of one request, as measured on the idle
	// host before the runs.
	onlineWork = 2 * time.Millisecond
	// onlineShare is the share of all host CPUs the requests take at the
	// rate they are sent: enough that the service needs CPU time the load
	// wants too, not so much that it saturates on its own.
	onlineShare = 0.35
	// onlineWarmup is how long requests go before the measured window:
	// connections are made, the service's threads started.
	onlineWarmup = 2 * time.Second

	offlineThreads = 64
	// offlineSettle is how long the load runs, from its first units of
	// work, before the measured window.
	offlineSettle = 3 * time.Second
	// offlineStart bounds a load's start to its first units: a colo pod
	// boots (or restores) a VM first, under TCG here.
	offlineStart = 3 * time.Minute
	// offlineStale is how old the load's progress (written every 100 ms)
	// may be at the end of the window before the load counts as stopped.
	offlineStale = 5 * time.Second

	// yieldConfig turns the yielding controller on in colo monitor.
	yieldConfig = "\n[yield]\nenabled = true\n"
)

// offlinePriority are the annotations of a colo pod at offline priority.
var offlinePriority = []string{
	"--annotation", sandbox.PodWeightAnnotation + "=2",
	"--annotation", sandbox.VCPUsAnnotation + "=low,low",
	"--annotation", sandbox.OverheadIdleAnnotation + "=true",
}

// colocationRun is one run of the benchmark.
type colocationRun struct {
	key, name string
	online    bool
	// offline is how the load runs ("" runtime: no load).
	offline offlineSpec
	// yield runs colo monitor with the yielding controller for the run.
	yield bool
}

type offlineSpec struct {
	How     string   `json:"how"`
	Runtime string   `json:"runtime"`
	Flags   []string `json:"ctr_flags,omitempty"`
	// Reference is the run whose throughput is this one's 100%: the load
	// alone, in the same runtime.
	Reference string `json:"reference,omitempty"`
}

var (
	coloDefault    = offlineSpec{How: "colo pod, as configured by default (2 vCPUs)", Runtime: testbed.Runtime, Reference: "offline"}
	coloOffline    = offlineSpec{How: "colo pod at offline priority: pod weight 2, both vCPUs in class low, hypervisor's other threads SCHED_IDLE", Runtime: testbed.Runtime, Flags: offlinePriority, Reference: "offline"}
	runcBestEffort = offlineSpec{How: "runc container at BestEffort weight (cpu.shares 2)", Runtime: runcRuntime, Flags: []string{"--cpu-shares", "2"}, Reference: "offline-runc"}
)

// colocationRuns are the runs, in the order they are made. The load alone
// in colo is the 100% of the colo runs' throughput; the runc run has its
// own, the load alone in runc: under TCG a guest's work is far slower
// than the host's, and a share of colo's would not say what the online
// service cost the runc load.
var colocationRuns = []colocationRun{
	{key: "online", name: "online alone", online: true},
	{key: "offline", name: "offline alone in colo", offline: coloDefault},
	{key: "offline-runc", name: "offline alone in runc", offline: runcBestEffort},
	{key: "runc", name: "both, offline in runc at BestEffort weight", online: true, offline: runcBestEffort},
	{key: "colo", name: "both, offline in colo as configured", online: true, offline: coloDefault},
	{key: "colo-offline", name: "both, offline in colo at offline priority", online: true, offline: coloOffline},
	{key: "colo-yield", name: "both, offline in colo at offline priority, yielding controller on", online: true, offline: coloOffline, yield: true},
}

func colocationRunKeys() []string {
	var keys []string
	for _, r := range colocationRuns {
		keys = append(keys, r.key)
	}
	return keys
}

// selectRuns returns the runs named in list (comma-separated keys), in
// the benchmark's order.
func selectRuns(list string) ([]colocationRun, error) {
	want := map[string]bool{}
	for _, k := range strings.Split(list, ",") {
		if k = strings.TrimSpace(k); k == "" {
			continue
		}
		if !slices.Contains(colocationRunKeys(), k) {
			return nil, fmt.Errorf("-colocation-runs: no run %q (runs: %s)", k, strings.Join(colocationRunKeys(), ","))
		}
		want[k] = true
	}
	var runs []colocationRun
	for _, r := range colocationRuns {
		if want[r.key] {
			runs = append(runs, r)
		}
	}
	if len(runs) == 0 {
		return nil, fmt.Errorf("-colocation-runs: no runs given (runs: %s)", strings.Join(colocationRunKeys(), ","))
	}
	return runs, nil
}

// OfflineThroughput is what the load did in the measured window.
type OfflineThroughput struct {
	Threads int     `json:"threads"`
	Seconds float64 `json:"seconds"`
	// UnitsPerSec is all units of work per second; CPU, Mem and File
	// each kind's (batchload's doc says what a unit is).
	UnitsPerSec float64 `json:"units_per_s"`
	CPU         float64 `json:"cpu_units_per_s"`
	Mem         float64 `json:"mem_units_per_s"`
	File        float64 `json:"file_units_per_s"`
}

// ColocationResult is one run's figures.
type ColocationResult struct {
	Key  string `json:"key"`
	Name string `json:"name"`
	// Offline is how the load ran, nil without one.
	Offline *offlineSpec   `json:"offline_load,omitempty"`
	Yield   bool           `json:"yield_controller,omitempty"`
	Online  *OnlineLatency `json:"online,omitempty"`
	Sched   *SchedWaits    `json:"online_sched,omitempty"`
	// P99Ratio is the online p99 over the online service's alone.
	P99Ratio   float64            `json:"online_p99_ratio,omitempty"`
	Throughput *OfflineThroughput `json:"offline,omitempty"`
	// OfflineShare is the load's units per second as a share of its
	// reference run's.
	OfflineShare float64 `json:"offline_share,omitempty"`
}

// ColocationReport is what -colocation writes as docs/colocation.json.
type ColocationReport struct {
	Date     string            `json:"date"`
	Machine  map[string]string `json:"machine"`
	Duration string            `json:"duration_per_run"`
	// OnlineWorkMs is each request's CPU work, Iterations the work loop's
	// rounds that took that long on the idle host.
	OnlineWorkMs     float64 `json:"online_work_ms"`
	OnlineIterations uint64  `json:"online_iterations"`
	OnlineRate       float64 `json:"online_rate_per_s"`
	OfflineThreads   int     `json:"offline_threads"`
	// OnlineWarmup and OfflineSettle come before each measured window.
	OnlineWarmup  string `json:"online_warmup"`
	OfflineSettle string `json:"offline_settle"`
	// ColoConfig is added to the default colo config for every pod.
	ColoConfig string             `json:"colo_config"`
	Runs       []ColocationResult `json:"runs"`
	// NotRun are the runs -colocation-runs left out.
	NotRun []string `json:"not_run,omitempty"`
}

// colocationOptions are the -colocation flags.
type colocationOptions struct {
	out      string
	duration time.Duration
	runs     string
}

// coloBench is what every run uses.
type coloBench struct {
	cd         *testbed.Containerd
	online     string // directory with onlinesvc
	offline    string // directory with batchload
	iterations uint64
	rate       float64
	duration   time.Duration
	client     *http.Client
}

func colocation(o colocationOptions) (err error) {
	runs, err := selectRuns(o.runs)
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	cd, stopBed, err := startTestbed(ctx, testbed.Options{Namespace: colocationNamespace, ColoConfig: colocationConfig})
	if err != nil {
		return err
	}
	defer stopBed(&err)
	// runc leaves none of its cgroups behind when it deletes a container;
	// this is for a bench killed half-way.
	defer testbed.RemoveCgroup("/" + colocationNamespace + "/" + onlineID)
	b := &coloBench{cd: cd, duration: o.duration, client: newOnlineClient()}
	if slices.ContainsFunc(runs, func(r colocationRun) bool { return r.yield }) {
		// colo refuses a config it does not know: better now than after
		// the other runs.
		if err := checkYieldConfig(ctx, cd); err != nil {
			return err
		}
	}
	if b.online, err = buildTool(ctx, "onlinesvc", filepath.Join("bench", "testdata", "onlinesvc")); err != nil {
		return err
	}
	defer os.RemoveAll(b.online)
	if b.offline, err = buildTool(ctx, "batchload", filepath.Join("bench", "testdata", "batchload")); err != nil {
		return err
	}
	defer os.RemoveAll(b.offline)
	perMs, err := calibrate(ctx, filepath.Join(b.online, "onlinesvc"))
	if err != nil {
		return err
	}
	b.iterations = uint64(float64(perMs) * float64(onlineWork) / float64(time.Millisecond))
	b.rate = onlineShare * float64(runtime.NumCPU()) / onlineWork.Seconds()

	rep := ColocationReport{
		Date: time.Now().UTC().Format(time.RFC3339), Machine: machine(), Duration: o.duration.String(),
		OnlineWorkMs: ms(onlineWork), OnlineIterations: b.iterations, OnlineRate: b.rate, OfflineThreads: offlineThreads,
		OnlineWarmup: onlineWarmup.String(), OfflineSettle: offlineSettle.String(), ColoConfig: colocationConfig,
	}
	for _, r := range colocationRuns {
		if !slices.ContainsFunc(runs, func(s colocationRun) bool { return s.key == r.key }) {
			rep.NotRun = append(rep.NotRun, r.key)
		}
	}
	for i, r := range runs {
		fmt.Printf("colocation %d/%d: %s ...\n", i+1, len(runs), r.name)
		res, err := b.run(ctx, r)
		if err != nil {
			return fmt.Errorf("%s: %w", r.name, err)
		}
		rep.Runs = append(rep.Runs, res)
	}
	relate(rep.Runs)
	return writeColocation(o.out, rep)
}

// relate fills in each run's figures relative to the reference runs.
func relate(runs []ColocationResult) {
	byKey := map[string]ColocationResult{}
	for _, r := range runs {
		byKey[r.Key] = r
	}
	alone := byKey["online"].Online
	for i, r := range runs {
		if r.Online != nil && alone != nil && alone.P99 > 0 {
			runs[i].P99Ratio = r.Online.P99 / alone.P99
		}
		if r.Throughput != nil && r.Offline != nil {
			if ref := byKey[r.Offline.Reference].Throughput; ref != nil && ref.UnitsPerSec > 0 {
				runs[i].OfflineShare = r.Throughput.UnitsPerSec / ref.UnitsPerSec
			}
		}
	}
}

// calibrate asks onlinesvc, on the host and before any load, how many
// rounds of its work take a millisecond.
func calibrate(ctx context.Context, bin string) (uint64, error) {
	out, err := exec.CommandContext(ctx, bin, "calibrate").Output()
	if err != nil {
		return 0, fmt.Errorf("onlinesvc calibrate: %w", err)
	}
	var c struct {
		PerMs uint64 `json:"iterations_per_ms"`
	}
	if err := json.Unmarshal(out, &c); err != nil || c.PerMs == 0 {
		return 0, fmt.Errorf("onlinesvc calibrate printed %q: %v", out, err)
	}
	return c.PerMs, nil
}

// run makes one run: it starts what the run has, measures for the
// duration, and removes all it started, also when it fails.
func (b *coloBench) run(ctx context.Context, r colocationRun) (res ColocationResult, err error) {
	res = ColocationResult{Key: r.key, Name: r.name, Yield: r.yield}
	var (
		ids         []string // containers, started or not
		dirs        []string // host directories they mount
		stopMonitor func() error
	)
	// Clean-up runs to its end even after Ctrl-C, within its own bound:
	// the containers, then what they used, then the monitor (which saw
	// the pods to their end), then the proof that nothing is left.
	cleanupCtx := context.WithoutCancel(ctx)
	defer func() {
		cleanup, cancel := context.WithTimeout(cleanupCtx, 2*time.Minute)
		defer cancel()
		remove(cleanup, b.cd, ids...)
		b.client.CloseIdleConnections()
		for _, d := range dirs {
			os.RemoveAll(d)
		}
		if stopMonitor != nil {
			// An early exit is in err already, through ctx.
			if serr := stopMonitor(); serr != nil && !errors.Is(err, serr) {
				err = errors.Join(err, serr)
			}
		}
		if leaks := b.cd.WaitNoLeaks(cleanup, ids...); len(leaks) > 0 {
			err = errors.Join(err, fmt.Errorf("left behind: %s", strings.Join(leaks, "; ")))
		}
	}()
	if r.yield {
		var monitorCtx context.Context
		if monitorCtx, stopMonitor, err = startYieldMonitor(ctx, b.cd); err != nil {
			return res, err
		}
		ctx = monitorCtx
	}

	var url string
	var pid int
	if r.online {
		ids = append(ids, onlineID)
		if url, pid, err = b.startOnline(ctx); err != nil {
			return res, fmt.Errorf("online service: %w", err)
		}
	}
	var progress string
	if r.offline.Runtime != "" {
		id := "offline-" + r.key
		ids = append(ids, id)
		spec := r.offline
		res.Offline = &spec
		dir, err := os.MkdirTemp("", "colo-bench-progress")
		if err != nil {
			return res, err
		}
		dirs = append(dirs, dir)
		if err := b.startOffline(ctx, id, dir, r.offline); err != nil {
			return res, fmt.Errorf("offline load: %w", err)
		}
		progress = filepath.Join(dir, "progress.json")
		if err := sleepCtx(ctx, offlineSettle); err != nil {
			return res, err
		}
	}

	start := time.Now()
	from, end := start, start.Add(b.duration)
	done := make(chan OnlineLatency, 1)
	// The generator stops early when the run fails.
	genCtx, stopGen := context.WithCancel(ctx)
	defer stopGen()
	if r.online {
		from = start.Add(onlineWarmup)
		end = from.Add(b.duration)
		go func() { done <- openLoop(genCtx, b.client, url, b.rate, start, from, end) }()
	} else {
		close(done)
	}
	if err := sleepCtx(ctx, time.Until(from)); err != nil {
		stopGen()
		<-done
		return res, err
	}
	var sampler *schedSampler
	if r.online {
		sampler = startSchedSampler(pid)
	}
	var first offlineProgress
	if progress != "" {
		if first, err = readProgress(progress); err != nil {
			err = fmt.Errorf("offline load: %w", err)
		}
	}
	if err == nil {
		err = sleepCtx(ctx, time.Until(end))
	}
	if progress != "" && err == nil {
		var last offlineProgress
		if last, err = readProgress(progress); err == nil {
			stderr, _ := os.ReadFile(filepath.Join(filepath.Dir(progress), "stderr"))
			res.Throughput, err = throughput(first, last, testbed.Tail(string(stderr), 5))
		}
		if err != nil {
			err = fmt.Errorf("offline load: %w", err)
		}
	}
	if sampler != nil {
		w, serr := sampler.Stop()
		if serr != nil {
			err = errors.Join(err, fmt.Errorf("online service's schedstat: %w", serr))
		}
		res.Sched = &w
	}
	if err != nil {
		stopGen()
	}
	if l, ok := <-done; ok {
		res.Online = &l
	}
	// The monitor's early exit cancels ctx with why.
	if err == nil && ctx.Err() != nil {
		err = context.Cause(ctx)
	}
	return res, err
}

// sleepCtx sleeps d or until ctx ends, and then says why.
func sleepCtx(ctx context.Context, d time.Duration) error {
	if d <= 0 {
		return context.Cause(ctx)
	}
	select {
	case <-ctx.Done():
		return context.Cause(ctx)
	case <-time.After(d):
		return nil
	}
}

// startOnline starts onlinesvc in a runc container on the host's network
// and returns its URL and host pid once it answers.
func (b *coloBench) startOnline(ctx context.Context) (string, int, error) {
	port, err := freePort()
	if err != nil {
		return "", 0, err
	}
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
	if err := startContainer(ctx, b.cd, "--null-io", "--net-host", "--runtime", runcRuntime,
		"--mount", "type=bind,src="+b.online+",dst=/t,options=rbind:ro",
		testbed.BusyboxImage, onlineID, "/t/onlinesvc", "serve", addr, strconv.FormatUint(b.iterations, 10)); err != nil {
		return "", 0, err
	}
	url := "http://" + addr + "/"
	for deadline := time.Now().Add(30 * time.Second); ; {
		ok, err := get(ctx, b.client, url)
		if ok {
			break
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return "", 0, fmt.Errorf("%s did not answer within 30s: %v", url, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	pid, err := taskPid(ctx, b.cd, onlineID)
	return url, pid, err
}

func get(ctx context.Context, client *http.Client, url string) (bool, error) {
	ctx, cancel := context.WithTimeout(ctx, requestTimeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return false, err
	}
	resp, err := client.Do(req)
	if err != nil {
		return false, err
	}
	resp.Body.Close()
	return resp.StatusCode == http.StatusOK, fmt.Errorf("%s", resp.Status)
}

// freePort is a TCP port on 127.0.0.1 nothing listens on now.
func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// taskPid is the host pid of a container's task, from ctr task ls.
func taskPid(ctx context.Context, cd *testbed.Containerd, id string) (int, error) {
	r, err := cd.Ctr(ctx, "task", "ls")
	if err != nil || r.ExitCode != 0 {
		return 0, fmt.Errorf("ctr task ls: %v %s", err, r)
	}
	for _, line := range strings.Split(r.Stdout, "\n") {
		if f := strings.Fields(line); len(f) >= 2 && f[0] == id {
			return strconv.Atoi(f[1])
		}
	}
	return 0, fmt.Errorf("ctr task ls does not list %s: %s", id, r.Stdout)
}

// startOffline starts batchload in a container as spec says, with the
// host directory dir bind-mounted for its progress file, and returns once
// the load has done its first units of work.
func (b *coloBench) startOffline(ctx context.Context, id, dir string, spec offlineSpec) error {
	args := append([]string{"--null-io", "--runtime", spec.Runtime,
		"--mount", "type=bind,src=" + b.offline + ",dst=/t,options=rbind:ro",
		"--mount", "type=bind,src=" + dir + ",dst=/out,options=rbind:rw"}, spec.Flags...)
	// Its errors go to a file beside the progress file, for the bench to
	// show when the load stops.
	cmd := fmt.Sprintf("exec /t/batchload /out /var/tmp/batchload %d 2>/out/stderr", offlineThreads)
	if err := startContainer(ctx, b.cd, append(args, testbed.BusyboxImage, id, "sh", "-c", cmd)...); err != nil {
		return err
	}
	progress := filepath.Join(dir, "progress.json")
	for deadline := time.Now().Add(offlineStart); ; {
		p, err := readProgress(progress)
		if err == nil && p.units() > 0 {
			return nil
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			stderr, _ := os.ReadFile(filepath.Join(dir, "stderr"))
			return fmt.Errorf("no work done within %s: %v; batchload's stderr: %q", offlineStart, err, testbed.Tail(string(stderr), 5))
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// startContainer runs `ctr run -d ARGS` to its end, within offlineStart,
// even if ctx ends meanwhile, and in a process group of its own, out of
// reach of a Ctrl-C at the terminal: containerd cleans up a create cut
// short as a dead shim, and the colo shim's process stays behind. The
// caller removes the container, started or not; the error says if ctx
// ended.
func startContainer(ctx context.Context, cd *testbed.Containerd, args ...string) error {
	run, cancel := context.WithTimeout(context.WithoutCancel(ctx), offlineStart)
	defer cancel()
	cmd := cd.CtrCmd(run, append([]string{"run", "-d"}, args...)...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("ctr run: %w: %s", err, testbed.Tail(stderr.String(), 5))
	}
	return context.Cause(ctx)
}

// offlineProgress is batchload's progress file (batchload.Progress) and
// when it was written.
type offlineProgress struct {
	Threads int    `json:"threads"`
	CPU     uint64 `json:"cpu"`
	Mem     uint64 `json:"mem"`
	File    uint64 `json:"file"`
	Errors  uint64 `json:"errors"`
	Error   string `json:"error"`
	// written is the file's modification time, read when it was read.
	written, read time.Time
}

func (p offlineProgress) units() uint64 { return p.CPU + p.Mem + p.File }

// readProgress reads the progress file and its modification time from one
// open file: batchload replaces it whole every 100 ms, and the time it was
// written, by the host's clock, is the time its counts are of.
func readProgress(path string) (offlineProgress, error) {
	var p offlineProgress
	f, err := os.Open(path)
	if err != nil {
		return p, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return p, err
	}
	var buf bytes.Buffer
	if _, err := buf.ReadFrom(f); err != nil {
		return p, err
	}
	if err := json.Unmarshal(buf.Bytes(), &p); err != nil {
		return p, fmt.Errorf("%s: %w", path, err)
	}
	if p.Errors > 0 {
		return p, fmt.Errorf("%d units of work failed, the first: %s", p.Errors, p.Error)
	}
	p.written, p.read = st.ModTime(), time.Now()
	return p, nil
}

// throughput is the load's work between two reads of its progress file;
// stderr is what it said, for when it did nothing.
func throughput(first, last offlineProgress, stderr string) (*OfflineThroughput, error) {
	secs := last.written.Sub(first.written).Seconds()
	if secs <= 0 || last.units() <= first.units() {
		return nil, fmt.Errorf("no progress in the measured window (%d units at %s, %d at %s); batchload's stderr: %q",
			first.units(), first.written.Format(time.StampMilli), last.units(), last.written.Format(time.StampMilli), stderr)
	}
	// A load that died in the window (a guest's OOM kill says nothing on
	// its stderr) made progress until then.
	if stale := last.read.Sub(last.written); stale > offlineStale {
		return nil, fmt.Errorf("the load stopped in the measured window: its progress is %s old at the end (OOM kills in a guest are in containerd's log); batchload's stderr: %q",
			stale.Round(time.Millisecond), stderr)
	}
	return &OfflineThroughput{
		Threads:     last.Threads,
		Seconds:     secs,
		UnitsPerSec: float64(last.units()-first.units()) / secs,
		CPU:         float64(last.CPU-first.CPU) / secs,
		Mem:         float64(last.Mem-first.Mem) / secs,
		File:        float64(last.File-first.File) / secs,
	}, nil
}
