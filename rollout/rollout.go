// Package rollout moves a service's new connections from its stable backend
// to a canary step by step, gated by what the kernel measures of each:
// connect failures and connect latency of the pod's flows to them. It
// rolls back by itself when the canary is worse than the stable backend by
// more than the bounds. The kernel side (weights, records) and the
// measurements come in through Plant, so the loop is tested without either.
package rollout

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"
)

// Config is one rollout. Backends are named as the plant names them (a
// pod's route: ADDRESS:PORT; a Gateway API route: the backend Service).
type Config struct {
	Service string // the route, for logs and errors
	Canary  string
	// Step is how many percent of new connections move to the canary at
	// each step (1-100).
	Step uint32
	// Interval is how long each step runs before its measurements decide.
	Interval time.Duration
	// MaxFailureRatio bounds how much higher the canary's share of failed
	// connects may be than the stable backend's (0.05: 5 points).
	MaxFailureRatio float64
	// MaxLatency bounds how much slower the canary's mean connect latency
	// may be than the stable backend's.
	MaxLatency time.Duration
	// MinConnects is how many connects to the canary a step needs before
	// it can be judged (default 1). A step without them runs on, judged
	// again every Interval, for up to MaxWait in all (default 5 Intervals);
	// then the rollout rolls back: a canary nobody reached proved nothing,
	// and one whose every connect went unmeasured must not reach 100 %.
	MinConnects uint64
	MaxWait     time.Duration
}

// withDefaults fills in MinConnects and MaxWait.
func (c Config) withDefaults() Config {
	if c.MinConnects == 0 {
		c.MinConnects = 1
	}
	if c.MaxWait == 0 {
		c.MaxWait = 5 * c.Interval
	}
	return c
}

// Validate checks a config.
func (c Config) Validate() error {
	switch {
	case c.Step < 1 || c.Step > 100:
		return fmt.Errorf("--step %d: want 1 to 100 (percent of new connections per step)", c.Step)
	case c.Interval <= 0:
		return fmt.Errorf("--interval %s: want a positive duration, e.g. 30s", c.Interval)
	case c.MaxFailureRatio < 0 || c.MaxFailureRatio > 1:
		return fmt.Errorf("--max-connect-failure-ratio %v: want 0 to 1", c.MaxFailureRatio)
	case c.MaxLatency < 0:
		return fmt.Errorf("--max-connect-latency %s: want 0 or more", c.MaxLatency)
	case c.MaxWait != 0 && c.MaxWait < c.Interval:
		return fmt.Errorf("--max-wait %s: want at least --interval (%s), or 0 for 5 intervals", c.MaxWait, c.Interval)
	case c.Canary == "":
		return errors.New("--to is required: the canary backend (a pod's route: ADDRESS:PORT; an HTTPRoute's: the Service's name)")
	}
	return nil
}

// Sample is what has been measured of one backend so far (cumulative).
type Sample struct {
	Established uint64  // connects that were established
	LatencySum  float64 // their connect latencies, in seconds
	Failed      uint64  // connects never established
}

// Plant is the route being rolled out and the measurements of its backends.
type Plant interface {
	// Backends returns the route's backends and weights now.
	Backends() (map[string]uint32, error)
	// SetWeights gives the stable and canary backends these weights, and
	// records the rollout's step (canary percent) and, when rolling back,
	// the reason.
	SetWeights(stable, canary string, stableWeight, canaryWeight, step uint32, rollback string) error
	// Measure returns the cumulative samples of the backends.
	Measure() (map[string]Sample, error)
}

// Reasons for a rollback, as recorded on the route and exported.
const (
	ReasonFailures  = "connect_failures"
	ReasonLatency   = "connect_latency"
	ReasonNoTraffic = "no_traffic"
)

// ErrRolledBack is returned when the rollout rolled back.
var ErrRolledBack = errors.New("rolled back")

