package qemu

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/containerd/errdefs"

	"github.com/colo-runtime/colo/config"
	"github.com/colo-runtime/colo/hypervisor"
)

// TestConsoleArgs: the console is a port of its own on the agent's
// virtio-serial controller, or on a controller of its own without one; its
// socket is in the VM directory; nothing changes without it.
func TestConsoleArgs(t *testing.T) {
	vm := hypervisor.VMConfig{ID: "pod", Dir: "/run/vm,x", VCPUs: 1, MemoryMB: 256, Kernel: "/k", Initrd: "/i"}
	port := "virtserialport,bus=%s,chardev=console,name=console.0,id=consoleport"
	chardev := []string{"-chardev", "socket,id=console,path=/run/vm,,x/debug.sock,server=on,wait=off"}
	for _, tc := range []struct {
		name    string
		machine string
		channel hypervisor.AgentChannel
		want    []string
	}{
		{"q35 serial", "q35", hypervisor.ChannelSerial, append(chardev, "-device", strings.Replace(port, "%s", "vser0.0", 1))},
		{"q35 vsock", "q35", hypervisor.ChannelVsock, slices.Concat([]string{"-device", "virtio-serial-pci,id=vsercons"}, chardev, []string{"-device", strings.Replace(port, "%s", "vsercons.0", 1)})},
		{"microvm vsock", "microvm", hypervisor.ChannelVsock, slices.Concat([]string{"-device", "virtio-serial-device,id=vsercons"}, chardev, []string{"-device", strings.Replace(port, "%s", "vsercons.0", 1)})},
	} {
		l := launch{machine: tc.machine, accel: accelTCG, vm: vm, pidfile: "/run/vm/qemu.pid", qmpFD: 3, agentFD: 4, vhostFD: 4, cid: 9}
		l.vm.Channel = tc.channel
		without := l.args()
		if slices.ContainsFunc(without, func(a string) bool {
			return strings.Contains(a, ConsoleSocket) || strings.Contains(a, testConsolePort.Serial)
		}) {
			t.Errorf("%s: a console without DebugConsole: %q", tc.name, without)
		}
		l.vm.DebugConsole = testConsolePort
		with := l.args()
		// The console's arguments come right after the agent
		// channel's, and are all that changes.
		i := slices.Index(with, tc.want[0])
		for i >= 0 && !slices.Equal(with[i:min(i+len(tc.want), len(with))], tc.want) {
			j := slices.Index(with[i+1:], tc.want[0])
			if j < 0 {
				i = -1
				break
			}
			i += 1 + j
		}
		if i < 0 {
			t.Errorf("%s: no %q in %q", tc.name, tc.want, with)
			continue
		}
		rest := slices.Concat(with[:i], with[i+len(tc.want):])
		for k := range rest {
			if rest[k] != without[k] {
				t.Errorf("%s: argument %d: %q, without the console %q", tc.name, k, rest[k], without[k])
			}
		}
	}
	if len(ConsoleSocket) > len(AgentSocket) {
		t.Errorf("%s is longer than %s: a VM directory Start accepts may not fit it", ConsoleSocket, AgentSocket)
	}
}

