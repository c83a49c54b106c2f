package main

// How the cost grows (issue 27): four series, each with the iptables way
// (the rules istio-iptables writes) beside Sluice, measured in the same run.

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/sluicemesh/sluice/internal/testbed"
	"github.com/sluicemesh/sluice/loader"
	"github.com/sluicemesh/sluice/redirect"
)

// Series holds every point of the series that ran.
type Series struct {
	Pods   []PodsPoint  `json:"pods,omitempty"`
	CIDRs  []CIDRPoint  `json:"exclusion_cidrs,omitempty"`
	Held   []HeldPoint  `json:"held_connections,omitempty"`
	Routes []RoutePoint `json:"routes,omitempty"`
	Notes  []string     `json:"notes,omitempty"`
}

// PodsPoint: the node holds Pods pods. Times are of the installs (and
// restores) since the previous point; memory is per pod over all of them.
type PodsPoint struct {
	Pods             int     `json:"pods"`
	InstallMedianMs  float64 `json:"install_median_ms"`
	InstallP90Ms     float64 `json:"install_p90_ms"`
	IPTablesMedianMs float64 `json:"iptables_restore_median_ms"`
	IPTablesP90Ms    float64 `json:"iptables_restore_p90_ms"`
	Ratio            float64 `json:"ratio_median"`
	IdlePodKiB       float64 `json:"idle_pod_kib"` // its own maps and its node map entries
	NodeStateMiB     float64 `json:"node_state_mib"`
	// Kernel memory the restores charged to a memory cgroup of their own
	// (memory.kmem.usage_in_bytes), per network namespace; 0: not measurable.
	IPTablesNetnsKiB float64 `json:"iptables_netns_kib"`
}

// CIDRPoint: the connection rate through the sidecar with CIDRs excluded.
type CIDRPoint struct {
	CIDRs            int     `json:"cidrs"`
	SluiceConnPerS   float64 `json:"sluice_conn_per_s"`
	IPTablesConnPerS float64 `json:"iptables_conn_per_s"`
}

// HeldPoint: one pod holding Conns captured connections.
type HeldPoint struct {
	Conns              int     `json:"conns"`
	SluiceReached      int     `json:"sluice_reached"`
	SluiceMapsKiB      float64 `json:"sluice_maps_kib"`
	SluiceSocketKiB    float64 `json:"sluice_socket_storage_kib"`
	SluiceConnPerS0    float64 `json:"sluice_conn_per_s_before"`
	SluiceConnPerS     float64 `json:"sluice_conn_per_s_held"`
	IPTablesReached    int     `json:"iptables_reached"`
	ConntrackEntries   int     `json:"iptables_conntrack_entries"`
	ConntrackKiB       float64 `json:"iptables_conntrack_kib"`
	IPTablesConnPerS0  float64 `json:"iptables_conn_per_s_before"`
	IPTablesConnPerS   float64 `json:"iptables_conn_per_s_held"`
	ConntrackEntrySize int     `json:"conntrack_entry_bytes"`
}

// RoutePoint: connect latency with Routes canary routes installed.
type RoutePoint struct {
	Routes       int     `json:"routes"`
	ConnectP50us float64 `json:"connect_p50_us"`
	FirstP50us   float64 `json:"first_byte_p50_us"`
	ConnectP90us float64 `json:"connect_p90_us"`
}

type seriesConfig struct {
	exe, self                 string
	pods, cidrs, held, routes []int
	seconds                   float64
	latConnects               int
	which                     map[string]bool
	progress                  func(string, ...any)
}

func parsePoints(s string) ([]int, error) {
	var out []int
	for _, f := range strings.Split(s, ",") {
		if f = strings.TrimSpace(f); f == "" {
			continue
		}
		n, err := strconv.Atoi(f)
		if err != nil || n < 0 {
			return nil, fmt.Errorf("bad point %q", f)
		}
		out = append(out, n)
	}
	slices.Sort(out)
	return out, nil
}

