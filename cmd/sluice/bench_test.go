package main

import (
	"bytes"
	"net/netip"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/sluicemesh/sluice/internal/testbed"
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
