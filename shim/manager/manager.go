// Package manager is the shim process lifecycle of containerd-shim-colo-v2,
// for containerd's pkg/shim: "start" spawns the long-lived shim daemon and
// hands containerd its socket, "delete" cleans up after a shim that died,
// and "-info" describes the runtime.
package manager

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime/debug"
	"syscall"
	"time"

	bootapi "github.com/containerd/containerd/api/runtime/bootstrap/v1"
	"github.com/containerd/containerd/api/types"
	// Registers the runtime-spec features type with typeurl.
	_ "github.com/containerd/containerd/v2/core/runtime"
	"github.com/containerd/containerd/v2/defaults"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/containerd/v2/pkg/shim"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/containerd/typeurl/v2"
	"github.com/opencontainers/runc/libcontainer/specconv"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"github.com/opencontainers/runtime-spec/specs-go/features"
	"golang.org/x/sys/unix"

	"github.com/colo-runtime/colo/config"
	"github.com/colo-runtime/colo/hypervisor/driver"
	"github.com/colo-runtime/colo/shim/sandbox"
)

// NewShimManager returns the shim lifecycle of the runtime called name
// (io.containerd.colo.v2).
func NewShimManager(name string) shim.Shim {
	return &manager{name: name}
}

type manager struct {
	name string
}

func (m *manager) Name() string { return m.name }

// Start spawns the shim daemon (this binary without an action) with its
// listening socket as fd 3, and returns the socket's address. Tasks of one
// pod (CRI annotation io.kubernetes.cri.sandbox-id) share their pod's
// daemon, and so its VM; any other task gets a daemon of its own.
func (m *manager) Start(ctx context.Context, params *bootapi.BootstrapParams) (_ *bootapi.BootstrapResult, retErr error) {
	id := params.GetInstanceID()
	debugLog := params.GetLogLevel() <= bootapi.LogLevel_LOG_LEVEL_DEBUG
	result := &bootapi.BootstrapResult{Version: 3, Protocol: "ttrpc"}

	socketDir := params.GetSocketDir()
	if socketDir == "" {
		socketDir = filepath.Join(defaults.DefaultStateDir, "s")
	}
	// Tasks of one pod share its daemon, found by an address made from the
	// pod's id; other tasks get their own.
	group := id
	if spec, err := sandbox.ReadSpec("."); err == nil {
		if pod := sandbox.PodID(spec); pod != "" {
			group = pod
		}
	}
	address, err := shim.CreateSocketAddress(ctx, socketDir, params.GetContainerdGrpcAddress(), group, false)
	if err != nil {
		return nil, err
	}
	socket, err := shim.NewSocket(address)
	if err != nil {
		if !shim.SocketEaddrinuse(err) {
			return nil, fmt.Errorf("create shim socket: %w", err)
		}
		// A daemon for this ID may be serving already.
		if shim.CanConnect(address) {
			result.Address = address
			return result, nil
		}
		if err := shim.RemoveSocket(address); err != nil {
			return nil, fmt.Errorf("remove stale shim socket: %w", err)
		}
		if socket, err = shim.NewSocket(address); err != nil {
			return nil, fmt.Errorf("create shim socket: %w", err)
		}
	}
	defer func() {
		if retErr != nil {
			socket.Close()
			_ = shim.RemoveSocket(address)
		}
	}()
	f, err := socket.File()
	if err != nil {
		return nil, err
	}
	defer f.Close()

	cmd, err := newCommand(ctx, id, params.GetContainerdGrpcAddress(), debugLog)
	if err != nil {
		return nil, err
	}
	// The runtime options reach only `shim start`. A task's create
	// request carries them again, a sandbox's (sandbox API) does not: the
	// daemon gets the configuration they name as its default.
	if p := configPath(params.GetExtensions()); p != "" {
		cmd.Env = append(cmd.Env, config.EnvPath+"="+p)
	}
	cmd.ExtraFiles = append(cmd.ExtraFiles, f)
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start shim daemon: %w", err)
	}
	defer func() {
		if retErr != nil {
			_ = cmd.Process.Kill()
		}
	}()
	// This process exits right after; wait so the daemon is never our
	// zombie meanwhile.
	go cmd.Wait()

	if err := shim.AdjustOOMScore(cmd.Process.Pid); err != nil {
		return nil, fmt.Errorf("adjust shim daemon OOM score: %w", err)
	}
	result.Address = address
	return result, nil
}

// configPath is the ConfigPath runtime option among the bootstrap
// extensions, or "".
func configPath(extensions []*bootapi.Extension) string {
	for _, ext := range extensions {
		if p, err := sandbox.ConfigPath(ext.GetValue()); err == nil && p != "" {
			return p
		}
	}
	return ""
}

