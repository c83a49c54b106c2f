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
	Rounds  int               `json:"rounds,omitempty"`
	// Order is the order the configurations ran in, per round.
	Order [][]string `json:"order,omitempty"`
	// How busy the machine was (percent of every CPU) over a second
	// before the bench: CPU/req counts the whole machine.
	BackgroundCPUPct float64   `json:"background_cpu_pct"`
	CPUAccounting    string    `json:"cpu_accounting,omitempty"`
	MemoryAccounting string    `json:"memory_accounting,omitempty"`
	HAProxyConfig    string    `json:"haproxy_config,omitempty"`
	Runs             []Figures `json:"runs"`
	// Summary is, per configuration and metric, the median, min and max
	// over the runs; Ratios are medians over a baseline's medians.
	Summary map[string]map[string]Stat    `json:"summary"`
	Ratios  map[string]map[string]float64 `json:"ratios"`
	// PairedRatios are, per ratio and metric, the configuration's figure
	// over its baseline's in the same round, each round's, and their
	// median, min and max. The goals are judged on their medians.
	PairedRatios map[string]map[string]RatioStat `json:"paired_ratios"`
	// Goals are the targets, each with the ratio this run got.
	Goals []Goal `json:"goals"`
}

// RatioStat is a ratio's spread over the rounds.
type RatioStat struct {
	Stat
	Rounds []float64 `json:"rounds"`
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
	Min    float64 `json:"min"` // the worst and best rounds' ratios
	Max    float64 `json:"max"`
	Met    bool    `json:"met"`
	// Judged is false for goals on rr1 latency: on a VM it is bimodal (an
	// idle vCPU's wake-up), so it is reported but decides nothing.
	Judged bool `json:"judged"`
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
	{Name: "Sluice vs iptables inbound, same proxy: never worse", Ratio: "in-sluice/in-iptables", Metric: "*"},
}

// judged tells whether a goal on metric decides anything: rr1 latency does
// not (see Goal.Judged).
func judged(metric string) bool { return !strings.HasPrefix(metric, "rr1 ") }

// judge fills in the goals from the medians of the paired ratios.
func (r *report) judge() {
	r.Goals = nil
	for _, g := range goals {
		ratios, ok := r.PairedRatios[g.Ratio]
		if !ok {
			continue
		}
		if g.Metric != "*" {
			got, ok := ratios[g.Metric]
			if !ok {
				continue
			}
			g.Got, g.Min, g.Max = got.Median, got.Min, got.Max
			g.Judged = judged(g.Metric)
			g.Met = g.Judged && (g.Higher && got.Median >= g.Target || !g.Higher && got.Median <= g.Target)
			r.Goals = append(r.Goals, g)
			continue
		}
		// Never worse: the worst judged workload's ratio, oriented so
		// that higher is better.
		g.Higher, g.Target, g.Got, g.Judged = true, 1, math.Inf(1), true
		for _, m := range metrics {
			v, ok := ratios[m.name]
			if !ok || v.Median == 0 || !judged(m.name) || m.name == "KiB/idle conn" || m.name == "pod CPU/req" || strings.HasPrefix(m.name, "long") {
				continue
			}
			lo, hi := v.Min, v.Max
			med := v.Median
			if !m.higher {
				med, lo, hi = 1/med, 1/hi, 1/lo
			}
			if med < g.Got {
				g.Got, g.Min, g.Max, g.Metric = med, lo, hi, m.name+" (worst; latency and CPU inverted)"
			}
		}
		if math.IsInf(g.Got, 1) {
			continue
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

// stat returns the median (the mean of the middle two for an even count),
// min and max of vals, which is not empty.
func stat(vals []float64) Stat {
	v := slices.Sorted(slices.Values(vals))
	n := len(v)
	med := v[n/2]
	if n%2 == 0 {
		med = (v[n/2-1] + v[n/2]) / 2
	}
	return Stat{Median: med, Min: v[0], Max: v[n-1]}
}

// baselines are what each configuration is compared with, inbound ones
// with inbound ones only.
var (
	baselines        = []string{"direct", "iptables", "haproxy", "sluice", "splice"}
	inboundBaselines = []string{"in-direct", "in-iptables"}
)

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
			if len(vals) > 0 {
				r.Summary[c][m.name] = stat(vals)
			}
		}
	}
	r.Ratios = map[string]map[string]float64{}
	r.PairedRatios = map[string]map[string]RatioStat{}
	for _, c := range configs {
		bases := baselines
		if inbound(c) {
			bases = inboundBaselines
		}
		for _, base := range bases {
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
			r.PairedRatios[key] = pairedRatios(r.Runs, c, base)
		}
	}
}

// pairedRatios is, per metric, c's figure over base's in each round both
// measured it, and the spread of those ratios.
func pairedRatios(runs []Figures, c, base string) map[string]RatioStat {
	byRound := func(config string) map[int]Figures {
		m := map[int]Figures{}
		for _, f := range runs {
			if f.Config == config {
				m[f.Run] = f
			}
		}
		return m
	}
	cs, bs := byRound(c), byRound(base)
	var rounds []int
	for r := range cs {
		if _, ok := bs[r]; ok {
			rounds = append(rounds, r)
		}
	}
	slices.Sort(rounds)
	out := map[string]RatioStat{}
	for _, m := range metrics {
		var ratios []float64
		for _, r := range rounds {
			if b, v := m.get(bs[r]), m.get(cs[r]); b != 0 && v != 0 {
				ratios = append(ratios, v/b)
			}
		}
		if len(ratios) > 0 {
			out[m.name] = RatioStat{Stat: stat(ratios), Rounds: ratios}
		}
	}
	return out
}

