package main

import (
	"bytes"
	"encoding/json"
	"slices"
	"strings"
	"testing"
)

func TestRotateRunsEachConfigurationAtEachPosition(t *testing.T) {
	names := []string{"a", "b", "c"}
	want := [][]string{{"a", "b", "c"}, {"b", "c", "a"}, {"c", "a", "b"}, {"a", "b", "c"}}
	for r, w := range want {
		if got := rotate(names, r); !slices.Equal(got, w) {
			t.Errorf("rotate(%v, %d) = %v, want %v", names, r, got, w)
		}
	}
	if !slices.Equal(names, []string{"a", "b", "c"}) {
		t.Errorf("rotate changed its input: %v", names)
	}
	if rotate(nil, 3) != nil {
		t.Error("rotate(nil) is not nil")
	}
}

func TestStatMedianMinMax(t *testing.T) {
	for _, c := range []struct {
		in   []float64
		want Stat
	}{
		{[]float64{5}, Stat{5, 5, 5}},
		{[]float64{3, 1, 2}, Stat{2, 1, 3}},
		{[]float64{4, 1, 3, 2}, Stat{2.5, 1, 4}}, // even: the mean of the middle two
		{[]float64{9, 1, 8, 2, 7}, Stat{7, 1, 9}},
	} {
		in := slices.Clone(c.in)
		if got := stat(in); got != c.want {
			t.Errorf("stat(%v) = %+v, want %+v", c.in, got, c.want)
		}
		if !slices.Equal(in, c.in) {
			t.Errorf("stat sorted its input: %v", in)
		}
	}
}

// runs builds figures of conn/s per configuration and round.
func runs(conn map[string][]float64) []Figures {
	var out []Figures
	for c, vals := range conn {
		for r, v := range vals {
			out = append(out, Figures{Config: c, Run: r, ConnPerS: v})
		}
	}
	return out
}

func TestPairedRatiosPairEachRoundWithItsBaseline(t *testing.T) {
	// A slow round slows both: paired, the ratio is 0.5 each round; the
	// medians' ratio (150/200) would say 0.75.
	rep := report{Runs: runs(map[string][]float64{
		"direct":   {100, 400, 200},
		"iptables": {50, 200, 100},
		"sluice":   {100, 150, 300},
	})}
	rep.summarize([]string{"direct", "iptables", "sluice"})
	got := rep.PairedRatios["iptables/direct"]["conn/s"]
	if got.Median != 0.5 || got.Min != 0.5 || got.Max != 0.5 || !slices.Equal(got.Rounds, []float64{0.5, 0.5, 0.5}) {
		t.Errorf("iptables/direct = %+v, want 0.5 every round", got)
	}
	got = rep.PairedRatios["sluice/iptables"]["conn/s"]
	if want := []float64{2, 0.75, 3}; !slices.Equal(got.Rounds, want) || got.Median != 2 || got.Min != 0.75 || got.Max != 3 {
		t.Errorf("sluice/iptables = %+v, want rounds %v, median 2 (0.75-3)", got, want)
	}
	if r := rep.Ratios["sluice/iptables"]["conn/s"]; r != 1.5 {
		t.Errorf("ratio of medians = %v, want 150/100", r)
	}
	// A round one of the two lacks is left out, not paired with another.
	rep.Runs = append(rep.Runs, Figures{Config: "sluice", Run: 3, ConnPerS: 1000})
	rep.summarize([]string{"direct", "iptables", "sluice"})
	if got := rep.PairedRatios["sluice/iptables"]["conn/s"].Rounds; len(got) != 3 {
		t.Errorf("unpaired round counted: %v", got)
	}
}

