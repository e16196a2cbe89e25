package agent

import (
	"context"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

func TestParseCmdline(t *testing.T) {
	tests := []struct {
		name    string
		cmdline string
		want    BootParams
		errs    int
	}{
		{"defaults", "console=ttyS0 quiet", BootParams{ChannelSerial, "warn"}, 0},
		{"empty", "", BootParams{ChannelSerial, "warn"}, 0},
		{"vsock and debug", "console=ttyS0 colo.channel=vsock colo.log=debug\n", BootParams{ChannelVsock, "debug"}, 0},
		{"serial and error", "colo.log=error colo.channel=serial", BootParams{ChannelSerial, "error"}, 0},
		{"last one wins", "colo.log=info colo.log=trace", BootParams{ChannelSerial, "trace"}, 0},
		{"bad values keep defaults", "colo.channel=tcp colo.log=loud", BootParams{ChannelSerial, "warn"}, 2},
		{"no value", "colo.channel colo.log=", BootParams{ChannelSerial, "warn"}, 2},
		{"other prefixes ignored", "xcolo.channel=vsock colo.channelx=vsock", BootParams{ChannelSerial, "warn"}, 0},
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

func TestHoldCgroupKeys(t *testing.T) {
	root := t.TempDir()
	for range 2 { // the second finds it there
		holdCgroupKeys(context.Background(), root)
		if fi, err := os.Stat(filepath.Join(root, keysCgroup)); err != nil || !fi.IsDir() {
			t.Fatalf("the keys cgroup: %v, %v", fi, err)
		}
	}
}
