package sandbox

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containerd/ttrpc"
	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/colo-runtime/colo/agentproto"
	"github.com/colo-runtime/colo/config"
	"github.com/colo-runtime/colo/hypervisor"
	"github.com/colo-runtime/colo/hypervisor/clh"
	"github.com/colo-runtime/colo/hypervisor/clh/clhtest"
	"github.com/colo-runtime/colo/hypervisor/driver"
	"github.com/colo-runtime/colo/internal/procfs"
)

// driverCase is one hypervisor driver the sandbox's lifecycle runs on, with
// the guest behind it: what the init and the exec run there and what they
// print.
type driverCase struct {
	name string
	// setup returns the configuration and the driver, and a check of
	// what the driver saw, run once the sandbox is gone; it skips where
	// the driver cannot run.
	setup func(t *testing.T, e *env) (config.Config, hypervisor.Driver, func(t *testing.T))
	// spec is the first container's: its init copies stdin to stdout
	// until killed.
	spec func(t *testing.T, e *env) *specs.Spec
	// exec prints execOut and exits with execStatus.
	exec       *specs.Process
	execOut    string
	execStatus uint32
}

// TestLifecycleDrivers runs one sandbox lifecycle through the hypervisor
// interface on each driver: create with a container, start, stdin to
// stdout, exec, kill, wait, delete (the sandbox's teardown), and nothing
// left: QEMU with a real guest and agent (COLO_TEST_GUEST), and Cloud
// Hypervisor's driver with a fake cloud-hypervisor (CH needs KVM, which
// this machine lacks) that serves CH's REST API as colo's contract states
// it and carries the agent's hybrid-vsock connections to a fake agent.
func TestLifecycleDrivers(t *testing.T) {
	for _, tc := range []driverCase{
		{
			name: "qemu",
			setup: func(t *testing.T, e *env) (config.Config, hypervisor.Driver, func(*testing.T)) {
				cfg := realConfig(t, e, "virtio-fs")
				drv, err := driver.New(cfg.Hypervisor)
				if err != nil {
					t.Fatal(err)
				}
				return cfg, drv, func(*testing.T) {}
			},
			spec:       func(t *testing.T, e *env) *specs.Spec { return busyboxSpec(t, e, "exec cat") },
			exec:       &specs.Process{Args: []string{"/bin/sh", "-c", "echo exec-out; exit 5"}, Env: []string{"PATH=/bin"}, Cwd: "/"},
			execOut:    "exec-out\n",
			execStatus: 5,
		},
		{
			name:  "clh",
			setup: fakeCHSetup,
			spec:  func(t *testing.T, e *env) *specs.Spec { return testSpec("cat") },
			// The fake agent's exec prints its arguments and exits with
			// TEST_EXIT.
			exec:       &specs.Process{Args: []string{"echo", "exec-out"}, Env: []string{"TEST_EXIT=5"}, Cwd: "/"},
			execOut:    "echo exec-out\n",
			execStatus: 5,
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t, true)
			cfg, drv, checkDriver := tc.setup(t, e)
			ctx := t.Context()
			opts := e.options(cfg)
			opts.Driver = drv
			cc := e.container()
			cc.Spec = tc.spec(t, e)

			sb, c, err := Create(ctx, opts, cc)
			if err != nil {
				t.Fatal(err)
			}
			vmProc := procfs.Of(sb.Pid())
			st, err := ReadState(e.sandboxDir())
			if err != nil {
				t.Fatal(err)
			}
			if st.Config.Hypervisor.Type != tc.name || st.HypervisorPid != sb.Pid() || vmProc.Start == 0 {
				t.Errorf("state: hypervisor %q pid %d, want %s pid %d", st.Config.Hypervisor.Type, st.HypervisorPid, tc.name, sb.Pid())
			}

			if err := c.Start(ctx, "", nil); err != nil {
				t.Fatal(err)
			}
			go io.Copy(io.Discard, e.stderr)
			if _, err := io.WriteString(e.stdin, "hello\n"); err != nil {
				t.Fatal(err)
			}
			line, err := bufio.NewReader(e.stdout).ReadString('\n')
			if err != nil || line != "hello\n" {
				t.Fatalf("init's stdout = %q, %v; want its stdin back", line, err)
			}

			es := openClientStdio(t, filepath.Join(filepath.Dir(e.stateDir), "exec-fifos"), false)
			execOut, execErr := readAll(t, es.stdout), readAll(t, es.stderr)
			if err := c.Exec(ctx, "e1", tc.exec, es.Stdio); err != nil {
				t.Fatal(err)
			}
			if err := c.Start(ctx, "e1", nil); err != nil {
				t.Fatal(err)
			}
			if x := waitExit(t, e.exits); x.ExecID != "e1" || x.Status != tc.execStatus {
				t.Errorf("exec's exit = %+v, want e1 with %d", x, tc.execStatus)
			}
			if out := <-execOut; out != tc.execOut {
				t.Errorf("exec's stdout = %q, want %q", out, tc.execOut)
			}
			<-execErr
			if ps, err := c.DeleteExec(ctx, "e1"); err != nil || ps.ExitStatus != tc.execStatus {
				t.Errorf("DeleteExec = %+v, %v", ps, err)
			}

			if err := c.Kill(ctx, "", 9, false); err != nil {
				t.Fatal(err)
			}
			if x := waitExit(t, e.exits); x.ExecID != "" || x.Status != 137 {
				t.Errorf("init's exit = %+v, want 137", x)
			}
			if ws, err := c.Wait(ctx, ""); err != nil || ws.Status != StatusStopped || ws.ExitStatus != 137 {
				t.Errorf("Wait = %+v, %v", ws, err)
			}

			// The last container's delete tears the sandbox down.
			if _, err := sb.DeleteContainer(ctx, "c1"); err != nil {
				t.Fatal(err)
			}
			if !vmProc.Gone() {
				t.Errorf("hypervisor %d still runs after the delete", vmProc.Pid)
			}
			checkDriver(t)
			// env's cleanup checks that no process, mount or file is left.
		})
	}
}

