package cli

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"text/tabwriter"
	"time"

	"golang.org/x/sys/unix"

	"github.com/colo-runtime/colo/config"
	"github.com/colo-runtime/colo/shim/sandbox"
)

// psQueryTimeout bounds each sandbox's GET /resources: a slow or dead
// shim loses its row's figures, never the listing. The sandboxes are
// asked at once, so this bounds the whole command too.
var psQueryTimeout = 2 * time.Second

// clockTicks is USER_HZ, the unit of /proc/<pid>/stat's start time: 100
// on every Linux architecture colo runs on (sysconf(_SC_CLK_TCK) needs
// cgo to ask).
const clockTicks = 100

// psRow is one sandbox in `colo ps`; the JSON is --json's.
type psRow struct {
	ID        string `json:"id"`
	Namespace string `json:"namespace"`
	// Pod is namespace/name of the Kubernetes pod, or "".
	Pod        string `json:"pod,omitempty"`
	Containers int    `json:"containers"`
	// VCPUs and MemoryMB are the VM's size as its shim reports it; nil
	// when the shim did not answer (SizeError says why).
	VCPUs     *int   `json:"vcpus"`
	MemoryMB  *int   `json:"memory_mb"`
	SizeError string `json:"size_error,omitempty"`
	// Classes are the co-location classes of the VM's vCPUs, highest
	// first.
	Classes []string `json:"classes"`
	// Started is when the hypervisor started (or, before it is recorded,
	// the sandbox directory was made); zero if unknown.
	Started       time.Time `json:"started,omitzero"`
	UptimeSeconds int64     `json:"uptime_seconds"`
}

