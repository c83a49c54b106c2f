package main

import (
	"cmp"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"time"

	"github.com/sluicemesh/sluice/agent"
	"github.com/sluicemesh/sluice/kube"
	"github.com/sluicemesh/sluice/loader"
)

const agentHelp = `Usage: sluice agent [--pin-root DIR] [--metrics-addr :9102] [--gc-interval 30s] [--once] [--cni-bin-dir DIR --cni-conf-dir DIR] [--kubernetes [--kubeconfig FILE]]

Runs once per node (a DaemonSet). It follows every pod installed under
--pin-root and serves, on --metrics-addr, /metrics (each pod's flows as the
kernel measured them, with Istio's layer-4 names and labels and the
identity install recorded, its kernel counters and canary routes, each
series labelled with the pod's cgroup and Kubernetes pod uid; and the
agent's own figures), /flows?pod=UID (a pod's open flows, or with
follow=true each as it opens and closes: what 'sluice flows' shows) and
/pods (every install and its state, JSON). It is the only reader of the
node's flow ring (256 KiB a CPU, at least 1 MiB): flow events of a time it
is down wait there for the next agent, and those that do not fit are
counted by the kernel, per pod, so the counters stay exact.
Treat --metrics-addr as sensitive: /flows lists every peer of every pod.
Every --gc-interval it uninstalls the pods whose cgroup is gone: a pod
deleted without its capture being uninstalled leaves pins and links that
only an uninstall removes. Then it moves every pod that runs another
Sluice build onto its own (--upgrade, on by default): each of the pod's
links is updated in place under traffic, with the plan its install
recorded, and the old build's programs go with its last pod. So rolling
out a new agent upgrades the node's pods without restarting them. A pod
installed by a build that did not record its plan stays until its install
reruns (said once in the log). Capture runs from the pins, never through
the agent: restarting it interrupts nothing. --once collects, upgrades,
prints the pods as JSON and exits.

With --cni-bin-dir and --cni-conf-dir (the host's, mounted in) it installs
the sluice-cni plugin on the node: copies itself there as sluice-cni and
chains it last into the primary network configuration, and puts either
back as soon as something removes or rewrites it (it watches both
directories), and on every pass. The plugin then
installs capture, as the init container would, on each pod annotated
sluice.dev/capture: "true" when its sandbox is made (sluice inject --cni
writes such pods), and removes it when the sandbox goes: the pods need no
privilege. --cni-uninstall takes the plugin out again (pods it captured
stay so until they go).

With --kubernetes it routes from the cluster's own objects (its service
account, or --kubeconfig, reads Services, EndpointSlices, and Gateway
API's HTTPRoutes and TCPRoutes once their CRDs are installed; RBAC in
deploy/agent/): an HTTPRoute or TCPRoute whose parentRef is a Service
splits every captured pod's connections to that Service's cluster IP and
port over the ready endpoints of its backendRefs' Services, by weight, in
round-robin: patching the weights, or an endpoint becoming ready or not,
changes every pod's route at once, and open connections stay where they
are. A route the kernel cannot carry out (several rules, matches on
requests, filters, more than 16 endpoints, a cross-namespace backend) is
left out whole and gets a Warning event (reason NotInKernel). Routes set by
hand on other services are left alone. When the API server is
unreachable, the routes in force stay.

Routes for many pods at once: 'sluice route apply --pods PATTERN -f FILE'
in the agent's container (PATTERN matches cgroup paths, * for any text).

Examples:
  sluice agent
  sluice agent --once --pin-root /sys/fs/bpf/sluice`

