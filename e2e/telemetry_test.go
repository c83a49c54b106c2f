package e2e

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/sluicemesh/sluice/internal/testbed"
	"github.com/sluicemesh/sluice/telemetry"
)

// nsGet fetches url with a connection made inside a network namespace (do
// is Pod.Do or Host.Do). The connection must be dialed on do's thread:
// http.Client would dial from another goroutine, in whatever namespace its
// thread happens to be in.
func nsGet(do func(func() error) error, url string) (int, []byte, error) {
	req, err := http.NewRequest(http.MethodGet, url, nil)
	if err != nil {
		return 0, nil, err
	}
	var conn net.Conn
	if err := do(func() (err error) {
		conn, err = net.DialTimeout("tcp", req.URL.Host, 5*time.Second)
		return err
	}); err != nil {
		return 0, nil, err
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(20 * time.Second))
	req.Close = true
	if err := req.Write(conn); err != nil {
		return 0, nil, err
	}
	resp, err := http.ReadResponse(bufio.NewReader(conn), req)
	if err != nil {
		return 0, nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	return resp.StatusCode, body, err
}

// httpGet is nsGet for a request that must succeed.
func httpGet(t *testing.T, do func(func() error) error, url string) []byte {
	t.Helper()
	status, body, err := nsGet(do, url)
	if err != nil || status != http.StatusOK {
		t.Fatalf("GET %s: %d, %v\n%s", url, status, err, body)
	}
	return body
}

// scrape fetches the node agent's /metrics, which holds the pod's flows,
// as Prometheus would, and parses it.
func (c *capturedPod) scrape(t *testing.T) map[string]*dto.MetricFamily {
	t.Helper()
	from := c.agentFrom
	if from == nil {
		from = here
	}
	return parseMetrics(t, c.agent(t)+"/metrics", httpGet(t, from, c.agent(t)+"/metrics"))
}

// scrapeSidecar fetches the sidecar's own /metrics on port from the host's
// network namespace, and parses it.
func (c *capturedPod) scrapeSidecar(t *testing.T, port uint16) map[string]*dto.MetricFamily {
	t.Helper()
	url := fmt.Sprintf("http://%s/metrics", netip.AddrPortFrom(c.pod.Addr4, port))
	return parseMetrics(t, url, httpGet(t, c.host.Do, url))
}

// here runs f in the test's own network namespace.
func here(f func() error) error { return f() }

func parseMetrics(t *testing.T, url string, body []byte) map[string]*dto.MetricFamily {
	t.Helper()
	parser := expfmt.NewTextParser(model.UTF8Validation)
	families, err := parser.TextToMetricFamilies(strings.NewReader(string(body)))
	if err != nil {
		t.Fatalf("parse %s: %v\n%s", url, err, body)
	}
	return families
}

// sample returns the value of the series of family name whose labels
// include want (0 when there is none).
func sample(families map[string]*dto.MetricFamily, name string, want map[string]string) float64 {
	fam := families[name]
	if fam == nil {
		return 0
	}
	var sum float64
	for _, m := range fam.Metric {
		labels := map[string]string{}
		for _, l := range m.Label {
			labels[l.GetName()] = l.GetValue()
		}
		match := true
		for k, v := range want {
			if labels[k] != v {
				match = false
			}
		}
		if !match {
			continue
		}
		switch {
		case m.Counter != nil:
			sum += m.Counter.GetValue()
		case m.Gauge != nil:
			sum += m.Gauge.GetValue()
		case m.Histogram != nil:
			sum += float64(m.Histogram.GetSampleCount())
		}
	}
	return sum
}

// Connections with known payloads, outbound through the sidecar, inbound
// through it, and direct (an excluded port): scraped over HTTP, the
// opened and closed counters equal their number and the byte counters match
// to the byte. The scrapes themselves (to the sidecar's own port) are no
// flows.
func TestFlowMetricsCountEveryFlow(t *testing.T) {
	c := newCapturedPod(t, "-o", "9090")
	c.startSidecar(t)
	if _, err := c.pod.ListenEcho("[::]:8080"); err != nil {
		t.Fatal(err)
	}
	const n, size = 5, 100_000
	type want struct {
		reporter, service string
		sent, received    float64
	}
	cases := map[string]*want{
		"outbound via sidecar": {reporter: "source", service: netip.AddrPortFrom(c.host.Addr4, 8080).String()},
		"outbound direct":      {reporter: "source", service: netip.AddrPortFrom(c.host.Addr4, 9090).String()},
		"inbound via sidecar":  {reporter: "destination", service: netip.AddrPortFrom(c.pod.Addr4, 8080).String()},
	}
	for range n {
		for name, w := range cases {
			var res testbed.ClientResult
			var err error
			if strings.HasPrefix(name, "inbound") {
				res, err = c.host.RunClient(self(t), w.service, size)
			} else {
				res, err = c.pod.RunClient(self(t), w.service, size)
			}
			if err != nil {
				t.Fatal(err)
			}
			peerLine := float64(len("peer=\n") + len(res.ServerSaw))
			// Seen from the pod's socket on the wire: outbound it sends the
			// payload and gets the server's line and the echo; inbound it
			// gets the payload and sends the app's line and the echo.
			if strings.HasPrefix(name, "inbound") {
				w.sent += size + peerLine
				w.received += size
			} else {
				w.sent += size
				w.received += size + peerLine
			}
		}
	}
	deadline := time.Now().Add(10 * time.Second)
	for name, w := range cases {
		labels := map[string]string{"reporter": w.reporter, "destination_service": w.service, "request_protocol": "tcp"}
		var fams map[string]*dto.MetricFamily
		for {
			fams = c.scrape(t)
			if sample(fams, "sluice_tcp_connections_closed_total", labels) >= n || time.Now().After(deadline) {
				break
			}
			time.Sleep(50 * time.Millisecond)
		}
		for metric, want := range map[string]float64{
			"sluice_tcp_connections_opened_total": n,
			"sluice_tcp_connections_closed_total": n,
			"sluice_tcp_sent_bytes_total":         w.sent,
			"sluice_tcp_received_bytes_total":     w.received,
		} {
			if got := sample(fams, metric, labels); got != want {
				t.Errorf("%s: %s = %v, want %v", name, metric, got, want)
			}
		}
	}
	fams := c.scrape(t)
	if got := sample(fams, "sluice_tcp_connections_opened_total", nil); got != 3*n {
		t.Errorf("%v flows opened in all, want %d (the scrapes must not count)", got, 3*n)
	}
	for _, dir := range []string{"outbound", "inbound"} {
		if got := sample(fams, "sluice_tcp_connect_duration_seconds", map[string]string{"direction": dir}); got == 0 {
			t.Errorf("no %s connect latency observed", dir)
		}
	}
	if got := sample(fams, "sluice_kernel_events_total", map[string]string{"event": "flow_event_lost_ring_full"}); got != 0 {
		t.Errorf("%v flow events lost", got)
	}
}

// bucket is the cumulative count of the histogram series of family name
// with the labels want, at upper bound le.
func bucket(t *testing.T, families map[string]*dto.MetricFamily, name string, want map[string]string, le float64) uint64 {
	t.Helper()
	for _, m := range families[name].GetMetric() {
		match := true
		for _, l := range m.Label {
			if v, ok := want[l.GetName()]; ok && v != l.GetValue() {
				match = false
			}
		}
		if !match || m.Histogram == nil {
			continue
		}
		for _, b := range m.Histogram.Bucket {
			if b.GetUpperBound() == le {
				return b.GetCumulativeCount()
			}
		}
	}
	t.Fatalf("%s%v has no bucket le=%v", name, want, le)
	return 0
}

// A host behind a 20 ms delay link (40 ms round trip): its flows' connect
// latency and RTT land in the buckets above 25 ms, a host with no delay in
// the ones below 5 ms, outbound through the sidecar and inbound.
func TestLatencyLandsInTheRightBuckets(t *testing.T) {
	c := newCapturedPod(t)
	far, err := c.bed.AddDelayedHost("far", 20*time.Millisecond)
	if err != nil {
		t.Fatal(err)
	}
	c.startSidecar(t)
	if _, err := c.pod.ListenEcho("[::]:8080"); err != nil {
		t.Fatal(err)
	}
	farAddr := netip.AddrPortFrom(far.Addr4, 8080).String()
	if _, err := far.ListenEcho(farAddr); err != nil {
		t.Fatal(err)
	}
	in := netip.AddrPortFrom(c.pod.Addr4, 8080).String()
	for _, run := range []func() (testbed.ClientResult, error){
		func() (testbed.ClientResult, error) {
			return c.pod.RunClient(self(t), netip.AddrPortFrom(c.host.Addr4, 8080).String(), 1<<20)
		},
		func() (testbed.ClientResult, error) { return c.pod.RunClient(self(t), farAddr, 1<<20) },
		func() (testbed.ClientResult, error) { return c.host.RunClient(self(t), in, 1<<20) },
		func() (testbed.ClientResult, error) { return far.RunClient(self(t), in, 1<<20) },
	} {
		if _, err := run(); err != nil {
			t.Fatal(err)
		}
	}
	var fams map[string]*dto.MetricFamily
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		fams = c.scrape(t)
		if sample(fams, "sluice_tcp_rtt_seconds", nil) >= 4 || time.Now().After(deadline) {
			break
		}
	}
	for _, dir := range []string{"outbound", "inbound"} {
		labels := map[string]string{"direction": dir}
		for _, name := range []string{"sluice_tcp_connect_duration_seconds", "sluice_tcp_rtt_seconds"} {
			fast, below, all := bucket(t, fams, name, labels, 0.005), bucket(t, fams, name, labels, 0.025), bucket(t, fams, name, labels, 0.25)
			if fast != 1 || below != 1 || all != 2 {
				t.Errorf("%s{direction=%q}: %d observations at most 5 ms, %d at most 25 ms, %d at most 250 ms; want 1, 1, 2", name, dir, fast, below, all)
			}
		}
	}
}

