package main

import (
	"bytes"
	"net/netip"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/sluicemesh/sluice/internal/testbed"
	"github.com/sluicemesh/sluice/loader"
	"github.com/sluicemesh/sluice/redirect"
)

// BenchmarkOutbound measures an app's outbound TCP in three setups, each in a
// pod of its own, and reports them as ratios to the direct path measured in
// the same run, so the figures compare across machines:
//
//   - direct: nothing installed, no sidecar (the baseline);
//   - iptables: the built-in sidecar behind iptables REDIRECT in the pod netns;
//   - sluice-noflows: sluice install --flows=false + the same sidecar with
//     no exporter: capture by BPF, no telemetry;
//   - sluice: sluice install + the same sidecar exporting the flows the
//     kernel measures (telemetry on).
//
// Ratios are setup/direct (and sluice/iptables, and sluice/sluice-noflows for
// what telemetry costs): above 1 is better for
// conn/s and MB/s, worse for the p50 and p99 latencies. The *_absolute
// metrics are the raw figures behind them. Every sub-benchmark call does
// one fixed measurement whatever b.N; run it with -benchtime 1x
// (scripts/bench.sh does).
func BenchmarkOutbound(b *testing.B) {
	if os.Geteuid() != 0 {
		if os.Getenv("CI") == "true" {
			b.Fatal("benchmark needs root; CI=true forbids skipping it")
		}
		b.Skip("needs root")
	}
	// Filled by the sub-benchmarks in order, so later ones compare against
	// figures from this very run.
	figures := map[string]outboundFigures{}
	for _, s := range []struct {
		name    string
		prepare func(*testing.B, *testbed.Pod)
	}{
		{"direct", nil},
		{"iptables", redirectWithIPTables},
		{"sluice-noflows", captureWithSluiceNoFlows},
		{"sluice", captureWithSluice},
	} {
		b.Run(s.name, func(b *testing.B) {
			f := measureOutbound(b, s.name, s.prepare)
			f.report(b, "absolute", outboundFigures{1, 1, 1, 1})
			if s.name != "direct" {
				direct, ok := figures["direct"]
				if !ok {
					b.Fatalf("no figures from BenchmarkOutbound/direct in this run: the ratios need it (do not filter it out with -bench)")
				}
				f.report(b, "vs_direct", direct)
			}
			if s.name == "sluice" {
				for _, base := range []string{"iptables", "sluice-noflows"} {
					if fig, ok := figures[base]; ok {
						f.report(b, "vs_"+strings.TrimPrefix(base, "sluice-"), fig)
					} else {
						b.Logf("no figures from BenchmarkOutbound/%s in this run: sluice/%s ratios left out", base, base)
					}
				}
			}
			figures[s.name] = f
			// The wall time per op is the pods' setup plus three fixed
			// measurements: not a figure to compare, so it is left out.
			b.ReportMetric(0, "ns/op")
		})
	}
}

// outboundFigures are one setup's results of the three bench modes.
type outboundFigures struct {
	connPerS, p50us, p99us, mbps float64
}

// report reports f divided by base, with units named "<metric>_<suffix>".
func (f outboundFigures) report(b *testing.B, suffix string, base outboundFigures) {
	b.ReportMetric(f.connPerS/base.connPerS, "conn/s_"+suffix)
	b.ReportMetric(f.mbps/base.mbps, "MB/s_"+suffix)
	if suffix == "absolute" {
		// Only the absolute latencies carry a unit.
		suffix = "us_" + suffix
	}
	b.ReportMetric(f.p50us/base.p50us, "p50_"+suffix)
	b.ReportMetric(f.p99us/base.p99us, "p99_"+suffix)
}

// measureOutbound builds a pod and a remote echo server, lets prepare set up
// the capture (nil: none), and runs every bench mode from inside the pod.
// Everything it creates is removed when b's cleanups run.
func measureOutbound(b *testing.B, setup string, prepare func(*testing.B, *testbed.Pod)) outboundFigures {
	b.Helper()
	bed := testbed.Must(b)
	pod, err := bed.AddPod("app")
	if err != nil {
		b.Fatal(err)
	}
	host, err := bed.AddHost("web")
	if err != nil {
		b.Fatal(err)
	}
	addr := netip.AddrPortFrom(host.Addr4, 8080).String()
	if _, err := host.ListenEcho(addr); err != nil {
		b.Fatal(err)
	}
	if prepare != nil {
		prepare(b, pod)
	}
	exe := self(b)

	b.ResetTimer()
	results := map[string]testbed.BenchResult{}
	for _, mode := range testbed.BenchModes {
		res, err := pod.RunBench(exe, addr, mode)
		if err != nil {
			b.Fatalf("%s: %v", setup, err)
		}
		checkBenchPath(b, setup, pod, addr, res)
		b.Logf("%s %s: %d in %.3fs, first connection %s -> %s, server saw %s",
			setup, mode, res.Count, res.Seconds, res.Local, res.Peer, res.ServerSaw)
		results[mode] = res
	}
	b.StopTimer()
	return outboundFigures{
		connPerS: results[testbed.BenchConnRate].ConnPerS,
		p50us:    results[testbed.BenchRR].P50us,
		p99us:    results[testbed.BenchRR].P99us,
		mbps:     results[testbed.BenchBulk].MBps,
	}
}

