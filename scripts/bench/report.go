package main

import (
	"fmt"
	"io"
	"math"
	"runtime"
	"slices"
	"strconv"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/plotutil"
	"gonum.org/v1/plot/vg"
)

// report is everything a run wrote.
type report struct {
	Machine map[string]string `json:"machine"`
	Started string            `json:"started"`
	Seconds float64           `json:"seconds_per_workload"`
	Idle    int               `json:"idle_connections"`
	Runs    []Figures         `json:"runs"`
	// Summary is, per configuration and metric, the median, min and max
	// over the runs; Ratios are medians over a baseline's medians.
	Summary map[string]map[string]Stat    `json:"summary"`
	Ratios  map[string]map[string]float64 `json:"ratios"`
}

// Stat is a metric's spread over the runs.
type Stat struct {
	Median float64 `json:"median"`
	Min    float64 `json:"min"`
	Max    float64 `json:"max"`
}

func (r *report) summarize(configs []string) {
	r.Summary = map[string]map[string]Stat{}
	for _, c := range configs {
		r.Summary[c] = map[string]Stat{}
		for _, m := range metrics {
			var vals []float64
			for _, f := range r.Runs {
				if f.Config == c {
					vals = append(vals, m.get(f))
				}
			}
			slices.Sort(vals)
			r.Summary[c][m.name] = Stat{Median: vals[len(vals)/2], Min: vals[0], Max: vals[len(vals)-1]}
		}
	}
	r.Ratios = map[string]map[string]float64{}
	for _, c := range configs {
		for _, base := range []string{"direct", "iptables", "haproxy", "sluice"} {
			if base == c || r.Summary[base] == nil {
				continue
			}
			key := c + "/" + base
			r.Ratios[key] = map[string]float64{}
			for _, m := range metrics {
				if b := r.Summary[base][m.name].Median; b != 0 {
					r.Ratios[key][m.name] = r.Summary[c][m.name].Median / b
				}
			}
		}
	}
}

// print writes the medians (with their spread) and the main ratios as
// Markdown tables.
func (r report) print(w io.Writer, configs []string) {
	fmt.Fprintf(w, "\nMedians over the runs (min-max), %s, %s CPUs, kernel %s:\n\n", r.Machine["cpu"], r.Machine["cpus"], r.Machine["kernel"])
	fmt.Fprintf(w, "| metric |")
	for _, c := range configs {
		fmt.Fprintf(w, " %s |", c)
	}
	fmt.Fprintf(w, "\n| --- |")
	for range configs {
		fmt.Fprintf(w, " --- |")
	}
	for _, m := range metrics {
		fmt.Fprintf(w, "\n| %s |", m.name)
		for _, c := range configs {
			s := r.Summary[c][m.name]
			if s.Median == 0 {
				fmt.Fprintf(w, " - |")
				continue
			}
			fmt.Fprintf(w, " %s (%s-%s) |", num(s.Median), num(s.Min), num(s.Max))
		}
	}
	fmt.Fprintf(w, "\n\nRatios of medians (for latency, CPU and memory lower is better):\n\n| ratio |")
	var keys []string
	for _, k := range []string{"sluice/direct", "iptables/direct", "sluice/iptables", "sluice-telemetry/sluice", "sluice/haproxy"} {
		if _, ok := r.Ratios[k]; ok {
			keys = append(keys, k)
			fmt.Fprintf(w, " %s |", k)
		}
	}
	fmt.Fprintf(w, "\n| --- |")
	for range keys {
		fmt.Fprintf(w, " --- |")
	}
	for _, m := range metrics {
		fmt.Fprintf(w, "\n| %s |", m.name)
		for _, k := range keys {
			if v, ok := r.Ratios[k][m.name]; ok && !math.IsInf(v, 0) && v != 0 {
				fmt.Fprintf(w, " %.2f |", v)
			} else {
				fmt.Fprintf(w, " - |")
			}
		}
	}
	fmt.Fprintln(w)
}

func num(v float64) string {
	switch {
	case v >= 100:
		return strconv.FormatFloat(v, 'f', 0, 64)
	case v >= 10:
		return strconv.FormatFloat(v, 'f', 1, 64)
	}
	return strconv.FormatFloat(v, 'f', 2, 64)
}

// plotRatios draws every configuration's medians as ratios to direct, one
// group of bars per metric.
func plotRatios(r report, configs []string, path string) error {
	p := plot.New()
	p.Title.Text = "Sluice benchmark: medians relative to direct (1 = no sidecar)"
	p.Y.Label.Text = "ratio to direct"
	var names []string
	for _, m := range metrics[:8] {
		names = append(names, m.name)
	}
	var others []string
	for _, c := range configs {
		if c != "direct" {
			others = append(others, c)
		}
	}
	w := vg.Points(60 / float64(max(len(others), 1)))
	for i, c := range others {
		vals := make(plotter.Values, len(names))
		for j, m := range metrics[:8] {
			if d := r.Summary["direct"][m.name].Median; d != 0 {
				vals[j] = r.Summary[c][m.name].Median / d
			}
		}
		bars, err := plotter.NewBarChart(vals, w)
		if err != nil {
			return err
		}
		bars.LineStyle.Width = 0
		bars.Color = plotutil.Color(i)
		bars.Offset = w * vg.Length(float64(i)-float64(len(others)-1)/2)
		p.Add(bars)
		p.Legend.Add(c, bars)
	}
	p.Legend.Top = true
	p.NominalX(names...)
	p.Add(plotter.NewGrid())
	return p.Save(vg.Length(26)*vg.Centimeter, vg.Length(13)*vg.Centimeter, path)
}

func runtimeCPUs() int { return runtime.NumCPU() }
