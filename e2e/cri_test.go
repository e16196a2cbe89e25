package e2e

import (
	"bufio"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	internalapi "k8s.io/cri-api/pkg/apis"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
	utilexec "k8s.io/utils/exec"

	"github.com/colo-runtime/colo/shim/sandbox"
	"github.com/colo-runtime/colo/storage"
	"github.com/colo-runtime/colo/testbed"
)

// criHandler is a CRI runtime handler (a RuntimeClass's handler) the CRI
// tests run pods with.
type criHandler struct {
	name, handler string
	// vm: pods run in colo's VMs; shim: through containerd's sandbox API
	// (sandboxer = "shim"), with no pause container.
	vm, shim bool
}

// criHandlers: "" is containerd's default, runc; colo with CRI's default
// sandboxer (a pause container); colo with the sandbox API.
var criHandlers = []criHandler{
	{name: "runc", handler: ""},
	{name: "colo", handler: testbed.ColoHandler, vm: true},
	{name: "colo-shim", handler: testbed.ColoShimHandler, vm: true, shim: true},
}

// podCgroups is the parent of the test pods' cgroups, as kubelet's
// /kubepods with the cgroupfs driver.
const podCgroups = "colo-test-pods"

// criTimeout bounds a whole CRI test.
const criTimeout = 5 * time.Minute

// criRuntime connects to the test bed's CRI runtime service.
func criRuntime(t *testing.T) internalapi.RuntimeService {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	rs, err := cd.RuntimeService(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { rs.Close(context.Background()) })
	return rs
}

// newUID returns a random UUID, as the API server gives each pod.
func newUID(t *testing.T) string {
	t.Helper()
	b := make([]byte, 16)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:])
}

// pod is a pod sandbox run through CRI.
type pod struct {
	rs     internalapi.RuntimeService
	uid    string
	id     string
	config *runtimeapi.PodSandboxConfig
	// ids are the sandbox's and its containers' ids, for the leak check.
	ids []string
}

// runPod runs a pod sandbox with the runtime handler, configured as kubelet
// configures one (metadata, labels, log directory, hostname, a cgroup
// parent, namespace options), and registers its cleanup: what a failed
// test left is stopped and removed, then the leak check runs.
// Each mod changes the config before the pod is run.
func runPod(ctx context.Context, t *testing.T, rs internalapi.RuntimeService, name, handler string, mods ...func(*runtimeapi.PodSandboxConfig)) *pod {
	t.Helper()
	p := newPod(t, rs, name, mods...)
	id, err := rs.RunPodSandbox(ctx, p.config, handler)
	if err != nil {
		t.Fatalf("RunPodSandbox: %v", err)
	}
	p.id = id
	p.ids = append(p.ids, id)
	return p
}

// newPod configures a pod as runPod does, with its cleanup, without
// running it.
func newPod(t *testing.T, rs internalapi.RuntimeService, name string, mods ...func(*runtimeapi.PodSandboxConfig)) *pod {
	t.Helper()
	p := &pod{rs: rs, uid: newUID(t)}
	t.Cleanup(func() { p.cleanup(t) })
	labels := map[string]string{
		"io.kubernetes.pod.name":      name,
		"io.kubernetes.pod.namespace": "default",
		"io.kubernetes.pod.uid":       p.uid,
	}
	p.config = &runtimeapi.PodSandboxConfig{
		Metadata:     &runtimeapi.PodSandboxMetadata{Name: name, Namespace: "default", Uid: p.uid},
		Hostname:     name,
		LogDirectory: t.TempDir(),
		Labels:       labels,
		Annotations:  map[string]string{"kubernetes.io/config.source": "api"},
		Linux: &runtimeapi.LinuxPodSandboxConfig{
			CgroupParent: p.cgroupParent(),
			SecurityContext: &runtimeapi.LinuxSandboxSecurityContext{
				NamespaceOptions: &runtimeapi.NamespaceOption{
					Network: runtimeapi.NamespaceMode_POD,
					Pid:     runtimeapi.NamespaceMode_CONTAINER,
					Ipc:     runtimeapi.NamespaceMode_POD,
				},
			},
		},
	}
	for _, mod := range mods {
		mod(p.config)
	}
	return p
}

func (p *pod) cgroupParent() string {
	return "/" + podCgroups + "/pod" + p.uid
}

