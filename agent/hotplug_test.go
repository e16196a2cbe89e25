package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/colo-runtime/colo/agentproto"
)

// fakeSys is a sysfs tree with CPUs and memory blocks, and a fake kernel
// that keeps cpu/online in step with the cpuN/online files, plugs CPUs
// late, and checks that no class with processes has a cpuset naming an
// offline CPU (the order OnlineCPUMem must keep).
type fakeSys struct {
	t                 *testing.T
	root, cgroupRoot  string
	mu                sync.Mutex
	violations        []string
	syncMu            sync.Mutex
	stop              chan struct{}
	done              chan struct{}
	plugAt            time.Time
	plugLater         []int
	pluggedLaterIsSet bool
}

func newFakeSys(t *testing.T, possible, present, online int, plugLater ...int) *fakeSys {
	t.Helper()
	f := &fakeSys{t: t, root: t.TempDir(), cgroupRoot: t.TempDir(), stop: make(chan struct{}), done: make(chan struct{}),
		plugAt: time.Now().Add(150 * time.Millisecond), plugLater: plugLater}
	f.write("devices/system/cpu/possible", fmt.Sprintf("0-%d\n", possible-1))
	if err := os.MkdirAll(f.path("devices/system/cpu/cpu0"), 0o755); err != nil { // no online file: cpu0 stays
		t.Fatal(err)
	}
	for i := 1; i < present; i++ {
		f.write(fmt.Sprintf("devices/system/cpu/cpu%d/online", i), map[bool]string{true: "1\n", false: "0\n"}[i < online])
	}
	f.sync()
	go f.kernel()
	t.Cleanup(func() { close(f.stop); <-f.done })
	return f
}

func (f *fakeSys) path(p string) string { return filepath.Join(f.root, p) }

// write writes a file through a rename, so that the service never reads
// half of it; from the fake kernel's goroutine too.
func (f *fakeSys) write(p, v string) {
	f.t.Helper()
	p = f.path(p)
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		f.t.Error(err)
		return
	}
	tmp, err := os.CreateTemp(filepath.Dir(p), ".tmp*")
	if err == nil {
		_, err = tmp.WriteString(v)
		err = errors.Join(err, tmp.Close(), os.Rename(tmp.Name(), p))
	}
	if err != nil {
		f.t.Error(err)
	}
}

func (f *fakeSys) read(p string) string {
	b, _ := os.ReadFile(f.path(p))
	return strings.TrimSpace(string(b))
}

func (f *fakeSys) kernel() {
	defer close(f.done)
	for {
		select {
		case <-f.stop:
			return
		case <-time.After(time.Millisecond):
		}
		if !f.pluggedLaterIsSet && time.Now().After(f.plugAt) {
			for _, i := range f.plugLater {
				f.write(fmt.Sprintf("devices/system/cpu/cpu%d/online", i), "0\n")
			}
			f.pluggedLaterIsSet = true
		}
		f.sync()
	}
}

// sync writes cpu/online from the cpuN/online files and checks the
// classes' cpusets against it.
func (f *fakeSys) sync() {
	f.syncMu.Lock()
	defer f.syncMu.Unlock()
	online := []int{0}
	offline := map[int]bool{}
	entries, _ := filepath.Glob(f.path("devices/system/cpu/cpu[0-9]*/online"))
	for _, e := range entries {
		var i int
		fmt.Sscanf(filepath.Base(filepath.Dir(e)), "cpu%d", &i)
		b, _ := os.ReadFile(e)
		if strings.TrimSpace(string(b)) == "1" {
			online = append(online, i)
		} else {
			offline[i] = true
		}
	}
	slices.Sort(online)
	f.write("devices/system/cpu/online", formatCPUList(online)+"\n")
	classes, _ := filepath.Glob(filepath.Join(f.cgroupRoot, "colo-classes/*/cpuset.cpus"))
	for _, c := range classes {
		events, _ := os.ReadFile(filepath.Join(filepath.Dir(c), "cgroup.events"))
		if !strings.Contains(string(events), "populated 1") {
			continue
		}
		b, _ := os.ReadFile(c)
		cpus, _ := parseCPUList(string(b))
		for _, cpu := range cpus {
			if offline[cpu] {
				f.mu.Lock()
				f.violations = append(f.violations, fmt.Sprintf("%s = %s with CPU %d offline", filepath.Base(filepath.Dir(c)), b, cpu))
				f.mu.Unlock()
			}
		}
	}
}

