package e2e

import (
	"fmt"
	"net"
	"net/netip"
	"os"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/sluicemesh/sluice/internal/testbed"
	"github.com/sluicemesh/sluice/loader"
)

// inbound connects from the remote host into the pod.
func (c *capturedPod) inbound(t *testing.T, addr string) testbed.ClientResult {
	t.Helper()
	res, err := c.host.RunClient(self(t), addr, payload)
	if err != nil {
		t.Fatalf("client to %s: %v", addr, err)
	}
	checkIntact(t, res, addr)
	return res
}

// A client on a remote host reaches the app through the sidecar, over IPv4
// and IPv6; the app sees the sidecar (127.0.0.6 for IPv4, like Istio).
func TestInboundCapture(t *testing.T) {
	c := newCapturedPod(t)
	c.startSidecar(t)
	if _, err := c.pod.ListenEcho("[::]:8080"); err != nil {
		t.Fatal(err)
	}
	for _, a := range []netip.Addr{c.pod.Addr4, c.pod.Addr6} {
		addr := netip.AddrPortFrom(a, 8080).String()
		res := c.inbound(t, addr)
		c.expectProxiedDir(t, res, addr, "inbound")
		if a.Is4() && !strings.HasPrefix(res.ServerSaw, "127.0.0.6:") {
			t.Errorf("app saw %s, want the sidecar's 127.0.0.6", res.ServerSaw)
		}
	}
}

// Excluded inbound ports and the sidecar's own ports reach the app directly;
// with -b, only the listed ports are captured.
func TestInboundExclusions(t *testing.T) {
	tests := []struct {
		name           string
		install        []string
		direct, via    []uint16
		appListensOnIP bool
	}{
		// 15001 is the sidecar's outbound port; the sidecar listens on it
		// on loopback only, so the app can serve it on the pod address.
		{"excluded and sidecar ports", []string{"-d", "9000"}, []uint16{9000, 15001}, []uint16{8080}, true},
		{"include list", []string{"-b", "8080"}, []uint16{7070}, []uint16{8080}, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := newCapturedPod(t, tt.install...)
			c.startSidecar(t)
			for _, port := range append(tt.direct, tt.via...) {
				if _, err := c.pod.ListenEcho(netip.AddrPortFrom(c.pod.Addr4, port).String()); err != nil {
					t.Fatal(err)
				}
			}
			var direct []testbed.ClientResult
			for _, port := range tt.direct {
				addr := netip.AddrPortFrom(c.pod.Addr4, port).String()
				res := c.inbound(t, addr)
				expectDirect(t, res, addr)
				direct = append(direct, res)
			}
			// Captured last: by the time it is logged, the others would be.
			for _, port := range tt.via {
				addr := netip.AddrPortFrom(c.pod.Addr4, port).String()
				c.expectProxiedDir(t, c.inbound(t, addr), addr, "inbound")
			}
			for _, r := range direct {
				for _, e := range c.sidecar.Entries("proxied") {
					if e.Str("client") == r.Local {
						t.Errorf("sidecar saw a connection that should be direct: %v", e)
					}
				}
			}
		})
	}
}

