package main

import (
	"fmt"
	"image/color"
	"io"
	"math"
	"runtime"
	"slices"
	"strconv"
	"strings"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/vg"
)

// report is everything a run wrote.
type report struct {
	Machine map[string]string `json:"machine"`
	Started string            `json:"started"`
	Seconds float64           `json:"seconds_per_workload"`
	Idle    int               `json:"idle_connections"`
	Long    float64           `json:"long_bulk_seconds"`
	Runs    []Figures         `json:"runs"`
	// Summary is, per configuration and metric, the median, min and max
	// over the runs; Ratios are medians over a baseline's medians.
	Summary map[string]map[string]Stat    `json:"summary"`
	Ratios  map[string]map[string]float64 `json:"ratios"`
	// Goals are the targets, each with the ratio this run got.
	Goals []Goal `json:"goals"`
}

// Goal is one target: a ratio of medians that must reach (Higher) or stay
// under Target.
type Goal struct {
	Name   string  `json:"name"`
	Ratio  string  `json:"ratio"`
	Metric string  `json:"metric"`
	Target float64 `json:"target"`
	Higher bool    `json:"higher"`
	Got    float64 `json:"got"`
	Met    bool    `json:"met"`
}

// goals are the targets of the splice and proxy work; a ratio with "*" as
// its metric means every workload, each never worse than 1.
var goals = []Goal{
	{Name: "Sluice vs iptables, same proxy: never worse", Ratio: "sluice/iptables", Metric: "*"},
	{Name: "Sluice vs iptables: request/response throughput", Ratio: "sluice/iptables", Metric: "rr16 req/s", Target: 1.15, Higher: true},
	{Name: "Sluice vs iptables: p50", Ratio: "sluice/iptables", Metric: "rr1 p50", Target: 0.85},
	{Name: "Sluice vs iptables: p99", Ratio: "sluice/iptables", Metric: "rr1 p99", Target: 0.85},
	{Name: "Sluice vs iptables: bulk", Ratio: "sluice/iptables", Metric: "bulk MB/s", Target: 1.1, Higher: true},
	{Name: "Sluice+splice vs iptables: request/response throughput", Ratio: "splice/iptables", Metric: "rr16 req/s", Target: 1.15, Higher: true},
	{Name: "Sluice+splice vs iptables: p50", Ratio: "splice/iptables", Metric: "rr1 p50", Target: 0.85},
	{Name: "Sluice+splice vs iptables: p99", Ratio: "splice/iptables", Metric: "rr1 p99", Target: 0.85},
	{Name: "Sluice+splice vs iptables: bulk", Ratio: "splice/iptables", Metric: "bulk MB/s", Target: 1.1, Higher: true},
	{Name: "splice on vs off: throughput, 16 connections", Ratio: "splice/sluice", Metric: "rr16 req/s", Target: 1.2, Higher: true},
	{Name: "splice on vs off: CPU per request", Ratio: "splice/sluice", Metric: "CPU/req", Target: 0.9},
	{Name: "splice on vs off: no connection-rate loss", Ratio: "splice/sluice", Metric: "conn/s", Target: 1.0, Higher: true},
	{Name: "splice on vs off: TCP memory in the long bulk", Ratio: "splice/sluice", Metric: "long bulk TCP MiB", Target: 1.25},
	{Name: "built-in proxy vs HAProxy: connections/s", Ratio: "sluice/haproxy", Metric: "conn/s", Target: 1.0, Higher: true},
	{Name: "built-in proxy vs HAProxy: p50", Ratio: "sluice/haproxy", Metric: "rr1 p50", Target: 1.0},
	{Name: "built-in proxy vs HAProxy: memory per idle connection", Ratio: "sluice/haproxy", Metric: "KiB/idle conn", Target: 1.0},
	{Name: "telemetry on vs off: connections/s", Ratio: "splice-telemetry/splice", Metric: "conn/s", Target: 0.97, Higher: true},
	{Name: "telemetry on vs off: CPU per request", Ratio: "splice-telemetry/splice", Metric: "CPU/req", Target: 1.03},
	{Name: "kernel-only vs direct: p50", Ratio: "kernel-only/direct", Metric: "rr1 p50", Target: 1.1},
	{Name: "kernel-only vs direct: p99", Ratio: "kernel-only/direct", Metric: "rr1 p99", Target: 1.1},
	{Name: "kernel-only vs direct: connections/s", Ratio: "kernel-only/direct", Metric: "conn/s", Target: 0.9, Higher: true},
	{Name: "offload vs direct: p50", Ratio: "offload/direct", Metric: "rr1 p50", Target: 1.3},
	{Name: "offload vs direct: p50, 16 connections", Ratio: "offload/direct", Metric: "rr16 p50", Target: 1.3},
	{Name: "offload vs direct: bulk", Ratio: "offload/direct", Metric: "bulk MB/s", Target: 0.9, Higher: true},
	{Name: "offload vs the proxied path: connections/s", Ratio: "offload/splice", Metric: "conn/s", Target: 1.0, Higher: true},
}

