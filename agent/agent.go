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
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/sluicemesh/sluice/bpf"
	"github.com/sluicemesh/sluice/cni"
	"github.com/sluicemesh/sluice/loader"
	"github.com/sluicemesh/sluice/telemetry"
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
	// Upgrade moves every pod that runs another build onto this one
	// (loader.Upgrade), each time the agent collects.
	Upgrade bool
	// CNI, when set, has the agent install the sluice-cni plugin on the
	// node and keep it chained (ensureCNI), each pass.
	CNI *CNI
	// Peers, when set, names the workload at a pod's address: the other
	// end of the flows (kube.Watcher.Peer, with --kubernetes).
	Peers  func(netip.Addr) (telemetry.Identity, bool)
	Logger *slog.Logger
}

// Agent is one node's agent.
type Agent struct {
	opts      Options
	collected atomic.Uint64
	upgraded  atomic.Uint64
	flows     *flowExport
	// stuck are the pin directories of pods Upgrade cannot move (no plan
	// recorded), said once each.
	stuck sync.Map
	// cniBin is sluice-cni's copy on the node, kept by ensureCNI under
	// cniMu.
	cniMu  sync.Mutex
	cniBin *cni.Binary

	// podsMu guards the last Pods the metrics were made from: the state
	// of every pod (its pins and links) is read at most every
	// podStateEvery, not at each scrape.
	podsMu   sync.Mutex
	pods     []Pod
	podsRead time.Time
}

// podStateEvery is how old the pods' state in /metrics may be (the
// complete/incomplete counts, their kernel memory, and the counters and
// routes of pods whose flows another build's agent exports). Reading it
// opens every pin and link of every pod: at each scrape of a node with 50
// pods that was half the agent's CPU. A pod's flows and counters are read
// at each scrape all the same.
const podStateEvery = 10 * time.Second

// forgetPods makes the next recentPods read the pods again.
func (a *Agent) forgetPods() {
	a.podsMu.Lock()
	defer a.podsMu.Unlock()
	a.pods = nil
}

// recentPods is Pods, read again only when the last read is older than
// podStateEvery.
func (a *Agent) recentPods() ([]Pod, error) {
	a.podsMu.Lock()
	defer a.podsMu.Unlock()
	if a.pods != nil && time.Since(a.podsRead) < podStateEvery {
		return a.pods, nil
	}
	pods, err := a.Pods()
	if err != nil {
		return nil, err
	}
	a.pods, a.podsRead = pods, time.Now()
	return pods, nil
}

// New returns an agent for the pods pinned under opts.PinRoot.
func New(opts Options) *Agent {
	a := &Agent{opts: opts}
	a.flows = newFlowExport(a)
	if c := opts.CNI; c != nil {
		a.cniBin = &cni.Binary{Self: c.Self, BinDir: c.BinDir}
	}
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
	return a.each("collected", loader.Installed.Gone, func(in loader.Installed) error {
		if err := loader.Uninstall(in.Target(), a.opts.Logger); err != nil {
			return err
		}
		a.collected.Add(1)
		a.opts.Logger.Info("collected the pins and links of a pod whose cgroup is gone", "cgroup", in.Cgroup, "pin_dir", in.PinDir)
		return nil
	})
}

// UpgradePods moves every live, finished install that runs another build
// onto this one and returns the cgroups it moved. A pod whose record holds
// no plan is said once and left on its build. A failure on one pod does not
// stop the others.
func (a *Agent) UpgradePods() ([]string, error) {
	other := func(in loader.Installed) bool { return in.Object != "" && !in.RunsThisBuild() && !in.Gone() }
	return a.each("upgraded", other, func(in loader.Installed) error {
		res, err := loader.Upgrade(in, a.opts.Logger)
		if errors.Is(err, loader.ErrNoPlan) {
			if _, said := a.stuck.LoadOrStore(in.PinDir, true); !said {
				a.opts.Logger.Warn("cannot move a pod onto this build", "cgroup", in.Cgroup, "err", err)
			}
			return errSkipped
		}
		if err != nil {
			return err
		}
		a.upgraded.Add(1)
		a.opts.Logger.Info("moved a pod onto this build", "cgroup", in.Cgroup, "from", in.Object, "to", bpf.ObjectHash(), "changes", strings.Join(res.Changes, ", "))
		return nil
	})
}

// errSkipped is each's do for a pod it leaves, with no error to report.
var errSkipped = errors.New("skipped")

// each runs do on every install under the pin root that match picks and
// returns the cgroups it was done to; a failure on one pod does not stop
// the others.
func (a *Agent) each(done string, match func(loader.Installed) bool, do func(loader.Installed) error) ([]string, error) {
	installs, err := loader.List(a.opts.PinRoot)
	if err != nil {
		return nil, err
	}
	var out []string
	var errs []error
	for _, in := range installs {
		if !match(in) {
			continue
		}
		switch err := do(in); {
		case errors.Is(err, errSkipped):
		case err != nil:
			errs = append(errs, fmt.Errorf("%s: %w", in.Cgroup, err))
		default:
			out = append(out, in.Cgroup)
		}
	}
	if len(out) > 0 {
		a.forgetPods() // what changed shows in the next scrape
	}
	if len(errs) > 0 {
		return out, fmt.Errorf("%d pods not %s, first: %w", len(errs), done, errs[0])
	}
	return out, nil
}

// Run exports every pod's flows, and collects gone pods (and with
// Options.Upgrade moves pods onto this build, with Options.CNI puts the CNI
// plugin back) every interval, until ctx ends; with Options.CNI it also
// puts the plugin back as soon as its directories change.
func (a *Agent) Run(ctx context.Context, interval time.Duration) {
	done := make(chan struct{})
	go func() {
		defer close(done)
		a.flows.run(ctx)
	}()
	defer func() { <-done }()
	if a.opts.CNI != nil {
		watched := make(chan struct{})
		go func() {
			defer close(watched)
			a.watchCNI(ctx)
		}()
		defer func() { <-watched }()
	}
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		a.Maintain()
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// Maintain is one pass of Run's: collect gone pods, then (with
// Options.Upgrade) move pods onto this build, then (with Options.CNI) put
// the CNI plugin back where it belongs.
func (a *Agent) Maintain() error {
	_, err := a.Collect()
	if err != nil {
		a.opts.Logger.Warn("garbage collection", "err", err)
	}
	var uerr error
	if a.opts.Upgrade {
		if _, uerr = a.UpgradePods(); uerr != nil {
			a.opts.Logger.Warn("upgrade", "err", uerr)
		}
	}
	cerr := a.ensureCNI()
	if cerr != nil {
		a.opts.Logger.Error("CNI plugin: new pods asking for capture get none, and their sidecar holds them unready, until it is fixed", "err", cerr)
	}
	return errors.Join(err, uerr, cerr)
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