// TestConsoleTemplateKey: VMs with and without the console come from
// templates of their own (a clone has its template's devices).
func TestConsoleTemplateKey(t *testing.T) {
	dir := t.TempDir()
	files := map[string]string{}
	for _, f := range []string{"qemu", "vmlinux", "initrd.img"} {
		files[f] = filepath.Join(dir, f)
		if err := os.WriteFile(files[f], []byte(f), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	d := &Driver{path: files["qemu"], machine: "q35", accel: accelTCG}
	cfg := hypervisor.VMConfig{ID: "a", Dir: "/run/a", VCPUs: 1, MemoryMB: 256, Kernel: files["vmlinux"], Initrd: files["initrd.img"], Channel: hypervisor.ChannelSerial, AgentPort: testAgentPort, TemplateDir: dir}
	off, err := d.templateKey(cfg)
	if err != nil {
		t.Fatal(err)
	}
	cfg.DebugConsole = testConsolePort
	on, err := d.templateKey(cfg)
	if err != nil {
		t.Fatal(err)
	}
	other := cfg
	other.ID, other.Dir = "b", "/run/b"
	again, _ := d.templateKey(other)
	if on == off || on != again {
		t.Errorf("template keys: without the console %s, with it %s, another VM with it %s: want two keys", off, on, again)
	}
}

// consoleGuest is the real guest image (colo-agent as /init, busybox) from
// $COLO_TEST_GUEST: the test guest of this package has no console.
func consoleGuest(t *testing.T) *Driver {
	t.Helper()
	dir := os.Getenv("COLO_TEST_GUEST")
	if dir == "" {
		t.Skip("set COLO_TEST_GUEST to the guest image's directory (make guest) to boot the real agent")
	}
	cfg := config.Default().Hypervisor
	cfg.Machine = "q35"
	cfg.Kernel, cfg.Initrd = filepath.Join(dir, "vmlinux"), filepath.Join(dir, "initrd.img")
	d, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return d
}

// shellSays sends a line to the console's shell and waits (bounded) for
// output matching re; quotes in the line keep its echo from matching.
// shellReady waits for the new shell to speak (its banner): what a client
// types before may still reach the last session's shell, which is ending
// (the guest may not see a client leave before the next one types).
func shellReady(t *testing.T, ctx context.Context, conn net.Conn, r *bufio.Reader) {
	t.Helper()
	stop := context.AfterFunc(ctx, func() { conn.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	if _, err := r.Peek(1); err != nil {
		t.Fatalf("console: the shell did not speak: %v", err)
	}
}

func shellSays(t *testing.T, ctx context.Context, conn net.Conn, r *bufio.Reader, line, re string) string {
	t.Helper()
	if _, err := conn.Write([]byte(line + "\n")); err != nil {
		t.Fatal(err)
	}
	stop := context.AfterFunc(ctx, func() { conn.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	rx := regexp.MustCompile(re)
	var out []byte
	for {
		b, err := r.ReadByte()
		if err != nil {
			t.Fatalf("console: after %q: %v", out, err)
		}
		out = append(out, b)
		if m := rx.FindSubmatch(out); m != nil {
			return string(m[len(m)-1])
		}
	}
}

// TestDebugConsole boots the real agent with a console, restored from a
// template: the console is a root shell in the guest's namespaces (PID 1
// is the agent); one client at a time, a new shell for each; a VM without
// the console says so, from a template of its own; the socket goes with
// the VM.
func TestDebugConsole(t *testing.T) {
	d := consoleGuest(t)
	ctx, logs := testContext(t)
	ctx, cancel := context.WithTimeout(ctx, 3*time.Minute)
	defer cancel()
	templates := templateDir(t)

	dir := vmDir(t)
	vm, err := d.Start(ctx, hypervisor.VMConfig{ID: "console", Dir: dir, Channel: hypervisor.ChannelSerial, AgentPort: testAgentPort, DebugConsole: testConsolePort, KernelParams: []string{"colo.debug_console=on"}, TemplateDir: templates})
	if err != nil {
		t.Fatal(err)
	}
	defer vm.Stop(ctx)
	conn, err := vm.DialConsole(ctx)
	if err != nil {
		t.Fatal(err)
	}
	r := bufio.NewReader(conn)
	if got := shellSays(t, ctx, conn, r, "echo comm=$(cat /proc/1/comm)''; id -u", `comm=(\S+)\r\n`); got != "init" {
		t.Errorf("PID 1 is %q, want init (colo-agent)", got)
	}
	if got := shellSays(t, ctx, conn, r, "echo ns=$(readlink /proc/1/ns/pid)-$(readlink /proc/$$/ns/pid)''", `ns=(\S+)\r\n`); !regexp.MustCompile(`^(pid:\[\d+\])-(pid:\[\d+\])$`).MatchString(got) || strings.Split(got, "-")[0] != strings.Split(got, "-")[1] {
		t.Errorf("PID namespaces of PID 1 and of the shell: %q, want the same", got)
	}
	// One client at a time.
	if _, err := vm.DialConsole(ctx); !errdefs.IsConflict(err) {
		t.Errorf("a second client: %v, want a conflict", err)
	}
	shellSays(t, ctx, conn, r, "echo pid=$$''", `pid=(\d+)\r\n`)
	conn.Close()

	// Clients one right after the other, each with a shell of its own.
	for i := range 5 {
		conn, err = vm.DialConsole(ctx)
		if err != nil {
			t.Fatal(err)
		}
		r = bufio.NewReader(conn)
		shellReady(t, ctx, conn, r)
		want := fmt.Sprintf("n%d", i)
		if got := shellSays(t, ctx, conn, r, "echo n''"+want[1:], `(n\d+)\r\n`); got != want {
			t.Errorf("client %d: %q, want %q", i, got, want)
		}
		conn.Close()
	}

	// The next client gets a new shell (the old one was killed when
	// the first went away).
	conn, err = vm.DialConsole(ctx)
	if err != nil {
		t.Fatal(err)
	}
	r = bufio.NewReader(conn)
	shellReady(t, ctx, conn, r)
	if got := shellSays(t, ctx, conn, r, "exit 4", `\[colo-agent: the shell exited with status (\d+)\]`); got != "4" {
		t.Errorf("exit status %s, want 4", got)
	}
	conn.Close()

	// Without the console: an error saying so, and another template.
	dir2 := vmDir(t)
	vm2, err := d.Start(ctx, hypervisor.VMConfig{ID: "noconsole", Dir: dir2, Channel: hypervisor.ChannelSerial, AgentPort: testAgentPort, TemplateDir: templates})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := vm2.DialConsole(ctx); !errors.Is(err, hypervisor.ErrNoConsole) {
		t.Errorf("DialConsole without the console: %v, want ErrNoConsole", err)
	}
	if _, err := os.Lstat(filepath.Join(dir2, ConsoleSocket)); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("%s without the console: %v", ConsoleSocket, err)
	}
	stopped(t, vm2, dir2)
	if n := strings.Count(logs.String(), "qemu: template made"); n != 2 {
		t.Errorf("%d templates made, want 2: one with the console, one without", n)
	}

	stopped(t, vm, dir)
	if _, err := os.Lstat(filepath.Join(dir, ConsoleSocket)); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("%s after Stop: %v", ConsoleSocket, err)
	}
	if _, err := vm.DialConsole(ctx); err == nil {
		t.Error("DialConsole after Stop: no error")
	}
}
