package e2e

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/colo-runtime/colo/testbed"
)

// runColoCLI runs the colo command with the configuration cfg and returns
// its standard output, standard error and exit status apart: `ps --json`
// must be JSON alone.
func runColoCLI(t *testing.T, cfg string, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "colo", append([]string{"--config", cfg}, args...)...)
	var out, errb strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	var ee *exec.ExitError
	switch {
	case errors.As(err, &ee):
		code = ee.ExitCode()
	case err != nil:
		t.Fatalf("colo %s: %v", strings.Join(args, " "), err)
	}
	return out.String(), errb.String(), code
}

// hasHardwareVirt tells whether the host CPU has vmx or svm, which KVM
// needs to boot guests at speed.
func hasHardwareVirt(t *testing.T) bool {
	b, err := os.ReadFile("/proc/cpuinfo")
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range strings.Fields(string(b)) {
		if f == "vmx" || f == "svm" {
			return true
		}
	}
	return false
}

// TestColoCLI: colo check passes on the test bed's host and tells the
// accelerator and why; colo env prints the test bed's configuration; colo
// ps lists a running pod with its VM's size.
func TestColoCLI(t *testing.T) {
	t.Run("check", func(t *testing.T) {
		out, errOut, code := runColoCLI(t, cd.ColoConfig, "check")
		if code != 0 {
			t.Fatalf("colo check: exit %d\n%s%s", code, out, errOut)
		}
		var accel string
		for _, l := range strings.Split(out, "\n") {
			if strings.Contains(l, "accelerator: ") {
				accel = l
			}
		}
		if hasHardwareVirt(t) {
			if accel == "" {
				t.Errorf("colo check names no accelerator:\n%s", out)
			}
		} else if !strings.Contains(accel, "tcg") || !(strings.Contains(accel, "neither vmx nor svm") || strings.Contains(accel, "/dev/kvm")) {
			t.Errorf("colo check on a host without vmx or svm: accelerator line %q, want tcg and why\n%s", accel, out)
		}
		for _, l := range strings.Split(strings.TrimSpace(out), "\n") {
			if status, _, _ := strings.Cut(l, " "); status != "ok" && status != "warn" {
				t.Errorf("colo check line %q: want ok or warn", l)
			}
		}
		t.Logf("colo check:\n%s", out)
	})

	t.Run("env", func(t *testing.T) {
		out, errOut, code := runColoCLI(t, cd.ColoConfig, "env")
		if code != 0 {
			t.Fatalf("colo env: exit %d\n%s", code, errOut)
		}
		first, _, _ := strings.Cut(out, "\n")
		if !strings.HasPrefix(first, "# ") || !strings.Contains(first, cd.ColoConfig) {
			t.Errorf("colo env: first line %q, want a comment naming %s", first, cd.ColoConfig)
		}
		for _, want := range []string{"state_dir = '" + cd.StateDir + "'", "max_vcpus = 4", "[colocation]"} {
			if !strings.Contains(out, want) {
				t.Errorf("colo env: no %q in\n%s", want, out)
			}
		}
	})

	t.Run("ps", func(t *testing.T) {
		const id = "colocli-ps-sandbox"
		checkNoLeaks(t, id)
		startDetached(t, testbed.Runtime, id, nil, "sleep", "3600")
		type row struct {
			ID         string   `json:"id"`
			Containers int      `json:"containers"`
			VCPUs      *int     `json:"vcpus"`
			MemoryMB   *int     `json:"memory_mb"`
			Classes    []string `json:"classes"`
			Uptime     int64    `json:"uptime_seconds"`
		}
		var got *row
		out, errOut, code := runColoCLI(t, cd.ColoConfig, "ps", "--json")
		if code != 0 {
			t.Fatalf("colo ps --json: exit %d\n%s", code, errOut)
		}
		var rows []row
		if err := json.Unmarshal([]byte(out), &rows); err != nil {
			t.Fatalf("colo ps --json: %v in %q", err, out)
		}
		for i := range rows {
			if rows[i].ID == id {
				got = &rows[i]
			}
		}
		// The test bed's defaults: 2 vCPUs and 256 MiB for a pod without
		// limits, every vCPU in class high.
		if got == nil || got.VCPUs == nil || *got.VCPUs != 2 || got.MemoryMB == nil || *got.MemoryMB != 256 ||
			got.Containers != 1 || strings.Join(got.Classes, ",") != "high" || got.Uptime < 0 || got.Uptime > 600 {
			t.Errorf("colo ps --json: sandbox %s is %+v, want 1 container, 2 vCPUs, 256 MiB, class high\n%s%s", id, got, out, errOut)
		}

		out, errOut, code = runColoCLI(t, cd.ColoConfig, "ps")
		if code != 0 {
			t.Fatalf("colo ps: exit %d\n%s", code, errOut)
		}
		var line []string
		for _, l := range strings.Split(out, "\n") {
			if f := strings.Fields(l); len(f) > 0 && f[0] == id[:12] {
				line = f
			}
		}
		if strings.Join(line, " ") == "" || len(line) != 7 || line[1] != "-" || line[2] != "1" || line[3] != "2" || line[4] != "256Mi" || line[5] != "high" {
			t.Errorf("colo ps: line of %s is %q, want %s - 1 2 256Mi high UPTIME\n%s%s", id, line, id[:12], out, errOut)
		}
		t.Logf("colo ps:\n%s", out)

		if r := ctr(t, "task", "kill", "-s", "SIGKILL", id); r.ExitCode != 0 {
			t.Errorf("ctr task kill: %s", r)
		}
	})
}
