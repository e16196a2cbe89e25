package cli

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/colo-runtime/colo/placement"
	"github.com/colo-runtime/colo/shim/sandbox"
	"github.com/colo-runtime/colo/yield"
)

// fakeSandbox writes a sandbox record in stateDir/ns/id and serves its
// management socket with handler (nil: nobody listens, a dead shim).
func fakeSandbox(t *testing.T, stateDir, id string, pod *sandbox.PodName, handler http.Handler) {
	t.Helper()
	dir := filepath.Join(stateDir, "k8s.io", id)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	b, err := json.Marshal(sandbox.State{Version: sandbox.StateVersion, Dir: dir, ID: id, Pod: pod})
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "state.json"), b, 0o600); err != nil {
		t.Fatal(err)
	}
	if handler == nil {
		return
	}
	l, err := net.Listen("unix", filepath.Join(dir, sandbox.ManageSocket))
	if err != nil {
		t.Fatal(err)
	}
	srv := &httptest.Server{Listener: l, Config: &http.Server{Handler: handler}}
	srv.Start()
	t.Cleanup(srv.Close)
}

// TestMonitor: the monitor merges the sandboxes' metrics, labelled from
// their records; a shim that hangs or is dead costs its own series only.
func TestMonitor(t *testing.T) {
	stateDir := t.TempDir()
	serve := func(text string) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { w.Write([]byte(text)) })
	}
	const family = "# TYPE colo_sandbox_vcpus gauge\ncolo_sandbox_vcpus{sandbox_id=\"a\",pod_name=\"spoofed\"} 2\n"
	fakeSandbox(t, stateDir, "aaa", &sandbox.PodName{Name: "web", Namespace: "default", UID: "u1"}, serve(family))
	fakeSandbox(t, stateDir, "bbb", nil, serve(strings.ReplaceAll(family, " 2\n", " 4\n")))
	hang := make(chan struct{})
	defer close(hang)
	fakeSandbox(t, stateDir, "slow", nil, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-hang:
		case <-r.Context().Done():
		}
	}))
	fakeSandbox(t, stateDir, "dead", nil, nil)

	m := &monitor{stateDir: stateDir, timeout: 500 * time.Millisecond}
	rec := httptest.NewRecorder()
	m.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/metrics", nil))
	parser := expfmt.NewTextParser(model.UTF8Validation)
	families, err := parser.TextToMetricFamilies(rec.Body)
	if err != nil {
		t.Fatalf("the monitor's metrics do not parse: %v", err)
	}
	got := map[string]string{}
	for _, mt := range families["colo_sandbox_vcpus"].GetMetric() {
		var labels []string
		for _, l := range mt.GetLabel() {
			labels = append(labels, l.GetName()+"="+l.GetValue())
		}
		got[strings.Join(labels, ",")] = mt.GetGauge().String()
	}
	want := map[string]string{
		"pod_name=web,pod_namespace=default,pod_uid=u1,sandbox_id=aaa": "value:2",
		"sandbox_id=bbb": "value:4",
	}
	if len(got) != len(want) {
		t.Errorf("colo_sandbox_vcpus = %v, want %v", got, want)
	}
	for k, v := range want {
		if got[k] != v {
			t.Errorf("colo_sandbox_vcpus{%s} = %q, want %q (all: %v)", k, got[k], v, got)
		}
	}
	up := map[string]float64{}
	for _, mt := range families["colo_monitor_sandbox_up"].GetMetric() {
		for _, l := range mt.GetLabel() {
			if l.GetName() == "sandbox_id" {
				up[l.GetValue()] = mt.GetGauge().GetValue()
			}
		}
	}
	if up["aaa"] != 1 || up["bbb"] != 1 || up["slow"] != 0 || up["dead"] != 0 || len(up) != 4 {
		t.Errorf("colo_monitor_sandbox_up = %v, want aaa and bbb up, slow and dead down", up)
	}
	if v := families["colo_monitor_scrape_errors"].GetMetric()[0].GetGauge().GetValue(); v != 2 {
		t.Errorf("colo_monitor_scrape_errors = %v, want 2", v)
	}
}

