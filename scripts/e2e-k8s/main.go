// Command e2e-k8s builds and starts a real single-node Kubernetes on this
// machine, with no registry, no Docker and no internet, runs a busybox pod
// to Ready and tears everything down to the host's baseline.
//
//	go run ./scripts/e2e-k8s [-version v1.34.4] [-cache /var/cache/sluice-e2e] [-run /var/lib/sluice-e2e/run] [-keep] [-sluice-image results/sluice-image.tar]
//
// The Kubernetes binaries (kube-apiserver, kube-controller-manager,
// kube-scheduler, kubelet, kubectl) are built from Go modules, once per
// version, into -cache; etcd, containerd, runc and the CNI plugins are the
// Debian packages (make deps). The images are packed here: a pause image
// (scripts/e2e-k8s/pause) and a busybox one from /bin/busybox, imported with
// ctr, and pods use imagePullPolicy: Never.
//
// Every piece of state lives under -run: certificates, kubeconfigs, etcd's
// data, containerd's root, state and socket, the kubelet's root and pod logs,
// the CNI configuration and IP allocations. The few host paths the tools
// write regardless (/run/containerd, /var/lib/kubelet/device-plugins, the
// CNI network namespaces and cache, cgroups, sysctls the kubelet sets) are
// recorded before and removed or restored after.
//
// With -sluice-image it also imports the Sluice image and runs the Sluice
// checks (checks.go): pods without Sluice untouched, the agent DaemonSet
// (every pod's flow series are its), deploy/pod/pod-template.yaml (app:
// busybox httpd) capturing outbound and inbound connections, the Istio and
// Linkerd drop-ins capturing both ways, the agent collecting a deleted
// pod's pins, a canary route set through the agent, restarts, a real
// Prometheus with deploy/'s scrape jobs, and offload by annotation. Any
// failed check fails the run (after teardown).
//
// It needs root. Versions 1.35 and later refuse hosts with cgroup v1
// controllers; 1.34 runs on hybrid hosts with failCgroupV1: false.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"regexp"
	"syscall"
	"time"
)

type options struct {
	version     string
	cache       string
	run         string
	keep        bool
	sluiceImage string
	template    string
	timeout     time.Duration
}

func main() {
	var o options
	flag.StringVar(&o.version, "version", "v1.34.4", "the Kubernetes version to build and run (1.34.x: later ones refuse cgroup v1 hosts)")
	flag.StringVar(&o.cache, "cache", "/var/cache/sluice-e2e", "where the Kubernetes binaries and images are built once, per version")
	flag.StringVar(&o.run, "run", "/var/lib/sluice-e2e/run", "the run directory holding all cluster state; removed at the end")
	flag.BoolVar(&o.keep, "keep", false, "leave the cluster running, even after a failed check, to look at it (Ctrl-C tears it down)")
	flag.StringVar(&o.sluiceImage, "sluice-image", "", "also import this Sluice image archive (make image) and run the Sluice checks (deploy/ on the cluster)")
	flag.StringVar(&o.template, "template", "deploy/pod/pod-template.yaml", "the pod template checked with -sluice-image")
	flag.DurationVar(&o.timeout, "timeout", 3*time.Minute, "how long the cluster and each pod may take to be ready")
	flag.Parse()
	if flag.NArg() > 0 {
		fmt.Fprintf(os.Stderr, "e2e-k8s: unexpected arguments %q\n", flag.Args())
		os.Exit(2)
	}
	slog.SetDefault(slog.New(slog.NewTextHandler(os.Stderr, nil)))
	if err := run(o); err != nil {
		slog.Error("e2e-k8s failed", "err", err)
		os.Exit(1)
	}
}

// plan is every path and address of one run, derived from the options.
type plan struct {
	options
	minor   string // "34"
	binDir  string // the cached Kubernetes binaries of this version
	repo    string // the Sluice checkout (this command runs from it)
	node    string // the node's name
	nodeIP  string // the bridge's address: the node's InternalIP, the apiserver's and kubelet's
	bridge  string
	podCIDR string
	svcCIDR string
	apiPort int
	etcdURL string
	peerURL string
}

var versionRE = regexp.MustCompile(`^v1\.(\d+)\.\d+$`)

func newPlan(o options) (plan, error) {
	m := versionRE.FindStringSubmatch(o.version)
	if m == nil {
		return plan{}, fmt.Errorf("bad -version %q: want v1.MINOR.PATCH", o.version)
	}
	repo, err := os.Getwd()
	if err != nil {
		return plan{}, err
	}
	for _, p := range []*string{&o.cache, &o.run, &o.sluiceImage, &o.template} {
		if *p != "" {
			if *p, err = filepath.Abs(*p); err != nil {
				return plan{}, err
			}
		}
	}
	return plan{
		options: o,
		minor:   m[1],
		binDir:  filepath.Join(o.cache, "k8s-"+o.version, "bin"),
		repo:    repo,
		node:    "sluice-e2e",
		nodeIP:  "198.18.240.1",
		bridge:  "sluicee2e0",
		podCIDR: "198.18.240.0/24",
		svcCIDR: "198.19.128.0/20",
		apiPort: 6443,
		etcdURL: "http://127.0.0.1:23790",
		peerURL: "http://127.0.0.1:23800",
	}, nil
}

