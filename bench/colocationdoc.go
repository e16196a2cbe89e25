package main

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/plotutil"
	"gonum.org/v1/plot/vg"
	"gonum.org/v1/plot/vg/draw"
	"gonum.org/v1/plot/vg/vgimg"
)

// The generated part of docs/colocation.md sits between these lines.
const (
	colocationBegin = "<!-- make bench-colo: begin -->"
	colocationEnd   = "<!-- make bench-colo: end -->"
)

func writeColocation(dir string, rep ColocationReport) error {
	b, err := json.MarshalIndent(rep, "", "  ")
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, "colocation.json"), append(b, '\n'), 0o644); err != nil {
		return err
	}
	t := colocationMarkdown(rep)
	fmt.Println(t)
	path := filepath.Join(dir, "colocation.md")
	doc, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	s := string(doc)
	i, j := strings.Index(s, colocationBegin), strings.Index(s, colocationEnd)
	if i < 0 || j < i {
		return fmt.Errorf("%s lacks the lines %q and %q for the results", path, colocationBegin, colocationEnd)
	}
	s = s[:i] + t + s[j+len(colocationEnd):]
	if err := os.WriteFile(path, []byte(s), 0o644); err != nil {
		return err
	}
	return colocationChart(filepath.Join(dir, "colocation.png"), rep)
}

func colocationMarkdown(rep ColocationReport) string {
	var t strings.Builder
	fmt.Fprintf(&t, "%s\n\nWritten by `make bench-colo` on %s. Machine: %s, %s CPUs, host kernel %s, %s. ", colocationBegin,
		rep.Date, rep.Machine["cpu"], rep.Machine["cpus"], rep.Machine["kernel"], rep.Machine["qemu"])
	fmt.Fprintf(&t, "Each run measures %s (after %s of requests, and %s of the load, not counted). "+
		"Online: %.0f requests/s, each %d rounds of work (%.1f ms on the idle host), %.0f%% of the host's CPUs. "+
		"Offline: %d threads.", rep.Duration, rep.OnlineWarmup, rep.OfflineSettle,
		rep.OnlineRate, rep.OnlineIterations, rep.OnlineWorkMs, onlineShare*100, rep.OfflineThreads)
	if len(rep.NotRun) > 0 {
		fmt.Fprintf(&t, " Not run this time: %s.", strings.Join(rep.NotRun, ", "))
	}
	t.WriteString("\n\n| run | online p50 ms | p99 ms | p99.9 ms | max ms | p99 ÷ alone | errors, timeouts | waits > 5 ms | > 20 ms | offline units/s | offline ÷ alone |\n" +
		"|---|---|---|---|---|---|---|---|---|---|---|\n")
	for _, r := range rep.Runs {
		fmt.Fprintf(&t, "| %s |", r.Name)
		if l := r.Online; l != nil {
			fmt.Fprintf(&t, " %.2f | %.2f | %.2f | %.1f | %s | %d, %d |", l.P50, l.P99, l.P999, l.Max, ratio(r.P99Ratio), l.Errors, l.Timeouts)
		} else {
			t.WriteString(" – | – | – | – | – | – |")
		}
		if w := r.Sched; w != nil {
			fmt.Fprintf(&t, " %d | %d |", w.Over5ms, w.Over20ms)
		} else {
			t.WriteString(" – | – |")
		}
		if o := r.Throughput; o != nil {
			fmt.Fprintf(&t, " %.0f | %s |\n", o.UnitsPerSec, ratio(r.OfflineShare))
		} else {
			t.WriteString(" – | – |\n")
		}
	}
	t.WriteString("\nHow each figure was taken (see above):\n\n" +
		"| run | offline load | online CPU share | online run delay ms/s | max wait ms | generator's send lag p99 ms | schedstat reads p99 apart ms |\n" +
		"|---|---|---|---|---|---|---|\n")
	for _, r := range rep.Runs {
		how := "none"
		if r.Offline != nil {
			how = r.Offline.How
			if r.Yield {
				how += ", yielding controller on"
			}
		}
		fmt.Fprintf(&t, "| %s | %s |", r.Name, how)
		if w := r.Sched; w != nil {
			fmt.Fprintf(&t, " %.0f%% | %.1f | %.1f |", w.CPUShare*100, w.RunDelayPerSecMs, w.MaxWaitMs)
		} else {
			t.WriteString(" – | – | – |")
		}
		if l := r.Online; l != nil {
			fmt.Fprintf(&t, " %.2f |", l.SendLagP99)
		} else {
			t.WriteString(" – |")
		}
		if w := r.Sched; w != nil {
			fmt.Fprintf(&t, " %.2f |\n", w.IntervalP99)
		} else {
			t.WriteString(" – |\n")
		}
	}
	t.WriteString("\n![co-location](colocation.png)\n\n" + colocationEnd)
	return t.String()
}

// ratio prints a ratio to a reference run, "–" without one.
func ratio(v float64) string {
	if v == 0 {
		return "–"
	}
	return fmt.Sprintf("%.2f", v)
}

// colocationChart draws, per run, the online p99 and the offline
// throughput, each as a ratio to its run alone, one above the other: what
// co-location costs the online service, and what the load gets done
// meanwhile. They differ by orders of magnitude, so each has its own axis.
func colocationChart(path string, rep ColocationReport) error {
	var names []string
	for _, r := range rep.Runs {
		names = append(names, r.Key)
	}
	var plots [][]*plot.Plot
	for i, q := range []struct {
		title string
		get   func(ColocationResult) float64
	}{
		{"online p99 latency ÷ online alone (higher is worse)", func(r ColocationResult) float64 { return r.P99Ratio }},
		{"offline units/s ÷ offline alone (higher is better)", func(r ColocationResult) float64 { return r.OfflineShare }},
	} {
		p := plot.New()
		p.Title.Text = q.title
		var v plotter.Values
		for _, r := range rep.Runs {
			v = append(v, q.get(r))
		}
		bars, err := plotter.NewBarChart(v, vg.Points(24))
		if err != nil {
			return err
		}
		bars.Color = plotutil.Color(i)
		p.Add(plotter.NewGrid(), bars)
		p.NominalX(names...)
		plots = append(plots, []*plot.Plot{p})
	}
	img := vgimg.New(vg.Length(len(rep.Runs)+3)*vg.Inch, 6*vg.Inch)
	dc := draw.New(img)
	t := draw.Tiles{Rows: len(plots), Cols: 1, PadX: vg.Millimeter, PadY: 4 * vg.Millimeter,
		PadTop: 2 * vg.Millimeter, PadBottom: 2 * vg.Millimeter, PadLeft: 2 * vg.Millimeter, PadRight: 2 * vg.Millimeter}
	canvases := plot.Align(plots, t, dc)
	for i := range plots {
		plots[i][0].Draw(canvases[i][0])
	}
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if _, err := (vgimg.PngCanvas{Canvas: img}).WriteTo(f); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}
