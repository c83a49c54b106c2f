package plant

import (
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/sluicemesh/sluice/loader"
	"github.com/sluicemesh/sluice/podstate"
	"github.com/sluicemesh/sluice/rollout"
	"github.com/sluicemesh/sluice/telemetry"
)

// events are hand-made flow events of a pod with no kernel counters.
type events []podstate.FlowEvent

func (e *events) Counters() (map[string]uint64, error) { return nil, nil }

// outbound is an event of the pod's outbound flow to dst.
func outbound(cookie uint64, kind podstate.FlowKind, dst string, connectUs uint32) podstate.FlowEvent {
	d := netip.MustParseAddrPort(dst)
	return podstate.FlowEvent{
		Cookie: cookie, Kind: kind, ViaSidecar: true,
		Local:  netip.AddrPortFrom(netip.MustParseAddr("198.18.1.2"), 40000+uint16(cookie)),
		Remote: d, OriginalDst: d,
		ConnectLatency: time.Duration(connectUs) * time.Microsecond, StartNs: 1, EndNs: 2, End: podstate.EndRefused,
	}
}

// Measure reads what the agent serves on /metrics for the pod: the two
// backends' established connects and latency, and their failed connects;
// the destinations folded into "other" are no backend, and another pod's
// series, to the same destinations, are not the pod's.
func TestMeasureReadsThePodsMetrics(t *testing.T) {
	stable, canary := "198.18.2.2:8080", "198.18.3.2:8080"
	src := events{
		outbound(1, podstate.FlowOpened, stable, 1000),
		outbound(2, podstate.FlowOpened, stable, 3000),
		outbound(3, podstate.FlowOpened, canary, 5000),
		outbound(4, podstate.FlowConnectFailed, canary, 0),
		outbound(5, podstate.FlowConnectFailed, canary, 0),
		outbound(6, podstate.FlowOpened, "198.18.9.9:80", 7000), // folds into "other"
	}
	pod := telemetry.NewExporter(&src, telemetry.Options{MaxDestinations: 2, ConstLabels: prometheus.Labels{telemetry.LabelPodCgroup: "/pod-a"}})
	other := events{outbound(1, podstate.FlowOpened, canary, 9000), outbound(2, podstate.FlowConnectFailed, stable, 0)}
	otherPod := telemetry.NewExporter(&other, telemetry.Options{ConstLabels: prometheus.Labels{telemetry.LabelPodCgroup: "/pod-b"}})
	for e, evs := range map[*telemetry.Exporter]events{pod: src, otherPod: other} {
		for _, ev := range evs {
			e.Handle(ev)
		}
	}
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(prometheus.Gatherers{pod.Registry(), otherPod.Registry()}, promhttp.HandlerOpts{}))
	srv := httptest.NewServer(mux)
	defer srv.Close()

	got, err := New(loader.Target{Cgroup: "/pod-a"}, netip.AddrPort{}, netip.AddrPort{}, srv.URL).Measure()
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]rollout.Sample{
		stable: {Established: 2, LatencySum: 0.004},
		canary: {Established: 1, LatencySum: 0.005, Failed: 2},
	}
	if len(got) != len(want) {
		t.Fatalf("Measure = %v, want %v", got, want)
	}
	for ap, w := range want {
		g := got[ap]
		if g.Established != w.Established || g.Failed != w.Failed || abs(g.LatencySum-w.LatencySum) > 1e-9 {
			t.Errorf("%s: %+v, want %+v", ap, g, w)
		}
	}
}

func TestMeasureSaysWhereTheAgentIsNot(t *testing.T) {
	srv := httptest.NewServer(nil)
	url := srv.URL
	srv.Close()
	_, err := New(loader.Target{}, netip.AddrPort{}, netip.AddrPort{}, url).Measure()
	if err == nil || !strings.Contains(err.Error(), "is 'sluice agent' running there?") {
		t.Fatalf("Measure with no agent = %v, want the hint", err)
	}
}

func TestParseSamplesRefusesWhatIsNoMetricsPage(t *testing.T) {
	if _, err := parseSamples(strings.NewReader("<html>not metrics</html>\n"), "/pod"); err == nil {
		t.Fatal("parsed an HTML page as metrics")
	}
	got, err := parseSamples(strings.NewReader(""), "/pod")
	if err != nil || len(got) != 0 {
		t.Fatalf("an empty page = %v, %v; want no samples", got, err)
	}
}

func abs(f float64) float64 {
	if f < 0 {
		return -f
	}
	return f
}
