package agent

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"testing"

	"github.com/opencontainers/runc/libcontainer/exeseal"
)

func TestParseCmdline(t *testing.T) {
	tests := []struct {
		name    string
		cmdline string
		want    BootParams
		errs    int
	}{
		{"defaults", "console=ttyS0 quiet", BootParams{ChannelSerial, "warn", true}, 0},
		{"empty", "", BootParams{ChannelSerial, "warn", true}, 0},
		{"vsock and debug", "console=ttyS0 colo.channel=vsock colo.log=debug\n", BootParams{ChannelVsock, "debug", true}, 0},
		{"serial and error", "colo.log=error colo.channel=serial", BootParams{ChannelSerial, "error", true}, 0},
		{"last one wins", "colo.log=info colo.log=trace", BootParams{ChannelSerial, "trace", true}, 0},
		{"bad values keep defaults", "colo.channel=tcp colo.log=loud", BootParams{ChannelSerial, "warn", true}, 2},
		{"no value", "colo.channel colo.log=", BootParams{ChannelSerial, "warn", true}, 2},
		{"unsealed", "colo.sealed_exe=0", BootParams{ChannelSerial, "warn", false}, 0},
		{"sealed", "colo.sealed_exe=0 colo.sealed_exe=1", BootParams{ChannelSerial, "warn", true}, 0},
		{"bad sealed value", "colo.sealed_exe=yes", BootParams{ChannelSerial, "warn", true}, 1},
		{"other prefixes ignored", "xcolo.channel=vsock colo.channelx=vsock", BootParams{ChannelSerial, "warn", true}, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, errs := ParseCmdline(tt.cmdline)
			if got != tt.want {
				t.Errorf("ParseCmdline(%q) = %+v, want %+v", tt.cmdline, got, tt.want)
			}
			if len(errs) != tt.errs {
				t.Errorf("ParseCmdline(%q) errors = %v, want %d", tt.cmdline, errs, tt.errs)
			}
		})
	}
}

func TestParseModuleList(t *testing.T) {
	list := "# virtio\nvirtio_ring\n\n  virtio.ko  \nlib/modules/x/kernel/fs/9p/9p.ko\n"
	got, err := parseModuleList(strings.NewReader(list))
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"virtio_ring", "virtio.ko", "lib/modules/x/kernel/fs/9p/9p.ko"}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("parseModuleList = %q, want %q", got, want)
	}
}

func TestModuleResolver(t *testing.T) {
	dir := t.TempDir()
	for _, f := range []string{
		"kernel/drivers/virtio/virtio_ring.ko",
		"kernel/drivers/char/virtio_console.ko",
		"kernel/lib/crc-t10dif.ko",
		"kernel/fs/fuse/virtiofs.ko.xz",
		"modules.dep",
	} {
		p := filepath.Join(dir, f)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, nil, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	r := &moduleResolver{dir: dir}
	tests := []struct {
		entry string
		want  string // "" for not found
	}{
		{"virtio_ring", filepath.Join(dir, "kernel/drivers/virtio/virtio_ring.ko")},
		{"virtio-console", filepath.Join(dir, "kernel/drivers/char/virtio_console.ko")},
		{"virtio_console.ko", filepath.Join(dir, "kernel/drivers/char/virtio_console.ko")},
		{"crc_t10dif", filepath.Join(dir, "kernel/lib/crc-t10dif.ko")},
		{"virtiofs", filepath.Join(dir, "kernel/fs/fuse/virtiofs.ko.xz")},
		{"lib/modules/6.1.0/kernel/fs/9p/9p.ko", "/lib/modules/6.1.0/kernel/fs/9p/9p.ko"},
		{"modules", ""},
		{"vsock", ""},
	}
	for _, tt := range tests {
		got, err := r.resolve(tt.entry)
		if tt.want == "" {
			if !errors.Is(err, fs.ErrNotExist) {
				t.Errorf("resolve(%q) = %q, %v; want ErrNotExist", tt.entry, got, err)
			}
			continue
		}
		if err != nil || got != tt.want {
			t.Errorf("resolve(%q) = %q, %v; want %q", tt.entry, got, err, tt.want)
		}
	}
}

// The service's sealed copy is what lets libcontainer skip sealing a copy
// per container process: it must pass libcontainer's own check, and be
// unwritable.
func TestSealedSelf(t *testing.T) {
	f, err := sealedSelf()
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if !exeseal.IsCloned(f) {
		t.Fatal("the sealed copy does not pass exeseal.IsCloned")
	}
	self, err := os.Stat("/proc/self/exe")
	if err != nil {
		t.Fatal(err)
	}
	if st, err := f.Stat(); err != nil || st.Size() != self.Size() {
		t.Fatalf("copy: %v, %v; want %d bytes", st, err, self.Size())
	}
	w, err := os.OpenFile("/proc/self/fd/"+strconv.Itoa(int(f.Fd())), os.O_WRONLY, 0)
	if err == nil {
		_, err = w.Write([]byte("x"))
		w.Close()
	}
	if err == nil {
		t.Fatal("wrote to the sealed copy")
	}
}
