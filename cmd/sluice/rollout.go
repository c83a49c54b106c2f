package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"net/netip"
	"os"
	"strings"
	"time"

	"github.com/sluicemesh/sluice/kube"
	"github.com/sluicemesh/sluice/loader"
	"github.com/sluicemesh/sluice/rollout"
	"github.com/sluicemesh/sluice/rollout/plant"
)

func rolloutCommand(ctx context.Context, fs *flag.FlagSet, c command, args []string, target func() (loader.Target, error), stdout io.Writer) error {
	to := fs.String("to", "", "the canary backend: ADDRESS:PORT for a pod's route, the backend Service's name for --httproute/--tcproute")
	step := fs.Uint("step", 10, "percent of new connections moved to the canary per step")
	interval := fs.Duration("interval", 30*time.Second, "how long each step runs before it is judged")
	maxFail := fs.Float64("max-connect-failure-ratio", 0.05, "how much higher the canary's share of failed connects may be than the stable backend's")
	maxLat := fs.Duration("max-connect-latency", 50*time.Millisecond, "how much slower the canary's mean connect latency may be than the stable backend's")
	minConnects := fs.Uint64("min-connects", 1, "connects to the canary a step needs before it is judged")
	maxWait := fs.Duration("max-wait", 0, "how long a step may run on waiting for --min-connects before the rollout rolls back (default 5 intervals)")
	metrics := fs.String("metrics", "http://127.0.0.1:9102", "the node agent's address (sluice agent --metrics-addr), where the pod's measurements come from")
	httpRoute := fs.String("httproute", "", "roll out a Gateway API HTTPRoute, NAMESPACE/NAME, in the cluster (instead of --cgroup's pod route)")
	tcpRoute := fs.String("tcproute", "", "roll out a Gateway API TCPRoute, NAMESPACE/NAME, in the cluster")
	prometheus := fs.String("prometheus", "", "with --httproute/--tcproute: the Prometheus that scrapes the node agents, where every pod's measurements come from")
	kubeconfig := fs.String("kubeconfig", os.Getenv("KUBECONFIG"), "with --httproute/--tcproute: the cluster's kubeconfig (default $KUBECONFIG, else the pod's service account)")
	if err := parseInterspersed(fs, c, args, stdout); err != nil {
		return err
	}
	cfg := rollout.Config{Step: uint32(min(*step, math.MaxUint32)), Interval: *interval, MaxFailureRatio: *maxFail, MaxLatency: *maxLat,
		MinConnects: *minConnects, MaxWait: *maxWait, Canary: *to}
	if err := cfg.Validate(); err != nil {
		return usageError{err.Error()}
	}
	var p rollout.Plant
	var err error
	if *httpRoute != "" || *tcpRoute != "" {
		p, cfg.Service, err = gatewayPlant(ctx, fs, *httpRoute, *tcpRoute, *prometheus, *kubeconfig, *to)
	} else {
		p, cfg.Service, err = podPlant(fs, &cfg, target, *metrics, *prometheus)
	}
	if err != nil {
		return err
	}
	log, _ := newLogger(os.Stderr, "text", "info")
	err = rollout.Run(ctx, cfg, p, log)
	switch {
	case errors.Is(err, context.Canceled):
		return fmt.Errorf("rollout of %s interrupted: the weights stay where they were", cfg.Service)
	case err != nil && !errors.Is(err, rollout.ErrRolledBack):
		return fmt.Errorf("rollout of %s stopped, the weights where they were: %w", cfg.Service, err)
	case err != nil:
		return err
	}
	fmt.Fprintf(stdout, "rollout of %s to %s done: the canary takes every new connection\n", cfg.Service, cfg.Canary)
	return nil
}

// podPlant is a rollout of the route of one pod (--cgroup VIP:PORT),
// measured by its node's agent.
func podPlant(fs *flag.FlagSet, cfg *rollout.Config, target func() (loader.Target, error), metrics, prometheus string) (rollout.Plant, string, error) {
	if prometheus != "" {
		return nil, "", usageError{"--prometheus is for --httproute/--tcproute: a pod's route is measured by its node's agent (--metrics)"}
	}
	svc, err := serviceArg(fs)
	if err != nil {
		return nil, "", err
	}
	canary, err := netip.ParseAddrPort(cfg.Canary)
	if err != nil {
		return nil, "", usageError{fmt.Sprintf("--to %q: want the canary's ADDRESS:PORT", cfg.Canary)}
	}
	cfg.Canary = canary.String() // as the route lists it
	t, err := target()
	if err != nil {
		return nil, "", err
	}
	if !strings.Contains(metrics, "://") {
		metrics = "http://" + metrics
	}
	return plant.New(t, svc, canary, metrics), svc.String(), nil
}

// gatewayPlant is a rollout of a Gateway API route in the cluster: its
// weights patched, every node's agent carrying them into its pods, measured
// by Prometheus.
func gatewayPlant(ctx context.Context, fs *flag.FlagSet, httpRoute, tcpRoute, prometheus, kubeconfig, canary string) (rollout.Plant, string, error) {
	kind, ref := "httproute", httpRoute
	if tcpRoute != "" {
		kind, ref = "tcproute", tcpRoute
	}
	ns, name, ok := strings.Cut(ref, "/")
	switch {
	case httpRoute != "" && tcpRoute != "":
		return nil, "", usageError{"--httproute and --tcproute: give one route"}
	case fs.NArg() > 0:
		return nil, "", usageError{fmt.Sprintf("--%s names the route: drop %q", kind, fs.Arg(0))}
	case !ok || ns == "" || name == "" || strings.Contains(name, "/"):
		return nil, "", usageError{fmt.Sprintf("--%s %q: want NAMESPACE/NAME", kind, ref)}
	case prometheus == "":
		return nil, "", usageError{fmt.Sprintf("--%s needs --prometheus URL: the Prometheus that scrapes the node agents (deploy/prometheus), where the canary's connects are measured", kind)}
	case strings.Contains(canary, ":"):
		return nil, "", usageError{fmt.Sprintf("--to %q: with --%s, the canary is a backend Service's name", canary, kind)}
	}
	for _, pod := range []string{"cgroup", "pin-dir", "metrics"} {
		if f := fs.Lookup(pod); f != nil && f.Value.String() != f.DefValue {
			return nil, "", usageError{fmt.Sprintf("--%s is for a pod's route: --%s is measured by Prometheus across the cluster", pod, kind)}
		}
	}
	var api *kube.Client
	var err error
	if kubeconfig != "" {
		api, err = kube.FromKubeconfig(kubeconfig)
	} else if api, err = kube.InCluster(); err != nil {
		err = fmt.Errorf("%v (give --kubeconfig outside a pod)", err)
	}
	if err != nil {
		return nil, "", usageError{fmt.Sprintf("--kubeconfig: %v", err)}
	}
	if !strings.Contains(prometheus, "://") {
		prometheus = "http://" + prometheus
	}
	p, err := plant.NewGateway(ctx, api, strings.TrimSuffix(prometheus, "/"), kind, ns, name, canary)
	return p, kind + " " + ref, err
}
