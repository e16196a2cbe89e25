package agent

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"io"
	"math"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/colo-runtime/colo/agentproto"
)

// GetMetrics: the guest's figures for the host's colo_guest_* and
// colo_agent_* metrics, read from /proc and the CPU classes' cgroups.
//
// The guest is untrusted, so the answer is numbers in typed fields; the
// few names in it (meminfo keys, interfaces, block devices) are kept short
// and to a small alphabet here, and the host checks them again. Every list
// is capped, each file is read up to maxMetricsFile bytes and each line up
// to maxMetricsLine (longer ones are skipped), and files are opened
// non-blocking and read only if regular, so no guest state can make the
// answer large or the call hang. What cannot be read or parsed is skipped
// and counted (GetMetricsResponse.skipped), never fatal.

// procRoot is where procfs is mounted; the collector takes it as a
// parameter so that tests read fake trees.
const procRoot = "/proc"

const (
	// maxMetricsFile bounds what is read of one file.
	maxMetricsFile = 4 << 20
	// maxMetricsLine bounds a line; a longer one is skipped.
	maxMetricsLine = 4096
	// maxMeminfo bounds the meminfo fields (a kernel has about 60).
	maxMeminfo = 128
	// maxMetricsCPUs bounds the per-CPU times.
	maxMetricsCPUs = 1024
	// maxMetricsEntries bounds interfaces, block devices and classes.
	maxMetricsEntries = 256
	// maxIfName and maxDiskName are the kernel's limits (IFNAMSIZ-1,
	// DISK_NAME_LEN-1).
	maxIfName   = 15
	maxDiskName = 31
	maxMemKey   = 64
	// userHZ is the unit of /proc/stat's CPU times on every Linux
	// architecture colo runs on.
	userHZ = 100
	// classLockWait bounds the wait for s.mu to read the classes; past
	// it the classes are left out of this answer.
	classLockWait = 100 * time.Millisecond
)

// metricsCollector reads the figures from a proc root and a cgroup root
// (real ones in the guest, fake trees in tests) and counts what it skips.
type metricsCollector struct {
	proc, cgroup string
	skipped      uint32
}

// collectMetrics reads every figure; classes are the names of the
// sandbox's CPU classes.
func collectMetrics(proc, cgroup string, classes []string) *agentproto.GetMetricsResponse {
	c := &metricsCollector{proc: proc, cgroup: cgroup}
	m := &agentproto.GetMetricsResponse{}
	c.meminfo(m)
	c.stat(m)
	c.loadavg(m)
	c.uptime(m)
	c.netdev(m)
	c.diskstats(m)
	c.classes(m, classes)
	c.agent(m)
	m.Skipped = c.skipped
	return m
}

func (c *metricsCollector) skip() {
	if c.skipped < math.MaxUint32 {
		c.skipped++
	}
}

// lines calls fn with each line of a file, without its newline. Lines
// longer than maxMetricsLine are skipped (and counted, but for those that
// start with one of the keys in ignoreLong, which the caller does not
// want anyway: /proc/stat's intr line). Reading stops after
// maxMetricsFile bytes, and a last line cut short there is dropped. The
// error is that of opening the file (missing, or not a regular file).
func (c *metricsCollector) lines(path string, fn func(line string), ignoreLong ...string) error {
	f, err := openRegular(path)
	if err != nil {
		return err
	}
	defer f.Close()
	lr := &io.LimitedReader{R: f, N: maxMetricsFile}
	br := bufio.NewReaderSize(lr, maxMetricsLine)
	for {
		line, err := br.ReadSlice('\n')
		if errors.Is(err, bufio.ErrBufferFull) {
			if !hasAnyPrefix(line, ignoreLong) {
				c.skip()
			}
			for errors.Is(err, bufio.ErrBufferFull) {
				_, err = br.ReadSlice('\n')
			}
			if err != nil {
				return nil
			}
			continue
		}
		if n := len(line); n > 0 && line[n-1] == '\n' {
			fn(string(line[:n-1]))
		} else if n > 0 && lr.N > 0 && err == io.EOF {
			fn(string(line)) // the last line, without a newline
		} else if n > 0 {
			c.skip() // cut short by the limit, or a read error
		}
		if err != nil {
			return nil
		}
	}
}

