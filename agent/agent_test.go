package agent_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containerd/ttrpc"
	"github.com/moby/sys/mountinfo"
	"github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/colo-runtime/colo/agentproto"
)

// binDir holds the colo-agent binary the end-to-end tests build.
var binDir string

func TestMain(m *testing.M) {
	flag.Parse()
	dir, err := os.MkdirTemp("", "colo-agent-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	binDir = dir
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// buildAgent builds colo-agent as the guest gets it: static, with cgo for
// nsenter. Only once, and only when a test needs it.
var buildAgent = sync.OnceValues(func() (string, error) {
	bin := filepath.Join(binDir, "colo-agent")
	cmd := exec.Command("go", "build", "-tags", "osusergo,netgo",
		"-ldflags", "-s -w -extldflags -static -X main.version=e2e-test",
		"-o", bin, "github.com/colo-runtime/colo/cmd/colo-agent")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=1")
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("build colo-agent: %w\n%s", err, out)
	}
	return bin, nil
})

// testAgent is a colo-agent serve process on a unix socket.
type testAgent struct {
	agentproto.AgentService
	stateDir string
	pid      int
}

// startAgent starts "colo-agent serve" and connects to it. Cleanup stops
// it and checks that it exits cleanly and leaves nothing behind.
func startAgent(t *testing.T, args ...string) *testAgent {
	t.Helper()
	if os.Geteuid() != 0 || testing.Short() {
		t.Skip("needs root and no -short: runs containers")
	}
	agentBin, err := buildAgent()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	sock := filepath.Join(dir, "agent.sock")
	stateDir := filepath.Join(dir, "state")
	logFile, err := os.Create(filepath.Join(dir, "agent.log"))
	if err != nil {
		t.Fatal(err)
	}
	defer logFile.Close()
	cmd := exec.Command(agentBin, append([]string{"serve",
		"--listen", "unix:" + sock, "--state-dir", stateDir, "--log-level", "debug"}, args...)...)
	cmd.Stdout, cmd.Stderr = logFile, logFile
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()

	var conn net.Conn
	for conn == nil {
		c, err := net.Dial("unix", sock)
		if err == nil {
			conn = c
			break
		}
		select {
		case err := <-exited:
			t.Fatalf("agent exited before serving: %v\n%s", err, readFile(t, logFile.Name()))
		case <-time.After(10 * time.Millisecond):
		}
	}
	client := ttrpc.NewClient(conn)
	t.Cleanup(func() {
		client.Close()
		if children := childrenOf(t, cmd.Process.Pid); len(children) > 0 {
			t.Errorf("agent still has children %v after the test", children)
		}
		if err := cmd.Process.Signal(unix.SIGTERM); err != nil {
			t.Errorf("stop agent: %v", err)
		}
		if err := <-exited; err != nil {
			t.Errorf("agent exit: %v", err)
		}
		if _, err := os.Stat(sock); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("agent socket left behind: %v", err)
		}
		if left, _ := os.ReadDir(stateDir); len(left) > 0 {
			t.Errorf("container state left behind: %v", left)
		}
		if t.Failed() {
			t.Logf("agent log:\n%s", readFile(t, logFile.Name()))
		}
	})
	return &testAgent{
		AgentService: agentproto.NewAgentClient(client),
		stateDir:     stateDir,
		pid:          cmd.Process.Pid,
	}
}

func readFile(t *testing.T, path string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		t.Error(err)
	}
	return string(b)
}

// childrenOf lists the pids whose parent is pid.
func childrenOf(t *testing.T, pid int) []int {
	t.Helper()
	stats, err := filepath.Glob("/proc/[0-9]*/stat")
	if err != nil {
		t.Fatal(err)
	}
	var children []int
	for _, f := range stats {
		b, err := os.ReadFile(f)
		if err != nil {
			continue // gone
		}
		// pid (comm) state ppid ...: comm may hold spaces, so cut at ')'.
		fields := strings.Fields(string(b[bytes.LastIndexByte(b, ')')+1:]))
		if len(fields) > 1 && fields[1] == strconv.Itoa(pid) {
			p, _ := strconv.Atoi(filepath.Base(filepath.Dir(f)))
			children = append(children, p)
		}
	}
	return children
}