// psCmd lists the node's sandboxes.
func psCmd(ctx context.Context, e *env, args []string) error {
	flags := flag.NewFlagSet("ps", flag.ContinueOnError)
	flags.SetOutput(e.stderr)
	asJSON := flags.Bool("json", false, "print the sandboxes as a JSON array")
	if err := flags.Parse(args); err != nil {
		return usageError("%v", err)
	}
	if flags.NArg() > 0 {
		return usageError("unexpected %s", quoted(strings.Join(flags.Args(), " ")))
	}
	states, err := sandboxes(e.cfg.Runtime.StateDir)
	// No state directory yet: no sandbox has run on this node.
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	rows := psRows(ctx, states, time.Now(), sinceBoot)
	if *asJSON {
		enc := json.NewEncoder(e.stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(rows)
	}
	for _, r := range rows {
		if r.SizeError != "" {
			fmt.Fprintf(e.stderr, "colo ps: sandbox %s: %s\n", r.ID, r.SizeError)
		}
	}
	return printPs(e.stdout, rows)
}

// psRows makes the rows of the sandboxes' records, asking every shim for
// its VM's size at once. now and sinceBoot (the time since the host
// booted) place the hypervisor's start time, recorded in clock ticks
// after boot.
func psRows(ctx context.Context, states []sandbox.State, now time.Time, sinceBoot func() (time.Duration, error)) []psRow {
	rows := make([]psRow, len(states))
	up, upErr := sinceBoot()
	var wg sync.WaitGroup
	for i, st := range states {
		r := &rows[i]
		r.ID = st.ID
		r.Namespace = namespaceOf(st)
		if st.Pod != nil {
			r.Pod = st.Pod.Namespace + "/" + st.Pod.Name
		}
		r.Containers = len(st.Containers)
		switch {
		case st.HypervisorStart != 0 && upErr == nil:
			started := time.Duration(st.HypervisorStart) * time.Second / clockTicks
			r.Started = now.Add(started - up)
		default:
			r.Started = created(st.Dir)
		}
		if !r.Started.IsZero() {
			r.UptimeSeconds = int64(now.Sub(r.Started) / time.Second)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			qctx, cancel := context.WithTimeout(ctx, psQueryTimeout)
			defer cancel()
			var size sandbox.SizeReply
			n := 0
			if err := call(qctx, st.Dir, http.MethodGet, "/resources", nil, &size); err != nil {
				r.SizeError = err.Error()
			} else {
				r.VCPUs, r.MemoryMB = &size.VCPUs, &size.MemoryMB
				n = size.VCPUs
			}
			r.Classes = vcpuClasses(st.Config.Colocation, n)
		}()
	}
	wg.Wait()
	slices.SortFunc(rows, func(a, b psRow) int {
		return strings.Compare(a.Namespace+"/"+a.ID, b.Namespace+"/"+b.ID)
	})
	return rows
}

// namespaceOf is the containerd namespace of a sandbox: the name of the
// directory its own is in (<state_dir>/<namespace>/<sandbox>).
func namespaceOf(st sandbox.State) string {
	parts := strings.Split(strings.TrimSuffix(st.Dir, "/"), "/")
	if len(parts) < 2 {
		return ""
	}
	return parts[len(parts)-2]
}

// vcpuClasses are the distinct co-location classes of a VM's n vCPUs, in
// the order of colocation.classes, as the shim assigns them: vCPU i takes
// colocation.vcpus[i], those beyond the list its last entry, and every
// vCPU the first class without a list. n 0 (size unknown) takes the list
// as it is. The record has the node's configuration, not a pod's
// io.colo.vcpus annotation, so a pod that set one shows the default.
func vcpuClasses(cc config.Colocation, n int) []string {
	list := cc.VCPUs
	if len(list) == 0 {
		if len(cc.Classes) == 0 {
			return []string{}
		}
		list = []string{cc.Classes[0].Name}
	}
	used := make(map[string]bool)
	if n == 0 {
		n = len(list)
	}
	for i := range n {
		used[list[min(i, len(list)-1)]] = true
	}
	out := []string{}
	for _, c := range cc.Classes {
		if used[c.Name] {
			out = append(out, c.Name)
			delete(used, c.Name)
		}
	}
	// Names that are no class (the shim refuses them; an old record may
	// have them) still show.
	for _, name := range list {
		if used[name] {
			out = append(out, name)
			delete(used, name)
		}
	}
	return out
}

// printPs writes the rows as aligned columns.
func printPs(w io.Writer, rows []psRow) error {
	tw := tabwriter.NewWriter(w, 0, 8, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tPOD\tCONTAINERS\tVCPUS\tMEMORY\tCLASS\tUPTIME")
	for _, r := range rows {
		id := r.ID
		if len(id) > 12 {
			id = id[:12]
		}
		pod, vcpus, mem, class, up := "-", "-", "-", "-", "-"
		if r.Pod != "" {
			pod = r.Pod
		}
		if r.VCPUs != nil {
			vcpus = strconv.Itoa(*r.VCPUs)
		}
		if r.MemoryMB != nil {
			mem = strconv.Itoa(*r.MemoryMB) + "Mi"
		}
		if len(r.Classes) > 0 {
			class = strings.Join(r.Classes, ",")
		}
		if !r.Started.IsZero() {
			up = shortDuration(time.Duration(r.UptimeSeconds) * time.Second)
		}
		fmt.Fprintf(tw, "%s\t%s\t%d\t%s\t%s\t%s\t%s\n", id, pod, r.Containers, vcpus, mem, class, up)
	}
	return tw.Flush()
}

// shortDuration writes an uptime in its two largest units: 45s, 3m12s,
// 5h3m, 2d4h.
func shortDuration(d time.Duration) string {
	if d < 0 {
		d = 0
	}
	s := int64(d / time.Second)
	switch {
	case s < 60:
		return fmt.Sprintf("%ds", s)
	case s < 3600:
		return fmt.Sprintf("%dm%ds", s/60, s%60)
	case s < 86400:
		return fmt.Sprintf("%dh%dm", s/3600, s%3600/60)
	}
	return fmt.Sprintf("%dd%dh", s/86400, s%86400/3600)
}

// sinceBoot is the time since the host booted (/proc/uptime).
func sinceBoot() (time.Duration, error) {
	b, err := os.ReadFile("/proc/uptime")
	if err != nil {
		return 0, err
	}
	f := strings.Fields(string(b))
	if len(f) == 0 {
		return 0, fmt.Errorf("/proc/uptime: empty")
	}
	secs, err := strconv.ParseFloat(f[0], 64)
	if err != nil {
		return 0, fmt.Errorf("/proc/uptime: %w", err)
	}
	return time.Duration(secs * float64(time.Second)), nil
}

// created is when the sandbox directory was made (its birth time where
// the filesystem keeps one, else its last change), or zero.
func created(dir string) time.Time {
	var stx unix.Statx_t
	if err := unix.Statx(unix.AT_FDCWD, dir, 0, unix.STATX_BTIME|unix.STATX_MTIME, &stx); err != nil {
		return time.Time{}
	}
	ts := stx.Mtime
	if stx.Mask&unix.STATX_BTIME != 0 {
		ts = stx.Btime
	}
	return time.Unix(ts.Sec, int64(ts.Nsec))
}
