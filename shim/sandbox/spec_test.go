package sandbox

import (
	"context"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

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

func TestValidateSpecHooks(t *testing.T) {
	for _, tc := range []struct {
		name  string
		hooks *specs.Hooks
		want  []string // substrings of the error; none: valid
	}{
		{name: "none"},
		{name: "empty", hooks: &specs.Hooks{}},
		{
			name:  "prestart",
			hooks: &specs.Hooks{Prestart: []specs.Hook{{Path: "/usr/bin/nvidia-container-runtime-hook", Args: []string{"prestart"}}}},
			want:  []string{"hooks.prestart[0] /usr/bin/nvidia-container-runtime-hook", "host binary", "VM", "base_runtime_spec"},
		},
		{
			name: "every kind, each named",
			hooks: &specs.Hooks{
				CreateRuntime:   []specs.Hook{{Path: "/bin/a"}, {Path: "/bin/b"}},
				CreateContainer: []specs.Hook{{Path: "/bin/c"}},
				StartContainer:  []specs.Hook{{Path: "/bin/d"}},
				Poststart:       []specs.Hook{{Path: "/bin/e"}},
				Poststop:        []specs.Hook{{Path: "/bin/f"}},
			},
			want: []string{
				"hooks.createRuntime[0] /bin/a", "hooks.createRuntime[1] /bin/b", "hooks.createContainer[0] /bin/c",
				"hooks.startContainer[0] /bin/d", "hooks.poststart[0] /bin/e", "hooks.poststop[0] /bin/f",
			},
		},
		{
			name:  "many: the first named, the rest counted",
			hooks: &specs.Hooks{Poststop: make([]specs.Hook, 20)},
			want:  []string{"hooks.poststop[7] ", "and 12 more"},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := testSpec("true")
			s.Hooks = tc.hooks
			err := ValidateSpec(s)
			if len(tc.want) == 0 {
				if err != nil {
					t.Fatal(err)
				}
				return
			}
			if !errdefs.IsNotImplemented(err) {
				t.Fatalf("ValidateSpec = %v, want not implemented", err)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q lacks %q", err, w)
				}
			}
			if _, err := GuestSpec(context.Background(), s, "c1", guestView{}); !errdefs.IsNotImplemented(err) {
				t.Errorf("GuestSpec = %v, want the hooks refused there too", err)
			}
		})
	}
}

