package e2e

import (
	"context"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/colo-runtime/colo/testbed"
)

// metricFamilies are the families a pod's metrics must have: one or more
// of each of colo's kinds (docs/operations.md).
var metricFamilies = []string{
	"colo_shim_rpc_duration_seconds", "colo_shim_threads", "colo_shim_open_fds", "colo_shim_resident_memory_bytes", "colo_shim_proportional_memory_bytes",
	"colo_hypervisor_cpu_seconds_total", "colo_hypervisor_resident_memory_bytes", "colo_hypervisor_threads", "colo_hypervisor_open_fds",
	"colo_hypervisor_io_read_bytes_total", "colo_hypervisor_vcpu_run_seconds_total", "colo_hypervisor_vcpu_wait_seconds_total",
	"colo_agent_rpc_duration_seconds", "colo_agent_resident_memory_bytes",
	// No colo_guest_disk_*: this guest has no block device (9p share).
	"colo_guest_meminfo_bytes", "colo_guest_cpu_seconds_total", "colo_guest_load1", "colo_guest_network_receive_bytes_total",
	"colo_guest_class_cpu_usage_seconds_total",
	"colo_container_cpu_usage_seconds_total", "colo_container_memory_usage_bytes",
	"colo_sandbox_vcpus", "colo_sandbox_memory_bytes",
}

// parseMetrics parses Prometheus text as Prometheus does.
func parseMetrics(t *testing.T, text string) map[string]*dto.MetricFamily {
	t.Helper()
	parser := expfmt.NewTextParser(model.UTF8Validation)
	families, err := parser.TextToMetricFamilies(strings.NewReader(text))
	if err != nil {
		t.Fatalf("metrics do not parse: %v\n%s", err, text)
	}
	return families
}

// seriesOf are the families' series of one sandbox, by family.
func seriesOf(families map[string]*dto.MetricFamily, sandboxID string) map[string][]*dto.Metric {
	out := make(map[string][]*dto.Metric)
	for name, f := range families {
		for _, m := range f.GetMetric() {
			if label(m, "sandbox_id") == sandboxID {
				out[name] = append(out[name], m)
			}
		}
	}
	return out
}

func label(m *dto.Metric, name string) string {
	for _, l := range m.GetLabel() {
		if l.GetName() == name {
			return l.GetValue()
		}
	}
	return ""
}

// checkPodSeries checks that every family is there for the pod, each
// series with the pod's labels.
func checkPodSeries(t *testing.T, where string, families map[string]*dto.MetricFamily, p *pod) {
	t.Helper()
	series := seriesOf(families, p.id)
	for _, f := range metricFamilies {
		if len(series[f]) == 0 {
			t.Errorf("%s: no %s for pod %s", where, f, p.config.Metadata.Name)
		}
	}
	for f, ms := range series {
		for _, m := range ms {
			if label(m, "pod_name") != p.config.Metadata.Name || label(m, "pod_namespace") != "default" || label(m, "pod_uid") != p.uid {
				t.Errorf("%s: %s series without the pod's labels: %v", where, f, m.GetLabel())
				return
			}
		}
	}
}

