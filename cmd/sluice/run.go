package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"net/netip"
	"os"
	"strings"
	"time"

	"github.com/sluicemesh/sluice/redirect"
	"github.com/sluicemesh/sluice/sidecar"
)

const runHelp = `Usage: sluice run [--cgroup PATH] [-p PORT] [-z PORT] [-u UID -g GID] [--concurrency N] [--drain 5s] [--log-format json]

Serves captured outbound connections on 127.0.0.1:PORT and [::1]:PORT and
captured inbound ones on port -z (all addresses, plain TCP: the kernel hands
it inbound connections from a sockmap, which takes no MPTCP socket): asks
the kernel for each one's original destination (SO_ORIGINAL_DST), dials it
(inbound: from 127.0.0.6, like Istio, or ::1) and copies bytes both ways.
In a pod with Sluice installed it asks the pod's hooks for the ports and
proxy uid/gid not given as flags (a socket option the kernel answers: no
pin, no BPF access); an older install's it reads from that pod's pins
(--cgroup; inside a pod with none given, the pod it runs in, found as
install finds it), which that install gave the proxy group. Run it as
the proxy uid/gid (1337 by default); it needs no capability. Started as
root, it switches to them before it listens, since only the proxy may bind
the capture ports and its own connections must not be captured.
It needs no Sluice programs: behind iptables REDIRECT it works the same.

It runs --concurrency event loops, each a thread: by default the
container's CPU limit rounded up (cpu.max of its cgroup v2), else 2 (as
Istio's Envoy); never one a node CPU, since a sidecar is in every pod.

With DNS capture (install --redirect-dns) it also serves the DNS forwarder
on the install's DNS port (15053 by default, Istio's), UDP and TCP on
127.0.0.1 and ::1: each query goes as it came to the nameserver the app
sent it to (the kernel names it) and the answer back, counted in
sluice_dns_queries_total and sluice_dns_errors_total; a query sent to the
forwarder itself goes to the nameservers of --resolv-conf in turn (the
pod's own, which it shares). A query its nameserver does not answer gets
SERVFAIL at once. Any DNS server listening there as the proxy identity
(Istio's agent) does the same job.

It also offloads the connections the install names (--offload-ports,
--offload-inbound-ports, or their sluice.dev/ annotations): once it has
dialed, the kernel sends the app's bytes straight out on its socket, and
only the replies still pass through it. It follows a rerun of install within
a second.

On --metrics-addr (default :15090, the port Istio's Envoy uses for its own
stats; change it where both run) it serves /metrics of its own figures:
connections offloaded, its event loops, and
sluice_metrics_listen_failures_total; and the kubelet's probes: /healthz
while it serves, /ready while its listeners are up and the pod's capture
answers (or, with no capture at start and no --require-capture, on its
listeners alone). The pod's
flows, measured in the kernel, are the node's: 'sluice agent' exports every
pod's, labelled with the identity install recorded. In the pod only the
proxy may bind the port install reserved for metrics (install
--metrics-port, default 15090); on another port the sidecar says so at
start. If it cannot bind it (another process holds it), it goes on
proxying, logs an error and tries again (1s, doubling to 30s).

On SIGTERM it stops accepting at once, lets open connections finish for
--drain, then closes them and exits 0; a second signal ends it at once. If
a proxy listener fails, it exits 1 so the pod restarts it.

Examples:
  sluice run
  sluice run --metrics-addr ""
  sluice run -p 15001 -z 15006 -u 1337 -g 1337 --log-format json`

