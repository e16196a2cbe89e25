package storage

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/colo-runtime/colo/internal/procfs"
)

const virtiofsdBinary = "/usr/lib/qemu/virtiofsd"

func requireVirtiofsd(t *testing.T) {
	t.Helper()
	requireRoot(t)
	if _, err := os.Stat(virtiofsdBinary); err != nil {
		t.Skipf("no virtiofsd: %v", err)
	}
}

// startVirtiofsd starts virtiofsd on a fresh shared dir and checks at the
// end of the test that nothing of it is left.
func startVirtiofsd(t *testing.T) (*Virtiofsd, VirtiofsdConfig, *share) {
	t.Helper()
	sh := newShare(t)
	cfg := VirtiofsdConfig{
		Binary:     virtiofsdBinary,
		SocketPath: filepath.Join(sh.dir, "virtiofsd.sock"),
		SharedDir:  filepath.Join(sh.dir, ShareView),
	}
	v, err := StartVirtiofsd(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = v.Stop(context.Background())
		assertVirtiofsdGone(t, v.Pid(), cfg.SocketPath)
	})
	return v, cfg, sh
}

func assertVirtiofsdGone(t *testing.T, pid int, socket string) {
	t.Helper()
	if p := procfs.Of(pid); !p.Gone() {
		t.Errorf("virtiofsd %d still running", pid)
	}
	for _, f := range []string{socket, virtiofsdPidFile(socket)} {
		if _, err := os.Stat(f); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s left behind (%v)", f, err)
		}
	}
}

func TestVirtiofsdStartStop(t *testing.T) {
	requireVirtiofsd(t)
	v, cfg, _ := startVirtiofsd(t)

	if ok, err := unixListening(cfg.SocketPath); !ok || err != nil {
		t.Fatalf("socket not listening after start: %v %v", ok, err)
	}
	if !cmdlineHas(v.Pid(), "--socket-path="+cfg.SocketPath) {
		t.Fatalf("pid %d is not our virtiofsd", v.Pid())
	}
	if err := v.Err(); err != nil {
		t.Fatalf("Err before exit = %v", err)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := v.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	select {
	case <-v.Done():
	default:
		t.Fatal("Done not closed after Stop")
	}
	assertVirtiofsdGone(t, v.Pid(), cfg.SocketPath)
	// A second Stop is harmless.
	if err := v.Stop(ctx); err != nil {
		t.Fatal(err)
	}
}

func TestVirtiofsdStartFailure(t *testing.T) {
	requireVirtiofsd(t)
	dir := tempDir(t)
	cfg := VirtiofsdConfig{
		Binary:     virtiofsdBinary,
		SocketPath: filepath.Join(dir, "virtiofsd.sock"),
		SharedDir:  filepath.Join(dir, "does-not-exist"),
	}
	v, err := StartVirtiofsd(context.Background(), cfg)
	if err == nil {
		_ = v.Stop(context.Background())
		t.Fatal("StartVirtiofsd succeeded on a missing directory")
	}
	t.Log(err)
	if _, err := os.Stat(cfg.SocketPath); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("socket left behind: %v", err)
	}
	if _, err := os.Stat(virtiofsdPidFile(cfg.SocketPath)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("pid file left behind: %v", err)
	}

	cfg.Binary = filepath.Join(dir, "no-such-virtiofsd")
	if _, err := StartVirtiofsd(context.Background(), cfg); err == nil {
		t.Fatal("StartVirtiofsd succeeded with a missing binary")
	}
}

