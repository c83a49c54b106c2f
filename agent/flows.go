package agent

import (
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"net/http"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/sluicemesh/sluice/internal/nsenter"
	"github.com/sluicemesh/sluice/loader"
	"github.com/sluicemesh/sluice/podstate"
	"github.com/sluicemesh/sluice/telemetry"
)

// flowExport exports every pod's flows: it reads the node's flow ring and
// hands each event to its pod's exporter, one telemetry.Exporter a pod of
// this build, labelled with the identity install recorded.
type flowExport struct {
	a *Agent

	mu   sync.Mutex
	pods map[uint64]*podFlows // by network namespace cookie
	// missSynced is when an event of no known pod last made the agent
	// look for new pods: a gone pod's last events (thousands, maybe)
	// look once per pollEvery, not each.
	missSynced time.Time

	unmatched prometheus.Counter
}

// podFlows is one pod's exporter, and its pins (its kernel counters).
type podFlows struct {
	in   loader.Installed
	exp  *telemetry.Exporter
	pins *loader.Pins
}

// How often the agent reads the ring when the kernel has not woken it, and
// how often it looks for pods that came or went.
const (
	pollEvery = 100 * time.Millisecond
	syncEvery = 2 * time.Second
)

func newFlowExport(a *Agent) *flowExport {
	return &flowExport{a: a, pods: map[uint64]*podFlows{},
		unmatched: prometheus.NewCounter(prometheus.CounterOpts{Name: "sluice_agent_flow_events_unmatched_total",
			Help: "Flow events of a network namespace the agent found no install for (a pod gone before its events were read)."}),
	}
}

// run reads the node's flows until ctx ends, reopening the ring when the
// node state is replaced (its last pod left, a later one made it again).
func (f *flowExport) run(ctx context.Context) {
	defer f.stopAll()
	reaped := make(chan struct{})
	go func() {
		defer close(reaped)
		f.reap(ctx)
	}()
	defer func() { <-reaped }()
	for ctx.Err() == nil {
		flows, err := loader.OpenNodeFlows(f.a.opts.PinRoot)
		if err != nil {
			if !errors.Is(err, loader.ErrNotInstalled) {
				f.a.opts.Logger.Warn("open the node's flows", "err", err)
			}
			f.sync()
			sleep(ctx, syncEvery)
			continue
		}
		f.consume(ctx, flows)
	}
}

func (f *flowExport) consume(ctx context.Context, flows *loader.NodeFlows) {
	defer flows.Close()
	stop := context.AfterFunc(ctx, func() { flows.Close() })
	defer stop()
	f.sync()
	synced := time.Now()
	for {
		if time.Since(synced) > syncEvery {
			if flows.Replaced() {
				return
			}
			f.sync()
			synced = time.Now()
		}
		netns, ev, err := flows.Next(pollEvery)
		switch {
		case errors.Is(err, os.ErrDeadlineExceeded):
			continue
		case errors.Is(err, io.EOF):
			return
		case err != nil:
			f.a.opts.Logger.Warn("read the node's flows", "err", err)
			return
		}
		f.dispatch(netns, ev)
	}
}

// reap has every pod's exporter drop, every telemetry.ReapEvery, its open
// flows whose socket went without a close event (the ring was full). Apart
// from the reader: it visits each pod's network namespace.
func (f *flowExport) reap(ctx context.Context) {
	t := time.NewTicker(telemetry.ReapEvery)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		f.mu.Lock()
		pods := slices.Collect(maps.Values(f.pods))
		f.mu.Unlock()
		for _, p := range pods {
			if _, err := p.exp.Live(); err != nil {
				f.a.opts.Logger.Warn("read a pod's open flows", "cgroup", p.in.Cgroup, "err", err)
			}
		}
	}
}

// dispatch hands ev to its pod's exporter, looking for a pod installed
// since the last sync first. The reader counts the event itself: handing
// it to a goroutine per pod cost a wake-up per event, which with 50 pods
// was most of the agent's CPU per flow.
func (f *flowExport) dispatch(netns uint64, ev podstate.FlowEvent) {
	p := f.pod(netns)
	if p == nil && time.Since(f.missSynced) >= pollEvery {
		f.missSynced = time.Now()
		f.sync()
		p = f.pod(netns)
	}
	if p == nil {
		f.unmatched.Inc()
		return
	}
	p.exp.Handle(ev)
}

func (f *flowExport) pod(netns uint64) *podFlows {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.pods[netns]
}

