// Command scale measures what Sluice costs a node: install time per pod
// against iptables-restore of Istio's rule sets in the same run, the kernel
// memory of N installed idle pods, and the memory of one pod holding M open
// captured connections, then after they close.
//
//	go run ./scripts/scale -sluice bin/sluice [-pods 1000] [-conns 10000] [-json FILE]
//	go run ./scripts/scale -quick -max-install-ratio 14 -max-idle-kib 300
//
// -quick installs 40 pods and skips the open connections; with
// -max-install-ratio and -max-idle-kib it exits 1, naming the figure and
// the limit, when install time per pod (median, as a ratio to the
// iptables-restore baseline) or kernel memory per idle pod passes its limit
// (make bench-quick, which make test runs).
//
// It needs root and builds everything it measures itself (cgroups below the
// cgroup2 mount, a test bed pod, network namespaces), then removes it.
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sluicemesh/sluice/internal/nsenter"
	"github.com/sluicemesh/sluice/internal/testbed"
	"github.com/sluicemesh/sluice/loader"
	"github.com/sluicemesh/sluice/proxy"
	"github.com/sluicemesh/sluice/redirect"
)

// roleEnv makes this binary the "acceptor" inside the pod: it plays the
// sidecar (accepts, asks SO_ORIGINAL_DST, holds); testbed's hold helper
// plays the app.
const roleEnv = "SLUICE_SCALE_ROLE"

// maxNodePods is how many pods one build holds on a node (MAX_PODS - 1).
const maxNodePods = 2047

func main() {
	testbed.RunHelperIfRequested()
	switch os.Getenv(roleEnv) {
	case "acceptor":
		exitOn(acceptor(os.Args[1:]))
	case "connlat":
		exitOn(connLat(os.Args[1:]))
	}
	sluice := flag.String("sluice", "bin/sluice", "the sluice binary to install with")
	pods := flag.Int("pods", 1000, "idle pods to install")
	conns := flag.Int("conns", 10000, "open connections in one pod")
	rounds := flag.Int("iptables-rounds", 50, "iptables-restore runs for the baseline")
	jsonOut := flag.String("json", "", "also write every figure as JSON to this file")
	quick := flag.Bool("quick", false, "40 pods and 40 iptables-restore runs unless -pods or -iptables-rounds say otherwise; no open connections")
	maxRatio := flag.Float64("max-install-ratio", 0, "fail when install time per pod over iptables-restore's (medians) passes this (0: no limit)")
	maxResident := flag.Float64("max-resident-ratio", 0, "fail when install time per pod by a resident process (this one, warm) over iptables-restore's (medians) passes this (0: no limit)")
	maxIdle := flag.Float64("max-idle-kib", 0, "fail when the kernel memory one more idle pod adds passes this many KiB (0: no limit)")
	limitsFrom := flag.String("limits-from", "", "where the limits are set, named when one is passed (e.g. Makefile)")
	series := flag.String("series", "", "also run these series, comma-separated: pods, cidrs, held, routes, or all")
	podPoints := flag.String("pod-points", "1,10,100,1000", "series pods: pods on the node at each point")
	cidrPoints := flag.String("cidr-points", "0,100,1000,2000", "series cidrs: excluded CIDRs at each point")
	heldPoints := flag.String("held-points", "1000,10000,50000", "series held: connections held at each point")
	routePoints := flag.String("route-points", "0,1,64,128", "series routes: canary routes at each point")
	seconds := flag.Float64("seconds", 2, "series: seconds of each connection-rate run")
	connects := flag.Int("connects", 500, "series routes: connects timed at each point")
	plots := flag.String("plots", "", "series: write results/scale-<series>.png here (default: the -json file's directory)")
	flag.Parse()
	if *quick {
		set := map[string]bool{}
		flag.Visit(func(f *flag.Flag) { set[f.Name] = true })
		if !set["pods"] {
			*pods = 40
		}
		if !set["iptables-rounds"] {
			*rounds = 40
		}
		if !set["conns"] {
			*conns = 0
		}
	}
	if os.Geteuid() != 0 {
		fmt.Fprintln(os.Stderr, "scale: needs root (cgroups, BPF, network namespaces): run it as root")
		os.Exit(1)
	}
	exe, err := filepath.Abs(*sluice)
	if err == nil {
		_, err = os.Stat(exe)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "scale: no sluice binary at %s: build it with 'make build' or pass -sluice\n", *sluice)
		os.Exit(1)
	}
	var r report
	if err := run(exe, *pods, *conns, *rounds, &r); err != nil {
		fmt.Fprintf(os.Stderr, "scale: %v\n", err)
		os.Exit(1)
	}
	r.print(os.Stdout)
	if *series != "" {
		if err := r.runSeries(exe, *series, *podPoints, *cidrPoints, *heldPoints, *routePoints, *seconds, *connects); err != nil {
			fmt.Fprintf(os.Stderr, "scale: %v\n", err)
			os.Exit(1)
		}
		r.Series.print(os.Stdout)
		dir := *plots
		if dir == "" && *jsonOut != "" {
			dir = filepath.Dir(*jsonOut)
		}
		if dir != "" {
			if err := r.Series.plot(dir); err != nil {
				fmt.Fprintf(os.Stderr, "scale: plot: %v\n", err)
				os.Exit(1)
			}
		}
	}
	if *jsonOut != "" {
		data, _ := json.MarshalIndent(r, "", "  ")
		if err := os.WriteFile(*jsonOut, data, 0o644); err != nil {
			fmt.Fprintf(os.Stderr, "scale: %v\n", err)
			os.Exit(1)
		}
	}
	if msgs := r.overLimits(limits{installRatio: *maxRatio, residentRatio: *maxResident, idleKiB: *maxIdle}, *limitsFrom); len(msgs) > 0 {
		for _, m := range msgs {
			fmt.Fprintln(os.Stderr, m)
		}
		os.Exit(1)
	}
}