func TestValidateSpecDevices(t *testing.T) {
	dev := func(path, typ string, major, minor int64) specs.LinuxDevice {
		return specs.LinuxDevice{Path: path, Type: typ, Major: major, Minor: minor}
	}
	for _, tc := range []struct {
		name    string
		devices []specs.LinuxDevice
		is      func(error) bool // nil: valid
		want    []string
	}{
		{name: "none"},
		{
			name: "runc's defaults, console, ptmx, fuse",
			devices: []specs.LinuxDevice{
				dev("/dev/null", "c", 1, 3), dev("/dev/zero", "c", 1, 5), dev("/dev/full", "c", 1, 7),
				dev("/dev/random", "c", 1, 8), dev("/dev/urandom", "c", 1, 9), dev("/dev/tty", "c", 5, 0),
				dev("/dev/console", "c", 5, 1), dev("/dev/ptmx", "c", 5, 2), dev("/dev/fuse", "c", 10, 229),
			},
		},
		{name: "a default at another path, unbuffered", devices: []specs.LinuxDevice{dev("/dev/sink", "u", 1, 3)}},
		{name: "a FIFO", devices: []specs.LinuxDevice{dev("/dev/fifo", "p", 0, 0)}},
		{
			name:    "a block device",
			devices: []specs.LinuxDevice{dev("/dev/null", "c", 1, 3), dev("/dev/sda", "b", 8, 0)},
			is:      errdefs.IsNotImplemented,
			want:    []string{"linux.devices[1] /dev/sda (b 8:0)", "docs/devices.md", "privileged_without_host_devices = true"},
		},
		{
			name:    "a GPU and a tun",
			devices: []specs.LinuxDevice{dev("/dev/nvidia0", "c", 195, 0), dev("/dev/net/tun", "c", 10, 200)},
			is:      errdefs.IsNotImplemented,
			want:    []string{"linux.devices[0] /dev/nvidia0 (c 195:0)", "linux.devices[1] /dev/net/tun (c 10:200)"},
		},
		{
			name:    "a default's path, another device",
			devices: []specs.LinuxDevice{dev("/dev/null", "c", 4, 0)},
			is:      errdefs.IsNotImplemented,
			want:    []string{"/dev/null (c 4:0)"},
		},
		{
			name:    "a block device with a default's numbers",
			devices: []specs.LinuxDevice{dev("/dev/null", "b", 1, 3)},
			is:      errdefs.IsNotImplemented,
			want:    []string{"/dev/null (b 1:3)"},
		},
		{
			name:    "all the host's devices",
			devices: slices.Repeat([]specs.LinuxDevice{dev("/dev/sdb", "b", 8, 16)}, 300),
			is:      errdefs.IsNotImplemented,
			want:    []string{"linux.devices[7] /dev/sdb", "and 292 more"},
		},
		{
			name:    "no such type",
			devices: []specs.LinuxDevice{dev("/dev/x", "z", 1, 3)},
			is:      errdefs.IsInvalidArgument,
			want:    []string{`linux.devices[0] /dev/x: type "z"`},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := testSpec("true")
			s.Linux.Devices = tc.devices
			err := ValidateSpec(s)
			if tc.is == nil {
				if err != nil {
					t.Fatal(err)
				}
				return
			}
			if !tc.is(err) {
				t.Fatalf("ValidateSpec = %v, want an error of the right kind", err)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q lacks %q", err, w)
				}
			}
			if n := len(err.Error()); n > 2000 {
				t.Errorf("error of %d bytes", n)
			}
		})
	}
}

func TestValidateSpecAnnotations(t *testing.T) {
	for _, tc := range []struct {
		name        string
		annotations map[string]string
		want        string // in an invalid argument error; "": valid
	}{
		{name: "none"},
		{name: "known", annotations: map[string]string{ClassAnnotation: "low", VCPUsAnnotation: "high,low", PodWeightAnnotation: "2", OverheadIdleAnnotation: "true"}},
		{name: "others", annotations: map[string]string{"io.kubernetes.cri.sandbox-id": "p", "io.colonel": "x", "colo.class": "low"}},
		{name: "unknown", annotations: map[string]string{"io.colo.klass": "low"}, want: "annotation io.colo.klass: colo knows no such annotation (it knows io.colo.class, "},
		{name: "unknown, long", annotations: map[string]string{"io.colo." + strings.Repeat("x", 5000): "1"}, want: "bytes): colo knows no such annotation"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := testSpec("true")
			s.Annotations = tc.annotations
			err := ValidateSpec(s)
			if tc.want == "" {
				if err != nil {
					t.Fatal(err)
				}
				return
			}
			if !errdefs.IsInvalidArgument(err) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("ValidateSpec = %v, want an invalid argument with %q", err, tc.want)
			}
			if n := len(err.Error()); n > 1000 {
				t.Errorf("error of %d bytes", n)
			}
		})
	}
}

func TestClip(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"c1", "c1"},
		{"", ""},
		{"a\nb\x1b[2Jc", "a?b?[2Jc"},
		{strings.Repeat("x", maxLogged), strings.Repeat("x", maxLogged)},
		{strings.Repeat("x", maxLogged+1), strings.Repeat("x", maxLogged) + "...(129 bytes)"},
		// Not cut inside a character.
		{strings.Repeat("x", maxLogged-1) + "é", strings.Repeat("x", maxLogged-1) + "...(129 bytes)"},
	} {
		if got := clip(tc.in); got != tc.want {
			t.Errorf("clip(%q) = %q, want %q", tc.in, got, tc.want)
		}
	}
}

