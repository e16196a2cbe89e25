// Command iobench measures one phase of file I/O in the directory it is
// given and prints the result as JSON: `make bench` runs it in containers
// (runc on the host, colo over 9p, virtio-fs and a block rootfs), one exec
// per phase, dropping the caches between phases so reads reach the device.
//
//	iobench write DIR MiB      sequential 1 MiB writes, then fsync
//	iobench read DIR           sequential 1 MiB reads of the whole file
//	iobench randread DIR N     N random 4 KiB reads
//	iobench randwrite DIR N    N random 4 KiB writes, each made durable (fdatasync)
package main

import (
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"time"
)

const (
	seqBlock  = 1 << 20
	randBlock = 4 << 10
	fileName  = "iobench.dat"
)

// Result is one phase's figures.
type Result struct {
	Phase   string  `json:"phase"`
	Bytes   int64   `json:"bytes"`
	Ops     int     `json:"ops"`
	Seconds float64 `json:"seconds"`
	// DroppedCaches tells whether the guest's (or, for runc, the host's)
	// page cache was dropped before the phase: it needs a privileged
	// container.
	DroppedCaches bool `json:"dropped_caches"`
}

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "iobench:", err)
		os.Exit(1)
	}
}

func run(args []string) error {
	if len(args) < 2 {
		return fmt.Errorf("usage: iobench write|read|randread|randwrite DIR [MiB|N]")
	}
	phase, path := args[0], filepath.Join(args[1], fileName)
	n := 0
	if len(args) > 2 {
		var err error
		if n, err = strconv.Atoi(args[2]); err != nil || n <= 0 {
			return fmt.Errorf("%s: want a positive number, got %q", phase, args[2])
		}
	}
	r := Result{Phase: phase}
	if phase != "write" {
		r.DroppedCaches = dropCaches()
	}
	start := time.Now()
	var err error
	switch phase {
	case "write":
		err = seqWrite(path, n, &r)
	case "read":
		err = seqRead(path, &r)
	case "randread":
		err = random(path, n, false, &r)
	case "randwrite":
		err = random(path, n, true, &r)
	default:
		err = fmt.Errorf("unknown phase %q", phase)
	}
	if err != nil {
		return err
	}
	r.Seconds = time.Since(start).Seconds()
	return json.NewEncoder(os.Stdout).Encode(r)
}

func dropCaches() bool {
	syncAll()
	return os.WriteFile("/proc/sys/vm/drop_caches", []byte("3"), 0) == nil
}

func seqWrite(path string, mib int, r *Result) error {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o644)
	if err != nil {
		return err
	}
	defer f.Close()
	buf := make([]byte, seqBlock)
	for i := range buf {
		buf[i] = byte(i*7 + 3) // not zeros: nothing along the way may skip them
	}
	for range mib {
		if _, err := f.Write(buf); err != nil {
			return err
		}
		r.Bytes += seqBlock
		r.Ops++
	}
	if err := f.Sync(); err != nil {
		return err
	}
	return f.Close()
}

func seqRead(path string, r *Result) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	buf := make([]byte, seqBlock)
	for {
		n, err := f.Read(buf)
		r.Bytes += int64(n)
		if n > 0 {
			r.Ops++
		}
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
	}
}

func random(path string, n int, write bool, r *Result) error {
	flag := os.O_RDONLY
	if write {
		flag = os.O_RDWR
	}
	f, err := os.OpenFile(path, flag, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return err
	}
	blocks := st.Size() / randBlock
	if blocks == 0 {
		return fmt.Errorf("%s is empty: run the write phase first", path)
	}
	// The same offsets every run and runtime.
	rnd := rand.New(rand.NewPCG(1, 2))
	buf := make([]byte, randBlock)
	for range n {
		off := rnd.Int64N(blocks) * randBlock
		if write {
			if _, err := f.WriteAt(buf, off); err != nil {
				return err
			}
			if err := fdatasync(f); err != nil {
				return err
			}
		} else if _, err := f.ReadAt(buf, off); err != nil {
			return err
		}
		r.Bytes += randBlock
		r.Ops++
	}
	return nil
}
