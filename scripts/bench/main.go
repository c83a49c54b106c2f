// Command bench compares, in one run, an app's TCP in a pod under every way
// of putting a sidecar in its path, with the same client and server, and
// writes every figure as JSON and a plot of the ratios as PNG.
//
//	go run ./scripts/bench [-runs 3] [-out results] [-configs direct,iptables,...] [-idle 9000] [-long 60]
//
// Configurations (each run measures them in turn, each in a fresh pod and
// remote host, so one's TIME_WAIT sockets never slow the next):
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
// Workloads: connections/s (connect, read a line, close), 64-byte
// request/response on 1 and on 16 connections (throughput, p50/p90/p99),
// bulk echo, CPU per request (the pod cgroup's cpu.stat over the 16-connection
// run), and the sidecar's memory per idle open connection (-idle of them).
// The first run also moves bulk for -long seconds through sluice and splice,
// recording the kernel's peak TCP memory (/proc/net/sockstat) meanwhile.
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
	runs := flag.Int("runs", 3, "repetitions of every configuration, interleaved")
	out := flag.String("out", "results", "where to write bench.json and bench.png")
	configs := flag.String("configs", strings.Join(allConfigs, ","), "configurations to run, comma-separated")
	seconds := flag.Float64("seconds", 3, "how long each timed workload runs")
	idle := flag.Int("idle", 9000, "idle connections held open to measure the sidecar's memory per connection (0: skip)")
	long := flag.Float64("long", 60, "seconds of the long bulk transfer in the first run of sluice and splice (0: skip)")
	from := flag.String("from", "", "redraw the plot and tables from an earlier run's bench.json, without measuring")
	flag.Parse()
	if *from != "" {
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
	h := harness{sluice: exe, seconds: *seconds, idle: *idle}
	if h.self, err = os.Executable(); err != nil {
		fatal("%v", err)
	}
	rep := report{Machine: machine(), Started: time.Now().UTC().Format(time.RFC3339), Seconds: *seconds, Idle: *idle, Long: *long}
	for r := range *runs {
		for _, name := range names {
			fmt.Fprintf(os.Stderr, "run %d/%d: %s\n", r+1, *runs, name)
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
		if rep.Summary[c] != nil {
			configs = append(configs, c)
		}
	}
	rep.judge()
	rep.output(configs, dir)
}

var allConfigs = []string{"direct", "iptables", "sluice", "splice", "splice-telemetry", "haproxy", "kernel-only", "kernel-only-bare", "offload"}

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
	Config         string  `json:"config"`
	Run            int     `json:"run"`
	ConnPerS       float64 `json:"conn_per_s"`
	RR1P50us       float64 `json:"rr1_p50_us"`
	RR1P99us       float64 `json:"rr1_p99_us"`
	RR16PerS       float64 `json:"rr16_rounds_per_s"`
	RR16P50us      float64 `json:"rr16_p50_us"`
	RR16P90us      float64 `json:"rr16_p90_us"`
	RR16P99us      float64 `json:"rr16_p99_us"`
	BulkMBps       float64 `json:"bulk_mb_per_s"`
	CPUusPerReq    float64 `json:"cpu_us_per_request"`
	IdleKiBPerConn float64 `json:"sidecar_kib_per_idle_conn,omitempty"`
	// The long bulk transfer (first run of sluice and splice only).
	LongMBps      float64 `json:"long_bulk_mb_per_s,omitempty"`
	LongTCPMemMiB float64 `json:"long_bulk_tcp_mem_peak_mib,omitempty"`
	// What the splice program counted over every workload but the long
	// bulk: proof the bytes went socket to socket.
	Splice map[string]uint64 `json:"splice_counters,omitempty"`
}

// metrics are the figures the summary and the plot compare, with which
// way is better.
var metrics = []struct {
	name   string
	get    func(Figures) float64
	higher bool
}{
	{"conn/s", func(f Figures) float64 { return f.ConnPerS }, true},
	{"rr1 p50", func(f Figures) float64 { return f.RR1P50us }, false},
	{"rr1 p99", func(f Figures) float64 { return f.RR1P99us }, false},
	{"rr16 req/s", func(f Figures) float64 { return f.RR16PerS }, true},
	{"rr16 p50", func(f Figures) float64 { return f.RR16P50us }, false},
	{"rr16 p99", func(f Figures) float64 { return f.RR16P99us }, false},
	{"bulk MB/s", func(f Figures) float64 { return f.BulkMBps }, true},
	{"CPU/req", func(f Figures) float64 { return f.CPUusPerReq }, false},
	{"KiB/idle conn", func(f Figures) float64 { return f.IdleKiBPerConn }, false},
	{"long bulk MB/s", func(f Figures) float64 { return f.LongMBps }, true},
	{"long bulk TCP MiB", func(f Figures) float64 { return f.LongTCPMemMiB }, false},
}

type harness struct {
	sluice, self string
	seconds      float64
	idle         int
	long         float64 // seconds of long bulk in this measurement; 0 for none
}

