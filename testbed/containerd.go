// Package testbed runs colo the way users do, for tests, the demo and
// benchmarks: a private containerd whose every file lives under one
// temporary directory, local OCI images, ctr, and the leak check.
package testbed

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/colo-runtime/colo/hypervisor/driver"
)

// Runtime is colo's containerd runtime type.
const Runtime = "io.containerd.colo.v2"

// BlockfileSnapshotter is containerd's snapshotter whose snapshots are ext4
// image files, mounted with "loop": colo attaches such a rootfs to the VM
// as a disk (storage.block_rootfs). The images are unpacked for it too.
const BlockfileSnapshotter = "blockfile"

// blockfileScratchMB is the default size of the blockfile snapshotter's
// scratch image, and so of every snapshot (each a full copy): room for
// the test images and what tests write.
const blockfileScratchMB = 64

// Containerd is a private containerd daemon.
type Containerd struct {
	// Dir holds everything: containerd's root and state, its sockets, the
	// colo state dir and config, and the log.
	Dir string
	// Address is the gRPC socket.
	Address   string
	Namespace string
	// StateDir is colo's runtime.state_dir for this containerd.
	StateDir string
	// ColoConfig is the colo config file given to the shims by COLO_CONFIG.
	ColoConfig string
	// LogPath is containerd's log, shims' logs included.
	LogPath string
	// CRI is the CRI side of the test bed, nil unless Options.CRI.
	CRI *CRI

	env      []string
	cmd      *exec.Cmd
	waitExit <-chan error
	log      *os.File
}

// Options configure Start.
type Options struct {
	// ColoConfig is TOML appended to the generated colo config, which
	// already sets runtime.state_dir (so it must not set [runtime]).
	ColoConfig string
	// Namespace defaults to "colo-test".
	Namespace string
	// CRI enables containerd's CRI plugins, with the runtime handlers
	// "runc" (the default), "colo" and "colo-shim" (ColoShimHandler), a
	// CNI bridge network, and the pause and busybox images in
	// CRINamespace (see CRI).
	CRI bool
	// BlockfileMB is the size of every blockfile snapshot, in MiB
	// (default blockfileScratchMB); each costs that much disk.
	BlockfileMB int
}

// Start starts a private containerd. The binaries come from the repo's
// build/bin and build/tools (see the Makefile), then PATH.
func Start(ctx context.Context, opts Options) (*Containerd, error) {
	root, err := RepoRoot()
	if err != nil {
		return nil, err
	}
	// Short paths: unix socket paths below Dir must fit in 107 bytes.
	dir, err := os.MkdirTemp("", "colo-")
	if err != nil {
		return nil, err
	}
	c := &Containerd{
		Dir:       dir,
		Address:   filepath.Join(dir, "c.sock"),
		Namespace: opts.Namespace,
		StateDir:  filepath.Join(dir, "colo"),
		LogPath:   filepath.Join(dir, "containerd.log"),
	}
	if c.Namespace == "" {
		c.Namespace = "colo-test"
	}
	ok := false
	defer func() {
		if !ok {
			c.Stop()
		}
	}()
	if c.ColoConfig, err = c.WriteColoConfig("colo", opts.ColoConfig); err != nil {
		return nil, err
	}
	scratch := filepath.Join(dir, "blockfile-scratch.ext4")
	scratchMB := opts.BlockfileMB
	if scratchMB == 0 {
		scratchMB = blockfileScratchMB
	}
	if err := MakeExt4Image(ctx, scratch, scratchMB, ""); err != nil {
		return nil, err
	}
	config := containerdConfig(dir, c.Address, scratch, opts.CRI)
	if opts.CRI {
		if c.CRI, err = newCRI(dir, c.Address); err != nil {
			return nil, err
		}
		config += c.CRI.containerdConfig(c.ColoConfig)
	}
	cfg := filepath.Join(dir, "containerd.toml")
	if err := os.WriteFile(cfg, []byte(config), 0o644); err != nil {
		return nil, err
	}
	c.env = append(os.Environ(),
		"PATH="+filepath.Join(root, "build", "bin")+":"+filepath.Join(root, "build", "tools")+":"+os.Getenv("PATH"),
		"COLO_CONFIG="+c.ColoConfig,
	)
	bin, err := c.lookPath("containerd")
	if err != nil {
		return nil, err
	}
	if c.log, err = os.Create(c.LogPath); err != nil {
		return nil, err
	}
	c.cmd = exec.Command(bin, "--config", cfg)
	c.cmd.Env = c.env
	c.cmd.Stdout, c.cmd.Stderr = c.log, c.log
	// Its own process group, so a test's Ctrl-C reaches it only through Stop.
	c.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := c.cmd.Start(); err != nil {
		return nil, fmt.Errorf("start containerd: %w", err)
	}
	exited := make(chan error, 1)
	go func() { exited <- c.cmd.Wait() }()
	for {
		if conn, err := net.Dial("unix", c.Address); err == nil {
			conn.Close()
			break
		}
		select {
		case err := <-exited:
			c.cmd = nil
			c.log.Close()
			return nil, fmt.Errorf("containerd exited (%v): %s", err, Tail(c.Logs(), 20))
		case <-ctx.Done():
			return nil, fmt.Errorf("containerd did not listen on %s: %w", c.Address, ctx.Err())
		case <-time.After(20 * time.Millisecond):
		}
	}
	c.waitExit = exited
	if c.CRI != nil {
		if err := c.startCRI(ctx); err != nil {
			return nil, err
		}
	}
	ok = true
	return c, nil
}

