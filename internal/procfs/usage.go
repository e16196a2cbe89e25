package procfs

import (
	"bufio"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"
)

// Usage is what a process uses of the host, for metrics.
type Usage struct {
	Stat
	// RSS and PSS in bytes (smaps_rollup; PSS counts shared pages by
	// the share).
	RSS, PSS uint64
	// FDs is the number of open file descriptors.
	FDs int
	// ReadBytes and WriteBytes are the storage I/O the process caused
	// (/proc/<pid>/io).
	ReadBytes, WriteBytes uint64
}

// ReadUsage reads a process's usage. Parts the kernel does not let us
// read stay 0; a process that is gone is an error.
func ReadUsage(pid int) (Usage, error) {
	st, err := ReadStat(pid)
	if err != nil {
		return Usage{}, err
	}
	u := Usage{Stat: st}
	kv, err := readKeyValues(fmt.Sprintf("/proc/%d/smaps_rollup", pid))
	if err == nil {
		u.RSS, u.PSS = kv["Rss"]<<10, kv["Pss"]<<10
	}
	if kv, err := readKeyValues(fmt.Sprintf("/proc/%d/io", pid)); err == nil {
		u.ReadBytes, u.WriteBytes = kv["read_bytes"], kv["write_bytes"]
	}
	if fds, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid)); err == nil {
		u.FDs = len(fds)
	}
	return u, nil
}

// readKeyValues reads "key: N [kB]" lines; the numbers as written.
func readKeyValues(path string) (map[string]uint64, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	out := make(map[string]uint64)
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), ":")
		if !ok {
			continue
		}
		fields := strings.Fields(v)
		if len(fields) == 0 {
			continue
		}
		if n, err := strconv.ParseUint(fields[0], 10, 64); err == nil {
			out[strings.TrimSpace(k)] = n
		}
	}
	return out, sc.Err()
}

// Schedstat is a thread's time on and waiting for a host CPU
// (/proc/<pid>/task/<tid>/schedstat): for a vCPU thread, the time its
// guest ran and the time it was runnable but not running, the guest's
// steal.
type Schedstat struct {
	Run, Wait time.Duration
	Slices    uint64
}

// ReadSchedstat reads a thread's schedstat.
func ReadSchedstat(pid, tid int) (Schedstat, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/schedstat", pid, tid))
	if err != nil {
		return Schedstat{}, err
	}
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return Schedstat{}, fmt.Errorf("malformed schedstat of thread %d: %q", tid, b)
	}
	var n [3]uint64
	for i := range n {
		if n[i], err = strconv.ParseUint(f[i], 10, 64); err != nil {
			return Schedstat{}, fmt.Errorf("malformed schedstat of thread %d: %w", tid, err)
		}
	}
	return Schedstat{Run: time.Duration(n[0]), Wait: time.Duration(n[1]), Slices: n[2]}, nil
}