// limits are the guard's: 0 is no limit.
type limits struct {
	installRatio  float64 // exec'd install over iptables-restore, medians
	residentRatio float64 // resident install over iptables-restore, medians
	idleKiB       float64 // kernel memory one more idle pod adds
}

// overLimits says, one line each, which figure passed its limit.
func (r report) overLimits(l limits, from string) []string {
	maxRatio, maxIdleKiB := l.installRatio, l.idleKiB
	where := func(flag, variable string, limit float64) string {
		if from == "" {
			return fmt.Sprintf("-%s %g", flag, limit)
		}
		return fmt.Sprintf("%s=%g, set in %s", variable, limit, from)
	}
	var msgs []string
	if ratio := r.InstallMedianMs / r.IPTablesMs; maxRatio > 0 && ratio > maxRatio {
		msgs = append(msgs, fmt.Sprintf("scale: FAIL install time per pod is %.2fx iptables-restore of Istio's rules (sluice %.1f ms / iptables %.1f ms, medians over %d pods), above the limit %s",
			ratio, r.InstallMedianMs, r.IPTablesMs, r.Pods, where("max-install-ratio", "MAX_INSTALL_RATIO", maxRatio)))
	}
	if ratio := r.ResidentMedianMs / r.IPTablesMs; l.residentRatio > 0 && ratio > l.residentRatio {
		msgs = append(msgs, fmt.Sprintf("scale: FAIL install time per pod by a resident process is %.2fx iptables-restore of Istio's rules (sluice %.2f ms / iptables %.1f ms, medians over %d pods), above the limit %s",
			ratio, r.ResidentMedianMs, r.IPTablesMs, r.Pods, where("max-resident-ratio", "MAX_RESIDENT_RATIO", l.residentRatio)))
	}
	if maxIdleKiB > 0 && r.IdlePodKiB > maxIdleKiB {
		msgs = append(msgs, fmt.Sprintf("scale: FAIL kernel memory per idle pod is %.0f KiB (%d pods), above the limit %s",
			r.IdlePodKiB, r.Pods, where("max-idle-kib", "MAX_IDLE_KIB", maxIdleKiB)))
	}
	return msgs
}

func exitOn(err error) {
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	os.Exit(0)
}

