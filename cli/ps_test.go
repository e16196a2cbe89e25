package cli

import (
	"bytes"
	"context"
	"encoding/json"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/colo-runtime/colo/config"
	"github.com/colo-runtime/colo/shim/sandbox"
)

func TestVCPUClasses(t *testing.T) {
	classes := config.Default().Colocation.Classes // high, low
	for _, tc := range []struct {
		list []string
		n    int
		want string
	}{
		{list: nil, n: 4, want: "high"},
		{list: nil, n: 0, want: "high"},
		{list: []string{"high", "low"}, n: 2, want: "high,low"},
		{list: []string{"high", "low"}, n: 1, want: "high"},
		{list: []string{"high", "low"}, n: 0, want: "high,low"},
		{list: []string{"low", "high"}, n: 5, want: "high,low"},
		{list: []string{"low"}, n: 3, want: "low"},
	} {
		got := strings.Join(vcpuClasses(config.Colocation{Classes: classes, VCPUs: tc.list}, tc.n), ",")
		if got != tc.want {
			t.Errorf("vcpuClasses(%q, %d) = %q, want %q", tc.list, tc.n, got, tc.want)
		}
	}
}

// writeRecord writes a sandbox record under stateDir/ns/dirName.
func writeRecord(t *testing.T, stateDir, ns, dirName string, st sandbox.State) sandbox.State {
	t.Helper()
	dir := filepath.Join(stateDir, ns, dirName)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	st.Version, st.Dir = sandbox.StateVersion, dir
	b, err := json.Marshal(st)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "state.json"), b, 0o600); err != nil {
		t.Fatal(err)
	}
	return st
}

// serveSize serves GET /resources on the management socket in dir.
func serveSize(t *testing.T, dir string, size sandbox.SizeReply) {
	t.Helper()
	l, err := net.Listen("unix", filepath.Join(dir, sandbox.ManageSocket))
	if err != nil {
		t.Fatal(err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /resources", func(w http.ResponseWriter, r *http.Request) {
		json.NewEncoder(w).Encode(size)
	})
	srv := &http.Server{Handler: mux}
	go srv.Serve(l)
	t.Cleanup(func() { srv.Close() })
}

// hang accepts connections on the management socket in dir and never
// answers: a stuck shim.
func hangSocket(t *testing.T, dir string) {
	t.Helper()
	l, err := net.Listen("unix", filepath.Join(dir, sandbox.ManageSocket))
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		var conns []net.Conn
		defer func() {
			for _, c := range conns {
				c.Close()
			}
		}()
		for {
			c, err := l.Accept()
			if err != nil {
				<-done
				return
			}
			conns = append(conns, c)
		}
	}()
	t.Cleanup(func() { l.Close(); close(done) })
}

