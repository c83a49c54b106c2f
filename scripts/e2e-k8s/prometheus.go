package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"strconv"
	"syscall"
	"time"
)

// promAddr is where the node's Prometheus listens: loopback only.
const promAddr = "127.0.0.1:19091"

// prometheusScrapes runs Debian's Prometheus on the node, scraping the Sluice
// pod's sidecar (:15090) and the agent (:9102) as a node-level Prometheus
// would, and checks that the flow series arrive with the pod's workload
// labels, which the sidecar takes from the downward API.
func (k *checker) prometheusScrapes() (string, error) {
	bin, err := exec.LookPath("prometheus")
	if err != nil {
		return "", fmt.Errorf("prometheus not installed (scripts/deps.sh installs Debian's): %w", err)
	}
	agentIP, err := k.c.kubectl(k.ctx, "get", "pod", "-n", "sluice-system", "-l", "app.kubernetes.io/name=sluice-agent", "-o", "jsonpath={.items[0].status.podIP}")
	if err != nil {
		return "", err
	}
	dir := k.c.path("prometheus")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", err
	}
	cfg := k.c.path("prometheus/prometheus.yml")
	if err := os.WriteFile(cfg, fmt.Appendf(nil, `global:
  scrape_interval: 1s
scrape_configs:
  - job_name: sidecar
    static_configs:
      - targets: ["%s:15090"]
  - job_name: agent
    static_configs:
      - targets: ["%s:9102"]
`, k.ip["app"], bytes.TrimSpace(agentIP)), 0o644); err != nil {
		return "", err
	}
	cmd := exec.Command(bin, "--config.file="+cfg, "--storage.tsdb.path="+k.c.path("prometheus/data"),
		"--web.listen-address="+promAddr, "--log.level=warn")
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		return "", err
	}
	defer func() {
		cmd.Process.Signal(syscall.SIGTERM)
		cmd.Wait()
	}()

	queries := []string{
		`sluice_tcp_connections_opened_total{job="sidecar",reporter="source",source_workload="app",source_workload_namespace="default",source_app="app",source_version="v1"}`,
		`sluice_agent_pods{job="agent",state="complete"}`,
	}
	got := map[string]float64{}
	err = k.c.poll(k.ctx, 30*time.Second, "Prometheus to scrape the sidecar and the agent", func() error {
		for _, q := range queries {
			v, err := promValue(q)
			if err != nil {
				return err
			}
			if v < 1 {
				return fmt.Errorf("%s = %v", q, v)
			}
			got[q] = v
		}
		return nil
	})
	if err != nil {
		return "", fmt.Errorf("%w\n%s", err, out.String())
	}
	return fmt.Sprintf("flows of the app with its workload labels: %v; pods the agent reports complete: %v", got[queries[0]], got[queries[1]]), nil
}

// promValue sums an instant query's vector; 0 when it is empty.
func promValue(expr string) (float64, error) {
	resp, err := http.Get("http://" + promAddr + "/api/v1/query?query=" + url.QueryEscape(expr))
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return 0, err
	}
	var r struct {
		Status string `json:"status"`
		Error  string `json:"error"`
		Data   struct {
			Result []struct {
				Value [2]any `json:"value"`
			} `json:"result"`
		} `json:"data"`
	}
	if err := json.Unmarshal(body, &r); err != nil {
		return 0, fmt.Errorf("HTTP %d: %v", resp.StatusCode, err)
	}
	if r.Status != "success" {
		return 0, fmt.Errorf("query %s: %s", expr, r.Error)
	}
	var sum float64
	for _, s := range r.Data.Result {
		if v, ok := s.Value[1].(string); ok {
			f, _ := strconv.ParseFloat(v, 64)
			sum += f
		}
	}
	return sum, nil
}