// procLines is lines for a /proc file, which should be there: a missing
// one is counted as skipped.
func (c *metricsCollector) procLines(name string, fn func(line string), ignoreLong ...string) {
	if err := c.lines(filepath.Join(c.proc, name), fn, ignoreLong...); err != nil {
		c.skip()
	}
}

func hasAnyPrefix(line []byte, prefixes []string) bool {
	for _, p := range prefixes {
		if bytes.HasPrefix(line, []byte(p)) {
			return true
		}
	}
	return false
}

// openRegular opens a file for reading without blocking (a FIFO put in
// its place would block the open) and only if it is a regular file, as
// procfs, sysfs and cgroupfs files are.
func openRegular(path string) (*os.File, error) {
	f, err := os.OpenFile(path, os.O_RDONLY|unix.O_NONBLOCK|unix.O_NOCTTY, 0)
	if err != nil {
		return nil, err
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, err
	}
	if !st.Mode().IsRegular() {
		f.Close()
		return nil, errors.New(path + ": not a regular file")
	}
	return f, nil
}

// validName tells whether a guest-given name may go to the host: 1 to max
// characters of [A-Za-z0-9._@+!-] and those of extra.
func validName(s string, max int, extra string) bool {
	if s == "" || len(s) > max {
		return false
	}
	for i := 0; i < len(s); i++ {
		b := s[i]
		switch {
		case b >= 'a' && b <= 'z', b >= 'A' && b <= 'Z', b >= '0' && b <= '9':
		case strings.IndexByte("._@+!-", b) >= 0, strings.IndexByte(extra, b) >= 0:
		default:
			return false
		}
	}
	return true
}

// parseUints parses fields as unsigned decimals.
func parseUints(fields []string) ([]uint64, bool) {
	v := make([]uint64, len(fields))
	for i, f := range fields {
		n, err := strconv.ParseUint(f, 10, 64)
		if err != nil {
			return nil, false
		}
		v[i] = n
	}
	return v, true
}

// parseGauge parses a finite, non-negative float.
func parseGauge(s string) (float64, bool) {
	v, err := strconv.ParseFloat(s, 64)
	if err != nil || math.IsNaN(v) || math.IsInf(v, 0) || v < 0 {
		return 0, false
	}
	return v, true
}

// meminfo reads /proc/meminfo's "Name: N kB" fields as bytes.
func (c *metricsCollector) meminfo(m *agentproto.GetMetricsResponse) {
	m.MeminfoBytes = make(map[string]uint64)
	c.procLines("meminfo", func(line string) {
		key, rest, ok := strings.Cut(line, ":")
		f := strings.Fields(rest)
		if ok && len(f) == 1 && validName(key, maxMemKey, "()") {
			if _, err := strconv.ParseUint(f[0], 10, 64); err == nil {
				return // a count (HugePages_Total), not an amount of memory
			}
		}
		if !ok || len(f) != 2 || f[1] != "kB" || !validName(key, maxMemKey, "()") {
			c.skip()
			return
		}
		kb, err := strconv.ParseUint(f[0], 10, 64)
		if _, dup := m.MeminfoBytes[key]; err != nil || kb > math.MaxUint64>>10 || dup || len(m.MeminfoBytes) >= maxMeminfo {
			c.skip()
			return
		}
		m.MeminfoBytes[key] = kb << 10
	})
}

// stat reads /proc/stat: CPU times, context switches, forks, tasks
// running and blocked, boot time.
func (c *metricsCollector) stat(m *agentproto.GetMetricsResponse) {
	c.procLines("stat", func(line string) {
		f := strings.Fields(line)
		if len(f) == 0 {
			return
		}
		key := f[0]
		if strings.HasPrefix(key, "cpu") {
			c.cpuLine(m, key, f[1:])
			return
		}
		var dst *uint64
		switch key {
		case "ctxt":
			dst = &m.ContextSwitches
		case "processes":
			dst = &m.Forks
		case "procs_running":
			dst = &m.ProcsRunning
		case "procs_blocked":
			dst = &m.ProcsBlocked
		case "btime":
			dst = &m.BootTimeSeconds
		default:
			return // intr, softirq and whatever comes
		}
		v, ok := parseUints(f[1:])
		if !ok || len(v) != 1 {
			c.skip()
			return
		}
		*dst = v[0]
	}, "intr ", "softirq ")
}

