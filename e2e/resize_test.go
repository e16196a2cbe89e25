package e2e

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/colo-runtime/colo/placement"
	"github.com/colo-runtime/colo/shim/sandbox"
	"github.com/colo-runtime/colo/testbed"
)

// sandboxDir is the state directory of a sandbox of the containerd
// namespace ns.
func sandboxDir(ns, id string) string {
	return filepath.Join(cd.StateDir, ns, sandbox.DirName(id))
}

// qemuIn is the QEMU process of the sandbox in dir.
func qemuIn(t *testing.T, dir string) int {
	t.Helper()
	for _, p := range testbed.ProcessesMentioning(dir + "/") {
		if strings.Contains(p.Cmdline, "qemu-system") {
			return p.Pid
		}
	}
	t.Fatalf("no QEMU for %s", dir)
	return 0
}

// vcpuThreads are QEMU's vCPU threads ("CPU 3/TCG", "CPU 0/KVM") by
// their cgroup.
func vcpuThreads(t *testing.T, qemu int) map[string]int {
	t.Helper()
	tasks, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", qemu))
	if err != nil {
		t.Fatal(err)
	}
	out := make(map[string]int)
	for _, e := range tasks {
		tid, _ := strconv.Atoi(e.Name())
		comm, _ := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/comm", qemu, tid))
		if strings.HasPrefix(string(comm), "CPU ") {
			out[threadCgroup(t, qemu, tid)]++
		}
	}
	return out
}

// TestCPUResize: CRI UpdateContainerResources from 2 to 4 CPUs makes
// nproc in the container 4, and puts the new vCPU threads in the pod's
// vCPU class cgroup on the host; back to 2 removes them. The test bed's
// colo config allows 4 vCPUs on this 2-CPU machine (hypervisor.max_vcpus).
func TestCPUResize(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), criTimeout)
	defer cancel()
	rs := criRuntime(t)
	cpus := func(n int64) *runtimeapi.LinuxContainerResources {
		return &runtimeapi.LinuxContainerResources{CpuQuota: n * 100000, CpuPeriod: 100000}
	}
	p := runPod(ctx, t, rs, "cpu-resize", testbed.ColoHandler, func(c *runtimeapi.PodSandboxConfig) {
		c.Linux.Resources = cpus(2)
	})
	c := p.startWith(ctx, t, "worker", func(c *runtimeapi.ContainerConfig) {
		c.Command = []string{"sleep", "3600"}
		c.Linux.Resources = cpus(2)
	})
	dir := sandboxDir(testbed.CRINamespace, p.id)
	st, err := sandbox.ReadState(dir)
	if err != nil {
		t.Fatal(err)
	}
	if st.Cgroup == "" {
		t.Fatalf("sandbox %s has no host cgroup", p.id)
	}
	class := st.Cgroup + "/" + placement.ClassGroup("high")
	qemu := qemuIn(t, dir)
	check := func(step string, want int) {
		t.Helper()
		if out, _, code := execSync(ctx, t, rs, c, "nproc"); strings.TrimSpace(out) != strconv.Itoa(want) || code != 0 {
			t.Errorf("%s: nproc = %q (exit %d), want %d", step, out, code, want)
		}
		if got := vcpuThreads(t, qemu); got[class] != want || len(got) != 1 {
			t.Errorf("%s: vCPU threads by host cgroup %v, want %d in %s", step, got, want, class)
		}
	}
	check("created with 2 CPUs", 2)
	for _, n := range []int64{4, 2} {
		if err := rs.UpdateContainerResources(ctx, c, &runtimeapi.ContainerResources{Linux: cpus(n)}); err != nil {
			t.Fatalf("UpdateContainerResources to %d CPUs: %v", n, err)
		}
		check(fmt.Sprintf("updated to %d CPUs", n), int(n))
	}
	// More than hypervisor.max_vcpus: an error, and the VM as it was.
	if err := rs.UpdateContainerResources(ctx, c, &runtimeapi.ContainerResources{Linux: cpus(5)}); err == nil || !strings.Contains(err.Error(), "max_vcpus") {
		t.Errorf("UpdateContainerResources to 5 CPUs: %v, want an error naming max_vcpus", err)
	}
	check("after the refused update", 2)
}

