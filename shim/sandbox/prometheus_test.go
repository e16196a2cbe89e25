package sandbox

import (
	"context"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// TestMetrics: GET /metrics has every family, labelled with the sandbox,
// and what a guest sends is checked: names it makes up, non-finite
// numbers and CPUs beyond any VM's are dropped.
func TestMetrics(t *testing.T) {
	e := newEnv(t, false)
	ctx := context.Background()
	opts := e.options(e.config("9p"))
	opts.ShimMetrics = NewShimMetrics()
	opts.ShimMetrics.ObserveRPC("Create", 1)
	sb, _, err := Create(ctx, opts, e.container("true"))
	if err != nil {
		t.Fatal(err)
	}
	rec := httptest.NewRecorder()
	sb.handleMetrics(rec, httptest.NewRequest(http.MethodGet, "/metrics", nil))
	text := rec.Body.String()
	parser := expfmt.NewTextParser(model.UTF8Validation)
	families, err := parser.TextToMetricFamilies(strings.NewReader(text))
	if err != nil {
		t.Fatalf("metrics do not parse: %v\n%s", err, text)
	}
	for _, f := range []string{
		"colo_shim_rpc_duration_seconds", "colo_shim_threads", "colo_shim_resident_memory_bytes",
		"colo_hypervisor_cpu_seconds_total", "colo_hypervisor_threads", "colo_hypervisor_vcpu_run_seconds_total",
		"colo_agent_rpc_duration_seconds", "colo_agent_resident_memory_bytes",
		"colo_guest_meminfo_bytes", "colo_guest_cpu_seconds_total", "colo_guest_load1",
		"colo_guest_network_receive_bytes_total", "colo_guest_disk_reads_completed_total", "colo_guest_class_cpu_usage_seconds_total",
		"colo_sandbox_vcpus", "colo_sandbox_memory_bytes",
	} {
		fam, ok := families[f]
		if !ok {
			t.Errorf("no family %s", f)
			continue
		}
		for _, m := range fam.GetMetric() {
			id := ""
			for _, l := range m.GetLabel() {
				if l.GetName() == "sandbox_id" {
					id = l.GetValue()
				}
			}
			if id != "c1" {
				t.Errorf("%s: a series without the sandbox's label: %v", f, m.GetLabel())
			}
		}
	}
	for _, bad := range []string{"Evil", "bad name", "injected", `cpu="1073741824"`, "NaN"} {
		if strings.Contains(text, bad) {
			t.Errorf("the guest's %q reached the metrics:\n%s", bad, text)
		}
	}
	if _, err := sb.DeleteContainer(ctx, "c1"); err != nil {
		t.Fatal(err)
	}
	waitExit(t, e.exits)
}

// TestPprofRoute: the shim's profiles are served only when the config
// asks for them.
func TestPprofRoute(t *testing.T) {
	for _, on := range []bool{false, true} {
		s := &Sandbox{}
		s.cfg.Runtime.Pprof = on
		mux := http.NewServeMux()
		s.routes(mux)
		rec := httptest.NewRecorder()
		mux.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/debug/pprof/", nil))
		if got := rec.Code == http.StatusOK; got != on {
			t.Errorf("runtime.pprof = %v: GET /debug/pprof/ answered %d", on, rec.Code)
		}
	}
}
