package driver

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/colo-runtime/colo/config"
	"github.com/colo-runtime/colo/hypervisor/clh"
	"github.com/colo-runtime/colo/hypervisor/qemu"
	"github.com/colo-runtime/colo/internal/procfs"
)

func TestNew(t *testing.T) {
	for _, tc := range []struct {
		name    string
		wantErr string
	}{
		{name: "qemu"},
		{name: ""},
		{name: "xen", wantErr: `hypervisor "xen": want qemu or clh`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := config.Default().Hypervisor
			cfg.Type = tc.name
			d, err := New(cfg)
			if tc.wantErr != "" {
				if err == nil || err.Error() != tc.wantErr {
					t.Fatalf("got %v, %v; want error %q", d, err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if _, ok := d.(*qemu.Driver); !ok {
				t.Fatalf("got %T, want *qemu.Driver", d)
			}
		})
	}
}

// hypervisor.type clh makes Cloud Hypervisor's driver, which needs its
// binary: here none, and the error names it.
func TestNewCLH(t *testing.T) {
	cfg := config.Default().Hypervisor
	cfg.Type, cfg.Path = "clh", "/nonexistent/cloud-hypervisor"
	d, err := New(cfg)
	if err == nil || d != nil || !strings.Contains(err.Error(), "/nonexistent/cloud-hypervisor") {
		t.Fatalf("got %v, %v; want a nil driver and an error naming the binary", d, err)
	}
}

// A driver's own configuration error comes back as an error, never as a
// non-nil interface holding a nil driver.
func TestNewQEMUError(t *testing.T) {
	cfg := config.Default().Hypervisor
	cfg.Path = "/nonexistent/qemu-system-x86_64"
	d, err := New(cfg)
	if err == nil || d != nil {
		t.Fatalf("got %v, %v; want a nil driver and an error", d, err)
	}
}

// Cleanup dispatches on the recorded name alone, and needs nothing a Driver
// needs: here no PATH at all, so neither QEMU nor setpriv could be found.
func TestCleanup(t *testing.T) {
	for _, tc := range []struct {
		name    string
		wantErr string
		files   []string
	}{
		{name: "qemu", files: []string{qemu.PidFile, qemu.QMPSocket}},
		{name: "", files: []string{qemu.PidFile, qemu.QMPSocket}},
		{name: "clh", files: []string{clh.PidFile, clh.APISocket}},
		{name: "xen", wantErr: `hypervisor "xen": no VM of it can have run`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Setenv("PATH", "")
			dir := t.TempDir()
			// What a QEMU or CH that is gone left behind.
			for _, f := range tc.files {
				if err := os.WriteFile(filepath.Join(dir, f), []byte("999999999\n"), 0o600); err != nil {
					t.Fatal(err)
				}
			}
			err := Cleanup(context.Background(), tc.name, dir, procfs.Proc{})
			if tc.wantErr != "" {
				if err == nil || err.Error() != tc.wantErr {
					t.Fatalf("got %v, want error %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if entries, _ := os.ReadDir(dir); len(entries) > 0 {
				t.Errorf("left in the VM dir: %v", entries)
			}
		})
	}
}
