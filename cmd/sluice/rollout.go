package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"net/http"
	"net/netip"
	"os"
	"strings"
	"time"

	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/sluicemesh/sluice/loader"
	"github.com/sluicemesh/sluice/redirect"
	"github.com/sluicemesh/sluice/rollout"
	"github.com/sluicemesh/sluice/telemetry"
)

func rolloutCommand(ctx context.Context, fs *flag.FlagSet, c command, args []string, target func() (loader.Target, error), stdout io.Writer) error {
	to := fs.String("to", "", "the canary backend, ADDRESS:PORT")
	step := fs.Uint("step", 10, "percent of new connections moved to the canary per step")
	interval := fs.Duration("interval", 30*time.Second, "how long each step runs before it is judged")
	maxFail := fs.Float64("max-connect-failure-ratio", 0.05, "how much higher the canary's share of failed connects may be than the stable backend's")
	maxLat := fs.Duration("max-connect-latency", 50*time.Millisecond, "how much slower the canary's mean connect latency may be than the stable backend's")
	minConnects := fs.Uint64("min-connects", 1, "connects to the canary a step needs before it is judged")
	maxWait := fs.Duration("max-wait", 0, "how long a step may run on waiting for --min-connects before the rollout rolls back (default 5 intervals)")
	metrics := fs.String("metrics", "http://127.0.0.1:15090", "the sidecar's metrics address, where the measurements come from")
	if err := parseInterspersed(fs, c, args, stdout); err != nil {
		return err
	}
	svc, err := serviceArg(fs)
	if err != nil {
		return err
	}
	cfg := rollout.Config{Service: svc, Step: uint32(min(*step, math.MaxUint32)), Interval: *interval, MaxFailureRatio: *maxFail, MaxLatency: *maxLat,
		MinConnects: *minConnects, MaxWait: *maxWait}
	if *to != "" {
		if cfg.Canary, err = netip.ParseAddrPort(*to); err != nil {
			return usageError{fmt.Sprintf("--to %q: want the canary's ADDRESS:PORT", *to)}
		}
	}
	if err := cfg.Validate(); err != nil {
		return usageError{err.Error()}
	}
	t, err := target()
	if err != nil {
		return err
	}
	if !strings.Contains(*metrics, "://") {
		*metrics = "http://" + *metrics
	}
	log, _ := newLogger(os.Stderr, "text", "info")
	err = rollout.Run(ctx, cfg, &routePlant{target: t, service: svc, canary: cfg.Canary, metrics: *metrics}, log)
	if errors.Is(err, context.Canceled) {
		return fmt.Errorf("rollout of %s interrupted: the weights stay where they were (see 'sluice route list')", svc)
	}
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "rollout of %s to %s done: the canary takes every new connection\n", svc, cfg.Canary)
	return nil
}

// routePlant is a pod's route and its sidecar's measurements.
type routePlant struct {
	target  loader.Target
	service netip.AddrPort
	canary  netip.AddrPort
	metrics string
	mode    string
}

func (p *routePlant) Backends() (map[netip.AddrPort]uint32, error) {
	routes, err := loader.Routes(p.target)
	if err != nil {
		return nil, err
	}
	for _, r := range routes {
		if r.Service != p.service {
			continue
		}
		p.mode = r.Mode
		out := map[netip.AddrPort]uint32{p.canary: 0}
		for _, b := range r.Backends {
			out[b.AddrPort()] = b.Weight
		}
		return out, nil
	}
	return nil, fmt.Errorf("%w for %s: set one first ('sluice route set')", loader.ErrNoRoute, p.service)
}

func (p *routePlant) SetWeights(stable, canary netip.AddrPort, sw, cw, step uint32, rollback string) error {
	r := redirect.Route{Service: p.service, Mode: p.mode, Backends: []redirect.Backend{
		{Address: stable.Addr(), Port: stable.Port(), Weight: sw},
		{Address: canary.Addr(), Port: canary.Port(), Weight: cw},
	}}
	return loader.ChangeRoutes(p.target, loader.RouteChange{Set: []redirect.Route{r},
		Rollout: &loader.RolloutRecord{Service: p.service, Step: step, Rollback: rollback}})
}

// Measure reads the sidecar's per-destination connect metrics.
func (p *routePlant) Measure() (map[netip.AddrPort]rollout.Sample, error) {
	resp, err := http.Get(p.metrics + "/metrics")
	if err != nil {
		return nil, fmt.Errorf("read the sidecar's metrics at %s (is 'sluice run --cgroup' running there? see --metrics): %w", p.metrics, err)
	}
	defer resp.Body.Close()
	parser := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := parser.TextToMetricFamilies(resp.Body)
	if err != nil {
		return nil, fmt.Errorf("parse the sidecar's metrics: %w", err)
	}
	out := map[netip.AddrPort]rollout.Sample{}
	each := func(name string, fn func(s *rollout.Sample, v float64, count uint64)) {
		for _, m := range fams[name].GetMetric() {
			for _, l := range m.Label {
				if l.GetName() != "destination_service" {
					continue
				}
				ap, err := netip.ParseAddrPort(l.GetValue())
				if err != nil {
					continue // "other", "unknown"
				}
				s := out[ap]
				fn(&s, m.GetCounter().GetValue(), 0)
				if sum := m.GetSummary(); sum != nil {
					fn(&s, sum.GetSampleSum(), sum.GetSampleCount())
				}
				out[ap] = s
			}
		}
	}
	each(telemetry.MetricDestinationConnectDuration, func(s *rollout.Sample, v float64, n uint64) {
		if n > 0 {
			s.LatencySum, s.Established = v, n
		}
	})
	each(telemetry.MetricDestinationConnectFailures, func(s *rollout.Sample, v float64, _ uint64) { s.Failed = uint64(v) })
	return out, nil
}