// makeRootfs makes a busybox root filesystem.
func makeRootfs(t *testing.T) string {
	t.Helper()
	root := t.TempDir()
	for _, d := range []string{"bin", "dev", "proc", "sys", "etc", "tmp"} {
		if err := os.Mkdir(filepath.Join(root, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	// Readable by the unprivileged users the tests run as.
	if err := os.Chmod(root, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(filepath.Join(root, "tmp"), 0o1777); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(root, "etc", "secret"), []byte("secret\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	bb, err := os.ReadFile("/bin/busybox")
	if err != nil {
		t.Skipf("needs busybox-static: %v", err)
	}
	if err := os.WriteFile(filepath.Join(root, "bin", "busybox"), bb, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, applet := range []string{"sh", "cat", "echo", "sleep", "id", "pwd", "readlink", "hostname", "wc", "true"} {
		if err := os.Symlink("busybox", filepath.Join(root, "bin", applet)); err != nil {
			t.Fatal(err)
		}
	}
	return root
}

// cgroupsPath is a unique cgroup for a test container.
func cgroupsPath(id string) string {
	return fmt.Sprintf("/colo-agent-test-%d-%s", os.Getpid(), id)
}

// newSpec returns a spec like containerd's default one.
func newSpec(rootfs, id string, args ...string) *specs.Spec {
	caps := []string{
		"CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW",
		"CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE",
		"CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE",
	}
	return &specs.Spec{
		Version:  specs.Version,
		Root:     &specs.Root{Path: rootfs},
		Hostname: "colo-test",
		Process: &specs.Process{
			Args: args,
			Env:  []string{"PATH=/bin"},
			Cwd:  "/",
			Capabilities: &specs.LinuxCapabilities{
				Bounding: caps, Effective: caps, Permitted: caps,
			},
			NoNewPrivileges: true,
		},
		Mounts: []specs.Mount{
			{Destination: "/proc", Type: "proc", Source: "proc", Options: []string{"nosuid", "noexec", "nodev"}},
			{Destination: "/dev", Type: "tmpfs", Source: "tmpfs", Options: []string{"nosuid", "strictatime", "mode=755", "size=65536k"}},
			{Destination: "/dev/pts", Type: "devpts", Source: "devpts", Options: []string{"nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"}},
			{Destination: "/dev/shm", Type: "tmpfs", Source: "shm", Options: []string{"nosuid", "noexec", "nodev", "mode=1777", "size=65536k"}},
			{Destination: "/sys", Type: "sysfs", Source: "sysfs", Options: []string{"nosuid", "noexec", "nodev", "ro"}},
		},
		Linux: &specs.Linux{
			CgroupsPath: cgroupsPath(id),
			Namespaces: []specs.LinuxNamespace{
				{Type: specs.PIDNamespace}, {Type: specs.MountNamespace}, {Type: specs.IPCNamespace},
				{Type: specs.UTSNamespace}, {Type: specs.NetworkNamespace},
			},
			MaskedPaths:   []string{"/proc/kcore", "/proc/keys", "/sys/firmware"},
			ReadonlyPaths: []string{"/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"},
		},
	}
}

func withoutNamespace(spec *specs.Spec, typ specs.LinuxNamespaceType) {
	var kept []specs.LinuxNamespace
	for _, ns := range spec.Linux.Namespaces {
		if ns.Type != typ {
			kept = append(kept, ns)
		}
	}
	spec.Linux.Namespaces = kept
}

// createContainer creates a container, registering a cleanup that removes
// it if the test did not, and checks that removal left nothing behind.
func (a *testAgent) createContainer(t *testing.T, id string, spec *specs.Spec, req *agentproto.CreateContainerRequest) {
	t.Helper()
	ctx := context.Background()
	b, err := json.Marshal(spec)
	if err != nil {
		t.Fatal(err)
	}
	req.ContainerId, req.OciSpec = id, b
	if _, err := a.CreateContainer(ctx, req); err != nil {
		t.Fatalf("CreateContainer: %v", err)
	}
	t.Cleanup(func() {
		_, err := a.RemoveContainer(ctx, &agentproto.RemoveContainerRequest{ContainerId: id})
		if err != nil && status.Code(err) != codes.NotFound {
			t.Errorf("RemoveContainer(%s): %v", id, err)
		}
		assertNoCgroup(t, spec.Linux.CgroupsPath)
	})
}

func (a *testAgent) remove(t *testing.T, id string) {
	t.Helper()
	if _, err := a.RemoveContainer(context.Background(), &agentproto.RemoveContainerRequest{ContainerId: id}); err != nil {
		t.Fatalf("RemoveContainer(%s): %v", id, err)
	}
}

// assertNoCgroup checks that no cgroup hierarchy has the path.
func assertNoCgroup(t *testing.T, path string) {
	t.Helper()
	mounts, err := mountinfo.GetMounts(mountinfo.FSTypeFilter("cgroup", "cgroup2"))
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range mounts {
		p := filepath.Join(m.Mountpoint, path)
		if _, err := os.Stat(p); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("cgroup %s left behind (%v)", p, err)
		}
	}
}

// readAll reads a stream of a process to its end.
func (a *testAgent) readAll(id, execID string, stderr bool) (string, error) {
	ctx := context.Background()
	read := a.ReadStdout
	if stderr {
		read = a.ReadStderr
	}
	var out []byte
	for {
		resp, err := read(ctx, &agentproto.ReadStreamRequest{ContainerId: id, ExecId: execID})
		if err != nil {
			return string(out), err
		}
		out = append(out, resp.Data...)
		if resp.Eof {
			return string(out), nil
		}
	}
}

// result is what a process printed and how it ended.
type result struct {
	stdout, stderr string
	status         uint32
}

// collect reads the process's output to its end and waits for it.
func (a *testAgent) collect(t *testing.T, id, execID string, stdout, stderr bool) result {
	t.Helper()
	var (
		res  result
		wg   sync.WaitGroup
		errs [2]error
	)
	if stdout {
		wg.Go(func() { res.stdout, errs[0] = a.readAll(id, execID, false) })
	}
	if stderr {
		wg.Go(func() { res.stderr, errs[1] = a.readAll(id, execID, true) })
	}
	wait, err := a.WaitProcess(context.Background(), &agentproto.WaitProcessRequest{ContainerId: id, ExecId: execID})
	if err != nil {
		t.Fatalf("WaitProcess(%s, %q): %v", id, execID, err)
	}
	wg.Wait()
	if err := errors.Join(errs[:]...); err != nil {
		t.Fatalf("read output of %s %q: %v", id, execID, err)
	}
	if wait.ExitedAt == nil || wait.ExitedAt.AsTime().IsZero() {
		t.Errorf("WaitProcess(%s, %q): no exited_at", id, execID)
	}
	res.status = wait.ExitStatus
	return res
}

func hostNamespaces(t *testing.T) map[string]string {
	ns := make(map[string]string)
	for _, n := range []string{"pid", "mnt", "ipc", "uts", "net"} {
		l, err := os.Readlink("/proc/self/ns/" + n)
		if err != nil {
			t.Fatal(err)
		}
		ns[n] = l
	}
	return ns
}

func TestContainers(t *testing.T) {
	hostNS := hostNamespaces(t)
	tests := []struct {
		name   string
		args   []string
		edit   func(*specs.Spec)
		stdin  string // written, then stdin is closed; "" for no stdin
		want   result
		verify func(t *testing.T, got result) // instead of want's output
	}{{
		name: "exit status and streams",
		args: []string{"sh", "-c", "echo out; echo err >&2; exit 7"},
		want: result{stdout: "out\n", stderr: "err\n", status: 7},
	}, {
		name: "env cwd and user",
		args: []string{"sh", "-c", "echo $FOO; pwd; id -u; id -g; id -G"},
		edit: func(s *specs.Spec) {
			s.Process.Env = append(s.Process.Env, "FOO=bar")
			s.Process.Cwd = "/tmp"
			s.Process.User = specs.User{UID: 1000, GID: 1000, AdditionalGids: []uint32{1001}}
		},
		want: result{stdout: "bar\n/tmp\n1000\n1000\n1000 1001\n"},
	}, {
		name:  "stdin",
		args:  []string{"cat"},
		stdin: "hello\nworld\n",
		want:  result{stdout: "hello\nworld\n"},
	}, {
		name: "namespaces and hostname",
		args: []string{"sh", "-c", "echo $$; hostname; for n in pid mnt ipc uts net; do echo $n $(readlink /proc/self/ns/$n); done"},
		verify: func(t *testing.T, got result) {
			lines := strings.Split(strings.TrimSpace(got.stdout), "\n")
			if len(lines) != 7 || lines[0] != "1" || lines[1] != "colo-test" {
				t.Fatalf("stdout %q: want pid 1, hostname colo-test, 5 namespaces", got.stdout)
			}
			for _, l := range lines[2:] {
				name, link, _ := strings.Cut(l, " ")
				if link == "" || link == hostNS[name] {
					t.Errorf("namespace %s = %q, host's is %q: want a new one", name, link, hostNS[name])
				}
			}
		},
	}, {
		name: "rlimits",
		args: []string{"sh", "-c", "ulimit -n"},
		edit: func(s *specs.Spec) {
			s.Process.Rlimits = []specs.POSIXRlimit{{Type: "RLIMIT_NOFILE", Hard: 777, Soft: 777}}
		},
		want: result{stdout: "777\n"},
	}, {
		name: "capabilities",
		// Root without CAP_SYS_ADMIN may not set the hostname.
		args: []string{"sh", "-c", "hostname other 2>/dev/null || echo denied"},
		want: result{stdout: "denied\n"},
	}, {
		name: "masked and read-only paths",
		args: []string{"sh", "-c", "wc -c < /etc/secret; echo x 2>/dev/null > /proc/sys/kernel/domainname || echo read-only"},
		edit: func(s *specs.Spec) { s.Linux.MaskedPaths = append(s.Linux.MaskedPaths, "/etc/secret") },
		want: result{stdout: "0\nread-only\n"},
	}, {
		name: "read-only root",
		args: []string{"sh", "-c", "echo x 2>/dev/null > /new || echo read-only"},
		edit: func(s *specs.Spec) { s.Root.Readonly = true },
		want: result{stdout: "read-only\n"},
	}}

	for _, mode := range []struct {
		name string
		args []string
	}{
		{"pivot_root", nil},
		{"no pivot_root", []string{"--no-pivot"}},
	} {
		t.Run(mode.name, func(t *testing.T) {
			a := startAgent(t, mode.args...)
			rootfs := makeRootfs(t)
			for i, tt := range tests {
				t.Run(tt.name, func(t *testing.T) {
					ctx := context.Background()
					id := fmt.Sprintf("c%d", i)
					spec := newSpec(rootfs, id, tt.args...)
					if tt.edit != nil {
						tt.edit(spec)
					}
					a.createContainer(t, id, spec, &agentproto.CreateContainerRequest{
						Stdin: tt.stdin != "", Stdout: true, Stderr: true,
					})
					start, err := a.StartContainer(ctx, &agentproto.StartContainerRequest{ContainerId: id})
					if err != nil {
						t.Fatalf("StartContainer: %v", err)
					}
					if tt.stdin != "" {
						w, err := a.WriteStdin(ctx, &agentproto.WriteStreamRequest{ContainerId: id, Data: []byte(tt.stdin)})
						if err != nil || int(w.Len) != len(tt.stdin) {
							t.Fatalf("WriteStdin = %v, %v", w, err)
						}
						if _, err := a.CloseStdin(ctx, &agentproto.CloseStdinRequest{ContainerId: id}); err != nil {
							t.Fatalf("CloseStdin: %v", err)
						}
					}
					got := a.collect(t, id, "", true, true)
					if tt.verify != nil {
						tt.verify(t, got)
					} else if got != tt.want {
						t.Errorf("got %+v, want %+v", got, tt.want)
					}
					a.remove(t, id)
					if err := unix.Kill(int(start.Pid), 0); !errors.Is(err, unix.ESRCH) {
						t.Errorf("container init %d still exists: %v", start.Pid, err)
					}
					assertNoCgroup(t, spec.Linux.CgroupsPath)
				})
			}
		})
	}
}

func TestSignals(t *testing.T) {
	a := startAgent(t)
	rootfs := makeRootfs(t)
	tests := []struct {
		name   string
		args   []string
		pidNS  bool
		signal unix.Signal
		all    bool
		want   uint32
	}{
		// A PID namespace's init ignores signals it has no handler for,
		// SIGKILL aside, hence the shared PID namespace for SIGTERM.
		{"SIGTERM", []string{"sleep", "1000"}, false, unix.SIGTERM, false, 128 + 15},
		{"SIGKILL to the init of a PID namespace", []string{"sleep", "1000"}, true, unix.SIGKILL, false, 128 + 9},
		{"SIGTERM to all processes", []string{"sh", "-c", "sleep 1000 & sleep 1000 & wait"}, false, unix.SIGTERM, true, 128 + 15},
		{"SIGKILL to all processes", []string{"sh", "-c", "sleep 1000 & sleep 1000 & wait"}, true, unix.SIGKILL, true, 128 + 9},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx := context.Background()
			id := fmt.Sprintf("s%d", i)
			spec := newSpec(rootfs, id, tt.args...)
			if !tt.pidNS {
				withoutNamespace(spec, specs.PIDNamespace)
			}
			a.createContainer(t, id, spec, &agentproto.CreateContainerRequest{})
			if _, err := a.StartContainer(ctx, &agentproto.StartContainerRequest{ContainerId: id}); err != nil {
				t.Fatalf("StartContainer: %v", err)
			}
			if tt.all {
				// Signal once every process is there, or a late
				// sleep would live on.
				for {
					ps, err := a.ListProcesses(ctx, &agentproto.ListProcessesRequest{ContainerId: id})
					if err != nil {
						t.Fatal(err)
					}
					if len(ps.Processes) == 3 {
						break
					}
					time.Sleep(10 * time.Millisecond)
				}
			}
			if _, err := a.SignalProcess(ctx, &agentproto.SignalProcessRequest{ContainerId: id, Signal: uint32(tt.signal), All: tt.all}); err != nil {
				t.Fatalf("SignalProcess: %v", err)
			}
			if got := a.collect(t, id, "", false, false); got.status != tt.want {
				t.Errorf("exit status %d, want %d", got.status, tt.want)
			}
			_, err := a.SignalProcess(ctx, &agentproto.SignalProcessRequest{ContainerId: id, Signal: uint32(unix.SIGKILL)})
			if status.Code(err) != codes.NotFound {
				t.Errorf("signal after exit = %v, want NotFound", err)
			}
			a.remove(t, id)
		})
	}
}

func TestCreateStartExec(t *testing.T) {
	ctx := context.Background()
	a := startAgent(t)
	rootfs := makeRootfs(t)
	id := "lifecycle"
	spec := newSpec(rootfs, id, "sh", "-c", "echo started; exec sleep 1000")
	a.createContainer(t, id, spec, &agentproto.CreateContainerRequest{Stdout: true})

	// Created: only the init waits, and it has not run the program yet.
	ps, err := a.ListProcesses(ctx, &agentproto.ListProcessesRequest{ContainerId: id})
	if err != nil {
		t.Fatal(err)
	}
	if len(ps.Processes) != 1 {
		t.Fatalf("processes after create: %v, want the init only", ps.Processes)
	}
	cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", ps.Processes[0].Pid))
	if err != nil {
		t.Fatal(err)
	}
	if args := strings.Split(string(cmdline), "\x00"); len(args) < 2 || args[1] != "init" {
		t.Fatalf("init before start runs %q, want colo-agent init", args)
	}

	// Waits started before start see the exit too.
	var (
		waits    sync.WaitGroup
		statuses [3]uint32
		errs     [3]error
	)
	for i := range statuses {
		waits.Go(func() {
			resp, err := a.WaitProcess(ctx, &agentproto.WaitProcessRequest{ContainerId: id})
			if err == nil {
				statuses[i] = resp.ExitStatus
			}
			errs[i] = err
		})
	}

	start, err := a.StartContainer(ctx, &agentproto.StartContainerRequest{ContainerId: id})
	if err != nil {
		t.Fatalf("StartContainer: %v", err)
	}
	if start.Pid != ps.Processes[0].Pid {
		t.Errorf("StartContainer pid %d, want the init's %d", start.Pid, ps.Processes[0].Pid)
	}
	if _, err := a.StartContainer(ctx, &agentproto.StartContainerRequest{ContainerId: id}); err == nil {
		t.Error("second StartContainer succeeded")
	}
	out, err := a.ReadStdout(ctx, &agentproto.ReadStreamRequest{ContainerId: id, Len: 100})
	if err != nil || string(out.Data) != "started\n" {
		t.Fatalf("ReadStdout = %v, %v; want started", out, err)
	}

	// Exec: output, user, and a signal to a process that is not the
	// namespace's init.
	exec := func(execID string, p specs.Process, stdout bool) {
		t.Helper()
		b, err := json.Marshal(p)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := a.ExecProcess(ctx, &agentproto.ExecProcessRequest{ContainerId: id, ExecId: execID, Process: b, Stdout: stdout}); err != nil {
			t.Fatalf("ExecProcess(%s): %v", execID, err)
		}
	}
	exec("e1", specs.Process{Args: []string{"sh", "-c", "echo $$ $(id -u) $X"}, Env: []string{"PATH=/bin", "X=y"}, Cwd: "/", User: specs.User{UID: 1000, GID: 1000}}, true)
	got := a.collect(t, id, "e1", true, false)
	fields := strings.Fields(got.stdout)
	if got.status != 0 || len(fields) != 3 || fields[0] == "1" || fields[1] != "1000" || fields[2] != "y" {
		t.Errorf("exec e1: %+v, want a pid other than 1, uid 1000, X=y", got)
	}
	exec("e2", specs.Process{Args: []string{"sleep", "1000"}, Env: []string{"PATH=/bin"}, Cwd: "/"}, false)
	if _, err := a.SignalProcess(ctx, &agentproto.SignalProcessRequest{ContainerId: id, ExecId: "e2", Signal: uint32(unix.SIGTERM)}); err != nil {
		t.Fatalf("SignalProcess(e2): %v", err)
	}
	if got := a.collect(t, id, "e2", false, false); got.status != 128+15 {
		t.Errorf("exec e2 exit status %d, want 143", got.status)
	}
	if _, err := a.ExecProcess(ctx, &agentproto.ExecProcessRequest{ContainerId: id, ExecId: "e1", Process: []byte(`{"args":["true"],"cwd":"/"}`)}); status.Code(err) != codes.AlreadyExists {
		t.Errorf("exec with a used id = %v, want AlreadyExists", err)
	}
	// RemoveProcess frees an exited exec's id; a running one stays.
	exec("e3", specs.Process{Args: []string{"sleep", "1000"}, Env: []string{"PATH=/bin"}, Cwd: "/"}, false)
	if _, err := a.RemoveProcess(ctx, &agentproto.RemoveProcessRequest{ContainerId: id, ExecId: "e3"}); status.Code(err) != codes.FailedPrecondition {
		t.Errorf("RemoveProcess of a running exec = %v, want FailedPrecondition", err)
	}
	if _, err := a.RemoveProcess(ctx, &agentproto.RemoveProcessRequest{ContainerId: id, ExecId: "e1"}); err != nil {
		t.Errorf("RemoveProcess(e1): %v", err)
	}
	if _, err := a.WaitProcess(ctx, &agentproto.WaitProcessRequest{ContainerId: id, ExecId: "e1"}); status.Code(err) != codes.NotFound {
		t.Errorf("WaitProcess of a removed exec = %v, want NotFound", err)
	}
	exec("e1", specs.Process{Args: []string{"true"}, Env: []string{"PATH=/bin"}, Cwd: "/"}, false)

	// Removing a running container kills it; the waits return.
	a.remove(t, id)
	waits.Wait()
	for i := range statuses {
		if errs[i] != nil || statuses[i] != 128+9 {
			t.Errorf("wait %d = %d, %v; want 137", i, statuses[i], errs[i])
		}
	}
}

func TestErrors(t *testing.T) {
	ctx := context.Background()
	a := startAgent(t)
	rootfs := makeRootfs(t)
	tests := []struct {
		name string
		call func() error
		want codes.Code
	}{
		{"exec in a missing container", func() error {
			_, err := a.ExecProcess(ctx, &agentproto.ExecProcessRequest{ContainerId: "nope", ExecId: "x", Process: []byte(`{"args":["true"],"cwd":"/"}`)})
			return err
		}, codes.NotFound},
		{"start a missing container", func() error {
			_, err := a.StartContainer(ctx, &agentproto.StartContainerRequest{ContainerId: "nope"})
			return err
		}, codes.NotFound},
		{"wait for a missing container", func() error {
			_, err := a.WaitProcess(ctx, &agentproto.WaitProcessRequest{ContainerId: "nope"})
			return err
		}, codes.NotFound},
		{"remove a missing container", func() error {
			_, err := a.RemoveContainer(ctx, &agentproto.RemoveContainerRequest{ContainerId: "nope"})
			return err
		}, codes.NotFound},
		{"bad spec", func() error {
			_, err := a.CreateContainer(ctx, &agentproto.CreateContainerRequest{ContainerId: "bad", OciSpec: []byte("{")})
			return err
		}, codes.InvalidArgument},
		{"missing executable", func() error {
			b, err := json.Marshal(newSpec(rootfs, "e", "/bin/nope"))
			if err != nil {
				return err
			}
			_, err = a.CreateContainer(ctx, &agentproto.CreateContainerRequest{ContainerId: "e", OciSpec: b, Stdout: true})
			return err
		}, codes.Unknown},
		{"unknown storage driver", func() error {
			_, err := a.CreateSandbox(ctx, &agentproto.CreateSandboxRequest{Storages: []*agentproto.Storage{{Driver: "nbd", Source: "x", MountPoint: t.TempDir()}}})
			return err
		}, codes.Unimplemented},
		{"resize a missing container", func() error {
			_, err := a.TtyWinResize(ctx, &agentproto.TtyWinResizeRequest{ContainerId: "x"})
			return err
		}, codes.NotFound},
		{"no vCPUs", func() error {
			_, err := a.OnlineCPUMem(ctx, &agentproto.OnlineCPUMemRequest{})
			return err
		}, codes.InvalidArgument},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if err := tt.call(); status.Code(err) != tt.want {
				t.Errorf("got %v, want code %v", err, tt.want)
			}
		})
	}
	if left, _ := os.ReadDir(a.stateDir); len(left) > 0 {
		t.Errorf("failed creates left state behind: %v", left)
	}
	assertNoCgroup(t, cgroupsPath("e"))
}

func TestCheck(t *testing.T) {
	a := startAgent(t)
	resp, err := a.Check(context.Background(), &agentproto.CheckRequest{})
	if err != nil {
		t.Fatal(err)
	}
	bootID, err := os.ReadFile("/proc/sys/kernel/random/boot_id")
	if err != nil {
		t.Fatal(err)
	}
	if resp.AgentVersion != "e2e-test" || resp.ProtocolVersion != agentproto.ProtocolVersion || resp.BootId != strings.TrimSpace(string(bootID)) {
		t.Errorf("Check = %+v", resp)
	}
	details, err := a.GetGuestDetails(context.Background(), &agentproto.GetGuestDetailsRequest{})
	if err != nil {
		t.Fatal(err)
	}
	var uts unix.Utsname
	if err := unix.Uname(&uts); err != nil {
		t.Fatal(err)
	}
	if details.KernelRelease != unix.ByteSliceToString(uts.Release[:]) || details.OnlineCpus == 0 || details.MemTotalBytes == 0 {
		t.Errorf("GetGuestDetails = %+v", details)
	}
}

// TestStorages mounts sandbox and container storages. It leaves the
// hostname and the clock alone: on the host they are the host's.
func TestStorages(t *testing.T) {
	ctx := context.Background()
	a := startAgent(t)
	dir := t.TempDir()
	shared := filepath.Join(dir, "shared")
	scratch := filepath.Join(dir, "scratch")
	t.Cleanup(func() {
		// Only if the test failed half-way.
		for _, mp := range []string{filepath.Join(shared, "c", "rootfs"), scratch, shared} {
			_ = unix.Unmount(mp, unix.MNT_DETACH)
		}
	})
	if _, err := a.CreateSandbox(ctx, &agentproto.CreateSandboxRequest{
		SandboxId: "sb",
		Storages: []*agentproto.Storage{
			{Driver: "tmpfs", MountPoint: shared, Options: []string{"size=16m", "mode=0755"}},
			{Driver: "tmpfs", MountPoint: scratch, Options: []string{"ro", "nosuid"}},
		},
	}); err != nil {
		t.Fatalf("CreateSandbox: %v", err)
	}
	for mp, wantOpt := range map[string]string{shared: "rw", scratch: "ro"} {
		m, err := mountinfo.GetMounts(mountinfo.SingleEntryFilter(mp))
		if err != nil || len(m) != 1 || m[0].FSType != "tmpfs" || !strings.Contains(m[0].Options, wantOpt) {
			t.Fatalf("%s: mounts %+v, %v; want one %s tmpfs", mp, m, err, wantOpt)
		}
	}
	if _, err := a.CreateSandbox(ctx, &agentproto.CreateSandboxRequest{}); status.Code(err) != codes.AlreadyExists {
		t.Errorf("second CreateSandbox = %v, want AlreadyExists", err)
	}

	// The container's rootfs is a read-only bind mount of the busybox tree
	// into the shared tmpfs, as the shim's rootfs share would be.
	rootfs := filepath.Join(shared, "c", "rootfs")
	spec := newSpec(rootfs, "c", "sh", "-c", "echo x 2>/dev/null > /x || echo read-only; cat /etc/hello")
	src := makeRootfs(t)
	if err := os.WriteFile(filepath.Join(src, "etc", "hello"), []byte("hi\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	a.createContainer(t, "c", spec, &agentproto.CreateContainerRequest{
		Stdout:   true,
		Storages: []*agentproto.Storage{{Driver: "bind", Source: src, MountPoint: rootfs, Options: []string{"ro"}}},
	})
	if _, err := a.StartContainer(ctx, &agentproto.StartContainerRequest{ContainerId: "c"}); err != nil {
		t.Fatalf("StartContainer: %v", err)
	}
	if got := a.collect(t, "c", "", true, false); got.stdout != "read-only\nhi\n" || got.status != 0 {
		t.Errorf("container on a bind storage: %+v", got)
	}
	a.remove(t, "c")
	if mounted, err := mountinfo.Mounted(rootfs); err != nil || mounted {
		t.Errorf("container storage %s still mounted (%v)", rootfs, err)
	}

	if _, err := a.DestroySandbox(ctx, &agentproto.DestroySandboxRequest{}); err != nil {
		t.Fatalf("DestroySandbox: %v", err)
	}
	for _, mp := range []string{shared, scratch} {
		if mounted, err := mountinfo.Mounted(mp); err != nil || mounted {
			t.Errorf("sandbox storage %s still mounted (%v)", mp, err)
		}
	}
}

// oomScoreAdj reads a process's oom_score_adj.
func oomScoreAdj(t *testing.T, pid int) string {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/oom_score_adj", pid))
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(b))
}

