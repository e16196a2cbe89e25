package cli

import (
	"encoding/json"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/colo-runtime/colo/shim/sandbox"
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
