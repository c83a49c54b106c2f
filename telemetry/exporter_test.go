package telemetry

import (
	"fmt"
	"net/netip"
	"testing"

	dto "github.com/prometheus/client_model/go"

	"github.com/sluicemesh/sluice/podstate"
	"github.com/sluicemesh/sluice/redirect"
)

// events is a Source of kernel counters, with hand-made events for run.
type events struct {
	queue []podstate.FlowEvent
	lost  map[string]uint64
}

func (e *events) Counters() (map[string]uint64, error) { return e.lost, nil }

// event makes a flow event of an outbound flow from the pod to dst.
func event(cookie uint64, kind podstate.FlowKind, dst string, sent, received uint64) podstate.FlowEvent {
	d := netip.MustParseAddrPort(dst)
	return podstate.FlowEvent{
		Cookie: cookie, Kind: kind, ViaSidecar: true,
		Local: netip.MustParseAddrPort("198.18.1.2:40000"), Remote: d, OriginalDst: d,
		BytesSent: sent, BytesReceived: received, StartNs: 1, EndNs: 2, End: podstate.EndFin,
	}
}

// counter reads a layer-4 counter of the series for destination service.
func counter(t *testing.T, e *Exporter, name, service string) float64 {
	t.Helper()
	fams, err := e.Registry().Gather()
	if err != nil {
		t.Fatal(err)
	}
	var sum float64
	for _, f := range fams {
		if f.GetName() != name {
			continue
		}
		for _, m := range f.Metric {
			if labelOf(m, "destination_service") == service {
				sum += m.GetCounter().GetValue()
			}
		}
	}
	return sum
}

func labelOf(m *dto.Metric, name string) string {
	for _, l := range m.Label {
		if l.GetName() == name {
			return l.GetValue()
		}
	}
	return ""
}

// run hands e the events its source holds, as the agent does from the
// node's ring.
func run(t *testing.T, e *Exporter) {
	t.Helper()
	src := e.source.(*events)
	for _, ev := range src.queue {
		e.Handle(ev)
	}
	src.queue = nil
}

// expectCounters checks layer-4 counters of the series for service.
func expectCounters(t *testing.T, e *Exporter, service string, want map[string]float64) {
	t.Helper()
	for name, w := range want {
		if got := counter(t, e, name, service); got != w {
			t.Errorf("%s = %v, want %v", name, got, w)
		}
	}
}

func TestExporterCountsFlows(t *testing.T) {
	const a = "198.18.2.2:8080"
	src := &events{queue: []podstate.FlowEvent{
		event(1, podstate.FlowOpened, a, 0, 0),
		event(1, podstate.FlowClosed, a, 100, 200),
		// Opened before the exporter started: its close still counts
		// as one opened and one closed.
		event(2, podstate.FlowClosed, a, 10, 20),
		event(3, podstate.FlowConnectFailed, a, 0, 0),
	}}
	e := NewExporter(src, Options{})
	run(t, e)
	expectCounters(t, e, a, map[string]float64{
		"sluice_tcp_connections_opened_total": 2,
		"sluice_tcp_connections_closed_total": 2,
		"sluice_tcp_sent_bytes_total":         110,
		"sluice_tcp_received_bytes_total":     220,
	})
	if live, _ := e.Live(); len(live) != 0 {
		t.Errorf("%d live flows left, want 0", len(live))
	}
}

// The table of open flows is bounded: a flow opened while it is full is
// counted as such and left out, and its close still counts it, opened and
// closed, so the layer-4 counters stay exact.
func TestLiveFlowsAreBounded(t *testing.T) {
	const a = "198.18.2.2:8080"
	src := &events{queue: []podstate.FlowEvent{
		event(1, podstate.FlowOpened, a, 0, 0),
		event(2, podstate.FlowOpened, a, 0, 0),
		event(3, podstate.FlowOpened, a, 0, 0),
	}}
	e := NewExporter(src, Options{MaxLiveFlows: 2})
	run(t, e)
	var m dto.Metric
	if e.liveFull.Write(&m); len(e.live) != 2 || m.GetCounter().GetValue() != 1 {
		t.Fatalf("%d flows kept open, %v counted as a full table; want 2 and 1", len(e.live), m.GetCounter().GetValue())
	}
	src.queue = []podstate.FlowEvent{
		event(1, podstate.FlowClosed, a, 1, 1),
		event(2, podstate.FlowClosed, a, 1, 1),
		event(3, podstate.FlowClosed, a, 1, 1),
	}
	run(t, e)
	expectCounters(t, e, a, map[string]float64{
		"sluice_tcp_connections_opened_total": 3,
		"sluice_tcp_connections_closed_total": 3,
		"sluice_tcp_sent_bytes_total":         3,
	})
	if len(e.live) != 0 {
		t.Errorf("%d flows still open, want 0", len(e.live))
	}
}

