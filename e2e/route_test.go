package e2e

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	"github.com/sluicemesh/sluice/bpf"
	"github.com/sluicemesh/sluice/internal/testbed"
	"github.com/sluicemesh/sluice/loader"
	"github.com/sluicemesh/sluice/redirect"
)

// vip is a service address no host has: only a route gives it backends.
const vip = "198.19.0.10:80"

// canaryPod is a captured pod with its sidecar, and two backends of the
// service vip: v1 on the first host, v2 on a second.
type canaryPod struct {
	*capturedPod
	v1, v2   *testbed.EchoListener
	v1a, v2a string
	second   *testbed.Host
}

func newCanaryPod(t *testing.T) *canaryPod {
	t.Helper()
	c := newCapturedPod(t)
	second, err := c.bed.AddHost("v2")
	if err != nil {
		t.Fatal(err)
	}
	cp := &canaryPod{capturedPod: c, second: second,
		v1a: netip.AddrPortFrom(c.host.Addr4, 8080).String(), v2a: netip.AddrPortFrom(second.Addr4, 8080).String()}
	cp.v1 = c.echoes[cp.v1a]
	if cp.v2, err = second.ListenEcho(cp.v2a); err != nil {
		t.Fatal(err)
	}
	// Info level: no log line per connection.
	c.startSidecar(t, "--log-level", "info")
	return cp
}

func (c *canaryPod) route(t *testing.T, args ...string) {
	t.Helper()
	mustCLI(t, append([]string{"route", "set", "--cgroup", c.cgroup, vip}, args...)...)
}

// churn makes n connections to vip, concurrency at a time, and returns how
// many each backend accepted meanwhile.
func (c *canaryPod) churn(t *testing.T, n, concurrency int) (v1, v2 int64) {
	t.Helper()
	b1, b2 := c.v1.Accepted(), c.v2.Accepted()
	var res churnResult
	if err := runHelper(t, c.pod, helper(t, "churn", fmt.Sprint(n), fmt.Sprint(concurrency), vip), -1, &res); err != nil {
		t.Fatal(err)
	}
	if res.OK != int64(n) {
		t.Fatalf("%d of %d connections to %s succeeded (first error: %s)", res.OK, n, vip, res.FirstErr)
	}
	return c.v1.Accepted() - b1, c.v2.Accepted() - b2
}

func (c *canaryPod) routes(t *testing.T) []loader.RouteState {
	t.Helper()
	var routes []loader.RouteState
	if err := json.Unmarshal([]byte(mustCLI(t, "route", "list", "--cgroup", c.cgroup, "--json")), &routes); err != nil {
		t.Fatal(err)
	}
	return routes
}

// 10,000 connections at 90/10 split within 2 points at the servers; the
// round-robin mode splits 10 connections exactly 9/1; the app still sees the
// service as its peer.
func TestCanarySplit(t *testing.T) {
	c := newCanaryPod(t)
	c.route(t, c.v1a+"=90", c.v2a+"=10")
	res := c.client(t, vip)
	if res.Peer != vip {
		t.Errorf("the app's peer is %s, want the service %s", res.Peer, vip)
	}
	const n = 10_000
	v1, v2 := c.churn(t, n, 16)
	share := 100 * float64(v2) / float64(v1+v2)
	t.Logf("random 90/10 over %d connections: v1 %d, v2 %d (%.2f%%)", n, v1, v2, share)
	if v1+v2 != n || share < 8 || share > 12 {
		t.Errorf("v1 %d, v2 %d: canary share %.2f%%, want 10 ± 2", v1, v2, share)
	}
	picks := c.routes(t)[0].Picks
	if picks[0]+picks[1] < n || picks[1] < uint64(v2) {
		t.Errorf("the route's pick counts %v do not match the servers (%d, %d)", picks, v1, v2)
	}

	c.route(t, "--mode", "round-robin", c.v1a+"=90", c.v2a+"=10")
	for round := range 3 {
		if v1, v2 := c.churn(t, 10, 1); v1 != 9 || v2 != 1 {
			t.Errorf("round-robin 90/10, round %d of 10 connections: %d/%d, want 9/1", round, v1, v2)
		}
	}
}

