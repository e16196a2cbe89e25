package agent_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"syscall"
	"testing"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/colo-runtime/colo/agent"
	"github.com/colo-runtime/colo/agentproto"
)

// TestPodNamespaces: a sandbox asked for pod namespaces gets a holder
// whose IPC, UTS and PID namespaces containers join by the paths the shim
// names, with the pod's sysctls applied there; DestroySandbox ends the
// holder and removes the files. (The sandbox sets no hostname and only an
// IPC sysctl: the agent runs on the test host here.)
func TestPodNamespaces(t *testing.T) {
	ctx := context.Background()
	a := startAgent(t)
	if _, err := a.CreateSandbox(ctx, &agentproto.CreateSandboxRequest{
		SandboxId:  "sb",
		PodSysctls: map[string]string{"kernel.shm_rmid_forced": "1"},
	}); status.Code(err) != codes.InvalidArgument {
		t.Fatalf("CreateSandbox with sysctls and no pod namespaces = %v, want InvalidArgument", err)
	}
	if _, err := a.CreateSandbox(ctx, &agentproto.CreateSandboxRequest{
		SandboxId:     "sb",
		PodNamespaces: true,
		PodSysctls:    map[string]string{"vm.swappiness": "0"},
	}); status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), "vm.swappiness") {
		t.Fatalf("CreateSandbox with a guest-wide sysctl = %v, want InvalidArgument naming it", err)
	}
	if _, err := os.Stat(agentproto.PodNamespace("pid")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("a failed CreateSandbox left %s: %v", agentproto.PodNamespace("pid"), err)
	}
	if _, err := a.CreateSandbox(ctx, &agentproto.CreateSandboxRequest{
		SandboxId:     "sb",
		PodNamespaces: true,
		PodSysctls:    map[string]string{"kernel.shm_rmid_forced": "1"},
	}); err != nil {
		t.Fatalf("CreateSandbox: %v", err)
	}
	self, err := os.Readlink("/proc/self/ns/ipc")
	if err != nil {
		t.Fatal(err)
	}
	nsIDs := map[string]string{}
	for _, kind := range agentproto.PodNamespaces {
		var st syscall.Stat_t
		if err := syscall.Stat(agentproto.PodNamespace(kind), &st); err != nil {
			t.Fatalf("pod namespace %s: %v", kind, err)
		}
		nsIDs[kind] = fmt.Sprintf("%s:[%d]", kind, st.Ino)
	}
	if nsIDs["ipc"] == self {
		t.Fatalf("the pod's IPC namespace is the agent's own (%s)", self)
	}

	rootfs := makeRootfs(t)
	spec := newSpec(rootfs, "c", "sh", "-c",
		"cat /proc/sys/kernel/shm_rmid_forced; cat /proc/1/cmdline; echo; for n in ipc uts pid; do readlink /proc/self/ns/$n; done")
	spec.Hostname = ""
	for i, ns := range spec.Linux.Namespaces {
		switch ns.Type {
		case specs.IPCNamespace:
			spec.Linux.Namespaces[i].Path = agentproto.PodNamespace("ipc")
		case specs.UTSNamespace:
			spec.Linux.Namespaces[i].Path = agentproto.PodNamespace("uts")
		case specs.PIDNamespace:
			spec.Linux.Namespaces[i].Path = agentproto.PodNamespace("pid")
		}
	}
	a.createContainer(t, "c", spec, &agentproto.CreateContainerRequest{Stdout: true, Stderr: true})
	if _, err := a.StartContainer(ctx, &agentproto.StartContainerRequest{ContainerId: "c"}); err != nil {
		t.Fatalf("StartContainer: %v", err)
	}
	got := a.collect(t, "c", "", true, true)
	lines := strings.Split(strings.TrimSpace(got.stdout), "\n")
	want := []string{"1", "", nsIDs["ipc"], nsIDs["uts"], nsIDs["pid"]}
	if got.status != 0 || len(lines) != len(want) {
		t.Fatalf("container in the pod's namespaces: %+v", got)
	}
	// PID 1 of the pod's PID namespace is the holder, not the container.
	if init := strings.ReplaceAll(lines[1], "\x00", " "); !strings.Contains(init, agent.PodNSCommand) {
		t.Errorf("PID 1 in the pod's PID namespace is %q, want the holder", init)
	}
	lines[1] = ""
	for i := range want {
		if lines[i] != want[i] {
			t.Errorf("line %d: %q, want %q (output %q)", i, lines[i], want[i], got.stdout)
		}
	}
	a.remove(t, "c")

	if _, err := a.DestroySandbox(ctx, &agentproto.DestroySandboxRequest{}); err != nil {
		t.Fatalf("DestroySandbox: %v", err)
	}
	for _, kind := range agentproto.PodNamespaces {
		if _, err := os.Stat(agentproto.PodNamespace(kind)); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("pod namespace %s left after DestroySandbox: %v", kind, err)
		}
	}
	// startAgent's cleanup checks that the holder, a child of the
	// service, is gone.
}

func TestPodSysctl(t *testing.T) {
	for key, want := range map[string]bool{
		"net.ipv4.ip_local_port_range": true,
		"net.core.somaxconn":           true,
		"kernel.shm_rmid_forced":       true,
		"kernel.sem":                   true,
		"fs.mqueue.msg_max":            true,
		"kernel.domainname":            true,
		"kernel.hostname":              false, // the pod's hostname is the sandbox's
		"vm.swappiness":                false,
		"kernel.pid_max":               false,
		"net.ipv4/../../kernel/x":      false,
		"net..x":                       false,
		"net.":                         false,
	} {
		if got := agentproto.PodSysctl(key); got != want {
			t.Errorf("PodSysctl(%q) = %v, want %v", key, got, want)
		}
	}
}