func runSeries(c *seriesConfig, s *Series) error {
	raiseNoFile(s)
	steps := []struct {
		name string
		run  func(*seriesConfig, *Series) error
	}{{"pods", podsSeries}, {"cidrs", cidrSeries}, {"held", heldSeries}, {"routes", routeSeries}}
	for _, st := range steps {
		if !c.which[st.name] && !c.which["all"] {
			continue
		}
		c.progress("series %s", st.name)
		if err := st.run(c, s); err != nil {
			return fmt.Errorf("series %s: %w", st.name, err)
		}
	}
	return nil
}

// The main goroutine keeps the main thread, so a goroutine that ends locked
// (restoreKept) never wedges it in a namespace and memory cgroup of its own.
func init() { runtime.LockOSThread() }

// raiseNoFile lifts the descriptor limit (inherited by the helpers) as far
// as the kernel lets root.
func raiseNoFile(s *Series) {
	// syscall's, so the children inherit it (Go restores the limit it
	// found for them otherwise).
	var lim syscall.Rlimit
	syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim)
	nrOpen := uint64(1 << 20)
	if data, err := os.ReadFile("/proc/sys/fs/nr_open"); err == nil {
		if n, err := strconv.ParseUint(strings.TrimSpace(string(data)), 10, 64); err == nil {
			nrOpen = n
		}
	}
	want := min(nrOpen, 400000)
	if lim.Max < want {
		lim.Max = want
	}
	lim.Cur = lim.Max
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim)
		s.Notes = append(s.Notes, fmt.Sprintf("descriptor limit stays %d (raising it: %v): held connections are spread over processes of up to %d each", lim.Cur, err, perProcess))
	}
	perProcess = int(min(lim.Cur*3/4, 15000))
}

// restoreKept restores Istio's rules in a new network namespace on a thread
// of its own (in memcg's tasks, when given) and keeps the namespace.
func (x *istioRestore) restoreKept(memcg string) (took time.Duration, ns netns.NsHandle, err error) {
	done := make(chan struct{})
	ns = netns.None()
	go func() {
		defer close(done)
		// Never unlocked: the thread, in a namespace (and memory cgroup)
		// of its own, ends with the goroutine (never the main thread:
		// init locks it to the main goroutine).
		runtime.LockOSThread()
		h, e := netns.New()
		if e != nil {
			err = e
			return
		}
		if memcg != "" {
			if e := os.WriteFile(filepath.Join(memcg, "tasks"), []byte(strconv.Itoa(unix.Gettid())), 0o644); e != nil {
				h.Close()
				err = e
				return
			}
		}
		start := time.Now()
		if e := x.restoreHere(); e != nil {
			h.Close()
			err = e
			return
		}
		took = time.Since(start)
		ns = h
	}()
	<-done
	return took, ns, err
}

