package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/colo-runtime/colo/testbed"
)

// Resize is what the elasticity of a pod's VM costs (issue: a pod's VM is
// the pod's size).
type Resize struct {
	// Config is the colo config of these runs (on top of -colo-config).
	Config string `json:"config"`
	// ColdDefault and ColdBig are cold starts of a pod without limits
	// (the template's size) and of a pod limited to 4 CPUs and 2 GiB
	// (restored from the same template, then grown), alternating.
	ColdDefault Stats `json:"cold_start_default_pod"`
	ColdBig     Stats `json:"cold_start_4cpu_2gib_pod"`
	// Latencies of `colo resize` through the management socket, each
	// returning once the guest has the new size.
	AddVCPU     Stats `json:"hot_add_1_vcpu"`
	RemoveVCPU  Stats `json:"hot_remove_1_vcpu"`
	AddMemory   Stats `json:"hot_add_1_gib"`
	ShrinkBack  Stats `json:"hot_remove_1_gib"`
	FreedMiB    int   `json:"freed_in_guest_mib"`
	PeakRSSMiB  int   `json:"qemu_peak_rss_mib"`
	ReturnedMiB int   `json:"returned_to_host_mib"`
	// HalfReturnedS is the time from the guest's free until QEMU's RSS
	// had dropped by half of it; SettledS until it stopped dropping.
	HalfReturnedS float64 `json:"half_returned_s"`
	SettledS      float64 `json:"settled_s"`
}

// resizeConfig lets pods grow beyond this machine's CPUs, as the e2e
// tests do.
const resizeConfig = "[hypervisor]\nmax_vcpus = 4\n"

// measureResize measures the start of a big pod beside a default one,
// hot-add and hot-remove latencies, and memory given back after a free.
func measureResize(ctx context.Context, cd *testbed.Containerd, runs int) (Resize, error) {
	r := Resize{Config: resizeConfig}
	cfg, err := cd.WriteColoConfig("bench-resize", resizeConfig)
	if err != nil {
		return r, err
	}
	flags := []string{"--runtime-config-path", cfg}
	big := append([]string{"--cpus", "4", "--memory-limit", strconv.Itoa(2 << 30)}, flags...)
	// The first start makes the template of this config.
	if _, err := firstOutput(ctx, cd, testbed.Runtime, "resize-first", flags); err != nil {
		return r, err
	}
	var def, bigs []time.Duration
	for i := range runs {
		d, err := firstOutput(ctx, cd, testbed.Runtime, fmt.Sprintf("resize-default-%d", i), flags)
		if err != nil {
			return r, err
		}
		def = append(def, d)
		if d, err = firstOutput(ctx, cd, testbed.Runtime, fmt.Sprintf("resize-big-%d", i), big); err != nil {
			return r, err
		}
		bigs = append(bigs, d)
	}
	r.ColdDefault, r.ColdBig = summarize(def), summarize(bigs)

	tools, err := buildHog(ctx)
	if err != nil {
		return r, err
	}
	defer os.RemoveAll(tools)
	// A pod per run: under TCG, QEMU 7.2 cannot plug a vCPU into a VM
	// that has unplugged one (hypervisor/qemu refuses it).
	var add, rm, addMem, rmMem []time.Duration
	var id string
	for i := range runs {
		if id != "" {
			remove(ctx, cd, id)
		}
		id = fmt.Sprintf("resize-pod-%d", i)
		args := append([]string{"run", "-d", "--null-io", "--runtime", testbed.Runtime, "--memory-limit", strconv.Itoa(1 << 30),
			"--mount", "type=bind,src=" + tools + ",dst=/t,options=rbind:ro"}, flags...)
		if out, err := cd.Ctr(ctx, append(args, testbed.BusyboxImage, id, "sleep", "100000")...); err != nil || out.ExitCode != 0 {
			return r, fmt.Errorf("start %s: %v %s", id, err, out)
		}
		steps := []struct {
			arg, value string
			into       *[]time.Duration
		}{
			{"--cpus", "3", &add}, {"--cpus", "2", &rm},
			{"--memory", "2304Mi", &addMem}, {"--memory", "1280Mi", &rmMem},
		}
		for _, s := range steps {
			start := time.Now()
			out, err := exec.CommandContext(ctx, "colo", "--config", cfg, "resize", id, s.arg, s.value).CombinedOutput()
			if err != nil {
				remove(ctx, cd, id)
				return r, fmt.Errorf("colo resize %s %s %s: %v: %s", id, s.arg, s.value, err, out)
			}
			*s.into = append(*s.into, time.Since(start))
		}
	}
	defer remove(ctx, cd, id)
	r.AddVCPU, r.RemoveVCPU, r.AddMemory, r.ShrinkBack = summarize(add), summarize(rm), summarize(addMem), summarize(rmMem)

	if err := measureGiveBack(ctx, cd, id, &r); err != nil {
		return r, err
	}
	return r, nil
}

