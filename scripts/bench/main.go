// Command bench compares, in one run, an app's TCP in a pod under every way
// of putting a sidecar in its path, with the same client and server, and
// writes every figure as JSON and a plot of the ratios as PNG.
//
//	go run ./scripts/bench [-runs 5] [-seconds 3] [-out results] [-configs direct,iptables,...] [-idle 9000] [-long 60]
//
// Configurations (each round measures them all in turn, in an order rotated
// by one every round, each in a fresh pod and remote host, so one's
// TIME_WAIT sockets never slow the next). Outbound, the app in the pod is
// the client of an echo server on the host:
//
//	direct            no sidecar: the baseline
//	iptables          iptables REDIRECT as istio-iptables installs it, the built-in proxy
//	sluice            Sluice capture, the built-in proxy, splice and telemetry off
//	splice            the same with the app<->sidecar hop spliced (install --splice)
//	splice-telemetry  splice with flow telemetry on (kernel and exporter)
//	haproxy           Sluice capture (no splice, no telemetry) with HAProxy as the sidecar
//	kernel-only       Sluice capture with the server's port kernel-only: no sidecar in the
//	                  path, flow telemetry on (the sidecar runs, exporting it)
//	kernel-only-bare  the same with flow telemetry off and no sidecar running at all
//	offload           splice with the server's port offloaded: the sidecar accepts and dials,
//	                  then the app's bytes go straight out on its upstream socket
//
// Inbound, a client on the host connects to the app's echo server in the pod:
//
//	in-direct         no capture: the baseline
//	in-iptables       nat PREROUTING -> ISTIO_INBOUND -> REDIRECT 15006 as istio-iptables
//	                  writes it, the built-in proxy
//	in-sluice         Sluice inbound capture (sk_lookup + bpf_sk_assign), the built-in
//	                  proxy, splice and telemetry off
//
// Workloads, each for -seconds and counted: connections/s (connect, read a
// line, close), 64-byte request/response on 1 and on 16 connections
// (throughput, p50/p90/p99), bulk echo, CPU per request (the whole
// machine's, /proc/stat, over the 16-connection run; the pod cgroup's too),
// and the sidecar's memory per idle open connection (-idle of them, taken
// from a settled process). The first round also moves bulk for -long seconds
// through sluice and splice, recording the kernel's peak TCP memory
// (/proc/net/sockstat) meanwhile. Ratios are paired: each configuration
// against its baseline in the same round, then the median (min, max) over
// the rounds. docs/benchmarks.md (Method) says why and how.
//
// It needs root: it builds its own pods (network namespaces, cgroups) and
// removes them; all traffic stays in them, on 198.18.0.0/15.
package main

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/sluicemesh/sluice/internal/testbed"
)