// podsSeries installs pods one after another up to the last point, each
// after one restore of Istio's rules into a network namespace kept as long
// as the pods, and reads the figures at every point.
func podsSeries(c *seriesConfig, s *Series) (err error) {
	if len(c.pods) == 0 {
		return nil
	}
	ipt, err := newIstioRestore()
	if err != nil {
		return err
	}
	defer ipt.Close()
	// A memory cgroup (v1) of our own, where only the restores run.
	memcg := filepath.Join("/sys/fs/cgroup/memory", fmt.Sprintf("sluice-scale-%d", os.Getpid()))
	if _, statErr := os.Stat(filepath.Join(filepath.Dir(memcg), "memory.kmem.usage_in_bytes")); statErr != nil || os.Mkdir(memcg, 0o755) != nil {
		memcg = ""
		s.Notes = append(s.Notes, "pods: no cgroup v1 memory controller here: iptables kernel memory per netns not measured")
	} else {
		// Runs last, once the namespaces are closed (their charges go to
		// the parent) and the restores' threads have ended.
		defer func() {
			rmErr := os.Remove(memcg)
			for i := 0; i < 100 && rmErr != nil; i++ {
				time.Sleep(100 * time.Millisecond)
				rmErr = os.Remove(memcg)
			}
			err = errors.Join(err, rmErr)
		}()
	}
	n, err := newNode(c.exe, "sluice-scale-series")
	if err != nil {
		return err
	}
	var kept []netns.NsHandle
	defer func() {
		for _, h := range kept {
			h.Close()
		}
		err = errors.Join(err, n.close())
	}()
	var installs, restores []time.Duration
	for _, point := range c.pods {
		for len(n.pods) < point {
			d, h, err := ipt.restoreKept(memcg)
			if err != nil {
				return fmt.Errorf("iptables-restore: %w", err)
			}
			kept = append(kept, h)
			restores = append(restores, d)
			took, err := n.add()
			if err != nil {
				return err
			}
			installs = append(installs, took)
		}
		if point == 0 {
			continue
		}
		m, err := n.memory()
		if err != nil {
			return err
		}
		p := PodsPoint{
			Pods:             point,
			InstallMedianMs:  ms(percentile(installs, 50)),
			InstallP90Ms:     ms(percentile(installs, 90)),
			IPTablesMedianMs: ms(percentile(restores, 50)),
			IPTablesP90Ms:    ms(percentile(restores, 90)),
			IdlePodKiB:       float64(m.perPod) / 1024,
			NodeStateMiB:     float64(m.node) / (1 << 20),
		}
		p.Ratio = p.InstallMedianMs / p.IPTablesMedianMs
		if memcg != "" {
			if data, err := os.ReadFile(filepath.Join(memcg, "memory.kmem.usage_in_bytes")); err == nil {
				n, _ := strconv.ParseFloat(strings.TrimSpace(string(data)), 64)
				p.IPTablesNetnsKiB = n / 1024 / float64(point)
			}
		}
		s.Pods = append(s.Pods, p)
		c.progress("  %d pods: install %.1f ms (iptables %.1f ms, %.2fx), %.0f KiB per idle pod (iptables %.0f KiB per netns)",
			point, p.InstallMedianMs, p.IPTablesMedianMs, p.Ratio, p.IdlePodKiB, p.IPTablesNetnsKiB)
		installs, restores = installs[:0], restores[:0]
	}
	return nil
}

// excluded returns n distinct /24s in 10.0.0.0/8, none of them the test bed's.
func excluded(n int) []string {
	out := make([]string, n)
	for i := range n {
		out[i] = fmt.Sprintf("10.%d.%d.0/24", i/256, i%256)
	}
	return out
}

// istioRulesExcluding is Istio's IPv4 rule set with one RETURN rule per
// excluded CIDR, where istio-iptables -x puts them: before the jump to the
// redirect, walked by every new outbound connection.
func istioRulesExcluding(cidrs []string) []byte {
	rules := fmt.Sprintf(istioRules, "127.0.0.1/32", "127.0.0.6/32")
	var ret strings.Builder
	for _, c := range cidrs {
		fmt.Fprintf(&ret, "-A ISTIO_OUTPUT -d %s -j RETURN\n", c)
	}
	jump := "-A ISTIO_OUTPUT -j ISTIO_REDIRECT\n"
	return []byte(strings.Replace(rules, jump, ret.String()+jump, 1))
}

// restoreInPod loads rules with iptables-restore inside the pod's netns.
func restoreInPod(pod *testbed.Pod, rules []byte) error {
	cmd := exec.Command("iptables-restore", "-w")
	cmd.Stdin = strings.NewReader(string(rules))
	var out strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := pod.Start(cmd); err != nil {
		return err
	}
	if err := cmd.Wait(); err != nil {
		return fmt.Errorf("iptables-restore in the pod: %v: %s", err, out.String())
	}
	return nil
}

