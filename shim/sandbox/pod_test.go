package sandbox

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"

	cgroupsv2 "github.com/containerd/cgroups/v3/cgroup2/stats"

	"github.com/colo-runtime/colo/agentproto"
)

// podContainer is a container of a pod as CRI makes it with the sandbox
// API: it joins the pod's namespaces by the sandbox's host pid, and has a
// /dev/shm of its own.
func (e *env) podContainer(id string, args ...string) ContainerConfig {
	c := e.container(args...)
	c.ID = id
	c.Stdio = Stdio{}
	c.Spec.Annotations = map[string]string{PodAnnotation: "c1"}
	c.Spec.Linux.Namespaces = []specs.LinuxNamespace{
		{Type: specs.NetworkNamespace, Path: "/proc/99/ns/net"},
		{Type: specs.IPCNamespace, Path: "/proc/99/ns/ipc"},
		{Type: specs.UTSNamespace, Path: "/proc/99/ns/uts"},
		{Type: specs.PIDNamespace, Path: "/proc/99/ns/pid"},
		{Type: specs.MountNamespace},
	}
	c.Spec.Mounts = []specs.Mount{{Destination: "/dev/shm", Type: "tmpfs", Source: "shm"}}
	return c
}

// TestCreatePod runs a pod's sandbox as the sandbox API does: a VM with no
// container, the agent asked for the pod's namespaces, containers that
// join them and get the pod's files, a sandbox that outlives its last
// container until it is stopped.
func TestCreatePod(t *testing.T) {
	e := newEnv(t, false)
	ctx := context.Background()
	pc := PodConfig{
		Bundle:      e.bundle,
		Hostname:    "pod",
		NetNS:       emptyNetns(t),
		Annotations: map[string]string{"io.kubernetes.pod.name": "x"},
		Sysctls:     map[string]string{"net.core.somaxconn": "1024", "kernel.shm_rmid_forced": "1"},
		Hosts:       []byte("127.0.0.1 localhost\n"),
		ResolvConf:  []byte("nameserver 10.96.0.10\n"),
	}
	sb, err := CreatePod(ctx, e.options(e.config("9p")), pc)
	if err != nil {
		t.Fatal(err)
	}
	dir := e.sandboxDir()
	var req *agentproto.CreateSandboxRequest
	e.drv.agent.locked(func(a *fakeAgent) { req = a.sandboxReq })
	if !req.GetPodNamespaces() || req.GetHostname() != "pod" || len(req.GetPodSysctls()) != 2 || req.GetPodSysctls()["net.core.somaxconn"] != "1024" {
		t.Errorf("CreateSandbox request = %+v, want the pod's namespaces, hostname and sysctls", req)
	}
	if got, err := ReadBundleFile(e.bundle); err != nil || got != dir {
		t.Errorf("bundle file = %q, %v; want %q", got, err, dir)
	}
	for name, want := range map[string]string{"hostname": "pod\n", "hosts": string(pc.Hosts), "resolv.conf": string(pc.ResolvConf)} {
		// As the guest sees them: in the share's read-only view.
		b, err := os.ReadFile(filepath.Join(dir, "shared", ".pod", "etc", name))
		if err != nil || string(b) != want {
			t.Errorf("pod file %s = %q, %v; want %q", name, b, err, want)
		}
	}
	if ids := sb.ContainerIDs(); len(ids) != 0 {
		t.Errorf("containers of a new pod: %q", ids)
	}
	if !sb.Running() || sb.Pid() == 0 || sb.Created().IsZero() || !sb.Exited().IsZero() {
		t.Errorf("new pod: running %v, pid %d, created %v, exited %v", sb.Running(), sb.Pid(), sb.Created(), sb.Exited())
	}
	if err := sb.Ping(ctx); err != nil {
		t.Errorf("Ping: %v", err)
	}
	// No host cgroup (no cgroup parent): the hypervisor process's use.
	m, err := sb.Metrics()
	if pm, ok := m.(*cgroupsv2.Metrics); err != nil || !ok || pm.GetMemory().GetUsage() == 0 || pm.GetPids().GetCurrent() == 0 {
		t.Errorf("Metrics = %+v, %v; want the VM process's", m, err)
	}

	for _, id := range []string{"a", "b"} {
		c, err := sb.AddContainer(ctx, e.podContainer(id, "echo", id))
		if err != nil {
			t.Fatalf("AddContainer %s: %v", id, err)
		}
		if err := c.Start(ctx, "", nil); err != nil {
			t.Fatal(err)
		}
		waitExit(t, e.exits)
	}
	g := e.drv.agent.spec("a")
	wantNS := []specs.LinuxNamespace{
		{Type: specs.IPCNamespace, Path: "/run/colo/pod-ns/ipc"},
		{Type: specs.UTSNamespace, Path: "/run/colo/pod-ns/uts"},
		{Type: specs.PIDNamespace, Path: "/run/colo/pod-ns/pid"},
		{Type: specs.MountNamespace},
	}
	if !slices.Equal(g.Linux.Namespaces, wantNS) {
		t.Errorf("guest namespaces = %+v, want %+v", g.Linux.Namespaces, wantNS)
	}
	var dests []string
	for _, m := range g.Mounts {
		dests = append(dests, m.Destination+" "+m.Source)
	}
	wantMounts := []string{"/dev/shm /run/colo/shm", "/run/colo/topology.json /run/colo/topology.json", "/etc/hostname /run/colo/shared/.pod/etc/hostname",
		"/etc/hosts /run/colo/shared/.pod/etc/hosts", "/etc/resolv.conf /run/colo/shared/.pod/etc/resolv.conf"}
	if !slices.Equal(dests, wantMounts) {
		t.Errorf("guest mounts = %q, want %q", dests, wantMounts)
	}

	// The last container's delete leaves the pod's VM up.
	for _, id := range []string{"a", "b"} {
		if _, err := sb.DeleteContainer(ctx, id); err != nil {
			t.Fatalf("DeleteContainer %s: %v", id, err)
		}
		if _, err := os.Stat(filepath.Join(dir, "mounts", id)); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("container %s's mounts left: %v", id, err)
		}
	}
	if !sb.Running() || e.drv.agent.destroyed {
		t.Fatal("the pod's sandbox went with its last container")
	}
	// A container that never started is ended by the stop.
	c, err := sb.AddContainer(ctx, e.podContainer("late", "echo"))
	if err != nil {
		t.Fatal(err)
	}

	waited := make(chan error, 1)
	go func() {
		status, at, err := sb.Wait(ctx)
		if err == nil && (status != 0 || at.IsZero()) {
			err = fmt.Errorf("stopped VM: status %d, exited at %v; want 0 and a time", status, at)
		}
		waited <- err
	}()
	stopCtx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if err := sb.Stop(stopCtx); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-waited:
		if err != nil {
			t.Errorf("Wait: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Wait did not end with the stop")
	}
	if sb.Running() || sb.Exited().IsZero() || !e.drv.agent.destroyed {
		t.Errorf("stopped pod: running %v, exited %v, guest told %v", sb.Running(), sb.Exited(), e.drv.agent.destroyed)
	}
	if st := c.initState(); st.Status != StatusStopped {
		t.Errorf("a created container after the stop: %+v", st)
	}
	if err := sb.Ping(ctx); !errdefs.IsUnavailable(err) {
		t.Errorf("Ping after stop: %v, want unavailable", err)
	}
	if _, err := sb.Metrics(); !errdefs.IsFailedPrecondition(err) {
		t.Errorf("Metrics after stop: %v, want failed precondition", err)
	}
	if _, err := sb.AddContainer(ctx, e.podContainer("after", "echo")); !errdefs.IsFailedPrecondition(err) {
		t.Errorf("AddContainer after stop: %v, want failed precondition", err)
	}
	// The stop took everything; the container's delete is left.
	if _, err := sb.DeleteContainer(ctx, "late"); err != nil {
		t.Errorf("DeleteContainer after stop: %v", err)
	}
	if err := sb.Stop(ctx); err != nil {
		t.Errorf("second Stop: %v", err)
	}
}

