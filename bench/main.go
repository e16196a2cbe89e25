// Command bench measures what users compare between runtimes, colo beside
// runc in the same run on the same private containerd: cold start to the
// first byte of output, colo's start stages, host memory per pod, parallel
// starts and exec latency. `make bench` runs it and writes
// docs/benchmarks.md, docs/benchmarks.json and docs/benchmarks.png.
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"regexp"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/colo-runtime/colo/shim/sandbox"
	"github.com/colo-runtime/colo/testbed"
)

const runcRuntime = "io.containerd.runc.v2"

func main() {
	var o options
	flag.IntVar(&o.runs, "n", 5, "runs of each sequential measurement, per runtime")
	flag.IntVar(&o.pods, "pods", 10, "pods for the memory and parallel-start measurements")
	flag.StringVar(&o.out, "out", "docs", "directory for benchmarks.{md,json,png}")
	flag.StringVar(&o.coloConfig, "colo-config", "", "extra colo config (TOML) for the runs, e.g. '[hypervisor]\nmachine = \"microvm\"'")
	colo := flag.Bool("colocation", false, "run the co-location benchmark instead (make bench-colo): docs/colocation.{md,json,png}")
	ioOnly := flag.Bool("io", false, "measure only file I/O in a container's rootfs and print its table (docs are not written)")
	coloDuration := flag.Duration("colocation-duration", 45*time.Second, "how long each co-location run measures")
	coloRuns := flag.String("colocation-runs", strings.Join(colocationRunKeys(), ","), "the co-location runs to make (comma-separated, made in the benchmark's order)")
	flag.Parse()
	var err error
	switch {
	case *colo:
		err = colocation(colocationOptions{out: o.out, duration: *coloDuration, runs: *coloRuns})
	case *ioOnly:
		err = runIO(o)
	default:
		err = run(o)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
}

type options struct {
	runs, pods int
	out        string
	coloConfig string
}

// variant is colo with one optimisation turned off, measured in the same
// run for its before/after figures.
type variant struct {
	Name   string `json:"name"`
	Config string `json:"config"`
}

// variants are measured only with the default configuration (no
// -colo-config): their TOML would clash with it.
var variants = []variant{
	{"VMs boot instead of starting from a template", "[hypervisor]\ntemplate = false\n"},
	{"virtio-fs instead of 9p", "[storage]\nshared_fs = \"virtio-fs\"\n"},
	{"1 vCPU instead of 2", "[hypervisor]\nvcpus = 1\n"},
}

// VariantResult is what one variant measured.
type VariantResult struct {
	variant
	FirstStart float64          `json:"first_start_ms"`
	Cold       Stats            `json:"cold_start"`
	Stages     map[string]Stats `json:"start_stages"`
	IdlePodPSS float64          `json:"idle_pod_pss_mib"`
	// Configured is colo as configured, started alternately with the
	// variant's starts: drift on the machine hits both alike.
	Configured       Stats            `json:"configured_cold_start"`
	ConfiguredStages map[string]Stats `json:"configured_start_stages"`
}

// Stats summarises samples in milliseconds.
type Stats struct {
	N      int       `json:"n"`
	Median float64   `json:"median_ms"`
	Min    float64   `json:"min_ms"`
	Max    float64   `json:"max_ms"`
	P99    float64   `json:"p99_ms"`
	All    []float64 `json:"samples_ms"`
}

func summarize(d []time.Duration) Stats {
	v := make([]float64, len(d))
	for i, x := range d {
		v[i] = ms(x)
	}
	sort.Float64s(v)
	s := Stats{N: len(v), All: v}
	if len(v) == 0 {
		return s
	}
	s.Min, s.Max = v[0], v[len(v)-1]
	s.Median = percentile(v, 50)
	s.P99 = percentile(v, 99)
	return s
}

// percentile of sorted samples, nearest rank.
func percentile(sorted []float64, p float64) float64 {
	rank := int(p/100*float64(len(sorted))+0.999999) - 1
	rank = max(0, min(rank, len(sorted)-1))
	return sorted[rank]
}

// Report is everything bench measured.
type Report struct {
	Date       string            `json:"date"`
	Machine    map[string]string `json:"machine"`
	Runs       int               `json:"runs"`
	ColoConfig string            `json:"colo_config,omitempty"`
	Pods       int               `json:"pods"`
	Cold       map[string]Stats  `json:"cold_start"`
	Ratio      float64           `json:"cold_start_ratio_colo_runc"`
	Stages     map[string]Stats  `json:"colo_start_stages"`
	Memory     Memory            `json:"memory"`
	Parallel   map[string]Stats  `json:"parallel_start"`
	// StartCPU is the host CPU time of one cold start, to its first
	// output (all processes: containerd, shim, QEMU, ctr).
	StartCPU map[string]Stats `json:"start_cpu"`
	// ParallelIdeal is the CPU-bound ideal of the parallel start, in ms:
	// pods x the median StartCPU / the host's CPUs.
	ParallelIdeal map[string]float64 `json:"parallel_start_cpu_bound_ideal_ms"`
	Exec          map[string]Stats   `json:"exec_latency"`
	// FirstStart is the first colo start on the host: it makes the VM
	// template the later starts are restored from.
	FirstStart float64 `json:"first_start_ms"`
	// AgentRTT is one agent call's round trip, as the shim logs it.
	AgentRTT Stats           `json:"agent_rtt"`
	Variants []VariantResult `json:"variants,omitempty"`
	// Resize is the cost of sizing VMs to their pods and resizing them.
	Resize *Resize `json:"resize,omitempty"`
	// IO is file I/O in a container's rootfs, by how the rootfs is
	// stored.
	IO []IORow `json:"io,omitempty"`
	// NotMeasured says which measurements failed, and why.
	NotMeasured []string `json:"not_measured,omitempty"`
	// FailedStarts are the timed starts that failed, with their errors:
	// left out of the figures, and reported.
	FailedStarts []string `json:"failed_starts,omitempty"`
}

// Memory per pod, in MiB.
type Memory struct {
	IdlePodPSS float64 `json:"idle_pod_pss_mib"`
	ShimPSS    float64 `json:"shim_pss_mib"`
	ShimRSS    float64 `json:"shim_rss_mib"`
	// ShimPSSStarting is the shim's PSS right after the create, before it
	// lets go of its start-up pages.
	ShimPSSStarting float64  `json:"shim_pss_starting_mib"`
	ShimPSSAtN      float64  `json:"shim_pss_mib_with_n_pods"`
	AgentRSS        float64  `json:"agent_rss_mib"`
	GuestUsed       float64  `json:"guest_used_mib"`
	HypervisorPSS   float64  `json:"hypervisor_pss_mib"`
	HelpersPSS      float64  `json:"helpers_pss_mib"`
	PerPodPSSAtN    float64  `json:"per_pod_pss_mib_with_n_pods"`
	RuncShimPSS     float64  `json:"runc_shim_pss_mib"`
	GuestMemoryMiB  int      `json:"guest_memory_mib"`
	MeasuredProcess []string `json:"measured_processes"`
}

func run(o options) (err error) {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	cd, stopBed, err := startTestbed(ctx, testbed.Options{Namespace: "bench", ColoConfig: o.coloConfig, BlockfileMB: ioBlockfileMB})
	if err != nil {
		return err
	}
	defer stopBed(&err)
	rep := Report{
		Date: time.Now().UTC().Format(time.RFC3339), Machine: machine(), Runs: o.runs, Pods: o.pods, ColoConfig: o.coloConfig,
		Cold: map[string]Stats{}, Stages: map[string]Stats{}, Parallel: map[string]Stats{}, Exec: map[string]Stats{},
		StartCPU: map[string]Stats{}, ParallelIdeal: map[string]float64{},
	}
	rts := map[string]string{"runc": runcRuntime, "colo": testbed.Runtime}

	fmt.Println("first start (makes the VM template) ...")
	first, err := firstOutput(ctx, cd, testbed.Runtime, "first", nil)
	if err != nil {
		return err
	}
	rep.FirstStart = ms(first)

	// Cold start, alternating so that drift on the machine hits both.
	fmt.Println("cold start ...")
	cold := map[string][]time.Duration{}
	coldCPU := map[string][]time.Duration{}
	var coloIDs []string
	for i := range o.runs {
		for _, name := range []string{"runc", "colo"} {
			id := fmt.Sprintf("cold-%s-%d", name, i)
			d, cpu, err := timedStart(ctx, cd, rts[name], id, nil)
			if err != nil {
				rep.failed(ctx, cd, id, err)
				continue
			}
			cold[name] = append(cold[name], d)
			coldCPU[name] = append(coldCPU[name], cpu)
			if name == "colo" {
				coloIDs = append(coloIDs, id)
			}
		}
	}
	for name, d := range cold {
		rep.Cold[name] = summarize(d)
		rep.StartCPU[name] = summarize(coldCPU[name])
	}
	if rep.Cold["runc"].Median > 0 {
		rep.Ratio = rep.Cold["colo"].Median / rep.Cold["runc"].Median
	}
	for stage, d := range stages(cd.Logs(), coloIDs) {
		rep.Stages[stage] = summarize(d)
	}

	fmt.Println("exec latency ...")
	for name, rt := range rts {
		d, err := execLatency(ctx, cd, rt, "exec-"+name, o.runs)
		if err != nil {
			rep.NotMeasured = append(rep.NotMeasured, fmt.Sprintf("exec latency (%s): %v", name, err))
			continue
		}
		rep.Exec[name] = summarize(d)
	}

	fmt.Println("memory ...")
	if rep.Memory, err = memory(ctx, cd, o.pods, nil); err != nil {
		return err
	}
	fmt.Println("agent round trip ...")
	if rtts, err := agentRTT(ctx, cd, o.runs); err != nil {
		rep.NotMeasured = append(rep.NotMeasured, fmt.Sprintf("agent round trip: %v", err))
	} else {
		rep.AgentRTT = summarize(rtts)
	}

	fmt.Println("resize ...")
	if rz, err := measureResize(ctx, cd, min(o.runs, 5)); err != nil {
		rep.NotMeasured = append(rep.NotMeasured, fmt.Sprintf("resize: %v", err))
	} else {
		rep.Resize = &rz
	}

	fmt.Println("file I/O ...")
	if rep.IO, err = measureIO(ctx, cd); err != nil {
		rep.NotMeasured = append(rep.NotMeasured, fmt.Sprintf("file I/O: %v", err))
	}

	fmt.Println("parallel start ...")
	for name, rt := range rts {
		d, err := parallelStart(ctx, cd, rt, name, o.pods)
		if err != nil {
			return err
		}
		rep.Parallel[name] = summarize(d)
		// Were starts bound by CPU alone, n of them on the host's CPUs
		// would all be done after n times one start's CPU time spread
		// over the CPUs.
		rep.ParallelIdeal[name] = float64(o.pods) * rep.StartCPU[name].Median / float64(runtime.NumCPU())
	}

	if o.coloConfig == "" {
		for i, v := range variants {
			fmt.Printf("variant: %s ...\n", v.Name)
			r, err := measureVariant(ctx, cd, v, fmt.Sprintf("v%d", i), min(o.runs, 4), &rep)
			if err != nil {
				return fmt.Errorf("variant %q: %w", v.Name, err)
			}
			rep.Variants = append(rep.Variants, r)
		}
	}
	return write(o.out, rep)
}

// startTestbed starts a private containerd with the busybox image. Its
// stop checks that nothing was left behind and joins what went wrong into
// *err, unless *err is set already.
func startTestbed(ctx context.Context, opts testbed.Options) (*testbed.Containerd, func(*error), error) {
	cd, err := testbed.Start(ctx, opts)
	if err != nil {
		return nil, nil, err
	}
	stop := func(err *error) {
		leaks := cd.WaitNoLeaks(ctx)
		if stopErr := cd.Stop(); *err == nil {
			*err = stopErr
		}
		if *err == nil && len(leaks) > 0 {
			*err = fmt.Errorf("left behind: %s", strings.Join(leaks, "; "))
		}
	}
	if err := cd.ImportBusybox(ctx); err != nil {
		stop(&err)
		return nil, nil, err
	}
	return cd, stop, nil
}

// measureVariant starts colo with the variant's config: a first start,
// then n timed cold starts, each after one of colo as configured, and an
// idle pod's memory.
func measureVariant(ctx context.Context, cd *testbed.Containerd, v variant, prefix string, n int, rep *Report) (VariantResult, error) {
	r := VariantResult{variant: v, Stages: map[string]Stats{}, ConfiguredStages: map[string]Stats{}}
	path, err := cd.WriteColoConfig("bench-"+prefix, v.Config)
	if err != nil {
		return r, err
	}
	flags := []string{"--runtime-config-path", path}
	first, err := firstOutput(ctx, cd, testbed.Runtime, prefix+"-first", flags)
	if err != nil {
		return r, err
	}
	r.FirstStart = ms(first)
	var d, base []time.Duration
	var ids, baseIDs []string
	for i := range n {
		id := fmt.Sprintf("%s-base-%d", prefix, i)
		if b, err := firstOutput(ctx, cd, testbed.Runtime, id, nil); err != nil {
			rep.failed(ctx, cd, id, err)
		} else {
			base, baseIDs = append(base, b), append(baseIDs, id)
		}
		id = fmt.Sprintf("%s-cold-%d", prefix, i)
		if v, err := firstOutput(ctx, cd, testbed.Runtime, id, flags); err != nil {
			rep.failed(ctx, cd, id, err)
		} else {
			d, ids = append(d, v), append(ids, id)
		}
	}
	r.Cold, r.Configured = summarize(d), summarize(base)
	logs := cd.Logs()
	for stage, d := range stages(logs, ids) {
		r.Stages[stage] = summarize(d)
	}
	for stage, d := range stages(logs, baseIDs) {
		r.ConfiguredStages[stage] = summarize(d)
	}
	m, err := memory(ctx, cd, 1, flags)
	if err != nil {
		return r, err
	}
	r.IdlePodPSS = m.IdlePodPSS
	return r, nil
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// failed records a timed start that failed and removes what it left.
func (r *Report) failed(ctx context.Context, cd *testbed.Containerd, id string, err error) {
	fmt.Printf("  start %s failed: %v\n", id, err)
	// The guest's side, for whoever reads the run's output.
	for _, line := range strings.Split(cd.Logs(), "\n") {
		if strings.Contains(line, "sandbox="+id) && strings.Contains(line, "console") {
			fmt.Printf("  %s\n", line)
		}
	}
	r.FailedStarts = append(r.FailedStarts, fmt.Sprintf("%s: %v", id, err))
	remove(ctx, cd, id)
}

// firstOutput times `ctr run --rm` from the call to the first byte the
// container prints, then waits for the run to finish.
func firstOutput(ctx context.Context, cd *testbed.Containerd, rt, id string, flags []string) (time.Duration, error) {
	first, _, err := timedStart(ctx, cd, rt, id, flags)
	return first, err
}

// timedStart is firstOutput that also returns the host's CPU time (all
// CPUs, every process) spent from the run's start to its first output.
func timedStart(ctx context.Context, cd *testbed.Containerd, rt, id string, flags []string) (first, cpu time.Duration, err error) {
	args := append([]string{"run", "--rm", "--runtime", rt}, flags...)
	cmd := cd.CtrCmd(ctx, append(args, testbed.BusyboxImage, id, "echo", "ready")...)
	out, err := cmd.StdoutPipe()
	if err != nil {
		return 0, 0, err
	}
	var stderr strings.Builder
	cmd.Stderr = &stderr
	busy0, err := hostBusy()
	if err != nil {
		return 0, 0, err
	}
	start := time.Now()
	if err := cmd.Start(); err != nil {
		return 0, 0, err
	}
	b := make([]byte, 1)
	if n, _ := out.Read(b); n == 1 {
		first = time.Since(start)
		busy1, err := hostBusy()
		if err != nil {
			return 0, 0, err
		}
		cpu = busy1 - busy0
	}
	io.Copy(io.Discard, out)
	if err := cmd.Wait(); err != nil || first == 0 {
		return 0, 0, fmt.Errorf("ctr run %s (%s): %v: %s", id, rt, err, stderr.String())
	}
	return first, cpu, nil
}

// hostBusy is the CPU time the host's CPUs spent not idle since boot
// (/proc/stat: all but idle and iowait).
func hostBusy() (time.Duration, error) {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0, err
	}
	line, _, _ := strings.Cut(string(b), "\n")
	f := strings.Fields(line)
	if len(f) < 8 || f[0] != "cpu" {
		return 0, fmt.Errorf("/proc/stat: unexpected first line %q", line)
	}
	var busy uint64
	for i, v := range f[1:8] { // user nice system idle iowait irq softirq
		if i == 3 || i == 4 {
			continue
		}
		n, err := strconv.ParseUint(v, 10, 64)
		if err != nil {
			return 0, fmt.Errorf("/proc/stat: %w", err)
		}
		busy += n
	}
	// USER_HZ is 100 on Linux.
	return time.Duration(busy) * 10 * time.Millisecond, nil
}

// guestLine matches the shim's "guest" log line of a sandbox.
var guestLine = regexp.MustCompile(`msg=guest .*?agent_rss=([0-9]+) agent_rtt=([0-9.]+[a-zµ]+) .*?mem_used=([0-9]+) .*?sandbox=(\S+)`)

type guest struct {
	rtt            time.Duration
	agentRSS, used float64 // MiB
}

// guests reads the shim's "guest" lines of the given sandboxes (nil: of
// all).
func guests(logs string, ids []string) map[string]guest {
	want := map[string]bool{}
	for _, id := range ids {
		want[id] = true
	}
	out := map[string]guest{}
	for _, line := range strings.Split(logs, "\n") {
		m := guestLine.FindStringSubmatch(line)
		if m == nil || ids != nil && !want[m[4]] {
			continue
		}
		rss, _ := strconv.ParseFloat(m[1], 64)
		used, _ := strconv.ParseFloat(m[3], 64)
		rtt, _ := time.ParseDuration(m[2])
		out[m[4]] = guest{rtt: rtt, agentRSS: rss / (1 << 20), used: used / (1 << 20)}
	}
	return out
}

// stageLine matches the shim's "start stage" log lines.
var stageLine = regexp.MustCompile(`msg="start stage".*?elapsed=([0-9.]+[a-zµ]+).*?sandbox=(\S+).*?stage=(\S+)`)

// stages reads the shim's start stage timestamps for the given sandboxes
// from containerd's log: time since Create began, per stage.
func stages(logs string, ids []string) map[string][]time.Duration {
	want := map[string]bool{}
	for _, id := range ids {
		want[id] = true
	}
	out := map[string][]time.Duration{}
	for _, line := range strings.Split(logs, "\n") {
		m := stageLine.FindStringSubmatch(line)
		if m == nil || !want[m[2]] {
			continue
		}
		if d, err := time.ParseDuration(m[1]); err == nil {
			out[m[3]] = append(out[m[3]], d)
		}
	}
	return out
}

func execLatency(ctx context.Context, cd *testbed.Containerd, rt, id string, n int) ([]time.Duration, error) {
	if r, err := cd.Ctr(ctx, "run", "-d", "--null-io", "--runtime", rt, testbed.BusyboxImage, id, "sleep", "100000"); err != nil || r.ExitCode != 0 {
		return nil, fmt.Errorf("start %s: %v %s", id, err, r)
	}
	defer remove(ctx, cd, id)
	var d []time.Duration
	for i := range n {
		start := time.Now()
		r, err := cd.Ctr(ctx, "task", "exec", "--exec-id", "e"+strconv.Itoa(i), id, "true")
		if err != nil || r.ExitCode != 0 {
			return nil, fmt.Errorf("exec in %s: %v %s", id, err, r)
		}
		d = append(d, time.Since(start))
	}
	return d, nil
}

func remove(ctx context.Context, cd *testbed.Containerd, ids ...string) {
	for _, id := range ids {
		cd.Ctr(ctx, "task", "rm", "-f", id)
		cd.Ctr(ctx, "container", "rm", id)
	}
}

// agentRTT starts n pods one after another, each alone on the host, and
// returns the agent round trip each one's shim logged: the median of
// its back-to-back calls, made a second after the create, once the pod is
// idle (Sandbox.logGuest).
func agentRTT(ctx context.Context, cd *testbed.Containerd, n int) ([]time.Duration, error) {
	var rtts []time.Duration
	for i := range n {
		id := fmt.Sprintf("rtt-%d", i)
		r, err := cd.Ctr(ctx, "run", "-d", "--null-io", "--runtime", testbed.Runtime, testbed.BusyboxImage, id, "sleep", "100000")
		if err == nil && r.ExitCode != 0 {
			err = errors.New(r.String())
		}
		if err != nil {
			return nil, fmt.Errorf("start %s: %w", id, err)
		}
		g, err := waitGuestLine(ctx, cd, id)
		remove(ctx, cd, id)
		if err != nil {
			return nil, err
		}
		rtts = append(rtts, g.rtt)
	}
	return rtts, nil
}

// waitGuestLine waits for the shim's "guest" line of sandbox id.
func waitGuestLine(ctx context.Context, cd *testbed.Containerd, id string) (guest, error) {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	for {
		if g, ok := guests(cd.Logs(), []string{id})[id]; ok {
			return g, nil
		}
		select {
		case <-ctx.Done():
			return guest{}, fmt.Errorf("no guest line from %s's shim: %w", id, ctx.Err())
		case <-time.After(200 * time.Millisecond):
		}
	}
}

func parallelStart(ctx context.Context, cd *testbed.Containerd, rt, name string, n int) ([]time.Duration, error) {
	var (
		wg   sync.WaitGroup
		mu   sync.Mutex
		d    []time.Duration
		errs []error
	)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			v, err := firstOutput(ctx, cd, rt, fmt.Sprintf("par-%s-%d", name, i), nil)
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				errs = append(errs, err)
				return
			}
			d = append(d, v)
		}()
	}
	wg.Wait()
	return d, errors.Join(errs...)
}