func main() {
	testbed.RunHelperIfRequested()
	sluice := flag.String("sluice", "bin/sluice", "the sluice binary")
	runs := flag.Int("runs", 5, "rounds: each measures every configuration once, in an order rotated by one per round")
	out := flag.String("out", "results", "where to write bench.json and bench.png")
	configs := flag.String("configs", strings.Join(allConfigs, ","), "configurations to run, comma-separated")
	seconds := flag.Float64("seconds", 3, "how long each workload runs (connections/s, rr1, rr16, bulk)")
	idle := flag.Int("idle", 9000, "idle connections held open to measure the sidecar's memory per connection (0: skip)")
	long := flag.Float64("long", 60, "seconds of the long bulk transfer in the first round of sluice and splice (0: skip)")
	from := flag.String("from", "", "redraw the plot and tables from an earlier run's bench.json, without measuring")
	flag.Parse()
	if *from != "" {
		if err := os.MkdirAll(*out, 0o755); err != nil {
			fatal("%v", err)
		}
		replot(*from, *out)
		return
	}
	if os.Geteuid() != 0 {
		fatal("needs root (it builds network namespaces and cgroups): run it as root")
	}
	exe, err := filepath.Abs(*sluice)
	if err == nil {
		_, err = os.Stat(exe)
	}
	if err != nil {
		fatal("no sluice binary at %s: build it with 'make build' or pass -sluice", *sluice)
	}
	var names []string
	for _, c := range strings.Split(*configs, ",") {
		if !slices.Contains(allConfigs, c) {
			fatal("unknown configuration %q: want some of %s", c, strings.Join(allConfigs, ","))
		}
		names = append(names, c)
	}
	if err := os.MkdirAll(*out, 0o755); err != nil {
		fatal("%v", err)
	}
	cleanUpOnSignal()
	h := harness{sluice: exe, seconds: *seconds, idle: *idle, haproxyThreads: haproxyThreads(), haproxyMaxPipes: haproxyMaxPipes(*idle)}
	if h.self, err = os.Executable(); err != nil {
		fatal("%v", err)
	}
	rep := report{Machine: machine(), Started: time.Now().UTC().Format(time.RFC3339), Seconds: *seconds, Idle: *idle, Long: *long,
		Rounds: *runs, CPUAccounting: cpuAccounting, MemoryAccounting: memoryAccounting,
		HAProxyConfig: haproxyConfig(h.haproxyThreads, haproxyMaxConn(*idle), h.haproxyMaxPipes)}
	// The machine's CPU is the measure: anything else running skews it.
	if rep.BackgroundCPUPct, err = backgroundCPU(time.Second); err != nil {
		fatal("%v", err)
	}
	if *runs < 5 {
		fmt.Fprintf(os.Stderr, "bench: %d rounds: the medians and their spread want at least 5\n", *runs)
	}
	if rep.BackgroundCPUPct > 5 {
		fmt.Fprintf(os.Stderr, "bench: warning: the machine is %.1f%% busy before the bench: CPU per request counts the whole machine, stop what else runs\n", rep.BackgroundCPUPct)
	}
	for r := range *runs {
		order := rotate(names, r)
		rep.Order = append(rep.Order, order)
		for _, name := range order {
			fmt.Fprintf(os.Stderr, "round %d/%d: %s\n", r+1, *runs, name)
			h.long = 0
			if r == 0 && (name == "sluice" || name == "splice") {
				h.long = *long
			}
			f, err := h.measure(name)
			if err != nil {
				fatal("%s: %v", name, err)
			}
			f.Config, f.Run = name, r
			rep.Runs = append(rep.Runs, f)
		}
	}
	rep.summarize(names)
	rep.judge()
	data, _ := json.MarshalIndent(rep, "", "  ")
	jsonPath := filepath.Join(*out, "bench.json")
	if err := os.WriteFile(jsonPath, data, 0o644); err != nil {
		fatal("%v", err)
	}
	if err := os.WriteFile(filepath.Join(*out, "haproxy.cfg"), []byte(rep.HAProxyConfig), 0o644); err != nil {
		fatal("%v", err)
	}
	rep.output(names, *out)
	fmt.Printf("wrote %s\n", jsonPath)
}

// output draws the plot into dir and prints the tables.
func (r report) output(configs []string, dir string) {
	pngPath := filepath.Join(dir, "bench.png")
	if err := plotRatios(r, configs, pngPath); err != nil {
		fatal("plot: %v", err)
	}
	r.print(os.Stdout, configs)
	fmt.Printf("\nwrote %s\n", pngPath)
}

// replot redraws the plot and the tables of an earlier run.
func replot(path, dir string) {
	data, err := os.ReadFile(path)
	if err != nil {
		fatal("%v", err)
	}
	var rep report
	if err := json.Unmarshal(data, &rep); err != nil {
		fatal("%s: %v", path, err)
	}
	var configs []string
	for _, c := range allConfigs {
		if slices.ContainsFunc(rep.Runs, func(f Figures) bool { return f.Config == c }) {
			configs = append(configs, c)
		}
	}
	// The figures of every run are there: the summary and the paired
	// ratios are recomputed, so an older bench.json gets them too.
	if rep.Rounds == 0 { // older runs did not say
		for _, f := range rep.Runs {
			rep.Rounds = max(rep.Rounds, f.Run+1)
		}
	}
	rep.summarize(configs)
	rep.judge()
	rep.output(configs, dir)
}

