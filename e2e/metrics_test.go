package e2e

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sluicemesh/sluice/telemetry"
)

// Every port the sidecar must own is the proxy identity's alone: the
// metrics port (15090, and the one install is given), Istio's health ports,
// besides the capture ports. A process in the pod that took the metrics
// port while the sidecar restarted held it against every restart after.
func TestSidecarPortsReservedForProxy(t *testing.T) {
	c := newCapturedPod(t, "--metrics-port", "9099")
	reserved := []string{"0.0.0.0:15090", "[::]:15090", "127.0.0.1:15020", "[::]:15021", "0.0.0.0:9099", "[::1]:9099"}
	const ordinary = "0.0.0.0:9098"
	var bound map[string]string
	if err := runHelper(t, c.pod, helper(t, "bind", append(reserved, ordinary)...), 1000, &bound); err != nil {
		t.Fatal(err)
	}
	for _, addr := range reserved {
		if !strings.Contains(bound[addr], "operation not permitted") {
			t.Errorf("uid 1000 binding the sidecar's %s: %q, want operation not permitted", addr, bound[addr])
		}
	}
	if bound[ordinary] != "" {
		t.Errorf("uid 1000 binding an ordinary port %s: %s", ordinary, bound[ordinary])
	}
	if err := runHelper(t, c.pod, helper(t, "bind", reserved...), 1337, &bound); err != nil {
		t.Fatal(err)
	}
	for addr, err := range bound {
		if err != "" {
			t.Errorf("the proxy uid binding %s: %s", addr, err)
		}
	}
}