// inBed builds a pod and a host with an echo server on 8080, runs fn, and
// removes everything.
func inBed(fn func(pod *testbed.Pod, addr string) error) (err error) {
	bed, err := testbed.New(fmt.Sprintf("sluice-scale-%d", os.Getpid()))
	if err != nil {
		return err
	}
	defer func() { err = errors.Join(err, bed.Close()) }()
	pod, err := bed.AddPod("app")
	if err != nil {
		return err
	}
	host, err := bed.AddHost("web")
	if err != nil {
		return err
	}
	addr := netip.AddrPortFrom(host.Addr4, 8080).String()
	if _, err := host.ListenEcho(addr); err != nil {
		return err
	}
	return fn(pod, addr)
}

// installIn installs Sluice in the pod with extra flags; undo uninstalls.
func installIn(exe string, pod *testbed.Pod, extra ...string) (undo func() error, err error) {
	args := append([]string{"install", "--cgroup", pod.Cgroup, "--netns", pod.Netns}, extra...)
	if out, err := exec.Command(exe, args...).CombinedOutput(); err != nil {
		return nil, fmt.Errorf("sluice install: %v: %s", err, out)
	}
	return func() error {
		if out, err := exec.Command(exe, "uninstall", "--cgroup", pod.Cgroup).CombinedOutput(); err != nil {
			return fmt.Errorf("sluice uninstall: %v: %s", err, out)
		}
		return nil
	}, nil
}

// sluiceIn installs Sluice (no flow telemetry, as make bench's sluice) with
// extra flags and starts the built-in sidecar; undo uninstalls (the bed
// stops the sidecar).
func sluiceIn(exe string, pod *testbed.Pod, extra ...string) (undo func() error, err error) {
	if undo, err = installIn(exe, pod, append([]string{"--flows=false"}, extra...)...); err != nil {
		return nil, err
	}
	if err := startSidecar(pod, exe, "--cgroup", pod.Cgroup); err != nil {
		return nil, errors.Join(err, undo())
	}
	return undo, nil
}

func startSidecar(pod *testbed.Pod, exe string, extra ...string) error {
	cmd := exec.Command(exe, append([]string{"run", "--metrics-addr", "", "--log-level", "warn"}, extra...)...)
	cmd.Stderr = os.Stderr
	if err := pod.Start(cmd); err != nil {
		return err
	}
	return pod.WaitListening(15001, 10*time.Second)
}

// connRate runs the testbed's connection-rate client in the pod and checks
// the connections went through the sidecar.
func connRate(c *seriesConfig, pod *testbed.Pod, addr string) (float64, error) {
	res, err := pod.RunBenchWith(c.self, addr, testbed.BenchConnRate, testbed.BenchOptions{Seconds: c.seconds})
	if err != nil {
		return 0, err
	}
	if res.ServerSaw == res.Local {
		return 0, fmt.Errorf("connections went around the sidecar: app socket %s, server saw %s", res.Local, res.ServerSaw)
	}
	return res.ConnPerS, nil
}

func cidrSeries(c *seriesConfig, s *Series) error {
	for _, n := range c.cidrs {
		p := CIDRPoint{CIDRs: n}
		cidrs := excluded(n)
		err := inBed(func(pod *testbed.Pod, addr string) (err error) {
			var extra []string
			if n > 0 {
				extra = []string{"-x", strings.Join(cidrs, ",")}
			}
			undo, err := sluiceIn(c.exe, pod, extra...)
			if err != nil {
				return err
			}
			defer func() { err = errors.Join(err, undo()) }()
			p.SluiceConnPerS, err = connRate(c, pod, addr)
			return err
		})
		if err != nil {
			return fmt.Errorf("sluice, %d CIDRs: %w", n, err)
		}
		err = inBed(func(pod *testbed.Pod, addr string) error {
			if err := restoreInPod(pod, istioRulesExcluding(cidrs)); err != nil {
				return err
			}
			if err := startSidecar(pod, c.exe); err != nil {
				return err
			}
			p.IPTablesConnPerS, err = connRate(c, pod, addr)
			return err
		})
		if err != nil {
			return fmt.Errorf("iptables, %d CIDRs: %w", n, err)
		}
		s.CIDRs = append(s.CIDRs, p)
		c.progress("  %d CIDRs: sluice %.0f conn/s, iptables %.0f conn/s", n, p.SluiceConnPerS, p.IPTablesConnPerS)
	}
	return nil
}

