package config

import (
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"
)

func TestParse(t *testing.T) {
	tests := []struct {
		name    string
		toml    string
		check   func(Config) bool
		wantErr []string
	}{
		{name: "empty is the defaults", toml: "", check: func(c Config) bool { return reflect.DeepEqual(c, Default()) }},
		{
			name: "overrides",
			toml: "[hypervisor]\nvcpus = 3\nboot_timeout = \"1m30s\"\n[storage]\nshared_fs = \"virtio-fs\"\n",
			check: func(c Config) bool {
				return c.Hypervisor.VCPUs == 3 && time.Duration(c.Hypervisor.BootTimeout) == 90*time.Second &&
					c.Storage.SharedFS == "virtio-fs" && c.Hypervisor.MemoryMB == 256
			},
		},
		{name: "malformed", toml: "[hypervisor\n", wantErr: []string{"line 1"}},
		{name: "unknown key", toml: "[hypervisor]\nvcpu = 2\n", wantErr: []string{"unknown key", "hypervisor.vcpu"}},
		{name: "renamed key", toml: "[hypervisor]\nname = \"qemu\"\n", wantErr: []string{"unknown key: hypervisor.name (line 2): renamed hypervisor.type"}},
		{name: "Cloud Hypervisor", toml: "[hypervisor]\ntype = \"clh\"\n[storage]\nshared_fs = \"virtio-fs\"\n", check: func(c Config) bool { return c.Hypervisor.Type == "clh" }},
		{
			name:    "Cloud Hypervisor with 9p (the default)",
			toml:    "[hypervisor]\ntype = \"clh\"\n",
			wantErr: []string{`storage.shared_fs = "9p" with hypervisor.type = "clh"`, `set storage.shared_fs = "virtio-fs"`},
		},
		{
			name: "Cloud Hypervisor without what it lacks",
			toml: "[hypervisor]\ntype = \"clh\"\nnic_model = \"e1000e\"\n[storage]\nshared_fs = \"virtio-fs\"\nblock_driver = \"virtio-scsi\"\n[agent]\nchannel = \"serial\"\n",
			wantErr: []string{
				`storage.block_driver = "virtio-scsi" with hypervisor.type = "clh": Cloud Hypervisor has no virtio-scsi`,
				`agent.channel = "serial" with hypervisor.type = "clh": Cloud Hypervisor has no virtio-serial`,
				`hypervisor.nic_model = "e1000e" with hypervisor.type = "clh": Cloud Hypervisor has no e1000e`,
			},
		},
		{name: "QEMU with 9p, virtio-scsi, serial, e1000e", toml: "[hypervisor]\nnic_model = \"e1000e\"\n[storage]\nblock_driver = \"virtio-scsi\"\n[agent]\nchannel = \"serial\"\n", check: func(c Config) bool { return c.Storage.SharedFS == "9p" }},
		{name: "unknown type", toml: "[hypervisor]\ntype = \"xen\"\n", wantErr: []string{`hypervisor.type = "xen"`}},
		{name: "bad enum", toml: "[hypervisor]\naccel = \"warp\"\n", wantErr: []string{`hypervisor.accel = "warp"`}},
		{name: "bad duration", toml: "[hypervisor]\nboot_timeout = \"soon\"\n", wantErr: []string{"soon"}},
		{name: "relative kernel", toml: "[hypervisor]\nkernel = \"vmlinux\"\n", wantErr: []string{"hypervisor.kernel", "absolute"}},
		{name: "QEMU sandbox on by default", toml: "", check: func(c Config) bool { return c.Hypervisor.Sandbox }},
		{name: "QEMU sandbox off", toml: "[hypervisor]\nsandbox = false\n", check: func(c Config) bool { return !c.Hypervisor.Sandbox }},
		{name: "no co-location annotations allowed by default", toml: "", check: func(c Config) bool { return len(c.Colocation.Annotations) == 0 }},
		{
			name: "co-location annotations allowed",
			toml: "[colocation]\nannotations = [\"io.colo.class\", \"io.colo.vcpus\", \"io.colo.pod-weight\", \"io.colo.overhead-idle\", \"io.colo.host-namespaces\", \"io.colo.disks\"]\n",
			check: func(c Config) bool {
				return reflect.DeepEqual(c.Colocation.Annotations, ColocationAnnotations())
			},
		},
		{
			name:    "igb is not in QEMU 7.2",
			toml:    "[hypervisor]\nnic_model = \"igb\"\n",
			wantErr: []string{`hypervisor.nic_model = "igb"`, "QEMU 8.0", "e1000e"},
		},
		{name: "e1000e", toml: "[hypervisor]\nnic_model = \"e1000e\"\n", check: func(c Config) bool { return c.Hypervisor.NICModel == "e1000e" }},
		{
			name:    "unknown co-location annotation",
			toml:    "[colocation]\nannotations = [\"io.colo.class\", \"io.colo.vcpu\"]\n",
			wantErr: []string{`colocation.annotations = "io.colo.vcpu"`, "io.colo.class"},
		},
		{
			name: "yield off by default",
			toml: "",
			check: func(c Config) bool {
				y := c.Yield
				return !y.Enabled && time.Duration(y.Interval) == time.Second && y.HeadroomCPUs == 1 && y.FloorCPUs == 0.1 &&
					y.RaiseAfter == 5 && y.RaiseStepCPUs == 0.5 && reflect.DeepEqual(y.OfflineClasses, []string{"low"})
			},
		},
		{name: "yield on", toml: "[yield]\nenabled = true\n", check: func(c Config) bool { return c.Yield.Enabled }},
		{
			name: "yield tuned",
			toml: "[yield]\nenabled = true\ninterval = \"250ms\"\nheadroom_cpus = 0\nfloor_cpus = 0.05\nraise_after = 1\nraise_step_cpus = 2\n",
			check: func(c Config) bool {
				y := c.Yield
				return time.Duration(y.Interval) == 250*time.Millisecond && y.HeadroomCPUs == 0 && y.FloorCPUs == 0.05 && y.RaiseAfter == 1 && y.RaiseStepCPUs == 2
			},
		},
		{
			name: "yield values out of range",
			toml: "[yield]\ninterval = \"0s\"\nheadroom_cpus = -1\nfloor_cpus = 0.001\nraise_after = 0\nraise_step_cpus = 0\n",
			wantErr: []string{
				"yield.interval = 0s", "yield.headroom_cpus = -1", "yield.floor_cpus = 0.001", "yield.raise_after = 0", "yield.raise_step_cpus = 0",
			},
		},
		{name: "yield NaN", toml: "[yield]\nheadroom_cpus = nan\n", wantErr: []string{"yield.headroom_cpus = NaN"}},
		{
			name:    "yield of a class that is not there",
			toml:    "[yield]\nenabled = true\noffline_classes = [\"low\", \"batch\", \"low\"]\n",
			wantErr: []string{`yield.offline_classes[1] = "batch": no such class in colocation.classes ["high" "low"]`, `yield.offline_classes[2] = "low": listed twice`},
		},
		{name: "yield with no class", toml: "[yield]\nenabled = true\noffline_classes = []\n", wantErr: []string{"yield.offline_classes: want at least one class"}},
		{
			// A node that renamed its classes and does not yield
			// need not name them.
			name:  "yield off, classes renamed",
			toml:  "[colocation]\nclasses = [{ name = \"gold\", weight = 100 }, { name = \"batch\", weight = 10 }]\n",
			check: func(c Config) bool { return !c.Yield.Enabled },
		},
		{
			name:  "yield of a renamed class",
			toml:  "[colocation]\nclasses = [{ name = \"gold\", weight = 100 }, { name = \"batch\", weight = 10 }]\n[yield]\nenabled = true\noffline_classes = [\"batch\"]\n",
			check: func(c Config) bool { return c.Yield.OfflineClasses[0] == "batch" },
		},
		{
			name:    "all errors at once",
			toml:    "[hypervisor]\nvcpus = 0\nmemory_mb = 1\n[agent]\nchannel = \"pigeon\"\n",
			wantErr: []string{"hypervisor.vcpus = 0", "hypervisor.memory_mb = 1", `agent.channel = "pigeon"`},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := Parse([]byte(tt.toml))
			if len(tt.wantErr) > 0 {
				if err == nil {
					t.Fatalf("want an error, got %+v", c)
				}
				for _, w := range tt.wantErr {
					if !strings.Contains(err.Error(), w) {
						t.Errorf("error %q lacks %q", err, w)
					}
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !tt.check(c) {
				t.Errorf("unexpected config %+v", c)
			}
		})
	}
}

func TestLoadOrder(t *testing.T) {
	dir := t.TempDir()
	write := func(name, body string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	option := write("option.toml", "[hypervisor]\nvcpus = 3\n")
	env := write("env.toml", "[hypervisor]\nvcpus = 2\n")

	t.Setenv(EnvPath, env)
	if c, err := Load(option); err != nil || c.Hypervisor.VCPUs != 3 {
		t.Errorf("the runtime option wins: %v %d", err, c.Hypervisor.VCPUs)
	}
	if c, err := Load(""); err != nil || c.Hypervisor.VCPUs != 2 {
		t.Errorf("then COLO_CONFIG: %v %d", err, c.Hypervisor.VCPUs)
	}
	missing := filepath.Join(dir, "missing.toml")
	if _, err := Load(missing); err == nil || !strings.Contains(err.Error(), missing) {
		t.Errorf("a named file that is missing is an error naming it, got %v", err)
	}
	t.Setenv(EnvPath, missing)
	if _, err := Load(""); err == nil || !strings.Contains(err.Error(), missing) {
		t.Errorf("a COLO_CONFIG file that is missing is an error naming it, got %v", err)
	}
}
