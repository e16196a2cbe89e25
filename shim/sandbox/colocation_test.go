package sandbox

import (
	"strings"
	"testing"

	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/colo-runtime/colo/config"
)

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
			name: "annotations",
			cfg:  func(c *config.Colocation) { c.Annotations = append(c.Annotations, PodWeightAnnotation) },
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
			name: "systemd cgroups path: nothing placed",
			spec: spec("kubepods.slice:cri-containerd:c1", nil),
			want: func(c colocation) string {
				if c.plan.Parent != "" {
					return "want no parent"
				}
				return ""
			},
		},
		{name: "annotation not allowed", spec: spec("", map[string]string{PodWeightAnnotation: "2"}), wantErr: "annotation io.colo.pod-weight: not allowed"},
		{name: "unknown class", spec: spec("", map[string]string{VCPUsAnnotation: "high,mid"}), wantErr: `no class "mid"`},
		{name: "wrong count", spec: spec("", map[string]string{VCPUsAnnotation: "high"}), wantErr: "1 vCPU classes"},
		{name: "bad idle", spec: spec("", map[string]string{OverheadIdleAnnotation: "maybe"}), wantErr: `io.colo.overhead-idle="maybe"`},
		{
			name: "bad pod weight", cfg: func(c *config.Colocation) { c.Annotations = append(c.Annotations, PodWeightAnnotation) },
			spec: spec("", map[string]string{PodWeightAnnotation: "lots"}), wantErr: `io.colo.pod-weight="lots"`,
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := config.Default()
			if tc.cfg != nil {
				tc.cfg(&cfg.Colocation)
			}
			c, err := newColocation(cfg, tc.spec)
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
		})
	}
}

func TestColocationClass(t *testing.T) {
	cfg := config.Default()
	c, err := newColocation(cfg, &specs.Spec{Annotations: map[string]string{VCPUsAnnotation: "high,low"}})
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
	c, err = newColocation(cfg, &specs.Spec{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.class(&specs.Spec{Annotations: map[string]string{ClassAnnotation: "low"}}); !errdefs.IsInvalidArgument(err) {
		t.Errorf("class without vCPUs: %v", err)
	}
}
