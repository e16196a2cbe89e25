package task

import (
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	goruntime "runtime"
	"strings"
	"testing"
	"time"

	cgroupsv1 "github.com/containerd/cgroups/v3/cgroup1/stats"
	cgroupsv2 "github.com/containerd/cgroups/v3/cgroup2/stats"
	sandboxAPI "github.com/containerd/containerd/api/runtime/sandbox/v1"
	taskAPI "github.com/containerd/containerd/api/runtime/task/v3"
	"github.com/containerd/errdefs"
	"github.com/containerd/typeurl/v2"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"google.golang.org/protobuf/types/known/anypb"
	criapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/colo-runtime/colo/config"
	"github.com/colo-runtime/colo/hypervisor/driver"
	"github.com/colo-runtime/colo/shim/sandbox"
	"github.com/colo-runtime/colo/testbed"
)

// sandboxSvc is the harness's sandbox API, as containerd reaches it.
func (h *harness) sandboxSvc() sandboxAPI.TTRPCSandboxService {
	return &sandboxService{s: h.svc.(*service)}
}

// podOptions is CRI's PodSandboxConfig as containerd's sandbox controller
// sends it.
func podOptions(t *testing.T, c any) *anypb.Any {
	t.Helper()
	a, err := typeurl.MarshalAnyToProto(c)
	if err != nil {
		t.Fatal(err)
	}
	return a
}