var allConfigs = []string{"direct", "iptables", "sluice", "splice", "splice-telemetry", "haproxy", "kernel-only", "kernel-only-bare", "offload",
	"in-direct", "in-iptables", "in-sluice"}

// inbound tells the configurations where a client on the host connects to
// the pod's app from the others, where the pod's app is the client.
func inbound(config string) bool { return strings.HasPrefix(config, "in-") }

// rotate returns names in round r's order: rotated left by r, so each
// configuration runs at each position (first after the bed is built, last
// after the others' TIME_WAIT) as often as the others.
func rotate(names []string, r int) []string {
	if len(names) == 0 {
		return nil
	}
	k := r % len(names)
	return append(slices.Clone(names[k:]), names[:k]...)
}

// interrupted holds the teardown of the measurement under way, for a
// signal to run before the process exits: a bench stopped with Ctrl-C
// leaves no pod, namespace, cgroup or pin behind.
var interrupted atomic.Pointer[func() error]

func cleanUpOnSignal() {
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, os.Interrupt, syscall.SIGTERM)
	go func() {
		s := <-sig
		fmt.Fprintf(os.Stderr, "bench: %v: removing its pods\n", s)
		if f := interrupted.Load(); f != nil {
			if err := (*f)(); err != nil {
				fmt.Fprintf(os.Stderr, "bench: %v\n", err)
			}
		}
		os.Exit(1)
	}()
}

func fatal(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "bench: "+format+"\n", args...)
	os.Exit(1)
}

// Figures are one configuration's results in one run.
type Figures struct {
	Config    string  `json:"config"`
	Run       int     `json:"run"` // the round
	ConnPerS  float64 `json:"conn_per_s"`
	RR1P50us  float64 `json:"rr1_p50_us"`
	RR1P99us  float64 `json:"rr1_p99_us"`
	RR16PerS  float64 `json:"rr16_rounds_per_s"`
	RR16P50us float64 `json:"rr16_p50_us"`
	RR16P90us float64 `json:"rr16_p90_us"`
	RR16P99us float64 `json:"rr16_p99_us"`
	BulkMBps  float64 `json:"bulk_mb_per_s"`
	// How many operations each workload did in its -seconds.
	ConnCount   int64   `json:"conn_count"`
	RR1Rounds   int64   `json:"rr1_rounds"`
	RR16Rounds  int64   `json:"rr16_rounds"`
	BulkBytes   int64   `json:"bulk_bytes"`
	CPUusPerReq float64 `json:"cpu_us_per_request"` // the pod cgroup's only (cpu.stat)
	// The whole machine's CPU (/proc/stat, every state but idle and
	// iowait) over the 16-connection run, per request, and how busy the
	// machine was meanwhile (100 = every CPU).
	MachineCPUusPerReq float64 `json:"machine_cpu_us_per_request"`
	MachineBusyPct     float64 `json:"machine_busy_pct"`
	IdleKiBPerConn     float64 `json:"sidecar_kib_per_idle_conn,omitempty"`
	// The sidecar's settled resident memory before and while holding the
	// idle connections.
	IdleRSSBeforeKiB int `json:"sidecar_rss_settled_kib,omitempty"`
	IdleRSSHeldKiB   int `json:"sidecar_rss_settled_idle_kib,omitempty"`
	// The long bulk transfer (first run of sluice and splice only).
	LongMBps      float64 `json:"long_bulk_mb_per_s,omitempty"`
	LongTCPMemMiB float64 `json:"long_bulk_tcp_mem_peak_mib,omitempty"`
	// What the splice program counted over every workload but the long
	// bulk: proof the bytes went socket to socket.
	Splice map[string]uint64 `json:"splice_counters,omitempty"`
}

