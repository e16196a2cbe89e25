package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"

	"github.com/colo-runtime/colo/testbed"
)

// ioFileMiB is the size of the file the I/O phases work on: half the
// default guest's memory, so that it fits in neither the guest's page
// cache after a drop nor reads ahead of it.
const (
	ioFileMiB   = 128
	ioRandReads = 2000
	// ioRandWrites are each made durable with fdatasync: the figure is
	// synchronous random write IOPS, what a database's log sees.
	ioRandWrites = 300
	// ioBlockfileMB is the size of the bench's blockfile snapshots: the
	// file and the image, with room to spare.
	ioBlockfileMB = 2 * ioFileMiB
)

// IORow is one way a container's rootfs can be stored, measured.
type IORow struct {
	Name string `json:"name"`
	// Flags are ctr run's for it; Config the colo config.
	Flags  []string `json:"flags,omitempty"`
	Config string   `json:"config,omitempty"`
	// Throughput in MiB/s and random IOPS.
	SeqWriteMiBs  float64 `json:"seq_write_mib_s"`
	SeqReadMiBs   float64 `json:"seq_read_mib_s"`
	RandReadIOPS  float64 `json:"rand_read_4k_iops"`
	RandWriteIOPS float64 `json:"rand_write_4k_sync_iops"`
	// DroppedCaches is false when the container could not drop its page
	// cache before a read phase: its reads may come from memory.
	DroppedCaches bool `json:"dropped_caches"`
}

// ioRows are measured in this order, in one run.
var ioRows = []IORow{
	{Name: "runc, rootfs on the host (overlayfs)", Flags: []string{"--runtime", runcRuntime}},
	{Name: "colo, rootfs over 9p", Config: "[storage]\nshared_fs = \"9p\"\n"},
	{Name: "colo, rootfs over virtio-fs", Config: "[storage]\nshared_fs = \"virtio-fs\"\n"},
	{Name: "colo, rootfs on a block device (blockfile, virtio-blk)", Flags: []string{"--snapshotter", "blockfile"}},
}

// runIO measures file I/O alone (bench -io) and prints its table.
func runIO(o options) (err error) {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	cd, stopBed, err := startTestbed(ctx, testbed.Options{Namespace: "bench", ColoConfig: o.coloConfig, BlockfileMB: ioBlockfileMB})
	if err != nil {
		return err
	}
	defer stopBed(&err)
	rows, err := measureIO(ctx, cd)
	var b strings.Builder
	ioSection(&b, rows)
	fmt.Print(b.String())
	return err
}

// measureIO runs iobench's phases in a container of each row, on a file in
// the container's rootfs.
func measureIO(ctx context.Context, cd *testbed.Containerd) ([]IORow, error) {
	tools, err := buildTool(ctx, "iobench", filepath.Join("bench", "testdata", "iobench"))
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(tools)
	var rows []IORow
	for i, row := range ioRows {
		fmt.Printf("  %s ...\n", row.Name)
		r, err := ioRow(ctx, cd, tools, fmt.Sprintf("io-%d", i), row)
		if err != nil {
			return rows, fmt.Errorf("%s: %w", row.Name, err)
		}
		rows = append(rows, r)
	}
	return rows, nil
}

func ioRow(ctx context.Context, cd *testbed.Containerd, tools, id string, row IORow) (IORow, error) {
	args := []string{"run", "-d", "--null-io", "--privileged", "--privileged-without-host-devices", "--mount", "type=bind,src=" + tools + ",dst=/t,options=rbind:ro"}
	if !slices.Contains(row.Flags, "--runtime") {
		args = append(args, "--runtime", testbed.Runtime)
	}
	args = append(args, row.Flags...)
	if row.Config != "" {
		cfg, err := cd.WriteColoConfig("bench-"+id, row.Config)
		if err != nil {
			return row, err
		}
		args = append(args, "--runtime-config-path", cfg)
	}
	if r, err := cd.Ctr(ctx, append(args, testbed.BusyboxImage, id, "sleep", "100000")...); err != nil || r.ExitCode != 0 {
		return row, fmt.Errorf("start: %v %s", err, r)
	}
	defer remove(ctx, cd, id)
	const dir = "/iobench"
	if r, err := cd.Ctr(ctx, "task", "exec", "--exec-id", "mkdir", id, "mkdir", "-p", dir); err != nil || r.ExitCode != 0 {
		return row, fmt.Errorf("mkdir: %v %s", err, r)
	}
	row.DroppedCaches = true
	for _, p := range []struct {
		phase, arg string
		into       *float64
		perOp      bool
	}{
		{"write", strconv.Itoa(ioFileMiB), &row.SeqWriteMiBs, false},
		{"read", "", &row.SeqReadMiBs, false},
		{"randread", strconv.Itoa(ioRandReads), &row.RandReadIOPS, true},
		{"randwrite", strconv.Itoa(ioRandWrites), &row.RandWriteIOPS, true},
	} {
		// The host's page cache holds what 9p, virtio-fs and the disk
		// image read and wrote: dropped too, so reads reach the disk.
		_ = exec.CommandContext(ctx, "sync").Run()
		_ = os.WriteFile("/proc/sys/vm/drop_caches", []byte("3"), 0)
		cmd := []string{"task", "exec", "--exec-id", p.phase, id, "/t/iobench", p.phase, dir}
		if p.arg != "" {
			cmd = append(cmd, p.arg)
		}
		r, err := cd.Ctr(ctx, cmd...)
		if err != nil || r.ExitCode != 0 {
			return row, fmt.Errorf("iobench %s: %v %s", p.phase, err, r)
		}
		var res struct {
			Bytes         int64   `json:"bytes"`
			Ops           int     `json:"ops"`
			Seconds       float64 `json:"seconds"`
			DroppedCaches bool    `json:"dropped_caches"`
		}
		if err := json.Unmarshal([]byte(strings.TrimSpace(r.Stdout)), &res); err != nil || res.Seconds <= 0 {
			return row, fmt.Errorf("iobench %s printed %q: %v", p.phase, r.Stdout, err)
		}
		if p.phase != "write" && !res.DroppedCaches {
			row.DroppedCaches = false
		}
		if p.perOp {
			*p.into = float64(res.Ops) / res.Seconds
		} else {
			*p.into = float64(res.Bytes) / (1 << 20) / res.Seconds
		}
	}
	return row, nil
}

// ioSection writes the I/O table.
func ioSection(b *strings.Builder, rows []IORow) {
	fmt.Fprintf(b, "\n## File I/O in a container's rootfs (same run)\n\n"+
		"`bench/testdata/iobench` in a privileged container, on a %d MiB file in the container's rootfs: sequential 1 MiB "+
		"writes then fsync, sequential 1 MiB reads, %d random 4 KiB reads, %d random 4 KiB writes each followed by fdatasync. "+
		"Page caches (the guest's and the host's) are dropped before each read phase. Under TCG the guest's own CPU time "+
		"weighs on every colo row.\n\n", ioFileMiB, ioRandReads, ioRandWrites)
	b.WriteString("| rootfs | seq write MiB/s | seq read MiB/s | rand read 4k IOPS | rand write 4k sync IOPS |\n|---|---|---|---|---|\n")
	for _, r := range rows {
		note := ""
		if !r.DroppedCaches {
			note = " (caches not dropped)"
		}
		fmt.Fprintf(b, "| %s%s | %.0f | %.0f | %.0f | %.0f |\n", r.Name, note, r.SeqWriteMiBs, r.SeqReadMiBs, r.RandReadIOPS, r.RandWriteIOPS)
	}
}
