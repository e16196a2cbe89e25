package e2e

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/colo-runtime/colo/shim/sandbox"
	"github.com/colo-runtime/colo/testbed"
)

// threadCgroup is the cgroup a thread is in for CPU: the v1 cpu
// hierarchy's, or the v2 one's.
func threadCgroup(t *testing.T, pid, tid int) string {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/cgroup", pid, tid))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.SplitN(line, ":", 3)
		if len(f) == 3 && (strings.Contains(","+f[1]+",", ",cpu,") || f[0] == "0" && f[1] == "") {
			return f[2]
		}
	}
	return ""
}

// cpuWeight reads a host cgroup's CPU weight as the placement wrote it:
// cgroup v1 cpu.shares, or v2 cpu.weight.
func cpuWeight(t *testing.T, cgroup string) string {
	t.Helper()
	for _, p := range []string{filepath.Join("/sys/fs/cgroup/cpu", cgroup, "cpu.shares"), filepath.Join("/sys/fs/cgroup", cgroup, "cpu.weight")} {
		if b, err := os.ReadFile(p); err == nil {
			return strings.TrimSpace(string(b))
		}
	}
	t.Fatalf("no CPU weight for cgroup %s", cgroup)
	return ""
}

// schedPolicy is a thread's scheduling policy (/proc/.../stat field 41).
func schedPolicy(t *testing.T, pid, tid int) int {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/stat", pid, tid))
	if err != nil {
		t.Fatal(err)
	}
	// Fields after the command, which may hold spaces, in parentheses.
	rest := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+2:]))
	policy, err := strconv.Atoi(rest[38]) // field 41
	if err != nil {
		t.Fatal(err)
	}
	return policy
}

