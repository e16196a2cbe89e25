package placement

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	runc "github.com/opencontainers/cgroups/systemd"
)

func TestSystemdScope(t *testing.T) {
	for _, tc := range []struct {
		name, cgroupsPath string
		want              Scope
		wantPath          string
		wantErr           string
	}{
		{
			name:        "kubelet's pod slice",
			cgroupsPath: "kubepods-besteffort-pod1234.slice:cri-containerd:abc",
			want:        Scope{Slice: "kubepods-besteffort-pod1234.slice", Unit: "cri-containerd-abc.scope"},
			wantPath:    "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1234.slice/cri-containerd-abc.scope",
		},
		{
			name:        "a slice of one level",
			cgroupsPath: "kubepods.slice:cri-containerd:abc",
			want:        Scope{Slice: "kubepods.slice", Unit: "cri-containerd-abc.scope"},
			wantPath:    "/kubepods.slice/cri-containerd-abc.scope",
		},
		{
			name:        "no slice: system.slice",
			cgroupsPath: ":docker:abc",
			want:        Scope{Slice: "system.slice", Unit: "docker-abc.scope"},
			wantPath:    "/system.slice/docker-abc.scope",
		},
		{
			name:        "the root slice",
			cgroupsPath: "-.slice:colo:abc",
			want:        Scope{Slice: "-.slice", Unit: "colo-abc.scope"},
			wantPath:    "/colo-abc.scope",
		},
		{
			name:        "no prefix: runc's unit name",
			cgroupsPath: "machine.slice::abc",
			want:        Scope{Slice: "machine.slice", Unit: "-abc.scope"},
			wantPath:    "/machine.slice/-abc.scope",
		},
		{name: "a plain path", cgroupsPath: "/kubepods/pod1/abc", wantErr: `want "slice:prefix:name"`},
		{name: "too many parts", cgroupsPath: "a.slice:b:c:d", wantErr: `want "slice:prefix:name"`},
		{name: "prefix with no name", cgroupsPath: "kubepods.slice:cri-containerd:", wantErr: `no name after the prefix: the scope "cri-containerd-.scope"`},
		{name: "a slice for a name", cgroupsPath: "kubepods.slice:cri-containerd:pod1.slice", wantErr: `name "pod1.slice" is a slice`},
		{name: "slice without .slice", cgroupsPath: "kubepods:cri-containerd:abc", wantErr: `slice "kubepods": want a name ending in ".slice"`},
		{name: "slice with /", cgroupsPath: "kube/pods.slice:cri-containerd:abc", wantErr: `slice "kube/pods.slice": a unit name has no "/"`},
		{name: "leading dash", cgroupsPath: "-kubepods.slice:cri-containerd:abc", wantErr: "an empty level"},
		{name: "double dash", cgroupsPath: "kubepods--pod1.slice:cri-containerd:abc", wantErr: "an empty level"},
		{name: "trailing dash", cgroupsPath: "kubepods-.slice:cri-containerd:abc", wantErr: "an empty level"},
		{name: "only .slice", cgroupsPath: ".slice:cri-containerd:abc", wantErr: "an empty level"},
		{name: "name with /", cgroupsPath: "kubepods.slice:cri-containerd:../../x", wantErr: `scope "cri-containerd-../../x.scope": character '/'`},
		{name: "prefix with a space", cgroupsPath: "kubepods.slice:cri containerd:abc", wantErr: `character ' '`},
		{name: "name too long", cgroupsPath: "kubepods.slice:p:" + strings.Repeat("a", 250), wantErr: "longer than systemd's 255"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			scope, p, err := SystemdScope(tc.cgroupsPath)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) || !strings.Contains(err.Error(), fmt.Sprintf("%q", tc.cgroupsPath)) {
					t.Fatalf("SystemdScope(%q) = %+v, %q, %v; want an error naming the path with %q", tc.cgroupsPath, scope, p, err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if scope != tc.want || p != tc.wantPath {
				t.Errorf("SystemdScope(%q) = %+v, %q; want %+v, %q", tc.cgroupsPath, scope, p, tc.want, tc.wantPath)
			}
		})
	}
}

// TestExpandSlice: colo expands a slice as runc does, and refuses at
// least what runc refuses.
func TestExpandSlice(t *testing.T) {
	for _, tc := range []struct {
		slice, want, wantErr string
	}{
		{slice: "a.slice", want: "/a.slice"},
		{slice: "a-b-c.slice", want: "/a.slice/a-b.slice/a-b-c.slice"},
		{slice: "kubepods-burstable-pod_1.slice", want: "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod_1.slice"},
		{slice: "-.slice", want: "/"},
		{slice: "a.b.slice", want: "/a.b.slice"},
		{slice: "", wantErr: `want a name ending in ".slice"`},
		{slice: "a", wantErr: `want a name ending in ".slice"`},
		{slice: "a.slice.d", wantErr: `want a name ending in ".slice"`},
		{slice: ".slice", wantErr: "an empty level"},
		{slice: "--.slice", wantErr: "an empty level"},
		{slice: "a/b.slice", wantErr: `no "/"`},
		{slice: "../a.slice", wantErr: `no "/"`},
		{slice: "a\n.slice", wantErr: `character '\n'`},
	} {
		t.Run(tc.slice, func(t *testing.T) {
			got, err := ExpandSlice(tc.slice)
			theirs, theirErr := runc.ExpandSlice(tc.slice)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) || !strings.Contains(err.Error(), fmt.Sprintf("%q", tc.slice)) {
					t.Errorf("ExpandSlice(%q) = %q, %v; want an error naming it with %q", tc.slice, got, err, tc.wantErr)
				}
				return
			}
			if err != nil || got != tc.want {
				t.Errorf("ExpandSlice(%q) = %q, %v; want %q", tc.slice, got, err, tc.want)
			}
			if theirErr != nil || theirs != got {
				t.Errorf("runc's ExpandSlice(%q) = %q, %v; colo's %q", tc.slice, theirs, theirErr, got)
			}
		})
	}
}