// While a client keeps connecting (and holds connections open), the weights
// go 100/0 -> 50/50 -> 0/100: no connection fails, the open ones keep
// working on their backend, and once the last change has returned no new
// connection reaches the old backend.
func TestCanaryShiftUnderTraffic(t *testing.T) {
	c := newCanaryPod(t)
	c.route(t, c.v1a+"=100", c.v2a+"=0")
	held := startHold(t, c.pod, vip, 4)
	if c.v1.Accepted() != 4 || c.v2.Accepted() != 0 {
		t.Fatalf("at 100/0 the held connections reached v1 %d, v2 %d times", c.v1.Accepted(), c.v2.Accepted())
	}
	var load churnResult
	var wg sync.WaitGroup
	wg.Go(func() {
		if err := runHelper(t, c.pod, helper(t, "load", "3s", "4", vip), -1, &load); err != nil {
			t.Error(err)
		}
	})
	time.Sleep(time.Second)
	c.route(t, c.v1a+"=50", c.v2a+"=50")
	time.Sleep(time.Second)
	c.route(t, c.v1a+"=0", c.v2a+"=100")
	afterV1 := c.v1.Accepted()
	wg.Wait()
	if load.Failed != 0 || load.OK == 0 {
		t.Errorf("load during the shifts: %d ok, %d failed (first: %s)", load.OK, load.Failed, load.FirstErr)
	}
	held.exchange(t, "still here")
	if v1, v2 := c.churn(t, 200, 8); v1 != 0 || v2 != 200 {
		t.Errorf("after 0/100: v1 %d, v2 %d of 200 new connections", v1, v2)
	}
	if got := c.v1.Accepted(); got != afterV1 {
		t.Errorf("v1 accepted %d connections after the 0/100 change returned", got-afterV1)
	}
}

// Several processes changing routes at once never leave a mixed set: the
// shared service ends with exactly one writer's set, and each writer's own
// service is there.
func TestRouteChangesFromManyProcesses(t *testing.T) {
	privileged(t)
	pod, err := testbed.Must(t).AddPod("app")
	if err != nil {
		t.Fatal(err)
	}
	mustCLI(t, "install", "--cgroup", pod.Cgroup, "--netns", pod.Netns)
	t.Cleanup(func() { mustCLI(t, "uninstall", "--cgroup", pod.Cgroup) })
	sets := map[string]string{}
	var wg sync.WaitGroup
	for w := range 4 {
		set := []string{fmt.Sprintf("198.18.10.%d:80=%d", w+1, w+1), fmt.Sprintf("198.18.11.%d:80=%d", w+1, 10-w)}
		sets[strings.Join(set, " ")] = ""
		wg.Go(func() {
			for i := range 10 {
				for _, args := range [][]string{
					append([]string{"route", "set", "--cgroup", pod.Cgroup, "198.19.0.1:80"}, set...),
					{"route", "set", "--cgroup", pod.Cgroup, fmt.Sprintf("198.19.1.%d:80", w+1), fmt.Sprintf("198.18.12.%d:80=%d", i+1, i+1)},
				} {
					if res := testbed.Run(t, sluice(t, args...)); res.Code != 0 {
						t.Errorf("%v: %s", args, res.Stderr)
					}
				}
			}
		})
	}
	wg.Wait()
	var routes []loader.RouteState
	if err := json.Unmarshal([]byte(mustCLI(t, "route", "list", "--cgroup", pod.Cgroup, "--json")), &routes); err != nil {
		t.Fatal(err)
	}
	if len(routes) != 5 {
		t.Fatalf("%d routes, want 5: %+v", len(routes), routes)
	}
	for _, r := range routes {
		var set []string
		for _, b := range r.Backends {
			set = append(set, fmt.Sprintf("%s=%d", b.AddrPort(), b.Weight))
		}
		if r.Service.String() == "198.19.0.1:80" {
			if _, ok := sets[strings.Join(set, " ")]; !ok {
				t.Errorf("the shared service has a set no writer wrote: %v", set)
			}
		} else if len(set) != 1 || !strings.HasSuffix(set[0], "=10") {
			t.Errorf("%s: %v, want its writer's last set (weight 10)", r.Service, set)
		}
	}
}

