package telemetry

import (
	"github.com/prometheus/client_golang/prometheus"
)

// collector produces, at each scrape, the metrics whose value is computed
// then: the layer-4 counters (closed flows' totals plus open flows' bytes so
// far, so long-lived flows count while they last), the live flow gauge and
// the kernel hooks' own counters.
type collector struct{ e *Exporter }

// KernelEventsHelp is sluice_kernel_events_total's help, the same wherever
// it is exported.
const KernelEventsHelp = "What the kernel hooks counted: inbound steering, splice, and every connection or flow event they could not serve (by event)."

func (c collector) descs() (opened, closed, sent, received, live, kernel, up, followers *prometheus.Desc) {
	prefix := "sluice"
	if c.e.opts.IstioNames {
		prefix = "istio"
	}
	d := func(name, help string, labels ...string) *prometheus.Desc {
		return prometheus.NewDesc(name, help, labels, nil)
	}
	return d(prefix+"_tcp_connections_opened_total", "TCP connections of the pod to or from the outside that were established (Istio's layer-4 metric and labels).", istioLabels...),
		d(prefix+"_tcp_connections_closed_total", "TCP connections of the pod to or from the outside that closed (Istio's layer-4 metric and labels).", istioLabels...),
		d(prefix+"_tcp_sent_bytes_total", "Bytes the pod sent on its connections to or from the outside, acknowledged by the peer; open connections count as they go.", istioLabels...),
		d(prefix+"_tcp_received_bytes_total", "Bytes the pod received on its connections to or from the outside; open connections count as they go.", istioLabels...),
		d("sluice_live_flows", "Connections of the pod to or from the outside open now.", "direction"),
		d("sluice_kernel_events_total", KernelEventsHelp, "event"),
		d("sluice_up", "1 while the exporter runs."),
		d("sluice_flow_followers", "Clients following the flows ('sluice flows --follow').")
}

func (c collector) Describe(ch chan<- *prometheus.Desc) {
	a, b, d, e, f, g, h, i := c.descs()
	for _, desc := range []*prometheus.Desc{a, b, d, e, f, g, h, i} {
		ch <- desc
	}
}

func (c collector) Collect(ch chan<- prometheus.Metric) {
	opened, closed, sent, received, live, kernel, up, followers := c.descs()
	ch <- prometheus.MustNewConstMetric(up, prometheus.GaugeValue, 1)

	flows, err := c.e.Live()
	if err != nil {
		c.e.opts.Logger.Warn("read live sockets", "err", err)
	}
	c.e.mu.Lock()
	ch <- prometheus.MustNewConstMetric(followers, prometheus.GaugeValue, float64(len(c.e.followers)))
	totals := make(map[labelKey]tcpTotals, len(c.e.totals))
	for k, t := range c.e.totals {
		totals[k] = *t
	}
	c.e.mu.Unlock()
	perDirection := map[string]int{Outbound: 0, Inbound: 0}
	for _, f := range flows {
		perDirection[f.Direction]++
		k := f.series()
		t := totals[k]
		t.sent += f.BytesSent
		t.received += f.BytesReceived
		totals[k] = t
	}
	counts, err := c.e.source.Counters()
	if err != nil {
		c.e.opts.Logger.Warn("read kernel counters", "err", err)
	}
	// Flows whose events the ring buffer lost are still counted, as the
	// kernel counted them: closed when their close was lost, opened when
	// their open was lost too (an open alone lost is counted at its close).
	for _, dir := range []string{Outbound, Inbound} {
		if lost := counts["flow_close_lost_"+dir]; lost > 0 {
			k := labelKey{direction: dir, service: unknown}
			t := totals[k]
			t.closed += lost
			t.opened += counts["flow_open_and_close_lost_"+dir]
			totals[k] = t
		}
	}
	for k, t := range totals {
		var peer Identity
		if k.peer != nil {
			peer = *k.peer
		}
		labels := c.e.opts.Identity.labelValues(k.direction, k.service, peer)
		ch <- prometheus.MustNewConstMetric(opened, prometheus.CounterValue, float64(t.opened), labels...)
		ch <- prometheus.MustNewConstMetric(closed, prometheus.CounterValue, float64(t.closed), labels...)
		ch <- prometheus.MustNewConstMetric(sent, prometheus.CounterValue, float64(t.sent), labels...)
		ch <- prometheus.MustNewConstMetric(received, prometheus.CounterValue, float64(t.received), labels...)
	}
	for dir, n := range perDirection {
		ch <- prometheus.MustNewConstMetric(live, prometheus.GaugeValue, float64(n), dir)
	}
	for name, n := range counts {
		ch <- prometheus.MustNewConstMetric(kernel, prometheus.CounterValue, float64(n), name)
	}
}