// start creates and starts a container in the pod, as kubelet does: its
// log at <log directory>/<name>/0.log, the volume (a host directory, like
// an emptyDir) at /data.
func (p *pod) start(ctx context.Context, t *testing.T, name, volume string, command ...string) string {
	t.Helper()
	return p.startWith(ctx, t, name, func(c *runtimeapi.ContainerConfig) {
		c.Command = command
		c.Mounts = []*runtimeapi.Mount{{
			ContainerPath: "/data",
			HostPath:      volume,
			Propagation:   runtimeapi.MountPropagation_PROPAGATION_PRIVATE,
		}}
	})
}

// startWith creates and starts a busybox container in the pod, as kubelet
// does, with its log at <log directory>/<name>/0.log; mod completes the
// config.
func (p *pod) startWith(ctx context.Context, t *testing.T, name string, mod func(*runtimeapi.ContainerConfig)) string {
	t.Helper()
	// kubelet creates the container's log directory; the runtime the file.
	if err := os.MkdirAll(filepath.Join(p.config.LogDirectory, name), 0o755); err != nil {
		t.Fatal(err)
	}
	config := &runtimeapi.ContainerConfig{
		Metadata: &runtimeapi.ContainerMetadata{Name: name},
		Image:    &runtimeapi.ImageSpec{Image: testbed.BusyboxImage},
		Labels: map[string]string{
			"io.kubernetes.container.name": name,
			"io.kubernetes.pod.uid":        p.uid,
		},
		LogPath: filepath.Join(name, "0.log"),
		Linux: &runtimeapi.LinuxContainerConfig{
			SecurityContext: &runtimeapi.LinuxContainerSecurityContext{
				NamespaceOptions: p.config.Linux.SecurityContext.NamespaceOptions,
			},
		},
	}
	mod(config)
	id, err := p.rs.CreateContainer(ctx, p.id, config, p.config)
	if err != nil {
		t.Fatalf("CreateContainer %s: %v", name, err)
	}
	p.ids = append(p.ids, id)
	if err := p.rs.StartContainer(ctx, id); err != nil {
		t.Fatalf("StartContainer %s: %v", name, err)
	}
	return id
}

// cleanup removes what a failed test left of the pod, and the cgroup
// parent kubelet would remove, then waits for the leak check to pass.
func (p *pod) cleanup(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	removePods(ctx, t, p.rs, p.uid)
	testbed.RemoveCgroup(p.cgroupParent())
	testbed.RemoveCgroup(podCgroups)
	checkCRILeaks(ctx, t, p.rs, append(p.ids, "pod"+p.uid)...)
}

// removePods stops and removes the pods with the uid, and returns their
// and their containers' ids.
func removePods(ctx context.Context, t *testing.T, rs internalapi.RuntimeService, uid string) []string {
	sandboxes, err := rs.ListPodSandbox(ctx, &runtimeapi.PodSandboxFilter{
		LabelSelector: map[string]string{"io.kubernetes.pod.uid": uid},
	})
	if err != nil {
		t.Errorf("ListPodSandbox: %v", err)
	}
	var ids []string
	for _, s := range sandboxes {
		ids = append(ids, s.Id)
		containers, _ := rs.ListContainers(ctx, &runtimeapi.ContainerFilter{PodSandboxId: s.Id})
		for _, c := range containers {
			ids = append(ids, c.Id)
		}
		// StopPodSandbox stops the containers, RemovePodSandbox removes them.
		if err := rs.StopPodSandbox(ctx, s.Id); err != nil {
			t.Errorf("cleanup: StopPodSandbox %s: %v", s.Id, err)
		}
		if err := rs.RemovePodSandbox(ctx, s.Id); err != nil {
			t.Errorf("cleanup: RemovePodSandbox %s: %v", s.Id, err)
		}
	}
	return ids
}

// checkCRILeaks fails the test if CRI still knows any of the sandbox or
// container ids, or the test bed's leak check finds anything of them.
func checkCRILeaks(ctx context.Context, t *testing.T, rs internalapi.RuntimeService, ids ...string) {
	known := map[string]bool{}
	sandboxes, _ := rs.ListPodSandbox(ctx, nil)
	for _, s := range sandboxes {
		known[s.Id] = true
	}
	containers, _ := rs.ListContainers(ctx, nil)
	for _, c := range containers {
		known[c.Id] = true
	}
	for _, id := range ids {
		if known[id] {
			t.Errorf("CRI still lists %s", id)
		}
	}
	if leaks := cd.WaitNoLeaks(ctx, ids...); len(leaks) > 0 {
		t.Errorf("left behind:\n  %s", strings.Join(leaks, "\n  "))
	}
}