// An app that serves an inbound request by calling out: both captures apply
// once each, and neither loops.
func TestInboundAndOutboundTogether(t *testing.T) {
	c := newCapturedPod(t)
	c.startSidecar(t)
	upstream := netip.AddrPortFrom(c.host.Addr4, 9090).String()
	if err := c.pod.StartRelay(self(t), "[::]:8080", upstream); err != nil {
		t.Fatal(err)
	}
	if err := c.pod.WaitListening(8080, 10*time.Second); err != nil {
		t.Fatal(err)
	}
	addr := netip.AddrPortFrom(c.pod.Addr4, 8080).String()
	res := c.inbound(t, addr)

	in, err := c.sidecar.WaitFor("proxied", func(e testbed.LogEntry) bool { return e.Str("client") == res.Local }, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	out, err := c.sidecar.WaitFor("proxied", func(e testbed.LogEntry) bool { return e.Str("direction") == "outbound" }, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if in.Str("orig_dst") != addr || out.Str("orig_dst") != upstream {
		t.Errorf("sidecar saw inbound %s and outbound %s, want %s and %s", in.Str("orig_dst"), out.Str("orig_dst"), addr, upstream)
	}
	if res.ServerSaw != out.Str("upstream") {
		t.Errorf("upstream server saw %s, want the sidecar's outbound socket %s", res.ServerSaw, out.Str("upstream"))
	}
	if n := len(c.sidecar.Entries("proxied")); n != 2 {
		t.Errorf("sidecar proxied %d connections, want exactly 2 (a loop would add more): %v", n, c.sidecar.Entries("proxied"))
	}
}

// Uninstall leaves the interface's qdiscs and filters exactly as they were,
// including a clsact qdisc and filter that existed before install.
func TestInboundUninstallRestoresTC(t *testing.T) {
	privileged(t)
	bed := testbed.Must(t)
	pod, err := bed.AddPod("app")
	if err != nil {
		t.Fatal(err)
	}
	ns, err := netns.GetFromPath(pod.Netns)
	if err != nil {
		t.Fatal(err)
	}
	defer ns.Close()
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	eth0, err := h.LinkByName("eth0")
	if err != nil {
		t.Fatal(err)
	}
	clsact := &netlink.GenericQdisc{QdiscAttrs: netlink.QdiscAttrs{LinkIndex: eth0.Attrs().Index, Handle: netlink.MakeHandle(0xffff, 0), Parent: netlink.HANDLE_CLSACT}, QdiscType: "clsact"}
	if err := h.QdiscAdd(clsact); err != nil {
		t.Fatal(err)
	}
	// Someone else's filter: a cls_bpf program that passes everything.
	pass, err := ebpf.NewProgram(&ebpf.ProgramSpec{Type: ebpf.SchedCLS, License: "GPL",
		Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, 0), asm.Return()}})
	if err != nil {
		t.Fatal(err)
	}
	defer pass.Close()
	filter := &netlink.BpfFilter{FilterAttrs: netlink.FilterAttrs{LinkIndex: eth0.Attrs().Index, Parent: netlink.HANDLE_MIN_INGRESS, Priority: 7, Protocol: unix.ETH_P_ALL},
		Fd: pass.FD(), Name: "preexisting", DirectAction: true}
	if err := h.FilterAdd(filter); err != nil {
		t.Fatal(err)
	}

	snapshot := func() string {
		t.Helper()
		var lines []string
		qdiscs, err := h.QdiscList(eth0)
		if err != nil {
			t.Fatal(err)
		}
		for _, q := range qdiscs {
			lines = append(lines, "qdisc "+q.Type()+" "+netlink.HandleStr(q.Attrs().Handle)+" parent "+netlink.HandleStr(q.Attrs().Parent))
		}
		for _, parent := range []uint32{netlink.HANDLE_MIN_INGRESS, netlink.HANDLE_MIN_EGRESS} {
			filters, err := h.FilterList(eth0, parent)
			if err != nil {
				t.Fatal(err)
			}
			for _, f := range filters {
				lines = append(lines, "filter "+f.Type()+" parent "+netlink.HandleStr(f.Attrs().Parent)+" prio "+netlink.HandleStr(uint32(f.Attrs().Priority)))
			}
		}
		sort.Strings(lines)
		return strings.Join(lines, "\n")
	}
	before := snapshot()
	if !strings.Contains(before, "qdisc clsact") || !strings.Contains(before, "filter bpf") {
		t.Fatalf("pre-existing clsact and filter not seen:\n%s", before)
	}
	mustCLI(t, "install", "--cgroup", pod.Cgroup, "--netns", pod.Netns)
	if n := inboundPrograms(t, pod); n != 1 {
		t.Errorf("after install, %d sk_lookup programs on the pod's netns, want 1", n)
	}
	if out := mustCLI(t, "status", "--cgroup", pod.Cgroup); !strings.Contains(out, "link_sk_lookup") || !strings.Contains(out, "(sk_lookup)") {
		t.Errorf("status does not show the sk_lookup attachment:\n%s", out)
	}
	mustCLI(t, "uninstall", "--cgroup", pod.Cgroup)
	if after := snapshot(); after != before {
		t.Errorf("qdiscs and filters changed:\nbefore:\n%s\nafter:\n%s", before, after)
	}
	if n := inboundPrograms(t, pod); n != 0 {
		t.Errorf("after uninstall, %d sk_lookup programs left on the pod's netns", n)
	}
}