// TestPs: a row per record, sizes from the management sockets; a shim
// that never answers or has no socket costs its own row's figures, within
// the query timeout.
func TestPs(t *testing.T) {
	old := psQueryTimeout
	psQueryTimeout = 300 * time.Millisecond
	t.Cleanup(func() { psQueryTimeout = old })

	stateDir := t.TempDir()
	cfg := config.Default()
	cfg.Colocation.VCPUs = []string{"high", "low"}
	pod := writeRecord(t, stateDir, "k8s.io", "aaaaaaaaaaaaaaaaaaaaaaaa", sandbox.State{
		ID:              "aaaaaaaaaaaaaaaaaaaaaaaa",
		Pod:             &sandbox.PodName{Namespace: "default", Name: "web"},
		Config:          cfg,
		Containers:      []sandbox.ContainerState{{ID: "c1"}, {ID: "c2"}},
		HypervisorPid:   1,
		HypervisorStart: 1000, // 10 s after boot
	})
	serveSize(t, pod.Dir, sandbox.SizeReply{VCPUs: 3, MemoryMB: 768})
	stuck := writeRecord(t, stateDir, "colo-test", "stuck", sandbox.State{ID: "stuck", Config: config.Default(), Containers: []sandbox.ContainerState{{ID: "stuck"}}})
	hangSocket(t, stuck.Dir)
	writeRecord(t, stateDir, "colo-test", "dead", sandbox.State{ID: "dead", Config: config.Default()})
	// Not a sandbox: no record.
	if err := os.MkdirAll(filepath.Join(stateDir, "colo-test", "templates"), 0o700); err != nil {
		t.Fatal(err)
	}

	states, err := sandboxes(stateDir)
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	start := time.Now()
	rows := psRows(context.Background(), states, now, func() (time.Duration, error) { return 70 * time.Second, nil })
	if d := time.Since(start); d > 3*time.Second {
		t.Errorf("ps with a stuck shim took %s", d)
	}
	if len(rows) != 3 {
		t.Fatalf("%d rows, want 3: %+v", len(rows), rows)
	}
	// Sorted by namespace, then id.
	dead, stuckRow, web := rows[0], rows[1], rows[2]
	if web.ID != pod.ID || web.Pod != "default/web" || web.Namespace != "k8s.io" || web.Containers != 2 {
		t.Errorf("pod row %+v", web)
	}
	if web.VCPUs == nil || *web.VCPUs != 3 || web.MemoryMB == nil || *web.MemoryMB != 768 || web.SizeError != "" {
		t.Errorf("pod row size %v %v %q, want 3 vCPUs and 768 MiB", web.VCPUs, web.MemoryMB, web.SizeError)
	}
	if strings.Join(web.Classes, ",") != "high,low" {
		t.Errorf("pod row classes %q, want high,low", web.Classes)
	}
	if web.UptimeSeconds != 60 {
		t.Errorf("pod row uptime %ds, want 60s (booted 70s ago, VM started 10s after boot)", web.UptimeSeconds)
	}
	for _, r := range []psRow{stuckRow, dead} {
		if r.VCPUs != nil || r.MemoryMB != nil || r.SizeError == "" {
			t.Errorf("row %s: size %v %v, error %q; want none and why", r.ID, r.VCPUs, r.MemoryMB, r.SizeError)
		}
		if strings.Join(r.Classes, ",") != "high" {
			t.Errorf("row %s: classes %q, want high", r.ID, r.Classes)
		}
		// No hypervisor recorded: the directory's age.
		if r.Started.IsZero() || r.UptimeSeconds > 60 {
			t.Errorf("row %s: started %s, uptime %ds; want the directory's creation", r.ID, r.Started, r.UptimeSeconds)
		}
	}
	if !strings.Contains(stuckRow.SizeError, "deadline exceeded") {
		t.Errorf("stuck row error %q, want a deadline", stuckRow.SizeError)
	}

	var out bytes.Buffer
	if err := printPs(&out, rows); err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(out.String()), "\n")
	if len(lines) != 4 {
		t.Fatalf("printPs:\n%s\nwant a header and 3 rows", out.String())
	}
	if f := strings.Fields(lines[0]); strings.Join(f, " ") != "ID POD CONTAINERS VCPUS MEMORY CLASS UPTIME" {
		t.Errorf("header %q", lines[0])
	}
	if f := strings.Fields(lines[3]); strings.Join(f, " ") != "aaaaaaaaaaaa default/web 2 3 768Mi high,low 1m0s" {
		t.Errorf("pod line %q", lines[3])
	}
	if f := strings.Fields(lines[1]); len(f) != 7 || f[1] != "-" || f[3] != "-" || f[4] != "-" {
		t.Errorf("dead line %q, want - for pod, vCPUs and memory", lines[1])
	}
	// Aligned: every column starts where its header does.
	col := strings.Index(lines[0], "VCPUS")
	for _, l := range lines[1:] {
		if l[col-1] != ' ' || l[col] == ' ' {
			t.Errorf("line %q is not aligned with the header %q", l, lines[0])
		}
	}
}