// TestApplyScopeCgroupfs: where systemd does not run, a scope is placed
// in cgroupfs as a plain path; the slices above it that were missing are
// made and removed again, and the ones that were there (kubelet's) are
// left.
func TestApplyScopeCgroupfs(t *testing.T) {
	needCgroupV1(t)
	if systemdRunning() {
		t.Skip("systemd runs here: scopes are its (TestApplySystemd)")
	}
	top := fmt.Sprintf("colotest%d", os.Getpid())
	slice := top + "-besteffort-pod1.slice"
	scope, parent, err := SystemdScope(slice + ":cri-containerd:abc")
	if err != nil {
		t.Fatal(err)
	}
	levels := []string{"/" + top + ".slice", "/" + top + ".slice/" + top + "-besteffort.slice", path.Dir(parent)}
	roots, err := hierarchies()
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		// there are the levels that exist before, as kubelet's.
		there int
	}{
		{"every slice missing", 0},
		{"the pod's slice missing", 2},
		{"every slice there", 3},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var theirs, ours []string
			for _, root := range roots {
				for i, l := range levels {
					if i < tc.there {
						theirs = append(theirs, root+l)
					} else {
						ours = append(ours, root+l)
					}
				}
			}
			for _, dir := range theirs {
				if err := os.Mkdir(dir, 0o755); err != nil && !os.IsExist(err) {
					t.Fatal(err)
				}
			}
			t.Cleanup(func() {
				for _, dir := range slices.Backward(append(theirs, ours...)) {
					os.Remove(dir)
				}
			})
			p := Plan{Parent: parent, Scope: &scope}
			m, err := ToMake(p)
			if err != nil {
				t.Fatal(err)
			}
			if m.Unit != "" || !slices.Equal(m.Slices, ours) {
				t.Fatalf("ToMake = %+v, want slices %q and no unit", m, ours)
			}
			applyAndRemove(t, p, m)
			for _, dir := range ours {
				if _, err := os.Stat(dir); !os.IsNotExist(err) {
					t.Errorf("slice cgroup %s colo made: left (%v)", dir, err)
				}
			}
			for _, dir := range theirs {
				if _, err := os.Stat(dir); err != nil {
					t.Errorf("slice cgroup %s that was there: %v", dir, err)
				}
			}
			if left, _ := filepath.Glob("/sys/fs/cgroup/*" + parent); len(left) > 0 {
				t.Errorf("scope cgroups left: %q", left)
			}
		})
	}
}

// TestRemoveSliceRefusesOthers: a recorded slice that is no slice above
// the scope is not removed; one that is gone counts as removed.
func TestRemoveSliceRefusesOthers(t *testing.T) {
	parent := "/a.slice/a-b.slice/x.scope"
	for _, dir := range []string{"/sys/fs/cgroup/cpu/c.slice", "/tmp/a.slice", "/sys/fs/cgroup/cpu/a.slice/../a.slice", "/sys/fs/cgroup/cpu/a.slice/a-b.slice/x.scope"} {
		if err := removeSlice(parent, dir); err == nil || !strings.Contains(err.Error(), "not removing it") {
			t.Errorf("removeSlice(%q, %q) = %v, want a refusal", parent, dir, err)
		}
	}
	if err := removeSlice(parent, "/sys/fs/cgroup/cpu/a.slice/a-b.slice"); err != nil {
		t.Errorf("removeSlice of a slice that is gone: %v", err)
	}
}

// TestApplySystemd: where systemd runs, a scope is its transient unit
// with the processes in it, and Remove stops it and leaves no cgroup.
func TestApplySystemd(t *testing.T) {
	if !systemdRunning() {
		t.Skip("no systemd: /run/systemd/system missing")
	}
	if os.Geteuid() != 0 {
		t.Skip("needs root for systemd's system scopes")
	}
	scope, parent, err := SystemdScope(fmt.Sprintf(":colo-placement-test:%d", os.Getpid()))
	if err != nil {
		t.Fatal(err)
	}
	p := Plan{Parent: parent, Scope: &scope, OverheadWeight: 100}
	m, err := ToMake(p)
	if err != nil {
		t.Fatal(err)
	}
	if m.Unit != scope.Unit || len(m.Slices) != 0 {
		t.Fatalf("ToMake = %+v, want the unit %s only", m, scope.Unit)
	}
	cmd := exec.Command("sleep", "1000")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { cmd.Process.Kill(); cmd.Wait() }()
	ctx := context.Background()
	if err := Apply(ctx, p, m, Threads{Pid: cmd.Process.Pid}); err != nil {
		t.Fatal(err)
	}
	if got := cgroupOf(t, cmd.Process.Pid, cmd.Process.Pid); got != parent+"/"+OverheadGroup {
		t.Errorf("process in %q, want %s", got, parent+"/"+OverheadGroup)
	}
	cmd.Process.Kill()
	cmd.Wait()
	if err := Remove(ctx, parent, m); err != nil {
		t.Fatal(err)
	}
	for _, dir := range []string{"/sys/fs/cgroup" + parent, "/sys/fs/cgroup/cpu" + parent, "/sys/fs/cgroup/systemd" + parent} {
		if _, err := os.Stat(dir); !os.IsNotExist(err) {
			t.Errorf("cgroup %s left: %v", dir, err)
		}
	}
	if err := Remove(ctx, parent, m); err != nil {
		t.Errorf("Remove again: %v", err)
	}
}
