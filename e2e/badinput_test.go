package e2e

import (
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

func atoi(t *testing.T, s string) int {
	t.Helper()
	n, err := strconv.Atoi(s)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// hangingInitrd builds an initrd whose /init boots fine and then never
// serves the agent: the VM runs, the agent never answers.
func hangingInitrd(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	root := filepath.Join(dir, "root")
	if err := os.MkdirAll(filepath.Join(root, "bin"), 0o755); err != nil {
		t.Fatal(err)
	}
	busybox, err := os.ReadFile("/bin/busybox")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(root, "bin", "busybox"), busybox, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(root, "init"), []byte("#!/bin/busybox sh\nexec /bin/busybox sleep 1000000\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(dir, "hang.img")
	cmd := exec.Command("sh", "-c", "find . | cpio --quiet -o -H newc > "+out)
	cmd.Dir = root
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("cpio: %v: %s", err, b)
	}
	return out
}

// TestBadInput: each bad input fails `ctr run` with an error that names
// what was wrong, and leaves nothing behind.
func TestBadInput(t *testing.T) {
	tests := []struct {
		name   string
		config string
		// flags are more ctr run flags.
		flags []string
		// want are substrings of ctr's error output.
		want []string
	}{
		{name: "malformed config", config: "[hypervisor\nvcpus = ", want: []string{"malformed_config.toml: line "}},
		{name: "unknown config key", config: "[hypervisor]\nvcpu = 2\n", want: []string{"unknown key", "vcpu"}},
		{name: "invalid config value", config: "[hypervisor]\naccel = \"warp\"\n", want: []string{"hypervisor.accel", "warp"}},
		{name: "missing kernel", config: "[hypervisor]\nkernel = \"/nonexistent/vmlinux\"\n", want: []string{"/nonexistent/vmlinux"}},
		{name: "missing initrd", config: "[hypervisor]\ninitrd = \"/nonexistent/initrd.img\"\n", want: []string{"/nonexistent/initrd.img"}},
		{name: "invalid spec", flags: []string{"--cwd", "relative/dir"}, want: []string{"cwd", "relative/dir"}},
		{name: "agent never answers", config: "[hypervisor]\nboot_timeout = \"5s\"\ninitrd = \"{hang}\"\n", want: []string{"did not answer", "5s"}},
		{name: "agent on another channel", config: "[hypervisor]\nboot_timeout = \"10s\"\nkernel_params = \"colo.channel=vsock\"\n", want: []string{"agent"}},
		{name: "guest dies while booting", config: "[hypervisor]\nkernel_params = \"rdinit=/nonexistent/init\"\n", want: []string{"exited"}},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			id := "bad-" + strconv.Itoa(i)
			checkNoLeaks(t, id)
			config := tt.config
			if strings.Contains(config, "{hang}") {
				config = strings.ReplaceAll(config, "{hang}", hangingInitrd(t))
			}
			flags := append([]string{"--runtime-config-path", coloConfig(t, config)}, tt.flags...)
			r := runColo(t, flags, id, "true")
			if r.ExitCode == 0 {
				t.Fatalf("ctr run succeeded, want an error: %s", r)
			}
			for _, w := range tt.want {
				if !strings.Contains(r.Stderr, w) {
					t.Errorf("error lacks %q: %s", w, r.Stderr)
				}
			}
		})
	}
	// The test bed's own image and config still work after all that.
	checkNoLeaks(t, "bad-after")
	if r := runColo(t, nil, "bad-after", "true"); r.ExitCode != 0 {
		t.Errorf("a good run after the bad ones failed: %s", r)
	}
}
