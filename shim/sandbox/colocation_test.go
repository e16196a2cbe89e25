package sandbox

import (
	"context"
	"fmt"
	"reflect"
	"strings"
	"testing"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"github.com/sirupsen/logrus"
	logtest "github.com/sirupsen/logrus/hooks/test"

	"github.com/colo-runtime/colo/config"
)

// allowAll lets pods set every co-location annotation.
func allowAll(c *config.Colocation) { c.Annotations = config.ColocationAnnotations() }

// logged returns a context whose log lines the returned hook keeps.
func logged() (context.Context, *logtest.Hook) {
	logger, hook := logtest.NewNullLogger()
	return log.WithLogger(context.Background(), logrus.NewEntry(logger)), hook
}

// warnings are the messages of the warnings a hook kept.
func warnings(hook *logtest.Hook) []string {
	var w []string
	for _, e := range hook.AllEntries() {
		if e.Level == logrus.WarnLevel {
			w = append(w, e.Message)
		}
	}
	return w
}

func TestColocationAnnotationsKnown(t *testing.T) {
	ours := []string{ClassAnnotation, VCPUsAnnotation, PodWeightAnnotation, OverheadIdleAnnotation, HostNamespacesAnnotation, DisksAnnotation}
	if !reflect.DeepEqual(ours, config.ColocationAnnotations()) {
		t.Errorf("the sandbox reads %q, config.ColocationAnnotations are %q", ours, config.ColocationAnnotations())
	}
}

func TestNewColocation(t *testing.T) {
	spec := func(cgroups string, annotations map[string]string) *specs.Spec {
		return &specs.Spec{Linux: &specs.Linux{CgroupsPath: cgroups}, Annotations: annotations}
	}
	for _, tc := range []struct {
		name    string
		cfg     func(*config.Colocation)
		spec    *specs.Spec
		want    func(colocation) string // "" when right
		wantErr string
		// warn are substrings of the warnings logged, in order.
		warn []string
	}{
		{
			name: "defaults: every vCPU high, placed under the cgroupsPath",
			spec: spec("/colo-test/c1", nil),
			want: func(c colocation) string {
				if c.plan.Parent != "/colo-test/c1" || strings.Join(c.plan.VCPUClasses, ",") != "high,high" || len(c.classes) != 1 || len(c.classes[0].GetCpus()) != 2 {
					return "want both vCPUs in high, one guest class"
				}
				return ""
			},
		},
		{
			name: "annotations allowed",
			cfg:  allowAll,
			spec: spec("pods/p1", map[string]string{VCPUsAnnotation: "high,low", PodWeightAnnotation: "2", OverheadIdleAnnotation: "true"}),
			want: func(c colocation) string {
				p := c.plan
				if p.Parent != "/pods/p1" || p.ParentWeight != 2 || !p.OverheadIdle || len(c.classes) != 2 || c.classes[1].GetOomScoreAdj() != 500 || c.classes[1].GetWeight() != 10 {
					return "want the annotations applied"
				}
				return ""
			},
		},
		{
			name: "annotations ignored by default",
			spec: spec("pods/p1", map[string]string{VCPUsAnnotation: "low,low", PodWeightAnnotation: "2", OverheadIdleAnnotation: "true", "other.annotation": "x"}),
			want: func(c colocation) string {
				p := c.plan
				if strings.Join(p.VCPUClasses, ",") != "high,high" || p.ParentWeight != 0 || p.OverheadIdle {
					return "want the config's set-up"
				}
				return ""
			},
			warn: []string{
				"annotation io.colo.overhead-idle ignored", "annotation io.colo.pod-weight ignored", "annotation io.colo.vcpus ignored",
			},
		},
		{
			name: "some allowed, the rest ignored",
			cfg:  func(c *config.Colocation) { c.Annotations = []string{OverheadIdleAnnotation} },
			spec: spec("", map[string]string{PodWeightAnnotation: "2", OverheadIdleAnnotation: "true"}),
			want: func(c colocation) string {
				if c.plan.ParentWeight != 0 || !c.plan.OverheadIdle {
					return "want only overhead-idle applied"
				}
				return ""
			},
			warn: []string{"annotation io.colo.pod-weight ignored: the node's colo config does not allow it (add it to colocation.annotations)"},
		},
		{
			name: "systemd cgroups path: placed in the scope runc would make",
			spec: spec("kubepods-besteffort-pod1.slice:cri-containerd:c1", nil),
			want: func(c colocation) string {
				s := c.plan.Scope
				if c.plan.Parent != "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1.slice/cri-containerd-c1.scope" ||
					s == nil || s.Slice != "kubepods-besteffort-pod1.slice" || s.Unit != "cri-containerd-c1.scope" {
					return "want the scope cri-containerd-c1.scope in the pod's slice"
				}
				return ""
			},
		},
		{name: "bad systemd cgroups path", spec: spec("kubepods--pod1.slice:cri-containerd:c1", nil), wantErr: `cgroupsPath "kubepods--pod1.slice:cri-containerd:c1": slice "kubepods--pod1.slice": an empty level`},
		{name: "unknown annotation", spec: spec("", map[string]string{"io.colo.vcpu": "high,low"}), wantErr: "annotation io.colo.vcpu: colo knows no such annotation"},
		{name: "unknown annotation, even with all allowed", cfg: allowAll, spec: spec("", map[string]string{"io.colo.priority": "low"}), wantErr: "annotation io.colo.priority: colo knows no such"},
		{name: "unknown class", cfg: allowAll, spec: spec("", map[string]string{VCPUsAnnotation: "high,mid"}), wantErr: `no class "mid"`},
		{
			name: "fewer classes than vCPUs: the rest take the last",
			cfg:  allowAll,
			spec: spec("", map[string]string{VCPUsAnnotation: "high"}),
			want: func(c colocation) string {
				if strings.Join(c.plan.VCPUClasses, ",") != "high,high" {
					return "want high,high"
				}
				return ""
			},
		},
		{name: "bad idle", cfg: allowAll, spec: spec("", map[string]string{OverheadIdleAnnotation: "maybe"}), wantErr: `io.colo.overhead-idle="maybe"`},
		{name: "bad pod weight", cfg: allowAll, spec: spec("", map[string]string{PodWeightAnnotation: "lots"}), wantErr: `io.colo.pod-weight="lots"`},
		{
			name: "bad value of an ignored annotation",
			spec: spec("", map[string]string{PodWeightAnnotation: "lots"}),
			want: func(c colocation) string { return "" },
			warn: []string{"annotation io.colo.pod-weight ignored"},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := config.Default()
			if tc.cfg != nil {
				tc.cfg(&cfg.Colocation)
			}
			ctx, hook := logged()
			c, err := newColocation(ctx, cfg, tc.spec, cfg.Hypervisor.VCPUs)
			if tc.wantErr != "" {
				if !errdefs.IsInvalidArgument(err) || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("error %v, want invalid argument with %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if msg := tc.want(c); msg != "" {
				t.Errorf("%s: %+v %v", msg, c.plan, c.classes)
			}
			got := warnings(hook)
			if len(got) != len(tc.warn) {
				t.Fatalf("warnings %q, want %q", got, tc.warn)
			}
			for i, w := range tc.warn {
				if !strings.Contains(got[i], w) {
					t.Errorf("warning %q, want %q", got[i], w)
				}
			}
		})
	}
}