// judge fills in the goals from the ratios.
func (r *report) judge() {
	r.Goals = nil
	for _, g := range goals {
		ratios, ok := r.Ratios[g.Ratio]
		if !ok {
			continue
		}
		if g.Metric != "*" {
			got, ok := ratios[g.Metric]
			if !ok {
				continue
			}
			g.Got = got
			g.Met = got <= g.Target
			if g.Higher {
				g.Met = got >= g.Target
			}
			r.Goals = append(r.Goals, g)
			continue
		}
		// Never worse: the worst workload's ratio, oriented so that
		// higher is better.
		g.Higher, g.Target, g.Got = true, 1, math.Inf(1)
		for _, m := range metrics {
			v, ok := ratios[m.name]
			if !ok || v == 0 || m.name == "KiB/idle conn" || strings.HasPrefix(m.name, "long") {
				continue
			}
			if !m.higher {
				v = 1 / v
			}
			if v < g.Got {
				g.Got, g.Metric = v, m.name+" (worst; latency and CPU inverted)"
			}
		}
		g.Met = g.Got >= 1
		r.Goals = append(r.Goals, g)
	}
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
				// 0 is "not measured" (a workload only some runs do).
				if v := m.get(f); f.Config == c && v != 0 {
					vals = append(vals, v)
				}
			}
			if len(vals) == 0 {
				continue
			}
			slices.Sort(vals)
			r.Summary[c][m.name] = Stat{Median: vals[len(vals)/2], Min: vals[0], Max: vals[len(vals)-1]}
		}
	}
	r.Ratios = map[string]map[string]float64{}
	for _, c := range configs {
		for _, base := range []string{"direct", "iptables", "haproxy", "sluice", "splice"} {
			if base == c || r.Summary[base] == nil {
				continue
			}
			key := c + "/" + base
			r.Ratios[key] = map[string]float64{}
			for _, m := range metrics {
				if b, v := r.Summary[base][m.name].Median, r.Summary[c][m.name].Median; b != 0 && v != 0 {
					r.Ratios[key][m.name] = v / b
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
	for _, k := range []string{"iptables/direct", "sluice/direct", "splice/direct", "sluice/iptables", "splice/iptables", "splice/sluice", "splice-telemetry/splice", "sluice/haproxy", "kernel-only/direct", "kernel-only/iptables", "kernel-only-bare/direct", "offload/direct", "offload/iptables", "offload/splice"} {
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
	fmt.Fprintf(w, "\n\nGoals (reported, not enforced):\n\n| goal | ratio | metric | target | got | |\n| --- | --- | --- | --- | --- | --- |\n")
	for _, g := range r.Goals {
		op, verdict := "≤", "missed"
		if g.Higher {
			op = "≥"
		}
		if g.Met {
			verdict = "met"
		}
		fmt.Fprintf(w, "| %s | %s | %s | %s %.2f | %.2f | %s |\n", g.Name, g.Ratio, g.Metric, op, g.Target, g.Got, verdict)
	}
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
	p.Y.Label.Text = "ratio to direct (log scale)"
	// Latencies reach 10x direct where rates fall to 0.3x: bars of the
	// ratio's log keep both readable, up for more than direct, down for
	// less.
	var ticks []plot.Tick
	for e := -3; e <= 4; e++ {
		ticks = append(ticks, plot.Tick{Value: float64(e), Label: strconv.FormatFloat(math.Pow(2, float64(e)), 'g', -1, 64) + "x"})
	}
	p.Y.Tick.Marker = plot.ConstantTicks(ticks)
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
	// Ten colors told apart at a glance (matplotlib's tab10): plotutil's
	// repeat after seven, and there are more configurations.
	var palette []color.Color
	for _, rgb := range []uint32{0xd62728, 0x2ca02c, 0x1f77b4, 0xff7f0e, 0x9467bd, 0x8c564b, 0xe377c2, 0x17becf, 0x7f7f7f, 0xbcbd22} {
		palette = append(palette, color.RGBA{R: uint8(rgb >> 16), G: uint8(rgb >> 8), B: uint8(rgb), A: 255})
	}
	for i, c := range others {
		vals := make(plotter.Values, len(names))
		for j, m := range metrics[:8] {
			if d, v := r.Summary["direct"][m.name].Median, r.Summary[c][m.name].Median; d != 0 && v != 0 {
				vals[j] = math.Log2(v / d)
			}
		}
		bars, err := plotter.NewBarChart(vals, w)
		if err != nil {
			return err
		}
		bars.LineStyle.Width = 0
		bars.Color = palette[i%len(palette)]
		bars.Offset = w * vg.Length(float64(i)-float64(len(others)-1)/2)
		p.Add(bars)
		p.Legend.Add(c, bars)
	}
	p.Legend.Top, p.Legend.Left = true, true
	p.NominalX(names...)
	p.Add(plotter.NewGrid())
	return p.Save(vg.Length(26)*vg.Centimeter, vg.Length(13)*vg.Centimeter, path)
}

func runtimeCPUs() int { return runtime.NumCPU() }
