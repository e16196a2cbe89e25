package sandbox

import (
	"context"
	"encoding/json"
	"testing"

	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/colo-runtime/colo/agentproto"
)

// TestGuestSpecSharedVolumes: GuestSpec names the bind mounts whose
// propagation receives mounts (CRI's Bidirectional: rshared,
// HostToContainer: rslave), with one key per host source and recursion,
// for the agent to bind them from one shared mount point in the guest;
// private mounts are left out, and an annotation from the spec's author
// is dropped.
func TestGuestSpecSharedVolumes(t *testing.T) {
	vol := func(src string, opts ...string) specs.Mount {
		return specs.Mount{Destination: "/data", Type: "bind", Source: src, Options: opts}
	}
	keyData := volumeKey(vol("/var/lib/kubelet/pods/p/volumes/data", "rbind"))
	for _, tc := range []struct {
		name   string
		mounts []specs.Mount
		author string // the spec's own annotation
		want   map[string]agentproto.SharedVolume
	}{
		{name: "private", mounts: []specs.Mount{vol("/var/lib/kubelet/pods/p/volumes/data", "rbind", "rprivate", "rw")}},
		{name: "no propagation", mounts: []specs.Mount{vol("/var/lib/kubelet/pods/p/volumes/data", "rbind", "rw")}},
		{name: "bidirectional", mounts: []specs.Mount{vol("/var/lib/kubelet/pods/p/volumes/data", "rbind", "rshared", "rw")},
			want: map[string]agentproto.SharedVolume{"0": {Key: keyData}}},
		{name: "host to container, unclean path", mounts: []specs.Mount{vol("/var/lib/kubelet/pods/p/volumes//data/", "rbind", "rslave", "rw")},
			want: map[string]agentproto.SharedVolume{"0": {Key: keyData}}},
		{name: "read-only", mounts: []specs.Mount{vol("/var/lib/kubelet/pods/p/volumes/data", "rbind", "rslave", "ro")},
			want: map[string]agentproto.SharedVolume{"0": {Key: keyData, ReadOnly: true}}},
		{name: "recursively read-only", mounts: []specs.Mount{vol("/var/lib/kubelet/pods/p/volumes/data", "rbind", "rslave", "rro")},
			want: map[string]agentproto.SharedVolume{"0": {Key: keyData, ReadOnly: true}}},
		{name: "non-recursive bind is another volume", mounts: []specs.Mount{vol("/var/lib/kubelet/pods/p/volumes/data", "bind", "rshared")},
			want: map[string]agentproto.SharedVolume{"0": {Key: volumeKey(vol("/var/lib/kubelet/pods/p/volumes/data", "bind"))}}},
		{name: "shm left out", mounts: []specs.Mount{{Destination: "/dev/shm", Type: "bind", Source: "/run/shm", Options: []string{"rbind", "rshared"}}}},
		{name: "author's annotation dropped", author: `{"0":{"key":"00"}}`,
			mounts: []specs.Mount{vol("/var/lib/kubelet/pods/p/volumes/data", "rbind", "rprivate")}},
		{name: "index of the mount", mounts: []specs.Mount{
			vol("/var/lib/kubelet/pods/p/volumes/a", "rbind", "rprivate"),
			{Destination: "/proc", Type: "proc", Source: "proc"},
			vol("/var/lib/kubelet/pods/p/volumes/data", "rbind", "rshared"),
		}, want: map[string]agentproto.SharedVolume{"2": {Key: keyData}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := &specs.Spec{Root: &specs.Root{Path: "rootfs"}, Mounts: tc.mounts}
			if tc.author != "" {
				s.Annotations = map[string]string{agentproto.SharedVolumesAnnotation: tc.author}
			}
			binds := map[int]string{}
			for i, m := range s.Mounts {
				switch {
				case m.Destination == "/dev/shm":
					binds[i] = agentproto.SandboxShm
				case isBind(m):
					binds[i] = "/run/colo/shared/c1/mounts/x"
				}
			}
			g, err := GuestSpec(context.Background(), s, "c1", guestView{binds: binds})
			if err != nil {
				t.Fatal(err)
			}
			ann, ok := g.Annotations[agentproto.SharedVolumesAnnotation]
			if tc.want == nil {
				if ok {
					t.Fatalf("annotation %q, want none", ann)
				}
				return
			}
			var got map[string]agentproto.SharedVolume
			if err := json.Unmarshal([]byte(ann), &got); err != nil {
				t.Fatalf("annotation %q: %v", ann, err)
			}
			if len(got) != len(tc.want) {
				t.Fatalf("got %v, want %v", got, tc.want)
			}
			for i, w := range tc.want {
				if got[i] != w {
					t.Errorf("mount %s: got %+v, want %+v", i, got[i], w)
				}
			}
		})
	}
	if a, b := volumeKey(vol("/a", "rbind")), volumeKey(vol("/b", "rbind")); a == b {
		t.Errorf("two sources, one key %s", a)
	}
}