func newCommand(ctx context.Context, id, containerdAddress string, debug bool) (*exec.Cmd, error) {
	ns, err := namespaces.NamespaceRequired(ctx)
	if err != nil {
		return nil, err
	}
	self, err := os.Executable()
	if err != nil {
		return nil, err
	}
	cwd, err := os.Getwd()
	if err != nil {
		return nil, err
	}
	args := []string{"-namespace", ns, "-id", id, "-address", containerdAddress}
	if debug {
		args = append(args, "-debug")
	}
	cmd := exec.Command(self, args...)
	cmd.Dir = cwd // the bundle
	cmd.Env = append(os.Environ(), "GOMAXPROCS=4")
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	return cmd, nil
}

// Stop is `shim delete`: containerd runs it after the daemon died, in (or
// with -bundle naming) the task's bundle. The bundle's colo-sandbox file
// leads to the sandbox directory, whose state file says what to kill and
// unmount. It goes by that record alone: no configuration is read and no
// hypervisor driver made, so it works after the hypervisor was upgraded,
// moved or removed, or /dev/kvm went away. An error leaves the bundle in
// place, so containerd tries again (on its next start).
func (m *manager) Stop(ctx context.Context, id string) (shim.StopStatus, error) {
	status := shim.StopStatus{ExitedAt: time.Now(), ExitStatus: 128 + int(unix.SIGKILL)}
	bundle := ""
	if opts, ok := ctx.Value(shim.OptsKey{}).(shim.Opts); ok {
		bundle = opts.BundlePath
	}
	if bundle == "" {
		cwd, err := os.Getwd()
		if err != nil {
			return status, err
		}
		bundle = cwd
	}
	removeDaemonSocket(ctx, bundle, id)
	dir, err := sandbox.ReadBundleFile(bundle)
	if err != nil {
		return status, err
	}
	if dir == "" {
		log.G(ctx).WithField("id", id).Debug("no sandbox recorded in the bundle: nothing to clean up")
		return status, nil
	}
	log.G(ctx).WithFields(log.Fields{"id": id, "sandbox": dir}).Info("cleaning up the sandbox of a dead shim")
	st, err := sandbox.Cleanup(ctx, dir, driver.Cleanup)
	status.Pid = st.HypervisorPid
	if err != nil {
		return status, fmt.Errorf("clean up sandbox %s: %w", dir, err)
	}
	if err := os.Remove(filepath.Join(bundle, sandbox.BundleFile)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return status, err
	}
	return status, nil
}

// removeDaemonSocket removes the socket of a daemon that was killed: only
// the daemon itself removes it when it exits cleanly. The address is made
// as Start made it, from the socket dir pkg/shim links in the bundle (as
// "s") and containerd's address in $GRPC_ADDRESS.
func removeDaemonSocket(ctx context.Context, bundle, id string) {
	socketDir, err := os.Readlink(filepath.Join(bundle, "s"))
	if err != nil || socketDir == "" {
		socketDir = filepath.Join(defaults.DefaultStateDir, "s")
	}
	if spec, err := sandbox.ReadSpec(bundle); err == nil {
		if pod := sandbox.PodID(spec); pod != "" {
			id = pod
		}
	}
	address, err := shim.CreateSocketAddress(ctx, socketDir, os.Getenv("GRPC_ADDRESS"), id, false)
	if err != nil || shim.CanConnect(address) {
		return
	}
	if err := shim.RemoveSocket(address); err != nil {
		log.G(ctx).WithError(err).WithField("address", address).Warn("remove the dead shim's socket")
	}
}

// Info describes the runtime; runtime options given on stdin are echoed
// back, as the runc shim does.
func (m *manager) Info(ctx context.Context, optionsR io.Reader) (*types.RuntimeInfo, error) {
	info := &types.RuntimeInfo{
		Name:    m.name,
		Version: &types.RuntimeVersion{Version: "(devel)"},
	}
	if bi, ok := debug.ReadBuildInfo(); ok {
		info.Version.Version = bi.Main.Version
		for _, s := range bi.Settings {
			if s.Key == "vcs.revision" {
				info.Version.Revision = s.Value
			}
		}
	}
	// The runtime-spec features containerd's CRI reads: mount options
	// are the guest runc's (the agent runs containers with its
	// libcontainer), "rro" among them, which CRI needs to offer
	// Kubernetes' recursive read-only mounts. The share honours "ro" and
	// "rro" on the host too (storage.BindMount).
	feat := &features.Features{
		OCIVersionMin: "1.0.0",
		OCIVersionMax: specs.Version,
		MountOptions:  specconv.KnownMountOptions(),
	}
	var err error
	if info.Features, err = typeurl.MarshalAnyToProto(feat); err != nil {
		return nil, fmt.Errorf("marshal %T: %w", feat, err)
	}
	opts, err := shim.ReadRuntimeOptions[any](optionsR)
	if err != nil && !errors.Is(err, errdefs.ErrNotFound) {
		return nil, fmt.Errorf("read runtime options: %w", err)
	}
	if opts != nil {
		if info.Options, err = typeurl.MarshalAnyToProto(opts); err != nil {
			return nil, fmt.Errorf("marshal runtime options %T: %w", opts, err)
		}
	}
	return info, nil
}
