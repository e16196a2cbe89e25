// Package e2e runs colo end to end: a private containerd, the real shim,
// QEMU, the guest kernel and colo-agent. `make test` builds everything and
// runs it with COLO_E2E=1.
package e2e

import (
	"context"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/colo-runtime/colo/testbed"
)

// cd is the one private containerd every test in this package shares; each
// test uses its own container ids and checks that it left nothing behind.
// Its CRI plugin is on, as on a Kubernetes node: the ctr tests work in
// their own namespace, the CRI tests in testbed.CRINamespace.
var cd *testbed.Containerd

func TestMain(m *testing.M) {
	if os.Getenv("COLO_E2E") != "1" {
		fmt.Println("e2e: skipped: needs root, build/ and the guest image; run `make test` (sets COLO_E2E=1)")
		os.Exit(0)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	var err error
	// Four vCPUs on this two-CPU machine: a pod may grow to 4
	// (TestCPUResize). A pod may take the guest's namespaces for the
	// node's it asks for (TestGuestOOM; TestHostNamespaces).
	cd, err = testbed.Start(ctx, testbed.Options{CRI: true, ColoConfig: "[hypervisor]\nmax_vcpus = 4\n\n[colocation]\nannotations = [\"io.colo.host-namespaces\"]\n"})
	if err == nil {
		err = cd.ImportBusybox(ctx)
	}
	cancel()
	if err != nil {
		fmt.Fprintln(os.Stderr, "e2e: test bed:", err)
		if cd != nil {
			cd.Stop()
		}
		os.Exit(1)
	}
	code := m.Run()
	if code != 0 {
		// What a guest's console said when its sandbox failed: those
		// lines may be long before the tail.
		fmt.Fprintf(os.Stderr, "guest consoles in containerd's log:\n%s\n", testbed.Tail(consoleLines(cd.Logs()), 20))
		fmt.Fprintf(os.Stderr, "containerd log (tail):\n%s\n", testbed.Tail(cd.Logs(), 300))
	}
	if err := cd.Stop(); err != nil {
		fmt.Fprintln(os.Stderr, "e2e: stop containerd:", err)
		code = 1
	}
	os.Exit(code)
}

// ctr runs ctr against the test bed with a deadline.
func ctr(t *testing.T, args ...string) testbed.Result {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	r, err := cd.Ctr(ctx, args...)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// checkNoLeaks registers the leak check for the end of the test. Cleanup
// after a dead shim is asynchronous (containerd runs `shim delete`), so it
// waits for the leaks to go, and fails with what is still there.
func checkNoLeaks(t *testing.T, ids ...string) {
	t.Helper()
	t.Cleanup(func() {
		for _, id := range ids {
			// Containers that a failed test left; errors are expected
			// when the test already removed them.
			ctr(t, "task", "rm", "-f", id)
			ctr(t, "container", "rm", id)
		}
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		if leaks := cd.WaitNoLeaks(ctx, ids...); len(leaks) > 0 {
			t.Errorf("left behind:\n  %s", strings.Join(leaks, "\n  "))
		}
	})
}

// coloConfig writes a colo config for --runtime-config-path.
func coloConfig(t *testing.T, toml string) string {
	t.Helper()
	p, err := cd.WriteColoConfig(strings.NewReplacer("/", "-", " ", "-").Replace(t.Name()), toml)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// runColo is `ctr run --rm` with the colo runtime and the busybox image.
func runColo(t *testing.T, flags []string, id string, cmd ...string) testbed.Result {
	t.Helper()
	args := append([]string{"run", "--rm", "--runtime", testbed.Runtime}, flags...)
	args = append(args, testbed.BusyboxImage, id)
	return ctr(t, append(args, cmd...)...)
}

// consoleLines are the lines of a log that carry a guest's console, which
// the shim logs, as a warning or an error, when a sandbox fails.
func consoleLines(logs string) string {
	var out []string
	for _, l := range strings.Split(logs, "\n") {
		if strings.Contains(l, " console=") && (strings.Contains(l, "level=warning") || strings.Contains(l, "level=error")) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}