func TestColocationClass(t *testing.T) {
	cfg := config.Default()
	allowAll(&cfg.Colocation)
	c, err := newColocation(context.Background(), cfg, &specs.Spec{Annotations: map[string]string{VCPUsAnnotation: "high,low"}}, 2)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		annotation, want, wantErr string
	}{
		{"", "", ""},
		{"low", "low", ""},
		{"mid", "", `io.colo.class="mid": no such class`},
	} {
		s := &specs.Spec{}
		if tc.annotation != "" {
			s.Annotations = map[string]string{ClassAnnotation: tc.annotation}
		}
		got, err := c.class(s)
		switch {
		case tc.wantErr != "":
			if !errdefs.IsInvalidArgument(err) || !strings.Contains(err.Error(), tc.wantErr) {
				t.Errorf("class %q: %v, want %q", tc.annotation, err, tc.wantErr)
			}
		case err != nil || got.GetName() != tc.want:
			t.Errorf("class %q = %v, %v; want %q", tc.annotation, got, err, tc.want)
		}
	}
	// All vCPUs high: low has none, so no container can be in it.
	c, err = newColocation(context.Background(), cfg, &specs.Spec{}, 2)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.class(&specs.Spec{Annotations: map[string]string{ClassAnnotation: "low"}}); !errdefs.IsInvalidArgument(err) {
		t.Errorf("class without vCPUs: %v", err)
	}
}

// TestColocationClassIgnored: without io.colo.class in the allow-list a
// container's class is ignored, even one that does not exist, and the
// sandbox says so once, however many containers ask.
func TestColocationClassIgnored(t *testing.T) {
	cfg := config.Default()
	cfg.Colocation.VCPUs = []string{"high", "low"}
	cfg.Colocation.Annotations = []string{VCPUsAnnotation}
	ctx, hook := logged()
	c, err := newColocation(ctx, cfg, &specs.Spec{Annotations: map[string]string{ClassAnnotation: "low"}}, 2)
	if err != nil {
		t.Fatal(err)
	}
	for _, class := range []string{"low", "mid", "low"} {
		got, err := c.class(&specs.Spec{Annotations: map[string]string{ClassAnnotation: class}})
		if got != nil || err != nil {
			t.Errorf("class %q = %v, %v; want it ignored", class, got, err)
		}
	}
	w := warnings(hook)
	if len(w) != 1 || !strings.Contains(w[0], "annotation io.colo.class ignored") || !strings.Contains(w[0], "colocation.annotations") {
		t.Errorf("warnings %q, want one naming io.colo.class and colocation.annotations", w)
	}
}

// TestColocationResized: a VM's vCPUs keep their classes as it grows and
// shrinks; the ones added take the last class listed.
func TestColocationResized(t *testing.T) {
	cfg := config.Default()
	allowAll(&cfg.Colocation)
	c, err := newColocation(context.Background(), cfg, &specs.Spec{Annotations: map[string]string{VCPUsAnnotation: "high,low"}}, 2)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		n          int
		vcpus, low string
		classes    int
	}{
		{n: 4, vcpus: "high,low,low,low", low: "[1 2 3]", classes: 2},
		{n: 1, vcpus: "high", classes: 1},
		{n: 2, vcpus: "high,low", low: "[1]", classes: 2},
	} {
		r, err := c.withVCPUs(tc.n)
		if err != nil {
			t.Fatalf("%d vCPUs: %v", tc.n, err)
		}
		if got := strings.Join(r.plan.VCPUClasses, ","); got != tc.vcpus || len(r.classes) != tc.classes {
			t.Errorf("%d vCPUs: classes %s (%d in the guest), want %s (%d)", tc.n, got, len(r.classes), tc.vcpus, tc.classes)
		}
		if tc.low != "" && fmt.Sprint(r.classes[1].GetCpus()) != tc.low {
			t.Errorf("%d vCPUs: low has %v, want %s", tc.n, r.classes[1].GetCpus(), tc.low)
		}
	}
}