type report struct {
	Pods            int     `json:"pods"`
	InstallMedianMs float64 `json:"install_median_ms"`
	InstallP90Ms    float64 `json:"install_p90_ms"`
	InstallMaxMs    float64 `json:"install_max_ms"`
	IPTablesMs      float64 `json:"iptables_restore_median_ms"`
	// Install by a resident process (loader.Install called by the
	// benchmark, warm): the install's own work, without a process's start.
	ResidentPods     int     `json:"resident_pods"`
	ResidentMedianMs float64 `json:"resident_install_median_ms"`
	ResidentP90Ms    float64 `json:"resident_install_p90_ms"`
	UninstallMedMs   float64 `json:"uninstall_median_ms"`
	IdlePodKiB       float64 `json:"idle_pod_kib"` // its own maps and its node map entries
	NodeMiB          float64 `json:"all_pods_mib"` // the pods' own maps
	NodeStateMiB     float64 `json:"node_state_mib"`
	FirstPodKiB      float64 `json:"first_pod_kib"`

	Conns           int     `json:"conns"`
	ConnPodKiB      float64 `json:"pod_with_conns_kib"`
	ConnSocketKiB   float64 `json:"socket_storage_with_conns_kib"`
	ConnHandshakes  int     `json:"handshake_entries_with_conns"`
	AfterPodKiB     float64 `json:"pod_after_close_kib"`
	AfterSocketKiB  float64 `json:"socket_storage_after_close_kib"`
	AfterHandshakes int     `json:"handshake_entries_after_close"`
	ConnsAnswered   int     `json:"conns_answered_original_dst"`

	Series *Series `json:"series,omitempty"`
}

func (r report) print(w io.Writer) {
	fmt.Fprintf(w, "\n| install, per pod (exec of sluice install, %d pods) | ms |\n| --- | --- |\n", r.Pods)
	fmt.Fprintf(w, "| median | %.1f |\n| p90 | %.1f |\n| max | %.1f |\n", r.InstallMedianMs, r.InstallP90Ms, r.InstallMaxMs)
	fmt.Fprintf(w, "| iptables-restore + ip6tables-restore of Istio's rules in a fresh netns, median | %.1f |\n", r.IPTablesMs)
	fmt.Fprintf(w, "| ratio sluice / iptables (median) | %.2f |\n", r.InstallMedianMs/r.IPTablesMs)
	fmt.Fprintf(w, "| install by a resident process (the agent's, for a CNI plugin), %d more pods: median / p90 | %.1f / %.1f |\n", r.ResidentPods, r.ResidentMedianMs, r.ResidentP90Ms)
	fmt.Fprintf(w, "| ratio resident install / iptables (median) | %.2f |\n", r.ResidentMedianMs/r.IPTablesMs)
	fmt.Fprintf(w, "| uninstall, median | %.1f |\n", r.UninstallMedMs)
	fmt.Fprintf(w, "\n| kernel memory (memlock of maps and programs) | |\n| --- | --- |\n")
	fmt.Fprintf(w, "| one idle pod's own maps | %.0f KiB |\n| %d idle pods' own maps | %.1f MiB |\n", r.FirstPodKiB, r.Pods, r.NodeMiB)
	fmt.Fprintf(w, "| the node's programs and maps, shared by the %d pods | %.1f MiB |\n", r.Pods, r.NodeStateMiB)
	fmt.Fprintf(w, "| what one more idle pod adds (own maps and its node map entries) | %.0f KiB |\n", r.IdlePodKiB)
	if r.Conns == 0 {
		return
	}
	fmt.Fprintf(w, "| one pod, %d open captured connections: maps and programs | %.0f KiB |\n", r.Conns, r.ConnPodKiB)
	fmt.Fprintf(w, "| ... their socket storage (ss -m optmem, app and sidecar sockets) | %.0f KiB (%.0f bytes per connection) |\n", r.ConnSocketKiB, r.ConnSocketKiB*1024/float64(max(r.Conns, 1)))
	fmt.Fprintf(w, "| ... handshake table entries | %d |\n", r.ConnHandshakes)
	fmt.Fprintf(w, "| after they close: maps and programs / socket storage / handshake entries | %.0f KiB / %.0f KiB / %d |\n", r.AfterPodKiB, r.AfterSocketKiB, r.AfterHandshakes)
	fmt.Fprintf(w, "| connections whose original destination the acceptor got | %d of %d |\n", r.ConnsAnswered, r.Conns)
}

func run(exe string, pods, conns, rounds int, r *report) error {
	// The baseline's runs alternate with the installs, so a busy moment
	// of the machine weighs on both sides of the ratio.
	ipt, err := newIstioRestore()
	if err != nil {
		return fmt.Errorf("iptables baseline: %w", err)
	}
	defer ipt.Close()
	var took []time.Duration
	restore := func(int) error {
		if len(took) >= rounds {
			return nil
		}
		d, err := ipt.once()
		if err != nil {
			return fmt.Errorf("iptables baseline: %w", err)
		}
		took = append(took, d)
		return nil
	}
	if err := idlePods(exe, pods, restore, r); err != nil {
		return fmt.Errorf("idle pods: %w", err)
	}
	for len(took) < rounds {
		if err := restore(0); err != nil {
			return err
		}
	}
	r.IPTablesMs = ms(percentile(took, 50))
	if conns == 0 {
		return nil
	}
	if err := openConns(exe, conns, r); err != nil {
		return fmt.Errorf("open connections: %w", err)
	}
	return nil
}