// metrics are the figures the summary and the plot compare, with which
// way is better. plotted ones go in the plot.
var metrics = []struct {
	name    string
	get     func(Figures) float64
	higher  bool
	plotted bool
}{
	{"conn/s", func(f Figures) float64 { return f.ConnPerS }, true, true},
	{"rr1 p50", func(f Figures) float64 { return f.RR1P50us }, false, true},
	{"rr1 p99", func(f Figures) float64 { return f.RR1P99us }, false, true},
	{"rr16 req/s", func(f Figures) float64 { return f.RR16PerS }, true, true},
	{"rr16 p50", func(f Figures) float64 { return f.RR16P50us }, false, true},
	{"rr16 p99", func(f Figures) float64 { return f.RR16P99us }, false, true},
	{"bulk MB/s", func(f Figures) float64 { return f.BulkMBps }, true, true},
	{"CPU/req", func(f Figures) float64 { return f.MachineCPUusPerReq }, false, true},
	{"pod CPU/req", func(f Figures) float64 { return f.CPUusPerReq }, false, false},
	{"KiB/idle conn", func(f Figures) float64 { return f.IdleKiBPerConn }, false, false},
	{"long bulk MB/s", func(f Figures) float64 { return f.LongMBps }, true, false},
	{"long bulk TCP MiB", func(f Figures) float64 { return f.LongTCPMemMiB }, false, false},
}

type harness struct {
	sluice, self   string
	seconds        float64
	idle           int
	long           float64 // seconds of long bulk in this measurement; 0 for none
	haproxyThreads int
	// HAProxy's pipes for splice: two descriptors each, on top of two per
	// connection, under the open file limit it inherits (it runs as uid
	// 1337 and cannot raise it).
	haproxyMaxPipes int
}

// client runs one workload of the bench helper against the server and
// returns its result.
type client func(mode string, o testbed.BenchOptions) (testbed.BenchResult, error)

// measure builds a fresh pod and host, sets config up, and runs every
// workload: outbound from the pod's app to an echo server on the host,
// inbound from the host to the app's echo server in the pod.
func (h harness) measure(config string) (f Figures, err error) {
	bed, err := testbed.New(fmt.Sprintf("sluice-bench-%d", os.Getpid()))
	if err != nil {
		return f, err
	}
	var undo func() error
	// What an interrupt must remove, as the defers below do otherwise.
	teardown := func() error {
		var undone error
		if undo != nil {
			undone = undo()
		}
		return errors.Join(undone, bed.Close())
	}
	interrupted.Store(&teardown)
	defer func() {
		interrupted.Store(nil)
		err = errors.Join(err, teardown())
	}()
	pod, err := bed.AddPod("app")
	if err != nil {
		return f, err
	}
	host, err := bed.AddHost("web")
	if err != nil {
		return f, err
	}
	for _, do := range []func(func() error) error{pod.Do, host.Do} {
		if err := do(reuseTimeWait); err != nil {
			return f, err
		}
	}
	addr := netip.AddrPortFrom(host.Addr4, 8080).String()
	start := func(mode string, o testbed.BenchOptions) (testbed.BenchResult, error) {
		return pod.RunBenchWith(h.self, addr, mode, o)
	}
	if inbound(config) {
		addr = netip.AddrPortFrom(pod.Addr4, 8080).String()
		err = pod.StartEcho(h.self, addr)
		start = func(mode string, o testbed.BenchOptions) (testbed.BenchResult, error) {
			return host.RunBenchWith(h.self, addr, mode, o)
		}
	} else {
		_, err = host.ListenEcho(addr)
	}
	if err != nil {
		return f, err
	}
	sidecar, undo, err := h.setup(config, pod)
	if err != nil {
		return f, err
	}
	// Without a sidecar in the path the server sees the client's own
	// socket; through one, the sidecar's.
	bypass := config == "direct" || config == "in-direct" || strings.HasPrefix(config, "kernel-only")
	run := func(mode string, o testbed.BenchOptions) (testbed.BenchResult, error) {
		res, err := start(mode, o)
		if err == nil && bypass != (res.ServerSaw == res.Local) {
			err = fmt.Errorf("%s: the connection took the wrong path: client socket %s, server saw %s", mode, res.Local, res.ServerSaw)
		}
		return res, err
	}
	if err := h.workloads(&f, pod, run); err != nil {
		return f, err
	}
	if strings.HasPrefix(config, "splice") || config == "offload" {
		if f.Splice, err = h.spliceCounters(pod, config == "offload"); err != nil {
			return f, err
		}
	}
	if h.long > 0 {
		if f.LongMBps, f.LongTCPMemMiB, err = h.longBulk(pod, addr); err != nil {
			return f, err
		}
	}
	if h.idle > 0 && sidecar > 0 && !inbound(config) {
		// HAProxy has no garbage collector to run: its memory is
		// settled by waiting alone.
		gc := config != "haproxy"
		if f.IdleRSSBeforeKiB, f.IdleRSSHeldKiB, err = h.idleMemory(pod, sidecar, addr, gc); err != nil {
			return f, err
		}
		f.IdleKiBPerConn = float64(f.IdleRSSHeldKiB-f.IdleRSSBeforeKiB) / float64(h.idle)
	}
	return f, nil
}

