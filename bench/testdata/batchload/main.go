// Command batchload is the offline (batch) work of `make bench-colo`: many
// threads at once, each doing units of CPU, memory and file work in turn,
// until it is killed. Every progressInterval it replaces OUT/progress.json
// with the units done so far, for the bench to read on the host through a
// bind mount.
//
//	batchload OUT SCRATCH THREADS
//
// A unit is one of:
//   - cpu: SHA-256 over cpuBytes;
//   - mem: map memBytes of anonymous memory, write to every page, unmap:
//     page faults, zeroing and freeing, not the page cache;
//   - file: write fileBytes to the thread's own file in SCRATCH, fsync it,
//     read it back.
//
// It fits in the guest of a colo pod without a memory limit (256 MiB, a
// MemTotal of about 140 MiB): its buffers are small, and only so many
// threads map memory, or write files (each 9p request in flight holds two
// buffers of msize), at once.
package main

import (
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

const (
	chunk     = 64 << 10
	cpuBytes  = 4 * chunk
	memBytes  = 4 << 20
	fileBytes = 4 * chunk
	// memAtOnce and fileAtOnce bound the threads doing that kind of unit
	// at one time: 32 MiB of anonymous memory at most, and 16 files.
	memAtOnce        = 8
	fileAtOnce       = 16
	progressInterval = 100 * time.Millisecond
)

// Progress is what OUT/progress.json holds: units done since the start,
// by kind.
type Progress struct {
	Threads int    `json:"threads"`
	CPU     uint64 `json:"cpu"`
	Mem     uint64 `json:"mem"`
	File    uint64 `json:"file"`
	// Errors counts units that failed (the first error is in Error): a
	// unit that fails is not counted as done.
	Errors uint64 `json:"errors"`
	Error  string `json:"error,omitempty"`
}

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "batchload:", err)
		os.Exit(1)
	}
}

type counters struct {
	cpu, mem, file, errors atomic.Uint64
	firstErr               atomic.Pointer[string]
}

func (c *counters) fail(err error) {
	c.errors.Add(1)
	s := err.Error()
	c.firstErr.CompareAndSwap(nil, &s)
}

func run(args []string) error {
	if len(args) != 3 {
		return errors.New("usage: batchload OUT SCRATCH THREADS")
	}
	out, scratch := args[0], args[1]
	threads, err := strconv.Atoi(args[2])
	if err != nil || threads <= 0 {
		return fmt.Errorf("want a positive number of threads, got %q", args[2])
	}
	if err := os.MkdirAll(scratch, 0o755); err != nil {
		return err
	}
	// One OS thread per worker, all of them runnable at once: the kernel's
	// scheduler, not Go's, shares the CPUs between them.
	runtime.GOMAXPROCS(threads)
	var c counters
	memSlots, fileSlots := make(chan struct{}, memAtOnce), make(chan struct{}, fileAtOnce)
	for i := range threads {
		go worker(&c, memSlots, fileSlots, filepath.Join(scratch, fmt.Sprintf("w%d", i)))
	}
	for {
		time.Sleep(progressInterval)
		p := Progress{Threads: threads, CPU: c.cpu.Load(), Mem: c.mem.Load(), File: c.file.Load(), Errors: c.errors.Load()}
		if e := c.firstErr.Load(); e != nil {
			p.Error = *e
		}
		if err := writeProgress(out, p); err != nil {
			return err
		}
	}
}

// writeProgress replaces OUT/progress.json whole, so that a reader never
// sees half of it.
func writeProgress(dir string, p Progress) error {
	b, err := json.Marshal(p)
	if err != nil {
		return err
	}
	tmp := filepath.Join(dir, ".progress.json")
	if err := os.WriteFile(tmp, b, 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, filepath.Join(dir, "progress.json"))
}

func worker(c *counters, memSlots, fileSlots chan struct{}, path string) {
	runtime.LockOSThread()
	buf := make([]byte, chunk)
	for i := range buf {
		buf[i] = byte(i*7 + 3)
	}
	for {
		h := sha256.New()
		for range cpuBytes / chunk {
			h.Write(buf)
		}
		buf[0] = h.Sum(nil)[0]
		c.cpu.Add(1)

		memSlots <- struct{}{}
		err := touch()
		<-memSlots
		if err != nil {
			c.fail(err)
		} else {
			c.mem.Add(1)
		}

		fileSlots <- struct{}{}
		err = fileUnit(path, buf)
		<-fileSlots
		if err != nil {
			c.fail(err)
		} else {
			c.file.Add(1)
		}
	}
}

func touch() error {
	m, err := unix.Mmap(-1, 0, memBytes, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		return fmt.Errorf("mmap: %w", err)
	}
	for i := 0; i < len(m); i += os.Getpagesize() {
		m[i] = byte(i)
	}
	return unix.Munmap(m)
}

// fileUnit writes fileBytes to path in chunks of buf, makes them durable
// and reads them back.
func fileUnit(path string, buf []byte) error {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_TRUNC|os.O_RDWR, 0o644)
	if err != nil {
		return err
	}
	defer f.Close()
	for range fileBytes / len(buf) {
		if _, err := f.Write(buf); err != nil {
			return err
		}
	}
	if err := f.Sync(); err != nil {
		return err
	}
	for off := int64(0); off < fileBytes; off += int64(len(buf)) {
		if _, err := f.ReadAt(buf, off); err != nil && err != io.EOF {
			return err
		}
	}
	return f.Close()
}