// A flow whose socket is gone without a close event (the ring buffer was
// full) leaves the live flows, keeping the bytes seen so far; the kernel's
// lost-close counters count it closed, under destination "unknown".
func TestExporterReapsFlowsWhoseCloseWasLost(t *testing.T) {
	const a = "198.18.2.2:8080"
	src := &events{queue: []podstate.FlowEvent{event(7, podstate.FlowOpened, a, 0, 0)}}
	e := NewExporter(src, Options{})
	e.reapAfter = 0
	run(t, e)
	e.live[7].BytesSent = 42 // as sock_diag last saw it
	if live, _ := e.Live(); len(live) != 1 {
		t.Fatalf("want the flow live before its socket is seen missing, got %d", len(live))
	}
	if live, _ := e.Live(); len(live) != 0 {
		t.Fatalf("a flow with no socket is still live")
	}
	if got := counter(t, e, "sluice_tcp_sent_bytes_total", a); got != 42 {
		t.Errorf("sent = %v, want the 42 bytes seen", got)
	}
	src.lost = map[string]uint64{"flow_close_lost_outbound": 1}
	if got := counter(t, e, "sluice_tcp_connections_closed_total", "unknown"); got != 1 {
		t.Errorf("closed under unknown = %v, want 1", got)
	}
	if got := counter(t, e, "sluice_tcp_connections_closed_total", a); got != 0 {
		t.Errorf("closed under %s = %v, want 0", a, got)
	}
}

// Destinations beyond the limit share the series "other".
func TestDestinationsFoldIntoOther(t *testing.T) {
	src := &events{}
	for i, dst := range []string{"198.18.2.2:80", "198.18.2.3:80", "198.18.2.4:80", "198.18.2.2:80"} {
		src.queue = append(src.queue, event(uint64(i), podstate.FlowClosed, dst, 1, 1))
	}
	e := NewExporter(src, Options{MaxDestinations: 2})
	run(t, e)
	for service, want := range map[string]float64{"198.18.2.2:80": 2, "198.18.2.3:80": 1, "other": 1} {
		if got := counter(t, e, "sluice_tcp_connections_closed_total", service); got != want {
			t.Errorf("%s: %v closed, want %v", service, got, want)
		}
	}
}

// Istio's metric names when asked for; every Istio label is set, unknown
// ones to "unknown".
func TestIstioNamesAndLabels(t *testing.T) {
	src := &events{queue: []podstate.FlowEvent{event(1, podstate.FlowClosed, "198.18.2.2:80", 1, 1)}}
	e := NewExporter(src, Options{IstioNames: true, Identity: Identity{Workload: "w", Namespace: "ns"}})
	run(t, e)
	fams, err := e.Registry().Gather()
	if err != nil {
		t.Fatal(err)
	}
	found := false
	for _, f := range fams {
		if f.GetName() != "istio_tcp_connections_closed_total" {
			continue
		}
		found = true
		m := f.Metric[0]
		for _, l := range istioLabels {
			if labelOf(m, l) == "" {
				t.Errorf("label %s missing or empty", l)
			}
		}
		if labelOf(m, "source_workload") != "w" || labelOf(m, "destination_workload") != "unknown" || labelOf(m, "reporter") != "source" {
			t.Errorf("labels %v", m.Label)
		}
	}
	if !found {
		t.Error("no istio_tcp_connections_closed_total")
	}
}

// A route's backends keep their per-destination connect series whatever
// came first: after MaxDestinations other destinations (a port scan), and
// for kernel-only flows, whose original destination is the route's service
// while the socket's remote end is the backend the kernel picked.
func TestRouteBackendsKeepTheirSeries(t *testing.T) {
	svc, stable, canary := "198.19.0.10:80", "198.18.2.2:8080", "198.18.3.2:8080"
	src := &events{}
	for i := range 120 {
		src.queue = append(src.queue, event(uint64(i+1), podstate.FlowConnectFailed, fmt.Sprintf("198.18.9.9:%d", 1000+i), 0, 0))
	}
	// Kernel-only: remote is the pick, orig the service.
	viaKernel := func(cookie uint64, kind podstate.FlowKind, backend string) podstate.FlowEvent {
		ev := event(cookie, kind, backend, 0, 0)
		ev.ViaSidecar, ev.KernelOnly = false, true
		ev.OriginalDst = netip.MustParseAddrPort(svc)
		return ev
	}
	src.queue = append(src.queue, viaKernel(1001, podstate.FlowOpened, stable),
		viaKernel(1002, podstate.FlowConnectFailed, canary), viaKernel(1003, podstate.FlowConnectFailed, canary))
	route := podstate.RouteState{Route: redirect.Route{Service: netip.MustParseAddrPort(svc), Backends: []redirect.Backend{
		{Address: netip.MustParseAddr("198.18.2.2"), Port: 8080, Weight: 50}, {Address: netip.MustParseAddr("198.18.3.2"), Port: 8080, Weight: 50}}},
		Picks: []uint64{1, 2}}
	e := NewExporter(src, Options{Routes: func() ([]podstate.RouteState, error) { return []podstate.RouteState{route}, nil }})
	run(t, e)
	if got := counter(t, e, "sluice_tcp_destination_connect_failures_total", canary); got != 2 {
		t.Errorf("connect failures of the canary %s: %v, want 2", canary, got)
	}
	if got := counter(t, e, "sluice_tcp_destination_connect_failures_total", "other"); got != 20 {
		t.Errorf("connect failures folded into other: %v, want the 20 scanned ports beyond 100", got)
	}
	fams, err := e.Registry().Gather()
	if err != nil {
		t.Fatal(err)
	}
	var established uint64
	for _, f := range fams {
		for _, m := range f.Metric {
			if f.GetName() == "sluice_tcp_destination_connect_duration_seconds" && labelOf(m, "destination_service") == stable {
				established += m.GetSummary().GetSampleCount()
			}
		}
	}
	if established != 1 {
		t.Errorf("established connects to the stable backend %s: %d, want 1", stable, established)
	}
	if got := counter(t, e, "sluice_tcp_connections_opened_total", svc); got != 1 {
		t.Errorf("layer-4 opened for the service %s: %v, want 1 (kernel-only flows count under the service asked for)", svc, got)
	}
}