// criPlugins are containerd's plugins for CRI, disabled unless asked for.
const criPlugins = `
  "io.containerd.grpc.v1.cri",
  "io.containerd.cri.v1.images",
  "io.containerd.cri.v1.runtime",
  "io.containerd.podsandbox.controller.v1.podsandbox",
  "io.containerd.sandbox.controller.v1.shim",`

func containerdConfig(dir, address, blockfileScratch string, cri bool) string {
	disabledCRI := criPlugins
	if cri {
		disabledCRI = ""
	}
	return fmt.Sprintf(`version = 3
root = %[1]q
state = %[2]q
imports = []
disabled_plugins = [
  "io.containerd.nri.v1.nri",%[7]s
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.erofs",
  "io.containerd.tracing.processor.v1.otlp",
  "io.containerd.internal.v1.tracing",
]

[grpc]
  address = %[3]q

[ttrpc]
  address = %[4]q

[debug]
  address = %[5]q
  level = "debug"

[plugins."io.containerd.internal.v1.opt"]
  path = %[6]q

[plugins."io.containerd.snapshotter.v1.blockfile"]
  scratch_file = %[8]q
  fs_type = "ext4"
`, filepath.Join(dir, "root"), filepath.Join(dir, "state"), address, address+".ttrpc",
		filepath.Join(dir, "debug.sock"), filepath.Join(dir, "opt"), disabledCRI, blockfileScratch)
}

// MakeExt4Image makes a sparse image file of sizeMB MiB at path holding an
// empty ext4 filesystem, or with the files of dir if it is not "".
func MakeExt4Image(ctx context.Context, path string, sizeMB int, dir string) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return err
	}
	err = f.Truncate(int64(sizeMB) << 20)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(path)
		return err
	}
	// Lazy init keeps the image sparse; -F: it is a file, not a device.
	args := []string{"-q", "-F", "-E", "lazy_itable_init=1,lazy_journal_init=1"}
	if dir != "" {
		args = append(args, "-d", dir)
	}
	if out, err := exec.CommandContext(ctx, "mkfs.ext4", append(args, path)...).CombinedOutput(); err != nil {
		os.Remove(path)
		return fmt.Errorf("mkfs.ext4 %s (e2fsprogs): %w: %s", path, err, out)
	}
	return nil
}

