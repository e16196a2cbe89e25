package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"syscall"
	"time"

	"github.com/containerd/cgroups/v3"
	"github.com/containerd/cgroups/v3/cgroup1"
	"github.com/containerd/cgroups/v3/cgroup2"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"
	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/plotutil"
	"gonum.org/v1/plot/vg"

	"github.com/colo-runtime/colo/shim/sandbox"
	"github.com/colo-runtime/colo/testbed"
)

// The co-location benchmark (make bench-colo): an "online" probe on the
// host sleeps 1 ms again and again and records how late it wakes, while an
// "offline" load keeps every CPU busy, in four runs: no load; the load in
// a runc container; in a colo pod as it comes; in a colo pod at offline
// priority. Everything runs under one parent cgroup, the containerd
// namespace's (/bench-colo): the probe in /bench-colo/online at the
// default CPU weight, each load in /bench-colo/<id> as ctr places it.

const (
	colocationNamespace = "bench-colo"
	probeInterval       = time.Millisecond
)

// probeFlag runs the binary as the probe: bench -probe DURATION.
var probeFlag = flag.Duration("probe", 0, "run as the online probe for this long and print its wake-up lateness as JSON (used by -colocation)")

// Lateness is what the probe saw, in milliseconds.
type Lateness struct {
	Samples  int     `json:"samples"`
	P50      float64 `json:"p50_ms"`
	P99      float64 `json:"p99_ms"`
	P999     float64 `json:"p999_ms"`
	Max      float64 `json:"max_ms"`
	Over5ms  int     `json:"over_5ms"`
	Over20ms int     `json:"over_20ms"`
}

// ColocationRun is one run of the benchmark.
type ColocationRun struct {
	Name string `json:"name"`
	// How the load ran.
	Load     string   `json:"load"`
	Lateness Lateness `json:"lateness"`
}

// ColocationReport is what -colocation writes as docs/colocation.json.
type ColocationReport struct {
	Date     string            `json:"date"`
	Machine  map[string]string `json:"machine"`
	Duration string            `json:"duration_per_run"`
	Runs     []ColocationRun   `json:"runs"`
}

// probeWork is the CPU work the probe does after each wake-up, as an
// online service handles a request: with it the probe wants about a third
// of every CPU, so that it competes with the load for CPU time instead of
// only waking now and then.
const probeWork = 500 * time.Microsecond

// probe runs one thread per CPU for d: each sleeps probeInterval, notes how
// much later than asked it woke, then works probeWork. It prints the
// lateness of all of them.
func probe(d time.Duration) error {
	n := runtime.NumCPU()
	results := make(chan []float64, n)
	errc := make(chan error, n)
	for range n {
		go func() {
			runtime.LockOSThread()
			var late []float64
			end := time.Now().Add(d)
			ts := unix.NsecToTimespec(probeInterval.Nanoseconds())
			for time.Now().Before(end) {
				before := time.Now()
				if err := unix.Nanosleep(&ts, nil); err != nil && !errors.Is(err, unix.EINTR) {
					errc <- err
					return
				}
				woke := time.Now()
				late = append(late, ms(woke.Sub(before)-probeInterval))
				for time.Since(woke) < probeWork {
				}
			}
			results <- late
		}()
	}
	var all []float64
	for range n {
		select {
		case err := <-errc:
			return err
		case l := <-results:
			all = append(all, l...)
		}
	}
	return json.NewEncoder(os.Stdout).Encode(lateness(all))
}

func lateness(v []float64) Lateness {
	l := Lateness{Samples: len(v)}
	if len(v) == 0 {
		return l
	}
	sorted := append([]float64(nil), v...)
	sort.Float64s(sorted)
	l.P50, l.P99, l.P999 = percentile(sorted, 50), percentile(sorted, 99), percentile(sorted, 99.9)
	l.Max = sorted[len(sorted)-1]
	for _, x := range v {
		if x > 5 {
			l.Over5ms++
		}
		if x > 20 {
			l.Over20ms++
		}
	}
	return l
}