// TestVirtiofsdConnected has QEMU connect to virtiofsd, which then forks its
// namespace sandbox. Mounts made below the shared dir afterwards must reach
// that sandbox, and Stop must take the forked child down too.
func TestVirtiofsdConnected(t *testing.T) {
	requireVirtiofsd(t)
	qemu, err := exec.LookPath("qemu-system-x86_64")
	if err != nil {
		t.Skip("no qemu-system-x86_64")
	}
	v, cfg, sh := startVirtiofsd(t)

	vm := exec.Command(qemu,
		"-machine", "q35,accel=tcg", "-m", "64M", "-S",
		"-object", "memory-backend-memfd,id=mem,size=64M,share=on", "-numa", "node,memdev=mem",
		"-chardev", "socket,id=vfs,path="+cfg.SocketPath,
		"-device", "vhost-user-fs-pci,chardev=vfs,tag=test",
		"-nodefaults", "-display", "none", "-nographic")
	if err := vm.Start(); err != nil {
		t.Fatal(err)
	}
	vmDone := make(chan error, 1)
	go func() { vmDone <- vm.Wait() }()
	t.Cleanup(func() {
		_ = vm.Process.Kill()
		<-vmDone
	})

	var children []procfs.Proc
	deadline := time.Now().Add(30 * time.Second)
	for len(children) == 0 {
		if time.Now().After(deadline) {
			t.Fatal("virtiofsd did not fork its sandbox after QEMU connected")
		}
		select {
		case err := <-vmDone:
			t.Fatalf("qemu exited: %v", err)
		case <-time.After(10 * time.Millisecond):
		}
		children = groupMembers(v.Pid(), "--socket-path="+cfg.SocketPath)
	}
	child := children[0]

	// Mount something in the host-only tree now, as a container's rootfs
	// is, and look for it from inside virtiofsd's mount namespace (rooted
	// at the view): it must arrive, read-only flags and all.
	sh.mountTmpfs(t, ShareMounts+"/c1/rootfs")
	lower := filepath.Join(tempDir(t), "lower")
	if err := os.MkdirAll(lower, 0o755); err != nil {
		t.Fatal(err)
	}
	roRel := ShareMounts + "/c1/mounts/ro"
	_ = sh.record(roRel)
	if err := BindMount(lower, sh.dir, roRel, false, ReadOnly); err != nil {
		t.Fatal(err)
	}
	mi, err := os.ReadFile(fmt.Sprintf("/proc/%d/mountinfo", child.Pid))
	if err != nil {
		t.Fatal(err)
	}
	var rootfs, ro string
	for _, line := range strings.Split(string(mi), "\n") {
		f := strings.Fields(line)
		if len(f) < 6 {
			continue
		}
		switch {
		case strings.HasSuffix(f[4], "/c1/rootfs"):
			rootfs = f[5]
		case strings.HasSuffix(f[4], "/c1/mounts/ro"):
			ro = f[5]
		}
	}
	if !strings.HasPrefix(rootfs, "rw") {
		t.Errorf("rootfs mount in virtiofsd's namespace: options %q, want rw:\n%s", rootfs, mi)
	}
	if !strings.HasPrefix(ro, "ro") {
		t.Errorf("read-only volume in virtiofsd's namespace: options %q, want ro:\n%s", ro, mi)
	}
	sh.undo(t)

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := v.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	if !child.Gone() {
		t.Errorf("virtiofsd's sandbox child %d still running", child.Pid)
	}
	assertVirtiofsdGone(t, v.Pid(), cfg.SocketPath)
}

// TestMain lets the test binary stand in for a virtiofsd that misbehaves
// the way the real one can: it forks a child that keeps stderr open and
// ignores SIGTERM, and then (as the parent) dies on SIGTERM.
func TestMain(m *testing.M) {
	switch os.Getenv(fakeVirtiofsdEnv) {
	case "parent":
		fakeVirtiofsdParent()
	case "child":
		signal.Ignore(unix.SIGTERM)
		fmt.Fprintln(os.Stderr, "child holding stderr")
		time.Sleep(2 * time.Minute)
		os.Exit(0)
	}
	os.Exit(m.Run())
}

const fakeVirtiofsdEnv = "COLO_TEST_FAKE_VIRTIOFSD"

func fakeVirtiofsdParent() {
	var socket string
	for _, a := range os.Args[1:] {
		if s, ok := strings.CutPrefix(a, "--socket-path="); ok {
			socket = s
		}
	}
	l, err := net.Listen("unix", socket)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	defer l.Close()
	// Written before the child exists, so that a Stop the test makes once
	// it sees the child always finds it (a SIGTERM could otherwise come
	// first on a loaded machine).
	fmt.Fprintln(os.Stderr, "parent listening")
	// The child keeps the parent's command line, as a fork would.
	child := exec.Command(os.Args[0], os.Args[1:]...)
	child.Env = append(os.Environ(), fakeVirtiofsdEnv+"=child")
	child.Stderr = os.Stderr
	if err := child.Start(); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	time.Sleep(2 * time.Minute)
	os.Exit(0)
}

// TestVirtiofsdStopOrphanHoldsStderr is the hang that Stop once had: the
// parent exits on SIGTERM, but a child it forked keeps stderr open and
// ignores SIGTERM. Stop must kill the child rather than wait for EOF.
func TestVirtiofsdStopOrphanHoldsStderr(t *testing.T) {
	requireRoot(t)
	dir := t.TempDir()
	t.Setenv(fakeVirtiofsdEnv, "parent")
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cfg := VirtiofsdConfig{
		Binary:     exe,
		SocketPath: filepath.Join(dir, "virtiofsd.sock"),
		SharedDir:  dir,
	}
	v, err := StartVirtiofsd(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	children := forkedChildren(t, v.Pid(), cfg.SocketPath)

	stopped := make(chan error, 1)
	go func() { stopped <- v.Stop(context.Background()) }()
	select {
	case err := <-stopped:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(virtiofsdStopGrace + killWait + time.Minute):
		_ = killAll(append(children, v.self))
		t.Fatal("Stop did not return")
	}
	for _, c := range children {
		if !c.Gone() {
			t.Errorf("forked child %d still running after Stop", c.Pid)
		}
	}
	assertVirtiofsdGone(t, v.Pid(), cfg.SocketPath)
	if !strings.Contains(v.Err().Error(), "parent listening") {
		t.Errorf("Err() = %v, want the parent's last output", v.Err())
	}
}

// TestCleanupVirtiofsdOrphan: a crashed shim's virtiofsd whose parent is
// gone already leaves its forked child; cleanup finds it by process group.
func TestCleanupVirtiofsdOrphan(t *testing.T) {
	requireRoot(t)
	dir := t.TempDir()
	socket := filepath.Join(dir, "virtiofsd.sock")
	cmd, children := startFakeVirtiofsd(t, socket, dir)
	t.Cleanup(func() { _ = killAll(children) })
	_ = cmd.Process.Kill()
	_ = cmd.Wait()

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := CleanupVirtiofsd(ctx, cmd.Process.Pid, socket); err != nil {
		t.Fatal(err)
	}
	for _, c := range children {
		if !c.Gone() {
			t.Errorf("orphaned child %d still running after CleanupVirtiofsd", c.Pid)
		}
	}
	if _, err := os.Stat(socket); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("socket left behind: %v", err)
	}
}