// Run rolls cfg out: it returns nil once the canary takes every new
// connection, an error wrapping ErrRolledBack when the canary proved worse,
// or ctx's error if interrupted (the weights then stay where they were).
func Run(ctx context.Context, cfg Config, p Plant, log *slog.Logger) error {
	if err := cfg.Validate(); err != nil {
		return err
	}
	cfg = cfg.withDefaults()
	weights, err := p.Backends()
	if err != nil {
		return err
	}
	var stable string
	for b := range weights {
		switch {
		case b == cfg.Canary:
		case stable != "":
			return fmt.Errorf("route %s has more than the stable backend and the canary: a rollout moves traffic between two", cfg.Service)
		default:
			stable = b
		}
	}
	if stable == "" {
		return fmt.Errorf("route %s has no backend besides the canary %s to roll out from", cfg.Service, cfg.Canary)
	}
	percent := uint32(0)
	if total := weights[stable] + weights[cfg.Canary]; total > 0 {
		percent = weights[cfg.Canary] * 100 / total
	}
	// What the stable backend looked like last: at 100 % canary it gets no
	// more connections to compare with.
	var stableLast *delta
	for {
		percent = min(100, percent+cfg.Step)
		if err := p.SetWeights(stable, cfg.Canary, 100-percent, percent, percent, ""); err != nil {
			return err
		}
		log.Info("rollout step", "service", cfg.Service, "canary", cfg.Canary, "percent", percent)
		c, s, err := observe(ctx, cfg, stable, p)
		if err != nil {
			return err
		}
		if s.attempts() > 0 {
			stableLast = &s
		}
		if reason, why := verdict(cfg, c, stableLast); reason != "" {
			log.Warn("rollout rolled back", "service", cfg.Service, "canary", cfg.Canary, "percent", percent, "reason", reason, "why", why)
			if err := p.SetWeights(stable, cfg.Canary, 100, 0, 0, reason); err != nil {
				return err
			}
			return fmt.Errorf("%w at %d%%: %s", ErrRolledBack, percent, why)
		}
		log.Info("rollout step passed", "service", cfg.Service, "percent", percent,
			"canary_connects", c.attempts(), "canary_failure_ratio", c.failureRatio(), "canary_latency", c.meanLatency())
		if percent == 100 {
			if err := p.SetWeights(stable, cfg.Canary, 0, 100, 0, ""); err != nil {
				return err
			}
			log.Info("rollout done", "service", cfg.Service, "canary", cfg.Canary)
			return nil
		}
	}
}

// observe runs one step: Interval, then on by Interval until the canary
// got MinConnects connects or MaxWait has passed. It returns what the
// canary and the stable backend did in the whole step.
func observe(ctx context.Context, cfg Config, stable string, p Plant) (canary, st delta, err error) {
	before, err := p.Measure()
	if err != nil {
		return delta{}, delta{}, err
	}
	for waited := time.Duration(0); ; {
		wait := min(cfg.Interval, cfg.MaxWait-waited)
		select {
		case <-ctx.Done():
			return delta{}, delta{}, ctx.Err()
		case <-time.After(wait):
		}
		waited += wait
		after, err := p.Measure()
		if err != nil {
			return delta{}, delta{}, err
		}
		canary, st = diff(before[cfg.Canary], after[cfg.Canary]), diff(before[stable], after[stable])
		if canary.attempts() >= cfg.MinConnects || waited >= cfg.MaxWait {
			return canary, st, nil
		}
	}
}

// delta is what one backend did during one step.
type delta struct {
	established, failed uint64
	latencySum          float64
}

// diff is what happened from a to b. A measure that went back (its
// counters started over: the node's agent restarted) counts from 0.
func diff(a, b Sample) delta {
	if b.Established < a.Established || b.Failed < a.Failed || b.LatencySum < a.LatencySum {
		a = Sample{}
	}
	return delta{established: b.Established - a.Established, failed: b.Failed - a.Failed, latencySum: b.LatencySum - a.LatencySum}
}

func (d delta) attempts() uint64 { return d.established + d.failed }

func (d delta) failureRatio() float64 {
	if d.attempts() == 0 {
		return 0
	}
	return float64(d.failed) / float64(d.attempts())
}

func (d delta) meanLatency() time.Duration {
	if d.established == 0 {
		return 0
	}
	return time.Duration(d.latencySum / float64(d.established) * float64(time.Second))
}

// verdict compares the canary's step with the stable backend's last one. A
// canary with fewer than MinConnects connects in the step (observe waited
// MaxWait for them) cannot be judged, and so cannot pass: its connects may
// all have gone unmeasured, or it may never be reached.
func verdict(cfg Config, canary delta, stable *delta) (reason, why string) {
	if canary.attempts() < cfg.MinConnects {
		return ReasonNoTraffic, fmt.Sprintf("no traffic to the canary: %d connects to it measured in %s (want %d; see --min-connects, --max-wait)",
			canary.attempts(), cfg.MaxWait, cfg.MinConnects)
	}
	var stableFail float64
	var stableLat time.Duration
	if stable != nil {
		stableFail, stableLat = stable.failureRatio(), stable.meanLatency()
	}
	if f := canary.failureRatio(); f-stableFail > cfg.MaxFailureRatio {
		return ReasonFailures, fmt.Sprintf("canary failed %.1f%% of %d connects, stable %.1f%% (bound: +%.1f points)",
			100*f, canary.attempts(), 100*stableFail, 100*cfg.MaxFailureRatio)
	}
	if stable != nil && stable.established > 0 && canary.established > 0 {
		if l := canary.meanLatency(); l-stableLat > cfg.MaxLatency {
			return ReasonLatency, fmt.Sprintf("canary connects in %s on average, stable in %s (bound: +%s)", l, stableLat, cfg.MaxLatency)
		}
	}
	return "", ""
}
