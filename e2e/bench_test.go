package e2e

import (
	"net/netip"
	"os"
	"slices"
	"testing"
	"time"

	"github.com/sluicemesh/sluice/internal/testbed"
	"github.com/sluicemesh/sluice/loader"
	"github.com/sluicemesh/sluice/redirect"
)

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
	routes, err := loader.Open(target, loader.ReadOnly)
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

// captureWithSluice installs capture through the CLI and runs the sidecar
// with the install's settings, as a pod would.
func captureWithSluice(b *testing.B, pod *testbed.Pod) {
	b.Helper()
	mustCLI(b, "install", "--cgroup", pod.Cgroup, "--netns", pod.Netns)
	// Registered after the bed, so it runs before the bed removes the cgroup.
	b.Cleanup(func() { mustCLI(b, "uninstall", "--cgroup", pod.Cgroup) })
	l, err := pod.StartLogged(sluice(b, "run", "--cgroup", pod.Cgroup, "--log-format", "json"))
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