// TestPodVMDies: a pod whose VM dies ends its Wait with VMExitStatus, and
// is torn down.
func TestPodVMDies(t *testing.T) {
	e := newEnv(t, false)
	ctx := context.Background()
	sb, err := CreatePod(ctx, e.options(e.config("9p")), PodConfig{Bundle: e.bundle})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(e.sandboxDir(), "shared", ".pod")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("pod files made for a pod without any: %v", err)
	}
	_ = e.drv.vms[0].cmd.Process.Kill()
	waitCtx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	status, at, err := sb.Wait(waitCtx)
	if err != nil || status != VMExitStatus || at.IsZero() {
		t.Errorf("Wait = %d, %v, %v; want %d", status, at, err, VMExitStatus)
	}
	// The sandbox fails and tears itself down (the leak check).
	deadline := time.Now().Add(10 * time.Second)
	for !sb.isTorn() && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if !sb.isTorn() {
		t.Error("a pod whose VM died was not torn down")
	}
}

func TestCreatePodErrors(t *testing.T) {
	e := newEnv(t, false)
	ctx := context.Background()
	for name, pc := range map[string]PodConfig{
		"guest-wide sysctl":       {Bundle: e.bundle, Sysctls: map[string]string{"vm.swappiness": "1"}},
		"unknown colo annotation": {Bundle: e.bundle, Annotations: map[string]string{"io.colo.nope": "1"}},
	} {
		if _, err := CreatePod(ctx, e.options(e.config("9p")), pc); !errdefs.IsInvalidArgument(err) {
			t.Errorf("%s: CreatePod = %v, want invalid argument", name, err)
		}
	}
	if len(e.drv.vms) != 0 {
		t.Errorf("%d VMs started for invalid pods", len(e.drv.vms))
	}
}

func TestPodCgroupsPath(t *testing.T) {
	for _, tc := range []struct{ parent, want string }{
		{"/kubepods/besteffort/pod1", "/kubepods/besteffort/pod1/sb"},
		{"kubepods-besteffort-pod1.slice", "kubepods-besteffort-pod1.slice:cri-containerd:sb"},
		{"/kubepods.slice/kubepods-pod1.slice", "kubepods-pod1.slice:cri-containerd:sb"},
	} {
		if got := podCgroupsPath(tc.parent, "sb"); got != tc.want {
			t.Errorf("podCgroupsPath(%q) = %q, want %q", tc.parent, got, tc.want)
		}
	}
}