// TestCleanupVirtiofsdUnrecorded: the shim died after starting virtiofsd
// but before recording its pid, and virtiofsd keeps no pid file: cleanup
// finds it and its forked child by the socket in their command line.
func TestCleanupVirtiofsdUnrecorded(t *testing.T) {
	requireRoot(t)
	dir := t.TempDir()
	socket := filepath.Join(dir, "virtiofsd.sock")
	cmd, children := startFakeVirtiofsd(t, socket, dir)
	parent := procfs.Of(cmd.Process.Pid)
	t.Cleanup(func() {
		_ = killAll(append(children, parent))
		_ = cmd.Wait()
	})

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := CleanupVirtiofsd(ctx, 0, socket); err != nil {
		t.Fatal(err)
	}
	for _, p := range append(children, parent) {
		if !p.Gone() {
			t.Errorf("virtiofsd process %d still running after CleanupVirtiofsd", p.Pid)
		}
	}
	if _, err := os.Stat(socket); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("socket left behind: %v", err)
	}
}

func TestCleanupVirtiofsd(t *testing.T) {
	requireVirtiofsd(t)
	dir := tempDir(t)
	shared := filepath.Join(dir, "shared")
	if err := os.Mkdir(shared, 0o700); err != nil {
		t.Fatal(err)
	}
	socket := filepath.Join(dir, "virtiofsd.sock")

	// A virtiofsd whose shim died: started outside of Virtiofsd.
	cmd := exec.Command(virtiofsdBinary, VirtiofsdConfig{SocketPath: socket, SharedDir: shared}.args()...)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-done
		_ = removeVirtiofsdFiles(socket)
	})
	for {
		ok, err := unixListening(socket)
		if err != nil {
			t.Fatal(err)
		}
		if ok {
			break
		}
		time.Sleep(5 * time.Millisecond)
	}

	// An unrelated process with a pid we might have recorded: the guard
	// must leave it alone.
	other := exec.Command("sleep", "60")
	if err := other.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = other.Process.Kill(); _ = other.Wait() }()
	if err := CleanupVirtiofsd(context.Background(), other.Process.Pid, filepath.Join(dir, "other.sock")); err != nil {
		t.Fatal(err)
	}
	if procfs.Of(other.Process.Pid).Gone() {
		t.Fatal("CleanupVirtiofsd killed a process that is not virtiofsd")
	}

	// Found by the recorded pid, and again (pid 0) through virtiofsd's
	// own pid file.
	for _, pid := range []int{cmd.Process.Pid, 0} {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		err := CleanupVirtiofsd(ctx, pid, socket)
		cancel()
		if err != nil {
			t.Fatal(err)
		}
	}
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("virtiofsd still running after CleanupVirtiofsd")
	}
	assertVirtiofsdGone(t, cmd.Process.Pid, socket)
}

// forkedChildren waits, at most a minute, for the process group of pid to
// have members other than pid whose command line names socket.
func forkedChildren(t *testing.T, pid int, socket string) []procfs.Proc {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for {
		if children := groupMembers(pid, "--socket-path="+socket); len(children) > 0 {
			return children
		}
		if time.Now().After(deadline) {
			t.Fatalf("process %d forked no child", pid)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// startFakeVirtiofsd starts the test binary as a virtiofsd that forks a
// child keeping its stderr (TestMain), as a crashed shim would have left
// it, and returns it once the child runs.
func startFakeVirtiofsd(t *testing.T, socket, dir string) (*exec.Cmd, []procfs.Proc) {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(exe, VirtiofsdConfig{SocketPath: socket, SharedDir: dir}.args()...)
	cmd.Env = append(os.Environ(), fakeVirtiofsdEnv+"=parent")
	cmd.SysProcAttr = &unix.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	return cmd, forkedChildren(t, cmd.Process.Pid, socket)
}
