// Package plant is the rollout's plant in a real pod: the pod's canary
// route in the kernel, and the measurements of its flows the node's agent
// exports on /metrics. It keeps rollout/ itself pure: only this package touches the
// loader and the network.
package plant

import (
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"slices"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/sluicemesh/sluice/loader"
	"github.com/sluicemesh/sluice/redirect"
	"github.com/sluicemesh/sluice/rollout"
	"github.com/sluicemesh/sluice/telemetry"
)

// Route is a pod's route to service, rolled out to canary, measured by the
// node agent whose metrics are at metrics (a URL without /metrics).
type Route struct {
	target  loader.Target
	service netip.AddrPort
	canary  netip.AddrPort
	metrics string
	mode    string
}

var _ rollout.Plant = (*Route)(nil)

// New is the plant of a rollout of target's route to service towards canary.
func New(target loader.Target, service, canary netip.AddrPort, metrics string) *Route {
	return &Route{target: target, service: service, canary: canary, metrics: metrics}
}

// Backends is the route's backends and their weights, the canary's 0 when
// it is not one yet.
func (p *Route) Backends() (map[string]uint32, error) {
	routes, err := loader.Routes(p.target)
	if err != nil {
		return nil, err
	}
	for _, r := range routes {
		if r.Service != p.service {
			continue
		}
		p.mode = r.Mode
		out := map[string]uint32{p.canary.String(): 0}
		for _, b := range r.Backends {
			out[b.AddrPort().String()] = b.Weight
		}
		return out, nil
	}
	return nil, fmt.Errorf("%w for %s: set one first ('sluice route set')", loader.ErrNoRoute, p.service)
}

// SetWeights sets the two backends' weights and records the rollout's step
// in the same change.
func (p *Route) SetWeights(stableName, canaryName string, sw, cw, step uint32, rollback string) error {
	stable, err := netip.ParseAddrPort(stableName)
	if err != nil {
		return err
	}
	canary, err := netip.ParseAddrPort(canaryName)
	if err != nil {
		return err
	}
	r := redirect.Route{Service: p.service, Mode: p.mode, Backends: []redirect.Backend{
		{Address: stable.Addr(), Port: stable.Port(), Weight: sw},
		{Address: canary.Addr(), Port: canary.Port(), Weight: cw},
	}}
	return loader.ChangeRoutes(p.target, loader.RouteChange{Set: []redirect.Route{r},
		Rollout: &loader.RolloutRecord{Service: p.service, Step: step, Rollback: rollback}})
}

// Measure reads the pod's per-destination connect metrics from the node's
// agent.
func (p *Route) Measure() (map[string]rollout.Sample, error) {
	resp, err := http.Get(p.metrics + "/metrics")
	if err != nil {
		return nil, fmt.Errorf("read the node agent's metrics at %s (is 'sluice agent' running there? see --metrics): %w", p.metrics, err)
	}
	defer resp.Body.Close()
	return parseSamples(resp.Body, p.target.Cgroup)
}

// parseSamples reads the per-destination connect series of the pod in
// cgroup from a /metrics page of the agent. Destinations that are no
// address ("other", "unknown") are left out.
func parseSamples(r io.Reader, cgroup string) (map[string]rollout.Sample, error) {
	parser := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := parser.TextToMetricFamilies(r)
	if err != nil {
		return nil, fmt.Errorf("parse the node agent's metrics: %w", err)
	}
	out := map[string]rollout.Sample{}
	each := func(name string, fn func(s *rollout.Sample, v float64, count uint64)) {
		for _, m := range fams[name].GetMetric() {
			if !slices.ContainsFunc(m.Label, func(l *dto.LabelPair) bool {
				return l.GetName() == telemetry.LabelPodCgroup && l.GetValue() == cgroup
			}) {
				continue // another pod's
			}
			for _, l := range m.Label {
				if l.GetName() != telemetry.LabelDestinationService {
					continue
				}
				ap := l.GetValue()
				if _, err := netip.ParseAddrPort(ap); err != nil {
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
