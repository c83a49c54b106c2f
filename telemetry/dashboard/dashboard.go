// Package dashboard builds Sluice's Grafana dashboard from typed Go (the
// Grafana Foundation SDK), so the committed JSON in deploy/grafana is
// generated, never hand-edited: `go generate ./telemetry/dashboard`.
package dashboard

import (
	"encoding/json"
	"fmt"

	"github.com/grafana/grafana-foundation-sdk/go/cog"
	"github.com/grafana/grafana-foundation-sdk/go/common"
	"github.com/grafana/grafana-foundation-sdk/go/dashboard"
	"github.com/grafana/grafana-foundation-sdk/go/prometheus"
	"github.com/grafana/grafana-foundation-sdk/go/stat"
	"github.com/grafana/grafana-foundation-sdk/go/timeseries"
)

//go:generate go run ./gen ../../deploy/grafana/sluice.json

// ds is the dashboard's Prometheus, picked with the datasource variable.
var ds = common.DataSourceRef{Type: cog.ToPtr("prometheus"), Uid: cog.ToPtr("${datasource}")}

// sel narrows every query to the pods picked with the pod variable: the
// node's agent exports every pod's series, each with its pod's uid.
const sel = `pod_uid=~"$pod"`

type query struct{ expr, legend string }

func series(title, unit, description string, queries ...query) *timeseries.PanelBuilder {
	p := timeseries.NewPanelBuilder().Title(title).Unit(unit).Description(description).Datasource(ds).Min(0).Height(8).Span(12)
	for _, q := range queries {
		p.WithTarget(prometheus.NewDataqueryBuilder().Expr(q.expr).LegendFormat(q.legend).Datasource(ds))
	}
	return p
}

func quantiles(metric string) []query {
	var qs []query
	for _, q := range []string{"0.5", "0.9", "0.99"} {
		qs = append(qs, query{
			fmt.Sprintf(`histogram_quantile(%s, sum by (le, direction) (rate(%s_bucket{%s}[$__rate_interval])))`, q, metric, sel),
			"p" + q[2:] + " {{direction}}",
		})
	}
	return qs
}

func rate(metric, by string) string {
	return fmt.Sprintf(`sum by (%s) (rate(%s{%s}[$__rate_interval]))`, by, metric, sel)
}

