package e2e

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"
)

// istioLabelNames are the labels every Istio layer-4 series carries.
var istioLabelNames = strings.Fields(`reporter source_workload source_workload_namespace source_principal source_app
	source_version source_canonical_service source_canonical_revision source_cluster destination_workload
	destination_workload_namespace destination_principal destination_app destination_version destination_service
	destination_service_name destination_service_namespace destination_canonical_service destination_canonical_revision
	destination_cluster request_protocol response_flags connection_security_policy`)

// promServer is Debian's Prometheus, run by the test in its own network
// namespace (the node's, as the agent's), scraping the node's agent every
// second and evaluating the recording rules in deploy/.
type promServer struct {
	addr string
}

func startPrometheus(t *testing.T, target string) *promServer {
	t.Helper()
	bin, err := exec.LookPath("prometheus")
	if err != nil {
		t.Fatalf("prometheus not installed (scripts/deps.sh installs Debian's): %v", err)
	}
	rules, err := filepath.Abs("../deploy/prometheus/recording-rules.yaml")
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	cfg := filepath.Join(dir, "prometheus.yml")
	if err := os.WriteFile(cfg, fmt.Appendf(nil, `global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files: [%q]
scrape_configs:
  - job_name: sluice
    static_configs:
      - targets: [%q]
`, rules, target), 0o644); err != nil {
		t.Fatal(err)
	}
	p := &promServer{addr: "127.0.0.1:19090"}
	cmd := exec.Command(bin, "--config.file="+cfg, "--storage.tsdb.path="+filepath.Join(dir, "data"),
		"--web.listen-address="+p.addr, "--log.level=warn")
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
	})
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		if status, _, _ := p.get("/-/ready"); status == http.StatusOK {
			return p
		}
		if time.Now().After(deadline) {
			t.Fatalf("prometheus not ready after 30s:\n%s", out.String())
		}
	}
}

// get asks Prometheus for path.
func (p *promServer) get(path string) (int, []byte, error) {
	return nsGet(here, "http://"+p.addr+path)
}

type promSeries struct {
	Metric map[string]string `json:"metric"`
	Value  [2]any            `json:"value"`
}

// query runs an instant PromQL query and returns its vector.
func (p *promServer) query(t *testing.T, expr string) ([]promSeries, error) {
	t.Helper()
	status, body, err := p.get("/api/v1/query?query=" + url.QueryEscape(expr))
	if err != nil {
		return nil, err
	}
	var resp struct {
		Status string `json:"status"`
		Error  string `json:"error"`
		Data   struct {
			ResultType string       `json:"resultType"`
			Result     []promSeries `json:"result"`
		} `json:"data"`
	}
	if err := json.Unmarshal(body, &resp); err != nil {
		return nil, fmt.Errorf("HTTP %d: %v: %s", status, err, body)
	}
	if resp.Status != "success" {
		return nil, fmt.Errorf("%s: %s", resp.Status, resp.Error)
	}
	return resp.Data.Result, nil
}

func value(s promSeries) float64 {
	var v float64
	fmt.Sscan(fmt.Sprint(s.Value[1]), &v)
	return v
}