// memory measures host memory of idle pods: one pod alone, then n at once
// (with n > 1). flags are more ctr run flags.
func memory(ctx context.Context, cd *testbed.Containerd, n int, flags []string) (Memory, error) {
	var m Memory
	m.GuestMemoryMiB = 256
	start := func(id string) error {
		args := append([]string{"run", "-d", "--null-io", "--runtime", testbed.Runtime}, flags...)
		r, err := cd.Ctr(ctx, append(args, testbed.BusyboxImage, id, "sleep", "100000")...)
		if err == nil && r.ExitCode != 0 {
			err = errors.New(r.String())
		}
		if err != nil {
			return fmt.Errorf("start %s: %w", id, err)
		}
		return nil
	}
	prefix := "mem"
	if len(flags) > 0 {
		prefix = "mem-variant"
	}
	one := prefix + "-0"
	if err := start(one); err != nil {
		return m, err
	}
	ids := []string{one}
	defer func() { remove(ctx, cd, ids...) }()
	for _, pid := range cd.ShimPids(one) {
		m.ShimPSSStarting, _ = smaps(pid)
	}
	time.Sleep(3 * time.Second) // let the guest settle, and the shim let go of its start-up pages
	procs := podProcesses(cd, one)
	for _, p := range procs {
		pss, rss := smaps(p.pid)
		m.IdlePodPSS += pss
		m.MeasuredProcess = append(m.MeasuredProcess, p.kind)
		switch p.kind {
		case "shim":
			m.ShimPSS, m.ShimRSS = pss, rss
		case "qemu":
			m.HypervisorPSS += pss
		default:
			m.HelpersPSS += pss
		}
	}
	if g, ok := guests(cd.Logs(), []string{one})[one]; ok {
		m.AgentRSS, m.GuestUsed = g.agentRSS, g.used
	}
	if n <= 1 {
		return m, nil
	}
	runcID := "mem-runc"
	if r, err := cd.Ctr(ctx, "run", "-d", "--null-io", "--runtime", runcRuntime, testbed.BusyboxImage, runcID, "sleep", "100000"); err == nil && r.ExitCode == 0 {
		ids = append(ids, runcID)
		for _, pid := range cd.RuncShimPids(runcID) {
			pss, _ := smaps(pid)
			m.RuncShimPSS += pss
		}
	}
	for i := 1; i < n; i++ {
		id := fmt.Sprintf("%s-%d", prefix, i)
		if err := start(id); err != nil {
			return m, err
		}
		ids = append(ids, id)
	}
	time.Sleep(2 * time.Second)
	var total, shims float64
	for i := range n {
		for _, p := range podProcesses(cd, fmt.Sprintf("%s-%d", prefix, i)) {
			pss, _ := smaps(p.pid)
			total += pss
			if p.kind == "shim" {
				shims += pss
			}
		}
	}
	m.PerPodPSSAtN = total / float64(n)
	m.ShimPSSAtN = shims / float64(n)
	return m, nil
}

