package sidecar

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"slices"
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// How long the sidecar waits before trying its metrics port again: soon at
// first, as a sidecar restarting beside the old one finds the port held for
// a moment; then at most twice a minute, each failure one log line.
const (
	metricsRetryMin = time.Second
	metricsRetryMax = 30 * time.Second
)

// MetricsPort is the port of a --metrics-addr (0 for none), checked before
// anything starts so that a typo is a usage error, not a port retried
// forever.
func MetricsPort(addr string) (uint16, error) {
	if addr == "" {
		return 0, nil
	}
	_, port, err := net.SplitHostPort(addr)
	if err != nil {
		return 0, fmt.Errorf("--metrics-addr %q: want HOST:PORT or :PORT, e.g. 127.0.0.1:15090", addr)
	}
	n, err := strconv.ParseUint(port, 10, 16)
	if err != nil {
		return 0, fmt.Errorf("--metrics-addr %q: %q is not a port number", addr, port)
	}
	return uint16(n), nil
}

// warnIfUnreserved says, in one line, when the metrics port is not one the
// install reserved for the proxy identity: any process in the pod may then
// bind it first, and the sidecar would serve no metrics while it holds it.
func warnIfUnreserved(log *slog.Logger, port uint16, reserved []uint16) {
	if port == 0 || slices.Contains(reserved, port) {
		return
	}
	log.Warn("metrics port not reserved for the proxy by the install: any process in the pod may take it first",
		"metrics_port", port, "reserved", reserved, "fix", fmt.Sprintf("rerun install with --metrics-port %d", port))
}

// metricsServer serves reg's metrics on addr, and the kubelet's probes. A port it cannot bind must
// not take the proxy down with it: the sidecar keeps serving connections
// while it logs why and tries again, counting each failure.
type metricsServer struct {
	addr     string
	handler  http.Handler
	failures prometheus.Counter
	log      *slog.Logger
}

func newMetricsServer(addr string, reg *prometheus.Registry, h health, log *slog.Logger) *metricsServer {
	failures := prometheus.NewCounter(prometheus.CounterOpts{
		Name: "sluice_metrics_listen_failures_total",
		Help: "Times the sidecar could not listen on --metrics-addr (the port held by another process); it serves connections meanwhile and retries.",
	})
	reg.MustRegister(failures)
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	h.register(mux)
	return &metricsServer{addr: addr, handler: mux, failures: failures, log: log}
}

// listen makes one attempt, logging and counting a failure.
func (m *metricsServer) listen() net.Listener {
	ln, err := net.Listen("tcp", m.addr)
	if err != nil {
		m.failures.Inc()
		m.log.Error("cannot listen for metrics: proxying goes on without /metrics, retrying",
			"metrics_addr", m.addr, "err", err, "fix", "free the port, or move it with --metrics-addr (and install --metrics-port)")
		return nil
	}
	return ln
}

// run serves on ln (nil: not bound yet) until ctx ends, binding again with
// backoff whenever it has no listener.
func (m *metricsServer) run(ln net.Listener) runner {
	return func(ctx context.Context) error {
		wait := metricsRetryMin
		for {
			for ln == nil {
				select {
				case <-ctx.Done():
					return nil
				case <-time.After(wait):
				}
				wait = min(2*wait, metricsRetryMax)
				if ln = m.listen(); ln != nil {
					m.log.Info("metrics listening", "metrics_addr", ln.Addr().String())
					wait = metricsRetryMin
				}
			}
			err := serveHTTP(&http.Server{Handler: m.handler, ReadHeaderTimeout: 10 * time.Second}, ln)(ctx)
			if ctx.Err() != nil {
				return nil
			}
			m.failures.Inc()
			m.log.Error("metrics server failed; proxying goes on, retrying", "metrics_addr", m.addr, "err", err)
			ln = nil
		}
	}
}

// serveHTTP serves srv on ln until ctx ends.
func serveHTTP(srv *http.Server, ln net.Listener) runner {
	return func(ctx context.Context) error {
		stop := context.AfterFunc(ctx, func() { srv.Close() })
		defer stop()
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			return fmt.Errorf("serve metrics on %s: %w", ln.Addr(), err)
		}
		return nil
	}
}