// TestMetrics: a pod's management socket (colo metrics) and colo monitor
// serve every family, parsed by Prometheus' own parser, with the pod's
// labels; the monitor picks up a second pod and drops a removed one, and
// a killed shim does not fail its scrape.
func TestMetrics(t *testing.T) {
	// The leak check runs last, after the pods' own clean-ups.
	const killed = "colo-metrics-killed"
	checkNoLeaks(t, killed)
	ctx, cancel := context.WithTimeout(context.Background(), criTimeout)
	defer cancel()
	rs := criRuntime(t)
	a := runPod(ctx, t, rs, "metrics-a", testbed.ColoHandler)
	a.startWith(ctx, t, "worker", func(c *runtimeapi.ContainerConfig) { c.Command = []string{"sleep", "3600"} })

	// The pod's own socket.
	out, err := coloCLI(t, cd.ColoConfig, "metrics", a.id)
	if err != nil {
		t.Fatalf("colo metrics: %v: %s", err, out)
	}
	checkPodSeries(t, "colo metrics", parseMetrics(t, out), a)

	// The monitor.
	sock := filepath.Join(t.TempDir(), "monitor.sock")
	mon := exec.CommandContext(ctx, "colo", "--config", cd.ColoConfig, "monitor", "--listen", sock)
	mon.Stdout, mon.Stderr = os.Stderr, os.Stderr
	if err := mon.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		mon.Process.Signal(syscall.SIGTERM)
		mon.Wait()
	})
	client := &http.Client{Timeout: time.Minute, Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", sock)
		},
	}}
	scrapeMonitor := func(step string) map[string]*dto.MetricFamily {
		t.Helper()
		var resp *http.Response
		var err error
		for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
			if resp, err = client.Get("http://monitor/metrics"); err == nil {
				break
			}
		}
		if err != nil {
			t.Fatalf("%s: scrape colo monitor: %v", step, err)
		}
		defer resp.Body.Close()
		body, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
		if err != nil {
			t.Fatalf("%s: read colo monitor: %v", step, err)
		}
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("%s: colo monitor: %s: %s", step, resp.Status, body)
		}
		return parseMetrics(t, string(body))
	}
	up := func(families map[string]*dto.MetricFamily, id string) (float64, bool) {
		for _, m := range families["colo_monitor_sandbox_up"].GetMetric() {
			if label(m, "sandbox_id") == id {
				return m.GetGauge().GetValue(), true
			}
		}
		return 0, false
	}

	checkPodSeries(t, "colo monitor, one pod", scrapeMonitor("one pod"), a)
	b := runPod(ctx, t, rs, "metrics-b", testbed.ColoHandler)
	families := scrapeMonitor("two pods")
	checkPodSeries(t, "colo monitor, two pods", families, a)
	if v, ok := up(families, b.id); !ok || v != 1 {
		t.Errorf("the second pod in the monitor: up %v (listed %v)", v, ok)
	}
	if err := rs.StopPodSandbox(ctx, b.id); err != nil {
		t.Fatal(err)
	}
	if err := rs.RemovePodSandbox(ctx, b.id); err != nil {
		t.Fatal(err)
	}
	if _, ok := up(scrapeMonitor("pod removed"), b.id); ok {
		t.Errorf("the removed pod %s is still in the monitor", b.id)
	}

	// A killed shim (of a container run by ctr, which the monitor finds
	// in the same state directory): its series go, the scrape stays.
	startDetached(t, testbed.Runtime, killed, []string{"--null-io"}, "sleep", "3600")
	if v, ok := up(scrapeMonitor("ctr container"), killed); !ok || v != 1 {
		t.Errorf("the ctr container in the monitor: up %v (listed %v)", v, ok)
	}
	pids := cd.ShimPids(killed)
	if len(pids) == 0 {
		t.Fatalf("no shim for %s", killed)
	}
	for _, pid := range pids {
		syscall.Kill(pid, syscall.SIGKILL)
	}
	families = scrapeMonitor("shim killed")
	if v, _ := up(families, killed); v != 0 {
		t.Errorf("the sandbox of a killed shim is up (%v) in the monitor", v)
	}
	checkPodSeries(t, "colo monitor, a shim killed", families, a)
	if len(seriesOf(families, killed)["colo_guest_meminfo_bytes"]) > 0 {
		t.Errorf("the sandbox of a killed shim still has guest series")
	}

	// Everything goes before the clean-ups' leak checks, which look at
	// the whole test bed: the second pod's would otherwise see the
	// first.
	ctr(t, "task", "rm", "-f", killed)
	ctr(t, "container", "rm", killed)
	if err := rs.StopPodSandbox(ctx, a.id); err != nil {
		t.Fatal(err)
	}
	if err := rs.RemovePodSandbox(ctx, a.id); err != nil {
		t.Fatal(err)
	}
}