// reuseTimeWait sets tcp_tw_reuse to 1 in the netns of the calling thread:
// seconds of connections/s at several thousand a second, each leaving a
// TIME_WAIT socket on the side that closes first (the client, or the
// sidecar's upstream), would use up the 28,232 ports of the default range to
// the one server address. The same for every configuration.
func reuseTimeWait() error {
	return os.WriteFile("/proc/sys/net/ipv4/tcp_tw_reuse", []byte("1\n"), 0o644)
}

// workloads runs connections/s, rr1, rr16 (with the CPU it took) and bulk,
// each for h.seconds.
func (h harness) workloads(f *Figures, pod *testbed.Pod, run client) error {
	o := testbed.BenchOptions{Seconds: h.seconds}
	res, err := run(testbed.BenchConnRate, o)
	if err != nil {
		return err
	}
	f.ConnPerS, f.ConnCount = res.ConnPerS, res.Count
	if res, err = run(testbed.BenchRR, o); err != nil {
		return err
	}
	f.RR1P50us, f.RR1P99us, f.RR1Rounds = res.P50us, res.P99us, res.Count
	podBefore, err := cpuUsec(pod.Cgroup)
	if err != nil {
		return err
	}
	machineBefore, err := readProcStat()
	if err != nil {
		return err
	}
	if res, err = run(testbed.BenchRR, testbed.BenchOptions{Seconds: h.seconds, Conns: 16}); err != nil {
		return err
	}
	machineAfter, err := readProcStat()
	if err != nil {
		return err
	}
	podAfter, err := cpuUsec(pod.Cgroup)
	if err != nil {
		return err
	}
	f.RR16PerS, f.RR16P50us, f.RR16P90us, f.RR16P99us, f.RR16Rounds = res.RoundsPerS, res.P50us, res.P90us, res.P99us, res.Count
	f.CPUusPerReq = float64(podAfter-podBefore) / float64(res.Count)
	used := machineAfter.sub(machineBefore)
	f.MachineCPUusPerReq = used.busyUsec() / float64(res.Count)
	f.MachineBusyPct = used.busyPct()
	if res, err = run(testbed.BenchBulk, o); err != nil {
		return err
	}
	f.BulkMBps, f.BulkBytes = res.MBps, res.Count
	return nil
}