// fakeCHSetup is the clh case: the real clh driver, running the fake
// cloud-hypervisor, whose hybrid vsock carries connections to the agent's
// port to a fake agent the test serves over ttrpc. CH has no 9p and no
// virtio-serial: the sandbox uses virtio-fs (a real virtiofsd) and vsock.
func fakeCHSetup(t *testing.T, e *env) (config.Config, hypervisor.Driver, func(*testing.T)) {
	cfg := e.config("virtio-fs")
	dir := t.TempDir()
	bin, err := clhtest.BuildFakeCH(dir)
	if err != nil {
		t.Fatal(err)
	}
	// The fake boots no guest, but the driver wants a kernel and initrd.
	for _, f := range []string{"vmlinux", "initrd.img"} {
		if err := os.WriteFile(filepath.Join(dir, f), nil, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	cfg.Hypervisor.Type = "clh"
	cfg.Hypervisor.Path = bin
	cfg.Hypervisor.Kernel = filepath.Join(dir, "vmlinux")
	cfg.Hypervisor.Initrd = filepath.Join(dir, "initrd.img")
	cfg.Agent.Channel = "auto"
	if err := cfg.Validate(); err != nil {
		t.Fatalf("a clh configuration: %v", err)
	}
	kvm, cpuinfo, err := clhtest.FakeKVM(dir)
	if err != nil {
		t.Fatal(err)
	}
	drv, err := clh.New(cfg.Hypervisor, clh.WithKVM(kvm, cpuinfo))
	if err != nil {
		t.Fatal(err)
	}

	// The guest's agent port is a unix socket the fake agent is served
	// on: fakech connects CONNECT <agent port> to it, and closes any
	// other port, as CH does when nothing in the guest listens.
	agentSock := filepath.Join(dir, "agent.sock")
	l, err := net.Listen("unix", agentSock)
	if err != nil {
		t.Fatal(err)
	}
	srv, err := ttrpc.NewServer()
	if err != nil {
		t.Fatal(err)
	}
	agentproto.RegisterAgentService(srv, e.drv.agent)
	go srv.Serve(context.Background(), l)
	t.Cleanup(func() { srv.Close() })
	logPath := filepath.Join(dir, "requests.jsonl")
	t.Setenv("FAKECH_VSOCK", fmt.Sprintf("%d=%s", agentproto.VsockPort, agentSock))
	t.Setenv("FAKECH_LOG", logPath)

	return cfg, drv, func(t *testing.T) {
		// The shim drove CH over its API: within the contract, the
		// guest's kernel parameters from the shim, the share by
		// virtio-fs, and a graceful shutdown.
		b, err := os.ReadFile(logPath)
		if err != nil {
			t.Fatal(err)
		}
		var endpoints []string
		for line := range strings.Lines(string(b)) {
			var r clhtest.Record
			if err := json.Unmarshal([]byte(line), &r); err != nil {
				t.Fatal(err)
			}
			if r.Violation != "" {
				t.Errorf("request against the contract: %s", r.Violation)
			}
			if r.Endpoint == "vmm.ping" {
				continue
			}
			endpoints = append(endpoints, r.Endpoint)
			if r.Endpoint != "vm.create" {
				continue
			}
			var vc struct {
				Payload struct{ Cmdline string }
				FS      []struct{ Tag, Socket string }
			}
			if err := json.Unmarshal(r.Body, &vc); err != nil {
				t.Fatal(err)
			}
			for _, p := range []string{"colo.channel=vsock", "colo.log=" + cfg.Agent.LogLevel} {
				if !strings.Contains(vc.Payload.Cmdline, p) {
					t.Errorf("kernel command line %q lacks %s", vc.Payload.Cmdline, p)
				}
			}
			if len(vc.FS) != 1 || vc.FS[0].Tag != agentproto.SharedTag || vc.FS[0].Socket != filepath.Join(e.sandboxDir(), virtiofsdSocket) {
				t.Errorf("vm.create shares %+v, want %s on the sandbox's virtiofsd", vc.FS, agentproto.SharedTag)
			}
		}
		want := "vm.create vm.boot vm.info vm.shutdown vmm.shutdown"
		if got := strings.Join(endpoints, " "); !strings.HasPrefix(got, "vm.create vm.boot vm.info") || !strings.HasSuffix(got, "vm.shutdown vmm.shutdown") {
			t.Errorf("CH's API was called %q, want %q around the rest", got, want)
		}
		e.drv.agent.locked(func(a *fakeAgent) {
			if a.checkCalls == 0 || !a.destroyed {
				t.Errorf("the fake agent over hybrid vsock: %d Check calls, destroyed %v", a.checkCalls, a.destroyed)
			}
		})
	}
}