// checkBenchPath fails the benchmark unless its traffic took the setup's
// path: a figure of the wrong path would make every ratio meaningless.
func checkBenchPath(b *testing.B, setup string, pod *testbed.Pod, addr string, res testbed.BenchResult) {
	b.Helper()
	if res.Peer != addr {
		b.Fatalf("%s %s: getpeername = %s, want the original destination %s", setup, res.Mode, res.Peer, addr)
	}
	direct := res.ServerSaw == res.Local
	switch {
	case setup == "direct" && !direct:
		b.Fatalf("direct %s: the server saw %s, not the app's socket %s", res.Mode, res.ServerSaw, res.Local)
	case setup != "direct" && direct:
		b.Fatalf("%s %s: the connection bypassed the sidecar (server saw the app's socket %s)", setup, res.Mode, res.Local)
	case setup != "direct" && !strings.HasPrefix(res.ServerSaw, pod.Addr4.String()+":"):
		b.Fatalf("%s %s: server saw %s, want the sidecar dialing from the pod address %s", setup, res.Mode, res.ServerSaw, pod.Addr4)
	case setup == "sluice" && !strings.HasPrefix(res.Local, "127.0.0.1:"):
		b.Fatalf("sluice %s: app socket %s, want it connected to the sidecar on 127.0.0.1", res.Mode, res.Local)
	}
}

// redirectWithIPTables is the classic sidecar setup: nat OUTPUT rules in the
// pod netns (never the root one) send the app's TCP to the sidecar, which
// drops to the proxy uid that the rules let through. The rules go with the
// pod's netns.
func redirectWithIPTables(b *testing.B, pod *testbed.Pod) {
	b.Helper()
	path, err := exec.LookPath("iptables")
	if err != nil {
		b.Fatalf("iptables not installed (scripts/deps.sh installs it): %v", err)
	}
	for _, rule := range [][]string{
		{"-d", "127.0.0.0/8", "-j", "RETURN"},
		{"-m", "owner", "--uid-owner", strconv.Itoa(redirect.DefaultProxyID), "-j", "RETURN"},
		{"-p", "tcp", "-j", "REDIRECT", "--to-ports", strconv.Itoa(redirect.DefaultOutboundPort)},
	} {
		args := append([]string{"-w", "-t", "nat", "-A", "OUTPUT"}, rule...)
		var out bytes.Buffer
		cmd := exec.Command(path, args...)
		cmd.Stdout, cmd.Stderr = &out, &out
		if err := pod.Start(cmd); err != nil {
			b.Fatal(err)
		}
		if err := cmd.Wait(); err != nil {
			b.Fatalf("iptables %s in the pod: %v: %s\nthe iptables setup needs the nat table, the owner match and the REDIRECT target in this kernel (iptable_nat or nft_chain_nat, xt_owner, xt_REDIRECT or nft_redir)",
				strings.Join(args, " "), err, strings.TrimSpace(out.String()))
		}
	}
	startBenchSidecar(b, pod)
}

// captureWithSluice installs capture through the CLI and runs the sidecar
// with the install's settings, exporting the pod's flows, as
// TestOutboundCaptureIPv4 does.
func captureWithSluice(b *testing.B, pod *testbed.Pod) {
	b.Helper()
	mustCLI(b, "install", "--cgroup", pod.Cgroup)
	// Registered after the bed, so it runs before the bed removes the cgroup.
	b.Cleanup(func() { mustCLI(b, "uninstall", "--cgroup", pod.Cgroup) })
	startBenchSidecar(b, pod, "--cgroup", pod.Cgroup)
}

// captureWithSluiceNoFlows is captureWithSluice with telemetry off, in the
// kernel (--flows=false) and in the sidecar (no exporter).
func captureWithSluiceNoFlows(b *testing.B, pod *testbed.Pod) {
	b.Helper()
	mustCLI(b, "install", "--cgroup", pod.Cgroup, "--flows=false")
	b.Cleanup(func() { mustCLI(b, "uninstall", "--cgroup", pod.Cgroup) })
	startBenchSidecar(b, pod, "--cgroup", pod.Cgroup, "--metrics-addr", "")
}

// startBenchSidecar runs `sluice run` in the pod as root and waits until it
// listens as the proxy uid; the Bed stops it.
func startBenchSidecar(b *testing.B, pod *testbed.Pod, args ...string) {
	b.Helper()
	l, err := pod.StartLogged(sluice(b, append([]string{"run", "--log-format", "json"}, args...)...))
	if err != nil {
		b.Fatal(err)
	}
	e, err := l.WaitFor("listening", nil, 10*time.Second)
	if err != nil {
		b.Fatal(err)
	}
	if e.Num("uid") != redirect.DefaultProxyID {
		b.Fatalf("sidecar runs as uid %d, want %d: its own connections would be captured", e.Num("uid"), redirect.DefaultProxyID)
	}
}

