package telemetry

import (
	"github.com/prometheus/client_golang/prometheus"
)

var (
	routeWeight = prometheus.NewDesc("sluice_route_weight",
		"A canary route's programmed weight for each backend.", []string{"service", "backend"}, nil)
	routePicks = prometheus.NewDesc("sluice_route_picks_total",
		"New connections to a routed service, by the backend the kernel picked: the effective split.", []string{"service", "backend"}, nil)
	routeStep = prometheus.NewDesc("sluice_route_rollout_step",
		"The canary's weight in percent while 'sluice route rollout' runs; 0 otherwise.", []string{"service"}, nil)
	routeRollbacks = prometheus.NewDesc("sluice_route_rollbacks_total",
		"Rollouts of a route rolled back.", []string{"service"}, nil)
	routeLastRollback = prometheus.NewDesc("sluice_route_last_rollback",
		"1 for the reason the last rollback of a route happened: connect_failures, connect_latency or no_traffic.", []string{"service", "reason"}, nil)
)

// routeCollector exports the pod's canary routes as the kernel holds them.
type routeCollector struct{ e *Exporter }

func (c routeCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{routeWeight, routePicks, routeStep, routeRollbacks, routeLastRollback} {
		ch <- d
	}
}

func (c routeCollector) Collect(ch chan<- prometheus.Metric) {
	if c.e.opts.Routes == nil {
		return
	}
	routes, err := c.e.opts.Routes()
	if err != nil {
		c.e.opts.Logger.Warn("read routes", "err", err)
		return
	}
	for _, r := range routes {
		svc := r.Service.String()
		for i, b := range r.Backends {
			ch <- prometheus.MustNewConstMetric(routeWeight, prometheus.GaugeValue, float64(b.Weight), svc, b.AddrPort().String())
			ch <- prometheus.MustNewConstMetric(routePicks, prometheus.CounterValue, float64(r.Picks[i]), svc, b.AddrPort().String())
		}
		ch <- prometheus.MustNewConstMetric(routeStep, prometheus.GaugeValue, float64(r.RolloutStep), svc)
		ch <- prometheus.MustNewConstMetric(routeRollbacks, prometheus.CounterValue, float64(r.Rollbacks), svc)
		if r.LastRollback != "" {
			ch <- prometheus.MustNewConstMetric(routeLastRollback, prometheus.GaugeValue, 1, svc, r.LastRollback)
		}
	}
}