// cpuLine parses a "cpu" or "cpuN" line: user nice system idle iowait irq
// softirq steal [guest guest_nice], in USER_HZ ticks.
func (c *metricsCollector) cpuLine(m *agentproto.GetMetricsResponse, key string, fields []string) {
	t := &agentproto.CPUTime{}
	if key != "cpu" {
		n, err := strconv.ParseUint(key[len("cpu"):], 10, 32)
		if err != nil || len(m.Cpus) >= maxMetricsCPUs {
			c.skip()
			return
		}
		t.Cpu = uint32(n)
	}
	if len(fields) < 8 {
		c.skip()
		return
	}
	v, ok := parseUints(fields)
	if !ok {
		c.skip()
		return
	}
	sec := func(i int) float64 { return float64(v[i]) / userHZ }
	t.UserSeconds, t.NiceSeconds, t.SystemSeconds, t.IdleSeconds = sec(0), sec(1), sec(2), sec(3)
	t.IowaitSeconds, t.IrqSeconds, t.SoftirqSeconds, t.StealSeconds = sec(4), sec(5), sec(6), sec(7)
	if key == "cpu" {
		m.CpuTotal = t
	} else {
		m.Cpus = append(m.Cpus, t)
	}
}

// loadavg reads "1.00 0.50 0.25 2/123 4567".
func (c *metricsCollector) loadavg(m *agentproto.GetMetricsResponse) {
	done := false
	c.procLines("loadavg", func(line string) {
		if done {
			return
		}
		done = true
		f := strings.Fields(line)
		if len(f) < 3 {
			c.skip()
			return
		}
		var v [3]float64
		for i := range v {
			var ok bool
			if v[i], ok = parseGauge(f[i]); !ok {
				c.skip()
				return
			}
		}
		m.Load1, m.Load5, m.Load15 = v[0], v[1], v[2]
	})
}

// uptime reads "123.45 678.90": seconds since boot, and idle.
func (c *metricsCollector) uptime(m *agentproto.GetMetricsResponse) {
	done := false
	c.procLines("uptime", func(line string) {
		if done {
			return
		}
		done = true
		f := strings.Fields(line)
		v, ok := 0.0, len(f) > 0
		if ok {
			v, ok = parseGauge(f[0])
		}
		if !ok {
			c.skip()
			return
		}
		m.UptimeSeconds = v
	})
}

// netdev reads /proc/net/dev: two header lines, then
// "name: rx_bytes rx_packets rx_errs rx_drop fifo frame compressed
// multicast tx_bytes tx_packets tx_errs tx_drop fifo colls carrier
// compressed".
func (c *metricsCollector) netdev(m *agentproto.GetMetricsResponse) {
	seen := make(map[string]bool)
	c.procLines("net/dev", func(line string) {
		name, rest, ok := strings.Cut(line, ":")
		if !ok && strings.Contains(line, "|") {
			return // a header line
		}
		name = strings.TrimSpace(name)
		f := strings.Fields(rest)
		if !ok || len(f) < 16 || !validName(name, maxIfName, "") || seen[name] || len(m.Netdev) >= maxMetricsEntries {
			c.skip()
			return
		}
		v, ok := parseUints(f[:16])
		if !ok {
			c.skip()
			return
		}
		seen[name] = true
		m.Netdev = append(m.Netdev, &agentproto.NetDevStats{
			Name:    name,
			RxBytes: v[0], RxPackets: v[1], RxErrors: v[2], RxDropped: v[3],
			TxBytes: v[8], TxPackets: v[9], TxErrors: v[10], TxDropped: v[11],
		})
	})
}

// diskstats reads /proc/diskstats: "major minor name" and at least 11
// counters: reads merged sectors ms_reading writes merged sectors
// ms_writing in_flight ms_io weighted_ms (discards and flushes after).
func (c *metricsCollector) diskstats(m *agentproto.GetMetricsResponse) {
	seen := make(map[string]bool)
	c.procLines("diskstats", func(line string) {
		f := strings.Fields(line)
		if len(f) < 14 || !validName(f[2], maxDiskName, "") {
			c.skip()
			return
		}
		name := f[2]
		v, ok := parseUints(f[3:])
		if _, nums := parseUints(f[:2]); !ok || !nums {
			c.skip()
			return
		}
		if strings.HasPrefix(name, "loop") || strings.HasPrefix(name, "ram") {
			idle := true
			for _, n := range v {
				idle = idle && n == 0
			}
			if idle {
				return
			}
		}
		const sector = 512
		if seen[name] || len(m.Disks) >= maxMetricsEntries || v[2] > math.MaxUint64/sector || v[6] > math.MaxUint64/sector {
			c.skip()
			return
		}
		seen[name] = true
		m.Disks = append(m.Disks, &agentproto.DiskStats{
			Name:  name,
			Reads: v[0], ReadBytes: v[2] * sector, ReadTimeMs: v[3],
			Writes: v[4], WrittenBytes: v[6] * sector, WriteTimeMs: v[7],
			IoTimeMs: v[9],
		})
	})
}

