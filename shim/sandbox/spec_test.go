package sandbox

import (
	"context"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/colo-runtime/colo/agentproto"
)

func TestValidateSpec(t *testing.T) {
	for _, tc := range []struct {
		name   string
		change func(*specs.Spec)
		is     func(error) bool // nil: valid
		msg    string
	}{
		{name: "valid", change: func(*specs.Spec) {}},
		{name: "nil process", change: func(s *specs.Spec) { s.Process = nil }, is: errdefs.IsInvalidArgument, msg: "no process"},
		{name: "no args", change: func(s *specs.Spec) { s.Process.Args = nil }, is: errdefs.IsInvalidArgument, msg: "process.args is empty"},
		{name: "empty arg0", change: func(s *specs.Spec) { s.Process.Args = []string{""} }, is: errdefs.IsInvalidArgument, msg: "process.args[0] is empty"},
		{name: "no cwd", change: func(s *specs.Spec) { s.Process.Cwd = "" }, is: errdefs.IsInvalidArgument, msg: "process.cwd is empty"},
		{name: "relative cwd", change: func(s *specs.Spec) { s.Process.Cwd = "tmp" }, is: errdefs.IsInvalidArgument, msg: `process.cwd "tmp" is not absolute`},
		{name: "no root", change: func(s *specs.Spec) { s.Root = nil }, is: errdefs.IsInvalidArgument, msg: "no root.path"},
		{name: "empty root path", change: func(s *specs.Spec) { s.Root.Path = "" }, is: errdefs.IsInvalidArgument, msg: "no root.path"},
		{name: "no linux", change: func(s *specs.Spec) { s.Linux = nil }, is: errdefs.IsInvalidArgument, msg: "no linux section"},
		{
			name:   "relative mount destination",
			change: func(s *specs.Spec) { s.Mounts = append(s.Mounts, specs.Mount{Destination: "proc", Type: "proc"}) },
			is:     errdefs.IsInvalidArgument, msg: `mounts[1].destination "proc"`,
		},
		{
			name: "host bind mount",
			change: func(s *specs.Spec) {
				s.Mounts = append(s.Mounts, specs.Mount{Destination: "/data", Type: "none", Source: "/srv", Options: []string{"rbind"}})
			},
		},
		{
			name: "relative bind source",
			change: func(s *specs.Spec) {
				s.Mounts = append(s.Mounts, specs.Mount{Destination: "/data", Type: "bind", Source: "srv"})
			},
			is: errdefs.IsInvalidArgument, msg: `mounts[1] (/data): bind source "srv" is not an absolute host path`,
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := testSpec("sh", "-c", "true")
			s.Mounts = []specs.Mount{{Destination: "/proc", Type: "proc", Source: "proc"}}
			tc.change(s)
			err := ValidateSpec(s)
			if tc.is == nil {
				if err != nil {
					t.Fatalf("ValidateSpec: %v", err)
				}
				return
			}
			if err == nil || !tc.is(err) || !strings.Contains(err.Error(), tc.msg) {
				t.Fatalf("ValidateSpec = %v, want an error containing %q of the right kind", err, tc.msg)
			}
		})
	}
	if err := ValidateSpec(nil); !errdefs.IsInvalidArgument(err) {
		t.Errorf("ValidateSpec(nil) = %v", err)
	}
}