// Build returns the dashboard.
func Build() (dashboard.Dashboard, error) {
	b := dashboard.NewDashboardBuilder("Sluice: pod traffic").
		Uid("sluice-pod-traffic").
		Description("Per-flow TCP telemetry measured in the kernel by Sluice: connections, bytes, connect latency, RTT, flow duration, top destinations and the health of the capture.").
		Tags([]string{"sluice", "ebpf", "tcp"}).
		Refresh("30s").
		Time("now-1h", "now").
		Timezone(common.TimeZoneBrowser).
		WithVariable(dashboard.NewDatasourceVariableBuilder("datasource").Label("Prometheus").Type("prometheus")).
		WithVariable(dashboard.NewQueryVariableBuilder("pod").Label("Pod (uid)").
			Datasource(ds).
			Query(dashboard.StringOrMap{String: cog.ToPtr("label_values(sluice_up, pod_uid)")}).
			Multi(true).IncludeAll(true).AllValue(".*").Refresh(dashboard.VariableRefreshOnTimeRangeChanged)).
		WithRow(dashboard.NewRowBuilder("Traffic")).
		WithPanel(series("Connections opened", "cps", "New flows per second, outbound (reporter=source) and inbound (reporter=destination).",
			query{rate("sluice_tcp_connections_opened_total", "reporter"), "{{reporter}}"})).
		WithPanel(series("Connections closed", "cps", "Flows closed per second, by how they ended.",
			query{rate("sluice_tcp_connections_ended_total", "direction, end"), "{{direction}} {{end}}"})).
		WithPanel(series("Bytes", "Bps", "Bytes per second the pod sends and receives on its flows, open ones included.",
			query{rate("sluice_tcp_sent_bytes_total", "reporter"), "sent ({{reporter}})"},
			query{rate("sluice_tcp_received_bytes_total", "reporter"), "received ({{reporter}})"})).
		WithPanel(series("Top destinations", "cps", "The ten original destinations with the most new outbound connections.",
			query{fmt.Sprintf(`topk(10, sum by (destination_service) (rate(sluice_tcp_connections_opened_total{reporter="source", %s}[$__rate_interval])))`, sel), "{{destination_service}}"})).
		WithRow(dashboard.NewRowBuilder("Latency")).
		WithPanel(series("Connect latency", "s", "SYN sent to established (outbound), SYN-ACK to its ACK (inbound): the network's, not the sidecar hop's.", quantiles("sluice_tcp_connect_duration_seconds")...)).
		WithPanel(series("Round-trip time", "s", "Smoothed RTT of each flow when it closed.", quantiles("sluice_tcp_rtt_seconds")...)).
		WithPanel(series("Flow duration", "s", "How long flows stay open.", quantiles("sluice_tcp_flow_duration_seconds")...)).
		WithPanel(series("Connect failures", "cps", "Outbound connects that never were established, by reason.",
			query{rate("sluice_tcp_connect_failures_total", "reason"), "{{reason}}"})).
		WithRow(dashboard.NewRowBuilder("Canary routes")).
		WithPanel(series("Effective split", "percentunit", "Each backend's share of a routed service's new connections, as the kernel picked them: compare with the programmed weights.",
			query{fmt.Sprintf(`sum by (service, backend) (rate(sluice_route_picks_total{%[1]s}[$__rate_interval])) / ignoring (backend) group_left sum by (service) (rate(sluice_route_picks_total{%[1]s}[$__rate_interval]))`, sel), "{{service}} -> {{backend}}"})).
		WithPanel(series("Programmed weights and rollouts", "short", "Each backend's weight, the canary's step during 'sluice route rollout', and rollbacks.",
			query{fmt.Sprintf(`sum by (service, backend) (sluice_route_weight{%s})`, sel), "weight {{service}} -> {{backend}}"},
			query{fmt.Sprintf(`max by (service) (sluice_route_rollout_step{%s})`, sel), "rollout step {{service}}"},
			query{fmt.Sprintf(`sum by (service) (increase(sluice_route_rollbacks_total{%s}[$__rate_interval]))`, sel), "rollbacks {{service}}"})).
		WithRow(dashboard.NewRowBuilder("Capture health")).
		WithPanel(stat.NewPanelBuilder().Title("Sidecars up").Datasource(ds).Height(4).Span(6).
			WithTarget(prometheus.NewDataqueryBuilder().Expr(fmt.Sprintf(`sum(sluice_up{%s})`, sel)).Datasource(ds))).
		WithPanel(stat.NewPanelBuilder().Title("Open flows").Datasource(ds).Height(4).Span(6).
			WithTarget(prometheus.NewDataqueryBuilder().Expr(fmt.Sprintf(`sum(sluice_live_flows{%s})`, sel)).Datasource(ds))).
		WithPanel(series("Kernel events", "cps", "Inbound steering, and every connection or flow event the hooks could not serve (ring buffer full, no socket storage, handshake table full): all should stay at 0 but inbound_steered.",
			query{rate("sluice_kernel_events_total", "event"), "{{event}}"})).
		WithPanel(series("Telemetry loss, by pod and reason", "cps", "Flow events that did not make it into the pod's series, and why: the node's ring was full (flow_event_lost_ring_full; the flows are still counted, under destination \"unknown\"), no socket storage for the flow (flow_untracked_no_state), the agent's table of open flows was full (live_table_full: counted at close, missing from /flows), or events of a pod gone before the agent read them (no pod). All should stay at 0.",
			query{fmt.Sprintf(`sum by (pod_uid, event) (rate(sluice_kernel_events_total{event=~"flow_event_lost_ring_full|flow_untracked_no_state", %s}[$__rate_interval]))`, sel), "{{pod_uid}} {{event}}"},
			query{fmt.Sprintf(`sum by (pod_uid) (rate(sluice_flow_live_table_full_total{%s}[$__rate_interval]))`, sel), "{{pod_uid}} live_table_full"},
			query{`sum(rate(sluice_agent_flow_events_unmatched_total[$__rate_interval]))`, "no pod"}))
	return b.Build()
}

// JSON is the dashboard as Grafana imports it.
func JSON() ([]byte, error) {
	d, err := Build()
	if err != nil {
		return nil, err
	}
	out, err := json.MarshalIndent(d, "", "  ")
	if err != nil {
		return nil, err
	}
	return append(out, '\n'), nil
}
