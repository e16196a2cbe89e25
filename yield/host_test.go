package yield

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/containerd/cgroups/v3"
	"github.com/containerd/cgroups/v3/cgroup1"
	"github.com/containerd/cgroups/v3/cgroup2"
	specs "github.com/opencontainers/runtime-spec/specs-go"
)

func TestParseProcStat(t *testing.T) {
	intr := "intr " + strings.Repeat("0 ", 3000) + "\n"
	tests := []struct {
		name    string
		text    string
		want    HostCPU
		wantErr string
	}{
		{
			name: "two CPUs",
			text: "cpu  100 1 20 300 4 5 6 7 50 0\ncpu0 50 0 10 150 2 2 3 3 0 0\ncpu1 50 1 10 150 2 3 3 4 0 0\n" + intr + "ctxt 1\n",
			// busy: user nice system irq softirq steal; guest is in user.
			want: HostCPU{CPUs: 2, Busy: 100 + 1 + 20 + 5 + 6 + 7, Total: 100 + 1 + 20 + 5 + 6 + 7 + 300 + 4},
		},
		{name: "no cpu lines", text: "ctxt 1\n", wantErr: "no cpu lines"},
		{name: "no per-CPU lines", text: "cpu  1 2 3 4 5 6 7 8\nctxt 1\n", wantErr: "no cpu lines"},
		{name: "short cpu line", text: "cpu  1 2 3\ncpu0 1 2 3\n", wantErr: "3 fields"},
		{name: "bad number", text: "cpu  1 2 x 4 5 6 7 8\ncpu0 1\n", wantErr: "cpu line"},
		{name: "too long before the cpu lines", text: intr + "cpu  1 2 3 4 5 6 7 8\n", wantErr: "too long"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := parseProcStat(strings.NewReader(tt.text))
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("error %v, want one with %q", err, tt.wantErr)
				}
				return
			}
			if err != nil || got != tt.want {
				t.Fatalf("got %+v, %v; want %+v", got, err, tt.want)
			}
		})
	}
}

func TestParseCPUMax(t *testing.T) {
	for _, tt := range []struct {
		in   string
		want Quota
		ok   bool
	}{
		{"max 100000\n", Quota{-1, 100000}, true},
		{"50000 100000\n", Quota{50000, 100000}, true},
		{"50000\n", Quota{}, false},
		{"-5 100000", Quota{}, false},
		{"max 0", Quota{}, false},
		{"lots 100000", Quota{}, false},
	} {
		got, err := parseCPUMax(tt.in)
		if (err == nil) != tt.ok || tt.ok && got != tt.want {
			t.Errorf("parseCPUMax(%q) = %+v, %v; want %+v (ok %v)", tt.in, got, err, tt.want, tt.ok)
		}
	}
}

// TestHost reads and writes a real cgroup of the host's (v1 or v2) with a
// busy process in it, then reads it again once removed.
func TestHost(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root for the host's cgroups")
	}
	ctx := context.Background()
	h, err := NewHost()
	if err != nil {
		t.Fatal(err)
	}
	host, err := h.Host(ctx)
	if err != nil || host.CPUs < 1 || host.Busy > host.Total {
		t.Fatalf("Host: %+v, %v", host, err)
	}

	name := fmt.Sprintf("/colo-yield-test-%d", os.Getpid())
	var add func(pid int) error
	var del func() error
	if cgroups.Mode() == cgroups.Unified {
		g, err := cgroup2.NewManager("/sys/fs/cgroup", name, &cgroup2.Resources{})
		if err != nil {
			t.Fatal(err)
		}
		add = func(pid int) error { return g.AddProc(uint64(pid)) }
		del = g.Delete
	} else {
		g, err := cgroup1.New(cgroup1.StaticPath(name), &specs.LinuxResources{})
		if err != nil {
			t.Fatal(err)
		}
		add = func(pid int) error { return g.AddProc(uint64(pid)) }
		del = g.Delete
	}
	removed := false
	remove := func() error {
		if removed {
			return nil
		}
		removed = true
		return del()
	}
	busy := exec.Command("sh", "-c", "while :; do :; done")
	if err := busy.Start(); err != nil {
		remove()
		t.Fatal(err)
	}
	stop := func() {
		busy.Process.Kill()
		busy.Wait()
	}
	t.Cleanup(func() {
		stop()
		if err := remove(); err != nil {
			t.Errorf("remove cgroup %s: %v", name, err)
		}
	})
	if err := add(busy.Process.Pid); err != nil {
		t.Fatal(err)
	}

	deadline := time.Now().Add(30 * time.Second)
	var u CgroupCPU
	for u.Usage == 0 {
		if time.Now().After(deadline) {
			t.Fatal("the busy process used no CPU in its cgroup")
		}
		time.Sleep(10 * time.Millisecond)
		if u, err = h.Cgroup(ctx, name); err != nil {
			t.Fatal(err)
		}
	}
	if u.Threads != 1 {
		t.Errorf("threads %d, want 1", u.Threads)
	}
	if q, err := h.Quota(ctx, name); err != nil || q.Quota >= 0 {
		t.Errorf("quota of a new cgroup: %v, %v; want none", q, err)
	}
	limited := Quota{Quota: 20000, Period: Period}
	for _, q := range []Quota{limited, Unlimited} {
		if err := h.SetQuota(ctx, name, q); err != nil {
			t.Fatal(err)
		}
		if got, err := h.Quota(ctx, name); err != nil || !got.same(q) {
			t.Errorf("quota %v, %v after setting %v", got, err, q)
		}
	}

	stop()
	if err := remove(); err != nil {
		t.Fatal(err)
	}
	if _, err := h.Cgroup(ctx, name); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("usage of a removed cgroup: %v, want fs.ErrNotExist", err)
	}
	if _, err := h.Quota(ctx, name); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("quota of a removed cgroup: %v, want fs.ErrNotExist", err)
	}
	if err := h.SetQuota(ctx, name, limited); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("setting the quota of a removed cgroup: %v, want fs.ErrNotExist", err)
	}
	for _, bad := range []string{"relative", "/a/../../b", "/"} {
		if _, err := h.Quota(ctx, bad); err == nil {
			t.Errorf("quota of cgroup %q: no error", bad)
		}
	}
}