type podProcess struct {
	pid  int
	kind string
}

// podProcesses finds the shim, QEMU and helpers of one colo pod.
func podProcesses(cd *testbed.Containerd, id string) []podProcess {
	var out []podProcess
	for _, pid := range cd.ShimPids(id) {
		out = append(out, podProcess{pid, "shim"})
	}
	for _, p := range testbed.ProcessesMentioning(filepath.Join(cd.StateDir, cd.Namespace, sandbox.DirName(id)) + "/") {
		kind := "helper"
		if strings.Contains(p.Cmdline, "qemu-system") {
			kind = "qemu"
		} else if strings.Contains(p.Cmdline, "virtiofsd") {
			kind = "virtiofsd"
		}
		out = append(out, podProcess{p.Pid, kind})
	}
	return out
}

// smaps returns a process's PSS and RSS in MiB.
func smaps(pid int) (pss, rss float64) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/smaps_rollup", pid))
	if err != nil {
		return 0, 0
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 2 {
			continue
		}
		kb, _ := strconv.ParseFloat(fields[1], 64)
		switch fields[0] {
		case "Pss:":
			pss = kb / 1024
		case "Rss:":
			rss = kb / 1024
		}
	}
	return pss, rss
}

func machine() map[string]string {
	m := map[string]string{"go": runtime.Version(), "cpus": strconv.Itoa(runtime.NumCPU())}
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "model name" {
				m["cpu"] = strings.TrimSpace(v)
				break
			}
		}
	}
	for name, args := range map[string][]string{
		"kernel": {"uname", "-r"}, "qemu": {"qemu-system-x86_64", "--version"},
	} {
		if out, err := exec.Command(args[0], args[1:]...).Output(); err == nil {
			m[name] = strings.SplitN(strings.TrimSpace(string(out)), "\n", 2)[0]
		}
	}
	return m
}

