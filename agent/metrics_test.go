package agent

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/containerd/ttrpc"
	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/encoding/prototext"
	"google.golang.org/protobuf/proto"

	"github.com/colo-runtime/colo/agentproto"
)

// fakeTree writes files (path relative to a new directory: content) and
// returns the directory.
func fakeTree(t *testing.T, files map[string]string) string {
	t.Helper()
	root := t.TempDir()
	for p, content := range files {
		p = filepath.Join(root, p)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return root
}

const (
	goodMeminfo = `MemTotal:        2048000 kB
MemFree:          1000 kB
MemAvailable:   1500000 kB
Active(anon):       12 kB
HugePages_Total:       0
Hugepagesize:       2048 kB
`
	goodStat = `cpu  100 2 30 4000 5 6 7 8 9 10
cpu0 50 1 15 2000 2 3 3 4 0 0
cpu1 50 1 15 2000 3 3 4 4 0 0
intr 12345 0 0 1 2
ctxt 987654
btime 1700000000
processes 4321
procs_running 3
procs_blocked 1
softirq 55 1 2 3
`
	goodNetdev = `Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo:     100       2    0    0    0     0          0         0      100       2    0    0    0     0       0          0
  eth0: 5000      40    1    2    0     0          0         3     6000      50    3    4    0     0       0          0
`
	goodDiskstats = `   7       0 loop0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0
   7       1 loop1 3 0 24 1 0 0 0 0 0 2 1 0 0 0 0 0 0
   1       0 ram0 0 0 0 0 0 0 0 0 0 0 0
 254       0 vda 1000 10 20000 300 500 5 8000 700 0 900 1000 0 0 0 0 0 0
 254       1 vda1 900 10 18000 280 400 5 7000 600 0 800 880
`
)

// goodProc is a /proc with every file the collector reads.
func goodProc() map[string]string {
	return map[string]string{
		"meminfo":        goodMeminfo,
		"stat":           goodStat,
		"loadavg":        "0.50 0.25 1.75 2/123 4567\n",
		"uptime":         "1234.56 4000.00\n",
		"net/dev":        goodNetdev,
		"diskstats":      goodDiskstats,
		"1/status":       "Name:\tcolo-agent\nVmRSS:\t    1000 kB\n",
		"self/status":    "Name:\tcolo-agent\nVmRSS:\t    2000 kB\n",
		"self/fd/0":      "",
		"self/fd/1":      "",
		"self/fd/2":      "",
		"self/fd/3":      "",
		"self/fd/.empty": "",
	}
}

func TestCollectMetrics(t *testing.T) {
	m := collectMetrics(fakeTree(t, goodProc()), t.TempDir(), nil)
	want := &agentproto.GetMetricsResponse{
		MeminfoBytes: map[string]uint64{
			"MemTotal": 2048000 << 10, "MemFree": 1000 << 10, "MemAvailable": 1500000 << 10,
			"Active(anon)": 12 << 10, "Hugepagesize": 2048 << 10,
		},
		CpuTotal: &agentproto.CPUTime{UserSeconds: 1, NiceSeconds: 0.02, SystemSeconds: 0.3, IdleSeconds: 40,
			IowaitSeconds: 0.05, IrqSeconds: 0.06, SoftirqSeconds: 0.07, StealSeconds: 0.08},
		Cpus: []*agentproto.CPUTime{
			{Cpu: 0, UserSeconds: 0.5, NiceSeconds: 0.01, SystemSeconds: 0.15, IdleSeconds: 20,
				IowaitSeconds: 0.02, IrqSeconds: 0.03, SoftirqSeconds: 0.03, StealSeconds: 0.04},
			{Cpu: 1, UserSeconds: 0.5, NiceSeconds: 0.01, SystemSeconds: 0.15, IdleSeconds: 20,
				IowaitSeconds: 0.03, IrqSeconds: 0.03, SoftirqSeconds: 0.04, StealSeconds: 0.04},
		},
		ContextSwitches: 987654, Forks: 4321, ProcsRunning: 3, ProcsBlocked: 1,
		BootTimeSeconds: 1700000000, UptimeSeconds: 1234.56,
		Load1: 0.5, Load5: 0.25, Load15: 1.75,
		Netdev: []*agentproto.NetDevStats{
			{Name: "lo", RxBytes: 100, RxPackets: 2, TxBytes: 100, TxPackets: 2},
			{Name: "eth0", RxBytes: 5000, RxPackets: 40, RxErrors: 1, RxDropped: 2, TxBytes: 6000, TxPackets: 50, TxErrors: 3, TxDropped: 4},
		},
		Disks: []*agentproto.DiskStats{
			{Name: "loop1", Reads: 3, ReadBytes: 24 * 512, ReadTimeMs: 1, IoTimeMs: 2},
			{Name: "vda", Reads: 1000, ReadBytes: 20000 * 512, ReadTimeMs: 300, Writes: 500, WrittenBytes: 8000 * 512, WriteTimeMs: 700, IoTimeMs: 900},
			{Name: "vda1", Reads: 900, ReadBytes: 18000 * 512, ReadTimeMs: 280, Writes: 400, WrittenBytes: 7000 * 512, WriteTimeMs: 600, IoTimeMs: 800},
		},
		AgentRssBytes:   3000 << 10,
		AgentGoroutines: m.AgentGoroutines,
		AgentOpenFds:    5,
	}
	if !proto.Equal(want, m) {
		t.Errorf("metrics:\n%s\nwant:\n%s", prototext.Format(m), prototext.Format(want))
	}
	if m.AgentGoroutines == 0 {
		t.Error("no goroutines")
	}
}

// TestCollectMetricsMalformed: each bad line is skipped and counted, the
// good ones around it kept.
func TestCollectMetricsMalformed(t *testing.T) {
	long := strings.Repeat("9", maxMetricsLine+10)
	tests := []struct {
		name    string
		file    string
		content string
		// check looks at what was kept.
		check   func(m *agentproto.GetMetricsResponse) error
		skipped uint32
	}{
		{"meminfo: no colon, no unit, bad number, odd unit, bad key, twice, long", "meminfo",
			"MemTotal 5 kB\nMemFree: x kB\nMemAvailable: 5 MB\nBad Key: 5 kB\nCached: 7 kB\nCached: 8 kB\nHuge: 1 2 kB\n" +
				"Buffers: 3 kB\nX: " + long + " kB\nOverflow: 18446744073709551615 kB\nEvil\x1b[0m: 1 kB\n",
			func(m *agentproto.GetMetricsResponse) error {
				if len(m.MeminfoBytes) != 2 || m.MeminfoBytes["Cached"] != 7<<10 || m.MeminfoBytes["Buffers"] != 3<<10 {
					return fmt.Errorf("meminfo %v", m.MeminfoBytes)
				}
				return nil
			}, 9},
		{"stat: short cpu, bad cpu index, negative, bad ctxt, long intr ignored", "stat",
			"cpu 1 2 3\ncpuX 1 2 3 4 5 6 7 8\ncpu0 -1 2 3 4 5 6 7 8\ncpu1 100 0 0 0 0 0 0 0\nctxt many\nctxt 1 2\nintr " + long + "\nprocesses 9\n" +
				"cpu2 " + long + " 0 0 0 0 0 0 0\n",
			func(m *agentproto.GetMetricsResponse) error {
				if m.CpuTotal != nil || len(m.Cpus) != 1 || m.Cpus[0].Cpu != 1 || m.Cpus[0].UserSeconds != 1 || m.Forks != 9 || m.ContextSwitches != 0 {
					return fmt.Errorf("stat %v", m)
				}
				return nil
			}, 6},
		{"loadavg: NaN", "loadavg", "NaN 1 1 1/1 1\n", func(m *agentproto.GetMetricsResponse) error {
			if m.Load1 != 0 || m.Load5 != 0 {
				return fmt.Errorf("load %v %v", m.Load1, m.Load5)
			}
			return nil
		}, 1},
		{"loadavg: negative", "loadavg", "1 -1 1 1/1 1\n", nil, 1},
		{"loadavg: short", "loadavg", "1 1\n", nil, 1},
		{"uptime: Inf", "uptime", "+Inf 1\n", nil, 1},
		{"uptime: empty", "uptime", "", nil, 0},
		{"netdev: bad name, short, not a number, twice, no colon", "net/dev",
			"Inter-|   Receive |  Transmit\n face |bytes|bytes\n" +
				"  bad name: 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16\n" +
				"  a/b: 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16\n" +
				"  eth0: 1 2 3\n" +
				"  eth1: 1 2 3 4 5 6 7 8 x 10 11 12 13 14 15 16\n" +
				"  eth2: 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16\n" +
				"  eth2: 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16\n" +
				"  averyveryverylongname: 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16\n" +
				"garbage\n",
			func(m *agentproto.GetMetricsResponse) error {
				if len(m.Netdev) != 1 || m.Netdev[0].Name != "eth2" || m.Netdev[0].TxBytes != 9 || m.Netdev[0].TxDropped != 12 {
					return fmt.Errorf("netdev %v", m.Netdev)
				}
				return nil
			}, 7},
		{"diskstats: short, bad number, bad major, bad name, twice, overflow", "diskstats",
			"8 0 sda 1 2 3\n8 0 sdb 1 2 3 4 5 6 7 8 9 10 x\nx 0 sdc 1 2 3 4 5 6 7 8 9 10 11\n8 0 sd\x01 1 2 3 4 5 6 7 8 9 10 11\n" +
				"8 0 sde 1 2 3 4 5 6 7 8 9 10 11\n8 0 sde 1 2 3 4 5 6 7 8 9 10 11\n8 0 sdf 1 2 18446744073709551615 4 5 6 7 8 9 10 11\n",
			func(m *agentproto.GetMetricsResponse) error {
				if len(m.Disks) != 1 || m.Disks[0].Name != "sde" || m.Disks[0].WrittenBytes != 7*512 || m.Disks[0].IoTimeMs != 10 {
					return fmt.Errorf("disks %v", m.Disks)
				}
				return nil
			}, 6},
		{"status: no VmRSS", "1/status", "Name: x\n", func(m *agentproto.GetMetricsResponse) error {
			if m.AgentRssBytes != 2000<<10 {
				return fmt.Errorf("rss %d", m.AgentRssBytes)
			}
			return nil
		}, 1},
		{"a file cut short at the limit", "uptime", "1" + strings.Repeat(" ", maxMetricsFile) + "\n", nil, 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			files := goodProc()
			files[tt.file] = tt.content
			m := collectMetrics(fakeTree(t, files), t.TempDir(), nil)
			if m.Skipped != tt.skipped {
				t.Errorf("skipped %d, want %d", m.Skipped, tt.skipped)
			}
			if tt.check != nil {
				if err := tt.check(m); err != nil {
					t.Error(err)
				}
			}
		})
	}
}