// setup puts config's sidecar in the pod and returns its pid (0: none) and
// how to undo what is not the pod's own.
func (h harness) setup(config string, pod *testbed.Pod) (int, func() error, error) {
	run := func(args ...string) *exec.Cmd {
		return exec.Command(h.sluice, append([]string{"run", "--log-level", "warn"}, args...)...)
	}
	switch config {
	case "direct", "in-direct":
		return 0, nil, nil
	case "iptables":
		if err := pod.RedirectWithIPTables(15001, 1337); err != nil {
			return 0, nil, err
		}
		pid, err := h.startSidecar(pod, run(), 15001)
		return pid, nil, err
	case "in-iptables":
		// Istio's own ports stay out of the redirect, as istio-iptables
		// leaves them.
		if err := pod.RedirectInboundWithIPTables(15006, 15090, 15021, 15020); err != nil {
			return 0, nil, err
		}
		pid, err := h.startSidecar(pod, run(), 15006)
		return pid, nil, err
	}
	// The pod's network namespace, which also attaches inbound capture:
	// idle here, as no connection comes into the pod.
	install := []string{"install", "--cgroup", pod.Cgroup, "--netns", pod.Netns}
	switch config {
	case "kernel-only":
		install = append(install, "--kernel-only-ports", "8080")
	case "kernel-only-bare":
		install = append(install, "--kernel-only-ports", "8080", "--flows=false")
	case "offload":
		install = append(install, "--flows=false", "--splice", "--offload-ports", "8080")
	case "in-sluice":
		install = append(install, "--flows=false")
	case "splice-telemetry":
	default:
		install = append(install, "--flows=false")
	}
	if strings.HasPrefix(config, "splice") {
		install = append(install, "--splice")
	}
	if out, err := exec.Command(h.sluice, install...).CombinedOutput(); err != nil {
		return 0, nil, fmt.Errorf("sluice install: %v: %s", err, out)
	}
	undo := func() error {
		if out, err := exec.Command(h.sluice, "uninstall", "--cgroup", pod.Cgroup).CombinedOutput(); err != nil {
			return fmt.Errorf("sluice uninstall: %v: %s", err, out)
		}
		return nil
	}
	if config == "splice-telemetry" || config == "kernel-only" {
		// The node's agent reads and exports the flows: its CPU is in
		// the machine's, which the figures count.
		stop, err := h.startAgent()
		if err != nil {
			return 0, nil, errors.Join(err, undo())
		}
		uninstall := undo
		undo = func() error { return errors.Join(stop(), uninstall()) }
	}
	switch config {
	case "haproxy":
		pid, err := h.startHAProxy(pod)
		return pid, undo, err
	case "splice-telemetry":
		pid, err := h.startSidecar(pod, run("--cgroup", pod.Cgroup), 15001)
		return pid, undo, err
	case "kernel-only":
		// The sidecar carries none of the flows: no idle memory to
		// measure in it.
		_, err := h.startSidecar(pod, run("--cgroup", pod.Cgroup), 15001)
		return 0, undo, err
	case "kernel-only-bare":
		return 0, undo, nil
	case "in-sluice":
		pid, err := h.startSidecar(pod, run("--cgroup", pod.Cgroup, "--metrics-addr", ""), 15006)
		return pid, undo, err
	}
	pid, err := h.startSidecar(pod, run("--cgroup", pod.Cgroup, "--metrics-addr", ""), 15001)
	return pid, undo, err
}

// startAgent runs the node's agent, which reads every pod's flows, until
// the function it returns stops it.
func (h harness) startAgent() (func() error, error) {
	cmd := exec.Command(h.sluice, "agent", "--metrics-addr", "127.0.0.1:0", "--gc-interval", "1h", "--log-level", "warn")
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start the agent: %w", err)
	}
	return func() error {
		cmd.Process.Signal(syscall.SIGTERM)
		cmd.Wait()
		return nil
	}, nil
}

// startSidecar starts cmd in the pod, able to collect its garbage and
// return it to the kernel on SIGUSR1 (see idleMemory), and waits until it
// listens on port.
func (h harness) startSidecar(pod *testbed.Pod, cmd *exec.Cmd, port uint16) (int, error) {
	cmd.Stderr = os.Stderr
	cmd.Env = append(os.Environ(), freeMemoryEnv+"=1")
	if err := pod.Start(cmd); err != nil {
		return 0, err
	}
	return cmd.Process.Pid, pod.WaitListening(port, 10*time.Second)
}