func TestGuestSpec(t *testing.T) {
	for _, tc := range []struct {
		name string
		view guestView
		in   func(*specs.Spec)
		want func(*specs.Spec)
	}{
		{
			name: "root rewritten",
			in:   func(s *specs.Spec) { s.Root = &specs.Root{Path: "/var/lib/bundle/rootfs"} },
			want: func(s *specs.Spec) { s.Root = &specs.Root{Path: "/run/colo/shared/c1/rootfs"} },
		},
		{
			name: "readonly kept",
			in:   func(s *specs.Spec) { s.Root = &specs.Root{Path: "rootfs", Readonly: true} },
			want: func(s *specs.Spec) { s.Root = &specs.Root{Path: "/run/colo/shared/c1/rootfs", Readonly: true} },
		},
		{
			name: "hooks dropped",
			in: func(s *specs.Spec) {
				s.Hooks = &specs.Hooks{Prestart: []specs.Hook{{Path: "/usr/bin/nvidia-hook"}}, Poststop: []specs.Hook{{Path: "/bin/x"}}}
			},
			want: func(s *specs.Spec) {},
		},
		{
			name: "namespace paths removed",
			in: func(s *specs.Spec) {
				s.Linux.Namespaces = []specs.LinuxNamespace{
					{Type: specs.PIDNamespace},
					{Type: specs.NetworkNamespace, Path: "/var/run/netns/cni-1234"},
					{Type: specs.IPCNamespace, Path: "/proc/42/ns/ipc"},
					{Type: specs.UTSNamespace, Path: "/proc/42/ns/uts"},
					{Type: specs.MountNamespace},
				}
			},
			want: func(s *specs.Spec) {
				s.Linux.Namespaces = []specs.LinuxNamespace{
					{Type: specs.PIDNamespace},
					{Type: specs.IPCNamespace},
					{Type: specs.UTSNamespace},
					{Type: specs.MountNamespace},
				}
			},
		},
		{
			name: "pod namespaces joined in the guest",
			view: guestView{podPid: 7},
			in: func(s *specs.Spec) {
				s.Linux.Namespaces = []specs.LinuxNamespace{
					{Type: specs.PIDNamespace},
					{Type: specs.NetworkNamespace, Path: "/var/run/netns/cni-1234"},
					{Type: specs.IPCNamespace, Path: "/proc/42/ns/ipc"},
					{Type: specs.UTSNamespace, Path: "/proc/42/ns/uts"},
					{Type: specs.MountNamespace, Path: "/proc/42/ns/mnt"},
				}
			},
			want: func(s *specs.Spec) {
				s.Linux.Namespaces = []specs.LinuxNamespace{
					{Type: specs.PIDNamespace},
					{Type: specs.IPCNamespace, Path: "/proc/7/ns/ipc"},
					{Type: specs.UTSNamespace, Path: "/proc/7/ns/uts"},
					{Type: specs.MountNamespace},
				}
			},
		},
		{
			name: "bind sources from the shared directory",
			view: guestView{binds: map[int]string{1: "/run/colo/shared/c1/mounts/1-data", 2: "/run/colo/shm"}},
			in: func(s *specs.Spec) {
				s.Mounts = []specs.Mount{
					{Destination: "/proc", Type: "proc", Source: "proc"},
					{Destination: "/data", Type: "bind", Source: "/srv/data", Options: []string{"rbind", "ro"}},
					{Destination: "/dev/shm", Type: "bind", Source: "/run/containerd/sandboxes/p/shm", Options: []string{"rbind"}},
				}
			},
			want: func(s *specs.Spec) {
				s.Mounts = []specs.Mount{
					{Destination: "/proc", Type: "proc", Source: "proc"},
					{Destination: "/data", Type: "bind", Source: "/run/colo/shared/c1/mounts/1-data", Options: []string{"rbind", "ro"}},
					{Destination: "/dev/shm", Type: "bind", Source: "/run/colo/shm", Options: []string{"rbind"}},
				}
			},
		},
		{
			name: "CPU class: its guest cgroup, its oom_score_adj, the topology file",
			view: guestView{class: &agentproto.CPUClass{Name: "low", OomScoreAdj: 500}, topology: true},
			in:   func(s *specs.Spec) { s.Linux.CgroupsPath = "/colo-test/c1" },
			want: func(s *specs.Spec) {
				s.Linux.CgroupsPath = "/colo-classes/low/c1"
				adj := 500
				s.Process.OOMScoreAdj = &adj
				s.Mounts = append(s.Mounts, specs.Mount{Destination: "/run/colo/topology.json", Type: "bind", Source: "/run/colo/topology.json", Options: []string{"rbind", "ro"}})
			},
		},
		{
			name: "new network namespace kept",
			in: func(s *specs.Spec) {
				s.Linux.Namespaces = []specs.LinuxNamespace{{Type: specs.NetworkNamespace}, {Type: specs.MountNamespace}}
			},
			want: func(s *specs.Spec) {
				s.Linux.Namespaces = []specs.LinuxNamespace{{Type: specs.NetworkNamespace}, {Type: specs.MountNamespace}}
			},
		},
		{
			name: "the rest untouched",
			in: func(s *specs.Spec) {
				s.Hostname = "box"
				s.Process.Env = []string{"PATH=/bin"}
				s.Mounts = []specs.Mount{{Destination: "/proc", Type: "proc", Source: "proc"}}
				s.Annotations = map[string]string{"a": "b"}
				s.Linux.CgroupsPath = "/default/c1"
			},
			want: func(s *specs.Spec) {
				s.Hostname = "box"
				s.Process.Env = []string{"PATH=/bin"}
				s.Mounts = []specs.Mount{{Destination: "/proc", Type: "proc", Source: "proc"}}
				s.Annotations = map[string]string{"a": "b"}
				s.Linux.CgroupsPath = "/default/c1"
			},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			in := testSpec("true")
			in.Root.Path = "/run/colo/shared/c1/rootfs"
			tc.in(in)
			orig := testSpec("true")
			orig.Root.Path = "/run/colo/shared/c1/rootfs"
			tc.in(orig)

			want := testSpec("true")
			want.Root.Path = "/run/colo/shared/c1/rootfs"
			tc.want(want)

			got, err := GuestSpec(context.Background(), in, "c1", tc.view)
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(got, want) {
				t.Errorf("GuestSpec =\n%+v\nwant\n%+v", got, want)
			}
			if !reflect.DeepEqual(in, orig) {
				t.Errorf("GuestSpec changed its input:\n%+v", in)
			}
		})
	}
}