// The sidecar's dials to the app take their source port at connect, for the
// whole 4-tuple, as a plain connect does: in a pod with 64 local ports, 120
// short inbound connections in a row, 50 a second, all reach the app. Bound
// at bind time instead, every port left in TIME_WAIT was lost for a minute
// and only the first 64 got through. (A connect reuses a TIME_WAIT 4-tuple
// from a loopback source, 127.0.0.6 or ::1, after net.ipv4.tcp_tw_reuse_delay,
// 1 s, under the default tcp_tw_reuse (2, loopback only): so 64 a second to
// one app port.) Over IPv6 the sidecar dialed from the pod's own address,
// not loopback: its TIME_WAIT tuples were never reused, and 64 got through.
func TestInboundNarrowLocalPortRange(t *testing.T) {
	c := newCapturedPod(t)
	setLocalPortRange(t, c.pod, 40000, 40063)
	c.startSidecar(t)
	if _, err := c.pod.ListenEcho("[::]:8080"); err != nil {
		t.Fatal(err)
	}
	for _, a := range []netip.Addr{c.pod.Addr4, c.pod.Addr6} {
		addr := netip.AddrPortFrom(a, 8080).String()
		const n = 120
		var failed []string
		err := c.host.Do(func() error {
			for i := range n {
				time.Sleep(20 * time.Millisecond) // the pace, not a wait
				if err := oneShort(addr); err != nil {
					failed = append(failed, fmt.Sprintf("connection %d: %v", i, err))
				}
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		if len(failed) > 0 {
			dials := c.sidecar.Entries("dial original destination")
			t.Errorf("to %s: %d of %d inbound connections failed, first: %s; the sidecar's failed dials to the app: %d, first: %v", addr, len(failed), n, failed[0], len(dials), dials[:min(1, len(dials))])
		}
	}
}

// setLocalPortRange narrows the pod's ephemeral ports to first-last, as a
// pod's sysctls may: /proc/sys/net is the netns of the thread that opens it.
func setLocalPortRange(t *testing.T, pod *testbed.Pod, first, last int) {
	t.Helper()
	err := pod.Do(func() error {
		return os.WriteFile("/proc/sys/net/ipv4/ip_local_port_range", fmt.Appendf(nil, "%d %d", first, last), 0o644)
	})
	if err != nil {
		t.Fatalf("narrow the pod's local port range: %v", err)
	}
}

// An address the pod gets after its install is no way around the sidecar:
// a connection to it is refused, counted for the node (no pod is known by
// that address), until a rerun of install registers it and captures it.
func TestInboundToAnAddressAddedAfterInstall(t *testing.T) {
	c := newCapturedPod(t)
	c.startSidecar(t)
	if _, err := c.pod.ListenEcho("[::]:8080"); err != nil {
		t.Fatal(err)
	}
	added := c.pod.Addr4.Next() // 198.18.<n>.3, in the pod's subnet
	if err := c.pod.Do(func() error {
		eth0, err := netlink.LinkByName(c.pod.Iface)
		if err != nil {
			return err
		}
		return netlink.AddrAdd(eth0, &netlink.Addr{IPNet: &net.IPNet{IP: added.AsSlice(), Mask: net.CIDRMask(24, 32)}})
	}); err != nil {
		t.Fatal(err)
	}
	addr := netip.AddrPortFrom(added, 8080).String()
	before, err := loader.NodeCounters(loader.DefaultPinRoot)
	if err != nil {
		t.Fatal(err)
	}
	if res, err := c.host.RunClient(self(t), addr, payload); err == nil || !strings.Contains(err.Error(), "connection refused") {
		t.Errorf("connection to %s, added after install: %v (app saw %s), want connection refused", addr, err, res.ServerSaw)
	}
	after, err := loader.NodeCounters(loader.DefaultPinRoot)
	if err != nil {
		t.Fatal(err)
	}
	if n := after["inbound_unknown_address_refused"] - before["inbound_unknown_address_refused"]; n == 0 {
		t.Errorf("refused connections to an unknown address not counted: %v", after)
	}
	out := mustCLI(t, "install", "--cgroup", c.cgroup, "--netns", c.pod.Netns)
	if !strings.Contains(out, added.String()) {
		t.Errorf("rerun of install did not say it registered %s:\n%s", added, out)
	}
	c.expectProxiedDir(t, c.inbound(t, addr), addr, "inbound")
}
