package e2e

import (
	"encoding/json"
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/sluicemesh/sluice/internal/testbed"
	"github.com/sluicemesh/sluice/telemetry"
)

// expectStraight checks an echo exchange reached its server from the client's
// own socket (no sidecar in between), intact, with the client seeing peer
// as its peer.
func expectStraight(t *testing.T, res testbed.ClientResult, peer, what string) {
	t.Helper()
	if res.Err != "" || res.SentSHA != res.RecvSHA || res.Received != res.Sent {
		t.Errorf("%s: %+v", what, res)
	}
	if res.ServerSaw != res.Local {
		t.Errorf("%s: the server saw %s, not the client's own socket %s: a sidecar was in the path", what, res.ServerSaw, res.Local)
	}
	if res.Peer != peer {
		t.Errorf("%s: getpeername %s, want %s", what, res.Peer, peer)
	}
}

// heldFlow holds one connection from the app to addr and returns its flow as
// `sluice flows --json` shows it.
func (c *capturedPod) heldFlow(t *testing.T, addr string) telemetry.Flow {
	t.Helper()
	h := startHold(t, c.pod, addr, 1)
	defer h.in.Close()
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		var flows []telemetry.Flow
		if err := json.Unmarshal([]byte(c.flowsCLI(t, "--json")), &flows); err != nil {
			t.Fatal(err)
		}
		for _, f := range flows {
			if f.OriginalDst.String() == addr && f.Direction == telemetry.Outbound {
				return f
			}
		}
	}
	t.Fatalf("no open flow to %s in sluice flows", addr)
	return telemetry.Flow{}
}

// Kernel-only flows go straight to their destination, or to the backend a
// canary route picks, with no sidecar socket involved (they work with the
// sidecar gone), while the app still sees the destination it asked for, the
// flow telemetry records them as kernel-only, and the kernel counts them.
func TestKernelOnlyFlows(t *testing.T) {
	c := newCanaryPod(t)
	mustCLI(t, "install", "--cgroup", c.cgroup, "--netns", c.pod.Netns,
		"--kernel-only-ports", "80,9090", "--kernel-only-inbound-ports", "7070")
	direct := netip.AddrPortFrom(c.host.Addr4, 9090).String()
	proxied := netip.AddrPortFrom(c.host.Addr4, 8080).String()

	expectStraight(t, c.client(t, direct), direct, "kernel-only port 9090")
	expectViaSidecar(t, c.client(t, proxied), "port 8080, not kernel-only")

	// Routed: the pick happens in the kernel, and the app's peer is the
	// service. 200 connections at 50/50 reach both backends.
	c.route(t, c.v1a+"=50", c.v2a+"=50")
	res := c.client(t, vip)
	if res.Err != "" || res.ServerSaw != res.Local || res.Peer != vip {
		t.Errorf("kernel-only connection to the routed service %s: %+v; want it straight at a backend, the app's peer the service", vip, res)
	}
	if v1, v2 := c.churn(t, 200, 4); v1 < 50 || v2 < 50 {
		t.Errorf("200 kernel-only connections at 50/50 reached %d and %d", v1, v2)
	}

	f := c.heldFlow(t, direct)
	if !f.KernelOnly || f.ViaSidecar || f.Destination.String() != direct {
		t.Errorf("flow to %s: %+v; want kernel-only, not via the sidecar", direct, f)
	}
	f = c.heldFlow(t, vip)
	if !f.KernelOnly || f.ViaSidecar || (f.Destination.String() != c.v1a && f.Destination.String() != c.v2a) {
		t.Errorf("flow to the service %s: %+v; want kernel-only, to a backend, original destination the service", vip, f)
	}

	// Inbound: straight to the app, counted.
	in := netip.AddrPortFrom(c.pod.Addr4, 7070).String()
	if err := c.pod.StartEcho(self(t), in); err != nil {
		t.Fatal(err)
	}
	expectStraight(t, c.inbound(t, in), in, "kernel-only inbound port 7070")

	counters := statusJSON(t, c.cgroup).Counters
	if n := counters["kernel_only_outbound"]; n < 203 {
		t.Errorf("kernel_only_outbound = %d, want at least 203 (and the 2 held)", n)
	}
	if n := counters["kernel_only_inbound"]; n != 1 {
		t.Errorf("kernel_only_inbound = %d, want 1", n)
	}

	// The sidecar gone: kernel-only flows do not need it, the rest are
	// refused (fail closed).
	c.killSidecar(t)
	expectStraight(t, c.client(t, direct), direct, "kernel-only port 9090 with no sidecar")
	if msg := c.dialOnce(t, proxied); !refused(msg) {
		t.Errorf("port 8080 with no sidecar: %q, want refused", msg)
	}
	s := statusJSON(t, c.cgroup)
	if !slices.Equal(s.Plan.KernelOnlyPorts, []uint16{80, 9090}) || !slices.Equal(s.Plan.KernelOnlyInboundPorts, []uint16{7070}) {
		t.Errorf("status plan: kernel-only ports %v, inbound %v", s.Plan.KernelOnlyPorts, s.Plan.KernelOnlyInboundPorts)
	}
}