// keyValues reads a cgroup file of "key N" lines (cpu.stat, memory.stat)
// for the keys wanted; false if the file could not be opened.
func (c *metricsCollector) keyValues(path string, want map[string]*uint64) bool {
	return c.lines(path, func(line string) {
		k, v, ok := strings.Cut(line, " ")
		dst := want[k]
		if !ok || dst == nil {
			return
		}
		n, err := strconv.ParseUint(v, 10, 64)
		if err != nil {
			c.skip()
			return
		}
		*dst = n
	}) == nil
}

// classes reads each CPU class's cgroup: cpu.stat, memory.current and
// memory.stat.
func (c *metricsCollector) classes(m *agentproto.GetMetricsResponse, names []string) {
	for i, name := range names {
		if i >= maxMetricsEntries {
			c.skip()
			return
		}
		dir := filepath.Join(c.cgroup, agentproto.ClassCgroup(name))
		cs := &agentproto.ClassStats{Name: name}
		if !c.keyValues(filepath.Join(dir, "cpu.stat"), map[string]*uint64{
			"usage_usec": &cs.CpuUsageUsec, "user_usec": &cs.CpuUserUsec, "system_usec": &cs.CpuSystemUsec,
			"nr_periods": &cs.CpuNrPeriods, "nr_throttled": &cs.CpuNrThrottled, "throttled_usec": &cs.CpuThrottledUsec,
		}) {
			c.skip() // no cgroup (yet)
			continue
		}
		// No memory.current or memory.stat: no memory controller (yet).
		var current, anon, file uint64
		lines := 0
		_ = c.lines(filepath.Join(dir, "memory.current"), func(line string) {
			n, err := strconv.ParseUint(strings.TrimSpace(line), 10, 64)
			if lines++; err != nil || lines > 1 {
				c.skip()
				return
			}
			current = n
			cs.MemoryCurrentBytes = &current
		})
		if c.keyValues(filepath.Join(dir, "memory.stat"), map[string]*uint64{"anon": &anon, "file": &file}) {
			cs.MemoryAnonBytes, cs.MemoryFileBytes = &anon, &file
		}
		m.Classes = append(m.Classes, cs)
	}
}

// agent reads the agent's own figures: the resident memory of PID 1 (the
// agent's init) and of this process, as GetGuestDetails does, and this
// process's goroutines and open file descriptors.
func (c *metricsCollector) agent(m *agentproto.GetMetricsResponse) {
	for _, pid := range []string{"1", "self"} {
		kb, err := statusKB(filepath.Join(c.proc, pid, "status"), "VmRSS")
		if err != nil || kb > math.MaxUint64>>10 {
			c.skip()
			continue
		}
		m.AgentRssBytes += kb << 10
	}
	m.AgentGoroutines = uint32(min(runtime.NumGoroutine(), math.MaxUint32))
	d, err := os.Open(filepath.Join(c.proc, "self/fd"))
	if err != nil {
		c.skip()
		return
	}
	defer d.Close()
	for {
		names, err := d.Readdirnames(1024)
		m.AgentOpenFds += uint32(len(names))
		if err != nil || len(names) == 0 {
			break
		}
	}
}

// classNames lists the sandbox's CPU classes for GetMetrics. s.mu can be
// held for long (CreateSandbox mounts with it), and metrics must not
// wait: past classLockWait the classes are left out of this answer.
func (s *Service) classNames(ctx context.Context) []string {
	deadline := time.Now().Add(classLockWait)
	for !s.mu.TryLock() {
		if time.Now().After(deadline) || ctx.Err() != nil {
			return nil
		}
		time.Sleep(time.Millisecond)
	}
	defer s.mu.Unlock()
	names := make([]string, 0, len(s.classes))
	for _, c := range s.classes {
		names = append(names, c.GetName())
	}
	return names
}
