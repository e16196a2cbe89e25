package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestReadSchedstat(t *testing.T) {
	dir := t.TempDir()
	for _, tc := range []struct {
		name, body    string
		run, runDelay uint64
		wantErr       bool
	}{
		{name: "kernel's", body: "1283339 62875 4\n", run: 1283339, runDelay: 62875},
		{name: "one field", body: "1283339\n", wantErr: true},
		{name: "not numbers", body: "a b c\n", wantErr: true},
		{name: "empty", body: "", wantErr: true},
	} {
		path := filepath.Join(dir, strings.ReplaceAll(tc.name, " ", "-"))
		if err := os.WriteFile(path, []byte(tc.body), 0o644); err != nil {
			t.Fatal(err)
		}
		f, err := os.Open(path)
		if err != nil {
			t.Fatal(err)
		}
		// Twice: the second read starts at offset 0 again.
		for range 2 {
			run, delay, err := readSchedstat(f, make([]byte, 128))
			if (err != nil) != tc.wantErr || !tc.wantErr && (run != tc.run || delay != tc.runDelay) {
				t.Errorf("%s: %d %d %v", tc.name, run, delay, err)
			}
		}
		f.Close()
	}
}

// TestSchedSampler reads this test's own threads while one of them works.
func TestSchedSampler(t *testing.T) {
	s := startSchedSampler(os.Getpid())
	for end := time.Now().Add(200 * time.Millisecond); time.Now().Before(end); {
	}
	w, err := s.Stop()
	if err != nil {
		t.Fatal(err)
	}
	if w.Threads == 0 || w.Samples == 0 || w.CPUShare <= 0 || w.IntervalMax <= 0 {
		t.Errorf("sampler saw %+v", w)
	}
	if _, err := startSchedSampler(1 << 30).Stop(); err == nil {
		t.Error("a sampler of a process that does not exist: no error")
	}
}