// With Options.Peers, a flow's other end is named: outbound, the backend
// dialed is the destination workload; inbound, the client is the source
// workload; the outside world stays "unknown". Peers beyond MaxDestinations
// count as unknown, so the series stay bounded.
func TestPeersNameTheOtherEnd(t *testing.T) {
	cluster := map[netip.Addr]Identity{
		netip.MustParseAddr("198.18.5.2"): {Workload: "web-v2", Namespace: "shop", App: "web", Version: "v2"},
		netip.MustParseAddr("198.18.6.1"): {Workload: "client", Namespace: "shop"},
		netip.MustParseAddr("198.18.6.2"): {Workload: "other", Namespace: "shop"},
	}
	inbound := event(3, podstate.FlowClosed, "198.18.1.2:8080", 5, 5)
	inbound.Inbound, inbound.Remote = true, netip.MustParseAddrPort("198.18.6.1:41000")
	late := inbound
	late.Cookie, late.Remote = 4, netip.MustParseAddrPort("198.18.6.2:41000")
	src := &events{queue: []podstate.FlowEvent{
		event(1, podstate.FlowClosed, "198.18.5.2:8080", 7, 7),
		event(2, podstate.FlowClosed, "203.0.113.9:443", 1, 1),
		inbound, late,
	}}
	e := NewExporter(src, Options{Identity: Identity{Workload: "me", Namespace: "shop"}, MaxDestinations: 2,
		Peers: func(a netip.Addr) (Identity, bool) { id, ok := cluster[a]; return id, ok }})
	run(t, e)
	fams, err := e.Registry().Gather()
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]float64{}
	for _, f := range fams {
		if f.GetName() != "sluice_tcp_sent_bytes_total" {
			continue
		}
		for _, m := range f.Metric {
			got[fmt.Sprintf("%s %s/%s -> %s/%s %s", labelOf(m, "reporter"), labelOf(m, "source_workload_namespace"), labelOf(m, "source_workload"),
				labelOf(m, "destination_workload_namespace"), labelOf(m, "destination_workload"), labelOf(m, "destination_version"))] += m.GetCounter().GetValue()
		}
	}
	want := map[string]float64{
		"source shop/me -> shop/web-v2 v2":               7,
		"source shop/me -> unknown/unknown unknown":      1,
		"destination shop/client -> shop/me unknown":     5,
		"destination unknown/unknown -> shop/me unknown": 5, // the third peer, past the bound
	}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("series %v, want %v", got, want)
	}
}

// Named peers do not lift the bound on the layer-4 series: past
// 2·(MaxDestinations+2) series in all, a new (destination, peer) pair
// counts with the peer unknown.
func TestPeerSeriesAreBounded(t *testing.T) {
	var queue []podstate.FlowEvent
	for port := range 5 { // 3 destinations and "other"
		for peer := range 3 { // 3 named peers
			ev := event(uint64(10*port+peer+1), podstate.FlowClosed, fmt.Sprintf("198.18.1.2:%d", 8080+port), 1, 1)
			ev.Inbound, ev.Remote = true, netip.AddrPortFrom(netip.AddrFrom4([4]byte{198, 18, 7, byte(peer + 1)}), 40000)
			queue = append(queue, ev)
		}
	}
	e := NewExporter(&events{queue: queue}, Options{MaxDestinations: 3,
		Peers: func(a netip.Addr) (Identity, bool) { return Identity{Workload: a.String(), Namespace: "shop"}, true }})
	run(t, e)
	// 4 destinations × 3 peers would be 12 series with a peer named: the
	// cap is 2·(3+2); the rest count with the peer unknown.
	named := 0
	for k := range e.totals {
		if k.peer != nil {
			named++
		}
	}
	if named != 10 || len(e.totals) > 2*10 {
		t.Errorf("%d layer-4 series, %d with a peer named; want 10 named, at most 20 in all", len(e.totals), named)
	}
	var closed float64
	for _, s := range []string{"198.18.1.2:8080", "198.18.1.2:8081", "198.18.1.2:8082", "other"} {
		closed += counter(t, e, "sluice_tcp_connections_closed_total", s)
	}
	if closed != 15 {
		t.Errorf("closed %v, want all 15 counted", closed)
	}
}
