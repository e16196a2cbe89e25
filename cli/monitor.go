package cli

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/http"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/containerd/log"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"google.golang.org/protobuf/proto"

	"github.com/colo-runtime/colo/config"
	"github.com/colo-runtime/colo/shim/sandbox"
	"github.com/colo-runtime/colo/yield"
)

// monitorCmd serves /metrics for every sandbox on the node: each scrape
// lists the state directory, so new sandboxes appear and gone ones drop
// out, and reads every sandbox's management socket at once, each within
// scrapeTimeout, so a slow or dead shim costs its own series only. With
// yield.enabled it also runs the node's yield controller (package yield),
// and stops it, lifting the quotas it set, before it returns.
func monitorCmd(ctx context.Context, e *env, args []string) error {
	fs := flag.NewFlagSet("monitor", flag.ContinueOnError)
	fs.SetOutput(e.stderr)
	listen := fs.String("listen", "127.0.0.1:8090", "address to serve /metrics on (host:port, or a path for a unix socket)")
	if err := fs.Parse(args); err != nil {
		return usageError("%v", err)
	}
	if fs.NArg() > 0 {
		return usageError("unexpected %s", quoted(strings.Join(fs.Args(), " ")))
	}
	network := "tcp"
	if strings.Contains(*listen, "/") {
		network = "unix"
	}
	l, err := net.Listen(network, *listen)
	if err != nil {
		return err
	}
	m := &monitor{stateDir: e.cfg.Runtime.StateDir, timeout: scrapeTimeout}
	if e.cfg.Yield.Enabled {
		ctl, err := newYield(e.cfg)
		if err != nil {
			l.Close()
			return err
		}
		m.yield = ctl
		yctx, stop := context.WithCancel(ctx)
		done := make(chan struct{})
		go func() {
			defer close(done)
			ctl.Run(yctx)
		}()
		// Run lifts the quotas within a bound of its own once stopped.
		defer func() {
			stop()
			<-done
		}()
	}
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", m)
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second, WriteTimeout: 2 * scrapeTimeout}
	fmt.Fprintf(e.stdout, "colo monitor: /metrics of the sandboxes in %s on %s %s\n", m.stateDir, network, l.Addr())
	go func() {
		<-ctx.Done()
		shutdown, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		srv.Shutdown(shutdown)
	}()
	if err := srv.Serve(l); !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}

// monitor gathers the node's sandboxes' metrics.
type monitor struct {
	stateDir string
	// timeout bounds a scrape: what a sandbox has not answered by then
	// is left out.
	timeout time.Duration
	// yield, if set, is the yield controller, whose metrics are added.
	yield prometheus.Gatherer
}

// newYield makes the yield controller of the node's sandboxes in the
// state directory, on the host's cgroups.
func newYield(cfg config.Config) (*yield.Controller, error) {
	host, err := yield.NewHost()
	if err != nil {
		return nil, err
	}
	list := func(ctx context.Context) ([]yield.Sandbox, error) {
		records, err := sandboxes(cfg.Runtime.StateDir)
		if err != nil {
			return nil, err
		}
		out := make([]yield.Sandbox, 0, len(records))
		for _, st := range records {
			out = append(out, yield.Sandbox{ID: st.ID, Cgroup: st.Cgroup})
		}
		return out, nil
	}
	return yield.New(cfg.Yield, list, host, host)
}

// podLabels are the labels every series gets from the sandbox's record.
var podLabels = []string{"sandbox_id", "pod_name", "pod_namespace", "pod_uid"}

func (m *monitor) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	ctx, cancel := context.WithTimeout(r.Context(), m.timeout)
	defer cancel()
	families, err := m.gather(ctx)
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	format := expfmt.NewFormat(expfmt.TypeTextPlain)
	w.Header().Set("Content-Type", string(format))
	enc := expfmt.NewEncoder(w, format)
	for _, f := range families {
		if err := enc.Encode(f); err != nil {
			log.G(ctx).WithError(err).Warn("colo monitor: write metrics")
			return
		}
	}
}