func write(dir string, rep Report) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	b, err := json.MarshalIndent(rep, "", "  ")
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, "benchmarks.json"), append(b, '\n'), 0o644); err != nil {
		return err
	}
	md := markdown(rep)
	fmt.Print(md)
	if err := os.WriteFile(filepath.Join(dir, "benchmarks.md"), []byte(md), 0o644); err != nil {
		return err
	}
	return chart(filepath.Join(dir, "benchmarks.png"), rep)
}

func markdown(r Report) string {
	var b strings.Builder
	fmt.Fprintf(&b, "# colo benchmarks\n\nWritten by `make bench` on %s. Machine: %s, %s CPUs, host kernel %s, %s, %s.\n",
		r.Date, r.Machine["cpu"], r.Machine["cpus"], r.Machine["kernel"], r.Machine["qemu"], r.Machine["go"])
	b.WriteString("Every figure is colo beside runc measured in the same run on the same private containerd. ")
	b.WriteString("On this machine guests run under TCG (no usable KVM), so absolute VM times are TCG times.\n\n")
	if r.ColoConfig != "" {
		fmt.Fprintf(&b, "colo config for this run:\n\n```toml\n%s\n```\n\n", r.ColoConfig)
	}
	fmt.Fprintf(&b, "## Cold start: `ctr run --rm` to the first byte of output (%d runs each, alternating)\n\n", r.Runs)
	b.WriteString("| runtime | median ms | min ms | max ms |\n|---|---|---|---|\n")
	for _, name := range []string{"runc", "colo"} {
		s := r.Cold[name]
		fmt.Fprintf(&b, "| %s | %.0f | %.0f | %.0f |\n", name, s.Median, s.Min, s.Max)
	}
	fmt.Fprintf(&b, "\ncolo/runc median ratio: **%.1f**\n\n", r.Ratio)
	fmt.Fprintf(&b, "The first colo start on the host took %.0f ms: it boots a guest and saves it as the VM template the "+
		"later starts are restored from (one per VM configuration and guest image, kept until removed).\n\n", r.FirstStart)
	b.WriteString("## colo start stages (time since the shim's Create began)\n\n")
	stageTable(&b, r.Stages)
	fmt.Fprintf(&b, "\nOne agent call's round trip (ttrpc over virtio-serial; %d pods started one after another, each alone on the host; "+
		"each pod's shim times 21 calls in a row a second after the create, and logs their median): median of the pods %.2f ms (%.2f to %.2f ms).\n",
		r.AgentRTT.N, r.AgentRTT.Median, r.AgentRTT.Min, r.AgentRTT.Max)
	m := r.Memory
	fmt.Fprintf(&b, "\n## Host memory per idle pod (guest memory %d MiB)\n\n| what | MiB |\n|---|---|\n", m.GuestMemoryMiB)
	fmt.Fprintf(&b, "| one idle pod, PSS of shim + QEMU + helpers | %.1f |\n| QEMU PSS | %.1f |\n| helpers (virtiofsd) PSS | %.1f |\n", m.IdlePodPSS, m.HypervisorPSS, m.HelpersPSS)
	fmt.Fprintf(&b, "| colo shim PSS (RSS) | %.1f (%.1f) |\n| colo shim PSS right after the create | %.1f |\n", m.ShimPSS, m.ShimRSS, m.ShimPSSStarting)
	fmt.Fprintf(&b, "| runc shim PSS, for comparison | %.1f |\n", m.RuncShimPSS)
	fmt.Fprintf(&b, "| per pod with %d pods running, PSS (of which the shim) | %.1f (%.1f) |\n", r.Pods, m.PerPodPSSAtN, m.ShimPSSAtN)
	fmt.Fprintf(&b, "| in the guest: the agent's RSS (PID 1 and the service) | %.1f |\n| in the guest: memory in use (MemTotal - MemAvailable) | %.1f |\n", m.AgentRSS, m.GuestUsed)
	fmt.Fprintf(&b, "\n## Parallel start: %d pods at once, time to first output\n\n", r.Pods)
	fmt.Fprintf(&b, "The CPU-bound ideal: were the starts bound by CPU alone, %d of them would all be done after %d times one cold start's host CPU time "+
		"(median, all processes, to the first output) spread over the host's %s CPUs.\n\n", r.Pods, r.Pods, r.Machine["cpus"])
	b.WriteString("| runtime | p50 ms | p99 ms | max ms | one start's CPU ms | CPU-bound ideal ms | p99 / ideal |\n|---|---|---|---|---|---|---|\n")
	for _, name := range []string{"runc", "colo"} {
		s, ideal := r.Parallel[name], r.ParallelIdeal[name]
		ratio := 0.0
		if ideal > 0 {
			ratio = s.P99 / ideal
		}
		fmt.Fprintf(&b, "| %s | %.0f | %.0f | %.0f | %.0f | %.0f | %.2f |\n", name, s.Median, s.P99, s.Max, r.StartCPU[name].Median, ideal, ratio)
	}
	fmt.Fprintf(&b, "\n## Exec latency: `ctr task exec ... true` (%d runs)\n\n| runtime | median ms | min ms | max ms |\n|---|---|---|---|\n", r.Runs)
	for _, name := range []string{"runc", "colo"} {
		s := r.Exec[name]
		fmt.Fprintf(&b, "| %s | %.0f | %.0f | %.0f |\n", name, s.Median, s.Min, s.Max)
	}
	if len(r.Variants) > 0 {
		b.WriteString("\n## Each optimisation, turned off (same run)\n\n")
		b.WriteString("colo as configured above, then with one of its start-path choices undone; each variant gets a first start " +
			"(which makes its own template where it uses one), then timed cold starts, each right after a start of colo as configured " +
			"(the \"configured\" figures of its row: drift on the machine hits both alike), and one idle pod.\n\n")
		b.WriteString("| colo | cold start median ms (min-max) | configured, alternating | agent reachable ms (configured) | container created ms (configured) | idle pod PSS MiB |\n|---|---|---|---|---|---|\n")
		fmt.Fprintf(&b, "| as configured | %.0f (%.0f-%.0f) | | %.0f | %.0f | %.1f |\n", r.Cold["colo"].Median, r.Cold["colo"].Min, r.Cold["colo"].Max,
			r.Stages["agent-reachable"].Median, r.Stages["container-created"].Median, m.IdlePodPSS)
		for i, v := range r.Variants {
			fmt.Fprintf(&b, "| %d. %s | %.0f (%.0f-%.0f) | %.0f | %.0f (%.0f) | %.0f (%.0f) | %.1f |\n", i+1, v.Name, v.Cold.Median, v.Cold.Min, v.Cold.Max,
				v.Configured.Median, v.Stages["agent-reachable"].Median, v.ConfiguredStages["agent-reachable"].Median,
				v.Stages["container-created"].Median, v.ConfiguredStages["container-created"].Median, v.IdlePodPSS)
		}
		fmt.Fprintf(&b, "\nThe shim lets go of the pages of its executable that only its start used, a second after each create: "+
			"its PSS right after the create was %.1f MiB, %.1f MiB after.\n", m.ShimPSSStarting, m.ShimPSS)
	}
	if z := r.Resize; z != nil {
		resizeSection(&b, z)
	}
	if len(r.IO) > 0 {
		ioSection(&b, r.IO)
	}
	for _, f := range r.FailedStarts {
		fmt.Fprintf(&b, "\nA timed start failed (left out of the figures above): %s\n", strings.Join(strings.Fields(f), " "))
	}
	for _, n := range r.NotMeasured {
		fmt.Fprintf(&b, "\nNot measured: %s\n", n)
	}
	b.WriteString("\n![benchmarks](benchmarks.png)\n")
	return b.String()
}

// stageTable writes the stages in the order they happen.
func stageTable(b *strings.Builder, stages map[string]Stats) {
	b.WriteString("| stage | median ms | min ms | max ms |\n|---|---|---|---|\n")
	var names []string
	for k := range stages {
		names = append(names, k)
	}
	sort.Slice(names, func(i, j int) bool { return stages[names[i]].Median < stages[names[j]].Median })
	for _, k := range names {
		s := stages[k]
		fmt.Fprintf(b, "| %s | %.0f | %.0f | %.0f |\n", k, s.Median, s.Min, s.Max)
	}
}