func TestInboundComparesWithInboundOnly(t *testing.T) {
	rep := report{Runs: runs(map[string][]float64{"direct": {1}, "in-direct": {2}, "in-iptables": {3}, "in-sluice": {4}})}
	rep.summarize([]string{"direct", "in-direct", "in-iptables", "in-sluice"})
	var keys []string
	for k := range rep.PairedRatios {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	if want := []string{"in-direct/in-iptables", "in-iptables/in-direct", "in-sluice/in-direct", "in-sluice/in-iptables"}; !slices.Equal(keys, want) {
		t.Errorf("ratios %v, want %v", keys, want)
	}
}

func TestJudgeLeavesRR1Unjudged(t *testing.T) {
	rep := report{PairedRatios: map[string]map[string]RatioStat{
		"sluice/iptables": {
			"rr1 p50":    {Stat: Stat{Median: 0.5, Min: 0.4, Max: 0.6}},  // would meet ≤ 0.85
			"rr1 p99":    {Stat: Stat{Median: 3, Min: 2, Max: 4}},        // would fail never-worse
			"rr16 req/s": {Stat: Stat{Median: 1.2, Min: 1.1, Max: 1.3}},  // meets ≥ 1.15
			"bulk MB/s":  {Stat: Stat{Median: 1.05, Min: 0.9, Max: 1.2}}, // misses ≥ 1.1
			"CPU/req":    {Stat: Stat{Median: 1.25, Min: 1.0, Max: 2.0}}, // worst, inverted: 0.8
		},
	}}
	rep.judge()
	byName := map[string]Goal{}
	for _, g := range rep.Goals {
		byName[g.Name] = g
	}
	if g := byName["Sluice vs iptables: p50"]; g.Judged || g.Met || g.verdict() != "not judged (rr1)" || g.Got != 0.5 {
		t.Errorf("rr1 p50 goal = %+v, want reported (0.5) and not judged", g)
	}
	if g := byName["Sluice vs iptables: request/response throughput"]; !g.Judged || !g.Met || g.Min != 1.1 || g.Max != 1.3 {
		t.Errorf("rr16 goal = %+v, want met with min 1.1 max 1.3", g)
	}
	if g := byName["Sluice vs iptables: bulk"]; !g.Judged || g.Met {
		t.Errorf("bulk goal = %+v, want missed", g)
	}
	g := byName["Sluice vs iptables, same proxy: never worse"]
	if !strings.HasPrefix(g.Metric, "CPU/req") || g.Got != 0.8 || g.Min != 0.5 || g.Max != 1 || g.Met {
		t.Errorf("never-worse goal = %+v, want CPU/req the worst at 0.8 (0.5-1), missed, rr1 p99 left out", g)
	}
}

func TestRatiosPrintWithThreeDecimals(t *testing.T) {
	for v, want := range map[float64]string{0.85: "0.850", 0.8521: "0.852", 1: "1.000", 1.15: "1.150", 12.3456: "12.346"} {
		if got := ratio(v); got != want {
			t.Errorf("ratio(%v) = %q, want %q", v, got, want)
		}
	}
	rep := report{Seconds: 3, Rounds: 2, Runs: runs(map[string][]float64{"iptables": {100, 100}, "sluice": {85, 85.2}})}
	rep.summarize([]string{"iptables", "sluice"})
	rep.judge()
	var out bytes.Buffer
	rep.print(&out, []string{"iptables", "sluice"})
	for _, want := range []string{"| conn/s | 0.851 (0.850-0.852) |", "| ≥ 1.000 | 0.851 (0.850-0.852) | missed |"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("output lacks %q:\n%s", want, out.String())
		}
	}
}

func TestReplotRecomputesPairedRatiosOfAnOlderJSON(t *testing.T) {
	old := `{"seconds_per_workload": 3, "runs": [
		{"config": "direct", "run": 0, "conn_per_s": 100, "cpu_us_per_request": 10},
		{"config": "sluice", "run": 0, "conn_per_s": 80, "cpu_us_per_request": 12}],
		"ratios": {"sluice/direct": {"conn/s": 0.8}}}`
	var rep report
	if err := json.Unmarshal([]byte(old), &rep); err != nil {
		t.Fatal(err)
	}
	rep.summarize([]string{"direct", "sluice"})
	if got := rep.PairedRatios["sluice/direct"]["conn/s"].Median; got != 0.8 {
		t.Errorf("paired conn/s = %v, want 0.8", got)
	}
	if got := rep.PairedRatios["sluice/direct"]["pod CPU/req"].Median; got != 1.2 {
		t.Errorf("old cgroup CPU/req = %v, want 1.2 as pod CPU/req", got)
	}
	if _, ok := rep.PairedRatios["sluice/direct"]["CPU/req"]; ok {
		t.Error("an older JSON has no machine CPU, but CPU/req got a ratio")
	}
}

func TestParseProcStat(t *testing.T) {
	s, err := parseProcStat("cpu  10 1 5 100 7 2 3 4 9 0\ncpu0 1 2 3 4 5 6 7 8 9 0\n")
	if err != nil {
		t.Fatal(err)
	}
	// busy: user, nice, system, irq, softirq, steal; guest is in user.
	if s.busy != 10+1+5+2+3+4 || s.total != 10+1+5+100+7+2+3+4 {
		t.Errorf("got %+v", s)
	}
	d := procStat{busy: 150, total: 600}.sub(procStat{busy: 50, total: 200})
	if d.busyUsec() != 1e6 || d.busyPct() != 25 {
		t.Errorf("100 busy ticks of 400: %v µs, %v%%", d.busyUsec(), d.busyPct())
	}
	if _, err := parseProcStat("intr 1 2\n"); err == nil {
		t.Error("no cpu line parsed")
	}
}

func TestHAProxyConfigIsTuned(t *testing.T) {
	cfg := haproxyConfig(3, 9500, 372)
	for _, want := range []string{"nbthread 3\n", "tune.bufsize 65536\n", "option splice-auto\n", "maxconn 9500\n", "maxpipes 372\n", "bind 127.0.0.1:15001\n"} {
		if !strings.Contains(cfg, want) {
			t.Errorf("config lacks %q:\n%s", want, cfg)
		}
	}
}