// freeMemoryEnv is the hidden switch of 'sluice run' (cmd/sluice/freemem.go)
// that makes SIGUSR1 run runtime.GC and debug.FreeOSMemory.
const freeMemoryEnv = "SLUICE_FREE_MEMORY_ON_SIGUSR1"

// haproxyConfig is HAProxy tuned as a sidecar's users would tune it to
// stand in for ours: one thread per event loop of the built-in proxy
// (GOMAXPROCS), 64 KiB buffers like its reads, and splice-auto, since
// it stands for the built-in proxy with splice off, with maxpipes pipes.
func haproxyConfig(threads, maxconn, maxpipes int) string {
	return fmt.Sprintf(`global
  maxconn %d
  maxpipes %d
  nbthread %d
  tune.bufsize 65536
defaults
  mode tcp
  option splice-auto
  timeout connect 5s
  timeout client 60s
  timeout server 60s
frontend outbound
  bind 127.0.0.1:15001
  default_backend original_dst
backend original_dst
  server x 0.0.0.0:0
`, maxconn, maxpipes, threads)
}

// haproxyThreads matches the built-in proxy's event loops: one per P it
// starts with (sidecar.Run gives them proxy.Options.Loops, then adds a P
// for the rest).
func haproxyThreads() int { return runtime.GOMAXPROCS(0) }

// haproxyMaxPipes is what the open file limit leaves for pipes, once
// HAProxy has two descriptors per connection and some to spare: a few
// hundred are plenty, pipes being held only while bytes are in them.
func haproxyMaxPipes(idle int) int {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		return 64
	}
	return max(64, min(haproxyMaxConn(idle)/4, (int(min(lim.Max, 1<<20))-2*haproxyMaxConn(idle)-256)/2))
}

// haproxyMaxConn leaves room for the idle connections and the workloads.
func haproxyMaxConn(idle int) int { return max(9500, idle+500) }

// startHAProxy runs Debian's HAProxy as uid 1337 in the pod, taking the
// built-in proxy's place.
func (h harness) startHAProxy(pod *testbed.Pod) (int, error) {
	bin, err := exec.LookPath("haproxy")
	if err != nil {
		return 0, fmt.Errorf("haproxy not installed (scripts/deps.sh installs it): %w", err)
	}
	dir, err := os.MkdirTemp("", "sluice-bench-")
	if err != nil {
		return 0, err
	}
	os.Chmod(dir, 0o755)
	cfg := filepath.Join(dir, "haproxy.cfg")
	if err := os.WriteFile(cfg, []byte(haproxyConfig(h.haproxyThreads, haproxyMaxConn(h.idle), h.haproxyMaxPipes)), 0o644); err != nil {
		return 0, err
	}
	cmd := exec.Command(bin, "-db", "-f", cfg)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 1337, Gid: 1337}}
	cmd.Stderr = os.Stderr
	if err := pod.Start(cmd); err != nil {
		return 0, err
	}
	return cmd.Process.Pid, pod.WaitListening(15001, 10*time.Second)
}

// spliceCounters reads what the splice program counted in the pod: its
// splice (and offload) counters, which must show it at work.
func (h harness) spliceCounters(pod *testbed.Pod, offload bool) (map[string]uint64, error) {
	out, err := exec.Command(h.sluice, "status", "--cgroup", pod.Cgroup, "--json").Output()
	if err != nil {
		return nil, fmt.Errorf("sluice status: %w", err)
	}
	var st struct {
		Counters map[string]uint64 `json:"counters"`
	}
	if err := json.Unmarshal(out, &st); err != nil {
		return nil, fmt.Errorf("sluice status: %w", err)
	}
	c := map[string]uint64{}
	for k, v := range st.Counters {
		if strings.HasPrefix(k, "splice_") || strings.HasPrefix(k, "offload_") {
			c[k] = v
		}
	}
	if c["splice_messages"] == 0 {
		return c, errors.New("splice is on but the splice program passed no message")
	}
	if offload && c["offload_messages"] == 0 {
		return c, errors.New("offload is on but no message was offloaded")
	}
	return c, nil
}

