package telemetry

import (
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/sluicemesh/sluice/podstate"
)

// The per-destination series a rollout reads (rollout/plant parses them
// from the agent's /metrics) and their label: named once, here.
const (
	MetricDestinationConnectDuration = "sluice_tcp_destination_connect_duration_seconds"
	MetricDestinationConnectFailures = "sluice_tcp_destination_connect_failures_total"
	LabelDestinationService          = "destination_service"
	// LabelPodCgroup tells one pod's series from another's where one
	// process exports many: the node's agent.
	LabelPodCgroup = "pod_cgroup"
)

// Source gives the kernel's counters of the pod (its pins'): the flows
// whose events the ring lost are counted from them.
type Source interface {
	Counters() (map[string]uint64, error)
}

// Options configures an Exporter; zero values take the defaults.
type Options struct {
	Identity Identity
	// IstioNames emits the layer-4 counters as istio_tcp_* (for pods with
	// no other Istio proxy) instead of sluice_tcp_*.
	IstioNames bool
	// MaxDestinations bounds the distinct destination_service values; later
	// destinations are counted as "other". Default 100.
	MaxDestinations int
	// Routes, when set, gives the pod's canary routes, exported with their
	// weights, picks and rollout progress.
	Routes func() ([]podstate.RouteState, error)
	// MaxFollowers bounds the clients following the flows at once; more
	// are refused. Default 16.
	MaxFollowers int
	// MaxLiveFlows bounds the open flows kept (about 300 bytes each) for
	// the flow table and open flows' bytes. A flow opened while the table
	// is full is counted (sluice_flow_live_table_full_total) and left out
	// of both; its close still counts it, opened and closed. Default
	// 32,768.
	MaxLiveFlows int
	// FollowerTimeout is how long a follower's buffer may stay full, or a
	// write to it block, before it is dropped. Default 5 s.
	FollowerTimeout time.Duration
	// Peers, when set, names the workload at an address of the cluster
	// (a pod's IP): a flow's other end, in its destination_* (outbound)
	// or source_* (inbound) labels. Without it, or for an address it does
	// not know (the outside world), they are "unknown".
	Peers func(netip.Addr) (Identity, bool)
	// RoutesVersion, when set, changes whenever the routes do: the
	// exporter then rereads Routes only when it changed (without it, at
	// every destination beyond MaxDestinations).
	RoutesVersion func() (uint32, error)
	// InNetns, when set, runs what reads the pod's sockets (for open
	// flows' bytes, and to find flows whose close event was lost) in the
	// pod's network namespace; without it they are this process's.
	InNetns func(func() error) error
	// ConstLabels are added to every series, to tell pods apart where one
	// process exports many (the node's agent).
	ConstLabels prometheus.Labels
	Logger      *slog.Logger
}

// Exporter reads a pod's flow events, keeps its live flows, and serves them
// as Prometheus metrics, a flow table and a stream of closed flows.
type Exporter struct {
	opts   Options
	source Source
	clock  clock
	reg    *prometheus.Registry

	mu   sync.Mutex
	live map[uint64]*Flow // open flows by socket cookie
	// missing is when a live flow was first seen without its socket. Such
	// a flow's close event was lost: the kernel counted it (closed under
	// destination_service "unknown"), so it leaves the live flows without
	// being counted here.
	missing      map[uint64]time.Time
	reapAfter    time.Duration
	totals       map[labelKey]*tcpTotals
	destinations map[string]bool
	peers        map[Identity]*Identity // the peers seen, up to MaxDestinations
	// routed are the services and backends of the pod's routes, as of
	// routesVersion: their series are never folded into "other", so a
	// rollout always finds its backends' measurements.
	routed        map[netip.AddrPort]bool
	routesVersion uint32
	followers     map[*Follower]struct{}
	stopped       bool // Stop was called: no event will come

	connect, rtt, duration *prometheus.HistogramVec
	ended, failed, retrans *prometheus.CounterVec
	followLost, evicted    prometheus.Counter
	liveFull               prometheus.Counter
	// Per destination dialed (the same folding as the layer-4 counters):
	// what a rollout compares between a canary and its stable backend.
	destConnect *prometheus.SummaryVec
	destFailed  *prometheus.CounterVec
}

// labelKey is what tells the layer-4 counters' series apart: the rest of
// Istio's labels follow from the pod's identity.
type labelKey struct {
	direction, service string
	peer               *Identity // the other end's workload, interned; nil: unknown
}

// tcpTotals are the layer-4 counters of one series, from closed flows; open
// flows' bytes are added at scrape time.
type tcpTotals struct {
	opened, closed, sent, received uint64
}

// Histogram buckets in seconds: connect latency and RTT from 50 µs (same
// node) to 10 s; durations from 1 ms to an hour.
var (
	latencyBuckets  = []float64{.00005, .0001, .00025, .0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10}
	durationBuckets = []float64{.001, .01, .1, .5, 1, 5, 10, 30, 60, 300, 900, 3600}
)

