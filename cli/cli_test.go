package cli

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestParseBytes(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want int64
		err  bool
	}{
		{in: "2Gi", want: 2 << 30},
		{in: "512Mi", want: 512 << 20},
		{in: "1G", want: 1e9},
		{in: "1048576", want: 1 << 20},
		{in: "1.5Gi", err: true},
		{in: "-1Mi", err: true},
		{in: "0", err: true},
		{in: "lots", err: true},
		{in: "99999999999Ti", err: true},
	} {
		got, err := parseBytes(tc.in)
		if (err != nil) != tc.err || got != tc.want {
			t.Errorf("parseBytes(%q) = %d, %v; want %d, error %v", tc.in, got, err, tc.want, tc.err)
		}
	}
}

// TestResizeUsage: command-line mistakes are named, with exit status 2,
// before any sandbox is looked for.
func TestResizeUsage(t *testing.T) {
	dir := t.TempDir()
	cfg := filepath.Join(dir, "config.toml")
	if err := os.WriteFile(cfg, []byte("[runtime]\nstate_dir = \""+dir+"\"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		args []string
		code int
		err  string
	}{
		{args: []string{"resize", "pod"}, code: 2, err: "give --cpus, --memory or both"},
		{args: []string{"resize", "pod", "--memory", "2GB"}, code: 2, err: "--memory"},
		{args: []string{"resize", "pod", "--cpus", "-1"}, code: 2, err: "--cpus -1"},
		{args: []string{"resize", "--cpus", "2"}, code: 2, err: "no pod or sandbox named"},
		{args: []string{"resize", "nosuchpod", "--cpus", "2"}, code: 1, err: `no sandbox or pod "nosuchpod"`},
		{args: []string{"frobnicate"}, code: 2, err: `no command "frobnicate"`},
	} {
		var stdout, stderr bytes.Buffer
		code := Run(context.Background(), append([]string{"--config", cfg}, tc.args...), &stdout, &stderr)
		if code != tc.code || !strings.Contains(stderr.String(), tc.err) {
			t.Errorf("colo %q: exit %d, stderr %q; want exit %d naming %q", tc.args, code, stderr.String(), tc.code, tc.err)
		}
	}
}
