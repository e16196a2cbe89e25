package vfio

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/colo-runtime/colo/vfio/vfiotest"
)

const (
	nvme    = "0000:45:00.0"
	sibling = "0000:45:00.1"
	port    = "0000:00:1c.0"
	nic     = "0000:46:00.0"
)

func binderOf(k *vfiotest.Kernel) *Binder {
	return &Binder{SysRoot: k.Sys(), DevRoot: k.Dev(), Mountinfo: k.Mountinfo(), Attr: k}
}

func TestBind(t *testing.T) {
	for _, tc := range []struct {
		name    string
		devs    []vfiotest.Device
		setup   func(k *vfiotest.Kernel)
		addr    string
		wantErr string
		// want is the Binding's devices; bound the drivers after Bind.
		want  []Device
		bound map[string]string
	}{
		{
			name:  "alone in its group",
			devs:  []vfiotest.Device{{Addr: nvme, Class: "0x010802", Driver: "nvme", Group: "7"}},
			addr:  nvme,
			want:  []Device{{nvme, "nvme"}},
			bound: map[string]string{nvme: Driver},
		},
		{
			name: "bridge left alone, sibling endpoint bound too",
			devs: []vfiotest.Device{
				{Addr: port, Class: "0x060400", Driver: "pcieport", Group: "7"},
				{Addr: nvme, Class: "0x010802", Driver: "nvme", Group: "7"},
				{Addr: sibling, Class: "0x010802", Driver: "", Group: "7"},
			},
			addr:  nvme,
			want:  []Device{{nvme, "nvme"}, {sibling, ""}},
			bound: map[string]string{port: "pcieport", nvme: Driver, sibling: Driver},
		},
		{
			name:  "group already on vfio-pci and free",
			devs:  []vfiotest.Device{{Addr: nvme, Class: "0x010802", Driver: Driver, Group: "7"}},
			addr:  nvme,
			want:  nil,
			bound: map[string]string{nvme: Driver},
		},
		{
			name:  "NIC that is down",
			devs:  []vfiotest.Device{{Addr: nic, Class: "0x020000", Driver: "ixgbe", Group: "9"}},
			setup: func(k *vfiotest.Kernel) { k.AddNetdev(nic, "eth1", "0x1002") },
			addr:  nic,
			want:  []Device{{nic, "ixgbe"}},
			bound: map[string]string{nic: Driver},
		},
		{
			name:  "unmounted block device",
			devs:  []vfiotest.Device{{Addr: nvme, Class: "0x010802", Driver: "nvme", Group: "7"}},
			setup: func(k *vfiotest.Kernel) { k.AddBlock(nvme, "nvme0n1", "259:0") },
			addr:  nvme,
			want:  []Device{{nvme, "nvme"}},
			bound: map[string]string{nvme: Driver},
		},
		{
			name:    "bad address",
			addr:    "45:00.0",
			wantErr: `"45:00.0" is not a PCI address`,
		},
		{
			name:    "upper-case address",
			addr:    "0000:4A:00.0",
			wantErr: "is not a PCI address",
		},
		{
			name:    "device absent",
			devs:    []vfiotest.Device{{Addr: nvme, Class: "0x010802", Driver: "nvme", Group: "7"}},
			addr:    "0000:99:00.0",
			wantErr: "no PCI device 0000:99:00.0 on this host",
		},
		{
			name:    "no IOMMU",
			devs:    []vfiotest.Device{{Addr: nvme, Class: "0x010802", Driver: "nvme", Group: ""}},
			addr:    nvme,
			wantErr: "no IOMMU group: the host has no IOMMU enabled (boot it with intel_iommu=on or amd_iommu=on",
			bound:   map[string]string{nvme: "nvme"},
		},
		{
			name:    "vfio-pci not loaded",
			devs:    []vfiotest.Device{{Addr: nvme, Class: "0x010802", Driver: "nvme", Group: "7"}},
			setup:   func(k *vfiotest.Kernel) { os.RemoveAll(k.Path("sys/bus/pci/drivers/" + Driver)) },
			addr:    nvme,
			wantErr: "the vfio-pci driver is not loaded (modprobe vfio-pci)",
			bound:   map[string]string{nvme: "nvme"},
		},
		{
			name: "mounted partition",
			devs: []vfiotest.Device{{Addr: nvme, Class: "0x010802", Driver: "nvme", Group: "7"}},
			setup: func(k *vfiotest.Kernel) {
				k.AddBlock(nvme, "nvme0n1", "259:0")
				k.AddBlock(nvme, "nvme0n1/nvme0n1p1", "259:1")
				k.Mount("259:1", "/var/lib/data")
			},
			addr:    nvme,
			wantErr: "device 0000:45:00.0 (nvme) is in use by the host: its block device nvme0n1p1 is mounted on /var/lib/data",
			bound:   map[string]string{nvme: "nvme"},
		},
		{
			name:    "held block device",
			devs:    []vfiotest.Device{{Addr: nvme, Class: "0x010802", Driver: "nvme", Group: "7"}},
			setup:   func(k *vfiotest.Kernel) { k.AddBlock(nvme, "nvme0n1", "259:0", "dm-0") },
			addr:    nvme,
			wantErr: "its block device nvme0n1 is held by dm-0",
			bound:   map[string]string{nvme: "nvme"},
		},
		{
			name: "sibling in use",
			devs: []vfiotest.Device{
				{Addr: nvme, Class: "0x010802", Driver: "nvme", Group: "7"},
				{Addr: nic, Class: "0x020000", Driver: "ixgbe", Group: "7"},
			},
			setup:   func(k *vfiotest.Kernel) { k.AddNetdev(nic, "eth0", "0x1003") },
			addr:    nvme,
			wantErr: "device 0000:46:00.0 (ixgbe) is in use by the host: its network interface eth0 is up",
			bound:   map[string]string{nvme: "nvme", nic: "ixgbe"},
		},
		{
			name: "partly bound group",
			devs: []vfiotest.Device{
				{Addr: nvme, Class: "0x010802", Driver: "nvme", Group: "7"},
				{Addr: sibling, Class: "0x010802", Driver: Driver, Group: "7"},
			},
			addr:    nvme,
			wantErr: "IOMMU group 7 is partly bound to vfio-pci (0000:45:00.1) and partly to host drivers (0000:45:00.0 (nvme))",
			bound:   map[string]string{nvme: "nvme", sibling: Driver},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			k := vfiotest.New(t, tc.devs...)
			if tc.setup != nil {
				tc.setup(k)
			}
			var recorded *Binding
			got, err := binderOf(k).Bind(context.Background(), tc.addr, func(b Binding) error {
				recorded = &b
				return nil
			})
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("Bind: got error %v, want one containing %q", err, tc.wantErr)
				}
				if recorded != nil || len(k.Writes()) > 0 {
					t.Errorf("a refused Bind recorded %v and wrote %v", recorded, k.Writes())
				}
			} else {
				if err != nil {
					t.Fatalf("Bind: %v", err)
				}
				if !reflect.DeepEqual(got.Devices, tc.want) || got.Address != tc.addr || got.Group != k.Group(tc.addr) {
					t.Errorf("Bind = %+v, want devices %+v in group %s", got, tc.want, k.Group(tc.addr))
				}
				if recorded == nil || !reflect.DeepEqual(*recorded, got) {
					t.Errorf("recorded %+v, want %+v", recorded, got)
				}
				if !k.GroupExists(got.Group) {
					t.Errorf("no /dev/vfio/%s after Bind", got.Group)
				}
				for _, d := range tc.want {
					if o := k.Override(d.Address); o != Driver {
						t.Errorf("%s: driver_override %q, want %q", d.Address, o, Driver)
					}
				}
			}
			for addr, drv := range tc.bound {
				if got := k.DriverOf(addr); got != drv {
					t.Errorf("%s: driver %q, want %q", addr, got, drv)
				}
			}
		})
	}
}