// A real Prometheus scrapes the node's agent: the pod's flow series arrive
// with every Istio label and the pod's identity from the environment the
// downward API set for its install; the recording rules publish them as
// istio_tcp_*; promtool finds the exposition and the rules clean; and every
// PromQL expression of the dashboard parses and returns data.
func TestPrometheusScrapesTheAgent(t *testing.T) {
	// As a pod spec's env with fieldRef/resource labels would set them
	// for the init container.
	t.Setenv("SLUICE_WORKLOAD", "reviews-v1")
	t.Setenv("POD_NAMESPACE", "shop")
	t.Setenv("SLUICE_APP", "reviews")
	t.Setenv("SLUICE_VERSION", "v1")
	c := newCapturedPod(t, "-o", "9090")
	c.startSidecar(t)
	if _, err := c.pod.ListenEcho("[::]:8080"); err != nil {
		t.Fatal(err)
	}
	agent := c.agent(t)
	prom := startPrometheus(t, strings.TrimPrefix(agent, "http://"))

	out := netip.AddrPortFrom(c.host.Addr4, 8080).String()
	in := netip.AddrPortFrom(c.pod.Addr4, 8080).String()
	for range 3 {
		c.client(t, out)
		c.inbound(t, in)
		if _, err := c.pod.RunClient(self(t), netip.AddrPortFrom(c.host.Addr4, 9090).String(), 1000); err != nil {
			t.Fatal(err)
		}
	}
	// A canary route, for the dashboard's route panels.
	mustCLI(t, "route", "set", "--cgroup", c.cgroup, "198.19.0.10:80", out+"=1")
	for range 3 {
		c.client(t, "198.19.0.10:80")
	}
	// Nothing listens on port 7: the sidecar's upstream connect is refused.
	if _, err := c.pod.RunClient(self(t), netip.AddrPortFrom(c.host.Addr4, 7).String(), 10); err == nil {
		t.Error("a connection to a closed port succeeded")
	}

	var closed []promSeries
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(200 * time.Millisecond) {
		var err error
		closed, err = prom.query(t, `sluice_tcp_connections_closed_total{destination_service=~".*:8080", reporter="destination"} or sluice_tcp_connections_closed_total{destination_service="198.18.2.2:8080"}`)
		if err != nil {
			t.Fatal(err)
		}
		total := 0.0
		for _, s := range closed {
			total += value(s)
		}
		if total == 9 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("Prometheus has %v closed flows to port 8080, want 9: %v", total, closed)
		}
	}
	for _, s := range closed {
		for _, l := range istioLabelNames {
			if s.Metric[l] == "" {
				t.Errorf("series %v lacks Istio label %s", s.Metric, l)
			}
		}
		side := "source"
		if s.Metric["reporter"] == "destination" {
			side = "destination"
		}
		for label, want := range map[string]string{"_workload": "reviews-v1", "_workload_namespace": "shop", "_app": "reviews", "_version": "v1", "_canonical_service": "reviews", "_canonical_revision": "v1"} {
			if got := s.Metric[side+label]; got != want {
				t.Errorf("reporter %s: %s%s = %q, want %q", s.Metric["reporter"], side, label, got, want)
			}
		}
		// Outbound: 3 straight to the host and 3 through the route to it.
		if want := map[string]float64{"source": 6, "destination": 3}[s.Metric["reporter"]]; value(s) != want {
			t.Errorf("%v: %v closed, want %v", s.Metric, value(s), want)
		}
	}
	// Let the rules run and a few more scrapes land, for rate() below.
	time.Sleep(3 * time.Second)
	for _, name := range []string{"opened", "closed"} {
		got, err := prom.query(t, fmt.Sprintf(`sum(istio_tcp_connections_%s_total) - sum(sluice_tcp_connections_%s_total)`, name, name))
		if err != nil || len(got) != 1 || value(got[0]) != 0 {
			t.Errorf("recording rule istio_tcp_connections_%s_total: %v %v", name, got, err)
		}
	}

	promtool, err := exec.LookPath("promtool")
	if err != nil {
		t.Fatalf("promtool not installed: %v", err)
	}
	check := exec.Command(promtool, "check", "metrics")
	check.Stdin = bytes.NewReader(httpGet(t, here, agent+"/metrics"))
	if out, err := check.CombinedOutput(); err != nil || len(bytes.TrimSpace(out)) != 0 {
		t.Errorf("promtool check metrics: %v\n%s", err, out)
	}
	if out, err := exec.Command(promtool, "check", "rules", "../deploy/prometheus/recording-rules.yaml").CombinedOutput(); err != nil {
		t.Errorf("promtool check rules: %v\n%s", err, out)
	}

	dash, err := os.ReadFile("../deploy/grafana/sluice.json")
	if err != nil {
		t.Fatal(err)
	}
	exprs := regexp.MustCompile(`"expr": "((?:[^"\\]|\\.)*)"`).FindAllSubmatch(dash, -1)
	if len(exprs) < 10 {
		t.Fatalf("only %d expressions in the dashboard", len(exprs))
	}
	grafana := strings.NewReplacer("$__rate_interval", "1m", "$pod", ".*")
	for _, m := range exprs {
		var expr string
		if err := json.Unmarshal(append(append([]byte{'"'}, m[1]...), '"'), &expr); err != nil {
			t.Fatal(err)
		}
		got, err := prom.query(t, grafana.Replace(expr))
		if err != nil || len(got) == 0 {
			t.Errorf("dashboard expression %s: %d series, %v", expr, len(got), err)
		}
	}
}