// TestColocation: a pod's vCPU threads sit in the host cgroups of their
// classes with the configured weights, the hypervisor's other threads in
// the overhead cgroup at SCHED_IDLE; in the guest a container of the low
// class runs on the low vCPU with the class's oom_score_adj, the topology
// file names the vCPUs of each class, and the NIC's interrupts go to the
// high vCPU. Bad classes fail the create clearly.
func TestColocation(t *testing.T) {
	pod, low := "colo-pod", "colo-low"
	n := newPodNet(t, fmt.Sprintf("colo-e2e-c%d", os.Getpid()))
	n.addVeth("eth0", "10.77.5.2/24", "10.77.5.1/24", 1500)
	checkNoLeaks(t, low, pod, "colo-bad-class", "colo-bad-vcpus")
	cfg := coloConfig(t, "[colocation]\nvcpus = [\"high\", \"low\"]\noverhead_weight = 20\n"+
		"annotations = [\"io.colo.class\", \"io.colo.vcpus\", \"io.colo.pod-weight\", \"io.colo.overhead-idle\"]\n")
	flags := func(kind string, annotations ...string) []string {
		f := []string{"--null-io", "--runtime-config-path", cfg, "--with-ns=network:" + n.path(),
			"--annotation", "io.kubernetes.cri.container-type=" + kind,
			"--annotation", "io.kubernetes.cri.sandbox-id=" + pod}
		for _, a := range annotations {
			f = append(f, "--annotation", a)
		}
		return f
	}
	startDetached(t, testbed.Runtime, pod, flags("sandbox", sandbox.PodWeightAnnotation+"=5", sandbox.OverheadIdleAnnotation+"=true"), "sleep", "1000")
	startDetached(t, testbed.Runtime, low, flags("container", sandbox.ClassAnnotation+"=low"), "sleep", "1000")

	// The host: ctr gives the task cgroupsPath /<namespace>/<id>.
	parent := "/" + cd.Namespace + "/" + pod
	var qemu int
	for _, p := range testbed.ProcessesMentioning(filepath.Join(cd.StateDir, cd.Namespace, sandbox.DirName(pod)) + "/") {
		if strings.Contains(p.Cmdline, "qemu-system") {
			qemu = p.Pid
		}
	}
	if qemu == 0 {
		t.Fatal("no QEMU for the pod")
	}
	tasks, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", qemu))
	if err != nil {
		t.Fatal(err)
	}
	vcpus := 0
	for _, e := range tasks {
		tid, _ := strconv.Atoi(e.Name())
		comm, _ := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/comm", qemu, tid))
		want, policy := parent+"/overhead", 5 // SCHED_IDLE
		switch {
		case strings.HasPrefix(string(comm), "CPU 0/"):
			want, policy = parent+"/vcpu-high", 0
			vcpus++
		case strings.HasPrefix(string(comm), "CPU 1/"):
			want, policy = parent+"/vcpu-low", 0
			vcpus++
		}
		if got := threadCgroup(t, qemu, tid); got != want {
			t.Errorf("QEMU thread %d (%s) in cgroup %q, want %q", tid, strings.TrimSpace(string(comm)), got, want)
		}
		if got := schedPolicy(t, qemu, tid); got != policy {
			t.Errorf("QEMU thread %d (%s) has scheduling policy %d, want %d", tid, strings.TrimSpace(string(comm)), got, policy)
		}
	}
	if vcpus != 2 {
		t.Errorf("found %d vCPU threads, want 2", vcpus)
	}
	// Weights 5, 100, 10 and 20 as cgroup v1 shares (1024 per 100), or v2.
	v1 := map[string]string{"": "51", "/vcpu-high": "1024", "/vcpu-low": "102", "/overhead": "204"}
	v2 := map[string]string{"": "5", "/vcpu-high": "100", "/vcpu-low": "10", "/overhead": "20"}
	for group, shares := range v1 {
		if got := cpuWeight(t, parent+group); got != shares && got != v2[group] {
			t.Errorf("cgroup %s%s: CPU weight %s, want %s (v1 shares) or %s (v2)", parent, group, got, shares, v2[group])
		}
	}

	// The guest.
	exec := func(id, cmdline string) string {
		t.Helper()
		r := ctr(t, "task", "exec", "--exec-id", "colo", id, "sh", "-c", cmdline)
		if r.ExitCode != 0 {
			t.Fatalf("%s in %s: %s", cmdline, id, r)
		}
		return strings.TrimSpace(r.Stdout)
	}
	var topo struct {
		CPUs []struct {
			CPU   int    `json:"cpu"`
			Class string `json:"class"`
		} `json:"cpus"`
	}
	if err := json.Unmarshal([]byte(exec(low, "cat /run/colo/topology.json")), &topo); err != nil {
		t.Fatal(err)
	}
	if len(topo.CPUs) != 2 || topo.CPUs[0].Class != "high" || topo.CPUs[1].Class != "low" {
		t.Errorf("topology file %+v, want vCPU 0 high and 1 low", topo)
	}
	// The class's guest cgroup has vCPU 1 as its cpuset: the container
	// below it may run there only.
	if got := exec(low, "grep Cpus_allowed_list /proc/self/status; cat /proc/self/oom_score_adj"); got != "Cpus_allowed_list:\t1\n500" {
		t.Errorf("low-class container: %q, want vCPU 1 and oom_score_adj 500", got)
	}
	if got := exec(pod, "grep Cpus_allowed_list /proc/self/status"); got != "Cpus_allowed_list:\t0-1" {
		t.Errorf("container without a class: %q, want both vCPUs", got)
	}
	// eth0's interrupts (the MSI-X vectors of its PCI device: config,
	// input, output) go to vCPU 0. Containers do not see /proc/interrupts
	// (a masked path), but sysfs lists the vectors.
	irqs := exec(pod, `for irq in $(ls /sys/class/net/eth0/device/../msi_irqs); do echo $irq=$(cat /proc/irq/$irq/smp_affinity_list); done`)
	lines := strings.Fields(irqs)
	if len(lines) == 0 {
		t.Errorf("no interrupts found for eth0")
	}
	for _, l := range lines {
		if !strings.HasSuffix(l, "=0") {
			t.Errorf("eth0 interrupt affinity %s, want vCPU 0", l)
		}
	}

	// Bad input.
	r := ctr(t, append(append([]string{"run", "-d", "--runtime", testbed.Runtime}, flags("container", sandbox.ClassAnnotation+"=mid")...),
		testbed.BusyboxImage, "colo-bad-class", "true")...)
	if r.ExitCode == 0 || !strings.Contains(r.Stderr, `io.colo.class="mid"`) {
		t.Errorf("a container of an unknown class: %s", r)
	}
	// A list shorter than the vCPUs is fine (the rest take its last
	// class); a class that does not exist is not.
	r = runColo(t, []string{"--runtime-config-path", cfg, "--annotation", sandbox.VCPUsAnnotation + "=high,mid"}, "colo-bad-vcpus", "true")
	if r.ExitCode == 0 || !strings.Contains(r.Stderr, `no class "mid"`) {
		t.Errorf("a vCPU of an unknown class: %s", r)
	}

	for _, id := range []string{low, pod} {
		ctr(t, "task", "kill", "-s", "SIGKILL", id)
		waitStopped(t, id)
		ctr(t, "task", "rm", id)
		ctr(t, "container", "rm", id)
	}
	if _, err := os.Stat(filepath.Join("/sys/fs/cgroup/cpu", parent)); !os.IsNotExist(err) {
		t.Errorf("host cgroup %s left: %v", parent, err)
	}
}
