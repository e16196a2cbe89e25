package agent

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containerd/errdefs"
	"github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"

	"github.com/colo-runtime/colo/agentproto"
)

const (
	keyA = "00112233445566778899aabbccddeeff"
	keyB = "ffeeddccbbaa99887766554433221100"
)

// volumeSpec is a spec with a volume mount at /data from the container's
// share path, with opts, and the annotation ann.
func volumeSpec(id, ann string, opts ...string) *specs.Spec {
	s := &specs.Spec{Mounts: []specs.Mount{
		{Destination: "/proc", Type: "proc", Source: "proc"},
		{Destination: "/data", Type: "bind", Source: "/run/colo/shared/" + id + "/mounts/1-data", Options: append([]string{"rbind"}, opts...)},
	}}
	if ann != "" {
		s.Annotations = map[string]string{agentproto.SharedVolumesAnnotation: ann}
	}
	return s
}

func TestParseSharedVolumes(t *testing.T) {
	for _, tc := range []struct {
		name    string
		spec    *specs.Spec
		want    []volumeMount
		invalid bool
	}{
		{name: "none", spec: volumeSpec("c", "", "rshared")},
		{name: "rshared", spec: volumeSpec("c", `{"1":{"key":"`+keyA+`"}}`, "rshared"),
			want: []volumeMount{{index: 1, vol: agentproto.SharedVolume{Key: keyA}}}},
		{name: "rslave read-only", spec: volumeSpec("c", `{"1":{"key":"`+keyA+`","readOnly":true}}`, "rslave", "ro"),
			want: []volumeMount{{index: 1, vol: agentproto.SharedVolume{Key: keyA, ReadOnly: true}}}},
		// A private mount is not made to take another's source, whatever
		// the annotation says.
		{name: "rprivate left alone", spec: volumeSpec("c", `{"1":{"key":"`+keyA+`"}}`, "rprivate")},
		{name: "no propagation left alone", spec: volumeSpec("c", `{"1":{"key":"`+keyA+`"}}`)},
		{name: "not json", spec: volumeSpec("c", `1=`+keyA, "rshared"), invalid: true},
		{name: "index out of range", spec: volumeSpec("c", `{"2":{"key":"`+keyA+`"}}`, "rshared"), invalid: true},
		{name: "negative index", spec: volumeSpec("c", `{"-1":{"key":"`+keyA+`"}}`, "rshared"), invalid: true},
		{name: "not a bind", spec: volumeSpec("c", `{"0":{"key":"`+keyA+`"}}`, "rshared"), invalid: true},
		{name: "key not hex", spec: volumeSpec("c", `{"1":{"key":"../../etc"}}`, "rshared"), invalid: true},
		{name: "empty key", spec: volumeSpec("c", `{"1":{"key":""}}`, "rshared"), invalid: true},
		{name: "source outside the share", spec: func() *specs.Spec {
			s := volumeSpec("c", `{"1":{"key":"`+keyA+`"}}`, "rshared")
			s.Mounts[1].Source = "/run/colo/shared/../../etc"
			return s
		}(), invalid: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := parseSharedVolumes(tc.spec)
			if tc.invalid {
				if !errdefs.IsInvalidArgument(err) {
					t.Fatalf("got %v, %v; want an invalid argument error", got, err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if len(got) != len(tc.want) || (len(got) > 0 && got[0] != tc.want[0]) {
				t.Errorf("got %+v, want %+v", got, tc.want)
			}
		})
	}
}

// fakeShares records binds and unmounts instead of making them.
type fakeShares struct {
	bound, unmounted []string
	failBind         bool
}

func (f *fakeShares) shares() *volumeShares {
	return &volumeShares{
		dir: "/run/colo/volumes",
		bind: func(src, dst string) error {
			if f.failBind {
				return errors.New("bind failed")
			}
			f.bound = append(f.bound, src+" -> "+dst)
			return nil
		},
		unmount: func(dst string) error {
			f.unmounted = append(f.unmounted, dst)
			return nil
		},
		vols: map[string]*volumeShare{},
	}
}

func TestVolumeSharesLifetime(t *testing.T) {
	ctx := context.Background()
	var f fakeShares
	s := f.shares()
	volA := "/run/colo/volumes/" + keyA

	// The first container binds the volume's mount point from its share
	// path; the second only takes it as its source.
	a := volumeSpec("a", `{"1":{"key":"`+keyA+`"}}`, "rshared")
	if err := s.share(ctx, "a", a); err != nil {
		t.Fatal(err)
	}
	b := volumeSpec("b", `{"1":{"key":"`+keyA+`"}}`, "rslave")
	if err := s.share(ctx, "b", b); err != nil {
		t.Fatal(err)
	}
	if a.Mounts[1].Source != volA || b.Mounts[1].Source != volA {
		t.Errorf("sources %s and %s, want both %s", a.Mounts[1].Source, b.Mounts[1].Source, volA)
	}
	if want := []string{"/run/colo/shared/a/mounts/1-data -> " + volA}; strings.Join(f.bound, ";") != strings.Join(want, ";") {
		t.Errorf("binds %q, want %q", f.bound, want)
	}
	// A private container's mount keeps its own source.
	c := volumeSpec("c", "", "rprivate")
	if err := s.share(ctx, "c", c); err != nil || c.Mounts[1].Source != "/run/colo/shared/c/mounts/1-data" {
		t.Errorf("private container: source %s, %v", c.Mounts[1].Source, err)
	}

	// The mount point stays while a container uses it.
	s.release(ctx, "a")
	s.release(ctx, "c")
	if len(f.unmounted) != 0 {
		t.Errorf("unmounted %q with b still using it", f.unmounted)
	}
	s.release(ctx, "b")
	if len(f.unmounted) != 1 || f.unmounted[0] != volA || len(s.vols) != 0 {
		t.Errorf("unmounted %q, left %v; want %s gone", f.unmounted, s.vols, volA)
	}
}

func TestVolumeSharesReadOnly(t *testing.T) {
	ctx := context.Background()
	var f fakeShares
	s := f.shares()
	volA := "/run/colo/volumes/" + keyA

	// A mount point bound from a read-only share path serves read-only
	// mounts only: a writable one keeps its own source.
	ro := volumeSpec("ro", `{"1":{"key":"`+keyA+`","readOnly":true}}`, "rslave", "ro")
	if err := s.share(ctx, "ro", ro); err != nil {
		t.Fatal(err)
	}
	rw := volumeSpec("rw", `{"1":{"key":"`+keyA+`"}}`, "rshared")
	if err := s.share(ctx, "rw", rw); err != nil {
		t.Fatal(err)
	}
	if ro.Mounts[1].Source != volA || rw.Mounts[1].Source != "/run/colo/shared/rw/mounts/1-data" {
		t.Errorf("sources: read-only %s, writable %s", ro.Mounts[1].Source, rw.Mounts[1].Source)
	}
	// The other way round, a read-only mount is served by a writable
	// point: libcontainer makes its bind read-only.
	rw2 := volumeSpec("rw2", `{"1":{"key":"`+keyB+`"}}`, "rshared")
	ro2 := volumeSpec("ro2", `{"1":{"key":"`+keyB+`","readOnly":true}}`, "rslave", "ro")
	for id, sp := range map[string]*specs.Spec{"rw2": rw2} {
		if err := s.share(ctx, id, sp); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.share(ctx, "ro2", ro2); err != nil {
		t.Fatal(err)
	}
	if volB := "/run/colo/volumes/" + keyB; ro2.Mounts[1].Source != volB {
		t.Errorf("read-only mount of a writable volume: source %s, want %s", ro2.Mounts[1].Source, volB)
	}
}

func TestVolumeSharesBindFails(t *testing.T) {
	f := fakeShares{failBind: true}
	s := f.shares()
	sp := volumeSpec("a", `{"1":{"key":"`+keyA+`"}}`, "rshared")
	if err := s.share(context.Background(), "a", sp); err == nil {
		t.Fatal("share succeeded with the bind failing")
	}
	if len(s.vols) != 0 || sp.Mounts[1].Source != "/run/colo/shared/a/mounts/1-data" {
		t.Errorf("left %v, source %s", s.vols, sp.Mounts[1].Source)
	}
}

// TestBindSharedPropagates checks the kernel side as root: two binds of a
// volume's mount point, one shared and one slave, as libcontainer makes
// the containers' binds, receive a mount made in the shared one; a
// private bind of the share path itself does not.
func TestBindSharedPropagates(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("needs root")
	}
	// A private namespace of this test's own would be neater, but the
	// mounts are below a temporary directory bound private first.
	root := t.TempDir()
	if err := unix.Mount("tmpfs", root, "tmpfs", 0, ""); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = unix.Unmount(root, unix.MNT_DETACH) })
	if err := unix.Mount("", root, "", unix.MS_PRIVATE, ""); err != nil {
		t.Fatal(err)
	}
	share := filepath.Join(root, "share", "c", "mounts", "1-data")
	if err := os.MkdirAll(share, 0o755); err != nil {
		t.Fatal(err)
	}
	vol := filepath.Join(root, "volumes", keyA)
	if err := bindShared(share, vol); err != nil {
		t.Fatal(err)
	}
	bindAs := func(name, src string, flag uintptr) string {
		dst := filepath.Join(root, name)
		if err := os.Mkdir(dst, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := unix.Mount(src, dst, "", unix.MS_BIND|unix.MS_REC, ""); err != nil {
			t.Fatal(err)
		}
		if err := unix.Mount("", dst, "", flag|unix.MS_REC, ""); err != nil {
			t.Fatal(err)
		}
		return dst
	}
	mounter := bindAs("mounter", vol, unix.MS_SHARED)
	slave := bindAs("slave", vol, unix.MS_SLAVE)
	private := bindAs("private", share, unix.MS_PRIVATE)

	if err := os.Mkdir(filepath.Join(mounter, "sub"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount("propagated", filepath.Join(mounter, "sub"), "tmpfs", 0, ""); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(mounter, "sub", "f"), []byte("hello"), 0o644); err != nil {
		t.Fatal(err)
	}
	if b, err := os.ReadFile(filepath.Join(slave, "sub", "f")); err != nil || string(b) != "hello" {
		t.Errorf("slave: %q, %v; want the mounter's tmpfs", b, err)
	}
	if _, err := os.Stat(filepath.Join(private, "sub", "f")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("private bind of the share path: %v; want the tmpfs not there", err)
	}
	// Nor does the mount reach the share path the volume was bound from.
	if _, err := os.Stat(filepath.Join(share, "sub", "f")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("share path: %v; want the tmpfs not there", err)
	}
	if err := unmountDetached(vol); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(vol); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("volume mount point left: %v", err)
	}
}
