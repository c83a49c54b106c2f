package loader

import (
	"net/netip"
	"testing"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/sluicemesh/sluice/bpf"
	"github.com/sluicemesh/sluice/internal/testbed"
	"github.com/sluicemesh/sluice/redirect"
)

// lookupCtx is struct bpf_sk_lookup as BPF_PROG_RUN takes it: the kernel
// fills the connection's side, and hands back the cookie of the socket the
// program picked (0 for none). BPF_PROG_RUN leaves ingress_ifindex 0.
type lookupCtx struct {
	Cookie         uint64
	Family         uint32
	Protocol       uint32
	RemoteIP4      [4]byte
	RemoteIP6      [16]byte
	RemotePort     uint16 // network order
	_              uint16
	LocalIP4       [4]byte
	LocalIP6       [16]byte
	LocalPort      uint32 // host order
	IngressIfindex uint32
	_              uint32
}

const (
	skDrop = 0
	skPass = 1
)

func newLookup(proto uint32, remote, local netip.AddrPort) lookupCtx {
	c := lookupCtx{Family: unix.AF_INET, Protocol: proto, LocalPort: uint32(local.Port())}
	c.RemotePort = uint16(remote.Port()>>8 | remote.Port()<<8)
	if remote.Addr().Is4() {
		c.RemoteIP4, c.LocalIP4 = remote.Addr().As4(), local.Addr().As4()
	} else {
		c.Family = unix.AF_INET6
		c.RemoteIP6, c.LocalIP6 = remote.Addr().As16(), local.Addr().As16()
	}
	return c
}

// lookupFixture loads the programs with plan in force in a fresh pod, and
// registers the listeners named in listeners ("tcp4", "tcp6", "tcp6-dual")
// on the inbound port as the sidecar's, as sockops would. It returns each
// listener's socket cookie.
type lookupFixture struct {
	coll    *ebpf.Collection
	maps    map[string]*ebpf.Map // the pod's
	pod     *testbed.Pod
	cookies map[string]uint64
}

func newLookupFixture(t testing.TB, plan redirect.Plan, listeners ...string) *lookupFixture {
	t.Helper()
	testbed.RequirePrivileged(t)
	spec, err := bpf.LoadSluice()
	if err != nil {
		t.Fatal(err)
	}
	coll, err := load(spec.Copy())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { coll.Close() })
	maps, err := makePodMaps(pinnedMaps, false)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		for _, m := range maps {
			m.Close()
		}
	})
	if _, err := policyMapsOf(coll.Maps, 1).write(plan.Normalize()); err != nil {
		t.Fatal(err)
	}
	pod, err := testbed.Must(t).AddPod("app")
	if err != nil {
		t.Fatal(err)
	}
	n := &node{progs: coll.Programs, maps: coll.Maps}
	if err := n.register(1, 1, maps, []netip.Addr{pod.Addr4, pod.Addr6}, func(uint32) string { return "" }); err != nil {
		t.Fatal(err)
	}
	f := &lookupFixture{coll: coll, maps: maps, pod: pod, cookies: map[string]uint64{}}
	for _, kind := range listeners {
		fd := listenIn(t, pod, kind, plan.InboundPort, 0)
		slot := bpf.SluiceListenerSlotLISTENER_IPV4
		if kind != "tcp4" {
			slot = bpf.SluiceListenerSlotLISTENER_IPV6
		}
		if err := maps[bpf.SluiceMapInboundListeners].Update(uint32(slot), uint64(fd), ebpf.UpdateAny); err != nil {
			t.Fatal(err)
		}
		cookie, err := unix.GetsockoptUint64(fd, unix.SOL_SOCKET, unix.SO_COOKIE)
		if err != nil {
			t.Fatal(err)
		}
		f.cookies[kind] = cookie
	}
	return f
}

