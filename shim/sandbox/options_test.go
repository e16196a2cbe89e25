package sandbox

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	runcoptions "github.com/containerd/containerd/api/types/runc/options"
	runtimeoptions "github.com/containerd/containerd/api/types/runtimeoptions/v1"
	"github.com/containerd/errdefs"
	"github.com/containerd/typeurl/v2"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/emptypb"

	"github.com/colo-runtime/colo/config"
)

func anyOf(t *testing.T, v any) *anypb.Any {
	t.Helper()
	a, err := typeurl.MarshalAnyToProto(v)
	if err != nil {
		t.Fatal(err)
	}
	return a
}

func TestConfigPath(t *testing.T) {
	for _, tc := range []struct {
		name    string
		opts    func(*testing.T) *anypb.Any
		want    string
		wantErr bool
	}{
		{name: "none", opts: func(*testing.T) *anypb.Any { return nil }},
		{name: "empty any", opts: func(*testing.T) *anypb.Any { return &anypb.Any{} }},
		{
			name: "runtimeoptions",
			opts: func(t *testing.T) *anypb.Any {
				return anyOf(t, &runtimeoptions.Options{ConfigPath: "/etc/colo/fast.toml"})
			},
			want: "/etc/colo/fast.toml",
		},
		{
			name: "runtimeoptions without a path (CRI options table)",
			opts: func(t *testing.T) *anypb.Any { return anyOf(t, &runtimeoptions.Options{ConfigBody: []byte("x = 1")}) },
		},
		{
			name: "runc options",
			opts: func(t *testing.T) *anypb.Any { return anyOf(t, &runcoptions.Options{BinaryName: "runc"}) },
		},
		{
			name:    "other type",
			opts:    func(t *testing.T) *anypb.Any { return anyOf(t, &emptypb.Empty{}) },
			wantErr: true,
		},
		{
			name:    "unknown type",
			opts:    func(*testing.T) *anypb.Any { return &anypb.Any{TypeUrl: "example.com/Nope", Value: []byte{1}} },
			wantErr: true,
		},
		{
			name: "garbage",
			opts: func(*testing.T) *anypb.Any {
				return &anypb.Any{TypeUrl: "runtimeoptions.v1.Options", Value: []byte{0xff, 0xff}}
			},
			wantErr: true,
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := ConfigPath(tc.opts(t))
			if tc.wantErr {
				if !errdefs.IsInvalidArgument(err) {
					t.Fatalf("ConfigPath = %q, %v; want an invalid argument error", got, err)
				}
				return
			}
			if err != nil || got != tc.want {
				t.Fatalf("ConfigPath = %q, %v; want %q", got, err, tc.want)
			}
		})
	}
}

func TestLoadConfig(t *testing.T) {
	dir := t.TempDir()
	write := func(name, body string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	fromOption := write("option.toml", "[hypervisor]\nvcpus = 2\n")
	fromEnv := write("env.toml", "[hypervisor]\nvcpus = 3\n")
	broken := write("broken.toml", "[hypervisor]\nvcpu = 2\n")

	for _, tc := range []struct {
		name    string
		env     string
		opts    *anypb.Any
		vcpus   int
		wantErr string
	}{
		{name: "option wins over env", env: fromEnv, opts: anyOf(t, &runtimeoptions.Options{ConfigPath: fromOption}), vcpus: 2},
		{name: "env", env: fromEnv, vcpus: 3},
		{name: "env with runc options", env: fromEnv, opts: anyOf(t, &runcoptions.Options{}), vcpus: 3},
		{name: "missing option file", opts: anyOf(t, &runtimeoptions.Options{ConfigPath: filepath.Join(dir, "nope.toml")}), wantErr: "nope.toml"},
		{name: "missing env file", env: filepath.Join(dir, "nope.toml"), wantErr: "nope.toml"},
		{name: "broken file", env: broken, wantErr: "vcpu"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Setenv(config.EnvPath, tc.env)
			c, err := LoadConfig(tc.opts)
			if tc.wantErr != "" {
				if !errdefs.IsInvalidArgument(err) || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("LoadConfig: %v, want an invalid argument error naming %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if c.Hypervisor.VCPUs != tc.vcpus {
				t.Errorf("vcpus = %d, want %d", c.Hypervisor.VCPUs, tc.vcpus)
			}
			if c.Hypervisor.BootTimeout != config.Duration(30*time.Second) {
				t.Errorf("defaults not kept: boot_timeout = %s", c.Hypervisor.BootTimeout)
			}
		})
	}
}
