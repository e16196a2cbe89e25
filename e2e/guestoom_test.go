package e2e

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	internalapi "k8s.io/cri-api/pkg/apis"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/colo-runtime/colo/shim/sandbox"
	"github.com/colo-runtime/colo/testbed"
)

// guestProc is a process of the guest as a container in the guest's PID
// namespace sees it.
type guestProc struct {
	pid  int
	adj  string // oom_score_adj
	args []string
}

// guestProcs lists the guest's processes with a command line (not the
// kernel's threads) from container id, which must share the guest's PID
// namespace, and returns them with the oom_score_adj of the listing
// process itself (an exec in id).
func guestProcs(ctx context.Context, t *testing.T, rs internalapi.RuntimeService, id string) (procs []guestProc, self string) {
	t.Helper()
	// A process may exit between the glob and the reads: skipped.
	const script = `for d in /proc/[0-9]*; do
	adj=$(cat $d/oom_score_adj 2>/dev/null) || continue
	echo "${d#/proc/} $adj $(tr '\0\n' '  ' <$d/cmdline 2>/dev/null)"
done
echo "self $(cat /proc/self/oom_score_adj)"`
	out, errOut, code := execSync(ctx, t, rs, id, "sh", "-c", script)
	if code != 0 {
		t.Fatalf("listing the guest's processes: exit %d: %s", code, errOut)
	}
	for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
		f := strings.Fields(line)
		if len(f) >= 2 && f[0] == "self" {
			self = f[1]
			continue
		}
		if len(f) < 3 {
			continue // no command line: a kernel thread (or a zombie)
		}
		pid, err := strconv.Atoi(f[0])
		if err != nil {
			t.Fatalf("listing the guest's processes: bad line %q", line)
		}
		procs = append(procs, guestProc{pid: pid, adj: f[1], args: f[2:]})
	}
	return procs, self
}

// agentProcs checks the guest's agent, PID 1 and the service ("colo-agent
// serve"), at oom_score_adj -1000, and that no other process has it but
// the agent's holder of a pod's namespaces ("colo-agent pod-ns", where a
// pod has no pause container), and returns the service's pid. With
// requireAgent the listing must show the agent.
func agentProcs(t *testing.T, procs []guestProc, requireAgent bool) int {
	t.Helper()
	serve, guestInit := 0, false
	for _, p := range procs {
		isInit := p.pid == 1 && len(p.args) > 0 && p.args[0] == "/init"
		isServe := len(p.args) > 1 && p.args[1] == "serve"
		isPodNS := len(p.args) == 2 && p.args[0] == "colo-agent" && p.args[1] == "pod-ns"
		switch {
		case isInit || isServe:
			if p.adj != "-1000" {
				t.Errorf("agent process %d %q: oom_score_adj %s, want -1000", p.pid, p.args, p.adj)
			}
			guestInit = guestInit || isInit
			if isServe {
				if serve != 0 {
					t.Errorf("two agent services in the guest: %d and %d", serve, p.pid)
				}
				serve = p.pid
			}
		case isPodNS:
			// Like a pause container, which kubelet gives -998.
		case p.adj == "-1000":
			// Inherited from the agent: the OOM killer could never
			// take it.
			t.Errorf("guest process %d %q has the agent's oom_score_adj -1000", p.pid, p.args)
		}
	}
	if (!guestInit || serve == 0) && requireAgent {
		t.Errorf("the guest's PID 1 or the agent service missing from its processes (is the container in the guest's PID namespace?): %v", procs)
	}
	return serve
}

// buildOOMHog builds testdata/oomhog, static, into a new directory for a
// read-only volume.
func buildOOMHog(ctx context.Context, t *testing.T) string {
	t.Helper()
	root, err := testbed.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	tools := t.TempDir()
	build := exec.CommandContext(ctx, "go", "build", "-o", filepath.Join(tools, "oomhog"), filepath.Join(root, "e2e", "testdata", "oomhog"))
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build oomhog: %v: %s", err, out)
	}
	return tools
}

// TestGuestOOM: in a pod (one VM, default memory, no memory limits), a
// container that allocates past the VM's memory is killed by the guest's
// OOM killer, not the agent: it exits 137 with CRI's reason OOMKilled and
// a TaskOOM event; the agent (PID 1 and its service, at oom_score_adj
// -1000) is still there and answers, the pod's other container runs on in
// the same guest boot, and the pod goes away leaving nothing behind.
// Containers get the spec's oom_score_adj, or 0, never the agent's.
//
// The pod shares the guest's PID namespace (hostPID), so that a container
// sees the agent's processes. Both colo handlers: with a pause container
// and through the sandbox API.
func TestGuestOOM(t *testing.T) {
	for _, h := range criHandlers {
		if !h.vm {
			continue // the host's OOM is not under test
		}
		t.Run(h.name, func(t *testing.T) { testGuestOOM(t, h) })
	}
}