// flowsCmd is `sluice flows ARGS` for the pod, asking the node's agent, as
// `kubectl exec` into the agent's pod would.
func (c *capturedPod) flowsCmd(t *testing.T, args ...string) *exec.Cmd {
	t.Helper()
	return sluice(t, append([]string{"flows", "--addr", c.agent(t), "--pod", c.cgroup}, args...)...)
}

// flowsCLI runs flowsCmd and returns what it printed.
func (c *capturedPod) flowsCLI(t *testing.T, args ...string) string {
	t.Helper()
	cmd := c.flowsCmd(t, args...)
	var out, errOut strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &errOut
	if err := cmd.Run(); err != nil {
		t.Fatalf("sluice flows %v: %v\n%s", args, err, errOut.String())
	}
	return out.String()
}

// A connection held open shows in `sluice flows` while it lasts, with byte
// counts that grow as it carries more; `--follow` prints it as it closes.
func TestFlowsShowALongLivedFlow(t *testing.T) {
	c := newCapturedPod(t)
	c.startSidecar(t)
	addr := netip.AddrPortFrom(c.host.Addr4, 8080).String()
	h := startHold(t, c.pod, addr, 1)
	// Events reach the agent within 100 ms (it is not woken for each).
	find := func() telemetry.Flow {
		t.Helper()
		var flows []telemetry.Flow
		for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
			flows = nil
			if err := json.Unmarshal([]byte(c.flowsCLI(t, "--json")), &flows); err != nil {
				t.Fatal(err)
			}
			for _, f := range flows {
				if f.Destination.String() == addr {
					return f
				}
			}
		}
		t.Fatalf("no open flow to %s in %v", addr, flows)
		return telemetry.Flow{}
	}
	first := find()
	if first.Direction != "outbound" || !first.ViaSidecar || first.State != "open" || first.OriginalDst.String() != addr {
		t.Errorf("flow %+v: want outbound, through the sidecar, open, original destination %s", first, addr)
	}
	h.exchange(t, strings.Repeat("x", 100_000))
	second := find()
	if second.Cookie != first.Cookie || second.BytesSent < first.BytesSent+100_000 || second.BytesReceived < first.BytesReceived+100_000 {
		t.Errorf("bytes did not grow with the flow: %d/%d then %d/%d", first.BytesSent, first.BytesReceived, second.BytesSent, second.BytesReceived)
	}
	if table := c.flowsCLI(t); !strings.Contains(table, addr) || !strings.Contains(table, "DIRECTION") {
		t.Errorf("the table lacks the flow:\n%s", table)
	}
	// --watch redraws until interrupted, then exits 0.
	watch := c.flowsCmd(t, "--watch", "--interval", "100ms")
	var screen strings.Builder
	watch.Stdout = &screen
	if err := watch.Start(); err != nil {
		t.Fatal(err)
	}
	time.Sleep(500 * time.Millisecond)
	watch.Process.Signal(os.Interrupt)
	if err := watch.Wait(); err != nil || strings.Count(screen.String(), "\033[H\033[2J") < 2 || !strings.Contains(screen.String(), addr) {
		t.Errorf("flows --watch: %v, %d redraws:\n%q", err, strings.Count(screen.String(), "\033[H\033[2J"), screen.String())
	}

	follow := c.flowsCmd(t, "--follow", "--json")
	stdout, err := follow.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := follow.Start(); err != nil {
		t.Fatal(err)
	}
	defer follow.Process.Kill()
	deadline := time.AfterFunc(20*time.Second, func() { follow.Process.Kill() })
	defer deadline.Stop()
	lines := bufio.NewScanner(stdout)
	for sample(c.scrape(t), "sluice_flow_followers", nil) != 1 {
		time.Sleep(20 * time.Millisecond)
	}
	h.in.Close()
	h.cmd.Wait()
	for lines.Scan() {
		var f telemetry.Flow
		if err := json.Unmarshal(lines.Bytes(), &f); err != nil {
			t.Fatal(err)
		}
		if f.Cookie == first.Cookie {
			if f.State != "closed" || f.End != "fin" || f.BytesSent < second.BytesSent {
				t.Errorf("followed close: %+v", f)
			}
			return
		}
	}
	t.Fatal("--follow never printed the flow's close")
}