// heldDst is where held connections go (never dialed: the acceptor holds
// them), heldPort the first port; benchPort's connections the acceptor
// answers and closes, for the connection rate.
var heldDst = netip.MustParseAddr("198.18.200.1")

const (
	heldPort  = 9000
	benchPort = 8080
)

// perProcess is how many connections one process (a holder, an acceptor)
// holds at most: below its descriptor limit.
var perProcess = 15000

func heldSeries(c *seriesConfig, s *Series) error {
	entry := conntrackEntrySize()
	for _, n := range c.held {
		p := HeldPoint{Conns: n, ConntrackEntrySize: entry}
		for _, way := range []string{"sluice", "iptables"} {
			err := inBed(func(pod *testbed.Pod, _ string) (err error) {
				if way == "iptables" {
					if err := restoreInPod(pod, istioRulesExcluding(nil)); err != nil {
						return err
					}
					return holdAndMeasure(c, pod, way, n, &p)
				}
				undo, err := installIn(c.exe, pod)
				if err != nil {
					return err
				}
				defer func() { err = errors.Join(err, undo()) }()
				return holdAndMeasure(c, pod, way, n, &p)
			})
			if err != nil {
				return fmt.Errorf("%s, %d connections: %w", way, n, err)
			}
		}
		s.Held = append(s.Held, p)
		c.progress("  %d held: sluice %d reached, %.0f KiB maps + %.0f KiB socket storage, %.0f -> %.0f conn/s; iptables %d reached, %d conntrack entries (%.0f KiB), %.0f -> %.0f conn/s",
			n, p.SluiceReached, p.SluiceMapsKiB, p.SluiceSocketKiB, p.SluiceConnPerS0, p.SluiceConnPerS,
			p.IPTablesReached, p.ConntrackEntries, p.ConntrackKiB, p.IPTablesConnPerS0, p.IPTablesConnPerS)
	}
	return nil
}