// sync makes an exporter for every live pod of this build and stops those
// of pods gone or uninstalled.
func (f *flowExport) sync() {
	installs, err := loader.List(f.a.opts.PinRoot)
	if err != nil {
		f.a.opts.Logger.Warn("list pods", "err", err)
		return
	}
	live := map[uint64]loader.Installed{}
	for _, in := range installs {
		if in.NetnsCookie != 0 && in.RunsThisBuild() && !in.Gone() {
			live[in.NetnsCookie] = in
		}
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	for netns, p := range f.pods {
		if in, ok := live[netns]; !ok || in.CgroupID != p.in.CgroupID {
			p.close()
			delete(f.pods, netns)
		}
	}
	for netns, in := range live {
		if f.pods[netns] != nil {
			continue
		}
		p, err := f.newPod(in)
		if err != nil {
			f.a.opts.Logger.Warn("export a pod's flows", "cgroup", in.Cgroup, "err", err)
			continue
		}
		f.pods[netns] = p
	}
}

func (f *flowExport) newPod(in loader.Installed) (*podFlows, error) {
	pins, err := loader.Open(in.Target(), loader.ReadOnly)
	if err != nil {
		return nil, err
	}
	exp := telemetry.NewExporter(pins, telemetry.Options{
		Identity:        telemetry.IdentityFromMap(in.Identity),
		IstioNames:      f.a.opts.IstioNames,
		MaxDestinations: f.a.opts.MaxDestinations,
		Peers:           f.a.opts.Peers,
		Routes:          pins.Routes,
		RoutesVersion:   pins.RoutesVersion,
		InNetns: func(fn func() error) error {
			ns, err := loader.PodNetns(in)
			if err != nil {
				return err
			}
			return nsenter.Do(ns, fn)
		},
		ConstLabels: prometheus.Labels{telemetry.LabelPodCgroup: in.Cgroup, "pod_uid": loader.PodUID(in.Cgroup)},
		Logger:      f.a.opts.Logger.With("cgroup", in.Cgroup),
	})
	return &podFlows{in: in, exp: exp, pins: pins}, nil
}

func (p *podFlows) close() {
	p.exp.Stop()
	p.pins.Close()
}

func (f *flowExport) stopAll() {
	f.mu.Lock()
	defer f.mu.Unlock()
	for netns, p := range f.pods {
		p.close()
		delete(f.pods, netns)
	}
}

// exported is the cgroups of the pods with an exporter here.
func (f *flowExport) exported() map[string]bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	out := make(map[string]bool, len(f.pods))
	for _, p := range f.pods {
		out[p.in.Cgroup] = true
	}
	return out
}

// gather is every pod's flow metrics, each series labelled with its pod.
func (f *flowExport) gather() ([]*dto.MetricFamily, error) {
	f.mu.Lock()
	gs := prometheus.Gatherers{}
	for _, p := range f.pods {
		gs = append(gs, p.exp.Registry())
	}
	f.mu.Unlock()
	return gs.Gather()
}

// serveFlows serves one pod's flows (/flows, /flows?follow=true) as its
// sidecar did: ?pod= names it by Kubernetes uid, cgroup path or cgroup id,
// and may be left out on a node with one pod.
func (f *flowExport) match(want string) []*podFlows {
	f.mu.Lock()
	defer f.mu.Unlock()
	var match []*podFlows
	for _, p := range f.pods {
		if want == "" || want == p.in.Cgroup || want == loader.PodUID(p.in.Cgroup) || want == strconv.FormatUint(p.in.CgroupID, 10) {
			match = append(match, p)
		}
	}
	return match
}

func (f *flowExport) serveFlows(w http.ResponseWriter, r *http.Request) {
	want := r.URL.Query().Get("pod")
	match := f.match(want)
	if len(match) == 0 {
		f.sync() // a pod installed since the last look
		match = f.match(want)
	}
	if len(match) != 1 {
		var names []string
		for _, p := range match {
			names = append(names, p.in.Cgroup)
		}
		slices.Sort(names)
		http.Error(w, fmt.Sprintf("name one pod with ?pod= (its uid, cgroup path or cgroup id): %d pods match %q: %s",
			len(match), want, strings.Join(names, " ")), http.StatusBadRequest)
		return
	}
	match[0].exp.Handler().ServeHTTP(w, r)
}

func sleep(ctx context.Context, d time.Duration) {
	select {
	case <-ctx.Done():
	case <-time.After(d):
	}
}