// NewExporter makes an Exporter of a pod whose kernel counters source
// reads; Handle feeds it.
func NewExporter(source Source, opts Options) *Exporter {
	e := &Exporter{
		opts:         opts.withDefaults(),
		source:       source,
		clock:        newClock(),
		reg:          prometheus.NewRegistry(),
		live:         map[uint64]*Flow{},
		missing:      map[uint64]time.Time{},
		reapAfter:    reapAfter,
		totals:       map[labelKey]*tcpTotals{},
		destinations: map[string]bool{},
		peers:        map[Identity]*Identity{},
		followers:    map[*Follower]struct{}{},
	}
	e.newMetrics()
	prometheus.WrapRegistererWith(opts.ConstLabels, e.reg).MustRegister(e.connect, e.rtt, e.duration, e.ended, e.failed, e.retrans,
		e.followLost, e.evicted, e.liveFull, e.destConnect, e.destFailed, collector{e}, routeCollector{e})
	return e
}

// withDefaults fills what o leaves zero.
func (o Options) withDefaults() Options {
	if o.MaxDestinations == 0 {
		o.MaxDestinations = 100
	}
	if o.MaxFollowers == 0 {
		o.MaxFollowers = 16
	}
	if o.MaxLiveFlows == 0 {
		o.MaxLiveFlows = 32768
	}
	if o.FollowerTimeout == 0 {
		o.FollowerTimeout = 5 * time.Second
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if o.InNetns == nil {
		o.InNetns = func(f func() error) error { return f() }
	}
	return o
}

// newMetrics makes the metrics the exporter updates as events come; the
// collectors compute the rest at each scrape.
func (e *Exporter) newMetrics() {
	e.connect = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Name: "sluice_tcp_connect_duration_seconds", Buckets: latencyBuckets,
		Help: "Time from SYN sent to established (outbound), or from SYN-ACK sent to its ACK (inbound), per flow.",
	}, []string{"direction"})
	e.rtt = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Name: "sluice_tcp_rtt_seconds", Buckets: latencyBuckets,
		Help: "Smoothed round-trip time of each flow when it closed.",
	}, []string{"direction"})
	e.duration = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Name: "sluice_tcp_flow_duration_seconds", Buckets: durationBuckets,
		Help: "How long each flow was open.",
	}, []string{"direction"})
	e.ended = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "sluice_tcp_connections_ended_total",
		Help: "Flows closed, by how they ended: fin, rst or timeout.",
	}, []string{"direction", "end"})
	e.failed = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "sluice_tcp_connect_failures_total",
		Help: "Outbound connects that never were established, by reason: refused, timeout or rst.",
	}, []string{"direction", "reason"})
	e.retrans = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "sluice_tcp_retransmitted_segments_total",
		Help: "Segments the pod retransmitted, counted when each flow closes.",
	}, []string{"direction"})
	e.destConnect = prometheus.NewSummaryVec(prometheus.SummaryOpts{
		Name: MetricDestinationConnectDuration,
		Help: "Connect latency of outbound flows that were established, by original destination (sum and count).",
	}, []string{LabelDestinationService})
	e.destFailed = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: MetricDestinationConnectFailures,
		Help: "Outbound connects never established, by original destination.",
	}, []string{LabelDestinationService})
	e.followLost = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "sluice_flow_follow_dropped_total",
		Help: "Closed flows not sent to a `sluice flows --follow` client that was too slow to take them.",
	})
	e.liveFull = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "sluice_flow_live_table_full_total",
		Help: "Flows opened while the table of open flows was full (MaxLiveFlows): left out of the flow table and of open flows' bytes, counted when they close.",
	})
	e.evicted = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "sluice_flow_followers_evicted_total",
		Help: "`sluice flows --follow` clients disconnected for taking no flows for the follower timeout.",
	})
}

// Registry is what /metrics serves.
func (e *Exporter) Registry() *prometheus.Registry { return e.reg }

// Handle counts one of the pod's flow events. The node's agent calls it as
// it reads the node's ring: no goroutine per pod, no hand-off per event.
func (e *Exporter) Handle(ev podstate.FlowEvent) { e.handle(flowOf(ev, e.clock)) }

