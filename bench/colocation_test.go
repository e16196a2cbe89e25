package main

import (
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

func TestSelectRuns(t *testing.T) {
	for _, tc := range []struct {
		list    string
		want    []string
		wantErr string
	}{
		{list: "colo,online", want: []string{"online", "colo"}},
		{list: " runc , offline-runc ,", want: []string{"offline-runc", "runc"}},
		{list: strings.Join(colocationRunKeys(), ","), want: colocationRunKeys()},
		{list: "online,colo-yeld", wantErr: `no run "colo-yeld"`},
		{list: " , ", wantErr: "no runs given"},
	} {
		runs, err := selectRuns(tc.list)
		if tc.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Errorf("selectRuns(%q): error %v, want one saying %q", tc.list, err, tc.wantErr)
			}
			continue
		}
		if err != nil {
			t.Errorf("selectRuns(%q): %v", tc.list, err)
			continue
		}
		var keys []string
		for _, r := range runs {
			keys = append(keys, r.key)
		}
		if !slices.Equal(keys, tc.want) {
			t.Errorf("selectRuns(%q) = %v, want %v", tc.list, keys, tc.want)
		}
	}
}

func TestThroughput(t *testing.T) {
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	at := func(units uint64, written, read time.Duration) offlineProgress {
		return offlineProgress{Threads: 64, CPU: units, Mem: units, File: units, written: t0.Add(written), read: t0.Add(read)}
	}
	for _, tc := range []struct {
		name        string
		first, last offlineProgress
		want        float64
		wantErr     string
	}{
		{name: "working", first: at(100, 0, 0), last: at(200, 10*time.Second, 10*time.Second+50*time.Millisecond), want: 30},
		{name: "no progress", first: at(100, 0, 0), last: at(100, 0, 10*time.Second), wantErr: "no progress"},
		{name: "stopped in the window", first: at(100, 0, 0), last: at(150, 3*time.Second, 10*time.Second), wantErr: "stopped"},
	} {
		got, err := throughput(tc.first, tc.last, "")
		if tc.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Errorf("%s: error %v, want one saying %q", tc.name, err, tc.wantErr)
			}
			continue
		}
		if err != nil {
			t.Errorf("%s: %v", tc.name, err)
			continue
		}
		if got.UnitsPerSec != tc.want || got.CPU != tc.want/3 {
			t.Errorf("%s: %+v, want %v units/s", tc.name, got, tc.want)
		}
	}
}

func TestReadProgress(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "progress.json")
	for _, tc := range []struct {
		name, body string
		wantUnits  uint64
		wantErr    string
	}{
		{name: "counts", body: `{"threads":64,"cpu":3,"mem":2,"file":1,"errors":0}`, wantUnits: 6},
		{name: "failed units", body: `{"threads":64,"cpu":3,"errors":2,"error":"fsync: no space left"}`, wantErr: "no space left"},
		{name: "not JSON", body: `{"threads":`, wantErr: "progress.json"},
	} {
		if err := os.WriteFile(path, []byte(tc.body), 0o644); err != nil {
			t.Fatal(err)
		}
		p, err := readProgress(path)
		if tc.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Errorf("%s: error %v, want one saying %q", tc.name, err, tc.wantErr)
			}
			continue
		}
		if err != nil || p.units() != tc.wantUnits || p.written.IsZero() {
			t.Errorf("%s: %+v, %v; want %d units and the file's time", tc.name, p, err, tc.wantUnits)
		}
	}
}

func TestRelate(t *testing.T) {
	colo, runc := coloDefault, runcBestEffort
	runs := []ColocationResult{
		{Key: "online", Online: &OnlineLatency{P99: 4}},
		{Key: "offline", Offline: &colo, Throughput: &OfflineThroughput{UnitsPerSec: 50}},
		{Key: "offline-runc", Offline: &runc, Throughput: &OfflineThroughput{UnitsPerSec: 1000}},
		{Key: "runc", Online: &OnlineLatency{P99: 8}, Offline: &runc, Throughput: &OfflineThroughput{UnitsPerSec: 600}},
		{Key: "colo", Online: &OnlineLatency{P99: 40}, Offline: &colo, Throughput: &OfflineThroughput{UnitsPerSec: 25}},
	}
	relate(runs)
	for _, tc := range []struct {
		key          string
		p99, offline float64
	}{
		{"online", 1, 0}, {"offline", 0, 1}, {"offline-runc", 0, 1}, {"runc", 2, 0.6}, {"colo", 10, 0.5},
	} {
		i := slices.IndexFunc(runs, func(r ColocationResult) bool { return r.Key == tc.key })
		if r := runs[i]; r.P99Ratio != tc.p99 || r.OfflineShare != tc.offline {
			t.Errorf("%s: p99 ratio %v, offline share %v; want %v, %v", tc.key, r.P99Ratio, r.OfflineShare, tc.p99, tc.offline)
		}
	}
	// Without the references there is nothing to relate to.
	alone := []ColocationResult{{Key: "colo", Online: &OnlineLatency{P99: 40}, Offline: &colo, Throughput: &OfflineThroughput{UnitsPerSec: 25}}}
	relate(alone)
	if alone[0].P99Ratio != 0 || alone[0].OfflineShare != 0 {
		t.Errorf("without references: %+v", alone[0])
	}
}

func TestSummarizeOnline(t *testing.T) {
	var out []outcome
	for i := range 97 {
		out = append(out, outcome{latency: time.Duration(i+1) * time.Millisecond, lag: time.Duration(i) * time.Microsecond})
	}
	out = append(out,
		outcome{latency: requestTimeout, timeout: true},
		outcome{latency: requestTimeout, timeout: true},
		outcome{latency: time.Millisecond, err: errors.New("connection refused")},
	)
	l := summarizeOnline(out, 350)
	if l.Requests != 100 || l.OK != 97 || l.Timeouts != 2 || l.Errors != 1 || l.Error != "connection refused" {
		t.Errorf("counts: %+v", l)
	}
	// 99 latencies in the percentiles: the timeouts at requestTimeout,
	// the error left out.
	if l.P50 != 50 || l.P99 != ms(requestTimeout) || l.Max != ms(requestTimeout) {
		t.Errorf("percentiles: p50 %v p99 %v max %v", l.P50, l.P99, l.Max)
	}
}
