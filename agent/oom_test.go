package agent

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/opencontainers/runc/libcontainer/specconv"
	"github.com/opencontainers/runtime-spec/specs-go"
)

// TestSetContainerOOMScoreAdj: a spec without process.oomScoreAdj gives
// the container 0, not nothing (libcontainer would then leave the agent's
// -1000 to it); a spec's own value is kept, whatever it is.
func TestSetContainerOOMScoreAdj(t *testing.T) {
	intp := func(i int) *int { return &i }
	for _, tt := range []struct {
		name string
		spec *int
		want int
	}{
		{"unset", nil, 0},
		{"zero", intp(0), 0},
		{"raised", intp(500), 500},
		{"lowered", intp(-999), -999},
		{"unkillable on request", intp(-1000), -1000},
	} {
		t.Run(tt.name, func(t *testing.T) {
			// Through specconv, as createContainer does.
			spec := &specs.Spec{
				Root:    &specs.Root{Path: "/rootfs"},
				Process: &specs.Process{Args: []string{"true"}, Cwd: "/", OOMScoreAdj: tt.spec},
				Linux:   &specs.Linux{CgroupsPath: "/colo/x"},
			}
			config, err := specconv.CreateLibcontainerConfig(&specconv.CreateOpts{CgroupName: "x", Spec: spec})
			if err != nil {
				t.Fatal(err)
			}
			setContainerOOMScoreAdj(config)
			if config.OomScoreAdj == nil || *config.OomScoreAdj != tt.want {
				t.Errorf("oom_score_adj = %v, want %d", config.OomScoreAdj, tt.want)
			}
		})
	}
}

func TestSetOOMScoreAdj(t *testing.T) {
	p := filepath.Join(t.TempDir(), "oom_score_adj")
	if err := os.WriteFile(p, []byte("0\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := setOOMScoreAdj(p, agentOOMScoreAdj); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(p); string(b) != "-1000" {
		t.Errorf("wrote %q, want -1000", b)
	}
	if err := setOOMScoreAdj(filepath.Join(t.TempDir(), "missing", "oom_score_adj"), 0); err == nil {
		t.Error("no error for a path that cannot be written")
	}
}