// onlineCgroup is the probe's cgroup, a sibling of the loads' cgroups.
func onlineCgroup() string { return "/" + colocationNamespace + "/online" }

// runProbe runs the probe process in the online cgroup for d.
func runProbe(ctx context.Context, d time.Duration) (Lateness, error) {
	var l Lateness
	self, err := os.Executable()
	if err != nil {
		return l, err
	}
	cmd := exec.CommandContext(ctx, self, "-probe", d.String())
	var out, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &stderr
	if err := cmd.Start(); err != nil {
		return l, err
	}
	if err := joinCgroup(onlineCgroup(), cmd.Process.Pid); err != nil {
		cmd.Process.Kill()
		cmd.Wait()
		return l, fmt.Errorf("probe cgroup: %w", err)
	}
	if err := cmd.Wait(); err != nil {
		return l, fmt.Errorf("probe: %v: %s", err, stderr.String())
	}
	return l, json.Unmarshal(out.Bytes(), &l)
}

// joinCgroup puts pid into the cgroup at path (made if missing, default
// CPU weight).
func joinCgroup(path string, pid int) error {
	if cgroups.Mode() == cgroups.Unified {
		m, err := cgroup2.NewManager("/sys/fs/cgroup", path, &cgroup2.Resources{})
		if err != nil {
			return err
		}
		return m.AddProc(uint64(pid))
	}
	c, err := cgroup1.New(cgroup1.StaticPath(path), &specs.LinuxResources{})
	if err != nil {
		return err
	}
	return c.AddProc(uint64(pid))
}

// removeCgroup removes an empty cgroup in every hierarchy.
func removeCgroup(path string) {
	if cgroups.Mode() == cgroups.Unified {
		_ = unix.Rmdir(filepath.Join("/sys/fs/cgroup", path))
		return
	}
	dirs, _ := filepath.Glob(filepath.Join("/sys/fs/cgroup", "*", path))
	for _, d := range dirs {
		_ = unix.Rmdir(d)
	}
}

// spinners is a shell loop per host CPU: the offline load.
func spinners() string {
	return fmt.Sprintf("for i in $(seq %d); do (while :; do :; done) & done; wait", runtime.NumCPU())
}

func colocation(out string, d time.Duration) (err error) {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	// The colo pod at offline priority sets its own pod weight.
	cd, stopBed, err := startTestbed(ctx, testbed.Options{Namespace: colocationNamespace,
		ColoConfig: "[colocation]\nannotations = [\"io.colo.vcpus\", \"io.colo.pod-weight\", \"io.colo.overhead-idle\"]\n"})
	if err != nil {
		return err
	}
	defer func() {
		removeCgroup(onlineCgroup())
		stopBed(&err)
	}()
	rep := ColocationReport{Date: time.Now().UTC().Format(time.RFC3339), Machine: machine(), Duration: d.String()}
	offline := []string{
		"--annotation", sandbox.PodWeightAnnotation + "=2",
		"--annotation", sandbox.VCPUsAnnotation + "=low,low",
		"--annotation", sandbox.OverheadIdleAnnotation + "=true",
	}
	for _, r := range []struct {
		name, load, runtime string
		flags               []string
	}{
		{"no load", "none", "", nil},
		{"load in a runc container", "runc, default CPU weight", runcRuntime, nil},
		{"load in a colo pod", "colo, 2 vCPUs, as configured by default", testbed.Runtime, nil},
		{"load in a colo pod at offline priority", "colo, pod weight 2, both vCPUs in class low, hypervisor's other threads SCHED_IDLE", testbed.Runtime, offline},
	} {
		fmt.Printf("colocation: %s ...\n", r.name)
		id := fmt.Sprintf("load-%d", len(rep.Runs))
		if r.runtime != "" {
			args := append([]string{"run", "-d", "--null-io", "--runtime", r.runtime}, r.flags...)
			res, err := cd.Ctr(ctx, append(args, testbed.BusyboxImage, id, "sh", "-c", spinners())...)
			if err == nil && res.ExitCode != 0 {
				err = errors.New(res.String())
			}
			if err != nil {
				return fmt.Errorf("%s: %w", r.name, err)
			}
			time.Sleep(3 * time.Second) // the load up to speed
		}
		l, err := runProbe(ctx, d)
		if r.runtime != "" {
			remove(ctx, cd, id)
		}
		if err != nil {
			return fmt.Errorf("%s: %w", r.name, err)
		}
		rep.Runs = append(rep.Runs, ColocationRun{Name: r.name, Load: r.load, Lateness: l})
	}
	return writeColocation(out, rep)
}