// memTotalMB is the guest's MemTotal as a container of the ctr task id
// sees it.
func memTotalMB(t *testing.T, id string) int {
	t.Helper()
	r := ctr(t, "task", "exec", "--exec-id", fmt.Sprintf("mem-%d", time.Now().UnixNano()), id, "grep", "MemTotal", "/proc/meminfo")
	f := strings.Fields(r.Stdout)
	if r.ExitCode != 0 || len(f) < 2 {
		t.Fatalf("MemTotal: %s", r)
	}
	kb, err := strconv.Atoi(f[1])
	if err != nil {
		t.Fatalf("MemTotal %q: %v", r.Stdout, err)
	}
	return kb / 1024
}

// coloCLI runs the colo command with the configuration cfg: its output
// (standard output and error together), and an error if it failed.
func coloCLI(t *testing.T, cfg string, args ...string) (string, error) {
	t.Helper()
	out, errOut, code := runColoCLI(t, cfg, args...)
	if code != 0 {
		return out + errOut, fmt.Errorf("colo %s: exit status %d", strings.Join(args, " "), code)
	}
	return out + errOut, nil
}

// hostMemoryLimitMB is the memory limit of a host cgroup (v1 or v2).
func hostMemoryLimitMB(t *testing.T, cgroup string) int64 {
	t.Helper()
	for _, p := range []string{filepath.Join("/sys/fs/cgroup/memory", cgroup, "memory.limit_in_bytes"), filepath.Join("/sys/fs/cgroup", cgroup, "memory.max")} {
		if b, err := os.ReadFile(p); err == nil {
			n, err := strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
			if err != nil {
				t.Fatalf("%s: %q", p, b)
			}
			return n >> 20
		}
	}
	t.Fatalf("no memory limit for cgroup %s", cgroup)
	return 0
}

// TestMemoryResize: `colo resize` through the sandbox's management socket
// grows the guest's memory and shrinks it again, the host cgroup's limit
// following (hypervisor.memory_overhead_mb); sizes the VM cannot have are
// errors that name the bound and leave it as it was.
func TestMemoryResize(t *testing.T) {
	const id = "colo-mem-resize"
	checkNoLeaks(t, id)
	cfg := coloConfig(t, "[hypervisor]\nmemory_overhead_mb = 1024\nmax_memory_mb = 4096\n")
	startDetached(t, testbed.Runtime, id, []string{"--runtime-config-path", cfg}, "sleep", "3600")
	st, err := sandbox.ReadState(sandboxDir(cd.Namespace, id))
	if err != nil {
		t.Fatal(err)
	}
	step := func(name string, args []string, wantErr string, minMB, maxMB int) {
		t.Helper()
		if args != nil {
			out, err := coloCLI(t, cfg, append([]string{"resize", id}, args...)...)
			switch {
			case wantErr == "" && err != nil:
				t.Fatalf("%s: colo resize: %v: %s", name, err, out)
			case wantErr != "" && (err == nil || !strings.Contains(out, wantErr)):
				t.Errorf("%s: colo resize: %v: %s; want an error naming %q", name, err, out, wantErr)
			}
		}
		if got := memTotalMB(t, id); got < minMB || got > maxMB {
			t.Errorf("%s: guest MemTotal %d MiB, want %d to %d", name, got, minMB, maxMB)
		}
	}
	// MemTotal is what the guest's kernel has left of the VM's memory:
	// about a hundred MiB less at 256 (the kernel's own, and the
	// memory map of the hot-plug region), tens at more.
	step("booted", nil, "", 100, 256)
	if got := hostMemoryLimitMB(t, st.Cgroup); got != 256+1024 {
		t.Errorf("host memory limit of %s: %d MiB, want %d", st.Cgroup, got, 256+1024)
	}
	step("grown", []string{"--memory", "2Gi"}, "", 1900, 2048)
	if got := hostMemoryLimitMB(t, st.Cgroup); got != 2048+1024 {
		t.Errorf("host memory limit after growing: %d MiB, want %d", got, 2048+1024)
	}
	step("shrunk", []string{"--memory", "768Mi"}, "", 650, 768)
	if got := hostMemoryLimitMB(t, st.Cgroup); got != 768+1024 {
		t.Errorf("host memory limit after shrinking: %d MiB, want %d", got, 768+1024)
	}
	step("below the base", []string{"--memory", "64Mi"}, "base_memory_mb", 650, 768)
	step("beyond the maximum", []string{"--memory", "8Gi"}, "max_memory_mb", 650, 768)
	step("too many vCPUs", []string{"--cpus", "64"}, "max_vcpus", 650, 768)
	step("not a size", []string{"--memory", "lots"}, "--memory", 650, 768)
	if r := ctr(t, "task", "kill", "-s", "KILL", id); r.ExitCode != 0 {
		t.Fatalf("kill: %s", r)
	}
}