func (f *fakeSys) service(t *testing.T) *Service {
	t.Helper()
	svc, err := NewService(ServiceConfig{StateDir: t.TempDir(), NoPivotRoot: true, CgroupRoot: f.cgroupRoot,
		TopologyFile: filepath.Join(t.TempDir(), "topology.json"), SysfsRoot: f.root})
	if err != nil {
		t.Fatal(err)
	}
	svc.meminfo = filepath.Join(t.TempDir(), "meminfo")
	if err := os.WriteFile(svc.meminfo, []byte("MemTotal:        2048000 kB\nMemFree:  1000 kB\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	svc.fixAffinity = func(context.Context, []int) {}
	return svc
}

func (f *fakeSys) cpuStates() string {
	var s []string
	dirs, _ := filepath.Glob(f.path("devices/system/cpu/cpu[0-9]*"))
	for i := range len(dirs) {
		v := f.read(fmt.Sprintf("devices/system/cpu/cpu%d/online", i))
		s = append(s, fmt.Sprintf("cpu%d=%s", i, cmpOr(v, "-")))
	}
	return strings.Join(s, " ")
}

func cmpOr(a, b string) string {
	if a != "" {
		return a
	}
	return b
}

func code(err error) codes.Code { return status.Code(toStatus(err)) }

// TestOnlineCPUs: CPUs below nb_cpus go online (also those plugged while
// the call waits), the others offline, within the deadline; bad counts are
// refused.
func TestOnlineCPUs(t *testing.T) {
	for _, tc := range []struct {
		name                      string
		possible, present, online int
		plugLater                 []int
		n                         uint32
		timeout                   time.Duration
		want                      codes.Code
		wantCPUs                  string // cpuN/online files after the call
		wantOnline                string // cpu/online after the call
	}{
		{name: "grow present", possible: 8, present: 4, online: 2, n: 4, wantCPUs: "cpu0=- cpu1=1 cpu2=1 cpu3=1", wantOnline: "0-3"},
		{name: "grow plugged late", possible: 8, present: 2, online: 2, plugLater: []int{2, 3}, n: 4, wantCPUs: "cpu0=- cpu1=1 cpu2=1 cpu3=1", wantOnline: "0-3"},
		{name: "shrink", possible: 8, present: 4, online: 4, n: 2, wantCPUs: "cpu0=- cpu1=1 cpu2=0 cpu3=0", wantOnline: "0-1"},
		{name: "shrink to cpu0", possible: 8, present: 4, online: 4, n: 1, wantCPUs: "cpu0=- cpu1=0 cpu2=0 cpu3=0", wantOnline: "0"},
		{name: "online a present offline CPU, offline another", possible: 4, present: 4, online: 2, n: 3, wantCPUs: "cpu0=- cpu1=1 cpu2=1 cpu3=0", wantOnline: "0-2"},
		{name: "unchanged", possible: 4, present: 2, online: 2, n: 2, wantCPUs: "cpu0=- cpu1=1", wantOnline: "0-1"},
		{name: "all possible", possible: 4, present: 4, online: 1, n: 4, wantCPUs: "cpu0=- cpu1=1 cpu2=1 cpu3=1", wantOnline: "0-3"},
		{name: "more than possible", possible: 4, present: 4, online: 4, n: 5, want: codes.InvalidArgument, wantCPUs: "cpu0=- cpu1=1 cpu2=1 cpu3=1"},
		{name: "none", possible: 4, present: 2, online: 2, n: 0, want: codes.InvalidArgument, wantCPUs: "cpu0=- cpu1=1"},
		{name: "never plugged: host deadline", possible: 8, present: 2, online: 2, n: 3, timeout: 200 * time.Millisecond, want: codes.DeadlineExceeded},
		{name: "never plugged: agent cap", possible: 8, present: 2, online: 2, n: 3, timeout: -1, want: codes.DeadlineExceeded},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newFakeSys(t, tc.possible, tc.present, tc.online, tc.plugLater...)
			svc := f.service(t)
			ctx := context.Background()
			bound := 3 * time.Second
			switch {
			case tc.timeout > 0:
				var cancel context.CancelFunc
				ctx, cancel = context.WithTimeout(ctx, tc.timeout)
				defer cancel()
			case tc.timeout < 0:
				svc.cpuWait = 300 * time.Millisecond
			}
			start := time.Now()
			resp, err := svc.OnlineCPUMem(ctx, &agentproto.OnlineCPUMemRequest{NbCpus: tc.n, CpuOnly: true})
			if code(err) != tc.want {
				t.Fatalf("got %v, want code %v", err, tc.want)
			}
			if took := time.Since(start); took > bound {
				t.Errorf("took %v", took)
			}
			if tc.wantCPUs != "" {
				if got := f.cpuStates(); got != tc.wantCPUs {
					t.Errorf("CPUs %s, want %s", got, tc.wantCPUs)
				}
			}
			if err != nil {
				if tc.want == codes.InvalidArgument && !strings.Contains(err.Error(), "nb_cpus") {
					t.Errorf("error %v does not say what is wrong", err)
				}
				return
			}
			if got := f.read("devices/system/cpu/online"); got != tc.wantOnline {
				t.Errorf("online %s, want %s", got, tc.wantOnline)
			}
			if resp.GetOnlineCpus() != tc.n || resp.GetMemTotalBytes() != 2048000<<10 {
				t.Errorf("response %v", resp)
			}
		})
	}
}