// A metrics port the sidecar cannot bind does not take the proxy down: it
// says at start that the port is not reserved, proxies captured connections
// while it logs why it has no metrics, and serves them once the port is
// free, counting the failures. It used to exit 1 at every restart.
func TestMetricsPortTakenKeepsProxying(t *testing.T) {
	c := newCapturedPod(t)
	// An app process: install reserved 15090, not 9099.
	squatter, err := listenInPodAs(t, c.pod, "0.0.0.0:9099", 1000)
	if err != nil {
		t.Fatal(err)
	}
	c.startSidecar(t, "--metrics-addr", ":9099")
	warn, err := c.sidecar.WaitFor("metrics port not reserved for the proxy by the install: any process in the pod may take it first", nil, 5*time.Second)
	if err != nil {
		t.Error(err)
	} else if warn.Num("metrics_port") != 9099 || !strings.Contains(warn.Str("fix"), "--metrics-port 9099") {
		t.Errorf("warning %v: want it to name port 9099 and install's --metrics-port", warn)
	}
	failed, err := c.sidecar.WaitFor("cannot listen for metrics: proxying goes on without /metrics, retrying", nil, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if failed.Str("level") != "ERROR" || failed.Str("metrics_addr") != ":9099" || !strings.Contains(failed.Str("err"), "address already in use") {
		t.Errorf("metrics failure logged as %v: want an error naming :9099 and why", failed)
	}
	addr := netip.AddrPortFrom(c.host.Addr4, 8080).String()
	c.expectProxied(t, c.client(t, addr), addr)

	squatter.Process.Kill()
	squatter.Wait()
	if _, err := c.sidecar.WaitFor("metrics listening", nil, 10*time.Second); err != nil {
		t.Fatal(err)
	}
	if n := sample(c.scrapeSidecar(t, 9099), "sluice_metrics_listen_failures_total", nil); n < 1 {
		t.Errorf("sluice_metrics_listen_failures_total = %v after a failed bind, want at least 1", n)
	}
}

// Following a pod's flows holds the agent's memory, so it is bounded: at
// most 16 clients a pod, each with a bounded buffer; the next gets a 503
// saying why, and a follower that reads nothing is disconnected and counted
// while flows keep reaching the ones that read. Before, every follower got
// a 256 KiB buffer and nothing bounded how many: about 1,100 of them
// OOM-killed the sidecar that served them then.
func TestFlowFollowersBounded(t *testing.T) {
	c := newCapturedPod(t)
	c.startSidecar(t)
	// The agent runs in the node's namespace and the followers come from
	// the remote host, over a link of 1,500-byte packets: on loopback the
	// agent's send buffer takes megabytes of a follower that reads
	// nothing before a write blocks.
	a := c.host.Addr4.As4()
	c.agentURL = startAgentWith(t, c.bed.StartInNode, "--metrics-addr", netip.AddrFrom4([4]byte{a[0], a[1], a[2], 1}).String()+":0")
	c.agentFrom = c.host.Do
	url := c.agentURL + "/flows?follow=true"
	// A follower that never reads, with a small receive window so the
	// agent's writes to it soon block.
	stuck, _ := follow(t, c.host.Do, url, 4096)
	// One follower that reads, and 14 more that drain what they get.
	_, watched := follow(t, c.host.Do, url, 0)
	events := make(chan telemetry.Flow, 4096)
	go func() {
		for sc := bufio.NewScanner(watched); sc.Scan(); {
			var f telemetry.Flow
			if json.Unmarshal(sc.Bytes(), &f) == nil {
				select {
				case events <- f:
				default:
				}
			}
		}
	}()
	for range 14 {
		_, body := follow(t, c.host.Do, url, 0)
		go io.Copy(io.Discard, body)
	}
	waitForSample(t, c, "sluice_flow_followers", 16)

	conn, resp := openFollow(t, c.host.Do, url, 0)
	conn.SetReadDeadline(time.Now().Add(5 * time.Second)) // a stream never ends
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
	if resp.StatusCode != http.StatusServiceUnavailable || !strings.Contains(string(body), "16 clients already follow") || strings.Count(strings.TrimSpace(string(body)), "\n") > 0 {
		t.Errorf("a 17th follower got %s %q, want 503 and one line saying 16 follow", resp.Status, body)
	}

	// Flows until the agent's writes to the stuck follower have blocked
	// for its timeout (5 s): its socket buffers and its buffer in the
	// agent fill up first. 200 flow events a round, 10 rounds at most
	// (about 2 MB of JSON), each followed by a second's wait.
	addr := netip.AddrPortFrom(c.host.Addr4, 8080).String()
	for round := 0; !sampleWithin(t, c, "sluice_flow_followers_evicted_total", 1, time.Second); round++ {
		if round == 10 {
			t.Fatalf("the follower that reads nothing was never evicted: %v followers", sample(c.scrape(t), "sluice_flow_followers", nil))
		}
		var res churnResult
		if err := runHelper(t, c.pod, helper(t, "churn", "100", "4", addr), -1, &res); err != nil || res.Failed > 0 {
			t.Fatalf("churn through the sidecar: %v %+v", err, res)
		}
	}
	if n := sample(c.scrape(t), "sluice_flow_followers", nil); n != 15 {
		t.Errorf("%v followers after the eviction, want the 15 that read", n)
	}
	// The agent closed the stuck follower's stream: what it sent ends.
	stuck.SetReadDeadline(time.Now().Add(20 * time.Second))
	if _, err := io.Copy(io.Discard, stuck); err != nil {
		t.Errorf("the evicted follower's stream did not end: %v", err)
	}

	// The followers that read still get every new flow.
	res := c.client(t, addr)
	for deadline := time.After(20 * time.Second); ; {
		select {
		case f := <-events:
			if f.State == telemetry.StateClosed && f.Source.String() == res.ServerSaw {
				return
			}
		case <-deadline:
			t.Fatalf("a reading follower never got the close of the flow from %s", res.ServerSaw)
		}
	}
}

// follow starts following url from the network namespace do runs in, with
// a receive buffer of rcvbuf bytes (0: the default), and returns the
// connection and the response body (chunked, decoded).
func follow(t *testing.T, do func(func() error) error, url string, rcvbuf int) (net.Conn, io.Reader) {
	t.Helper()
	conn, resp := openFollow(t, do, url, rcvbuf)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("follow %s: %s", url, resp.Status)
	}
	return conn, resp.Body
}