// buildHog builds e2e's oomhog into a new directory.
func buildHog(ctx context.Context) (string, error) {
	return buildTool(ctx, "oomhog", filepath.Join("e2e", "testdata", "oomhog"))
}

// buildTool builds the static program in the repository's directory dir
// as name into a new directory, which the caller removes.
func buildTool(ctx context.Context, name, dir string) (string, error) {
	root, err := testbed.RepoRoot()
	if err != nil {
		return "", err
	}
	tools, err := os.MkdirTemp("", "colo-bench-"+name)
	if err != nil {
		return "", err
	}
	build := exec.CommandContext(ctx, "go", "build", "-o", filepath.Join(tools, name), "./"+dir)
	build.Dir = root
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		os.RemoveAll(tools)
		return "", fmt.Errorf("build %s: %v: %s", name, err, out)
	}
	return tools, nil
}

// measureGiveBack has the pod's container touch 600 MiB in an exec that
// then exits, and follows QEMU's RSS as the guest reports the freed pages.
func measureGiveBack(ctx context.Context, cd *testbed.Containerd, id string, r *Resize) error {
	const hogMB = 600
	qemu := 0
	for _, p := range podProcesses(cd, id) {
		if p.kind == "qemu" {
			qemu = p.pid
		}
	}
	if qemu == 0 {
		return errors.New("give-back: no QEMU for " + id)
	}
	if out, err := cd.Ctr(ctx, "task", "exec", "--exec-id", "hog", id, "/t/oomhog", strconv.Itoa(hogMB)); err != nil || out.ExitCode != 0 {
		return fmt.Errorf("oomhog: %v %s", err, out)
	}
	freed := time.Now()
	peak := statusKB(qemu, "VmHWM") / 1024
	r.FreedMiB, r.PeakRSSMiB = hogMB, peak
	last, lastDrop := peak, freed
	for time.Since(freed) < time.Minute && time.Since(lastDrop) < 10*time.Second {
		time.Sleep(250 * time.Millisecond)
		rss := statusKB(qemu, "VmRSS") / 1024
		if rss < last-8 {
			last, lastDrop = rss, time.Now()
		}
		if r.HalfReturnedS == 0 && rss <= peak-hogMB/2 {
			r.HalfReturnedS = time.Since(freed).Seconds()
		}
	}
	r.ReturnedMiB = peak - last
	r.SettledS = lastDrop.Sub(freed).Seconds()
	return nil
}

// statusKB reads a kB field of /proc/<pid>/status; 0 if it cannot.
func statusKB(pid int, field string) int {
	n, _ := testbed.ProcStatusKB(pid, field)
	return n
}

// resizeSection writes the resize figures.
func resizeSection(b *strings.Builder, z *Resize) {
	fmt.Fprintf(b, "\n## A pod's VM at the pod's size (colo config `%s`)\n\n", strings.ReplaceAll(strings.TrimSpace(z.Config), "\n", "; "))
	b.WriteString("Cold start (`ctr run --rm` to the first output), alternating: a pod without limits is restored from the template at its size; " +
		"a pod limited to 4 CPUs and 2 GiB (a VM of 4 vCPUs and 2304 MiB) is restored from the same template and grown by hot-plug before its container starts.\n\n")
	b.WriteString("| pod | median ms | min ms | max ms |\n|---|---|---|---|\n")
	for _, row := range []struct {
		name string
		s    Stats
	}{{"no limits (2 vCPUs, 256 MiB)", z.ColdDefault}, {"4 CPUs, 2 GiB", z.ColdBig}} {
		fmt.Fprintf(b, "| %s | %.0f | %.0f | %.0f |\n", row.name, row.s.Median, row.s.Min, row.s.Max)
	}
	b.WriteString("\n`colo resize` through the management socket, returning once the guest has the new size:\n\n")
	b.WriteString("| change | median ms | min ms | max ms |\n|---|---|---|---|\n")
	for _, row := range []struct {
		name string
		s    Stats
	}{{"add 1 vCPU (2 to 3)", z.AddVCPU}, {"remove 1 vCPU (3 to 2)", z.RemoveVCPU}, {"add 1 GiB (virtio-mem)", z.AddMemory}, {"remove 1 GiB", z.ShrinkBack}} {
		fmt.Fprintf(b, "| %s | %.0f | %.0f | %.0f |\n", row.name, row.s.Median, row.s.Min, row.s.Max)
	}
	half := "never within a minute"
	if z.HalfReturnedS > 0 {
		half = fmt.Sprintf("after %.1f s", z.HalfReturnedS)
	}
	fmt.Fprintf(b, "\nMemory given back: a process in the pod (1 GiB limit) touched %d MiB and exited; QEMU's RSS peaked at %d MiB and dropped by %d MiB "+
		"with no request (the balloon's free page reporting): half of the freed memory was back on the host %s, and the drop settled after %.1f s.\n",
		z.FreedMiB, z.PeakRSSMiB, z.ReturnedMiB, half, z.SettledS)
}