func TestReadSpec(t *testing.T) {
	dir := t.TempDir()
	if _, err := ReadSpec(dir); !errdefs.IsInvalidArgument(err) {
		t.Errorf("missing config.json: %v", err)
	}
	if err := os.WriteFile(filepath.Join(dir, "config.json"), []byte("{"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := ReadSpec(dir); !errdefs.IsInvalidArgument(err) {
		t.Errorf("broken config.json: %v", err)
	}
	if err := os.WriteFile(filepath.Join(dir, "config.json"), []byte(`{"ociVersion":"1.2.0","process":{"args":["x"],"cwd":"/"}}`), 0o600); err != nil {
		t.Fatal(err)
	}
	s, err := ReadSpec(dir)
	if err != nil || s.Process.Args[0] != "x" {
		t.Errorf("ReadSpec = %+v, %v", s, err)
	}
}

func TestStdioValidate(t *testing.T) {
	for _, tc := range []struct {
		name  string
		stdio Stdio
		is    func(error) bool
	}{
		{"none", Stdio{}, nil},
		{"fifos", Stdio{Stdin: "/run/containerd/fifo/1/c-stdin", Stdout: "/run/containerd/fifo/1/c-stdout", Stderr: "/x/c-stderr"}, nil},
		{"unknown scheme", Stdio{Stdout: "syslog://x"}, errdefs.IsNotImplemented},
		{"log URI for stdin", Stdio{Stdin: "file:///var/log/c.log"}, errdefs.IsInvalidArgument},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.stdio.Validate()
			if tc.is == nil {
				if err != nil {
					t.Fatal(err)
				}
				return
			}
			if !tc.is(err) {
				t.Fatalf("validate = %v", err)
			}
		})
	}
}