func (e *Exporter) handle(f Flow) {
	e.mu.Lock()
	defer e.mu.Unlock()
	f.service = e.service(f)
	f.peer = e.peerOf(f)
	if _, seen := e.totals[f.series()]; !seen && f.peer != nil && len(e.totals) >= 2*(e.opts.MaxDestinations+2) {
		// As many (destination, peer) series as destinations alone
		// could make: past that, a new pair counts its peer unknown.
		f.peer = nil
	}
	key := f.series()
	t := e.totals[key]
	if t == nil {
		t = &tcpTotals{}
		e.totals[key] = t
	}
	switch f.State {
	case StateOpen:
		e.connect.WithLabelValues(f.Direction).Observe(f.ConnectLatency)
		if f.Direction == Outbound {
			e.destConnect.WithLabelValues(e.fold(f.Destination)).Observe(f.ConnectLatency)
		}
		if len(e.live) >= e.opts.MaxLiveFlows {
			// Its close counts it opened, as one opened before the
			// exporter started.
			e.liveFull.Inc()
			return
		}
		e.live[f.Cookie] = &f
		t.opened++
		return
	case StateFailed:
		e.failed.WithLabelValues(f.Direction, f.End).Inc()
		e.destFailed.WithLabelValues(e.fold(f.Destination)).Inc()
	case StateClosed:
		if open, ok := e.live[f.Cookie]; ok {
			// The open event's connect latency is the flow's.
			f.ConnectLatency = open.ConnectLatency
			delete(e.live, f.Cookie)
			delete(e.missing, f.Cookie)
		} else {
			// Opened before the exporter started, or its open event was
			// lost (the kernel counts that only when the close is lost
			// too): count the open now.
			t.opened++
		}
		t.closed++
		t.sent += f.BytesSent
		t.received += f.BytesReceived
		e.ended.WithLabelValues(f.Direction, f.End).Inc()
		e.rtt.WithLabelValues(f.Direction).Observe(f.SRTT)
		e.duration.WithLabelValues(f.Direction).Observe(f.Duration)
		e.retrans.WithLabelValues(f.Direction).Add(float64(f.Retransmits))
	}
	for fl := range e.followers {
		e.send(fl, f)
	}
}

// peerOf is the workload at the flow's other end (the backend dialed,
// outbound; the client, inbound), as Options.Peers knows it, interned: nil
// (unknown) for the outside world, and once MaxDestinations distinct peers
// were seen, so the series stay bounded.
func (e *Exporter) peerOf(f Flow) *Identity {
	if e.opts.Peers == nil {
		return nil
	}
	addr := f.Destination.Addr()
	if f.Direction == Inbound {
		addr = f.Source.Addr()
	}
	id, ok := e.opts.Peers(addr.Unmap())
	if !ok {
		return nil
	}
	p := e.peers[id]
	if p == nil {
		if len(e.peers) >= e.opts.MaxDestinations {
			return nil
		}
		p = &id
		e.peers[id] = p
	}
	return p
}

// service is the flow's destination_service: its original destination,
// folded as fold does.
func (e *Exporter) service(f Flow) string { return e.fold(f.OriginalDst) }

// fold names a destination's series: itself, until MaxDestinations distinct
// ones were seen, then "other" (a port scan must not make the series
// unbounded), except for a route's service or backend, which always keeps
// its own.
func (e *Exporter) fold(dst netip.AddrPort) string {
	s := dst.String()
	if e.destinations[s] {
		return s
	}
	if len(e.destinations) >= e.opts.MaxDestinations && !e.isRouted(dst) {
		return "other"
	}
	e.destinations[s] = true
	return s
}

// isRouted reports whether dst is a service or backend of the pod's routes,
// rereading them when they changed.
func (e *Exporter) isRouted(dst netip.AddrPort) bool {
	if e.opts.Routes == nil {
		return false
	}
	version, err := uint32(0), error(nil)
	if e.opts.RoutesVersion != nil {
		version, err = e.opts.RoutesVersion()
	}
	if e.routed == nil || e.opts.RoutesVersion == nil || err != nil || version != e.routesVersion {
		e.readRoutes(version)
	}
	return e.routed[dst]
}

func (e *Exporter) readRoutes(version uint32) {
	routes, err := e.opts.Routes()
	if err != nil {
		e.opts.Logger.Warn("read routes", "err", err)
		return
	}
	e.routed, e.routesVersion = map[netip.AddrPort]bool{}, version
	for _, r := range routes {
		e.routed[r.Service] = true
		for _, b := range r.Backends {
			e.routed[b.AddrPort()] = true
		}
	}
}

// ReapEvery is how often the exporter's owner calls Live to drop the flows
// whose socket is gone without a close event, so a full ring can never
// leave flows open forever; reapAfter is how long such a flow's socket
// must have been missing (its close event may just not be read yet).
const (
	ReapEvery = 10 * time.Second
	reapAfter = 5 * time.Second
)

