package main

import (
	"fmt"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/plotutil"
	"gonum.org/v1/plot/vg"
)

// chart draws the medians of the timed measurements, runc beside colo.
func chart(path string, r Report) error {
	p := plot.New()
	p.Title.Text = "colo vs runc (median, ms; TCG guest)"
	p.Y.Label.Text = "milliseconds"
	groups := []struct {
		label string
		data  map[string]Stats
	}{
		{"cold start", r.Cold},
	}
	// Each optimisation turned off: colo's cold start without it.
	for i, v := range r.Variants {
		groups = append(groups, struct {
			label string
			data  map[string]Stats
		}{fmt.Sprintf("cold start, variant %d", i+1), map[string]Stats{"colo": v.Cold}})
	}
	groups = append(groups, []struct {
		label string
		data  map[string]Stats
	}{
		{fmt.Sprintf("parallel p50 (%d)", r.Pods), r.Parallel},
		{"exec", r.Exec},
	}...)
	w := vg.Points(18)
	for i, name := range []string{"runc", "colo"} {
		var v plotter.Values
		for _, g := range groups {
			v = append(v, g.data[name].Median)
		}
		bars, err := plotter.NewBarChart(v, w)
		if err != nil {
			return err
		}
		bars.Color = plotutil.Color(i)
		bars.Offset = vg.Length(i-1)*w + w/2
		p.Add(bars)
		p.Legend.Add(name, bars)
	}
	p.Legend.Top = true
	var names []string
	for _, g := range groups {
		names = append(names, g.label)
	}
	p.NominalX(names...)
	return p.Save(vg.Length(len(groups)+2)*vg.Inch, 4*vg.Inch, path)
}