// BenchmarkRoutes measures canary routing, in one pod and one run:
//
//   - connect_cost: connections/s to a routed service (a VIP whose route
//     picks the backend) against connections/s straight to a host through
//     the same sidecar, with no route: the route lookup and pick's cost
//     (each to its own server port: TIME_WAIT);
//   - update_to_first_pick: from 'route set' returning (loader.ChangeRoutes)
//     to the kernel picking the new backend for a connect, while an app
//     keeps connecting (polled from the route's pick counters);
//   - update_to_first_accept: to the new backend accepting that
//     connection, which adds its trip through the sidecar.
func BenchmarkRoutes(b *testing.B) {
	if os.Geteuid() != 0 {
		if os.Getenv("CI") == "true" {
			b.Fatal("benchmark needs root; CI=true forbids skipping it")
		}
		b.Skip("needs root")
	}
	bed := testbed.Must(b)
	pod, err := bed.AddPod("app")
	if err != nil {
		b.Fatal(err)
	}
	v1, err := bed.AddHost("v1")
	if err != nil {
		b.Fatal(err)
	}
	v2, err := bed.AddHost("v2")
	if err != nil {
		b.Fatal(err)
	}
	b1, b2 := netip.AddrPortFrom(v1.Addr4, 8080), netip.AddrPortFrom(v2.Addr4, 8080)
	unrouted := netip.AddrPortFrom(v1.Addr4, 9090)
	var l2 *testbed.EchoListener
	for _, ap := range []netip.AddrPort{b1, b2, unrouted} {
		l, err := (map[bool]*testbed.Host{true: v2, false: v1})[ap == b2].ListenEcho(ap.String())
		if err != nil {
			b.Fatal(err)
		}
		if ap == b2 {
			l2 = l
		}
	}
	captureWithSluice(b, pod)
	target, err := loader.ResolveTarget(pod.Cgroup, "")
	if err != nil {
		b.Fatal(err)
	}
	svc := netip.MustParseAddrPort("198.19.0.10:80")
	set := func(w1, w2 uint32) {
		r := redirect.Route{Service: svc, Backends: []redirect.Backend{
			{Address: b1.Addr(), Port: b1.Port(), Weight: w1}, {Address: b2.Addr(), Port: b2.Port(), Weight: w2}}}
		if err := loader.ChangeRoutes(target, loader.RouteChange{Set: []redirect.Route{r}}); err != nil {
			b.Fatal(err)
		}
	}
	set(100, 0)

	exe := self(b)
	rates := map[string]float64{}
	for name, addr := range map[string]string{"unrouted": unrouted.String(), "routed": svc.String()} {
		res, err := pod.RunBench(exe, addr, testbed.BenchConnRate)
		if err != nil {
			b.Fatal(err)
		}
		rates[name] = res.ConnPerS
	}
	b.ReportMetric(rates["routed"]/rates["unrouted"], "conn/s_routed_vs_unrouted")
	b.ReportMetric(rates["routed"], "conn/s_routed_absolute")

	// The app connects all along; each update flips v1 -> v2, and the time
	// until v2 first accepts is measured.
	load := helper(b, "load", "20s", "8", svc.String())
	load.Stdout, load.Stderr = nil, nil
	if err := pod.Start(load); err != nil {
		b.Fatal(err)
	}
	defer func() { load.Process.Kill(); load.Wait() }()
	routes, err := loader.OpenRoutes(target)
	if err != nil {
		b.Fatal(err)
	}
	defer routes.Close()
	picksOfV2 := func() uint64 {
		rs, err := routes.Routes()
		if err != nil || len(rs) != 1 {
			b.Fatalf("read routes: %v %v", rs, err)
		}
		return rs[0].Picks[1]
	}
	var toPick, toAccept []time.Duration
	for range 50 {
		set(100, 0)
		time.Sleep(20 * time.Millisecond)
		picked, accepted := picksOfV2(), l2.Accepted()
		set(0, 100)
		start := time.Now()
		for picksOfV2() == picked {
			if time.Since(start) > time.Second {
				b.Fatal("the new backend was not picked within 1s")
			}
		}
		toPick = append(toPick, time.Since(start))
		for l2.Accepted() == accepted {
			if time.Since(start) > time.Second {
				b.Fatal("no connection reached the new backend within 1s")
			}
		}
		toAccept = append(toAccept, time.Since(start))
	}
	for name, d := range map[string][]time.Duration{"pick": toPick, "accept": toAccept} {
		slices.Sort(d)
		b.ReportMetric(float64(d[len(d)/2].Microseconds()), "us_update_to_first_"+name+"_p50")
		b.ReportMetric(float64(d[len(d)*9/10].Microseconds()), "us_update_to_first_"+name+"_p90")
	}
	b.ReportMetric(0, "ns/op")
}
