package sandbox

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/containerd/errdefs"

	"github.com/colo-runtime/colo/config"
	"github.com/colo-runtime/colo/hypervisor"
	"github.com/colo-runtime/colo/internal/procfs"
	"github.com/colo-runtime/colo/vfio"
	"github.com/colo-runtime/colo/vfio/vfiotest"
)

// pciVM is a fake VM that takes PCI devices; nothing else of it is used.
type pciVM struct {
	*fakeVM
	addErr  error
	added   []hypervisor.PCIDevice
	removed []string
	// onAdd sees the host as AddPCIDevice finds it.
	onAdd func()
}

func (v *pciVM) AddPCIDevice(_ context.Context, d hypervisor.PCIDevice) (hypervisor.GuestDevice, error) {
	if v.onAdd != nil {
		v.onAdd()
	}
	if v.addErr != nil {
		return hypervisor.GuestDevice{}, v.addErr
	}
	v.added = append(v.added, d)
	return hypervisor.GuestDevice{PCIPath: "09.0/00.0"}, nil
}

// Stop and Done: the VM is gone at once.
func (v *pciVM) Stop(context.Context) error { return nil }

func (v *pciVM) Done() <-chan struct{} {
	c := make(chan struct{})
	close(c)
	return c
}

func (v *pciVM) RemovePCIDevice(_ context.Context, id string) error {
	v.removed = append(v.removed, id)
	return nil
}

const (
	testNVMe = "0000:45:00.0"
	testNIC  = "0000:45:00.1"
)

// newPCISandbox is a sandbox with a running (fake) VM, of whose devices
// devices.pci lists testNVMe, over a fixture host with testNVMe and a NIC
// in one IOMMU group.
func newPCISandbox(t *testing.T) (*Sandbox, *pciVM, *vfiotest.Kernel) {
	t.Helper()
	requireRoot(t)
	k := vfiotest.New(t,
		vfiotest.Device{Addr: "0000:00:1c.0", Class: "0x060400", Driver: "pcieport", Group: "7"},
		vfiotest.Device{Addr: testNVMe, Class: "0x010802", Driver: "nvme", Group: "7"},
		vfiotest.Device{Addr: testNIC, Class: "0x020000", Driver: "ixgbe", Group: "7"},
	)
	dir := filepath.Join(t.TempDir(), "sb")
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	cfg := config.Default()
	cfg.Devices.PCI = []string{testNVMe}
	vm := &pciVM{}
	s := &Sandbox{
		id: "sb", dir: dir, cfg: cfg, state: newState(dir, "sb", cfg), vm: vm,
		vfio:     &vfio.Binder{SysRoot: k.Sys(), DevRoot: k.Dev(), Mountinfo: k.Mountinfo(), Attr: k},
		stopping: make(chan struct{}),
	}
	if err := writeState(dir, s.state); err != nil {
		t.Fatal(err)
	}
	return s, vm, k
}

// onHost checks every device of the fixture is on its host driver, without
// an override, and the record on disk names no device.
func onHost(t *testing.T, s *Sandbox, k *vfiotest.Kernel) {
	t.Helper()
	for addr, drv := range map[string]string{testNVMe: "nvme", testNIC: "ixgbe", "0000:00:1c.0": "pcieport"} {
		if got := k.DriverOf(addr); got != drv {
			t.Errorf("%s: driver %q, want %q", addr, got, drv)
		}
		if o := k.Override(addr); o != "(null)" {
			t.Errorf("%s: driver_override %q", addr, o)
		}
	}
	st, err := ReadState(s.dir)
	if err != nil {
		t.Fatal(err)
	}
	if len(st.VFIO) > 0 {
		t.Errorf("recorded: %+v", st.VFIO)
	}
}