func TestPodConfig(t *testing.T) {
	hosts, err := readHostFile("/etc/hosts")
	if err != nil {
		t.Fatal(err)
	}
	hostResolv, err := readHostFile("/etc/resolv.conf")
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name    string
		options func(t *testing.T) *anypb.Any
		req     *sandboxAPI.CreateSandboxRequest
		want    sandbox.PodConfig
		is      func(error) bool
	}{
		{
			name: "no options (not CRI)",
			req:  &sandboxAPI.CreateSandboxRequest{BundlePath: "/b", NetnsPath: "/n", Annotations: map[string]string{"a": "1"}},
			want: sandbox.PodConfig{Bundle: "/b", NetNS: "/n", Annotations: map[string]string{"a": "1"}},
		},
		{
			name: "CRI's pod",
			options: func(t *testing.T) *anypb.Any {
				return podOptions(t, &criapi.PodSandboxConfig{
					Hostname:    "web",
					Annotations: map[string]string{"io.colo.pod-weight": "50", "a": "pod"},
					DnsConfig:   &criapi.DNSConfig{Servers: []string{"10.96.0.10", "10.96.0.11"}, Searches: []string{"ns.svc"}, Options: []string{"ndots:5"}},
					Linux: &criapi.LinuxPodSandboxConfig{
						CgroupParent: "/kubepods/pod1",
						Sysctls:      map[string]string{"net.core.somaxconn": "1024"},
					},
				})
			},
			req: &sandboxAPI.CreateSandboxRequest{BundlePath: "/b", NetnsPath: "/n", Annotations: map[string]string{"a": "request"}},
			want: sandbox.PodConfig{
				Bundle: "/b", NetNS: "/n", Hostname: "web", CgroupParent: "/kubepods/pod1",
				Annotations: map[string]string{"io.colo.pod-weight": "50", "a": "request"},
				Sysctls:     map[string]string{"net.core.somaxconn": "1024"},
				Hosts:       hosts,
				ResolvConf:  []byte("search ns.svc\nnameserver 10.96.0.10\nnameserver 10.96.0.11\noptions ndots:5\n"),
			},
		},
		{
			name:    "CRI's pod without DNS config: the host's resolv.conf",
			options: func(t *testing.T) *anypb.Any { return podOptions(t, &criapi.PodSandboxConfig{Hostname: "h"}) },
			want:    sandbox.PodConfig{Hostname: "h", Annotations: map[string]string{}, Hosts: hosts, ResolvConf: hostResolv},
		},
		{
			name: "options of another type",
			options: func(t *testing.T) *anypb.Any {
				return podOptions(t, &criapi.ContainerConfig{})
			},
			is: errdefs.IsInvalidArgument,
		},
		{
			name:    "options of an unknown type",
			options: func(*testing.T) *anypb.Any { return &anypb.Any{TypeUrl: "example.com/nope", Value: []byte{1}} },
			is:      errdefs.IsInvalidArgument,
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			req := tc.req
			if req == nil {
				req = &sandboxAPI.CreateSandboxRequest{}
			}
			if tc.options != nil {
				req.Options = tc.options(t)
			}
			got, err := podConfig(req)
			if tc.is != nil {
				if !tc.is(err) {
					t.Fatalf("podConfig = %v, want an error of the right kind", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			gb, _ := json.Marshal(got)
			wb, _ := json.Marshal(tc.want)
			if string(gb) != string(wb) {
				t.Errorf("podConfig =\n%s\nwant\n%s", gb, wb)
			}
		})
	}
}

// TestSandboxAPIErrors: every call on an unknown sandbox is NotFound
// (ShutdownSandbox excepted: there is nothing to shut down), and a sandbox
// that is only created answers as one that does not run.
func TestSandboxAPIErrors(t *testing.T) {
	t.Setenv(config.EnvPath, "")
	h := newHarness(t, nil)
	ctx, sb := h.ctx, h.sandboxSvc()
	for name, call := range map[string]func() error{
		"StartSandbox": func() error {
			_, err := sb.StartSandbox(ctx, &sandboxAPI.StartSandboxRequest{SandboxID: "x"})
			return err
		},
		"Platform": func() error { _, err := sb.Platform(ctx, &sandboxAPI.PlatformRequest{SandboxID: "x"}); return err },
		"StopSandbox": func() error {
			_, err := sb.StopSandbox(ctx, &sandboxAPI.StopSandboxRequest{SandboxID: "x"})
			return err
		},
		"WaitSandbox": func() error {
			_, err := sb.WaitSandbox(ctx, &sandboxAPI.WaitSandboxRequest{SandboxID: "x"})
			return err
		},
		"SandboxStatus": func() error {
			_, err := sb.SandboxStatus(ctx, &sandboxAPI.SandboxStatusRequest{SandboxID: "x"})
			return err
		},
		"PingSandbox": func() error { _, err := sb.PingSandbox(ctx, &sandboxAPI.PingRequest{SandboxID: "x"}); return err },
		"SandboxMetrics": func() error {
			_, err := sb.SandboxMetrics(ctx, &sandboxAPI.SandboxMetricsRequest{SandboxID: "x"})
			return err
		},
	} {
		if err := call(); !isCode(errdefs.IsNotFound)(err) {
			t.Errorf("%s of an unknown sandbox: %v, want not found", name, err)
		}
	}

	for _, tc := range []struct {
		name string
		req  *sandboxAPI.CreateSandboxRequest
		is   func(error) bool
	}{
		{"no id", &sandboxAPI.CreateSandboxRequest{}, errdefs.IsInvalidArgument},
		{"bad options", &sandboxAPI.CreateSandboxRequest{SandboxID: "x", Options: &anypb.Any{TypeUrl: "example.com/nope"}}, errdefs.IsInvalidArgument},
	} {
		if _, err := sb.CreateSandbox(ctx, tc.req); !isCode(tc.is)(err) {
			t.Errorf("CreateSandbox, %s: %v", tc.name, err)
		}
	}
	h.driverErr = errors.New("no qemu here")
	if _, err := sb.CreateSandbox(ctx, &sandboxAPI.CreateSandboxRequest{SandboxID: "x"}); err == nil || !strings.Contains(err.Error(), "no qemu here") {
		t.Errorf("CreateSandbox with no driver: %v", err)
	}
	h.driverErr = nil

	// Created, not started.
	if _, err := sb.CreateSandbox(ctx, &sandboxAPI.CreateSandboxRequest{SandboxID: "pod"}); err != nil {
		t.Fatal(err)
	}
	if _, err := sb.CreateSandbox(ctx, &sandboxAPI.CreateSandboxRequest{SandboxID: "pod"}); !isCode(errdefs.IsAlreadyExists)(err) {
		t.Errorf("second CreateSandbox: %v, want already exists", err)
	}
	p, err := sb.Platform(ctx, &sandboxAPI.PlatformRequest{SandboxID: "pod"})
	if err != nil || p.GetPlatform().GetOS() != "linux" || p.GetPlatform().GetArchitecture() != goruntime.GOARCH {
		t.Errorf("Platform = %+v, %v", p, err)
	}
	st, err := sb.SandboxStatus(ctx, &sandboxAPI.SandboxStatusRequest{SandboxID: "pod", Verbose: true})
	if err != nil || st.State != "SANDBOX_NOTREADY" || st.Pid != 0 || st.CreatedAt == nil || st.ExitedAt != nil || !json.Valid([]byte(st.Info["colo"])) {
		t.Errorf("SandboxStatus of a created sandbox = %+v, %v", st, err)
	}
	for name, call := range map[string]func() error{
		"PingSandbox": func() error { _, err := sb.PingSandbox(ctx, &sandboxAPI.PingRequest{SandboxID: "pod"}); return err },
		"SandboxMetrics": func() error {
			_, err := sb.SandboxMetrics(ctx, &sandboxAPI.SandboxMetricsRequest{SandboxID: "pod"})
			return err
		},
	} {
		if err := call(); !isCode(errdefs.IsFailedPrecondition)(err) {
			t.Errorf("%s of a sandbox not started: %v, want failed precondition", name, err)
		}
	}
	// Its containers wait for its start.
	bundle := writeBundle(t, t.TempDir(), podSpec("pod", "container", "/bin/sh"))
	if _, err := h.svc.Create(ctx, &taskAPI.CreateTaskRequest{ID: "c", Bundle: bundle}); !isCode(errdefs.IsFailedPrecondition)(err) {
		t.Errorf("task of a sandbox not started: %v, want failed precondition", err)
	}
	// No driver (the harness's is nil): the start fails, cleanly.
	if _, err := sb.StartSandbox(ctx, &sandboxAPI.StartSandboxRequest{SandboxID: "pod"}); err == nil {
		t.Error("StartSandbox with no driver succeeded")
	}

	waited := make(chan *sandboxAPI.WaitSandboxResponse, 1)
	go func() {
		w, err := sb.WaitSandbox(ctx, &sandboxAPI.WaitSandboxRequest{SandboxID: "pod"})
		if err != nil {
			t.Errorf("WaitSandbox: %v", err)
		}
		waited <- w
	}()
	// A task's shutdown does not end the shim while a sandbox is there.
	if _, err := h.svc.Shutdown(ctx, &taskAPI.ShutdownRequest{}); err != nil {
		t.Fatal(err)
	}
	select {
	case <-h.sd.Done():
		t.Fatal("task Shutdown ended the shim of a sandbox")
	case <-time.After(100 * time.Millisecond):
	}
	if _, err := sb.StopSandbox(ctx, &sandboxAPI.StopSandboxRequest{SandboxID: "pod", TimeoutSecs: 1}); err != nil {
		t.Fatal(err)
	}
	select {
	case w := <-waited:
		if w.GetExitStatus() != 0 || w.GetExitedAt() == nil {
			t.Errorf("WaitSandbox = %+v", w)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("WaitSandbox did not end with the stop")
	}
	if _, err := sb.StartSandbox(ctx, &sandboxAPI.StartSandboxRequest{SandboxID: "pod"}); !isCode(errdefs.IsFailedPrecondition)(err) {
		t.Errorf("StartSandbox after stop: %v, want failed precondition", err)
	}
	st, err = sb.SandboxStatus(ctx, &sandboxAPI.SandboxStatusRequest{SandboxID: "pod"})
	if err != nil || st.State != "SANDBOX_NOTREADY" || st.ExitedAt == nil || st.Info != nil {
		t.Errorf("SandboxStatus of a stopped sandbox = %+v, %v", st, err)
	}
	if _, err := sb.ShutdownSandbox(ctx, &sandboxAPI.ShutdownSandboxRequest{SandboxID: "x"}); err != nil {
		t.Errorf("ShutdownSandbox of an unknown sandbox: %v", err)
	}
	select {
	case <-h.sd.Done():
		t.Fatal("the shim ended with a sandbox not shut down")
	case <-time.After(100 * time.Millisecond):
	}
	if _, err := sb.ShutdownSandbox(ctx, &sandboxAPI.ShutdownSandboxRequest{SandboxID: "pod"}); err != nil {
		t.Fatal(err)
	}
	select {
	case <-h.sd.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("ShutdownSandbox of the last sandbox did not end the shim")
	}
}

// TestSandboxAPI drives a pod through the sandbox API in a real VM as
// containerd's shim sandbox controller and CRI do: create and start the
// sandbox, a container of the pod as a task on the same service (in the
// pod's namespaces, with no pause container), status, ping and metrics,
// the task's delete leaving the VM, then stop, wait and shutdown.
func TestSandboxAPI(t *testing.T) {
	dir := realVMs(t)
	h := newHarness(t, driver.New)
	ctx, sb := h.ctx, h.sandboxSvc()
	c := taskClient{t: t, h: h, ctx: ctx}
	bundle := filepath.Join(dir, "sandbox-bundle")
	if err := os.MkdirAll(bundle, 0o700); err != nil {
		t.Fatal(err)
	}
	// The VM goes into a host cgroup below the pod's, which SandboxMetrics
	// reads.
	const cgroupParent = "/colo-sandbox-api-test"
	t.Cleanup(func() { testbed.RemoveCgroup(cgroupParent) })
	if _, err := sb.CreateSandbox(ctx, &sandboxAPI.CreateSandboxRequest{
		SandboxID:  "pod",
		BundlePath: bundle,
		Options: podOptions(t, &criapi.PodSandboxConfig{
			Hostname:  "shim-pod",
			DnsConfig: &criapi.DNSConfig{Servers: []string{"10.96.0.10"}},
			Linux:     &criapi.LinuxPodSandboxConfig{CgroupParent: cgroupParent},
		}),
	}); err != nil {
		t.Fatal(err)
	}
	started, err := sb.StartSandbox(ctx, &sandboxAPI.StartSandboxRequest{SandboxID: "pod"})
	if err != nil {
		t.Fatal(err)
	}
	if started.Pid == 0 || started.CreatedAt == nil {
		t.Fatalf("StartSandbox = %+v", started)
	}
	if b, err := os.ReadFile(filepath.Join(bundle, sandbox.BundleFile)); err != nil || len(b) == 0 {
		t.Errorf("the sandbox's bundle has no record of it: %q, %v", b, err)
	}
	waited := make(chan *sandboxAPI.WaitSandboxResponse, 1)
	go func() {
		w, err := sb.WaitSandbox(ctx, &sandboxAPI.WaitSandboxRequest{SandboxID: "pod"})
		if err != nil {
			t.Errorf("WaitSandbox: %v", err)
		}
		waited <- w
	}()

	// A container as CRI makes it: the pod's namespaces by the sandbox's
	// pid, which GuestSpec maps to the ones the agent holds.
	s := podSpec("pod", "container", "/bin/sh", "-c", "sleep 1000")
	s.Linux.Namespaces = []specs.LinuxNamespace{
		{Type: specs.PIDNamespace, Path: "/proc/1/ns/pid"},
		{Type: specs.IPCNamespace, Path: "/proc/1/ns/ipc"},
		{Type: specs.UTSNamespace, Path: "/proc/1/ns/uts"},
		{Type: specs.MountNamespace},
	}
	c.create("app", busyboxBundle(t, filepath.Join(dir, "app"), s), sandbox.Stdio{})
	c.start("app", "")
	st, err := h.svc.State(ctx, &taskAPI.StateRequest{ID: "app"})
	if err != nil || st.Pid != started.Pid {
		t.Errorf("the container runs in VM %d, the sandbox is VM %d (%v)", st.GetPid(), started.Pid, err)
	}
	// PID 1 of the pod's PID namespace is the agent's holder, not a
	// pause container; hostname and resolv.conf are the pod's.
	status, out := c.run("app", "look", dir, "cat /proc/1/cmdline; echo; hostname; cat /etc/resolv.conf")
	if lines := strings.Split(out, "\n"); status != 0 || len(lines) < 3 || !strings.Contains(lines[0], "pod-ns") ||
		lines[1] != "shim-pod" || lines[2] != "nameserver 10.96.0.10" {
		t.Errorf("in the pod: exit %d, %q; want the holder as PID 1, the pod's hostname and DNS", status, out)
	}

	ss, err := sb.SandboxStatus(ctx, &sandboxAPI.SandboxStatusRequest{SandboxID: "pod", Verbose: true})
	if err != nil || ss.State != "SANDBOX_READY" || ss.Pid != started.Pid || ss.ExitedAt != nil || !strings.Contains(ss.Info["colo"], `"app"`) {
		t.Errorf("SandboxStatus = %+v, %v", ss, err)
	}
	if _, err := sb.PingSandbox(ctx, &sandboxAPI.PingRequest{SandboxID: "pod"}); err != nil {
		t.Errorf("PingSandbox: %v", err)
	}
	m, err := sb.SandboxMetrics(ctx, &sandboxAPI.SandboxMetricsRequest{SandboxID: "pod"})
	if err != nil {
		t.Fatalf("SandboxMetrics: %v", err)
	}
	data, err := typeurl.UnmarshalAny(m.GetMetrics().GetData())
	switch d := data.(type) {
	case *cgroupsv2.Metrics:
		if d.GetMemory().GetUsage() == 0 || d.GetCPU().GetUsageUsec() == 0 {
			t.Errorf("SandboxMetrics = %+v", d)
		}
	case *cgroupsv1.Metrics:
		if d.GetMemory().GetUsage().GetUsage() == 0 || d.GetCPU().GetUsage().GetTotal() == 0 {
			t.Errorf("SandboxMetrics = %+v", d)
		}
	default:
		t.Errorf("SandboxMetrics data %T, %v", data, err)
	}

	c.kill("app", "")
	c.wait("app", "")
	c.delete("app", "")
	ss, err = sb.SandboxStatus(ctx, &sandboxAPI.SandboxStatusRequest{SandboxID: "pod"})
	if err != nil || ss.State != "SANDBOX_READY" {
		t.Errorf("SandboxStatus after the last task's delete = %+v, %v; want the VM up", ss, err)
	}

	if _, err := sb.StopSandbox(ctx, &sandboxAPI.StopSandboxRequest{SandboxID: "pod", TimeoutSecs: 10}); err != nil {
		t.Fatal(err)
	}
	select {
	case w := <-waited:
		if w.GetExitStatus() != 0 || w.GetExitedAt() == nil {
			t.Errorf("WaitSandbox = %+v", w)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("WaitSandbox did not end with the stop")
	}
	ss, err = sb.SandboxStatus(ctx, &sandboxAPI.SandboxStatusRequest{SandboxID: "pod"})
	if err != nil || ss.State != "SANDBOX_NOTREADY" || ss.ExitedAt == nil {
		t.Errorf("SandboxStatus after stop = %+v, %v", ss, err)
	}
	if _, err := sb.ShutdownSandbox(ctx, &sandboxAPI.ShutdownSandboxRequest{SandboxID: "pod"}); err != nil {
		t.Fatal(err)
	}
	select {
	case <-h.sd.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("ShutdownSandbox did not end the shim")
	}
	if _, err := os.Stat(filepath.Join(bundle, sandbox.BundleFile)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("bundle file left: %v", err)
	}
	if _, err := os.Stat(filepath.Join(dir, "state", "testns", "pod")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("sandbox dir left: %v", err)
	}
	if left := mountsLeft(dir); len(left) > 0 {
		t.Errorf("mounts left: %v", left)
	}
}