// longBulk moves bulk for h.long seconds and returns its rate and the
// kernel's peak TCP memory above where it started.
func (h harness) longBulk(pod *testbed.Pod, addr string) (mbps, peakMiB float64, err error) {
	var res testbed.BenchResult
	peakMiB, err = testbed.PeakTCPMemory(func() (err error) {
		res, err = pod.RunBenchWith(h.self, addr, testbed.BenchBulk, testbed.BenchOptions{Seconds: h.long})
		return err
	})
	if err != nil {
		return 0, 0, fmt.Errorf("long bulk: %w", err)
	}
	return res.MBps, peakMiB, nil
}

// cpuUsec is the CPU time the cgroup's processes used, in microseconds.
func cpuUsec(cgroup string) (uint64, error) {
	data, err := os.ReadFile(filepath.Join(cgroup, "cpu.stat"))
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(data), "\n") {
		if rest, ok := strings.CutPrefix(line, "usage_usec "); ok {
			return strconv.ParseUint(rest, 10, 64)
		}
	}
	return 0, errors.New("no usage_usec in cpu.stat")
}

// idleMemory returns the sidecar's settled resident memory before and while
// holding h.idle connections through it, each dialed on to the server.
// Settled: the sidecar collects its garbage and returns the free pages to
// the kernel (SIGUSR1, when gc), then its RSS is read once it stops moving.
func (h harness) idleMemory(pod *testbed.Pod, sidecar int, addr string, gc bool) (before, held int, err error) {
	if before, err = settledRSS(sidecar, gc); err != nil {
		return 0, 0, err
	}
	release, err := pod.Hold(h.self, addr, h.idle, true)
	if err != nil {
		return 0, 0, err
	}
	defer func() { err = errors.Join(err, release()) }()
	held, err = settledRSS(sidecar, gc)
	return before, held, err
}

// settledRSS asks pid to collect and free its garbage (when gc) and
// returns its RSS once five readings 100 ms apart agree within 64 KiB, or
// after 10 s.
func settledRSS(pid int, gc bool) (int, error) {
	if gc {
		if err := syscall.Kill(pid, syscall.SIGUSR1); err != nil {
			return 0, fmt.Errorf("signal the sidecar to free memory: %w", err)
		}
	}
	var last []int
	deadline := time.Now().Add(10 * time.Second)
	for {
		time.Sleep(100 * time.Millisecond)
		kib, err := rssKiB(pid)
		if err != nil {
			return 0, err
		}
		last = append(last, kib)
		if len(last) > 5 {
			last = last[1:]
		}
		if len(last) == 5 && slices.Max(last)-slices.Min(last) <= 64 || time.Now().After(deadline) {
			return kib, nil
		}
	}
}

func rssKiB(pid int) (int, error) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(data), "\n") {
		if rest, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			return strconv.Atoi(strings.Fields(rest)[0])
		}
	}
	return 0, errors.New("no VmRSS")
}

// machine describes where the figures come from.
func machine() map[string]string {
	m := map[string]string{}
	var u syscall.Utsname
	if syscall.Uname(&u) == nil {
		m["kernel"] = utsString(u.Release[:])
	}
	if data, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, line := range strings.Split(string(data), "\n") {
			if v, ok := strings.CutPrefix(line, "model name\t: "); ok {
				m["cpu"] = v
				break
			}
		}
	}
	m["cpus"] = strconv.Itoa(runtimeCPUs())
	return m
}

func utsString(b []int8) string {
	var s []byte
	for _, c := range b {
		if c == 0 {
			break
		}
		s = append(s, byte(c))
	}
	return string(s)
}