// TestBindRollback fails each step of a two-device bind in turn and checks
// that every device is back on its driver with no override.
func TestBindRollback(t *testing.T) {
	devs := []vfiotest.Device{
		{Addr: port, Class: "0x060400", Driver: "pcieport", Group: "7"},
		{Addr: nvme, Class: "0x010802", Driver: "nvme", Group: "7"},
		{Addr: nic, Class: "0x020000", Driver: "ixgbe", Group: "7"},
	}
	injected := errors.New("injected")
	failed := false // the one probe that fails
	for _, tc := range []struct {
		name string
		fail func(path, value string) error
		// refuse makes vfio-pci take no device.
		refuse  bool
		record  error
		wantErr string
	}{
		{
			name: "second override",
			fail: func(path, value string) error {
				if strings.Contains(path, nic) && strings.HasSuffix(path, "driver_override") && strings.TrimSpace(value) == Driver {
					return injected
				}
				return nil
			},
			wantErr: "bind 0000:46:00.0 (IOMMU group 7) to vfio-pci: injected",
		},
		{
			name: "second unbind",
			fail: func(path, value string) error {
				if path == "bus/pci/drivers/ixgbe/unbind" {
					return injected
				}
				return nil
			},
			wantErr: "injected",
		},
		{
			name: "second probe",
			fail: func(path, value string) error {
				if path == "bus/pci/drivers_probe" && value == nic && !failed {
					failed = true
					return injected
				}
				return nil
			},
			wantErr: "injected",
		},
		{
			name:    "vfio-pci takes no device",
			refuse:  true,
			wantErr: "driver is none, not vfio-pci",
		},
		{
			name:    "record fails",
			record:  injected,
			wantErr: "injected",
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			k := vfiotest.New(t, devs...)
			k.Fail = tc.fail
			k.Refuse[Driver] = tc.refuse
			// The kernel binds in the write; the wait for the driver link
			// is only bounded.
			ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
			defer cancel()
			_, err := binderOf(k).Bind(ctx, nvme, func(Binding) error { return tc.record })
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("Bind: got error %v, want one containing %q", err, tc.wantErr)
			}
			if strings.Contains(err.Error(), "undoing it") {
				t.Errorf("the undo failed: %v", err)
			}
			for _, d := range devs {
				if got := k.DriverOf(d.Addr); got != d.Driver {
					t.Errorf("%s: driver %q after the rollback, want %q", d.Addr, got, d.Driver)
				}
				if o := k.Override(d.Addr); o != "(null)" {
					t.Errorf("%s: driver_override %q after the rollback", d.Addr, o)
				}
			}
			if k.GroupExists("7") {
				t.Error("/dev/vfio/7 left after the rollback")
			}
		})
	}
}