func TestLogLimit(t *testing.T) {
	start := time.Unix(1000, 0)
	for _, tc := range []struct {
		name string
		// at are the times of the warnings, after start.
		at []time.Duration
		// logged are the ones let through, each with the count held back
		// before it.
		logged map[int]int
	}{
		{name: "the burst", at: []time.Duration{0, 0, 0}, logged: map[int]int{0: 0, 1: 0, 2: 0}},
		{
			name:   "then one an interval",
			at:     []time.Duration{0, 0, 0, 1, 2, 59 * time.Second, time.Minute, time.Minute + 1, 3 * time.Minute},
			logged: map[int]int{0: 0, 1: 0, 2: 0, 6: 3, 8: 1},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			l := logLimit{burst: 3, every: time.Minute}
			for i, d := range tc.at {
				ok, held := l.allow(start.Add(d))
				wantHeld, want := tc.logged[i]
				if ok != want || held != wantHeld {
					t.Errorf("warning %d at %s: allow = %v, %d; want %v, %d", i, d, ok, held, want, wantHeld)
				}
			}
		})
	}
}

// TestOOMForeignContainer: the guest names the container of an OOM event;
// an event for a container not in the sandbox is not published.
func TestOOMForeignContainer(t *testing.T) {
	e := newEnv(t, false)
	ooms := make(chan string, 10)
	opts := e.options(e.config("9p"))
	opts.OnOOM = func(id string) { ooms <- id }
	cc := e.container("cat")
	cc.Stdio = Stdio{}
	ctx, hook := logged()
	sb, _, err := Create(ctx, opts, cc)
	if err != nil {
		t.Fatal(err)
	}
	shutdownAtEnd(t, sb)
	for _, tc := range []struct {
		name, id  string
		published bool
	}{
		{"another pod's container", "c2", false},
		{"no container", "", false},
		{"a huge id", strings.Repeat("x", 1<<16), false},
		{"the sandbox's container", "c1", true},
		{"a path", "../c1", false},
	} {
		e.drv.agent.oomEvents <- tc.id
		if !tc.published {
			continue
		}
		// Events are taken in order: the dropped ones before it would
		// have been published first.
		select {
		case id := <-ooms:
			if id != tc.id {
				t.Errorf("%s: OOM event for %q published", tc.name, clip(id))
			}
		case <-time.After(30 * time.Second):
			t.Fatalf("%s: no OOM event", tc.name)
		}
	}
	if _, err := sb.DeleteContainer(context.Background(), "c1"); err != nil {
		t.Fatal(err)
	}
	select {
	case id := <-ooms:
		t.Errorf("OOM event for %q published", clip(id))
	default:
	}
	var dropped int
	for _, en := range hook.AllEntries() {
		id, _ := en.Data["container"].(string)
		if len(id) > maxLogged+32 {
			t.Errorf("container id of %d bytes logged", len(id))
		}
		if strings.Contains(en.Message, "not in this sandbox: dropped") {
			dropped++
		}
	}
	if dropped < 3 {
		t.Errorf("%d events logged as dropped, want at least the 3 before the sandbox's", dropped)
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
			name: "empty hooks",
			in:   func(s *specs.Spec) { s.Hooks = &specs.Hooks{} },
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
			name: "pod without a pause container: the agent's namespaces, the pod's /dev/shm and files",
			view: guestView{podNamespaces: true, podFiles: map[string]string{
				"/etc/hostname":    "/run/colo/shared/.pod/etc/hostname",
				"/etc/hosts":       "/run/colo/shared/.pod/etc/hosts",
				"/etc/resolv.conf": "/run/colo/shared/.pod/etc/resolv.conf",
			}},
			in: func(s *specs.Spec) {
				s.Linux.Namespaces = []specs.LinuxNamespace{
					{Type: specs.PIDNamespace, Path: "/proc/42/ns/pid"},
					{Type: specs.NetworkNamespace, Path: "/proc/42/ns/net"},
					{Type: specs.IPCNamespace, Path: "/proc/42/ns/ipc"},
					{Type: specs.UTSNamespace, Path: "/proc/42/ns/uts"},
					{Type: specs.CgroupNamespace, Path: "/proc/42/ns/cgroup"},
					{Type: specs.MountNamespace},
				}
				s.Mounts = []specs.Mount{
					{Destination: "/dev/shm", Type: "tmpfs", Source: "shm", Options: []string{"nosuid", "mode=1777"}},
					{Destination: "/etc/hosts", Type: "bind", Source: "/run/colo/shared/c1/mounts/1-etc-hosts", Options: []string{"rbind"}},
				}
			},
			want: func(s *specs.Spec) {
				s.Linux.Namespaces = []specs.LinuxNamespace{
					{Type: specs.PIDNamespace, Path: "/run/colo/pod-ns/pid"},
					{Type: specs.IPCNamespace, Path: "/run/colo/pod-ns/ipc"},
					{Type: specs.UTSNamespace, Path: "/run/colo/pod-ns/uts"},
					{Type: specs.CgroupNamespace},
					{Type: specs.MountNamespace},
				}
				s.Mounts = []specs.Mount{
					{Destination: "/dev/shm", Type: "bind", Source: "/run/colo/shm", Options: []string{"rbind", "nosuid", "nodev", "noexec"}},
					// The container's own /etc/hosts stays.
					{Destination: "/etc/hosts", Type: "bind", Source: "/run/colo/shared/c1/mounts/1-etc-hosts", Options: []string{"rbind"}},
					{Destination: "/etc/hostname", Type: "bind", Source: "/run/colo/shared/.pod/etc/hostname", Options: []string{"rbind", "rprivate", "ro"}},
					{Destination: "/etc/resolv.conf", Type: "bind", Source: "/run/colo/shared/.pod/etc/resolv.conf", Options: []string{"rbind", "rprivate", "ro"}},
				}
			},
		},
		{
			name: "pod without a pause container, hostPID and hostIPC: the guest's own PID and IPC namespaces",
			view: guestView{podNamespaces: true, guestNamespaces: []string{"pid", "ipc"}},
			in: func(s *specs.Spec) {
				s.Linux.Namespaces = []specs.LinuxNamespace{
					{Type: specs.PIDNamespace, Path: "/proc/42/ns/pid"},
					{Type: specs.IPCNamespace, Path: "/proc/42/ns/ipc"},
					{Type: specs.UTSNamespace, Path: "/proc/42/ns/uts"},
					{Type: specs.MountNamespace},
				}
			},
			want: func(s *specs.Spec) {
				s.Linux.Namespaces = []specs.LinuxNamespace{
					{Type: specs.UTSNamespace, Path: "/run/colo/pod-ns/uts"},
					{Type: specs.MountNamespace},
				}
			},
		},
		{
			name: "pod without a pause container: a container with an IPC namespace of its own keeps its /dev/shm",
			view: guestView{podNamespaces: true},
			in: func(s *specs.Spec) {
				s.Linux.Namespaces = []specs.LinuxNamespace{{Type: specs.IPCNamespace}, {Type: specs.PIDNamespace}}
				s.Mounts = []specs.Mount{{Destination: "/dev/shm", Type: "tmpfs", Source: "shm"}}
			},
			want: func(s *specs.Spec) {
				s.Linux.Namespaces = []specs.LinuxNamespace{{Type: specs.IPCNamespace}, {Type: specs.PIDNamespace}}
				s.Mounts = []specs.Mount{{Destination: "/dev/shm", Type: "tmpfs", Source: "shm"}}
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