// TestOOMScoreAdj: the service runs at -1000, so that an OOM kills a
// container rather than the agent, and its containers do not inherit
// that: their init (waiting for start, then running) and their execs get
// the spec's oomScoreAdj, or 0 without one.
func TestOOMScoreAdj(t *testing.T) {
	ctx := context.Background()
	a := startAgent(t)
	agentAdj := "-1000"
	if !hasCapability(t, unix.CAP_SYS_RESOURCE) {
		// Root here may lack CAP_SYS_RESOURCE (a container), and then
		// cannot lower oom_score_adj. Raised instead, the agent's value
		// still shows if the containers inherit it.
		t.Log("no CAP_SYS_RESOURCE: the agent cannot take -1000; checking with 300")
		agentAdj = "300"
		if err := os.WriteFile(fmt.Sprintf("/proc/%d/oom_score_adj", a.pid), []byte(agentAdj), 0); err != nil {
			t.Fatal(err)
		}
	}
	if got := oomScoreAdj(t, a.pid); got != agentAdj {
		t.Errorf("agent service oom_score_adj %s, want %s", got, agentAdj)
	}
	rootfs := makeRootfs(t)
	for _, tt := range []struct {
		name string
		adj  *int
		want string
	}{
		{"unset", nil, "0"},
		{"from spec", func() *int { i := 500; return &i }(), "500"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			id := "oom-" + strings.ReplaceAll(tt.name, " ", "-")
			spec := newSpec(rootfs, id, "sh", "-c", "cat /proc/self/oom_score_adj; exec sleep 1000")
			spec.Process.OOMScoreAdj = tt.adj
			a.createContainer(t, id, spec, &agentproto.CreateContainerRequest{Stdout: true})
			ps, err := a.ListProcesses(ctx, &agentproto.ListProcessesRequest{ContainerId: id})
			if err != nil || len(ps.Processes) != 1 {
				t.Fatalf("ListProcesses = %v, %v; want the init", ps, err)
			}
			if got := oomScoreAdj(t, int(ps.Processes[0].Pid)); got != tt.want {
				t.Errorf("created init's oom_score_adj %s, want %s", got, tt.want)
			}
			if _, err := a.StartContainer(ctx, &agentproto.StartContainerRequest{ContainerId: id}); err != nil {
				t.Fatalf("StartContainer: %v", err)
			}
			out, err := a.ReadStdout(ctx, &agentproto.ReadStreamRequest{ContainerId: id, Len: 100})
			if err != nil || strings.TrimSpace(string(out.Data)) != tt.want {
				t.Errorf("container's oom_score_adj %q (%v), want %s", out.GetData(), err, tt.want)
			}
			b, err := json.Marshal(specs.Process{Args: []string{"cat", "/proc/self/oom_score_adj"}, Env: []string{"PATH=/bin"}, Cwd: "/"})
			if err != nil {
				t.Fatal(err)
			}
			if _, err := a.ExecProcess(ctx, &agentproto.ExecProcessRequest{ContainerId: id, ExecId: "adj", Process: b, Stdout: true}); err != nil {
				t.Fatalf("ExecProcess: %v", err)
			}
			if got := a.collect(t, id, "adj", true, false); got.status != 0 || strings.TrimSpace(got.stdout) != tt.want {
				t.Errorf("exec: %+v, want oom_score_adj %s", got, tt.want)
			}
			a.remove(t, id)
		})
	}
	if got := oomScoreAdj(t, a.pid); got != agentAdj {
		t.Errorf("agent service oom_score_adj %s after the containers, want %s", got, agentAdj)
	}
}

// hasCapability reports whether the test has capability c in its
// effective set.
func hasCapability(t *testing.T, c int) bool {
	t.Helper()
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "CapEff:"); ok {
			eff, err := strconv.ParseUint(strings.TrimSpace(v), 16, 64)
			if err != nil {
				t.Fatal(err)
			}
			return eff&(1<<c) != 0
		}
	}
	t.Fatal("no CapEff in /proc/self/status")
	return false
}