// Bad input is refused with one line naming the problem and the fix, and
// changes nothing; a route whose every weight is 0 refuses connections at
// once.
func TestRouteBadInput(t *testing.T) {
	c := newCanaryPod(t)
	c.route(t, c.v1a+"=90", c.v2a+"=10")
	before := mustCLI(t, "route", "list", "--cgroup", c.cgroup, "--json")
	file := filepath.Join(t.TempDir(), "routes.yaml")
	os.WriteFile(file, []byte("routes:\n  - service: 198.19.0.10:80\n    backendRefs:\n      - {address: 198.18.2.2, port: 8080, weight: 1}\n      - {address: 198.18.2.2, port: 8080, weight: 2}\n"), 0o644)
	cg := []string{"--cgroup", c.cgroup}
	for _, tt := range []struct {
		args []string
		code int
		want string
	}{
		{append([]string{"route", "delete", "198.19.9.9:80"}, cg...), 1, "no route for 198.19.9.9:80"},
		{append([]string{"route", "set", vip, c.v1a + "=-1"}, cg...), 2, "want a whole number"},
		{append([]string{"route", "set", vip, c.v1a + "=0", c.v2a + "=0"}, cg...), 2, "--allow-zero"},
		{append([]string{"route", "set", vip, "198.18.2:8080=1"}, cg...), 2, "is not ADDRESS:PORT"},
		{append([]string{"route", "set", vip, c.v1a + "=1", c.v1a + "=2"}, cg...), 2, "listed twice"},
		{append([]string{"route", "set", "nope", c.v1a + "=1"}, cg...), 2, "want VIP:PORT"},
		{append([]string{"route", "apply", "-f", file}, cg...), 2, "listed twice"},
		{append([]string{"route", "bogus"}, cg...), 2, "unknown route subcommand"},
	} {
		res := testbed.Run(t, sluice(t, tt.args...))
		if res.Code != tt.code || strings.Count(res.Stderr, "\n") != 1 || !strings.Contains(res.Stderr, tt.want) {
			t.Errorf("%v: exit %d, stderr %q; want exit %d and %q", tt.args, res.Code, res.Stderr, tt.code, tt.want)
		}
	}
	if after := mustCLI(t, "route", "list", "--cgroup", c.cgroup, "--json"); after != before {
		t.Errorf("refused changes changed the routes:\n%s\n%s", before, after)
	}

	c.route(t, "--allow-zero", c.v1a+"=0", c.v2a+"=0")
	start := time.Now()
	if _, err := c.pod.RunClient(self(t), vip, 10); err == nil || !strings.Contains(err.Error(), "connection refused") {
		t.Errorf("connect to a service with no weight: %v, want connection refused", err)
	}
	if took := time.Since(start); took > 5*time.Second {
		t.Errorf("refusal took %v", took)
	}
}

// refusing is a canary that refuses every connect: nothing listens there.
func refusing(c *canaryPod) string { return netip.AddrPortFrom(c.second.Addr4, 9999).String() }

// kernelOnly makes the service's port kernel-only: the kernel picks the
// backend and connects to it, with no sidecar in the path.
func kernelOnly(t *testing.T, c *canaryPod) {
	mustCLI(t, "install", "--cgroup", c.cgroup, "--netns", c.pod.Netns, "--kernel-only-ports", "80")
}

// portScan has the pod contact 120 other destinations first (closed ports
// of the host), more than the exporter's 100 distinct destinations.
func portScan(t *testing.T, c *canaryPod) {
	args := []string{"120", "8"}
	for port := range 120 {
		args = append(args, netip.AddrPortFrom(c.host.Addr4, uint16(20000+port)).String())
	}
	var res churnResult
	if err := runHelper(t, c.pod, helper(t, "churn", args...), -1, &res); err != nil || res.Failed != 120 {
		t.Fatalf("120 connections to closed ports: %+v, %v", res, err)
	}
}

