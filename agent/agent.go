// Package agent is the node agent: it follows every pod installed on the
// node through the pins, exports their flows (read from the node's flow
// ring), kernel counters and canary routes on one endpoint, and removes the
// pins and links of pods whose cgroup is gone (a pod deleted without its
// capture being uninstalled). Capture never depends on it: the programs run
// from their pins, so restarting the agent interrupts nothing; flows that
// close while it is down are counted as lost by the kernel.
package agent

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/http"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/sluicemesh/sluice/loader"
)

// Options configure an Agent.
type Options struct {
	// PinRoot holds every pod's pins (loader.DefaultPinRoot).
	PinRoot string
	// IstioNames names the pods' layer-4 counters istio_tcp_* instead of
	// sluice_tcp_*; MaxDestinations bounds each pod's destination_service
	// values (telemetry.Options).
	IstioNames      bool
	MaxDestinations int
	Logger          *slog.Logger
}

// Agent is one node's agent.
type Agent struct {
	opts      Options
	collected atomic.Uint64
	flows     *flowExport
}

// New returns an agent for the pods pinned under opts.PinRoot.
func New(opts Options) *Agent {
	a := &Agent{opts: opts}
	a.flows = newFlowExport(a)
	return a
}

// Pod is one install on the node, as the agent reports it.
type Pod struct {
	Cgroup   string `json:"cgroup"`
	CgroupID uint64 `json:"cgroup_id"`
	PinDir   string `json:"pin_dir"`
	// UID is the Kubernetes pod uid when the cgroup is a kubelet's.
	UID      string   `json:"uid,omitempty"`
	Gone     bool     `json:"gone,omitempty"`
	Complete bool     `json:"complete"`
	Missing  []string `json:"missing,omitempty"`
	// KernelMemory is what the pod's own maps hold (memlock).
	KernelMemory uint64              `json:"kernel_memory_bytes,omitempty"`
	Counters     map[string]uint64   `json:"counters,omitempty"`
	Routes       []loader.RouteState `json:"routes,omitempty"`
	Error        string              `json:"error,omitempty"`
}

// State is complete, incomplete, or gone (cgroup deleted, pins not yet
// collected).
func (p Pod) State() string {
	switch {
	case p.Gone:
		return "gone"
	case p.Complete:
		return "complete"
	}
	return "incomplete"
}

// Pods lists every install under the pin root with its state.
func (a *Agent) Pods() ([]Pod, error) {
	installs, err := loader.List(a.opts.PinRoot)
	if err != nil {
		return nil, err
	}
	pods := make([]Pod, 0, len(installs))
	for _, in := range installs {
		p := Pod{Cgroup: in.Cgroup, CgroupID: in.CgroupID, PinDir: in.PinDir, UID: loader.PodUID(in.Cgroup), Gone: in.Gone()}
		if !p.Gone {
			s, err := loader.Status(in.Target())
			if err != nil {
				p.Error = err.Error()
			}
			p.Complete, p.Missing, p.Counters, p.KernelMemory = s.Complete, s.Missing, s.Counters, s.Memory.Total()
			if p.Routes, err = loader.Routes(in.Target()); err != nil && p.Error == "" {
				p.Error = err.Error()
			}
		}
		pods = append(pods, p)
	}
	return pods, nil
}

// Collect uninstalls every pod whose cgroup is gone and returns the cgroups
// it collected. A failure on one pod does not stop the others.
func (a *Agent) Collect() ([]string, error) {
	installs, err := loader.List(a.opts.PinRoot)
	if err != nil {
		return nil, err
	}
	var done []string
	var errs []error
	for _, in := range installs {
		if !in.Gone() {
			continue
		}
		if err := loader.Uninstall(in.Target(), a.opts.Logger); err != nil {
			errs = append(errs, fmt.Errorf("collect %s: %w", in.Cgroup, err))
			continue
		}
		a.collected.Add(1)
		a.opts.Logger.Info("collected the pins and links of a pod whose cgroup is gone", "cgroup", in.Cgroup, "pin_dir", in.PinDir)
		done = append(done, in.Cgroup)
	}
	if len(errs) > 0 {
		return done, fmt.Errorf("%d pods not collected, first: %w", len(errs), errs[0])
	}
	return done, nil
}

// Run exports every pod's flows, and collects gone pods every interval,
// until ctx ends.
func (a *Agent) Run(ctx context.Context, interval time.Duration) {
	done := make(chan struct{})
	go func() {
		defer close(done)
		a.flows.run(ctx)
	}()
	defer func() { <-done }()
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		if _, err := a.Collect(); err != nil {
			a.opts.Logger.Warn("garbage collection", "err", err)
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// Handler serves /metrics (every pod's flows, kernel counters and routes,
// and the agent's own figures), /flows (one pod's open flows, or with
// follow=true its flow events, as 'sluice flows' reads them) and /pods
// (Pods as JSON).
func (a *Agent) Handler() http.Handler {
	reg := prometheus.NewRegistry()
	reg.MustRegister(collector{a}, a.flows.unmatched)
	gather := prometheus.Gatherers{reg, prometheus.GathererFunc(a.flows.gather)}
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(gather, promhttp.HandlerOpts{ErrorLog: slog.NewLogLogger(a.opts.Logger.Handler(), slog.LevelWarn),
		ErrorHandling: promhttp.ContinueOnError}))
	mux.HandleFunc("/flows", a.flows.serveFlows)
	mux.HandleFunc("/pods", func(w http.ResponseWriter, r *http.Request) {
		pods, err := a.Pods()
		if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		enc.Encode(pods)
	})
	return mux
}
