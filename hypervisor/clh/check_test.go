package clh

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/colo-runtime/colo/config"
)

// TestCheck: each missing piece is named, the binary first.
func TestCheck(t *testing.T) {
	dir := t.TempDir()
	write := func(name, body string, mode os.FileMode) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(body), mode); err != nil {
			t.Fatal(err)
		}
		return p
	}
	bin := write("cloud-hypervisor", "#!/bin/sh\n", 0o755)
	kvm := write("kvm", "", 0o600)
	vmx := write("cpuinfo-vmx", "processor\t: 0\nflags\t\t: fpu vmx sse\n", 0o644)
	novirt := write("cpuinfo", "processor\t: 0\nflags\t\t: fpu sse\n", 0o644)
	for _, tc := range []struct {
		name      string
		path      string
		env       string // PATH
		kvm, cpus string
		want      []string // in the error; none: no error
	}{
		{name: "usable", path: bin, kvm: kvm, cpus: vmx},
		{name: "in PATH", env: dir, kvm: kvm, cpus: vmx},
		{name: "no binary in PATH", env: t.TempDir(), kvm: kvm, cpus: vmx, want: []string{"cloud-hypervisor", "in PATH", "not found"}},
		{name: "no configured binary", path: "/nonexistent/cloud-hypervisor", kvm: kvm, cpus: vmx, want: []string{`hypervisor.path = "/nonexistent/cloud-hypervisor"`, "no such file"}},
		{name: "no KVM device", path: bin, kvm: filepath.Join(dir, "nokvm"), cpus: vmx, want: []string{"needs KVM", "nokvm", "no such file"}},
		{name: "no hardware virtualization", path: bin, kvm: kvm, cpus: novirt, want: []string{"needs KVM", "neither vmx nor svm"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.env != "" {
				t.Setenv("PATH", tc.env)
			}
			cfg := config.Default().Hypervisor
			cfg.Type, cfg.Path = "clh", tc.path
			_, err := check(cfg, tc.kvm, tc.cpus)
			if len(tc.want) == 0 {
				if err != nil {
					t.Fatal(err)
				}
				return
			}
			if err == nil {
				t.Fatalf("no error, want one with %q", tc.want)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q has no %q", err, w)
				}
			}
		})
	}
}