// The generated part of docs/colocation.md sits between these lines.
const (
	colocationBegin = "<!-- make bench-colo: begin -->"
	colocationEnd   = "<!-- make bench-colo: end -->"
)

func writeColocation(dir string, rep ColocationReport) error {
	b, err := json.MarshalIndent(rep, "", "  ")
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, "colocation.json"), append(b, '\n'), 0o644); err != nil {
		return err
	}
	var t strings.Builder
	fmt.Fprintf(&t, "%s\n\nWritten by `make bench-colo` on %s. Machine: %s, %s CPUs, host kernel %s, %s. ", colocationBegin,
		rep.Date, rep.Machine["cpu"], rep.Machine["cpus"], rep.Machine["kernel"], rep.Machine["qemu"])
	fmt.Fprintf(&t, "Each run: %s; the probe's %s threads each sleep 1 ms and work 0.5 ms, again and again; lateness is how much later than asked a thread woke.\n\n",
		rep.Duration, rep.Machine["cpus"])
	t.WriteString("| run | load | wake-ups | p50 ms | p99 ms | p99.9 ms | max ms | > 5 ms | > 20 ms |\n|---|---|---|---|---|---|---|---|---|\n")
	for _, r := range rep.Runs {
		l := r.Lateness
		fmt.Fprintf(&t, "| %s | %s | %d | %.3f | %.3f | %.3f | %.1f | %d | %d |\n", r.Name, r.Load, l.Samples, l.P50, l.P99, l.P999, l.Max, l.Over5ms, l.Over20ms)
	}
	t.WriteString("\n![co-location](colocation.png)\n\n" + colocationEnd)
	fmt.Println(t.String())

	path := filepath.Join(dir, "colocation.md")
	doc, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	s := string(doc)
	i, j := strings.Index(s, colocationBegin), strings.Index(s, colocationEnd)
	if i < 0 || j < i {
		return fmt.Errorf("%s lacks the lines %q and %q for the results", path, colocationBegin, colocationEnd)
	}
	s = s[:i] + t.String() + s[j+len(colocationEnd):]
	if err := os.WriteFile(path, []byte(s), 0o644); err != nil {
		return err
	}
	return colocationChart(filepath.Join(dir, "colocation.png"), rep)
}

// colocationChart draws each run's p99 and p99.9 lateness: the counts of
// long delays are few, and on this shared machine mostly the host's own.
func colocationChart(path string, rep ColocationReport) error {
	p := plot.New()
	p.Title.Text = "online probe: wake-up lateness per run (ms)"
	p.Y.Label.Text = "ms"
	w := vg.Points(20)
	for i, q := range []struct {
		label string
		get   func(Lateness) float64
	}{{"p99", func(l Lateness) float64 { return l.P99 }}, {"p99.9", func(l Lateness) float64 { return l.P999 }}} {
		var v plotter.Values
		for _, r := range rep.Runs {
			v = append(v, q.get(r.Lateness))
		}
		bars, err := plotter.NewBarChart(v, w)
		if err != nil {
			return err
		}
		bars.Color = plotutil.Color(i)
		bars.Offset = vg.Length(i-1)*w + w/2
		p.Add(bars)
		p.Legend.Add(q.label, bars)
	}
	p.Legend.Top = true
	var names []string
	for _, r := range rep.Runs {
		names = append(names, strings.TrimPrefix(r.Name, "load in "))
	}
	p.NominalX(names...)
	return p.Save(9*vg.Inch, 4*vg.Inch, path)
}