// gather scrapes every sandbox and merges their families, each series
// labelled with its sandbox and pod, and adds the monitor's own.
func (m *monitor) gather(ctx context.Context) ([]*dto.MetricFamily, error) {
	records, err := sandboxes(m.stateDir)
	if err != nil {
		return nil, err
	}
	type result struct {
		st       sandbox.State
		families map[string]*dto.MetricFamily
		took     time.Duration
		err      error
	}
	results := make([]result, len(records))
	var wg sync.WaitGroup
	for i, st := range records {
		wg.Add(1)
		go func() {
			defer wg.Done()
			start := time.Now()
			body, err := scrape(ctx, st.Dir)
			var families map[string]*dto.MetricFamily
			if err == nil {
				parser := expfmt.NewTextParser(model.UTF8Validation)
				families, err = parser.TextToMetricFamilies(strings.NewReader(string(body)))
			}
			results[i] = result{st: st, families: families, took: time.Since(start), err: err}
		}()
	}
	wg.Wait()

	merged := make(map[string]*dto.MetricFamily)
	errs := 0
	for _, r := range results {
		if r.err != nil {
			errs++
			log.G(ctx).WithError(r.err).WithField("sandbox", r.st.ID).Debug("colo monitor: sandbox not scraped")
			continue
		}
		labels := recordLabels(r.st)
		for name, f := range r.families {
			for _, mt := range f.Metric {
				setLabels(mt, labels)
			}
			into, ok := merged[name]
			if !ok {
				merged[name] = f
				continue
			}
			// One name, one type: a shim of another version that
			// disagrees loses that family, not the scrape.
			if into.GetType() != f.GetType() {
				continue
			}
			into.Metric = append(into.Metric, f.Metric...)
		}
	}
	own := []*dto.MetricFamily{
		gauge("colo_monitor_sandboxes", "Sandboxes found in the state directory.", float64(len(records))),
		gauge("colo_monitor_scrape_errors", "Sandboxes whose metrics could not be read in this scrape (a slow or dead shim).", float64(errs)),
	}
	took := &dto.MetricFamily{
		Name: proto.String("colo_monitor_sandbox_scrape_seconds"),
		Help: proto.String("Time to read one sandbox's metrics; up is 0 where it failed."),
		Type: dto.MetricType_GAUGE.Enum(),
	}
	up := &dto.MetricFamily{
		Name: proto.String("colo_monitor_sandbox_up"),
		Help: proto.String("Whether the sandbox's metrics were read in this scrape."),
		Type: dto.MetricType_GAUGE.Enum(),
	}
	for _, r := range results {
		labels := recordLabels(r.st)
		v := 1.0
		if r.err != nil {
			v = 0
		}
		up.Metric = append(up.Metric, withLabels(&dto.Metric{Gauge: &dto.Gauge{Value: proto.Float64(v)}}, labels))
		took.Metric = append(took.Metric, withLabels(&dto.Metric{Gauge: &dto.Gauge{Value: proto.Float64(r.took.Seconds())}}, labels))
	}
	own = append(own, up, took)
	if m.yield != nil {
		fams, err := m.yield.Gather()
		if err != nil {
			log.G(ctx).WithError(err).Warn("colo monitor: yield metrics")
		}
		own = append(own, fams...)
	}
	for _, f := range own {
		merged[f.GetName()] = f
	}
	names := make([]string, 0, len(merged))
	for n := range merged {
		names = append(names, n)
	}
	sort.Strings(names)
	out := make([]*dto.MetricFamily, 0, len(names))
	for _, n := range names {
		out = append(out, merged[n])
	}
	return out, nil
}

// recordLabels are the sandbox's labels as its record has them.
func recordLabels(st sandbox.State) map[string]string {
	l := map[string]string{"sandbox_id": st.ID}
	if p := st.Pod; p != nil {
		l["pod_name"], l["pod_namespace"], l["pod_uid"] = p.Name, p.Namespace, p.UID
	}
	return l
}

// setLabels makes m's pod labels the record's: the record is the
// monitor's to trust, whatever the shim said.
func setLabels(m *dto.Metric, labels map[string]string) {
	m.Label = slices.DeleteFunc(m.Label, func(p *dto.LabelPair) bool { return slices.Contains(podLabels, p.GetName()) })
	withLabels(m, labels)
}

func withLabels(m *dto.Metric, labels map[string]string) *dto.Metric {
	for _, k := range podLabels {
		if v := labels[k]; v != "" {
			m.Label = append(m.Label, &dto.LabelPair{Name: proto.String(k), Value: proto.String(v)})
		}
	}
	sort.Slice(m.Label, func(i, j int) bool { return m.Label[i].GetName() < m.Label[j].GetName() })
	return m
}

func gauge(name, help string, v float64) *dto.MetricFamily {
	return &dto.MetricFamily{
		Name:   proto.String(name),
		Help:   proto.String(help),
		Type:   dto.MetricType_GAUGE.Enum(),
		Metric: []*dto.Metric{{Gauge: &dto.Gauge{Value: proto.Float64(v)}}},
	}
}