// listenIn opens a TCP listener on port in pod: kind "tcp4" (0.0.0.0),
// "tcp6" ([::], IPv6 only) or "tcp6-dual" ([::], IPv4 too). A non-zero mss
// is advertised in its SYN-ACKs, which tells the tests which listener
// answered a SYN. The descriptor is closed when the test ends.
func listenIn(t testing.TB, pod *testbed.Pod, kind string, port uint16, mss int) int {
	t.Helper()
	fd := -1
	if err := pod.Do(func() error {
		family := unix.AF_INET
		if kind != "tcp4" {
			family = unix.AF_INET6
		}
		s, err := unix.Socket(family, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, unix.IPPROTO_TCP)
		if err != nil {
			return err
		}
		fd = s
		if err := unix.SetsockoptInt(s, unix.SOL_SOCKET, unix.SO_REUSEADDR, 1); err != nil {
			return err
		}
		if mss != 0 {
			if err := unix.SetsockoptInt(s, unix.IPPROTO_TCP, unix.TCP_MAXSEG, mss); err != nil {
				return err
			}
		}
		var sa unix.Sockaddr = &unix.SockaddrInet4{Port: int(port)}
		if family == unix.AF_INET6 {
			v6only := 1
			if kind == "tcp6-dual" {
				v6only = 0
			}
			if err := unix.SetsockoptInt(s, unix.IPPROTO_IPV6, unix.IPV6_V6ONLY, v6only); err != nil {
				return err
			}
			sa = &unix.SockaddrInet6{Port: int(port)}
		}
		if err := unix.Bind(s, sa); err != nil {
			return err
		}
		return unix.Listen(s, 1024)
	}); err != nil {
		if fd >= 0 {
			unix.Close(fd)
		}
		t.Fatalf("listen %s :%d in pod: %v", kind, port, err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	return fd
}

// run runs the inbound program on one lookup and returns its verdict and
// the cookie of the socket it picked.
func (f *lookupFixture) run(t testing.TB, in lookupCtx) (uint32, uint64) {
	t.Helper()
	var out lookupCtx
	var ret uint32
	if err := f.pod.Do(func() (err error) {
		ret, err = f.coll.Programs[bpf.SluiceProgSluiceSkLookup].Run(&ebpf.RunOptions{Context: in, ContextOut: &out})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	return ret, out.Cookie
}

func (f *lookupFixture) counters(t testing.TB) map[string]uint64 {
	t.Helper()
	counts, err := sumCounters(f.maps[bpf.SluiceMapCounters])
	if err != nil {
		t.Fatal(err)
	}
	return counts
}

func inboundPlan(mutate func(*redirect.Plan)) redirect.Plan {
	p := redirect.Plan{OutboundPort: 15001, InboundPort: 15006, InboundAllPorts: true,
		ExcludeInboundPorts: []uint16{9000, 15001, 15006}, KernelOnlyInboundPorts: []uint16{7070}}
	if mutate != nil {
		mutate(&p)
	}
	return p
}

// TestInboundLookup runs the inbound program on listener lookups with
// BPF_PROG_RUN: a captured one goes to the sidecar's listener of its family
// (or a dual-stack IPv6 one), everything else is left to the kernel; with
// no sidecar, fail-closed drops (the kernel then resets as for a closed
// port) and fail-open lets the app have it. Each outcome is counted.
func TestInboundLookup(t *testing.T) {
	client4, pod4 := netip.MustParseAddr("198.18.2.2"), netip.MustParseAddr("198.18.1.2")
	client6, pod6 := netip.MustParseAddr("2001:2:0:2::2"), netip.MustParseAddr("2001:2:0:1::2")
	v4 := func(port uint16) (netip.AddrPort, netip.AddrPort) {
		return netip.AddrPortFrom(client4, 40000), netip.AddrPortFrom(pod4, port)
	}
	v6 := func(port uint16) (netip.AddrPort, netip.AddrPort) {
		return netip.AddrPortFrom(client6, 40000), netip.AddrPortFrom(pod6, port)
	}
	all := []string{"tcp4", "tcp6"}
	tests := []struct {
		name      string
		policy    func(*redirect.Plan)
		listeners []string
		v6        bool
		remote    string // the client's address, when not the remote host's
		port      uint16
		proto     uint32
		verdict   uint32
		to        string // the listener picked; "" for none
		counter   string // the counter that must have counted it
	}{
		{name: "ipv4", listeners: all, port: 8080, verdict: skPass, to: "tcp4", counter: "inbound_steered"},
		{name: "ipv6", listeners: all, v6: true, port: 8080, verdict: skPass, to: "tcp6", counter: "inbound_steered"},
		{name: "ipv4 to a dual-stack listener", listeners: []string{"tcp6-dual"}, port: 8080, verdict: skPass, to: "tcp6-dual", counter: "inbound_steered"},
		{name: "ipv4 with only an ipv6-only listener", listeners: []string{"tcp6"}, port: 8080, verdict: skDrop, counter: "inbound_assign_failed"},
		{name: "from inside the pod, ipv4", listeners: all, remote: "127.0.0.6", port: 8080, verdict: skPass},
		{name: "from inside the pod, ipv6", listeners: all, v6: true, remote: "2001:2:0:1::2", port: 8080, verdict: skPass},
		{name: "udp", listeners: all, port: 8080, proto: unix.IPPROTO_UDP, verdict: skPass},
		{name: "excluded port", listeners: all, port: 9000, verdict: skPass},
		{name: "sidecar's own port", listeners: all, v6: true, port: 15006, verdict: skPass},
		{name: "kernel-only port", listeners: all, port: 7070, verdict: skPass, counter: "kernel_only_inbound"},
		{name: "port not in -b list", policy: func(p *redirect.Plan) { p.InboundAllPorts, p.InboundPorts = false, []uint16{8080} },
			listeners: all, port: 7071, verdict: skPass},
		{name: "port in -b list", policy: func(p *redirect.Plan) { p.InboundAllPorts, p.InboundPorts = false, []uint16{8080} },
			listeners: all, port: 8080, verdict: skPass, to: "tcp4", counter: "inbound_steered"},
		{name: "no sidecar, fail-closed", port: 8080, verdict: skDrop, counter: "fail_closed_inbound"},
		{name: "no sidecar, fail-open", policy: func(p *redirect.Plan) { p.FailOpen = true }, v6: true, port: 8080, verdict: skPass, counter: "fail_open_inbound"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := newLookupFixture(t, inboundPlan(tt.policy), tt.listeners...)
			remote, local := v4(tt.port)
			if tt.v6 {
				remote, local = v6(tt.port)
			}
			if tt.remote != "" {
				remote = netip.AddrPortFrom(netip.MustParseAddr(tt.remote), remote.Port())
			}
			proto := tt.proto
			if proto == 0 {
				proto = unix.IPPROTO_TCP
			}
			verdict, cookie := f.run(t, newLookup(proto, remote, local))
			if verdict != tt.verdict || cookie != f.cookies[tt.to] {
				t.Errorf("verdict %d, socket %d; want %d, socket %d (%q)", verdict, cookie, tt.verdict, f.cookies[tt.to], tt.to)
			}
			if counts := f.counters(t); tt.counter != "" && counts[tt.counter] != 1 {
				t.Errorf("counters %v: want %s counted once", counts, tt.counter)
			}
		})
	}
}

// FuzzInboundLookup throws arbitrary lookups at the inbound program: a TCP
// lookup for a captured port from outside the pod always reaches the
// sidecar's listener of its family, and nothing else ever does.
func FuzzInboundLookup(f *testing.F) {
	f.Add(true, uint8(unix.IPPROTO_TCP), uint16(8080), uint16(40000), []byte{198, 18, 2, 2})
	f.Add(false, uint8(unix.IPPROTO_TCP), uint16(15006), uint16(1), []byte{0x20, 1, 0, 2})
	f.Add(true, uint8(unix.IPPROTO_UDP), uint16(53), uint16(53), []byte{127, 0, 0, 1})
	f.Add(true, uint8(unix.IPPROTO_TCP), uint16(7070), uint16(0), []byte{})
	plan := inboundPlan(nil)
	fx := newLookupFixture(f, plan, "tcp4", "tcp6")
	f.Fuzz(func(t *testing.T, ipv4 bool, proto uint8, port, sport uint16, addr []byte) {
		var raw [16]byte
		copy(raw[:], addr)
		remote := netip.AddrPortFrom(netip.AddrFrom16(raw), sport)
		local := netip.AddrPortFrom(netip.MustParseAddr("2001:2:0:1::2"), port)
		want := "tcp6"
		if ipv4 {
			remote = netip.AddrPortFrom(netip.AddrFrom4([4]byte(raw[:4])), sport)
			local = netip.AddrPortFrom(netip.MustParseAddr("198.18.1.2"), port)
			want = "tcp4"
		}
		p := uint32(unix.IPPROTO_UDP)
		if proto%2 == 0 {
			p = unix.IPPROTO_TCP
		}
		inside := remote.Addr().IsLoopback() || remote.Addr() == local.Addr()
		captured := p == unix.IPPROTO_TCP && !inside && port != 9000 && port != 15001 && port != 15006 && port != 7070
		if !captured {
			want = ""
		}
		verdict, cookie := fx.run(t, newLookup(p, remote, local))
		if verdict != skPass || cookie != fx.cookies[want] {
			t.Fatalf("%s %s -> %s: verdict %d, socket %d; want pass to %q (%d)", map[bool]string{true: "tcp", false: "udp"}[p == unix.IPPROTO_TCP],
				remote, local, verdict, cookie, want, fx.cookies[want])
		}
	})
}