// openFollow asks to follow url and reads the response's header.
func openFollow(t *testing.T, do func(func() error) error, url string, rcvbuf int) (net.Conn, *http.Response) {
	t.Helper()
	req, err := http.NewRequest(http.MethodGet, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	d := net.Dialer{Timeout: 5 * time.Second, Control: func(_, _ string, raw syscall.RawConn) error {
		if rcvbuf == 0 {
			return nil
		}
		var serr error
		raw.Control(func(fd uintptr) { serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUF, rcvbuf) })
		return serr
	}}
	var conn net.Conn
	if err := do(func() (err error) {
		conn, err = d.Dial("tcp", req.URL.Host)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	if err := req.Write(conn); err != nil {
		t.Fatal(err)
	}
	conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	resp, err := http.ReadResponse(bufio.NewReader(conn), req)
	if err != nil {
		t.Fatalf("follow %s: %v", url, err)
	}
	conn.SetReadDeadline(time.Time{})
	return conn, resp
}

// waitForSample waits until the agent's metric name (all series summed)
// is want.
func waitForSample(t *testing.T, c *capturedPod, name string, want float64) {
	t.Helper()
	if !sampleWithin(t, c, name, want, 10*time.Second) {
		t.Fatalf("%s = %v, want %v", name, sample(c.scrape(t), name, nil), want)
	}
}

// sampleWithin reports whether the agent's metric name (all series
// summed) is want within d.
func sampleWithin(t *testing.T, c *capturedPod, name string, want float64, d time.Duration) bool {
	t.Helper()
	for deadline := time.Now().Add(d); ; time.Sleep(50 * time.Millisecond) {
		if sample(c.scrape(t), name, nil) == want {
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
	}
}

// The kubelet's probes on the sidecar's metrics port: /healthz while it
// serves, /ready while the pod's capture answers too, not once capture is
// uninstalled under it. The sidecar runs 2 event loops with no CPU limit
// and no --concurrency (never one a node CPU), --concurrency's otherwise.
func TestSidecarProbesAndLoops(t *testing.T) {
	c := newCapturedPod(t)
	c.startSidecar(t, "--metrics-addr", ":15090")
	get := func(path string) int {
		t.Helper()
		status, body, err := nsGet(c.host.Do, fmt.Sprintf("http://%s%s", netip.AddrPortFrom(c.pod.Addr4, 15090), path))
		if err != nil {
			t.Fatalf("GET %s: %v", path, err)
		}
		t.Logf("GET %s: %d %s", path, status, strings.TrimSpace(string(body)))
		return status
	}
	if s := get("/healthz"); s != http.StatusOK {
		t.Errorf("/healthz = %d, want 200", s)
	}
	if s := get("/ready"); s != http.StatusOK {
		t.Errorf("/ready with capture installed = %d, want 200", s)
	}
	if n := sample(c.scrapeSidecar(t, 15090), "sluice_sidecar_event_loops", nil); n != 2 {
		t.Errorf("sluice_sidecar_event_loops = %v with no limit and no --concurrency, want 2", n)
	}
	mustCLI(t, "uninstall", "--cgroup", c.cgroup)
	if s := get("/ready"); s != http.StatusServiceUnavailable {
		t.Errorf("/ready with capture uninstalled = %d, want 503", s)
	}
	if s := get("/healthz"); s != http.StatusOK {
		t.Errorf("/healthz with capture uninstalled = %d, want 200 (a restart mends nothing)", s)
	}

	d := newCapturedPod(t)
	d.startSidecar(t, "--metrics-addr", ":15090", "--concurrency", "3")
	if n := sample(d.scrapeSidecar(t, 15090), "sluice_sidecar_event_loops", nil); n != 3 {
		t.Errorf("sluice_sidecar_event_loops = %v with --concurrency 3", n)
	}
}