// TestFreedMemoryReturns: memory a container touched and freed goes back
// to the host without any request: the guest's balloon reports free
// pages, and QEMU's resident memory drops by at least half of what was
// freed within a bounded wait.
func TestFreedMemoryReturns(t *testing.T) {
	const id = "colo-free-pages"
	const hogMB = 600
	checkNoLeaks(t, id)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	tools := buildOOMHog(ctx, t)
	startDetached(t, testbed.Runtime, id, []string{
		"--memory-limit", strconv.Itoa(1 << 30),
		"--mount", "type=bind,src=" + tools + ",dst=/colo-tools,options=rbind:ro",
	}, "sleep", "3600")
	qemu := qemuIn(t, sandboxDir(cd.Namespace, id))
	before := procStatusKB(t, qemu, "VmRSS")
	r := ctr(t, "task", "exec", "--exec-id", "hog", id, "/colo-tools/oomhog", strconv.Itoa(hogMB))
	if r.ExitCode != 0 || !strings.Contains(r.Stdout, fmt.Sprintf("held %d MiB", hogMB)) {
		t.Fatalf("oomhog: %s", r)
	}
	peak := procStatusKB(t, qemu, "VmHWM")
	// The guest's pages reached the host: QEMU grew by most of them.
	if grew := (peak - before) / 1024; grew < hogMB/2 {
		t.Fatalf("QEMU's peak RSS %d MiB over the %d MiB before: the guest's %d MiB did not reach the host", grew, before/1024, hogMB)
	}
	want := peak - hogMB*1024/2
	var rss int
	for deadline := time.Now().Add(time.Minute); time.Now().Before(deadline); time.Sleep(time.Second) {
		if rss = procStatusKB(t, qemu, "VmRSS"); rss <= want {
			t.Logf("QEMU RSS %d MiB before, %d MiB at the peak, %d MiB after the free", before/1024, peak/1024, rss/1024)
			break
		}
	}
	if rss > want {
		t.Errorf("QEMU RSS %d MiB a minute after the guest freed %d MiB (peak %d MiB): want at most %d MiB", rss/1024, hogMB, peak/1024, want/1024)
	}
	if r := ctr(t, "task", "kill", "-s", "KILL", id); r.ExitCode != 0 {
		t.Fatalf("kill: %s", r)
	}
}

// procStatusKB reads a kB field of /proc/<pid>/status.
func procStatusKB(t *testing.T, pid int, field string) int {
	t.Helper()
	n, err := testbed.ProcStatusKB(pid, field)
	if err != nil {
		t.Fatal(err)
	}
	return n
}
