package rollout

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"testing"
	"time"
)

// plant is a route of two backends whose measurements follow the weights:
// each Measure, every backend gets its weight's worth of connects, with the
// failure ratio and latency set for it.
type plant struct {
	weights  map[string]uint32
	fail     map[string]float64
	latency  map[string]float64
	samples  map[string]Sample
	steps    []uint32
	rollback string
	// silent backends get no connects measured before the Measure call
	// numbered silent[b] (counted from 1); -1: never.
	silent   map[string]int
	measured int
}

func (p *plant) Backends() (map[string]uint32, error) { return p.weights, nil }

func (p *plant) SetWeights(stable, canary string, sw, cw, step uint32, rollback string) error {
	p.weights[stable], p.weights[canary] = sw, cw
	p.steps = append(p.steps, step)
	if rollback != "" {
		p.rollback = rollback
	}
	return nil
}

func (p *plant) Measure() (map[string]Sample, error) {
	p.measured++
	for b, w := range p.weights {
		if n, ok := p.silent[b]; ok && (n < 0 || p.measured < n) {
			continue
		}
		s := p.samples[b]
		failed := uint64(float64(w) * p.fail[b])
		s.Failed += failed
		s.Established += uint64(w) - failed
		s.LatencySum += float64(uint64(w)-failed) * p.latency[b]
		p.samples[b] = s
	}
	out := map[string]Sample{}
	for b, s := range p.samples {
		out[b] = s
	}
	return out, nil
}

var (
	stable = "198.18.2.2:8080"
	canary = "198.18.3.2:8080"
	quiet  = slog.New(slog.NewTextHandler(io.Discard, nil))
)

func newPlant() *plant {
	return &plant{
		weights: map[string]uint32{stable: 100, canary: 0},
		fail:    map[string]float64{},
		latency: map[string]float64{stable: 0.001, canary: 0.001},
		samples: map[string]Sample{},
		silent:  map[string]int{},
	}
}

func config() Config {
	return Config{Service: "198.19.0.10:80", Canary: canary, Step: 25, Interval: time.Millisecond,
		MaxFailureRatio: 0.05, MaxLatency: 10 * time.Millisecond}
}

func TestHealthyCanaryReachesAll(t *testing.T) {
	p := newPlant()
	if err := Run(context.Background(), config(), p, quiet); err != nil {
		t.Fatal(err)
	}
	if p.weights[canary] != 100 || p.weights[stable] != 0 {
		t.Errorf("weights %v, want the canary at 100", p.weights)
	}
	want := []uint32{25, 50, 75, 100, 0}
	if len(p.steps) != len(want) {
		t.Fatalf("steps %v, want %v", p.steps, want)
	}
	for i := range want {
		if p.steps[i] != want[i] {
			t.Fatalf("steps %v, want %v", p.steps, want)
		}
	}
}

func TestFailingCanaryRollsBack(t *testing.T) {
	p := newPlant()
	p.fail[canary] = 1
	err := Run(context.Background(), config(), p, quiet)
	if !errors.Is(err, ErrRolledBack) || p.rollback != ReasonFailures || p.weights[stable] != 100 || p.weights[canary] != 0 {
		t.Errorf("err %v, rollback %q, weights %v", err, p.rollback, p.weights)
	}
}

func TestSlowCanaryRollsBack(t *testing.T) {
	p := newPlant()
	p.latency[canary] = 0.040
	err := Run(context.Background(), config(), p, quiet)
	if !errors.Is(err, ErrRolledBack) || p.rollback != ReasonLatency || p.weights[canary] != 0 {
		t.Errorf("err %v, rollback %q, weights %v", err, p.rollback, p.weights)
	}
}

// A canary with no connects measured (kernel-only flows the sidecar never
// saw, a series folded away, a service nobody calls) is never judged good:
// the first step waits MaxWait for evidence, then rolls back.
func TestCanaryWithoutConnectsRollsBack(t *testing.T) {
	p := newPlant()
	p.fail[canary] = 1 // it fails every connect, but nothing shows it
	p.silent[canary] = -1
	cfg := config()
	cfg.MaxWait = 4 * cfg.Interval
	err := Run(context.Background(), cfg, p, quiet)
	if !errors.Is(err, ErrRolledBack) || p.rollback != ReasonNoTraffic || p.weights[canary] != 0 || p.weights[stable] != 100 {
		t.Errorf("err %v, rollback %q, weights %v; want a rollback for no traffic", err, p.rollback, p.weights)
	}
	if len(p.steps) != 2 || p.steps[0] != 25 || p.steps[1] != 0 {
		t.Errorf("steps %v, want [25 0]: the first step must not pass", p.steps)
	}
	// One Measure before the step, then one per Interval up to MaxWait.
	if p.measured != 5 {
		t.Errorf("%d measurements, want 5 (the step waited MaxWait, judged every Interval)", p.measured)
	}
}

// A canary whose first connects come late in a step is judged on them: the
// step waits, then passes.
func TestStepWaitsForTheCanarysConnects(t *testing.T) {
	p := newPlant()
	p.silent[canary] = 3
	if err := Run(context.Background(), config(), p, quiet); err != nil {
		t.Fatal(err)
	}
	if p.weights[canary] != 100 {
		t.Errorf("weights %v, want the canary at 100", p.weights)
	}
}

func TestBadConfig(t *testing.T) {
	for _, c := range []Config{{Step: 0, Interval: time.Second, Canary: canary}, {Step: 10, Canary: canary}, {Step: 10, Interval: time.Second}} {
		if err := Run(context.Background(), c, newPlant(), quiet); err == nil {
			t.Errorf("config %+v accepted", c)
		}
	}
}

// Counters that went back (an agent restarted) count from 0: never a
// wrapped, huge delta that would hide the canary's failures.
func TestDiffAfterCountersStartedOver(t *testing.T) {
	d := diff(Sample{Established: 100, Failed: 5, LatencySum: 1}, Sample{Established: 3, Failed: 2, LatencySum: 0.01})
	if d.established != 3 || d.failed != 2 || d.failureRatio() != 0.4 {
		t.Errorf("diff after a restart = %+v, want 3 established and 2 failed", d)
	}
}