func TestPassthroughDisk(t *testing.T) {
	injected := errors.New("injected")
	for _, tc := range []struct {
		name    string
		addr    string
		setup   func(*pciVM, *vfiotest.Kernel)
		wantErr error
		wantMsg string
	}{
		{name: "passed through and given back", addr: testNVMe},
		{name: "not allowed", addr: testNIC, wantErr: errdefs.ErrPermissionDenied, wantMsg: "not in devices.pci"},
		{
			name:    "VM refuses",
			addr:    testNVMe,
			setup:   func(vm *pciVM, _ *vfiotest.Kernel) { vm.addErr = injected },
			wantErr: injected,
		},
		{
			name:    "group member in use",
			addr:    testNVMe,
			setup:   func(_ *pciVM, k *vfiotest.Kernel) { k.AddNetdev(testNIC, "eth3", "0x1003") },
			wantMsg: "network interface eth3 is up",
		},
		{
			name: "bind fails half way",
			addr: testNVMe,
			setup: func(_ *pciVM, k *vfiotest.Kernel) {
				k.Fail = func(path, value string) error {
					if path == "bus/pci/drivers/ixgbe/unbind" {
						return injected
					}
					return nil
				}
			},
			wantErr: injected,
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, vm, k := newPCISandbox(t)
			if tc.setup != nil {
				tc.setup(vm, k)
			}
			// The record names the device before the host changes.
			vm.onAdd = func() {
				st, err := ReadState(s.dir)
				if err != nil || len(st.VFIO) != 1 || st.VFIO[0].Address != testNVMe {
					t.Errorf("record when the VM gets the device: %+v, %v", st.VFIO, err)
				}
			}
			writesAtRecord := -1
			stateWritten = func(st State) {
				if len(st.VFIO) > 0 && writesAtRecord < 0 {
					writesAtRecord = len(k.Writes())
				}
			}
			defer func() { stateWritten = nil }()

			gd, err := s.passthroughDisk(context.Background(), tc.addr)
			if tc.wantErr == nil && tc.wantMsg == "" {
				if err != nil {
					t.Fatalf("passthroughDisk: %v", err)
				}
				if gd.PCIPath != "09.0/00.0" || !slices.Equal(vm.added, []hypervisor.PCIDevice{{ID: "pci-0000-45-00.0", Address: testNVMe}}) {
					t.Errorf("guest device %+v, VM given %+v", gd, vm.added)
				}
				if writesAtRecord != 0 {
					t.Errorf("the record was written after %d writes to sysfs, want before any", writesAtRecord)
				}
				st, _ := ReadState(s.dir)
				want := []vfio.Binding{{Address: testNVMe, Group: "7", Devices: []vfio.Device{{Address: testNVMe, Driver: "nvme"}, {Address: testNIC, Driver: "ixgbe"}}}}
				if !equalBindings(st.VFIO, want) {
					t.Errorf("recorded %+v, want %+v", st.VFIO, want)
				}
				if k.DriverOf(testNVMe) != vfio.Driver || k.DriverOf(testNIC) != vfio.Driver {
					t.Errorf("not on vfio-pci: %s %s", k.DriverOf(testNVMe), k.DriverOf(testNIC))
				}
				if _, err := s.passthroughDisk(context.Background(), testNVMe); !errdefs.IsAlreadyExists(err) {
					t.Errorf("second passthroughDisk: %v, want already exists", err)
				}
				if st2, _ := ReadState(s.dir); !equalBindings(st2.VFIO, want) {
					t.Errorf("the refused second one changed the record: %+v", st2.VFIO)
				}
				// The VM is stopped, then the devices go back, then the
				// sandbox directory.
				st, _ = ReadState(s.dir)
				if err := s.teardown(context.Background()); err != nil {
					t.Fatal(err)
				}
				if _, err := os.Stat(s.dir); !errors.Is(err, os.ErrNotExist) {
					t.Errorf("sandbox dir after teardown: %v", err)
				}
				for _, d := range st.VFIO[0].Devices {
					if got := k.DriverOf(d.Address); got != d.Driver || k.Override(d.Address) != "(null)" {
						t.Errorf("%s: driver %q, override %q after teardown; want %q", d.Address, got, k.Override(d.Address), d.Driver)
					}
				}
				return
			}
			if err == nil {
				t.Fatal("passthroughDisk succeeded")
			}
			if tc.wantErr != nil && !errors.Is(err, tc.wantErr) {
				t.Errorf("error %v, want %v", err, tc.wantErr)
			}
			if !strings.Contains(err.Error(), tc.wantMsg) || !strings.Contains(err.Error(), tc.addr) {
				t.Errorf("error %q does not name %s and say %q", err, tc.addr, tc.wantMsg)
			}
			onHost(t, s, k)
		})
	}
}

// TestCleanupGivesDevicesBack: what a shim that died with devices bound
// (half way through a bind, here) left is given back by Cleanup from the
// record alone; a device that does not go back stays recorded and the
// directory with it, until a later Cleanup manages.
func TestCleanupGivesDevicesBack(t *testing.T) {
	s, _, k := newPCISandbox(t)
	// The shim "dies" after binding the first device: every later write,
	// its own undo's too, never happens.
	writes := 0
	crash := errors.New("crash")
	k.Fail = func(string, string) error {
		writes++
		if writes > 3 {
			return crash
		}
		return nil
	}
	if _, err := s.passthroughDisk(context.Background(), testNVMe); !errors.Is(err, crash) {
		t.Fatalf("passthroughDisk: %v, want the crash", err)
	}
	k.Fail = nil
	if k.DriverOf(testNVMe) != vfio.Driver {
		t.Fatalf("the crash left %s on %q, want it on vfio-pci", testNVMe, k.DriverOf(testNVMe))
	}
	binder := &vfio.Binder{SysRoot: k.Sys(), DevRoot: k.Dev(), Mountinfo: k.Mountinfo(), Attr: k}
	vmGone := func(context.Context, string, string, procfs.Proc) error { return nil }

	// nvme refuses the device back first.
	k.Refuse["nvme"] = true
	// Bounds the wait for nvme to take the device, which it never does.
	short, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
	defer cancel()
	st, err := cleanup(short, s.dir, vmGone, binder)
	if err == nil || !strings.Contains(err.Error(), "give 0000:45:00.0 back to nvme") {
		t.Fatalf("Cleanup with nvme refusing: %v", err)
	}
	if rec, err := ReadState(s.dir); err != nil || len(rec.VFIO) != 1 {
		t.Fatalf("after a failed Cleanup the record is %+v, %v; want the binding kept", rec.VFIO, err)
	}
	if len(st.VFIO) != 1 {
		t.Errorf("Cleanup's state: %+v", st.VFIO)
	}
	k.Refuse["nvme"] = false
	if _, err := cleanup(context.Background(), s.dir, vmGone, binder); err != nil {
		t.Fatalf("Cleanup: %v", err)
	}
	for addr, drv := range map[string]string{testNVMe: "nvme", testNIC: "ixgbe"} {
		if got := k.DriverOf(addr); got != drv || k.Override(addr) != "(null)" {
			t.Errorf("%s: driver %q override %q after Cleanup, want %q", addr, got, k.Override(addr), drv)
		}
	}
	if _, err := os.Stat(s.dir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("sandbox dir after Cleanup: %v", err)
	}
}

// equalBindings compares bindings field by field.
func equalBindings(a, b []vfio.Binding) bool {
	return slices.EqualFunc(a, b, func(x, y vfio.Binding) bool {
		return x.Address == y.Address && x.Group == y.Group && slices.Equal(x.Devices, y.Devices)
	})
}
