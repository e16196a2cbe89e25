package manager

import (
	"testing"

	bootapi "github.com/containerd/containerd/api/runtime/bootstrap/v1"
	runcoptions "github.com/containerd/containerd/api/types/runc/options"
	runtimeoptions "github.com/containerd/containerd/api/types/runtimeoptions/v1"
	"github.com/containerd/typeurl/v2"
	"google.golang.org/protobuf/types/known/anypb"
)

// TestConfigPath: the ConfigPath runtime option is found among the
// bootstrap extensions `shim start` gets, whatever else is there.
func TestConfigPath(t *testing.T) {
	ext := func(v any) *bootapi.Extension {
		a, err := typeurl.MarshalAnyToProto(v)
		if err != nil {
			t.Fatal(err)
		}
		return &bootapi.Extension{Value: a}
	}
	for _, tc := range []struct {
		name string
		exts []*bootapi.Extension
		want string
	}{
		{"none", nil, ""},
		{"runtime options", []*bootapi.Extension{ext(&runtimeoptions.Options{ConfigPath: "/etc/colo/pod.toml"})}, "/etc/colo/pod.toml"},
		{"runc's options carry none", []*bootapi.Extension{ext(&runcoptions.Options{})}, ""},
		{"beside others", []*bootapi.Extension{
			{Value: &anypb.Any{TypeUrl: "example.com/unknown"}},
			{},
			ext(&runtimeoptions.Options{ConfigPath: "/c.toml"}),
		}, "/c.toml"},
	} {
		if got := configPath(tc.exts); got != tc.want {
			t.Errorf("%s: configPath = %q, want %q", tc.name, got, tc.want)
		}
	}
}
