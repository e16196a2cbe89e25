package hypervisor_test

import (
	"os/exec"
	"strings"
	"testing"
)

// TestNoAgentProtocol: the drivers know nothing of the agent's protocol;
// what they need of it (ports, kernel parameters) comes in VMConfig. The
// go tool lists every package hypervisor/... builds from, so an import of
// agentproto anywhere below, directly or through another package, fails.
func TestNoAgentProtocol(t *testing.T) {
	const forbidden = "github.com/colo-runtime/colo/agentproto"
	out, err := exec.Command("go", "list", "-deps", "-f", "{{.ImportPath}}", "github.com/colo-runtime/colo/hypervisor/...").Output()
	if err != nil {
		var stderr string
		if ee, ok := err.(*exec.ExitError); ok {
			stderr = string(ee.Stderr)
		}
		t.Fatalf("go list: %v: %s", err, stderr)
	}
	deps := strings.Fields(string(out))
	if len(deps) == 0 {
		t.Fatal("go list named no packages")
	}
	for _, d := range deps {
		if d == forbidden {
			who, _ := exec.Command("go", "list", "-f", `{{.ImportPath}}: {{join .Imports " "}}`, "github.com/colo-runtime/colo/hypervisor/...").Output()
			var importers []string
			for line := range strings.Lines(string(who)) {
				if strings.Contains(line, forbidden) {
					importers = append(importers, strings.TrimSpace(strings.SplitN(line, ":", 2)[0]))
				}
			}
			t.Fatalf("hypervisor/... depends on %s (imported directly by %v): pass what the driver needs in VMConfig", forbidden, importers)
		}
	}
}
