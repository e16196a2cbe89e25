package driver

import (
	"testing"

	"github.com/colo-runtime/colo/config"
	"github.com/colo-runtime/colo/hypervisor/qemu"
)

func TestNew(t *testing.T) {
	for _, tc := range []struct {
		name    string
		wantErr string
	}{
		{name: "qemu"},
		{name: ""},
		{name: "clh", wantErr: "hypervisor clh: not implemented yet"},
		{name: "xen", wantErr: `hypervisor "xen": want qemu or clh`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := config.Default().Hypervisor
			cfg.Name = tc.name
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