// execSync runs cmd in the container and returns its stdout, stderr and
// exit code, failing the test if it could not run.
func execSync(ctx context.Context, t *testing.T, rs internalapi.RuntimeService, id string, cmd ...string) (string, string, int) {
	t.Helper()
	stdout, stderr, err := rs.ExecSync(ctx, id, cmd, time.Minute)
	var exit utilexec.ExitError
	switch {
	case errors.As(err, &exit):
		return string(stdout), string(stderr), exit.ExitStatus()
	case err != nil:
		t.Fatalf("ExecSync %q: %v", cmd, err)
	}
	return string(stdout), string(stderr), 0
}

// waitLogLine waits until the CRI log file has the full line on stream;
// the runtime writes the log asynchronously.
func waitLogLine(ctx context.Context, t *testing.T, path, stream, line string) {
	t.Helper()
	for {
		b, err := os.ReadFile(path)
		if err == nil && hasLogLine(string(b), stream, line) {
			return
		}
		select {
		case <-ctx.Done():
			t.Fatalf("log %s has no %s line %q: %v\n%s", path, stream, line, err, b)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// hasLogLine reports whether log, in the CRI log format (one
// "<RFC3339Nano time> <stream> <F|P> <text>" a line, F closing a line),
// has the full line on stream.
func hasLogLine(log, stream, line string) bool {
	sc := bufio.NewScanner(strings.NewReader(log))
	for sc.Scan() {
		f := strings.SplitN(sc.Text(), " ", 4)
		if len(f) != 4 {
			continue
		}
		if _, err := time.Parse(time.RFC3339Nano, f[0]); err == nil && f[1] == stream && f[2] == "F" && f[3] == line {
			return true
		}
	}
	return false
}

// podDNS is the DNS config of TestCRIPod's pods, and the resolv.conf CRI
// makes of it.
var (
	podDNS = &runtimeapi.DNSConfig{
		Servers:  []string{"10.96.0.10"},
		Searches: []string{"default.svc.cluster.local", "svc.cluster.local"},
		Options:  []string{"ndots:5"},
	}
	podResolvConf = "search default.svc.cluster.local svc.cluster.local\nnameserver 10.96.0.10\noptions ndots:5\n"
)

// TestCRIPod runs a pod as kubelet would, through CRI: a server and a
// writer container sharing a volume, the pod's network, IPC (/dev/shm) and
// UTS namespaces and its DNS config, exec, logs, the pod IP reached from
// the host, then stop and removal leaving nothing behind. Through the
// sandbox API (colo-shim) the pod has no pause container.
func TestCRIPod(t *testing.T) {
	for _, h := range criHandlers {
		t.Run(h.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), criTimeout)
			defer cancel()
			rs := criRuntime(t)
			p := runPod(ctx, t, rs, "cri-pod-"+h.name, h.handler, func(c *runtimeapi.PodSandboxConfig) {
				c.DnsConfig = podDNS
			})
			volume := t.TempDir()

			// PID 1 of each container traps SIGTERM, so StopContainer's
			// graceful stop works and its exit status shows it arrived.
			server := p.start(ctx, t, "server", volume, "sh", "-c",
				`trap "exit 0" TERM; echo server-started; nc -ll -p 8080 -e echo pong & wait`)
			writer := p.start(ctx, t, "writer", volume, "sh", "-c",
				`trap "exit 0" TERM; echo hello-volume >/data/msg && touch /data/ready; echo writer-started; echo writer-stderr >&2; sleep 3600 & wait`)

			// One VM for the pod: both containers see the same guest
			// boot, and it is not the host's.
			if h.vm {
				host, err := os.ReadFile("/proc/sys/kernel/random/boot_id")
				if err != nil {
					t.Fatal(err)
				}
				a, _, _ := execSync(ctx, t, rs, server, "cat", "/proc/sys/kernel/random/boot_id")
				b, _, _ := execSync(ctx, t, rs, writer, "cat", "/proc/sys/kernel/random/boot_id")
				if a == "" || a != b || a == string(host) {
					t.Errorf("boot ids: server %q, writer %q, host %q; want one guest boot for both", a, b, host)
				}
			}

			// The volume: the server reads what the writer wrote.
			if out, errOut, code := execSync(ctx, t, rs, server, "sh", "-c",
				"until test -e /data/ready; do sleep 0.1; done; cat /data/msg"); out != "hello-volume\n" || code != 0 {
				t.Errorf("reading the volume in the server: %q, stderr %q, exit %d", out, errOut, code)
			}

			checkPause(ctx, t, h, p.id)

			// The pod's namespaces: both containers in the same IPC and
			// UTS namespaces, the pod's hostname, one /dev/shm, and the
			// pod's /etc/hostname and resolv.conf.
			ns := func(id string) string {
				out, errOut, code := execSync(ctx, t, rs, id, "sh", "-c", "readlink /proc/self/ns/ipc; readlink /proc/self/ns/uts; hostname; cat /etc/hostname /etc/resolv.conf")
				if code != 0 {
					t.Errorf("namespaces of %s: exit %d, stderr %q", id, code, errOut)
				}
				return out
			}
			if a, b := ns(server), ns(writer); a != b || !strings.HasSuffix(a, "\n"+p.config.Hostname+"\n"+p.config.Hostname+"\n"+podResolvConf) {
				t.Errorf("server sees\n%s\nwriter sees\n%s\nwant the same IPC and UTS namespaces, hostname %s twice and resolv.conf\n%s", a, b, p.config.Hostname, podResolvConf)
			}
			execSync(ctx, t, rs, writer, "sh", "-c", "echo shared > /dev/shm/colo-test")
			if out, errOut, code := execSync(ctx, t, rs, server, "cat", "/dev/shm/colo-test"); out != "shared\n" || code != 0 {
				t.Errorf("the writer's /dev/shm file in the server: %q, stderr %q, exit %d", out, errOut, code)
			}

			// ExecSync: stdout, stderr and the exit code come back apart.
			if out, errOut, code := execSync(ctx, t, rs, writer, "sh", "-c", "echo out; echo err >&2; exit 3"); out != "out\n" || errOut != "err\n" || code != 3 {
				t.Errorf("ExecSync = %q, %q, exit %d; want \"out\\n\", \"err\\n\", exit 3", out, errOut, code)
			}

			// Container logs in the CRI format, at the path kubelet asked for.
			st, err := rs.ContainerStatus(ctx, writer, false)
			if err != nil {
				t.Fatal(err)
			}
			if want := filepath.Join(p.config.LogDirectory, "writer", "0.log"); st.GetStatus().GetLogPath() != want {
				t.Errorf("log path %q, want %q", st.GetStatus().GetLogPath(), want)
			}
			waitLogLine(ctx, t, filepath.Join(p.config.LogDirectory, "writer", "0.log"), "stdout", "writer-started")
			waitLogLine(ctx, t, filepath.Join(p.config.LogDirectory, "writer", "0.log"), "stderr", "writer-stderr")
			waitLogLine(ctx, t, filepath.Join(p.config.LogDirectory, "server", "0.log"), "stdout", "server-started")

			// One network namespace: the writer reaches the server on
			// localhost, once it listens.
			if out, errOut, code := execSync(ctx, t, rs, writer, "sh", "-c",
				"until nc -w 5 127.0.0.1 8080 </dev/null; do sleep 0.1; done"); out != "pong\n" || code != 0 {
				t.Errorf("server on localhost: %q, stderr %q, exit %d", out, errOut, code)
			}

			// The pod IP answers from the host.
			ps, err := rs.PodSandboxStatus(ctx, p.id, false)
			if err != nil {
				t.Fatal(err)
			}
			ip := ps.GetStatus().GetNetwork().GetIp()
			if parsed := net.ParseIP(ip); parsed == nil || !cd.CRI.Subnet.Contains(parsed) {
				t.Fatalf("pod IP %q, want one in %s", ip, cd.CRI.Subnet)
			}
			if reply, err := dialRead(ctx, net.JoinHostPort(ip, "8080")); err != nil || reply != "pong\n" {
				t.Errorf("from the host, %s:8080 said %q, %v", ip, reply, err)
			}

			// kubelet stops the containers, then the sandbox, and removes
			// them later.
			for _, id := range []string{server, writer} {
				if err := rs.StopContainer(ctx, id, 30); err != nil {
					t.Fatalf("StopContainer: %v", err)
				}
				st, err := rs.ContainerStatus(ctx, id, false)
				if err != nil {
					t.Fatal(err)
				}
				if s := st.GetStatus(); s.GetState() != runtimeapi.ContainerState_CONTAINER_EXITED || s.GetExitCode() != 0 {
					t.Errorf("%s after StopContainer: %v, exit %d; want exited 0 (SIGTERM trapped)", s.GetMetadata().GetName(), s.GetState(), s.GetExitCode())
				}
			}
			if err := rs.StopPodSandbox(ctx, p.id); err != nil {
				t.Fatalf("StopPodSandbox: %v", err)
			}
			for _, id := range []string{server, writer} {
				if err := rs.RemoveContainer(ctx, id); err != nil {
					t.Fatalf("RemoveContainer: %v", err)
				}
			}
			if err := rs.RemovePodSandbox(ctx, p.id); err != nil {
				t.Fatalf("RemovePodSandbox: %v", err)
			}
		})
	}
}

