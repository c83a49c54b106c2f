// Package sidecar runs the pod's sidecar: the transparent proxy for the
// connections the install captures, the offload of the connections the
// install names, and /metrics of its own figures (the pod's flows are the
// node agent's). It asks the pod's hooks for its plan when it has an
// install, and works the same behind iptables REDIRECT when it has none.
package sidecar

import (
	"context"
	"errors"
	"log/slog"
	"net/netip"
	"os"
	"runtime"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/sluicemesh/sluice/dnsfwd"
	"github.com/sluicemesh/sluice/loader"
	"github.com/sluicemesh/sluice/proxy"
)

// Config is what 'sluice run' was told: one field per flag.
type Config struct {
	Cgroup string // the pod's cgroup v2 directory; empty: the pod this runs in, if any
	PinDir string // where the pins are; empty: the default for Cgroup

	OutboundPort uint16 // -p
	InboundPort  uint16 // -z
	ProxyUID     uint32 // -u
	ProxyGID     uint32 // -g
	// Which of -p, -z, -u and -g were given: the others come from the
	// pod's install when there is one.
	OutboundPortSet, InboundPortSet, ProxyUIDSet, ProxyGIDSet bool

	Concurrency int           // event loops; 0: the container's CPU limit rounded up, else DefaultConcurrency
	IdleTimeout time.Duration // close a connection with no bytes either way for this long
	Drain       time.Duration // on ctx's end, how long open connections may take to finish
	MetricsAddr string        // where to serve the sidecar's /metrics; empty: nowhere
	// DNSPort is where the DNS forwarder listens (UDP and TCP, 127.0.0.1
	// and ::1); unless DNSPortSet, the install's DNS port, none without
	// DNS capture. DNSUpstreams are where it forwards, by default the
	// nameservers of ResolvConf (default /etc/resolv.conf).
	DNSPort      uint16
	DNSPortSet   bool
	DNSUpstreams []netip.AddrPort
	ResolvConf   string
	// RequireCapture keeps /ready failing while the pod's capture does not
	// answer, even if it did not at start: a pod the CNI plugin was to
	// capture must not run without it.
	RequireCapture bool
	Logger         *slog.Logger // nil: slog.Default()
}

// Run serves until ctx ends (then it drains for cfg.Drain and returns nil)
// or a part of the sidecar fails.
func Run(ctx context.Context, cfg Config) error {
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	port, err := MetricsPort(cfg.MetricsAddr)
	if err != nil {
		return err
	}
	s := &sidecar{cfg: cfg, log: cfg.Logger}
	defer s.close()
	// An install whose hooks do not answer (an older Sluice's) is read
	// from the pins of the pod this runs in, or of --cgroup's.
	plan := s.askPlan()
	if s.cfg.Cgroup == "" {
		s.findPod()
	}
	if plan == nil && s.cfg.Cgroup != "" {
		if plan, err = s.readInstall(); err != nil {
			return err
		}
	}
	if plan != nil {
		warnIfUnreserved(s.log, port, plan.SidecarPorts)
	}
	if err := becomeProxy(s.cfg.ProxyUID, s.cfg.ProxyGID, s.log); err != nil {
		return err
	}
	listeners, err := listen(s.cfg.OutboundPort, s.cfg.InboundPort, s.log)
	if err != nil {
		return err
	}
	p := s.newProxy()
	for _, ln := range listeners {
		s.runners = append(s.runners, func(ctx context.Context) error { return p.Serve(ctx, ln.Listener, ln.dir) })
	}
	served := addrs(listeners)
	dns, err := s.startDNS(plan)
	if err != nil {
		for _, ln := range listeners {
			ln.Close()
		}
		return err
	}
	served += dns
	if s.cfg.MetricsAddr != "" {
		metrics := newMetricsServer(s.cfg.MetricsAddr, s.registry(), health{hooks: s.hooks || s.cfg.RequireCapture, ask: loader.AskPlan}, s.log)
		// The first attempt before "listening", so a scraper may come
		// at once; later ones in the background.
		s.runners = append(s.runners, metrics.run(metrics.listen()))
		served += ",metrics " + s.cfg.MetricsAddr
	}
	err = serve(ctx, s.runners, p, s.cfg.Drain, served, s.log)
	if s.offload != nil {
		s.log.Info("offload", "connections_offloaded", s.offload.handed.Load())
	}
	return err
}

// sidecar is one Run's parts, gathered step by step before they start.
type sidecar struct {
	cfg     Config
	loops   int  // the proxy's event loops
	hooks   bool // the pod's hooks answered the plan
	log     *slog.Logger
	runners []runner
	offload *offloader
	dns     *dnsfwd.Forwarder
	undo    []func() // run in reverse when Run returns
}

func (s *sidecar) close() {
	for i := len(s.undo) - 1; i >= 0; i-- {
		s.undo[i]()
	}
}

// ownCPULimit is the CPU limit of the container this runs in (0: none, or
// not readable: the sidecar then runs DefaultConcurrency loops).
func (s *sidecar) ownCPULimit() float64 {
	if s.cfg.Concurrency > 0 {
		return 0
	}
	mount, err := loader.Cgroup2Mount()
	if err != nil {
		s.log.Debug("no cgroup v2: no CPU limit read", "reason", err)
		return 0
	}
	dir, err := loader.OwnCgroup()
	if err == nil {
		var limit float64
		if limit, err = cpuLimit(mount, dir); err == nil {
			return limit
		}
	}
	s.log.Warn("cannot read the container's CPU limit: running the default event loops", "err", err, "loops", DefaultConcurrency)
	return 0
}