// holdAndMeasure runs the acceptor as the sidecar, measures the connection
// rate, holds n connections (as many as it gets), measures memory and the
// rate again.
func holdAndMeasure(c *seriesConfig, pod *testbed.Pod, way string, n int, p *HeldPoint) error {
	// One descriptor per held connection in an acceptor: enough of them
	// (sharing the port) that each stays well within its limit.
	for range n/(perProcess/2) + 1 {
		acc, accOut, err := startAcceptor(pod, c.self, strconv.Itoa(benchPort))
		if err != nil {
			return err
		}
		defer func() { acc.Process.Kill(); acc.Wait() }()
		go io.Copy(io.Discard, accOut) // held connections' lines; the holders count them
	}
	// Every held connection and the rate runs' go to the sidecar's one
	// address with Sluice (its source port is picked for that tuple):
	// the pod's own port range is widened (a sysctl of its netns only).
	err := pod.Do(func() error {
		return os.WriteFile("/proc/sys/net/ipv4/ip_local_port_range", []byte("1024 65535"), 0o644)
	})
	if err != nil {
		return fmt.Errorf("pod port range: %w", err)
	}
	bench := netip.AddrPortFrom(heldDst, benchPort).String()
	before, err := connRate(c, pod, bench)
	if err != nil {
		return fmt.Errorf("rate before: %w", err)
	}
	lingering := 0
	if way == "iptables" {
		if lingering, err = conntrackCount(pod); err != nil {
			return err
		}
	}
	var releases []func() error
	defer func() {
		for _, r := range releases {
			r()
		}
	}()
	reached := 0
	for k := 0; reached < n; k++ {
		chunk := min(perProcess, n-reached)
		rel, err := pod.Hold(c.self, netip.AddrPortFrom(heldDst, uint16(heldPort+k)).String(), chunk, false)
		if err != nil {
			fmt.Fprintf(os.Stderr, "scale: %s: held %d of %d: %v\n", way, reached, n, err)
			break
		}
		releases = append(releases, rel)
		reached += chunk
	}
	// Memory first: the rate run's closed connections linger (TIME_WAIT
	// sockets, conntrack entries) and would count as held.
	if way == "sluice" {
		t, err := loader.ResolveTarget(pod.Cgroup, "")
		if err != nil {
			return err
		}
		if p.SluiceMapsKiB, p.SluiceSocketKiB, _, err = podMemory(pod, t); err != nil {
			return err
		}
		p.SluiceReached, p.SluiceConnPerS0 = reached, before
	} else {
		after, err := conntrackCount(pod)
		if err != nil {
			return err
		}
		p.IPTablesReached, p.IPTablesConnPerS0 = reached, before
		p.ConntrackEntries = after - lingering
		p.ConntrackKiB = float64(p.ConntrackEntries*p.ConntrackEntrySize) / 1024
	}
	held, err := connRate(c, pod, bench)
	if err != nil {
		return fmt.Errorf("rate while held: %w", err)
	}
	if way == "sluice" {
		p.SluiceConnPerS = held
	} else {
		p.IPTablesConnPerS = held
	}
	return nil
}

// conntrackCount reads the pod's conntrack entries (nf_conntrack_count is
// per network namespace).
func conntrackCount(pod *testbed.Pod) (count int, err error) {
	err = pod.Do(func() error {
		data, err := os.ReadFile("/proc/sys/net/netfilter/nf_conntrack_count")
		if err == nil {
			count, err = strconv.Atoi(strings.TrimSpace(string(data)))
		}
		return err
	})
	if err != nil {
		return 0, fmt.Errorf("conntrack count: %w", err)
	}
	return count, nil
}

// conntrackEntrySize is the size of an nf_conntrack slab object (0: unknown).
func conntrackEntrySize() int {
	data, err := os.ReadFile("/proc/slabinfo")
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(data), "\n") {
		f := strings.Fields(line)
		if len(f) > 3 && f[0] == "nf_conntrack" {
			n, _ := strconv.Atoi(f[3])
			return n
		}
	}
	return 0
}

func routeSeries(c *seriesConfig, s *Series) error {
	if len(c.routes) == 0 {
		return nil
	}
	return inBed(func(pod *testbed.Pod, addr string) (err error) {
		undo, err := sluiceIn(c.exe, pod)
		if err != nil {
			return err
		}
		defer func() { err = errors.Join(err, undo()) }()
		t, err := loader.ResolveTarget(pod.Cgroup, "")
		if err != nil {
			return err
		}
		backend := netip.MustParseAddrPort(addr)
		svc := func(i int) netip.AddrPort {
			return netip.AddrPortFrom(netip.AddrFrom4([4]byte{198, 19, byte(i / 256), byte(1 + i%256)}), 80)
		}
		var set int
		for _, n := range c.routes {
			var change loader.RouteChange
			for ; set < n; set++ {
				change.Set = append(change.Set, redirect.Route{Service: svc(set), Backends: []redirect.Backend{
					{Address: backend.Addr(), Port: backend.Port(), Weight: 100}}})
			}
			if len(change.Set) > 0 {
				if err := loader.ChangeRoutes(t, change); err != nil {
					return fmt.Errorf("%d routes: %w", n, err)
				}
			}
			target := addr // no route: the backend itself, captured as usual
			if n > 0 {
				target = svc(n - 1).String()
			}
			lat, err := connectLatency(c, pod, target)
			if err != nil {
				return fmt.Errorf("%d routes: %w", n, err)
			}
			lat.Routes = n
			s.Routes = append(s.Routes, lat)
			c.progress("  %d routes: connect p50 %.0f us, first byte p50 %.0f us", n, lat.ConnectP50us, lat.FirstP50us)
		}
		return nil
	})
}