// measure builds a fresh pod and host, sets config up, and runs every
// workload against an echo server on the host.
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
	addr := netip.AddrPortFrom(host.Addr4, 8080).String()
	if _, err := host.ListenEcho(addr); err != nil {
		return f, err
	}
	sidecar, undo, err := h.setup(config, pod)
	if err != nil {
		return f, err
	}
	run := func(mode string, o testbed.BenchOptions) (testbed.BenchResult, error) {
		res, err := pod.RunBenchWith(h.self, addr, mode, o)
		// Kernel-only reaches the server from the app's own socket too.
		if err == nil && (config == "direct" || strings.HasPrefix(config, "kernel-only")) != (res.ServerSaw == res.Local) {
			err = fmt.Errorf("%s: the connection took the wrong path: app socket %s, server saw %s", mode, res.Local, res.ServerSaw)
		}
		return res, err
	}
	res, err := run(testbed.BenchConnRate, testbed.BenchOptions{Seconds: h.seconds})
	if err != nil {
		return f, err
	}
	f.ConnPerS = res.ConnPerS
	if res, err = run(testbed.BenchRR, testbed.BenchOptions{Seconds: h.seconds}); err != nil {
		return f, err
	}
	f.RR1P50us, f.RR1P99us = res.P50us, res.P99us
	cpuBefore, err := cpuUsec(pod.Cgroup)
	if err != nil {
		return f, err
	}
	if res, err = run(testbed.BenchRR, testbed.BenchOptions{Seconds: h.seconds, Conns: 16}); err != nil {
		return f, err
	}
	cpuAfter, err := cpuUsec(pod.Cgroup)
	if err != nil {
		return f, err
	}
	f.RR16PerS, f.RR16P50us, f.RR16P90us, f.RR16P99us = res.RoundsPerS, res.P50us, res.P90us, res.P99us
	f.CPUusPerReq = float64(cpuAfter-cpuBefore) / float64(res.Count)
	if res, err = run(testbed.BenchBulk, testbed.BenchOptions{}); err != nil {
		return f, err
	}
	f.BulkMBps = res.MBps
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
	if h.idle > 0 && sidecar > 0 {
		if f.IdleKiBPerConn, err = h.idleMemory(pod, sidecar, addr); err != nil {
			return f, err
		}
	}
	return f, nil
}

// setup puts config's sidecar in the pod and returns its pid (0: none) and
// how to undo what is not the pod's own.
func (h harness) setup(config string, pod *testbed.Pod) (int, func() error, error) {
	switch config {
	case "direct":
		return 0, nil, nil
	case "iptables":
		if err := pod.RedirectWithIPTables(15001, 1337); err != nil {
			return 0, nil, err
		}
		pid, err := h.startSidecar(pod, exec.Command(h.sluice, "run", "--log-level", "warn"), 15001)
		return pid, nil, err
	}
	install := []string{"install", "--cgroup", pod.Cgroup}
	switch config {
	case "kernel-only":
		install = append(install, "--kernel-only-ports", "8080")
	case "kernel-only-bare":
		install = append(install, "--kernel-only-ports", "8080", "--flows=false")
	case "offload":
		install = append(install, "--flows=false", "--splice", "--offload-ports", "8080")
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
	switch config {
	case "haproxy":
		pid, err := h.startHAProxy(pod)
		return pid, undo, err
	case "splice-telemetry":
		pid, err := h.startSidecar(pod, exec.Command(h.sluice, "run", "--cgroup", pod.Cgroup, "--log-level", "warn"), 15001)
		return pid, undo, err
	case "kernel-only":
		// The sidecar exports the flows but carries none of them: no
		// idle memory to measure in it.
		_, err := h.startSidecar(pod, exec.Command(h.sluice, "run", "--cgroup", pod.Cgroup, "--log-level", "warn"), 15001)
		return 0, undo, err
	case "kernel-only-bare":
		return 0, undo, nil
	}
	pid, err := h.startSidecar(pod, exec.Command(h.sluice, "run", "--cgroup", pod.Cgroup, "--metrics-addr", "", "--log-level", "warn"), 15001)
	return pid, undo, err
}

func (h harness) startSidecar(pod *testbed.Pod, cmd *exec.Cmd, port uint16) (int, error) {
	cmd.Stderr = os.Stderr
	if err := pod.Start(cmd); err != nil {
		return 0, err
	}
	return cmd.Process.Pid, pod.WaitListening(port, 10*time.Second)
}

const haproxyConfig = `global
  maxconn 9500
defaults
  mode tcp
  timeout connect 5s
  timeout client 60s
  timeout server 60s
frontend outbound
  bind 127.0.0.1:15001
  default_backend original_dst
backend original_dst
  server x 0.0.0.0:0
`

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
	if err := os.WriteFile(cfg, []byte(haproxyConfig), 0o644); err != nil {
		return 0, err
	}
	cmd := exec.Command(bin, "-db", "-f", cfg)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 1337, Gid: 1337}}
	return h.startSidecar(pod, cmd, 15001)
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

// idleMemory opens h.idle connections through the sidecar, waits until the
// sidecar has dialed the server for each, and returns the sidecar's
// resident memory growth per connection.
func (h harness) idleMemory(pod *testbed.Pod, sidecar int, addr string) (float64, error) {
	before, err := rssKiB(sidecar)
	if err != nil {
		return 0, err
	}
	release, err := pod.Hold(h.self, addr, h.idle, true)
	if err != nil {
		return 0, err
	}
	defer release()
	after, err := rssKiB(sidecar)
	if err != nil {
		return 0, err
	}
	return float64(after-before) / float64(h.idle), nil
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