// istioRules is what istio-iptables writes for the injector's default
// flags (-p 15001 -z 15006 -u 1337 -m REDIRECT -i '*' -x "" -b '*' -d
// 15090,15021,15020), in iptables-save form; %s is the loopback address and
// %s the inbound passthrough source of the family.
const istioRules = `*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:ISTIO_INBOUND - [0:0]
:ISTIO_IN_REDIRECT - [0:0]
:ISTIO_OUTPUT - [0:0]
:ISTIO_REDIRECT - [0:0]
-A PREROUTING -p tcp -j ISTIO_INBOUND
-A OUTPUT -p tcp -j ISTIO_OUTPUT
-A ISTIO_INBOUND -p tcp -m tcp --dport 15008 -j RETURN
-A ISTIO_INBOUND -p tcp -m tcp --dport 15090 -j RETURN
-A ISTIO_INBOUND -p tcp -m tcp --dport 15021 -j RETURN
-A ISTIO_INBOUND -p tcp -m tcp --dport 15020 -j RETURN
-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT
-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
-A ISTIO_OUTPUT -s %[2]s -o lo -j RETURN
-A ISTIO_OUTPUT ! -d %[1]s -o lo -p tcp -m tcp ! --dport 15008 -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT ! -d %[1]s -o lo -m owner --gid-owner 1337 -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -m owner ! --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -d %[1]s -j RETURN
-A ISTIO_OUTPUT -j ISTIO_REDIRECT
-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001
COMMIT
`

// istioRestore does what Istio's init container does in a pod: both rule
// sets restored in a fresh network namespace, each a process of its own as
// istio-iptables runs them.
type istioRestore struct{ dir, v4, v6 string }

func newIstioRestore() (*istioRestore, error) {
	dir, err := os.MkdirTemp("", "sluice-scale-")
	if err != nil {
		return nil, err
	}
	x := &istioRestore{dir: dir, v4: filepath.Join(dir, "v4"), v6: filepath.Join(dir, "v6")}
	err = os.WriteFile(x.v4, fmt.Appendf(nil, istioRules, "127.0.0.1/32", "127.0.0.6/32"), 0o644)
	if err == nil {
		err = os.WriteFile(x.v6, fmt.Appendf(nil, istioRules, "::1/128", "::6/128"), 0o644)
	}
	if err != nil {
		x.Close()
		return nil, err
	}
	return x, nil
}

func (x *istioRestore) Close() { os.RemoveAll(x.dir) }

// once restores both rule sets in a fresh network namespace and says how
// long the two processes took.
func (x *istioRestore) once() (took time.Duration, err error) {
	err = nsenter.DoNew(func() error {
		start := time.Now()
		if err := x.restoreHere(); err != nil {
			return err
		}
		took = time.Since(start)
		return nil
	})
	return took, err
}

// restoreHere runs both restores in the calling thread's network namespace
// (the caller holds its OS thread).
func (x *istioRestore) restoreHere() error {
	for _, step := range [][2]string{{"iptables-restore", x.v4}, {"ip6tables-restore", x.v6}} {
		in, err := os.Open(step[1])
		if err != nil {
			return err
		}
		cmd := exec.Command(step[0])
		cmd.Stdin = in
		out, err := cmd.CombinedOutput()
		in.Close()
		if err != nil {
			return fmt.Errorf("%s: %v: %s", step[0], err, out)
		}
	}
	return nil
}

