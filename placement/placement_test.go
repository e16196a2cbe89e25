package placement

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/containerd/cgroups/v3"
)

const childEnv = "COLO_PLACEMENT_TEST_CHILD"

func TestMain(m *testing.M) {
	if os.Getenv(childEnv) != "" {
		// A stand-in for the hypervisor: a process with a few threads.
		select {}
	}
	os.Exit(m.Run())
}

// cgroupOf reads the v1 cpu hierarchy's cgroup of a thread.
func cgroupOf(t *testing.T, pid, tid int) string {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/cgroup", pid, tid))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.SplitN(line, ":", 3)
		if len(f) == 3 && (strings.Contains(","+f[1]+",", ",cpu,") || f[1] == "") {
			return f[2]
		}
	}
	return ""
}

func readFile(t *testing.T, p string) string {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(b))
}

// TestApply: the process's threads go to overhead but the "vCPUs", which
// go to their classes, each cgroup with its weight; Remove leaves nothing.
func TestApply(t *testing.T) {
	needCgroupV1(t)
	parent := fmt.Sprintf("/colo-placement-test-%d", os.Getpid())
	applyAndRemove(t, Plan{Parent: parent}, Made{})
	matches, _ := filepath.Glob("/sys/fs/cgroup/*" + parent)
	if len(matches) > 0 {
		t.Errorf("left: %v", matches)
	}
	if err := Remove(context.Background(), parent, Made{}); err != nil {
		t.Errorf("Remove again: %v", err)
	}
}

// needCgroupV1 skips a test that places real threads where it cannot.
func needCgroupV1(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root for cgroups")
	}
	if cgroups.Mode() == cgroups.Unified {
		t.Skip("this test reads cgroup v1 files; the host is cgroup v2")
	}
}

// applyAndRemove places a stand-in hypervisor of a few threads and a
// helper process with the plan p (its Parent and Scope; the classes are
// the test's) and m, checks each thread's cgroup and the weights, then
// ends the processes and removes the tree.
func applyAndRemove(t *testing.T, p Plan, m Made) {
	t.Helper()
	cmd := exec.Command(os.Args[0])
	cmd.Env = append(os.Environ(), childEnv+"=1")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { cmd.Process.Kill(); cmd.Wait() }()
	helper := exec.Command("sleep", "1000")
	if err := helper.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { helper.Process.Kill(); helper.Wait() }()
	var tids []int
	for deadline := time.Now().Add(10 * time.Second); len(tids) < 3 && time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		tids, _ = taskIDs(cmd.Process.Pid)
	}
	if len(tids) < 3 {
		t.Fatalf("child has threads %v, want at least 3", tids)
	}
	parent := p.Parent
	p.ParentWeight = 10
	p.Classes = []Class{{Name: "high", Weight: 200}, {Name: "low", Weight: 5, CPUs: "0"}}
	p.VCPUClasses, p.OverheadWeight = []string{"high", "low"}, 20
	if err := p.Validate(2); err != nil {
		t.Fatal(err)
	}
	vcpus := tids[1:3]
	if err := Apply(context.Background(), p, m, Threads{Pid: cmd.Process.Pid, VCPUs: vcpus, Helpers: []int{helper.Process.Pid}}); err != nil {
		t.Fatal(err)
	}
	want := map[int]string{vcpus[0]: parent + "/vcpu-high", vcpus[1]: parent + "/vcpu-low"}
	for _, tid := range tids {
		w, ok := want[tid]
		if !ok {
			w = parent + "/overhead"
		}
		if got := cgroupOf(t, cmd.Process.Pid, tid); got != w {
			t.Errorf("thread %d in %q, want %q", tid, got, w)
		}
	}
	if got := cgroupOf(t, helper.Process.Pid, helper.Process.Pid); got != parent+"/overhead" {
		t.Errorf("helper in %q, want the overhead cgroup", got)
	}
	for group, shares := range map[string]string{"": "102", "vcpu-high": "2048", "vcpu-low": "51", "overhead": "204"} {
		if got := readFile(t, filepath.Join("/sys/fs/cgroup/cpu", parent, group, "cpu.shares")); got != shares {
			t.Errorf("%s/%s cpu.shares = %s, want %s", parent, group, got, shares)
		}
	}
	if got := readFile(t, filepath.Join("/sys/fs/cgroup/cpuset", parent, "vcpu-low", "cpuset.cpus")); got != "0" {
		t.Errorf("vcpu-low cpuset %q, want 0", got)
	}
	cmd.Process.Kill()
	cmd.Wait()
	helper.Process.Kill()
	helper.Wait()
	if err := Remove(context.Background(), parent, m); err != nil {
		t.Fatal(err)
	}
}

func TestValidate(t *testing.T) {
	good := Plan{Parent: "/pod/x", Classes: []Class{{Name: "high", Weight: 100}, {Name: "low", Weight: 1}}, VCPUClasses: []string{"high", "low"}, OverheadWeight: 10}
	for _, tc := range []struct {
		name   string
		change func(*Plan)
		vcpus  int
		want   string
	}{
		{"good", func(*Plan) {}, 2, ""},
		{"relative parent", func(p *Plan) { p.Parent = "pod/x" }, 2, "absolute"},
		{"root parent", func(p *Plan) { p.Parent = "/" }, 2, "below the root"},
		{"no parent", func(p *Plan) { p.Parent = "" }, 2, ""},
		{"too few classes", func(p *Plan) { p.VCPUClasses = []string{"high"} }, 2, "one per vCPU"},
		{"unknown class", func(p *Plan) { p.VCPUClasses = []string{"high", "mid"} }, 2, `no class "mid"`},
		{"duplicate class", func(p *Plan) { p.Classes = append(p.Classes, Class{Name: "low", Weight: 2}) }, 2, `class "low"`},
		{"class named overhead", func(p *Plan) { p.Classes[1].Name = "overhead" }, 2, `class "overhead"`},
		{"bad name", func(p *Plan) { p.Classes[1].Name = "../x" }, 2, `class "../x"`},
		{"weight 0", func(p *Plan) { p.Classes[0].Weight = 0 }, 2, "CPU weight 0"},
		{"overhead weight too big", func(p *Plan) { p.OverheadWeight = 20000 }, 2, "overhead: CPU weight 20000"},
		{"a scope's cgroup", func(p *Plan) { p.Parent, p.Scope = "/a.slice/x-1.scope", &Scope{Slice: "a.slice", Unit: "x-1.scope"} }, 2, ""},
		{"not the scope's cgroup", func(p *Plan) { p.Scope = &Scope{Slice: "a.slice", Unit: "x-1.scope"} }, 2, "not the cgroup of systemd scope x-1.scope"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := good
			p.Classes = append([]Class(nil), good.Classes...)
			tc.change(&p)
			err := p.Validate(tc.vcpus)
			if tc.want == "" {
				if err != nil {
					t.Fatal(err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("Validate = %v, want an error with %q", err, tc.want)
			}
		})
	}
}