// print writes the medians (with their spread) and the main ratios as
// Markdown tables.
func (r report) print(w io.Writer, configs []string) {
	fmt.Fprintf(w, "\nMedians over the rounds (min-max), %s, %s CPUs, kernel %s:\n\n", r.Machine["cpu"], r.Machine["cpus"], r.Machine["kernel"])
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
	fmt.Fprintf(w, "\n\nPaired ratios: each round's figure over its baseline's in the same round, median (min-max) over the rounds; for latency, CPU and memory lower is better:\n\n| ratio |")
	var keys []string
	for _, k := range []string{"iptables/direct", "sluice/direct", "splice/direct", "sluice/iptables", "splice/iptables", "splice/sluice", "splice-telemetry/splice", "sluice/haproxy", "kernel-only/direct", "kernel-only/iptables", "kernel-only-bare/direct", "offload/direct", "offload/iptables", "offload/splice",
		"in-iptables/in-direct", "in-sluice/in-direct", "in-sluice/in-iptables"} {
		if _, ok := r.PairedRatios[k]; ok {
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
			if v, ok := r.PairedRatios[k][m.name]; ok && v.Median != 0 {
				fmt.Fprintf(w, " %s (%s-%s) |", ratio(v.Median), ratio(v.Min), ratio(v.Max))
			} else {
				fmt.Fprintf(w, " - |")
			}
		}
	}
	fmt.Fprintf(w, "\n\nGoals on the paired ratios' medians (reported, not enforced; rr1 latency is bimodal on a VM, so reported, never judged):\n\n| goal | ratio | metric | target | got (min-max) | |\n| --- | --- | --- | --- | --- | --- |\n")
	for _, g := range r.Goals {
		fmt.Fprintf(w, "| %s | %s | %s | %s %s | %s (%s-%s) | %s |\n", g.Name, g.Ratio, g.Metric, g.op(), ratio(g.Target), ratio(g.Got), ratio(g.Min), ratio(g.Max), g.verdict())
	}
	if !slices.ContainsFunc(r.Runs, func(f Figures) bool { return f.ConnCount > 0 }) {
		return // an older run: no counts, no accounting
	}
	fmt.Fprintf(w, "\nEach workload ran %gs a round, %d rounds, configurations in an order rotated by one each round. Operations per workload (median over the rounds):\n\n| config | connections | rr1 round trips | rr16 round trips | bulk MB | machine busy %% (rr16) |\n| --- | --- | --- | --- | --- | --- |\n", r.Seconds, r.Rounds)
	for _, c := range configs {
		counts := func(get func(Figures) float64) string {
			var vals []float64
			for _, f := range r.Runs {
				if f.Config == c && get(f) != 0 {
					vals = append(vals, get(f))
				}
			}
			if len(vals) == 0 {
				return "-"
			}
			return num(stat(vals).Median)
		}
		fmt.Fprintf(w, "| %s | %s | %s | %s | %s | %s |\n", c,
			counts(func(f Figures) float64 { return float64(f.ConnCount) }),
			counts(func(f Figures) float64 { return float64(f.RR1Rounds) }),
			counts(func(f Figures) float64 { return float64(f.RR16Rounds) }),
			counts(func(f Figures) float64 { return float64(f.BulkBytes) / 1e6 }),
			counts(func(f Figures) float64 { return f.MachineBusyPct }))
	}
	fmt.Fprintf(w, "\nMachine busy before the bench: %.1f%%. %s\n%s\n", r.BackgroundCPUPct, r.CPUAccounting, r.MemoryAccounting)
}

// ratio formats a ratio with three decimals: "0.852", never "0.85".
func ratio(v float64) string { return strconv.FormatFloat(v, 'f', 3, 64) }

func (g Goal) op() string {
	if g.Higher {
		return "≥"
	}
	return "≤"
}

func (g Goal) verdict() string {
	switch {
	case !g.Judged:
		return "not judged (rr1)"
	case g.Met:
		return "met"
	}
	return "missed"
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
	p.Title.Text = "Sluice benchmark: paired ratios to no sidecar, medians over the rounds (1 = no sidecar)"
	p.Y.Label.Text = "ratio to direct / in-direct (log scale)"
	// Latencies reach 10x direct where rates fall to 0.3x: bars of the
	// ratio's log keep both readable, up for more than direct, down for
	// less.
	var ticks []plot.Tick
	for e := -3; e <= 4; e++ {
		ticks = append(ticks, plot.Tick{Value: float64(e), Label: strconv.FormatFloat(math.Pow(2, float64(e)), 'g', -1, 64) + "x"})
	}
	p.Y.Tick.Marker = plot.ConstantTicks(ticks)
	var names []string
	for _, m := range metrics {
		if m.plotted {
			names = append(names, m.name)
		}
	}
	var others []string
	for _, c := range configs {
		if c != "direct" && c != "in-direct" {
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
		base := "direct"
		if inbound(c) {
			base = "in-direct"
		}
		for j, name := range names {
			if v := r.PairedRatios[c+"/"+base][name].Median; v != 0 {
				vals[j] = math.Log2(v)
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