// TestPsCommand: colo ps and ps --json through Run.
func TestPsCommand(t *testing.T) {
	old := psQueryTimeout
	psQueryTimeout = 300 * time.Millisecond
	t.Cleanup(func() { psQueryTimeout = old })
	stateDir := t.TempDir()
	st := writeRecord(t, stateDir, "ns", "sb1", sandbox.State{ID: "sb1", Config: config.Default(), Containers: []sandbox.ContainerState{{ID: "sb1"}}})
	serveSize(t, st.Dir, sandbox.SizeReply{VCPUs: 2, MemoryMB: 256})
	cfg := filepath.Join(stateDir, "config.toml")
	if err := os.WriteFile(cfg, []byte("[runtime]\nstate_dir = \""+stateDir+"\"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	var stdout, stderr bytes.Buffer
	if code := Run(context.Background(), []string{"--config", cfg, "ps"}, &stdout, &stderr); code != 0 || !strings.Contains(stdout.String(), "sb1") {
		t.Errorf("colo ps: exit %d, stdout %q, stderr %q", code, stdout.String(), stderr.String())
	}
	stdout.Reset()
	if code := Run(context.Background(), []string{"--config", cfg, "ps", "--json"}, &stdout, &stderr); code != 0 {
		t.Fatalf("colo ps --json: exit %d, stderr %q", code, stderr.String())
	}
	var rows []psRow
	if err := json.Unmarshal(stdout.Bytes(), &rows); err != nil {
		t.Fatalf("colo ps --json: %v in %q", err, stdout.String())
	}
	if len(rows) != 1 || rows[0].ID != "sb1" || rows[0].VCPUs == nil || *rows[0].VCPUs != 2 || *rows[0].MemoryMB != 256 {
		t.Errorf("colo ps --json: %s", stdout.String())
	}
	if code := Run(context.Background(), []string{"--config", cfg, "ps", "extra"}, &stdout, &stderr); code != 2 {
		t.Errorf("colo ps extra: exit %d, want 2", code)
	}
}

// TestEnv: the configuration as TOML that reads back as the same, after
// the line naming its file.
func TestEnv(t *testing.T) {
	dir := t.TempDir()
	cfgPath := filepath.Join(dir, "config.toml")
	if err := os.WriteFile(cfgPath, []byte("[hypervisor]\nvcpus = 3\n[runtime]\nstate_dir = \"/run/x\"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	cfg, err := config.Load(cfgPath)
	if err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	if err := printEnv(&out, cfg, configSource(cfg, cfgPath)); err != nil {
		t.Fatal(err)
	}
	first, body, _ := strings.Cut(out.String(), "\n")
	if first != "# from "+cfgPath+" (--config), over the built-in defaults" {
		t.Errorf("first line %q", first)
	}
	again, err := config.Parse([]byte(body))
	if err != nil {
		t.Fatalf("printed TOML does not parse: %v\n%s", err, body)
	}
	if again.Hypervisor.VCPUs != 3 || again.Runtime.StateDir != "/run/x" || again.Agent.CallTimeout != cfg.Agent.CallTimeout {
		t.Errorf("printed TOML reads as %+v", again)
	}

	t.Setenv(config.EnvPath, cfgPath)
	if got := configSource(cfg, ""); !strings.Contains(got, "$"+config.EnvPath) {
		t.Errorf("source with %s set: %q", config.EnvPath, got)
	}
	if got := configSource(config.Default(), ""); !strings.Contains(got, "no longer reads as this configuration") {
		t.Errorf("source of a configuration the file does not give: %q", got)
	}
}

// TestPsNoStateDir: before the first sandbox there is no state
// directory, and nothing to list.
func TestPsNoStateDir(t *testing.T) {
	dir := t.TempDir()
	cfg := filepath.Join(dir, "config.toml")
	if err := os.WriteFile(cfg, []byte("[runtime]\nstate_dir = \""+dir+"/none\"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	var stdout, stderr bytes.Buffer
	if code := Run(context.Background(), []string{"--config", cfg, "ps", "--json"}, &stdout, &stderr); code != 0 || strings.TrimSpace(stdout.String()) != "[]" {
		t.Errorf("colo ps --json without a state directory: exit %d, stdout %q, stderr %q; want []", code, stdout.String(), stderr.String())
	}
}