func TestRestore(t *testing.T) {
	devs := []vfiotest.Device{
		{Addr: port, Class: "0x060400", Driver: "pcieport", Group: "7"},
		{Addr: nvme, Class: "0x010802", Driver: "nvme", Group: "7"},
		{Addr: sibling, Class: "0x010802", Driver: "", Group: "7"},
	}
	for _, tc := range []struct {
		name string
		// viaJSON restores from the record as Bind's record callback
		// wrote it, as Cleanup after a crash does.
		viaJSON bool
		// crashAfter cuts Bind short after that many writes.
		crashAfter int
		twice      bool
	}{
		{name: "bound"},
		{name: "from JSON", viaJSON: true},
		{name: "from JSON after a crash in the middle", viaJSON: true, crashAfter: 4},
		{name: "from JSON after a crash before any write", viaJSON: true, crashAfter: -1},
		{name: "twice", twice: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			k := vfiotest.New(t, devs...)
			var record []byte
			crash := errors.New("crash")
			if tc.crashAfter != 0 {
				writes := 0
				k.Fail = func(string, string) error {
					writes++
					if tc.crashAfter < 0 || writes > tc.crashAfter {
						return crash
					}
					return nil
				}
			}
			bnd, err := binderOf(k).Bind(context.Background(), nvme, func(b Binding) error {
				var err error
				record, err = json.Marshal(b)
				return err
			})
			if tc.crashAfter != 0 {
				// The writes from the crash on, the rollback's too, never
				// happened: the devices are as the crash left them.
				if !errors.Is(err, crash) {
					t.Fatalf("Bind: %v, want the crash", err)
				}
				k.Fail = nil
			} else if err != nil {
				t.Fatalf("Bind: %v", err)
			}
			if tc.viaJSON {
				bnd = Binding{}
				if err := json.Unmarshal(record, &bnd); err != nil {
					t.Fatal(err)
				}
			}
			for range 1 + btoi(tc.twice) {
				if err := binderOf(k).Restore(context.Background(), bnd); err != nil {
					t.Fatalf("Restore: %v", err)
				}
			}
			for _, d := range devs {
				if got := k.DriverOf(d.Addr); got != d.Driver {
					t.Errorf("%s: driver %q after Restore, want %q", d.Addr, got, d.Driver)
				}
				if o := k.Override(d.Addr); o != "(null)" {
					t.Errorf("%s: driver_override %q after Restore", d.Addr, o)
				}
			}
			if k.GroupExists("7") {
				t.Error("/dev/vfio/7 left after Restore")
			}
		})
	}
}

func btoi(b bool) int {
	if b {
		return 1
	}
	return 0
}

// TestRestoreGoneDevice: a device removed from the host since is skipped,
// the others given back.
func TestRestoreGoneDevice(t *testing.T) {
	k := vfiotest.New(t, vfiotest.Device{Addr: nvme, Class: "0x010802", Driver: "nvme", Group: "7"}, vfiotest.Device{Addr: nic, Class: "0x020000", Driver: "ixgbe", Group: "7"})
	bnd, err := binderOf(k).Bind(context.Background(), nvme, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(k.Path("sys/bus/pci/devices/" + nic)); err != nil {
		t.Fatal(err)
	}
	if err := binderOf(k).Restore(context.Background(), bnd); err != nil {
		t.Fatalf("Restore: %v", err)
	}
	if got := k.DriverOf(nvme); got != "nvme" {
		t.Errorf("driver %q after Restore, want nvme", got)
	}
}

// TestRestoreFailure: a device that does not go back is an error naming it.
func TestRestoreFailure(t *testing.T) {
	k := vfiotest.New(t, vfiotest.Device{Addr: nvme, Class: "0x010802", Driver: "nvme", Group: "7"})
	bnd, err := binderOf(k).Bind(context.Background(), nvme, nil)
	if err != nil {
		t.Fatal(err)
	}
	k.Refuse["nvme"] = true
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	err = binderOf(k).Restore(ctx, bnd)
	if want := "give 0000:45:00.0 back to nvme: device 0000:45:00.0: driver is none, not nvme"; err == nil || !strings.Contains(err.Error(), want) {
		t.Fatalf("Restore: got %v, want an error containing %q", err, want)
	}
}

func TestCheckAddress(t *testing.T) {
	for addr, ok := range map[string]bool{
		"0000:45:00.0": true, "0000:00:1f.7": true, "0000:45:20.0": false,
		"0000:45:00.8": false, "45:00.0": false, "0000:45:00.0/../x": false, "": false,
	} {
		if err := CheckAddress(addr); (err == nil) != ok {
			t.Errorf("CheckAddress(%q) = %v, want ok %v", addr, err, ok)
		}
	}
}