// connectLatency runs the connlat role in the pod against addr.
func connectLatency(c *seriesConfig, pod *testbed.Pod, addr string) (RoutePoint, error) {
	var p RoutePoint
	cmd := exec.Command(c.self, addr, strconv.Itoa(c.latConnects))
	cmd.Env = append(os.Environ(), roleEnv+"=connlat")
	var out strings.Builder
	cmd.Stdout, cmd.Stderr = &out, os.Stderr
	if err := pod.Start(cmd); err != nil {
		return p, err
	}
	if err := cmd.Wait(); err != nil {
		return p, fmt.Errorf("connlat: %v: %s", err, out.String())
	}
	return p, json.Unmarshal([]byte(out.String()), &p)
}

// connLat connects count times in a row to addr, reading the echo server's
// first line each time, and prints the percentiles as a RoutePoint.
func connLat(args []string) error {
	if len(args) != 2 {
		return errors.New("connlat ADDR COUNT")
	}
	count, err := strconv.Atoi(args[1])
	if err != nil {
		return err
	}
	var connects, firsts []time.Duration
	deadline := time.Now().Add(60 * time.Second)
	for i := 0; i < count && time.Now().Before(deadline); i++ {
		start := time.Now()
		conn, err := net.DialTimeout("tcp", args[0], 5*time.Second)
		if err != nil {
			return fmt.Errorf("connect %d: %w", i, err)
		}
		connected := time.Since(start)
		conn.SetReadDeadline(time.Now().Add(5 * time.Second))
		_, err = bufio.NewReader(conn).ReadString('\n')
		first := time.Since(start)
		conn.Close()
		if err != nil {
			return fmt.Errorf("connection %d: first line: %w", i, err)
		}
		connects, firsts = append(connects, connected), append(firsts, first)
	}
	if len(connects) == 0 {
		return errors.New("no connection")
	}
	us := func(d time.Duration) float64 { return float64(d.Nanoseconds()) / 1000 }
	return json.NewEncoder(os.Stdout).Encode(RoutePoint{
		ConnectP50us: us(percentile(connects, 50)),
		ConnectP90us: us(percentile(connects, 90)),
		FirstP50us:   us(percentile(firsts, 50)),
	})
}

func (r *report) runSeries(exe, which, pods, cidrs, held, routes string, seconds float64, connects int) error {
	c := &seriesConfig{exe: exe, seconds: seconds, latConnects: connects, which: map[string]bool{}}
	for _, w := range strings.Split(which, ",") {
		switch w = strings.TrimSpace(w); w {
		case "pods", "cidrs", "held", "routes", "all":
			c.which[w] = true
		default:
			return fmt.Errorf("unknown series %q (pods, cidrs, held, routes, all)", w)
		}
	}
	var err error
	for _, pt := range []struct {
		s   string
		dst *[]int
	}{{pods, &c.pods}, {cidrs, &c.cidrs}, {held, &c.held}, {routes, &c.routes}} {
		if *pt.dst, err = parsePoints(pt.s); err != nil {
			return err
		}
	}
	self, cleanup, err := worldExecutable()
	if err != nil {
		return err
	}
	defer cleanup()
	c.self = self
	c.progress = func(format string, args ...any) { fmt.Fprintf(os.Stderr, "scale: "+format+"\n", args...) }
	r.Series = &Series{}
	return runSeries(c, r.Series)
}