// findPod finds the pod this sidecar runs in, as the init container did.
func (s *sidecar) findPod() {
	if pod, err := loader.OwnPod(os.Getenv); err == nil {
		s.cfg.Cgroup = pod
		s.log.Info("serving the pod this sidecar runs in", "cgroup", pod)
	} else {
		s.log.Debug("no pod found: serving without its install", "reason", err)
	}
}

// askPlan asks the hooks of the pod this sidecar runs in for its plan, and
// takes the ports and proxy identity not given as flags from it, and
// offload's following. It returns nil when no install answers: iptables
// REDIRECT, or an older Sluice, whose record useInstall reads.
func (s *sidecar) askPlan() *loader.SidecarPlan {
	plan, err := loader.AskPlan()
	if err != nil {
		s.log.Debug("no install answers the sidecar's plan", "reason", err)
		return nil
	}
	s.log.Debug("plan from the pod's hooks", "outbound_port", plan.OutboundPort, "inbound_port", plan.InboundPort,
		"proxy_uid", plan.ProxyUID, "offload", plan.Offload)
	s.hooks = true
	s.cfg.fillFrom(plan)
	s.offload = newOffloader(plan.Offload, s.log)
	s.runners = append(s.runners, s.offload.follow(loader.AskPlan))
	return &plan
}

// readInstall reads the ports and proxy identity not given as flags from
// the pins of an install whose hooks do not answer askPlan (an older
// Sluice's).
func (s *sidecar) readInstall() (*loader.SidecarPlan, error) {
	target, err := loader.ResolveTarget(s.cfg.Cgroup, s.cfg.PinDir)
	if err != nil {
		return nil, err
	}
	installed, err := loader.ReadPlan(target)
	if err != nil {
		return nil, err
	}
	s.cfg.fillFrom(installed)
	warnIfOutside(s.log, target.Cgroup)
	return &installed, nil
}

// registry is what the sidecar's /metrics serves: the proxy's own figures.
// The pod's flows are the node agent's.
func (s *sidecar) registry() *prometheus.Registry {
	reg := prometheus.NewRegistry()
	reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "sluice_sidecar_event_loops",
		Help: "The proxy's event loops: --concurrency, else the container's CPU limit rounded up, else 2."}, func() float64 { return float64(s.loops) }))
	if o := s.offload; o != nil {
		reg.MustRegister(prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "sluice_sidecar_offloaded_connections_total",
			Help: "Connections the sidecar handed to the kernel (offload)."}, func() float64 { return float64(o.handed.Load()) }))
	}
	if s.dns != nil {
		reg.MustRegister(s.dns.Collectors()...)
	}
	return reg
}

// fillFrom takes the ports and proxy identity that were not given from
// the pod's install.
func (c *Config) fillFrom(installed loader.SidecarPlan) {
	if !c.OutboundPortSet {
		c.OutboundPort = installed.OutboundPort
	}
	if !c.InboundPortSet {
		c.InboundPort = installed.InboundPort
	}
	if !c.ProxyUIDSet {
		c.ProxyUID = installed.ProxyUID
	}
	if !c.ProxyGIDSet {
		c.ProxyGID = installed.ProxyGID
	}
}

// newProxy sizes the proxy to its pod (concurrency): its event loops, each
// holding a P, and one P more for the rest (listeners' setup, /metrics).
func (s *sidecar) newProxy() *proxy.Proxy {
	loops, from := concurrency(s.cfg.Concurrency, s.ownCPULimit())
	s.loops = loops
	s.log.Info("event loops", "loops", loops, "from", from)
	runtime.GOMAXPROCS(loops + 1)
	opts := proxy.Options{IdleTimeout: s.cfg.IdleTimeout, Logger: s.log, Loops: loops}
	if s.offload != nil {
		opts.Offload = s.offload
	}
	return proxy.New(opts)
}

// runner is one part of the sidecar: it runs until ctx ends (returning nil)
// or it fails.
type runner func(ctx context.Context) error

// drainer is what serve drains once every part has stopped: the proxy.
type drainer interface{ Shutdown(drain time.Duration) }

// serve runs every part until ctx ends (a signal: drain, then exit 0) or
// one part fails (the others stop too, and the error makes the process exit
// non-zero, so the pod restarts the sidecar).
func serve(ctx context.Context, runners []runner, p drainer, drain time.Duration, addrs string, log *slog.Logger) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var wg sync.WaitGroup
	errs := make([]error, len(runners))
	for i, run := range runners {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if errs[i] = run(ctx); errs[i] != nil {
				cancel()
			}
		}()
	}
	log.Info("listening", "addrs", addrs, "uid", os.Getuid(), "gid", os.Getgid())
	<-ctx.Done()
	wg.Wait()
	err := errors.Join(errs...)
	if err == nil {
		log.Info("stopping: no new connections; draining open ones", "drain", drain)
	}
	p.Shutdown(drain)
	return err
}