func testGuestOOM(t *testing.T, h criHandler) {
	ctx, cancel := context.WithTimeout(context.Background(), criTimeout)
	defer cancel()
	tools := buildOOMHog(ctx, t)
	rs := criRuntime(t)
	p := runPod(ctx, t, rs, "guest-oom", h.handler, func(c *runtimeapi.PodSandboxConfig) {
		// hostPID with the guest's PID namespace for it: the test bed's
		// config allows the annotation (e2e's TestMain).
		c.Linux.SecurityContext.NamespaceOptions.Pid = runtimeapi.NamespaceMode_NODE
		c.Annotations[sandbox.HostNamespacesAnnotation] = "guest"
	})
	// After runPod: its cleanup, which runs the leak check, must come
	// after ctr events has been stopped.
	ev := watchEvents(t)
	bystander := p.startWith(ctx, t, "bystander", func(c *runtimeapi.ContainerConfig) {
		c.Command = []string{"sh", "-c", `trap "exit 0" TERM; sleep 3600 & wait`}
	})
	bootID := func() string {
		t.Helper()
		out, errOut, code := execSync(ctx, t, rs, bystander, "cat", "/proc/sys/kernel/random/boot_id")
		if code != 0 || out == "" {
			t.Fatalf("boot id: %q, stderr %q, exit %d", out, errOut, code)
		}
		return out
	}
	boot := bootID()

	// hostPID puts the pod's containers in the guest's own PID
	// namespace, with either handler: the agent is seen there.
	procs, self := guestProcs(ctx, t, rs, bystander)
	serve := agentProcs(t, procs, true)
	// CRI gives a container no oom_score_adj without resources: 0, not
	// the agent's, for the container and its execs.
	if self != "0" {
		t.Errorf("an exec's oom_score_adj is %q, want 0", self)
	}
	for _, pr := range procs {
		if strings.Join(pr.args, " ") == "sleep 3600" && pr.adj != "0" {
			t.Errorf("the bystander's %d %q: oom_score_adj %s, want 0", pr.pid, pr.args, pr.adj)
		}
	}
	if t.Failed() {
		// The hog would inherit the same: what the OOM killer then does
		// tells nothing more.
		t.FailNow()
	}

	hog := p.startWith(ctx, t, "hog", func(c *runtimeapi.ContainerConfig) {
		c.Command = []string{"/colo-tools/oomhog"}
		c.Mounts = []*runtimeapi.Mount{{
			ContainerPath: "/colo-tools",
			HostPath:      tools,
			Readonly:      true,
			Propagation:   runtimeapi.MountPropagation_PROPAGATION_PRIVATE,
		}}
	})
	hogLog := func() string {
		b, _ := os.ReadFile(filepath.Join(p.config.LogDirectory, "hog", "0.log"))
		return testbed.Tail(string(b), 20)
	}
	// Killed (bounded by the test's ctx), and CRI knows why: from the
	// shim's TaskOOM event, or the OOM count in the container's metrics,
	// either of which may come a little after the exit.
	var st *runtimeapi.ContainerStatus
	reasonBy := time.Time{}
	for {
		resp, err := rs.ContainerStatus(ctx, hog, false)
		if err != nil {
			t.Fatalf("ContainerStatus hog: %v", err)
		}
		st = resp.GetStatus()
		exited := st.GetState() == runtimeapi.ContainerState_CONTAINER_EXITED
		if exited && st.GetReason() == "OOMKilled" {
			break
		}
		if exited && reasonBy.IsZero() {
			reasonBy = time.Now().Add(time.Minute)
		}
		if exited && time.Now().After(reasonBy) {
			t.Fatalf("hog exited %d, reason %q, want OOMKilled; its log:\n%s", st.GetExitCode(), st.GetReason(), hogLog())
		}
		select {
		case <-ctx.Done():
			t.Fatalf("hog: state %v, exit %d, reason %q; want exited, OOMKilled; its log:\n%s",
				st.GetState(), st.GetExitCode(), st.GetReason(), hogLog())
		case <-time.After(200 * time.Millisecond):
		}
	}
	if st.GetExitCode() != 137 {
		t.Errorf("hog exit %d, want 137 (SIGKILL); its log:\n%s", st.GetExitCode(), hogLog())
	}
	ev.waitTopic(t, hog, "/tasks/oom")
	if log := hogLog(); !strings.Contains(log, "oom_score_adj 0") || !strings.Contains(log, "holding") {
		t.Errorf("hog's log lacks its oom_score_adj 0 and its progress:\n%s", log)
	}

	// The agent survived: the same guest boot, the same service, and it
	// answers (each exec goes through it).
	if got := bootID(); got != boot {
		t.Errorf("guest boot id %q after the OOM, was %q: the guest restarted", got, boot)
	}
	procs, _ = guestProcs(ctx, t, rs, bystander)
	if got := agentProcs(t, procs, true); got != serve {
		t.Errorf("agent service pid %d after the OOM, was %d", got, serve)
	}
	resp, err := rs.ContainerStatus(ctx, bystander, false)
	if err != nil {
		t.Fatal(err)
	}
	if s := resp.GetStatus().GetState(); s != runtimeapi.ContainerState_CONTAINER_RUNNING {
		t.Errorf("bystander %v after the OOM, want running", s)
	}
	ps, err := rs.PodSandboxStatus(ctx, p.id, false)
	if err != nil {
		t.Fatal(err)
	}
	if s := ps.GetStatus().GetState(); s != runtimeapi.PodSandboxState_SANDBOX_READY {
		t.Errorf("pod %v after the OOM, want ready", s)
	}

	// The bystander still stops as asked: its SIGTERM trap runs.
	if err := rs.StopContainer(ctx, bystander, 30); err != nil {
		t.Fatalf("StopContainer: %v", err)
	}
	if resp, err := rs.ContainerStatus(ctx, bystander, false); err != nil {
		t.Fatal(err)
	} else if s := resp.GetStatus(); s.GetState() != runtimeapi.ContainerState_CONTAINER_EXITED || s.GetExitCode() != 0 {
		t.Errorf("bystander after StopContainer: %v, exit %d; want exited 0", s.GetState(), s.GetExitCode())
	}
	// runPod's cleanup removes the pod and runs the leak check.
	removePods(ctx, t, rs, p.uid)
}