// idlePods installs pods cgroups (no process, no traffic) one sluice
// install each, as init containers would, and sums their kernel memory;
// before(i) runs before the i-th install, untimed.
func idlePods(exe string, pods int, before func(int) error, r *report) (err error) {
	n, err := newNode(exe, "sluice-scale")
	if err != nil {
		return err
	}
	defer func() { err = errors.Join(err, n.close()) }()
	var installs []time.Duration
	for i := range pods {
		if err := before(i); err != nil {
			return err
		}
		took, err := n.add()
		if err != nil {
			return err
		}
		installs = append(installs, took)
	}
	r.Pods = pods
	r.InstallMedianMs, r.InstallP90Ms, r.InstallMaxMs = ms(percentile(installs, 50)), ms(percentile(installs, 90)), ms(percentile(installs, 100))
	m, err := n.memory()
	if err != nil {
		return err
	}
	r.FirstPodKiB = float64(m.first) / 1024
	r.NodeMiB = float64(m.pods) / (1 << 20)
	r.NodeStateMiB = float64(m.node) / (1 << 20)
	r.IdlePodKiB = float64(m.perPod) / 1024
	// As many again, each installed by this process (warm, as the node's
	// agent would for a CNI plugin), the baseline's runs between them too;
	// as many as the node has room for (a build holds 2,047 pods).
	plan, err := redirect.DefaultPolicy().Plan()
	if err != nil {
		return err
	}
	var resident []time.Duration
	r.ResidentPods = min(pods, maxNodePods-pods)
	for i := range r.ResidentPods {
		if err := before(pods + i); err != nil {
			return err
		}
		took, err := n.addResident(plan)
		if err != nil {
			return err
		}
		resident = append(resident, took)
	}
	if len(resident) > 0 {
		r.ResidentMedianMs, r.ResidentP90Ms = ms(percentile(resident, 50)), ms(percentile(resident, 90))
	}
	uninstalls, err := n.uninstall()
	if err != nil {
		return err
	}
	r.UninstallMedMs = ms(percentile(uninstalls, 50))
	return nil
}

// openConns holds conns captured connections open in one pod: the app's
// sockets and the accepted ones both carry Sluice's per-connection state.
// The "sidecar" only accepts and asks for the original destination, so one
// process holds one descriptor per connection and the node's descriptor
// limit is no bound on the count.
func openConns(exe string, conns int, r *report) (err error) {
	r.Conns = conns
	return inBed(func(pod *testbed.Pod, _ string) (err error) {
		return holdOpen(exe, pod, conns, r)
	})
}

