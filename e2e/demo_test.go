package e2e

import (
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/colo-runtime/colo/testbed"
)

// TestDemo runs what `make demo` runs and checks that it printed a line
// from inside the guest, whose kernel is not the host's.
func TestDemo(t *testing.T) {
	root, err := testbed.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(t.TempDir(), "demo")
	if out, err := exec.Command("go", "build", "-o", bin, filepath.Join(root, "testbed", "demo")).CombinedOutput(); err != nil {
		t.Fatalf("go build: %v: %s", err, out)
	}
	out, err := exec.Command(bin).CombinedOutput()
	if err != nil {
		t.Fatalf("demo: %v:\n%s", err, out)
	}
	var guest string
	for _, line := range strings.Split(string(out), "\n") {
		if v, ok := strings.CutPrefix(line, "guest kernel: "); ok {
			guest = v
		}
	}
	if guest == "" || strings.Contains(guest, hostKernel(t)) {
		t.Errorf("want a guest kernel line that differs from the host's %q:\n%s", hostKernel(t), out)
	}
}