// TestCollectMetricsMissing: an empty proc root gives an empty answer,
// every file counted as skipped, and a FIFO in a file's place does not
// block.
func TestCollectMetricsMissing(t *testing.T) {
	m := collectMetrics(t.TempDir(), t.TempDir(), []string{"high"})
	// meminfo, stat, loadavg, uptime, net/dev, diskstats, the class, two
	// status files and the fd directory.
	if m.Skipped != 10 || len(m.MeminfoBytes) != 0 || m.CpuTotal != nil || len(m.Classes) != 0 || m.AgentRssBytes != 0 {
		t.Errorf("metrics of nothing: %v", m)
	}

	files := goodProc()
	delete(files, "stat")
	proc := fakeTree(t, files)
	if err := unix.Mkfifo(filepath.Join(proc, "stat"), 0o600); err != nil {
		t.Fatal(err)
	}
	done := make(chan *agentproto.GetMetricsResponse)
	go func() { done <- collectMetrics(proc, t.TempDir(), nil) }()
	select {
	case m := <-done:
		if m.Skipped != 1 || m.MeminfoBytes["MemTotal"] == 0 {
			t.Errorf("with a FIFO for stat: %v", m)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("a FIFO blocks the metrics")
	}
}

// TestCollectMetricsCaps: lists stop at their caps, the rest counted.
func TestCollectMetricsCaps(t *testing.T) {
	var mem, stat, netdev, disks strings.Builder
	for i := range maxMeminfo + 5 {
		fmt.Fprintf(&mem, "Field%d: %d kB\n", i, i)
	}
	for i := range maxMetricsCPUs + 5 {
		fmt.Fprintf(&stat, "cpu%d 1 2 3 4 5 6 7 8\n", i)
	}
	netdev.WriteString("Inter-|\n face |\n")
	for i := range maxMetricsEntries + 5 {
		fmt.Fprintf(&netdev, "eth%d: 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16\n", i)
		fmt.Fprintf(&disks, "8 %d sd%d 1 2 3 4 5 6 7 8 9 10 11\n", i, i)
	}
	files := goodProc()
	files["meminfo"], files["stat"], files["net/dev"], files["diskstats"] = mem.String(), stat.String(), netdev.String(), disks.String()
	classes := make([]string, maxMetricsEntries+5)
	cgroup := t.TempDir()
	for i := range classes {
		classes[i] = fmt.Sprintf("c%d", i)
		dir := filepath.Join(cgroup, agentproto.ClassCgroup(classes[i]))
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, "cpu.stat"), []byte("usage_usec 1\n"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	m := collectMetrics(fakeTree(t, files), cgroup, classes)
	if len(m.MeminfoBytes) != maxMeminfo || len(m.Cpus) != maxMetricsCPUs || len(m.Netdev) != maxMetricsEntries ||
		len(m.Disks) != maxMetricsEntries || len(m.Classes) != maxMetricsEntries {
		t.Errorf("meminfo %d, CPUs %d, interfaces %d, disks %d, classes %d: want the caps",
			len(m.MeminfoBytes), len(m.Cpus), len(m.Netdev), len(m.Disks), len(m.Classes))
	}
	if m.Skipped != 5*4+1 {
		t.Errorf("skipped %d, want %d", m.Skipped, 5*4+1)
	}
	if size := proto.Size(m); size > 256<<10 {
		t.Errorf("answer of %d bytes at the caps", size)
	}
}

// fakeClasses makes class cgroups: high with the memory controller, low
// without, and none for missing.
func fakeClasses(t *testing.T) string {
	return fakeTree(t, map[string]string{
		"colo-classes/high/cpu.stat": "usage_usec 3000\nuser_usec 2000\nsystem_usec 1000\ncore_sched.force_idle_usec 0\n" +
			"nr_periods 10\nnr_throttled 2\nthrottled_usec 500\nnr_bursts 0\nburst_usec 0\n",
		"colo-classes/high/memory.current": "4096\n",
		"colo-classes/high/memory.stat":    "anon 1024\nfile 2048\nkernel 512\nbad line\n",
		"colo-classes/low/cpu.stat":        "usage_usec 7\nuser_usec x\n",
	})
}

func u64(v uint64) *uint64 { return &v }

func TestCollectMetricsClasses(t *testing.T) {
	m := collectMetrics(fakeTree(t, goodProc()), fakeClasses(t), []string{"high", "missing", "low"})
	want := []*agentproto.ClassStats{
		{Name: "high", CpuUsageUsec: 3000, CpuUserUsec: 2000, CpuSystemUsec: 1000, CpuNrPeriods: 10, CpuNrThrottled: 2, CpuThrottledUsec: 500,
			MemoryCurrentBytes: u64(4096), MemoryAnonBytes: u64(1024), MemoryFileBytes: u64(2048)},
		{Name: "low", CpuUsageUsec: 7},
	}
	if len(m.Classes) != len(want) || !proto.Equal(want[0], m.Classes[0]) || !proto.Equal(want[1], m.Classes[1]) {
		t.Errorf("classes %v, want %v", m.Classes, want)
	}
	// The missing class and low's bad user_usec.
	if m.Skipped != 2 {
		t.Errorf("skipped %d, want 2", m.Skipped)
	}
}

// TestGetMetricsService asks a service over ttrpc: the host's real /proc,
// and fake class cgroups.
func TestGetMetricsService(t *testing.T) {
	ctx := context.Background()
	svc, err := NewService(ServiceConfig{Version: "test", StateDir: t.TempDir(), NoPivotRoot: true, CgroupRoot: fakeClasses(t)})
	if err != nil {
		t.Fatal(err)
	}
	svc.classes = []*agentproto.CPUClass{{Name: "high", Cpus: []uint32{0}, Weight: 100}, {Name: "low", Cpus: []uint32{1}, Weight: 1}}
	srv, err := ttrpc.NewServer(ttrpc.WithUnaryServerInterceptor(statusInterceptor))
	if err != nil {
		t.Fatal(err)
	}
	agentproto.RegisterAgentService(srv, svc)
	l, err := net.Listen("unix", filepath.Join(t.TempDir(), "agent.sock"))
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(ctx, l)
	defer srv.Close()
	conn, err := net.Dial("unix", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	client := ttrpc.NewClient(conn)
	defer client.Close()
	agent := agentproto.NewAgentClient(client)

	m, err := agent.GetMetrics(ctx, &agentproto.GetMetricsRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if m.MeminfoBytes["MemTotal"] == 0 || m.CpuTotal.GetUserSeconds()+m.CpuTotal.GetSystemSeconds() == 0 || len(m.Cpus) == 0 ||
		m.ContextSwitches == 0 || m.BootTimeSeconds == 0 || m.UptimeSeconds == 0 || len(m.Netdev) == 0 ||
		m.AgentRssBytes == 0 || m.AgentGoroutines == 0 || m.AgentOpenFds == 0 {
		t.Errorf("GetMetrics = %v", m)
	}
	if len(m.Classes) != 2 || m.Classes[0].GetName() != "high" || m.Classes[0].GetMemoryCurrentBytes() != 4096 ||
		m.Classes[1].GetName() != "low" || m.Classes[1].MemoryCurrentBytes != nil {
		t.Errorf("classes %v", m.Classes)
	}
	if m.Skipped != 1 { // low's bad user_usec
		t.Errorf("skipped %d, want 1", m.Skipped)
	}

	// s.mu held (a long CreateSandbox): the answer comes, without the
	// classes.
	svc.mu.Lock()
	start := time.Now()
	m, err = agent.GetMetrics(ctx, &agentproto.GetMetricsRequest{})
	svc.mu.Unlock()
	if err != nil {
		t.Fatal(err)
	}
	if len(m.Classes) != 0 || m.MeminfoBytes["MemTotal"] == 0 || time.Since(start) > 5*time.Second {
		t.Errorf("with the lock held: %v classes after %v", len(m.Classes), time.Since(start))
	}
}