// TestOnlineMemory: offline memory blocks go online (movable), unless
// cpu_only.
func TestOnlineMemory(t *testing.T) {
	for _, cpuOnly := range []bool{false, true} {
		t.Run(fmt.Sprint("cpu_only=", cpuOnly), func(t *testing.T) {
			f := newFakeSys(t, 2, 2, 2)
			f.write("devices/system/memory/memory0/state", "online\n")
			f.write("devices/system/memory/memory1/state", "offline\n")
			f.write("devices/system/memory/memory40/state", "offline\n")
			f.write("devices/system/memory/auto_online_blocks", "offline\n")
			svc := f.service(t)
			resp, err := svc.OnlineCPUMem(context.Background(), &agentproto.OnlineCPUMemRequest{NbCpus: 2, CpuOnly: cpuOnly})
			if err != nil {
				t.Fatal(err)
			}
			want := map[string]string{"memory0": "online", "memory1": "online_movable", "memory40": "online_movable"}
			if cpuOnly {
				want["memory1"], want["memory40"] = "offline", "offline"
			}
			for block, state := range want {
				if got := f.read("devices/system/memory/" + block + "/state"); got != state {
					t.Errorf("%s: %s, want %s", block, got, state)
				}
			}
			if got := f.read("devices/system/memory/auto_online_blocks"); got != "offline" {
				t.Errorf("auto_online_blocks touched: %s", got)
			}
			if resp.GetMemTotalBytes() != 2048000<<10 {
				t.Errorf("MemTotal %d", resp.GetMemTotalBytes())
			}
		})
	}
}

