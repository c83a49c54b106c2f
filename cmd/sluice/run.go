package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sluicemesh/sluice/loader"
	"github.com/sluicemesh/sluice/proxy"
	"github.com/sluicemesh/sluice/redirect"
	"github.com/sluicemesh/sluice/telemetry"
)

func runCommand() command {
	c := command{
		name:    "run",
		summary: "run the sidecar: the transparent proxy for captured connections",
		help: `Usage: sluice run [--cgroup PATH] [-p PORT] [-z PORT] [-u UID -g GID] [--drain 5s] [--log-format json]

Serves captured outbound connections on 127.0.0.1:PORT and [::1]:PORT and
captured inbound ones on port -z (all addresses, plain TCP: the kernel hands
it inbound connections from a sockmap, which takes no MPTCP socket): asks
the kernel for each one's original destination (SO_ORIGINAL_DST), dials it
(inbound: from 127.0.0.6, like Istio, or ::1) and copies bytes both ways.
With --cgroup (inside a
pod with none given: the pod it runs in, found as install finds it) it takes
the ports and proxy uid/gid from the pod's install, reading pins that only
root and the proxy group may read. Run it as the proxy uid/gid (1337 by
default; on Linux 6.5+ it needs no capability); started as root, it switches to
them before it listens, since only the proxy may bind the capture ports and
its own connections must not be captured.
It needs no Sluice programs: behind iptables REDIRECT it works the same.

With --cgroup it also offloads the connections the install names
(--offload-ports, --offload-inbound-ports, or their sluice.dev/ annotations):
once it has dialed, the kernel sends the app's bytes straight out on its
socket, and only the replies still pass through it. It follows a rerun of
install within a second.

With --cgroup it also exports the pod's flows, measured in the kernel, on
--metrics-addr (default :15090, the port Istio's Envoy uses for its own
stats; change it where both run): /metrics for Prometheus, /flows for the
open flows (what 'sluice flows' shows), /flows?follow=true each flow as it
opens and closes (at most --max-followers clients at once; one that takes
nothing for 5s is dropped). Treat --metrics-addr as sensitive: /flows lists
every peer of the pod. Bind it where only its readers reach it:
127.0.0.1:15090 when only a reader inside the pod scrapes it (a
metrics-merging agent, 'sluice flows' run in the pod), the pod's address
behind a NetworkPolicy for a cluster Prometheus.

In the pod only the proxy may bind the port install reserved for metrics
(install --metrics-port, default 15090); on another port the sidecar says so
at start. If it cannot bind it (another process holds it), it goes on
proxying, logs an error and tries again (1s, doubling to 30s), counting
sluice_metrics_listen_failures_total. The Istio labels of this pod come
from the flags below or the environment the Kubernetes downward API sets
(SLUICE_WORKLOAD, SLUICE_NAMESPACE or POD_NAMESPACE, SLUICE_APP, ...).

On SIGTERM it stops accepting at once, lets open connections finish for
--drain, then closes them and exits 0; a second signal ends it at once. If
a proxy listener fails, it exits 1 so the pod restarts it.

Examples:
  sluice run --cgroup /sys/fs/cgroup/unified/mypod
  sluice run --cgroup /sys/fs/cgroup/unified/mypod --workload reviews-v1 --namespace shop --app reviews --version v1
  sluice run -p 15001 -z 15006 -u 1337 -g 1337 --log-format json`,
	}
	c.run = func(ctx context.Context, args []string, stdout io.Writer) error {
		fs := flag.NewFlagSet("run", flag.ContinueOnError)
		cgroup := fs.String("cgroup", "", "the pod's cgroup v2 directory: read ports and proxy uid/gid from its install")
		pinDir := fs.String("pin-dir", "", "where the pins are (default /sys/fs/bpf/sluice/<cgroup id>)")
		policy := redirect.DefaultPolicy()
		fs.Var(redirect.PortFlag(&policy.OutboundPort), "p", "outbound listener port")
		fs.Var(redirect.PortFlag(&policy.InboundPort), "z", "inbound listener port")
		fs.Var(redirect.IDFlag(&policy.ProxyUID, "uid"), "u", "uid to run as when started as root")
		fs.Var(redirect.IDFlag(&policy.ProxyGID, "gid"), "g", "gid to run as when started as root")
		logFormat := fs.String("log-format", "text", "text or json")
		logLevel := fs.String("log-level", "info", "debug, info, warn or error")
		idle := fs.Duration("idle-timeout", time.Hour, "close a connection after this long with no bytes either way")
		drain := fs.Duration("drain", 5*time.Second, "on SIGTERM, how long open connections may take to finish")
		metricsAddr := fs.String("metrics-addr", ":15090", "where to serve /metrics and /flows (with --cgroup); empty: nowhere. Sensitive: /flows lists\n"+
			"every peer of the pod, so bind it where only its readers reach it (127.0.0.1:15090 when they run in the pod)")
		maxFollowers := fs.Int("max-followers", 16, "clients that may follow the flows at once (/flows?follow=true, 'sluice flows --follow'); more get 503")
		istioNames := fs.Bool("istio-metrics", false, "name the layer-4 counters istio_tcp_* instead of sluice_tcp_* (for pods with no other Istio proxy)")
		maxDests := fs.Int("max-destinations", 100, "distinct destination_service label values before the rest count as \"other\"")
		id := telemetry.IdentityFromEnv()
		for _, f := range []struct {
			name, usage string
			p           *string
		}{
			{"workload", "this pod's workload (source_workload outbound, destination_workload inbound)", &id.Workload},
			{"namespace", "this pod's namespace", &id.Namespace},
			{"app", "this pod's app label", &id.App},
			{"version", "this pod's version label", &id.Version},
			{"canonical-service", "this pod's canonical service (default: app, then workload)", &id.CanonicalService},
			{"canonical-revision", "this pod's canonical revision (default: version)", &id.CanonicalRevision},
			{"principal", "this pod's principal", &id.Principal},
			{"cluster", "this pod's cluster", &id.Cluster},
		} {
			fs.StringVar(f.p, f.name, *f.p, f.usage)
		}
		if err := parseFlags(fs, c, args, stdout); err != nil {
			return err
		}
		if *maxDests < 1 {
			return usageError{fmt.Sprintf("--max-destinations %d: want at least 1", *maxDests)}
		}
		if *maxFollowers < 1 {
			return usageError{fmt.Sprintf("--max-followers %d: want at least 1", *maxFollowers)}
		}
		port, err := metricsPort(*metricsAddr)
		if err != nil {
			return err
		}
		set := map[string]bool{}
		fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
		log, err := newLogger(os.Stderr, *logFormat, *logLevel)
		if err != nil {
			return err
		}

		var runners []runner
		var exporter *telemetry.Exporter
		var offload *offloader
		if *cgroup == "" {
			// A sidecar container finds its pod as the init container did.
			if pod, err := loader.OwnPod(os.Getenv); err == nil {
				*cgroup = pod
				log.Info("serving the pod this sidecar runs in", "cgroup", pod)
			} else {
				log.Debug("no pod found: serving without its install", "reason", err)
			}
		}
		if *cgroup != "" {
			target, err := loader.ResolveTarget(*cgroup, *pinDir)
			if err != nil {
				return err
			}
			installed, err := loader.ReadPlan(target)
			if err != nil {
				return err
			}
			if *metricsAddr != "" {
				source, err := loader.OpenFlows(target)
				if err != nil {
					return err
				}
				defer source.Close()
				exporter = telemetry.NewExporter(source, telemetry.Options{Identity: id, IstioNames: *istioNames, MaxDestinations: *maxDests, MaxFollowers: *maxFollowers, Logger: log,
					Routes: source.Routes, RoutesVersion: source.Version})
				runners = append(runners, exporter.Run, closeOnDone(source))
			}
			// Every install made since offload exists has its maps,
			// offload ports or not: a later rerun of install may add
			// them.
			if maps, err := loader.OpenOffload(target); err == nil {
				offload = newOffloader(maps, installed, log)
				// Root is dropped below, and the pins' path may cross
				// directories only root may pass (the host's
				// /sys/fs/bpf): a descriptor of their directory keeps
				// them in reach for rereading the policy.
				dir, err := unix.Open(target.PinDir, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
				if err != nil {
					return fmt.Errorf("open %s: %w", target.PinDir, err)
				}
				defer unix.Close(dir)
				follow := target
				follow.PinDir = fmt.Sprintf("/proc/self/fd/%d", dir)
				runners = append(runners, offload.follow(follow))
			} else if len(installed.OffloadPorts) > 0 || len(installed.OffloadInboundPorts) > 0 {
				return err
			} else {
				log.Debug("no offload: its maps cannot be opened", "err", err)
			}
			if !set["p"] {
				policy.OutboundPort = installed.OutboundPort
			}
			if !set["z"] {
				policy.InboundPort = installed.InboundPort
			}
			if !set["u"] {
				policy.ProxyUID = installed.ProxyUID
			}
			if !set["g"] {
				policy.ProxyGID = installed.ProxyGID
			}
			warnIfOutside(log, target.Cgroup)
			if exporter != nil {
				warnIfUnreserved(log, port, installed.SidecarPorts)
			}
		}

		if err := becomeProxy(policy.ProxyUID, policy.ProxyGID, log); err != nil {
			return err
		}
		listeners, err := listen(policy.OutboundPort, policy.InboundPort, log)
		if err != nil {
			return err
		}
		// One event loop per CPU, each holding a P, and one P more for
		// the rest (listeners' setup, the exporter, /metrics).
		loops := runtime.GOMAXPROCS(0)
		runtime.GOMAXPROCS(loops + 1)
		opts := proxy.Options{IdleTimeout: *idle, Logger: log, Loops: loops}
		if offload != nil {
			opts.Offload = offload
		}
		p := proxy.New(opts)
		for _, ln := range listeners {
			runners = append(runners, func(ctx context.Context) error { return p.Serve(ctx, ln.Listener, ln.dir) })
		}
		served := addrs(listeners)
		if exporter != nil {
			metrics := newMetricsServer(*metricsAddr, exporter.Handler(), exporter.Registry(), log)
			// The first attempt before "listening", so a scraper may come
			// at once; later ones in the background.
			runners = append(runners, metrics.run(metrics.listen()))
			served += ",metrics " + *metricsAddr
		}
		err = serve(ctx, runners, p, *drain, served, log)
		if offload != nil {
			offload.Close()
			log.Info("offload", "connections_offloaded", offload.handed.Load())
		}
		return err
	}
	return c
}

// runner is one part of the sidecar: it runs until ctx ends (returning nil)
// or it fails.
type runner func(ctx context.Context) error

// serve runs every part until ctx ends (a signal: drain, then exit 0) or
// one part fails (the others stop too, and the error makes the process exit
// non-zero, so the pod restarts the sidecar).
func serve(ctx context.Context, runners []runner, p *proxy.Proxy, drain time.Duration, addrs string, log *slog.Logger) error {
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

// closeOnDone closes c when ctx ends, which ends the exporter's Run.
func closeOnDone(c io.Closer) runner {
	return func(ctx context.Context) error {
		<-ctx.Done()
		c.Close()
		return nil
	}
}

type listener struct {
	net.Listener
	dir proxy.Direction
}

// listen opens the outbound listener on loopback and the inbound one on every
// address, each for IPv4 and IPv6 separately: one dual-stack socket would
// hand IPv4 connections over as v4-mapped AF_INET6. It fails unless it holds
// every listener, except that a pod without IPv6 is served over IPv4 alone:
// there no IPv6 connection can be captured either.
func listen(outPort, inPort uint16, log *slog.Logger) ([]listener, error) {
	var lns []listener
	for _, l := range []struct {
		network, addr string
		port          uint16
		dir           proxy.Direction
	}{
		{"tcp4", "127.0.0.1", outPort, proxy.Outbound},
		{"tcp6", "::1", outPort, proxy.Outbound},
		{"tcp4", "0.0.0.0", inPort, proxy.Inbound},
		{"tcp6", "::", inPort, proxy.Inbound},
	} {
		addr := net.JoinHostPort(l.addr, strconv.Itoa(int(l.port)))
		// The inbound listener is plain TCP: the kernel hands it inbound
		// connections from a sockmap, which takes no MPTCP socket (Go's
		// listeners are MPTCP by default). Inbound MPTCP clients fall
		// back to TCP, as they do with any TCP server.
		var lc net.ListenConfig
		lc.SetMultipathTCP(l.dir == proxy.Outbound)
		ln, err := lc.Listen(context.Background(), l.network, addr)
		if err != nil && l.network == "tcp6" && (errors.Is(err, syscall.EADDRNOTAVAIL) || errors.Is(err, syscall.EAFNOSUPPORT)) {
			log.Info("IPv6 is off in this pod; serving IPv4 only", "addr", addr)
			continue
		}
		if err != nil {
			for _, open := range lns {
				open.Close()
			}
			hint := "is another proxy running?"
			if errors.Is(err, syscall.EPERM) || errors.Is(err, syscall.EACCES) {
				hint = "only the proxy uid/gid the pod was installed with may bind the capture ports"
			}
			return nil, fmt.Errorf("listen on %s (%s): %w", addr, hint, err)
		}
		lns = append(lns, listener{ln, l.dir})
	}
	return lns, nil
}

// becomeProxy switches to the proxy identity when running as root: the
// capture ports may only be bound by it, and as root the proxy's own dials
// would be captured and loop back into itself.
func becomeProxy(uid, gid uint32, log *slog.Logger) error {
	if os.Geteuid() != 0 {
		if uint32(os.Getuid()) != uid && uint32(os.Getgid()) != gid {
			log.Warn("not running as the proxy uid/gid: the capture ports cannot be bound and this proxy's own connections would be captured", "uid", os.Getuid(), "gid", os.Getgid(), "proxy_uid", uid, "proxy_gid", gid)
		}
		return nil
	}
	if err := syscall.Setgroups(nil); err != nil {
		return fmt.Errorf("drop supplementary groups: %w", err)
	}
	if err := syscall.Setgid(int(gid)); err != nil {
		return fmt.Errorf("switch to proxy gid %d: %w", gid, err)
	}
	if err := syscall.Setuid(int(uid)); err != nil {
		return fmt.Errorf("switch to proxy uid %d: %w", uid, err)
	}
	return nil
}

// warnIfOutside warns when this process is not in the pod's cgroup subtree:
// the getsockopt hook only answers for sockets created inside it.
func warnIfOutside(log *slog.Logger, cgroup string) {
	own, err := loader.OwnCgroup()
	if err != nil {
		return
	}
	if own != cgroup && !strings.HasPrefix(own, cgroup+"/") {
		log.Warn("sidecar runs outside the pod's cgroup: SO_ORIGINAL_DST will not be answered", "own_cgroup", own, "pod_cgroup", cgroup)
	}
}

func addrs(lns []listener) string {
	parts := make([]string, len(lns))
	for i, ln := range lns {
		parts[i] = ln.Addr().String()
	}
	return strings.Join(parts, ",")
}