// Live returns the open flows, with their bytes, RTT and retransmits as the
// kernel has them now (sock_diag in the pod's network namespace). A flow whose
// socket has been gone for reapAfter closed without its event reaching us;
// it is dropped, its close counted through the kernel's lost-close
// counters and its bytes as last seen.
func (e *Exporter) Live() ([]Flow, error) {
	e.mu.Lock()
	keys := make([]sockKey, 0, len(e.live))
	for _, f := range e.live {
		keys = append(keys, f.key())
	}
	e.mu.Unlock()
	var stats map[uint64]sockStat
	var err error
	if len(keys) > 0 { // no visit to the pod's namespace for nothing
		err = e.opts.InNetns(func() (err error) { stats, err = socketStats(keys); return err })
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	now := time.Now()
	out := make([]Flow, 0, len(e.live))
	for cookie, f := range e.live {
		s, ok := stats[cookie]
		switch {
		case ok:
			delete(e.missing, cookie)
			f.BytesSent, f.BytesReceived = max(f.BytesSent, s.sent), max(f.BytesReceived, s.received)
			f.SRTT, f.MinRTT, f.Retransmits = s.srtt, s.minRTT, s.retrans
		case err != nil:
			// A failed dump proves nothing about this socket.
		case e.missing[cookie].IsZero():
			e.missing[cookie] = now
		case now.Sub(e.missing[cookie]) >= e.reapAfter:
			// Its bytes so far stay counted: the byte counters must
			// never go down.
			t := e.totals[f.series()]
			t.sent += f.BytesSent
			t.received += f.BytesReceived
			delete(e.live, cookie)
			delete(e.missing, cookie)
			continue
		}
		c := *f
		c.Duration = now.Sub(c.Start).Seconds()
		out = append(out, c)
	}
	slices.SortFunc(out, func(a, b Flow) int { return a.Start.Compare(b.Start) })
	return out, err
}

// followBuffer is how many flow events a follower may fall behind by
// (about 64 KiB of them): enough for a burst, bounded for every follower.
const followBuffer = 256

// A Follower receives every flow event (opened, closed, failed) from when
// it started following. One that falls behind loses events, counted in
// sluice_flow_follow_dropped_total; one that stays behind is dropped.
type Follower struct {
	e       *Exporter
	events  chan Flow
	evicted chan struct{}
	// fullSince is when its buffer was found full and stayed so (zero:
	// it is not); guarded by e.mu.
	fullSince time.Time
}

// Events are the follower's flow events.
func (f *Follower) Events() <-chan Flow { return f.events }

// Evicted is closed when the exporter dropped the follower, or stopped.
func (f *Follower) Evicted() <-chan struct{} { return f.evicted }

// Stop ends the following.
func (f *Follower) Stop() {
	f.e.mu.Lock()
	defer f.e.mu.Unlock()
	delete(f.e.followers, f)
}

// Evict drops a follower too slow to take its events, as a write to it
// that blocked for the follower timeout shows.
func (f *Follower) Evict() {
	f.e.mu.Lock()
	defer f.e.mu.Unlock()
	f.e.evict(f)
}

// ErrTooManyFollowers refuses a follower beyond Options.MaxFollowers.
var ErrTooManyFollowers = errors.New("too many followers")

// ErrStopped refuses a follower once the exporter stopped: the pod went,
// or the agent stops.
var ErrStopped = errors.New("the flows are no longer exported")

// Stop ends every follower's stream: the pod's events ended (it went, or
// the agent stops), and a client following it would otherwise wait for
// ever. A follower then is refused.
func (e *Exporter) Stop() {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.stopped = true
	for f := range e.followers {
		delete(e.followers, f)
		close(f.evicted)
	}
}

// Follow starts a Follower, unless MaxFollowers already follow: each holds
// memory, and clients that never read must not add up to an OOM kill.
func (e *Exporter) Follow() (*Follower, error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.stopped {
		return nil, ErrStopped
	}
	if len(e.followers) >= e.opts.MaxFollowers {
		return nil, fmt.Errorf("%w: %d clients already follow the pod's flows", ErrTooManyFollowers, len(e.followers))
	}
	f := &Follower{e: e, events: make(chan Flow, followBuffer), evicted: make(chan struct{})}
	e.followers[f] = struct{}{}
	return f, nil
}

// send hands f a flow event, or drops it if f's buffer is full; a
// follower whose buffer stayed full for the follower timeout is evicted.
// Called with e.mu held.
func (e *Exporter) send(f *Follower, fl Flow) {
	select {
	case f.events <- fl:
		f.fullSince = time.Time{}
		return
	default:
	}
	e.followLost.Inc()
	now := time.Now()
	if f.fullSince.IsZero() {
		f.fullSince = now
	} else if now.Sub(f.fullSince) >= e.opts.FollowerTimeout {
		e.evict(f)
	}
}

// evict drops f, once; called with e.mu held.
func (e *Exporter) evict(f *Follower) {
	if _, ok := e.followers[f]; !ok {
		return
	}
	delete(e.followers, f)
	close(f.evicted)
	e.evicted.Inc()
	e.opts.Logger.Warn("dropped a flows follower that took no flows", "for", e.opts.FollowerTimeout)
}