// A rollout against a canary that refuses connections, or sits behind a
// 20 ms delay link, rolls back by itself and says why (also as metrics);
// against a healthy one it reaches 100 %. A refusing canary is caught as
// well on a kernel-only route (no sidecar sees its connects), and after a
// port scan of more destinations than the exporter names one by one.
func TestRollout(t *testing.T) {
	for _, tt := range []struct {
		name   string
		canary func(c *canaryPod) string
		code   int
		reason string
		setup  func(t *testing.T, c *canaryPod)
	}{
		{"refusing canary", refusing, 1, "connect_failures", nil},
		{"refusing canary, kernel-only", refusing, 1, "connect_failures", kernelOnly},
		{"refusing canary after a port scan", refusing, 1, "connect_failures", portScan},
		{"healthy canary, kernel-only", func(c *canaryPod) string { return c.v2a }, 0, "", kernelOnly},
		{"slow canary", func(c *canaryPod) string {
			far, err := c.bed.AddDelayedHost("far", 20*time.Millisecond)
			if err != nil {
				t.Fatal(err)
			}
			addr := netip.AddrPortFrom(far.Addr4, 8080).String()
			if _, err := far.ListenEcho(addr); err != nil {
				t.Fatal(err)
			}
			return addr
		}, 1, "connect_latency", nil},
		{"healthy canary", func(c *canaryPod) string { return c.v2a }, 0, "", nil},
	} {
		t.Run(tt.name, func(t *testing.T) {
			c := newCanaryPod(t)
			if tt.setup != nil {
				tt.setup(t, c)
			}
			canary := tt.canary(c)
			c.route(t, c.v1a+"=100")
			var wg sync.WaitGroup
			wg.Go(func() {
				var res churnResult
				runHelper(t, c.pod, helper(t, "load", "4s", "2", vip), -1, &res)
			})
			defer wg.Wait()
			cmd := sluice(t, "route", "rollout", "--cgroup", c.cgroup, "--metrics", c.agent(t), vip, "--to", canary,
				"--step", "50", "--interval", "700ms", "--max-connect-failure-ratio", "0.05", "--max-connect-latency", "10ms")
			var out, errOut strings.Builder
			cmd.Stdout, cmd.Stderr = &out, &errOut
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			expectExit(t, cmd, tt.code, 20*time.Second, func() string { return out.String() + errOut.String() })
			r := c.routes(t)[0]
			weights := map[string]uint32{}
			for _, b := range r.Backends {
				weights[b.AddrPort().String()] = b.Weight
			}
			if tt.code == 0 {
				if weights[canary] != 100 || weights[c.v1a] != 0 || r.RolloutStep != 0 {
					t.Errorf("after the rollout: %+v", r)
				}
				return
			}
			if weights[canary] != 0 || weights[c.v1a] != 100 || r.Rollbacks != 1 || r.LastRollback != tt.reason {
				t.Errorf("after the rollback: %+v, want reason %s", r, tt.reason)
			}
			if !strings.Contains(errOut.String(), "rolled back") {
				t.Errorf("the rollout did not say it rolled back:\n%s", errOut.String())
			}
			fams := c.scrape(t)
			if got := sample(fams, "sluice_route_rollbacks_total", map[string]string{"service": vip}); got != 1 {
				t.Errorf("sluice_route_rollbacks_total = %v, want 1\n%s", got, c.sidecar.Output())
			}
			if got := sample(fams, "sluice_route_last_rollback", map[string]string{"service": vip, "reason": tt.reason}); got != 1 {
				t.Errorf("sluice_route_last_rollback{reason=%q} = %v, want 1", tt.reason, got)
			}
			if got := sample(fams, "sluice_tcp_destination_connect_failures_total", map[string]string{"destination_service": canary}); tt.reason == "connect_failures" && got == 0 {
				t.Errorf("no sluice_tcp_destination_connect_failures_total series for the canary %s", canary)
			}
		})
	}
}

// sequence makes n connections to vip one at a time and returns which
// backend each reached, as a string of 1s and 2s (v1, v2).
func (c *canaryPod) sequence(t *testing.T, n int) string {
	t.Helper()
	var seq strings.Builder
	for range n {
		v1, v2 := c.churn(t, 1, 1)
		switch {
		case v1 == 1 && v2 == 0:
			seq.WriteByte('1')
		case v1 == 0 && v2 == 1:
			seq.WriteByte('2')
		default:
			t.Fatalf("one connection reached v1 %d and v2 %d times", v1, v2)
		}
	}
	return seq.String()
}

// freshRoundRobin is the order smooth weighted round-robin picks at 9/1 from
// its start: 9 and 1 out of 10, the canary sixth.
const freshRoundRobin = "1111121111"

// A round-robin route deleted and set again starts its sequence over: it
// does not inherit where the deleted route's sequence stood.
func TestRoundRobinStartsOverAfterDelete(t *testing.T) {
	c := newCanaryPod(t)
	c.route(t, "--mode", "round-robin", c.v1a+"=9", c.v2a+"=1")
	if got := c.sequence(t, 5); got != freshRoundRobin[:5] {
		t.Fatalf("first 5 connections of a new round-robin route at 9/1: %s, want %s", got, freshRoundRobin[:5])
	}
	mustCLI(t, "route", "delete", "--cgroup", c.cgroup, vip)
	c.route(t, "--mode", "round-robin", c.v1a+"=9", c.v2a+"=1")
	if got := c.sequence(t, 10); got != freshRoundRobin {
		t.Errorf("10 connections after the route was deleted and set again: %s, want %s (the sequence from its start)", got, freshRoundRobin)
	}
}