// Stop stops containerd and removes Dir. Shims it started are not its
// children and are left to the leak check. With CRI it also removes what
// the CRI plugin and CNI leave outside Dir (see CRI).
func (c *Containerd) Stop() error {
	var errs []error
	if c.cmd != nil && c.cmd.Process != nil {
		_ = syscall.Kill(c.cmd.Process.Pid, syscall.SIGTERM)
		select {
		case <-c.waitExit:
		case <-time.After(10 * time.Second):
			_ = syscall.Kill(c.cmd.Process.Pid, syscall.SIGKILL)
			<-c.waitExit
		}
		c.cmd = nil
	}
	if c.log != nil {
		c.log.Close()
	}
	// runc containers leave their namespace's parent cgroup behind, empty.
	RemoveCgroup(c.Namespace)
	if c.CRI != nil {
		RemoveCgroup(CRINamespace)
		if err := c.CRI.stop(); err != nil {
			errs = append(errs, err)
		}
	}
	// The templates outlive sandboxes, on what their driver keeps them
	// on (QEMU's: a ramfs mounted on the directory).
	if err := driver.ReleaseTemplates(filepath.Join(c.Dir, "templates")); err != nil {
		errs = append(errs, err)
	}
	// containerd leaves its snapshot mounts (none once every container is
	// gone) and nothing else mounted; RemoveAll must not cross a mount.
	if mounts := mountsUnder(c.Dir); len(mounts) > 0 {
		errs = append(errs, fmt.Errorf("mounts remain under %s: %v", c.Dir, mounts))
	} else if err := os.RemoveAll(c.Dir); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// Logs returns containerd's log so far (shim logs included).
func (c *Containerd) Logs() string {
	b, _ := os.ReadFile(c.LogPath)
	return string(b)
}

// Result is the outcome of one command.
type Result struct {
	Stdout, Stderr string
	ExitCode       int
}

func (r Result) String() string {
	return fmt.Sprintf("exit %d\nstdout: %s\nstderr: %s", r.ExitCode, r.Stdout, r.Stderr)
}

// CtrCmd prepares `ctr` against this containerd and namespace.
func (c *Containerd) CtrCmd(ctx context.Context, args ...string) *exec.Cmd {
	return c.ctrCmd(ctx, c.Namespace, args...)
}

func (c *Containerd) ctrCmd(ctx context.Context, ns string, args ...string) *exec.Cmd {
	bin, err := c.lookPath("ctr")
	if err != nil {
		bin = "ctr"
	}
	cmd := exec.CommandContext(ctx, bin, append([]string{"--address", c.Address, "--namespace", ns}, args...)...)
	cmd.Env = c.env
	return cmd
}

// Ctr runs ctr and returns its output and exit code. err is set only when
// ctr could not run at all.
func (c *Containerd) Ctr(ctx context.Context, args ...string) (Result, error) {
	return c.ctrIn(ctx, c.Namespace, args...)
}

// ctrIn is Ctr in the containerd namespace ns.
func (c *Containerd) ctrIn(ctx context.Context, ns string, args ...string) (Result, error) {
	return run(c.ctrCmd(ctx, ns, args...))
}

// run runs cmd and returns its output and exit code. err is set only when
// cmd could not run at all.
func run(cmd *exec.Cmd) (Result, error) {
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	r := Result{Stdout: stdout.String(), Stderr: stderr.String()}
	var exit *exec.ExitError
	switch {
	case errors.As(err, &exit):
		r.ExitCode = exit.ExitCode()
	case err != nil:
		return r, fmt.Errorf("%s: %w", strings.Join(cmd.Args, " "), err)
	}
	return r, nil
}

// lookPath finds a binary on the PATH the daemon and shims get.
func (c *Containerd) lookPath(name string) (string, error) {
	for _, kv := range c.env {
		if p, ok := strings.CutPrefix(kv, "PATH="); ok {
			for _, d := range filepath.SplitList(p) {
				f := filepath.Join(d, name)
				if st, err := os.Stat(f); err == nil && st.Mode().IsRegular() && st.Mode()&0o111 != 0 {
					return f, nil
				}
			}
		}
	}
	return "", fmt.Errorf("%s not found in build/bin, build/tools or PATH: run make setup build", name)
}

// RepoRoot finds the colo checkout from the working directory.
func RepoRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		b, err := os.ReadFile(filepath.Join(dir, "go.mod"))
		if err == nil && bytes.Contains(b, []byte("module github.com/colo-runtime/colo\n")) {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("not inside the colo repository")
		}
		dir = parent
	}
}

// Tail returns the last n lines of s.
func Tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// WriteColoConfig writes a colo config for `ctr run --runtime-config-path`:
// this containerd's state dir plus extra TOML (which must not set
// [runtime]). It returns the file's path.
func (c *Containerd) WriteColoConfig(name, extra string) (string, error) {
	p := filepath.Join(c.Dir, name+".toml")
	body := fmt.Sprintf("[runtime]\nstate_dir = %q\ntemplate_dir = %q\n\n%s\n", c.StateDir, filepath.Join(c.Dir, "templates"), extra)
	return p, os.WriteFile(p, []byte(body), 0o644)
}

// ShimPids returns the pids of colo shim daemons serving the task id.
func (c *Containerd) ShimPids(id string) []int {
	return c.shimPids("containerd-shim-colo-v2", id)
}

// RuncShimPids returns the pids of runc shim daemons serving the task id.
func (c *Containerd) RuncShimPids(id string) []int {
	return c.shimPids("containerd-shim-runc-v2", id)
}

func (c *Containerd) shimPids(binary, id string) []int {
	var pids []int
	for _, p := range ProcessesMentioning(" -id " + id + " ") {
		if strings.Contains(p.Cmdline, binary) && strings.Contains(p.Cmdline, c.Address) {
			pids = append(pids, p.Pid)
		}
	}
	return pids
}