// TestOnlineCPUsClasses: the classes follow the vCPUs; their cpusets are
// never left naming offline CPUs; bad or unsafe class changes are refused
// before any CPU changes.
func TestOnlineCPUsClasses(t *testing.T) {
	type class = agentproto.CPUClass
	for _, tc := range []struct {
		name                      string
		present, online, plugLate int
		initial                   []*class
		empty                     []string // initial classes without processes
		n                         uint32
		classes                   []*class
		want                      codes.Code
		wantCpusets               map[string]string
		wantTopology              string // class:cpus ...
		wantOnline                string
	}{
		{
			name: "shrink", present: 4, online: 4,
			initial:     []*class{{Name: "high", Cpus: []uint32{0}, Weight: 100}, {Name: "low", Cpus: []uint32{1, 2, 3}, Weight: 10}},
			n:           2,
			classes:     []*class{{Name: "high", Cpus: []uint32{0}, Weight: 100}, {Name: "low", Cpus: []uint32{1}, Weight: 10}},
			wantCpusets: map[string]string{"high": "0", "low": "1"}, wantTopology: "high:0 low:1", wantOnline: "0-1",
		},
		{
			name: "shrink a class away from its CPUs", present: 4, online: 4,
			initial:     []*class{{Name: "high", Cpus: []uint32{0, 1}, Weight: 100}, {Name: "low", Cpus: []uint32{2, 3}, Weight: 10}},
			n:           2,
			classes:     []*class{{Name: "high", Cpus: []uint32{0}, Weight: 200}, {Name: "low", Cpus: []uint32{1}, Weight: 5}},
			wantCpusets: map[string]string{"high": "0", "low": "1", "high/cpu.weight": "200", "low/cpu.weight": "5"}, wantTopology: "high:0 low:1", wantOnline: "0-1",
		},
		{
			name: "grow with plugged CPUs", present: 2, online: 2, plugLate: 2,
			initial:     []*class{{Name: "high", Cpus: []uint32{0}, Weight: 100}, {Name: "low", Cpus: []uint32{1}, Weight: 10}},
			n:           4,
			classes:     []*class{{Name: "high", Cpus: []uint32{0, 1}, Weight: 100}, {Name: "low", Cpus: []uint32{2, 3}, Weight: 10}},
			wantCpusets: map[string]string{"high": "0,1", "low": "2,3"}, wantTopology: "high:0,1 low:2,3", wantOnline: "0-3",
		},
		{
			name: "grow, classes kept", present: 4, online: 2,
			initial:     []*class{{Name: "high", Cpus: []uint32{0}, Weight: 100}, {Name: "low", Cpus: []uint32{1}, Weight: 10}},
			n:           4,
			wantCpusets: map[string]string{"high": "0", "low": "1"}, wantTopology: "high:0 low:1", wantOnline: "0-3",
		},
		{
			name: "new class", present: 2, online: 2, plugLate: 1,
			initial:     []*class{{Name: "high", Cpus: []uint32{0, 1}, Weight: 100}},
			n:           3,
			classes:     []*class{{Name: "high", Cpus: []uint32{0, 1}, Weight: 100}, {Name: "batch", Cpus: []uint32{2}, Weight: 1}},
			wantCpusets: map[string]string{"high": "0,1", "batch": "2"}, wantTopology: "high:0,1 batch:2", wantOnline: "0-2",
		},
		{
			name: "drop a class without processes", present: 4, online: 4,
			initial:     []*class{{Name: "high", Cpus: []uint32{0}, Weight: 100}, {Name: "mid", Cpus: []uint32{1}, Weight: 50}, {Name: "low", Cpus: []uint32{2, 3}, Weight: 10}},
			empty:       []string{"mid"},
			n:           2,
			classes:     []*class{{Name: "high", Cpus: []uint32{0}, Weight: 100}, {Name: "low", Cpus: []uint32{1}, Weight: 10}},
			wantCpusets: map[string]string{"high": "0", "low": "1"}, wantTopology: "high:0 low:1", wantOnline: "0-1",
		},
		{
			name: "drop a class with processes", present: 4, online: 4,
			initial:     []*class{{Name: "high", Cpus: []uint32{0}, Weight: 100}, {Name: "mid", Cpus: []uint32{1}, Weight: 50}, {Name: "low", Cpus: []uint32{2, 3}, Weight: 10}},
			n:           2,
			classes:     []*class{{Name: "high", Cpus: []uint32{0}, Weight: 100}, {Name: "low", Cpus: []uint32{1}, Weight: 10}},
			want:        codes.FailedPrecondition,
			wantCpusets: map[string]string{"high": "0", "mid": "1", "low": "2,3"}, wantTopology: "high:0 mid:1 low:2,3", wantOnline: "0-3",
		},
		{
			name: "shrink without the classes", present: 4, online: 4,
			initial:     []*class{{Name: "high", Cpus: []uint32{0}, Weight: 100}, {Name: "low", Cpus: []uint32{1, 2, 3}, Weight: 10}},
			n:           2,
			want:        codes.FailedPrecondition,
			wantCpusets: map[string]string{"high": "0", "low": "1,2,3"}, wantTopology: "high:0 low:1,2,3", wantOnline: "0-3",
		},
		{
			name: "class CPU beyond nb_cpus", present: 4, online: 4,
			initial:     []*class{{Name: "high", Cpus: []uint32{0}, Weight: 100}, {Name: "low", Cpus: []uint32{1, 2, 3}, Weight: 10}},
			n:           2,
			classes:     []*class{{Name: "high", Cpus: []uint32{0}, Weight: 100}, {Name: "low", Cpus: []uint32{1, 2}, Weight: 10}},
			want:        codes.InvalidArgument,
			wantCpusets: map[string]string{"high": "0", "low": "1,2,3"}, wantTopology: "high:0 low:1,2,3", wantOnline: "0-3",
		},
		{
			name: "class twice", present: 4, online: 4,
			initial:     []*class{{Name: "high", Cpus: []uint32{0}, Weight: 100}, {Name: "low", Cpus: []uint32{1, 2, 3}, Weight: 10}},
			n:           2,
			classes:     []*class{{Name: "high", Cpus: []uint32{0}, Weight: 100}, {Name: "high", Cpus: []uint32{1}, Weight: 10}},
			want:        codes.InvalidArgument,
			wantCpusets: map[string]string{"high": "0", "low": "1,2,3"}, wantTopology: "high:0 low:1,2,3", wantOnline: "0-3",
		},
		{
			name: "CPU twice", present: 4, online: 4,
			initial:     []*class{{Name: "high", Cpus: []uint32{0}, Weight: 100}, {Name: "low", Cpus: []uint32{1, 2, 3}, Weight: 10}},
			n:           2,
			classes:     []*class{{Name: "high", Cpus: []uint32{0, 1}, Weight: 100}, {Name: "low", Cpus: []uint32{1}, Weight: 10}},
			want:        codes.InvalidArgument,
			wantCpusets: map[string]string{"high": "0", "low": "1,2,3"}, wantTopology: "high:0 low:1,2,3", wantOnline: "0-3",
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var late []int
			for i := range tc.plugLate {
				late = append(late, tc.present+i)
			}
			f := newFakeSys(t, 8, tc.present, tc.online, late...)
			svc := f.service(t)
			ctx := context.Background()
			svc.mu.Lock()
			err := svc.setupClasses(ctx, tc.initial)
			svc.mu.Unlock()
			if err != nil {
				t.Fatal(err)
			}
			for _, c := range tc.initial {
				populated := "1"
				if slices.Contains(tc.empty, c.GetName()) {
					populated = "0"
				}
				if err := os.WriteFile(filepath.Join(f.cgroupRoot, "colo-classes", c.GetName(), "cgroup.events"), []byte("populated "+populated+"\nfrozen 0\n"), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			ctx, cancel := context.WithTimeout(ctx, 3*time.Second)
			defer cancel()
			_, err = svc.OnlineCPUMem(ctx, &agentproto.OnlineCPUMemRequest{NbCpus: tc.n, CpuOnly: true, CpuClasses: tc.classes})
			if code(err) != tc.want {
				t.Fatalf("got %v, want code %v", err, tc.want)
			}
			f.sync()
			for file, want := range tc.wantCpusets {
				if !strings.Contains(file, "/") {
					file += "/cpuset.cpus"
				}
				if b, err := os.ReadFile(filepath.Join(f.cgroupRoot, "colo-classes", file)); err != nil || string(b) != want {
					t.Errorf("%s = %q, %v; want %q", file, b, err, want)
				}
			}
			if got := topologyOf(t, svc.topologyFile); got != tc.wantTopology {
				t.Errorf("topology %s, want %s", got, tc.wantTopology)
			}
			if got := f.read("devices/system/cpu/online"); got != tc.wantOnline {
				t.Errorf("online %s, want %s", got, tc.wantOnline)
			}
			f.mu.Lock()
			defer f.mu.Unlock()
			if len(f.violations) > 0 {
				t.Errorf("class cpusets named offline CPUs: %v", f.violations[:min(len(f.violations), 3)])
			}
		})
	}
}

func topologyOf(t *testing.T, file string) string {
	t.Helper()
	b, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	var topo Topology
	if err := json.Unmarshal(b, &topo); err != nil {
		t.Fatal(err)
	}
	var classes []string
	for _, c := range topo.Classes {
		var cpus []string
		for _, cpu := range c.CPUs {
			cpus = append(cpus, fmt.Sprint(cpu))
		}
		classes = append(classes, c.Name+":"+strings.Join(cpus, ","))
	}
	return strings.Join(classes, " ")
}

func TestParseCPUList(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want []int
		bad  bool
	}{
		{in: "", want: nil},
		{in: "\n", want: nil},
		{in: "0\n", want: []int{0}},
		{in: "0-3\n", want: []int{0, 1, 2, 3}},
		{in: "0-1,4,6-7", want: []int{0, 1, 4, 6, 7}},
		{in: "3,0-1", want: []int{0, 1, 3}},
		{in: "3-1", bad: true},
		{in: "a", bad: true},
		{in: "0-", bad: true},
		{in: "-1", bad: true},
		{in: "0-100000", bad: true},
	} {
		got, err := parseCPUList(tc.in)
		if (err != nil) != tc.bad || !slices.Equal(got, tc.want) {
			t.Errorf("parseCPUList(%q) = %v, %v", tc.in, got, err)
		}
		if err == nil {
			if again, _ := parseCPUList(formatCPUList(got)); !slices.Equal(again, got) {
				t.Errorf("formatCPUList(%v) = %q", got, formatCPUList(got))
			}
		}
	}
}

// TestEnsureAffinity: a thread that may run on every online CPU is left
// alone.
func TestEnsureAffinity(t *testing.T) {
	var before, after unix.CPUSet
	if err := unix.SchedGetaffinity(0, &before); err != nil {
		t.Fatal(err)
	}
	var cpus []int
	for i := range len(before) * 64 {
		if before.IsSet(i) {
			cpus = append(cpus, i)
		}
	}
	ensureAffinity(context.Background(), cpus)
	if err := unix.SchedGetaffinity(0, &after); err != nil || after != before {
		t.Errorf("affinity %v, was %v (%v)", after, before, err)
	}
}