func agentCommand() command {
	c := command{
		name:    "agent",
		summary: "node agent: every pod's metrics on one endpoint, collect gone pods, upgrade pods of other builds in place",
		help:    agentHelp,
	}
	c.run = func(ctx context.Context, args []string, stdout io.Writer) error {
		fs := flag.NewFlagSet("agent", flag.ContinueOnError)
		pinRoot := fs.String("pin-root", loader.DefaultPinRoot, "where every pod's pins are")
		metricsAddr := fs.String("metrics-addr", ":9102", "where to serve /metrics, /flows and /pods")
		istioMetrics := fs.Bool("istio-metrics", false, "name the pods' layer-4 counters istio_tcp_* instead of sluice_tcp_* (for pods with no other Istio proxy)")
		maxDestinations := fs.Int("max-destinations", 100, "distinct destination_service label values of a pod before the rest count as \"other\"")
		interval := fs.Duration("gc-interval", 30*time.Second, "how often to collect pods whose cgroup is gone")
		once := fs.Bool("once", false, "collect (and upgrade) once, print the pods as JSON, exit")
		upgrade := fs.Bool("upgrade", true, "move pods that run another Sluice build onto this one, in place")
		cniBin := fs.String("cni-bin-dir", "", "install the sluice-cni plugin: the node's CNI bin directory (e.g. /host/opt/cni/bin); with --cni-conf-dir")
		cniConf := fs.String("cni-conf-dir", "", "the node's CNI network configuration directory (e.g. /host/etc/cni/net.d), whose primary\nconflist gets sluice-cni chained last and kept so")
		cniCgroupRoot := fs.String("cni-cgroup-root", "", "the kubelet's --cgroup-root, below the cgroup2 mount, where the plugin finds pods (default: the top)")
		cniUninstall := fs.Bool("cni-uninstall", false, "take sluice-cni out of --cni-conf-dir and --cni-bin-dir, then exit")
		kubernetes := fs.Bool("kubernetes", false, "route every captured pod from the cluster's Gateway API routes whose parent is a Service (read with the\nagent's service account, or --kubeconfig)")
		kubeconfig := fs.String("kubeconfig", "", "with --kubernetes: the cluster's kubeconfig, instead of the pod's service account")
		logFormat := fs.String("log-format", "text", "text or json")
		logLevel := fs.String("log-level", "info", "debug, info, warn or error")
		if err := parseFlags(fs, c, args, stdout); err != nil {
			return err
		}
		if *maxDestinations < 1 {
			return usageError{fmt.Sprintf("--max-destinations %d: want at least 1", *maxDestinations)}
		}
		if *interval <= 0 {
			return usageError{fmt.Sprintf("--gc-interval %v: want a positive duration, e.g. 30s", *interval)}
		}
		log, err := newLogger(os.Stderr, *logFormat, *logLevel)
		if err != nil {
			return err
		}
		if err := requireRoot(); err != nil {
			return err
		}
		if (*cniBin == "") != (*cniConf == "") {
			return usageError{"--cni-bin-dir and --cni-conf-dir go together: the plugin's binary and its entry in the network configuration"}
		}
		var cniOpts *agent.CNI
		if *cniBin != "" {
			self, err := os.Executable()
			if err != nil {
				return err
			}
			cniOpts = &agent.CNI{BinDir: *cniBin, ConfDir: *cniConf, Self: self, PinRoot: *pinRoot, CgroupRoot: *cniCgroupRoot}
		}
		if *cniUninstall {
			if cniOpts == nil {
				return usageError{"--cni-uninstall needs --cni-bin-dir and --cni-conf-dir"}
			}
			return agent.RemoveCNI(*cniOpts)
		}
		if *kubeconfig != "" && !*kubernetes {
			return usageError{"--kubeconfig is for --kubernetes: add --kubernetes to route from the cluster"}
		}
		var watcher *kube.Watcher
		if *kubernetes {
			var api *kube.Client
			if *kubeconfig != "" {
				if api, err = kube.FromKubeconfig(*kubeconfig); err != nil {
					return usageError{fmt.Sprintf("--kubeconfig: %v", err)}
				}
			} else if api, err = kube.InCluster(); err != nil {
				return usageError{fmt.Sprintf("--kubernetes: %v (give --kubeconfig outside a pod)", err)}
			}
			node, _ := os.Hostname()
			watcher = kube.New(api, cmp.Or(os.Getenv("NODE_NAME"), node), log)
		}
		opts := agent.Options{PinRoot: *pinRoot, IstioNames: *istioMetrics, MaxDestinations: *maxDestinations, Upgrade: *upgrade, CNI: cniOpts, Logger: log}
		if watcher != nil {
			opts.Peers = watcher.Peer
		}
		a := agent.New(opts)
		if *once {
			cerr := a.Maintain()
			pods, err := a.Pods()
			if err != nil {
				return errors.Join(cerr, err)
			}
			return errors.Join(cerr, writeJSON(stdout, pods))
		}
		ln, err := net.Listen("tcp", *metricsAddr)
		if err != nil {
			return fmt.Errorf("listen on --metrics-addr %s: %w", *metricsAddr, err)
		}
		srv := &http.Server{Handler: a.Handler(), ReadHeaderTimeout: 10 * time.Second}
		go srv.Serve(ln)
		log.Info("agent running", "pin_root", *pinRoot, "metrics_addr", ln.Addr().String(), "gc_interval", interval.String())
		if watcher != nil {
			go watcher.Run(ctx, 30*time.Second)
			go a.FollowCluster(ctx, watcher, time.Second)
		}
		a.Run(ctx, *interval)
		shutdown, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		return srv.Shutdown(shutdown)
	}
	return c
}