func runCommand() command {
	c := command{
		name:    "run",
		summary: "run the sidecar: the transparent proxy for captured connections",
		help:    runHelp,
	}
	c.run = func(ctx context.Context, args []string, stdout io.Writer) error {
		fs := flag.NewFlagSet("run", flag.ContinueOnError)
		cfg, logFormat, logLevel := runFlags(fs)
		if err := parseFlags(fs, c, args, stdout); err != nil {
			return err
		}
		if _, err := sidecar.MetricsPort(cfg.MetricsAddr); err != nil {
			return usageError{err.Error()}
		}
		if cfg.Concurrency < 0 {
			return usageError{fmt.Sprintf("--concurrency %d: want a number of event loops above 0 (unset: the container's CPU limit, else %d)", cfg.Concurrency, sidecar.DefaultConcurrency)}
		}
		fs.Visit(func(f *flag.Flag) {
			switch f.Name {
			case "p":
				cfg.OutboundPortSet = true
			case "z":
				cfg.InboundPortSet = true
			case "u":
				cfg.ProxyUIDSet = true
			case "g":
				cfg.ProxyGIDSet = true
			case "dns-port":
				cfg.DNSPortSet = true
			}
		})
		log, err := newLogger(os.Stderr, *logFormat, *logLevel)
		if err != nil {
			return err
		}
		cfg.Logger = log
		defer freeMemoryOnSignal()()
		return sidecar.Run(ctx, *cfg)
	}
	return c
}

// runFlags defines run's flags on fs, each filling a field of the config
// it returns (or one of the log settings).
func runFlags(fs *flag.FlagSet) (cfg *sidecar.Config, logFormat, logLevel *string) {
	policy := redirect.DefaultPolicy()
	cfg = &sidecar.Config{OutboundPort: policy.OutboundPort, InboundPort: policy.InboundPort, ProxyUID: policy.ProxyUID, ProxyGID: policy.ProxyGID}
	fs.StringVar(&cfg.Cgroup, "cgroup", "", "the pod's cgroup v2 directory, for the plan of an older install whose hooks do not answer (default: the pod this runs in)")
	fs.StringVar(&cfg.PinDir, "pin-dir", "", "where the pins are (default /sys/fs/bpf/sluice/<cgroup id>)")
	fs.Var(redirect.PortFlag(&cfg.OutboundPort), "p", "outbound listener port")
	fs.Var(redirect.PortFlag(&cfg.InboundPort), "z", "inbound listener port")
	fs.Var(redirect.IDFlag(&cfg.ProxyUID, "uid"), "u", "uid to run as when started as root")
	fs.Var(redirect.IDFlag(&cfg.ProxyGID, "gid"), "g", "gid to run as when started as root")
	logFormat = fs.String("log-format", "text", "text or json")
	logLevel = fs.String("log-level", "info", "debug, info, warn or error")
	fs.IntVar(&cfg.Concurrency, "concurrency", 0, fmt.Sprintf("event loops (threads) of the proxy (default: the container's CPU limit rounded up, else %d; never the node's CPU count)", sidecar.DefaultConcurrency))
	fs.DurationVar(&cfg.IdleTimeout, "idle-timeout", time.Hour, "close a connection after this long with no bytes either way")
	fs.DurationVar(&cfg.Drain, "drain", 5*time.Second, "on SIGTERM, how long open connections may take to finish")
	fs.StringVar(&cfg.MetricsAddr, "metrics-addr", ":15090", "where to serve the sidecar's /metrics; empty: nowhere")
	fs.Var(redirect.PortFlag(&cfg.DNSPort), "dns-port", "serve the DNS forwarder here, UDP and TCP on 127.0.0.1 and ::1 (default: the port the install's\n"+
		"--redirect-dns sends the pod's queries to; none without it)")
	fs.Func("dns-upstreams", "where the DNS forwarder sends a query the kernel names no nameserver for, ADDRESS:PORT,... (default: the nameservers of --resolv-conf)", func(s string) error {
		cfg.DNSUpstreams = nil
		for _, w := range strings.Split(s, ",") {
			ap, err := netip.ParseAddrPort(strings.TrimSpace(w))
			if err != nil {
				return fmt.Errorf("%q is not ADDRESS:PORT", w)
			}
			cfg.DNSUpstreams = append(cfg.DNSUpstreams, ap)
		}
		return nil
	})
	fs.StringVar(&cfg.ResolvConf, "resolv-conf", "/etc/resolv.conf", "the resolv.conf whose nameservers the DNS forwarder asks when the kernel names none")
	fs.BoolVar(&cfg.RequireCapture, "require-capture", false, "/ready fails while the pod's capture does not answer (CNI mode: a pod the plugin did not capture never\nbecomes ready, and its app never starts)")
	return cfg, logFormat, logLevel
}
