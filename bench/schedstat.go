package main

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"runtime"
	"sort"
	"strconv"
	"time"
)

// The scheduler's view of the online service: how long its threads waited
// on a runqueue while runnable. The kernel adds a wait to the second field
// of /proc/<pid>/task/<tid>/schedstat (run_delay, in ns) in one piece,
// when the wait ends and the thread gets a CPU. Read every schedInterval,
// a thread's growth of it between two reads is the waits that ended in
// between: with reads 1 ms apart, all of them but the first fit inside
// that millisecond, so a growth of more than 5 ms is one wait of more than
// 4 ms at least, and in practice one wait of the size seen.

const (
	schedInterval = time.Millisecond
	// schedRescan is how often the sampler looks for new threads (the Go
	// runtime starts them as it needs them).
	schedRescan = 100 * time.Millisecond
)

// SchedWaits is what the sampler saw of one process's threads.
type SchedWaits struct {
	// Threads is how many threads were read, over the run.
	Threads int `json:"threads"`
	Samples int `json:"samples"`
	// RunDelayMs is the runqueue wait of all threads together, and
	// RunDelayPerSecMs the same per second of the run.
	RunDelayMs       float64 `json:"run_delay_ms"`
	RunDelayPerSecMs float64 `json:"run_delay_ms_per_s"`
	// Over5ms and Over20ms count a thread's growth of run_delay between
	// two reads of more than 5 and 20 ms: waits that long.
	Over5ms  int `json:"waits_over_5ms"`
	Over20ms int `json:"waits_over_20ms"`
	// MaxWaitMs is the biggest such growth.
	MaxWaitMs float64 `json:"max_wait_ms"`
	// CPUShare is the threads' CPU time (schedstat's first field) as a
	// share of all host CPUs over the run.
	CPUShare float64 `json:"cpu_share"`
	// Interval is how far apart the reads really were: the sampler is a
	// process on the same CPUs.
	IntervalP50 float64 `json:"interval_p50_ms"`
	IntervalP99 float64 `json:"interval_p99_ms"`
	IntervalMax float64 `json:"interval_max_ms"`
}

// schedSampler reads a process's threads' schedstat from start until
// stop.
type schedSampler struct {
	stop chan struct{}
	done chan schedResult
}

type schedResult struct {
	waits SchedWaits
	err   error
}

// schedThread is one thread's open schedstat and its counters at the
// last read.
type schedThread struct {
	f             *os.File
	run, runDelay uint64
}

func startSchedSampler(pid int) *schedSampler {
	s := &schedSampler{stop: make(chan struct{}), done: make(chan schedResult, 1)}
	go func() {
		w, err := sampleSched(pid, s.stop)
		s.done <- schedResult{w, err}
	}()
	return s
}

// Stop ends the sampling and returns what it saw.
func (s *schedSampler) Stop() (SchedWaits, error) {
	close(s.stop)
	r := <-s.done
	return r.waits, r.err
}

func sampleSched(pid int, stop <-chan struct{}) (SchedWaits, error) {
	// One OS thread for the reads, so that the Go scheduler does not add
	// its own delays to theirs.
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	var w SchedWaits
	threads := map[int]*schedThread{}
	defer func() {
		for _, t := range threads {
			t.f.Close()
		}
	}()
	buf := make([]byte, 128)
	if err := rescan(pid, threads, buf); err != nil {
		return w, err
	}
	w.Threads = len(threads)
	if len(threads) == 0 {
		return w, fmt.Errorf("process %d has no threads to read", pid)
	}
	var runNs, delayNs uint64
	var intervals []float64
	start := time.Now()
	last, lastScan := start, start
	tick := time.NewTicker(schedInterval)
	defer tick.Stop()
	for {
		select {
		case <-stop:
			elapsed := last.Sub(start).Seconds()
			w.RunDelayMs = float64(delayNs) / 1e6
			if elapsed > 0 {
				w.RunDelayPerSecMs = w.RunDelayMs / elapsed
				w.CPUShare = float64(runNs) / 1e9 / elapsed / float64(runtime.NumCPU())
			}
			sort.Float64s(intervals)
			if len(intervals) > 0 {
				w.IntervalP50, w.IntervalP99 = percentile(intervals, 50), percentile(intervals, 99)
				w.IntervalMax = intervals[len(intervals)-1]
			}
			return w, nil
		case now := <-tick.C:
			for tid, t := range threads {
				run, delay, err := readSchedstat(t.f, buf)
				if err != nil {
					// The thread is gone: what it waited since the last
					// read is lost with it.
					t.f.Close()
					delete(threads, tid)
					continue
				}
				d := delay - t.runDelay
				waited := float64(d) / 1e6
				w.MaxWaitMs = max(w.MaxWaitMs, waited)
				if waited > 5 {
					w.Over5ms++
				}
				if waited > 20 {
					w.Over20ms++
				}
				delayNs += d
				runNs += run - t.run
				t.run, t.runDelay = run, delay
			}
			w.Samples++
			intervals = append(intervals, ms(now.Sub(last)))
			last = now
			if now.Sub(lastScan) >= schedRescan {
				lastScan = now
				n := len(threads)
				if err := rescan(pid, threads, buf); err != nil {
					return w, err
				}
				w.Threads += len(threads) - n
			}
		}
	}
}

// rescan opens the threads of pid not in threads yet, with their
// counters as they are now: what they waited before is not the run's.
func rescan(pid int, threads map[int]*schedThread, buf []byte) error {
	dir := fmt.Sprintf("/proc/%d/task", pid)
	entries, err := os.ReadDir(dir)
	if err != nil {
		return fmt.Errorf("online service's threads: %w", err)
	}
	for _, e := range entries {
		tid, err := strconv.Atoi(e.Name())
		if err != nil || threads[tid] != nil {
			continue
		}
		f, err := os.Open(fmt.Sprintf("%s/%d/schedstat", dir, tid))
		if err != nil {
			continue // gone already
		}
		run, delay, err := readSchedstat(f, buf)
		if err != nil {
			f.Close()
			continue
		}
		threads[tid] = &schedThread{f: f, run: run, runDelay: delay}
	}
	return nil
}

// readSchedstat reads an open schedstat file again (the kernel makes its
// text anew at offset 0): time on a CPU and time waiting on a runqueue,
// in ns.
func readSchedstat(f *os.File, buf []byte) (run, runDelay uint64, err error) {
	n, err := f.ReadAt(buf, 0)
	if err != nil && !errors.Is(err, io.EOF) {
		return 0, 0, err
	}
	fields := bytes.Fields(buf[:n])
	if len(fields) < 2 {
		return 0, 0, fmt.Errorf("%s: %q", f.Name(), buf[:n])
	}
	if run, err = strconv.ParseUint(string(fields[0]), 10, 64); err != nil {
		return 0, 0, fmt.Errorf("%s: %w", f.Name(), err)
	}
	if runDelay, err = strconv.ParseUint(string(fields[1]), 10, 64); err != nil {
		return 0, 0, fmt.Errorf("%s: %w", f.Name(), err)
	}
	return run, runDelay, nil
}