// rrServices are n service addresses for round-robin routes, from base on.
func rrServices(base, n int) []netip.AddrPort {
	out := make([]netip.AddrPort, n)
	for i := range out {
		out[i] = netip.AddrPortFrom(netip.AddrFrom4([4]byte{198, 19, byte(2 + (base+i)/250), byte(1 + (base+i)%250)}), 80)
	}
	return out
}

// Round-robin state is freed with its route: after 200 round-robin routes
// came and went (more than the 128 the kernel keeps state for at once), a
// new one still splits exactly, and no pick fell back to random.
func TestRoundRobinStateFreedWithRoute(t *testing.T) {
	c := newCanaryPod(t)
	target, err := loader.ResolveTarget(c.cgroup, "")
	if err != nil {
		t.Fatal(err)
	}
	v1, v2 := netip.MustParseAddrPort(c.v1a), netip.MustParseAddrPort(c.v2a)
	for batch := range 2 {
		svcs := rrServices(100*batch, 100)
		var set []redirect.Route
		addrs := []string{"100", "4"}
		for _, s := range svcs {
			set = append(set, redirect.Route{Service: s, Mode: redirect.ModeRoundRobin, Backends: []redirect.Backend{
				{Address: v1.Addr(), Port: v1.Port(), Weight: 1}, {Address: v2.Addr(), Port: v2.Port(), Weight: 1}}})
			addrs = append(addrs, s.String())
		}
		if err := loader.ChangeRoutes(target, loader.RouteChange{Set: set}); err != nil {
			t.Fatal(err)
		}
		// One connection to each: every route gets its round-robin state.
		var res churnResult
		if err := runHelper(t, c.pod, helper(t, "churn", addrs...), -1, &res); err != nil || res.OK != 100 {
			t.Fatalf("100 connections to 100 round-robin services: %+v, %v", res, err)
		}
		if err := loader.ChangeRoutes(target, loader.RouteChange{Delete: svcs}); err != nil {
			t.Fatal(err)
		}
	}
	c.route(t, "--mode", "round-robin", c.v1a+"=9", c.v2a+"=1")
	if got := c.sequence(t, 10); got != freshRoundRobin {
		t.Errorf("a new round-robin route at 9/1 after 200 came and went: %s, want %s", got, freshRoundRobin)
	}
	if n := statusJSON(t, c.cgroup).Counters["route_round_robin_fallback"]; n != 0 {
		t.Errorf("route_round_robin_fallback = %d, want 0", n)
	}
}

// With the kernel's round-robin table full (here filled behind Sluice's
// back), a round-robin route's picks fall back to random, and each one is
// counted.
func TestRoundRobinFallbackCounted(t *testing.T) {
	c := newCanaryPod(t)
	target, err := loader.ResolveTarget(c.cgroup, "")
	if err != nil {
		t.Fatal(err)
	}
	// The table is the node's: the filling is under pod index 0, which is
	// no pod's, and goes when the test ends.
	pin := filepath.Join(filepath.Dir(target.PinDir), "node", bpf.ObjectHash(), bpf.SluiceMapRrStates)
	m, err := ebpf.LoadPinnedMap(pin, nil)
	if err != nil {
		t.Fatal(err)
	}
	key := func(i uint32) bpf.SluiceRrKey {
		return bpf.SluiceRrKey{Vip: loader.Addr6(netip.AddrFrom4([4]byte{198, 19, byte(i >> 8), byte(i)})), Port: uint16(i >> 16)}
	}
	var filled uint32
	t.Cleanup(func() {
		for i := range filled {
			m.Delete(key(i))
		}
		m.Close()
	})
	for ; filled < m.MaxEntries(); filled++ {
		if err := m.Put(key(filled), &bpf.SluiceRrState{}); err != nil {
			t.Fatalf("fill rr_states entry %d of %d: %v", filled, m.MaxEntries(), err)
		}
	}
	c.route(t, "--mode", "round-robin", c.v1a+"=9", c.v2a+"=1")
	c.churn(t, 3, 1)
	if n := statusJSON(t, c.cgroup).Counters["route_round_robin_fallback"]; n != 3 {
		t.Errorf("route_round_robin_fallback = %d after 3 connections with the table full, want 3", n)
	}
}