// path is a path in the run directory.
func (p plan) path(elem ...string) string { return filepath.Join(append([]string{p.run}, elem...)...) }

// timings are what the run prints at the end.
type timings struct {
	build, images, up, podReady, sluicePod, down time.Duration
	servers, agent, collect                      time.Duration
	dropIns                                      [][2]string // mesh, apply to Ready
	offloadPod                                   time.Duration
	podStart                                     [][2]string      // how web was started, apply to Ready
	routePatch                                   [2]time.Duration // HTTPRoute patch to the client's kernel route: p50, p90
	buildCached                                  bool
}

func run(o options) error {
	if os.Geteuid() != 0 {
		return errors.New("needs root (it runs a kubelet, containerd and network namespaces)")
	}
	p, err := newPlan(o)
	if err != nil {
		return err
	}
	if err := checkTools(); err != nil {
		return err
	}
	var t timings
	start := time.Now()
	if t.buildCached, err = buildKubernetes(p); err != nil {
		return fmt.Errorf("build kubernetes %s: %w", p.version, err)
	}
	t.build = time.Since(start)
	start = time.Now()
	imgs, err := buildImages(p)
	if err != nil {
		return fmt.Errorf("images: %w", err)
	}
	t.images = time.Since(start)

	base, err := snapshot()
	if err != nil {
		return fmt.Errorf("record the host's baseline: %w", err)
	}
	c := &cluster{plan: p, base: base}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	err = c.exercise(ctx, imgs, &t)
	if err != nil && errors.Is(ctx.Err(), context.Canceled) {
		err = fmt.Errorf("interrupted: %w", err)
	}
	if p.keep && ctx.Err() == nil {
		slog.Info("cluster kept running: Ctrl-C tears it down", "kubeconfig", p.path("pki", "admin.kubeconfig"),
			"kubectl", filepath.Join(p.binDir, "kubectl"))
		<-ctx.Done()
	}
	start = time.Now()
	downErr := c.teardown()
	if c.checks != nil {
		c.checks.printSummary()
	}
	t.down = time.Since(start)
	t.print()
	if err = errors.Join(err, downErr); err != nil {
		return err
	}
	fmt.Printf("memory (RSS) at Ready %7.2f GiB  (etcd, containerd, apiserver, controller-manager, scheduler, kubelet)\n", float64(c.rssAtReady)/(1<<30))
	return nil
}

// exercise brings the cluster up, runs the pods and returns; teardown is
// the caller's, whatever happened.
func (c *cluster) exercise(ctx context.Context, imgs images, t *timings) error {
	start := time.Now()
	if err := c.up(ctx, imgs); err != nil {
		return fmt.Errorf("cluster up: %w", err)
	}
	t.up = time.Since(start)
	slog.Info("cluster up", "took", t.up.Round(time.Millisecond))
	var err error
	if t.podReady, err = c.runBusybox(ctx, imgs); err != nil {
		return fmt.Errorf("busybox pod: %w", err)
	}
	slog.Info("busybox pod ready", "took", t.podReady.Round(time.Millisecond))
	if c.sluiceImage != "" {
		k, err := c.sluiceChecks(ctx, imgs, t)
		c.checks = k
		if err != nil {
			return fmt.Errorf("sluice checks: %w", err)
		}
	}
	return nil
}

func (t timings) print() {
	kind := "cold"
	if t.buildCached {
		kind = "warm (cached)"
	}
	fmt.Printf("build %-14s %8.1fs\n", kind, t.build.Seconds())
	fmt.Printf("images               %8.1fs\n", t.images.Seconds())
	fmt.Printf("cluster up           %8.1fs\n", t.up.Seconds())
	fmt.Printf("busybox pod Ready    %8.1fs\n", t.podReady.Seconds())
	if t.servers > 0 {
		fmt.Printf("server pods Ready    %8.1fs  (two, no Sluice)\n", t.servers.Seconds())
	}
	if t.agent > 0 {
		fmt.Printf("agent Ready          %8.1fs\n", t.agent.Seconds())
	}
	if t.sluicePod > 0 {
		fmt.Printf("sluice pod Ready     %8.1fs  (pod-template.yaml)\n", t.sluicePod.Seconds())
	}
	for _, d := range t.dropIns {
		fmt.Printf("%-8s drop-in Ready %6s\n", d[0], d[1])
	}
	if t.offloadPod > 0 {
		fmt.Printf("offload pod Ready    %8.1fs  (pod-template.yaml + sluice.dev/ annotations)\n", t.offloadPod.Seconds())
	}
	for _, d := range t.podStart {
		fmt.Printf("web Ready %-30s %6s  (create -> Ready)\n", d[0], d[1])
	}
	if t.routePatch[0] > 0 {
		fmt.Printf("HTTPRoute patch -> kernel route  p50 %v, p90 %v\n", t.routePatch[0].Round(time.Millisecond), t.routePatch[1].Round(time.Millisecond))
	}
	if t.collect > 0 {
		fmt.Printf("agent collected pins %8.1fs  after the pod's deletion\n", t.collect.Seconds())
	}
	fmt.Printf("teardown             %8.1fs\n", t.down.Seconds())
}
