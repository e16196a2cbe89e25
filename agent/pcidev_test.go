package agent

import (
	"context"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/containerd/errdefs"
)

// sysfsTree makes a fixture sysfs below a new directory and returns it:
// dirs are directories, files map a path to its content, links a path to
// its symlink's target.
func sysfsTree(t *testing.T, dirs []string, files, links map[string]string) string {
	t.Helper()
	root := t.TempDir()
	for _, d := range dirs {
		if err := os.MkdirAll(filepath.Join(root, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	for p, content := range files {
		p = filepath.Join(root, p)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	for p, target := range links {
		p = filepath.Join(root, p)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Symlink(target, p); err != nil {
			t.Fatal(err)
		}
	}
	return root
}

func TestParsePCIPath(t *testing.T) {
	for _, tc := range []struct {
		path string
		want []pciHop // nil: invalid
	}{
		{path: "03.0/00.0", want: []pciHop{{3, 0}, {0, 0}}},
		{path: "1f.7", want: []pciHop{{0x1f, 7}}},
		{path: "1F.7", want: []pciHop{{0x1f, 7}}},
		{path: "02.0/00.0/04.1", want: []pciHop{{2, 0}, {0, 0}, {4, 1}}},
		{path: ""},
		{path: "3.0"},
		{path: "003.0"},
		{path: "03"},
		{path: "03.00"},
		{path: "03.8"},
		{path: "20.0"},
		{path: "g3.0"},
		{path: "+3.0"},
		{path: "03-0"},
		{path: "03.0/"},
		{path: "/03.0"},
		{path: "03.0//00.0"},
		{path: "03.0/../00.0"},
		{path: "0000:00:03.0"},
		{path: "00.0/00.0/00.0/00.0/00.0/00.0/00.0/00.0/00.0"},
	} {
		got, err := parsePCIPath(tc.path)
		if tc.want == nil {
			if err == nil || !errors.Is(err, errdefs.ErrInvalidArgument) {
				t.Errorf("parsePCIPath(%q) = %v, %v; want an invalid-argument error", tc.path, got, err)
			} else if !strings.Contains(err.Error(), "PCI path") {
				t.Errorf("parsePCIPath(%q): error %q does not say what was wrong", tc.path, err)
			}
			continue
		}
		if err != nil || !slices.Equal(got, tc.want) {
			t.Errorf("parsePCIPath(%q) = %v, %v; want %v", tc.path, got, err, tc.want)
		}
	}
}

// pciFixture is a guest's PCI tree: a root port at 03.0 (bus 01) with a
// device, one at 04.0 (bus 05, as the guest numbered it) with one, an
// empty root port at 06.0, a symlink named like a device, and the
// attributes and links sysfs has beside the devices.
func pciFixture(t *testing.T) string {
	return sysfsTree(t, []string{
		"devices/pci0000:00/0000:00:03.0/0000:01:00.0",
		"devices/pci0000:00/0000:00:03.0/pci_bus/0000:01",
		"devices/pci0000:00/0000:00:04.0/0000:05:00.0",
		"devices/pci0000:00/0000:00:06.0",
		"devices/pci0000:00/pci_bus/0000:00",
		"devices/elsewhere/0000:00:07.0",
	}, map[string]string{
		"devices/pci0000:00/0000:00:03.0/vendor": "0x1b36\n",
		"devices/pci0000:00/uevent":              "",
	}, map[string]string{
		"devices/pci0000:00/0000:00:07.0":                   "../elsewhere/0000:00:07.0",
		"devices/pci0000:00/0000:00:03.0/0000:01:00.0/link": "..",
	})
}

func TestFindPCIDevice(t *testing.T) {
	sys := pciFixture(t)
	root := filepath.Join(sys, "devices/pci0000:00")
	for _, tc := range []struct {
		path string
		want string // below root; "": not there
		seen string // in what was seen instead
	}{
		{path: "03.0/00.0", want: "0000:00:03.0/0000:01:00.0"},
		{path: "04.0/00.0", want: "0000:00:04.0/0000:05:00.0"},
		{path: "03.0", want: "0000:00:03.0"},
		{path: "03.0/01.0", seen: "no device 01.0 behind 0000:00:03.0, only 0000:01:00.0"},
		{path: "06.0/00.0", seen: "no device 00.0 behind 0000:00:06.0, none at all"},
		{path: "05.0", seen: "no device 05.0 on the root bus"},
		{path: "07.0", seen: "no device 07.0"}, // a link, not a device
		{path: "03.0/00.0/00.0", seen: "behind 0000:01:00.0, none at all"},
	} {
		hops, err := parsePCIPath(tc.path)
		if err != nil {
			t.Fatal(err)
		}
		dir, seen, err := findPCIDevice(sys, hops)
		if err != nil {
			t.Errorf("%s: %v", tc.path, err)
			continue
		}
		if tc.want != "" {
			if dir != filepath.Join(root, tc.want) {
				t.Errorf("%s: found %q, want %q", tc.path, dir, filepath.Join(root, tc.want))
			}
			continue
		}
		if dir != "" || !strings.Contains(seen, tc.seen) {
			t.Errorf("%s: found %q, saw %q; want nothing, and seen to say %q", tc.path, dir, seen, tc.seen)
		}
	}
	if _, _, err := findPCIDevice(t.TempDir(), []pciHop{{3, 0}}); err == nil {
		t.Error("a sysfs without the root bus: no error")
	}
}

func TestWaitPCIDevice(t *testing.T) {
	sys := pciFixture(t)
	hops, err := parsePCIPath("06.0/00.0")
	if err != nil {
		t.Fatal(err)
	}
	// Hot-plugged while waited for.
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	want := filepath.Join(sys, "devices/pci0000:00/0000:00:06.0/0000:02:00.0")
	go func() {
		time.Sleep(30 * time.Millisecond)
		os.Mkdir(want, 0o755)
	}()
	dir, err := waitPCIDevice(ctx, sys, hops)
	if err != nil || dir != want {
		t.Fatalf("waitPCIDevice = %q, %v; want %q", dir, err, want)
	}

	// Never there: the error says what was waited for and what was seen.
	hops, _ = parsePCIPath("03.0/02.0")
	ctx, cancel = context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	_, err = waitPCIDevice(ctx, sys, hops)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("waitPCIDevice of a device never plugged: %v, want a deadline error", err)
	}
	for _, s := range []string{"PCI device 03.0/02.0", "only 0000:01:00.0"} {
		if !strings.Contains(err.Error(), s) {
			t.Errorf("error %q does not say %q", err, s)
		}
	}
}

// driverModules writes a modules directory with the drivers of disks and
// returns it.
func driverModules(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	files := map[string]string{
		"modules.dep": `kernel/drivers/block/virtio_blk.ko:
kernel/drivers/nvme/host/nvme.ko: kernel/drivers/nvme/host/nvme-core.ko
kernel/drivers/nvme/host/nvme-core.ko:
kernel/drivers/broken.ko:
`,
		"modules.alias": `alias virtio:d00000002v* virtio_blk
alias pci:v*d*sv*sd*bc01sc08i02* nvme
alias pci:v00001234d00005678sv*sd*bc*sc*i* broken
`,
	}
	for _, m := range []string{"kernel/drivers/block/virtio_blk.ko", "kernel/drivers/nvme/host/nvme.ko",
		"kernel/drivers/nvme/host/nvme-core.ko", "kernel/drivers/broken.ko"} {
		files[m] = "module"
	}
	for name, content := range files {
		p := filepath.Join(dir, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

func TestLoadDeviceDriver(t *testing.T) {
	const nvmeAlias = "pci:v00001B36d00000010sv00001AF4sd00001100bc01sc08i02\n"
	for _, tc := range []struct {
		name    string
		files   map[string]string // in the device's directory
		bound   bool              // a driver bound already
		binds   bool              // loading a module binds the driver
		want    []string          // modules loaded
		late    bool              // the files appear a moment after the device
		wantErr error
	}{
		{name: "virtio", files: map[string]string{"modalias": "virtio:d00000002v00001AF4\n"}, binds: true,
			want: []string{"virtio_blk.ko"}},
		{name: "pci with dependency", files: map[string]string{"modalias": nvmeAlias}, binds: true,
			want: []string{"nvme-core.ko", "nvme.ko"}},
		{name: "bound already", files: map[string]string{"modalias": nvmeAlias}, bound: true},
		{name: "no modalias", wantErr: context.DeadlineExceeded},
		// A hot-plugged device's directory comes before its attributes.
		{name: "modalias late", files: map[string]string{"modalias": nvmeAlias}, late: true, binds: true,
			want: []string{"nvme-core.ko", "nvme.ko"}},
		{name: "no module", files: map[string]string{"modalias": "pci:v00008086d00001234sv0sd0bc02sc00i00"}, wantErr: fs.ErrNotExist},
		{name: "never binds", files: map[string]string{"modalias": "pci:v00001234d00005678sv0sd0bc00sc00i00"},
			want: []string{"broken.ko"}, wantErr: context.DeadlineExceeded},
	} {
		t.Run(tc.name, func(t *testing.T) {
			mods := driverModules(t)
			sys := t.TempDir()
			dev := filepath.Join(sys, "devices/pci0000:00/0000:00:03.0/0000:01:00.0")
			if err := os.MkdirAll(dev, 0o755); err != nil {
				t.Fatal(err)
			}
			write := func() {
				for name, content := range tc.files {
					if err := os.WriteFile(filepath.Join(dev, name), []byte(content), 0o644); err != nil {
						t.Error(err)
					}
				}
			}
			if tc.late {
				timer := time.AfterFunc(30*time.Millisecond, write)
				defer timer.Stop()
			} else {
				write()
			}
			bind := func() {
				if err := os.Symlink("../../../../bus/pci/drivers/x", filepath.Join(dev, "driver")); err != nil {
					t.Fatal(err)
				}
			}
			if tc.bound {
				bind()
			}
			var loaded []string
			p := modprober{dir: mods, sysModules: t.TempDir(), load: func(f *os.File) error {
				loaded = append(loaded, filepath.Base(f.Name()))
				if tc.binds && len(loaded) == len(tc.want) {
					bind()
				}
				return nil
			}}
			ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
			defer cancel()
			err := p.loadDeviceDriver(ctx, dev)
			if tc.wantErr == nil && err != nil || tc.wantErr != nil && !errors.Is(err, tc.wantErr) {
				t.Fatalf("loadDeviceDriver: %v, want %v", err, tc.wantErr)
			}
			if err != nil && !strings.Contains(err.Error(), dev) {
				t.Errorf("error %q does not name the device", err)
			}
			if !slices.Equal(loaded, tc.want) {
				t.Errorf("loaded %v, want %v", loaded, tc.want)
			}
		})
	}
}