// dialRead connects to addr and reads until the server closes.
func dialRead(ctx context.Context, addr string) (string, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return "", err
	}
	defer conn.Close()
	if deadline, ok := ctx.Deadline(); ok {
		conn.SetDeadline(deadline)
	}
	b, err := io.ReadAll(conn)
	return string(b), err
}

// TestCrictlLifecycle runs testdata/crictl-lifecycle.sh, a pod's whole life
// through crictl (every step must succeed), for each handler.
func TestCrictlLifecycle(t *testing.T) {
	root, err := testbed.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	script := filepath.Join(root, "e2e", "testdata", "crictl-lifecycle.sh")
	crictl, err := cd.CrictlCommand()
	if err != nil {
		t.Fatal(err)
	}
	for _, h := range criHandlers {
		t.Run(h.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), criTimeout)
			defer cancel()
			rs := criRuntime(t)
			uid := newUID(t)
			var out strings.Builder
			t.Cleanup(func() {
				ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
				defer cancel()
				// The script names what it made: "pod ID", "container ID".
				var ids []string
				for _, line := range strings.Split(out.String(), "\n") {
					if kind, id, ok := strings.Cut(line, " "); ok && (kind == "pod" || kind == "container") {
						ids = append(ids, id)
					}
				}
				ids = append(ids, removePods(ctx, t, rs, uid)...)
				checkCRILeaks(ctx, t, rs, ids...)
			})
			cmd := exec.CommandContext(ctx, "bash", append([]string{script, h.handler, testbed.BusyboxImage, uid}, crictl...)...)
			// The script checks what PID 1 of the pod's PID namespace is:
			// the pause container's process, or the holder of the pod's
			// namespaces in colo's guest.
			cmd.Env = append(os.Environ(), "POD_INIT=pause")
			if h.shim {
				cmd.Env = append(os.Environ(), "POD_INIT=colo")
			}
			cmd.Stdout, cmd.Stderr = &out, &out
			err := cmd.Run()
			t.Logf("%s:\n%s", filepath.Base(script), out.String())
			if err != nil {
				t.Fatalf("%s: %v", filepath.Base(script), err)
			}
		})
	}
}

// checkPause checks that the pod has a pause container, or through the
// sandbox API none: containerd has a container with the pod's id (CRI's
// sandbox container) or not, and a colo pod's VM a container directory for
// it in its share or not.
func checkPause(ctx context.Context, t *testing.T, h criHandler, podID string) {
	t.Helper()
	r, err := cd.CRICtr(ctx, "containers", "ls", "-q")
	if err != nil || r.ExitCode != 0 {
		t.Fatalf("ctr containers ls: %v %v", r, err)
	}
	if has := slices.Contains(strings.Fields(r.Stdout), podID); has == h.shim {
		t.Errorf("containerd has a container with the pod's id (a pause container): %v, want %v", has, !h.shim)
	}
	if !h.vm {
		return
	}
	share := filepath.Join(cd.StateDir, testbed.CRINamespace, sandbox.DirName(podID), storage.ShareMounts)
	entries, err := os.ReadDir(share)
	if err != nil {
		t.Fatalf("the pod's VM: %v", err)
	}
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	if has := slices.Contains(names, podID); has == h.shim {
		t.Errorf("the VM's share %s has %q: a container directory for the pod (a pause container) %v, want %v", share, names, has, !h.shim)
	}
}