// TestMonitorYield: with yield.enabled, colo monitor runs the controller on
// the host's cgroups: a sandbox's offline cgroup (placed by placement,
// with a busy process as its vCPU) is lowered to the floor, as a headroom
// larger than the host leaves offline nothing, the decision shows in
// /metrics beside the monitor's own series, and the quota is lifted when
// the monitor stops.
func TestMonitorYield(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root for the host's cgroups")
	}
	stateDir := t.TempDir()
	parent := fmt.Sprintf("/colo-cli-yield-%d", os.Getpid())
	offline := parent + "/" + placement.ClassGroup("low")
	busy := exec.Command("sh", "-c", "while :; do :; done")
	if err := busy.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		busy.Process.Kill()
		busy.Wait()
		if err := placement.Remove(context.Background(), parent, placement.Made{}); err != nil {
			t.Errorf("cgroups left: %v", err)
		}
	})
	plan := placement.Plan{
		Parent:         parent,
		Classes:        []placement.Class{{Name: "high", Weight: 100}, {Name: "low", Weight: 10}},
		VCPUClasses:    []string{"low"},
		OverheadWeight: 100,
	}
	if err := placement.Apply(context.Background(), plan, placement.Made{}, placement.Threads{Pid: busy.Process.Pid, VCPUs: []int{busy.Process.Pid}}); err != nil {
		t.Fatal(err)
	}
	writeRecord(t, stateDir, "k8s.io", "offline", sandbox.State{ID: "offline", Cgroup: parent})
	cfg := filepath.Join(stateDir, "config.toml")
	toml := fmt.Sprintf("[runtime]\nstate_dir = %q\n\n[yield]\nenabled = true\ninterval = \"50ms\"\nheadroom_cpus = 1024\nfloor_cpus = 0.2\n", stateDir)
	if err := os.WriteFile(cfg, []byte(toml), 0o644); err != nil {
		t.Fatal(err)
	}
	host, err := yield.NewHost()
	if err != nil {
		t.Fatal(err)
	}

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	sock := filepath.Join(stateDir, "monitor.sock")
	var stdout, stderr bytes.Buffer
	exit := make(chan int, 1)
	go func() { exit <- Run(ctx, []string{"--config", cfg, "monitor", "--listen", sock}, &stdout, &stderr) }()
	client := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", sock)
		},
	}}
	value := func(families map[string]*dto.MetricFamily, name, label, want string) (float64, bool) {
		for _, m := range families[name].GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == label && l.GetValue() == want {
					return m.GetGauge().GetValue() + m.GetCounter().GetValue(), true
				}
			}
		}
		return 0, false
	}
	var families map[string]*dto.MetricFamily
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("the offline cgroup's quota did not come down to the floor; last metrics %v; stderr %s", families, stderr.String())
		}
		resp, err := client.Get("http://monitor/metrics")
		if err != nil {
			continue
		}
		parser := expfmt.NewTextParser(model.UTF8Validation)
		families, err = parser.TextToMetricFamilies(resp.Body)
		resp.Body.Close()
		if err != nil {
			t.Fatalf("the monitor's metrics do not parse: %v", err)
		}
		if v, ok := value(families, "colo_yield_offline_quota_cpus", "cgroup", offline); ok && v == 0.2 {
			break
		}
	}
	if v, ok := value(families, "colo_yield_offline_quota_cpus", "sandbox_id", "offline"); !ok || v != 0.2 {
		t.Errorf("quota series of sandbox offline: %v (listed %v)", v, ok)
	}
	if v, _ := value(families, "colo_yield_decisions_total", "direction", "lower"); v < 1 {
		t.Errorf("lower decisions: %v, want 1 or more", v)
	}
	if v := families["colo_monitor_sandboxes"].GetMetric()[0].GetGauge().GetValue(); v != 1 {
		t.Errorf("colo_monitor_sandboxes = %v, want 1: the monitor's own series go on", v)
	}
	if q, err := host.Quota(ctx, offline); err != nil || q != (yield.Quota{Quota: 20000, Period: yield.Period}) {
		t.Errorf("the cgroup's quota: %v, %v; want 20000/100000", q, err)
	}
	if q, err := host.Quota(ctx, parent+"/"+placement.ClassGroup("high")); err != nil || q.Quota >= 0 {
		t.Errorf("the online class's quota: %v, %v; want none", q, err)
	}

	cancel()
	select {
	case code := <-exit:
		if code != 0 {
			t.Errorf("colo monitor: exit %d: %s", code, stderr.String())
		}
	case <-time.After(30 * time.Second):
		t.Fatal("colo monitor did not stop")
	}
	if q, err := host.Quota(context.Background(), offline); err != nil || q.Quota >= 0 {
		t.Errorf("the cgroup's quota after the monitor stopped: %v, %v; want none", q, err)
	}
}
