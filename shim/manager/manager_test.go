package manager

import (
	"slices"

	"bytes"
	"context"
	"encoding/json"
	"errors"
	"github.com/opencontainers/runtime-spec/specs-go/features"
	"os"
	"path/filepath"
	"testing"

	runtimeoptions "github.com/containerd/containerd/api/types/runtimeoptions/v1"
	"github.com/containerd/containerd/v2/pkg/protobuf/proto"
	"github.com/containerd/containerd/v2/pkg/shim"
	"github.com/containerd/typeurl/v2"
	"golang.org/x/sys/unix"

	"github.com/colo-runtime/colo/config"
	"github.com/colo-runtime/colo/shim/sandbox"
	"github.com/colo-runtime/colo/storage"
)

func withBundle(bundle string) context.Context {
	return context.WithValue(context.Background(), shim.OptsKey{}, shim.Opts{BundlePath: bundle})
}

func TestStopWithoutSandbox(t *testing.T) {
	m := NewShimManager("io.containerd.colo.v2")
	st, err := m.Stop(withBundle(t.TempDir()), "t1")
	if err != nil {
		t.Fatal(err)
	}
	if st.ExitStatus != 137 || st.ExitedAt.IsZero() {
		t.Errorf("status = %+v", st)
	}
}

// TestStopCleansSandbox is `shim delete` after a shim died with its
// sandbox's shared dir and a rootfs still mounted.
func TestStopCleansSandbox(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root (mounts)")
	}
	root, err := filepath.EvalSymlinks(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if left, _ := storage.MountsUnder(root); len(left) > 0 {
			t.Errorf("mounts left: %v", left)
			for _, m := range left {
				_ = unix.Unmount(m, unix.MNT_DETACH)
			}
		}
	})
	dir := filepath.Join(root, "state", "default", "t1")
	if err := os.MkdirAll(filepath.Join(dir, "vm"), 0o700); err != nil {
		t.Fatal(err)
	}
	st := sandbox.State{Dir: dir, ID: "t1", Hypervisor: config.Default().Hypervisor}
	record := func(rel string) error {
		st.Mounts = append(st.Mounts, rel)
		return nil
	}
	if err := storage.SetupShare(dir, record); err != nil {
		t.Fatal(err)
	}
	rootfs := filepath.Join(dir, storage.ShareMounts, "t1", "rootfs")
	if err := os.MkdirAll(rootfs, 0o755); err != nil {
		t.Fatal(err)
	}
	_ = record(storage.ShareMounts + "/t1/rootfs")
	if err := unix.Mount("tmpfs", rootfs, "tmpfs", 0, ""); err != nil {
		t.Fatal(err)
	}
	b, err := json.Marshal(st)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "state.json"), b, 0o600); err != nil {
		t.Fatal(err)
	}
	bundle := filepath.Join(root, "bundle")
	if err := os.Mkdir(bundle, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(bundle, sandbox.BundleFile), []byte(dir+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}

	m := NewShimManager("io.containerd.colo.v2")
	status, err := m.Stop(withBundle(bundle), "t1")
	if err != nil {
		t.Fatal(err)
	}
	if status.ExitStatus != 137 {
		t.Errorf("status = %+v", status)
	}
	if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("sandbox dir left: %v", err)
	}
	if _, err := os.Stat(filepath.Join(bundle, sandbox.BundleFile)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("bundle file left: %v", err)
	}
	// Again, as containerd may retry: nothing to do.
	if _, err := m.Stop(withBundle(bundle), "t1"); err != nil {
		t.Fatal(err)
	}
}

func TestStopRefusesBadBundleFile(t *testing.T) {
	bundle := t.TempDir()
	if err := os.WriteFile(filepath.Join(bundle, sandbox.BundleFile), []byte("/\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := NewShimManager("io.containerd.colo.v2").Stop(withBundle(bundle), "t1"); err == nil {
		t.Fatal("Stop accepted / as a sandbox dir")
	}
}

func TestInfo(t *testing.T) {
	m := NewShimManager("io.containerd.colo.v2")
	info, err := m.Info(context.Background(), bytes.NewReader(nil))
	if err != nil {
		t.Fatal(err)
	}
	if info.Name != "io.containerd.colo.v2" || info.Version == nil || info.Options != nil {
		t.Errorf("info = %+v", info)
	}
	fv, err := typeurl.UnmarshalAny(info.Features)
	if err != nil {
		t.Fatal(err)
	}
	if f, ok := fv.(*features.Features); !ok || !slices.Contains(f.MountOptions, "rro") {
		t.Errorf("features = %+v, want mount option rro (CRI's recursive read-only)", fv)
	}

	opts, err := typeurl.MarshalAnyToProto(&runtimeoptions.Options{ConfigPath: "/etc/colo/x.toml"})
	if err != nil {
		t.Fatal(err)
	}
	b, err := proto.Marshal(opts)
	if err != nil {
		t.Fatal(err)
	}
	info, err = m.Info(context.Background(), bytes.NewReader(b))
	if err != nil {
		t.Fatal(err)
	}
	v, err := typeurl.UnmarshalAny(info.Options)
	if err != nil {
		t.Fatal(err)
	}
	if o, ok := v.(*runtimeoptions.Options); !ok || o.ConfigPath != "/etc/colo/x.toml" {
		t.Errorf("options echoed = %+v", v)
	}
}
