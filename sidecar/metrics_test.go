package sidecar

import (
	"context"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

func TestMetricsPort(t *testing.T) {
	for _, tc := range []struct {
		addr, err string
		want      uint16
	}{
		{"", "", 0},
		{":15090", "", 15090},
		{"127.0.0.1:9102", "", 9102},
		{"[::1]:1", "", 1},
		{"15090", "want HOST:PORT or :PORT", 0},
		{":http", `"http" is not a port number`, 0},
		{":70000", `"70000" is not a port number`, 0},
	} {
		got, err := MetricsPort(tc.addr)
		if tc.err != "" {
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("MetricsPort(%q) = %d, %v; want error %q", tc.addr, got, err, tc.err)
			}
			continue
		}
		if err != nil || got != tc.want {
			t.Errorf("MetricsPort(%q) = %d, %v; want %d", tc.addr, got, err, tc.want)
		}
	}
}

func TestWarnIfUnreserved(t *testing.T) {
	for _, tc := range []struct {
		port     uint16
		reserved []uint16
		warn     bool
	}{
		{0, nil, false},
		{15090, []uint16{15090}, false},
		{9000, []uint16{15090}, true},
	} {
		log, logs := testLogger(t)
		warnIfUnreserved(log, tc.port, tc.reserved)
		if got := strings.Contains(logs.String(), "fix=\"rerun install with --metrics-port"); got != tc.warn {
			t.Errorf("port %d, reserved %v: warned %v, want %v:\n%s", tc.port, tc.reserved, got, tc.warn, logs)
		}
	}
}

// A metrics port held by another process is retried until it is free,
// and the proxy is never told: run returns only when ctx ends.
func TestMetricsServerRetriesAHeldPort(t *testing.T) {
	log, logs := testLogger(t)
	held, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := held.Addr().String()
	reg := prometheus.NewRegistry()
	m := newMetricsServer(addr, reg, health{}, log)
	if ln := m.listen(); ln != nil {
		ln.Close()
		t.Fatal("listened on a held port")
	}
	if n := counter(t, reg, "sluice_metrics_listen_failures_total"); n != 1 {
		t.Fatalf("failures = %v after one attempt, want 1", n)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error)
	go func() { done <- m.run(nil)(ctx) }()
	held.Close()
	deadline := time.Now().Add(10 * time.Second)
	for {
		resp, err := http.Get("http://" + addr + "/metrics")
		if err == nil {
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if !strings.Contains(string(body), "sluice_metrics_listen_failures_total 1") {
				t.Fatalf("served %q, want the failure counted", body)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("metrics never served once the port was free: %v\n%s", err, logs)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if !strings.Contains(logs.String(), "msg=\"metrics listening\"") {
		t.Errorf("no line for the late listen:\n%s", logs)
	}
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("run = %v after ctx ended, want nil", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("run did not end with ctx")
	}
}

func counter(tb testing.TB, reg *prometheus.Registry, name string) float64 {
	tb.Helper()
	fams, err := reg.Gather()
	if err != nil {
		tb.Fatal(err)
	}
	for _, f := range fams {
		if f.GetName() == name {
			return f.GetMetric()[0].GetCounter().GetValue()
		}
	}
	tb.Fatalf("no %s", name)
	return 0
}