func holdOpen(exe string, pod *testbed.Pod, conns int, r *report) (err error) {
	undo, err := installIn(exe, pod)
	if err != nil {
		return err
	}
	defer func() { err = errors.Join(err, undo()) }()
	target, err := loader.ResolveTarget(pod.Cgroup, "")
	if err != nil {
		return err
	}
	self, cleanup, err := worldExecutable()
	if err != nil {
		return err
	}
	defer cleanup()

	acc, accOut, err := startAcceptor(pod, self)
	if err != nil {
		return err
	}
	// The destination is never dialed: the acceptor holds the app's side.
	// Its report is read as it comes, or a full pipe would stop it accepting.
	dst := netip.AddrPortFrom(netip.MustParseAddr("198.18.200.1"), 8080)
	accepted := make(chan bool, conns)
	go func() {
		lines := bufio.NewScanner(accOut)
		for lines.Scan() {
			accepted <- lines.Text() == dst.String()
		}
		close(accepted)
	}()
	release, err := pod.Hold(self, dst.String(), conns, false)
	if err != nil {
		return err
	}
	for n := 0; n < conns; n++ {
		answered, ok := <-accepted
		if !ok {
			return fmt.Errorf("acceptor ended after %d connections", n)
		}
		if answered {
			r.ConnsAnswered++
		}
	}

	measure := func(podKiB, sockKiB *float64, handshakes *int) (err error) {
		*podKiB, *sockKiB, *handshakes, err = podMemory(pod, target)
		return err
	}
	if err := measure(&r.ConnPodKiB, &r.ConnSocketKiB, &r.ConnHandshakes); err != nil {
		return err
	}
	if err := release(); err != nil {
		return fmt.Errorf("holder: %w", err)
	}
	acc.Process.Kill()
	acc.Wait()
	// Closed sockets linger in FIN states for a moment.
	deadline := time.Now().Add(30 * time.Second)
	for {
		if err := measure(&r.AfterPodKiB, &r.AfterSocketKiB, &r.AfterHandshakes); err != nil {
			return err
		}
		if r.AfterSocketKiB == 0 || time.Now().After(deadline) {
			return nil
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// startAcceptor runs the acceptor (its arguments after the address) as
// the pod's sidecar, uid 1337 on 127.0.0.1:15001, and returns its stdout.
func startAcceptor(pod *testbed.Pod, self string, args ...string) (*exec.Cmd, io.Reader, error) {
	acc := exec.Command(self, append([]string{"127.0.0.1:15001"}, args...)...)
	acc.Env = append(os.Environ(), roleEnv+"=acceptor")
	acc.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 1337, Gid: 1337}}
	accOut, err := acc.StdoutPipe()
	if err != nil {
		return nil, nil, err
	}
	acc.Stderr = os.Stderr
	if err := pod.Start(acc); err != nil {
		return nil, nil, err
	}
	if err := pod.WaitListening(15001, 10*time.Second); err != nil {
		acc.Process.Kill()
		acc.Wait()
		return nil, nil, err
	}
	return acc, accOut, nil
}

// podMemory reads an installed pod's kernel memory: its maps and programs,
// the socket storage of its connections, its handshake entries.
func podMemory(pod *testbed.Pod, t loader.Target) (mapsKiB, socketKiB float64, handshakes int, err error) {
	s, err := loader.Status(t)
	if err != nil {
		return 0, 0, 0, err
	}
	opt, err := optmem(pod)
	if err != nil {
		return 0, 0, 0, err
	}
	return float64(s.Memory.Total()) / 1024, float64(opt) / 1024, s.Handshakes, nil
}

var optmemRE = regexp.MustCompile(`skmem:\([^)]*\bo(\d+)`)

// optmem sums the option memory (where socket-local storage is charged) of
// every TCP socket in the pod, as `ss -tam` shows it.
func optmem(pod *testbed.Pod) (uint64, error) {
	var out []byte
	err := pod.Do(func() error {
		var err error
		out, err = exec.Command("ss", "-tanmH").Output()
		return err
	})
	if err != nil {
		return 0, fmt.Errorf("ss: %w", err)
	}
	var sum uint64
	for _, m := range optmemRE.FindAllSubmatch(out, -1) {
		n, _ := strconv.ParseUint(string(m[1]), 10, 64)
		sum += n
	}
	return sum, nil
}

// acceptor accepts on addr, prints each connection's original destination
// (or the error) on a line, and holds the connections until killed. With a
// second argument, a port, connections to that port are answered as the
// testbed's echo server answers (a "peer=" line) and closed instead, so the
// testbed's connection-rate client runs against it.
func acceptor(args []string) error {
	// Several acceptors may share the address (SO_REUSEPORT), each within
	// its own descriptor limit.
	lc := net.ListenConfig{Control: func(_, _ string, c syscall.RawConn) error {
		var serr error
		err := c.Control(func(fd uintptr) { serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, unix.SO_REUSEPORT, 1) })
		return errors.Join(err, serr)
	}}
	ln, err := lc.Listen(context.Background(), "tcp", args[0])
	if err != nil {
		return err
	}
	answer := -1
	if len(args) > 1 {
		if answer, err = strconv.Atoi(args[1]); err != nil {
			return err
		}
	}
	var held []net.Conn
	w := bufio.NewWriter(os.Stdout)
	for {
		c, err := ln.Accept()
		if err != nil {
			return err
		}
		dst, err := proxy.OriginalDst(c.(*net.TCPConn))
		if err == nil && int(dst.Port()) == answer {
			io.WriteString(c, "peer=acceptor\n")
			c.Close()
			continue
		}
		held = append(held, c)
		if err != nil {
			fmt.Fprintln(w, err)
		} else {
			fmt.Fprintln(w, dst)
		}
		w.Flush()
	}
}

// worldExecutable copies this binary where uid 1337 may run it.
func worldExecutable() (string, func(), error) {
	self, err := os.Executable()
	if err != nil {
		return "", nil, err
	}
	dir, err := os.MkdirTemp("", "sluice-scale-exe-")
	if err != nil {
		return "", nil, err
	}
	cleanup := func() { os.RemoveAll(dir) }
	data, err := os.ReadFile(self)
	if err == nil {
		err = os.Chmod(dir, 0o755)
	}
	if err == nil {
		err = os.WriteFile(filepath.Join(dir, "scale"), data, 0o755)
	}
	if err != nil {
		cleanup()
		return "", nil, err
	}
	return filepath.Join(dir, "scale"), cleanup, nil
}

func percentile(ds []time.Duration, p int) time.Duration {
	s := slices.Clone(ds)
	slices.Sort(s)
	i := (len(s) - 1) * p / 100
	return s[i]
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
