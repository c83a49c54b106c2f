package loader

import (
	"encoding/binary"
	"net"
	"net/netip"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"

	"github.com/sluicemesh/sluice/bpf"
	"github.com/sluicemesh/sluice/internal/testbed"
	"github.com/sluicemesh/sluice/redirect"
)

const (
	tcpSYN    = 0x02
	tcpACK    = 0x10
	tcxNext   = 0xffffffff // TCX_NEXT (-1) as the kernel returns it
	protoTCP  = 6
	protoUDP  = 17
	ipOptions = 4 // bytes of IPv4 options in the "options" case
)

// packet builds an Ethernet frame carrying a TCP (or UDP) header from src to
// dst with the given TCP flags.
func packet(src, dst netip.AddrPort, proto, flags byte, optLen int) []byte {
	var b []byte
	l4 := make([]byte, 20)
	binary.BigEndian.PutUint16(l4[0:], src.Port())
	binary.BigEndian.PutUint16(l4[2:], dst.Port())
	l4[12] = 5 << 4
	l4[13] = flags
	if src.Addr().Is4() {
		ip := make([]byte, 20+optLen)
		ip[0] = 0x40 | byte((20+optLen)/4)
		binary.BigEndian.PutUint16(ip[2:], uint16(len(ip)+len(l4)))
		ip[8], ip[9] = 64, proto
		s, d := src.Addr().As4(), dst.Addr().As4()
		copy(ip[12:], s[:])
		copy(ip[16:], d[:])
		b = append(ethernet(0x0800), ip...)
	} else {
		ip := make([]byte, 40)
		ip[0] = 0x60
		binary.BigEndian.PutUint16(ip[4:], uint16(len(l4)))
		ip[6], ip[7] = proto, 64
		s, d := src.Addr().As16(), dst.Addr().As16()
		copy(ip[8:], s[:])
		copy(ip[24:], d[:])
		b = append(ethernet(0x86dd), ip...)
	}
	return append(b, l4...)
}

func ethernet(proto uint16) []byte {
	eth := make([]byte, 14)
	binary.BigEndian.PutUint16(eth[12:], proto)
	return eth
}

// tcFixture loads the programs with an inbound policy and enters a test pod's
// netns holding a listener on the inbound port, as the sidecar would.
func tcFixture(t testing.TB, p redirect.Plan) (*ebpf.Collection, *testbed.Pod) {
	t.Helper()
	testbed.RequirePrivileged(t)
	coll, err := load(true, false, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { coll.Close() })
	if _, err := policyMapsOf(coll.Maps).write(p.Normalize()); err != nil {
		t.Fatal(err)
	}
	pod, err := testbed.Must(t).AddPod("app")
	if err != nil {
		t.Fatal(err)
	}
	if err := pod.Do(func() error {
		for _, network := range []string{"tcp4", "tcp6"} {
			ln, err := net.Listen(network, ":15006")
			if err != nil {
				return err
			}
			t.Cleanup(func() { ln.Close() })
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	return coll, pod
}

// TestTCIngressSteering runs the inbound program on crafted packets with
// BPF_PROG_RUN. A steered SYN is one the program looked up the inbound
// listener for and handed to it, as its counters show; the assign itself
// only works at real TC ingress, which the e2e tests cover.
func TestTCIngressSteering(t *testing.T) {
	client4, pod4 := netip.MustParseAddr("198.18.2.2"), netip.MustParseAddr("198.18.1.2")
	client6, pod6 := netip.MustParseAddr("2001:2:0:2::2"), netip.MustParseAddr("2001:2:0:1::2")
	tests := []struct {
		name    string
		policy  func(*redirect.Plan)
		src     netip.AddrPort
		dst     netip.AddrPort
		proto   byte
		flags   byte
		options int
		steered bool
	}{
		{name: "ipv4 syn", src: netip.AddrPortFrom(client4, 40001), dst: netip.AddrPortFrom(pod4, 8080), proto: protoTCP, flags: tcpSYN, steered: true},
		{name: "ipv4 syn with ip options", src: netip.AddrPortFrom(client4, 40002), dst: netip.AddrPortFrom(pod4, 8080), proto: protoTCP, flags: tcpSYN, options: ipOptions, steered: true},
		{name: "ipv6 syn", src: netip.AddrPortFrom(client6, 40003), dst: netip.AddrPortFrom(pod6, 8080), proto: protoTCP, flags: tcpSYN, steered: true},
		{name: "syn-ack", src: netip.AddrPortFrom(client4, 40004), dst: netip.AddrPortFrom(pod4, 8080), proto: protoTCP, flags: tcpSYN | tcpACK},
		{name: "established ack", src: netip.AddrPortFrom(client4, 40005), dst: netip.AddrPortFrom(pod4, 8080), proto: protoTCP, flags: tcpACK},
		{name: "udp", src: netip.AddrPortFrom(client4, 40006), dst: netip.AddrPortFrom(pod4, 8080), proto: protoUDP, flags: tcpSYN},
		{name: "excluded port", src: netip.AddrPortFrom(client4, 40007), dst: netip.AddrPortFrom(pod4, 9000), proto: protoTCP, flags: tcpSYN},
		{name: "sidecar's own port", src: netip.AddrPortFrom(client6, 40008), dst: netip.AddrPortFrom(pod6, 15006), proto: protoTCP, flags: tcpSYN},
		{name: "port not in -b list", policy: func(c *redirect.Plan) { c.InboundAllPorts, c.InboundPorts = false, []uint16{8080} },
			src: netip.AddrPortFrom(client4, 40009), dst: netip.AddrPortFrom(pod4, 7070), proto: protoTCP, flags: tcpSYN},
		{name: "port in -b list", policy: func(c *redirect.Plan) { c.InboundAllPorts, c.InboundPorts = false, []uint16{8080} },
			src: netip.AddrPortFrom(client4, 40010), dst: netip.AddrPortFrom(pod4, 8080), proto: protoTCP, flags: tcpSYN, steered: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := redirect.Plan{OutboundPort: 15001, InboundPort: 15006, InboundAllPorts: true, ExcludeInboundPorts: []uint16{9000, 15001, 15006}}
			if tt.policy != nil {
				tt.policy(&c)
			}
			coll, pod := tcFixture(t, c)
			prog := coll.Programs[bpf.SluiceProgSluiceTcIngress]
			var ret uint32
			if err := pod.Do(func() (err error) {
				ret, err = prog.Run(&ebpf.RunOptions{Data: packet(tt.src, tt.dst, tt.proto, tt.flags, tt.options)})
				return err
			}); err != nil {
				t.Fatal(err)
			}
			counts, err := sumCounters(coll.Maps[bpf.SluiceMapCounters])
			if err != nil {
				t.Fatal(err)
			}
			// BPF_PROG_RUN is not TC ingress, so bpf_sk_assign refuses the
			// listener the program found.
			tried := counts["inbound_assign_failed"] + counts["inbound_steered"]
			switch {
			case tt.steered && tried != 1:
				t.Errorf("counters %v: want the SYN handed to the inbound listener once", counts)
			case !tt.steered && (tried != 0 || counts["inbound_no_listener"] != 0):
				t.Errorf("counters %v: want the packet left alone", counts)
			case ret != tcxNext:
				// Only a real assign passes the packet.
				t.Errorf("verdict %#x, want TCX_NEXT", ret)
			}
		})
	}
}

// BenchmarkTCIngress measures what the inbound program costs per packet,
// against a program that only returns, on the same packet in the same run.
// "established" is every packet of a connection after its SYN.
func BenchmarkTCIngress(b *testing.B) {
	empty, err := ebpf.NewProgram(&ebpf.ProgramSpec{Type: ebpf.SchedCLS, License: "GPL",
		Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, -1), asm.Return()}})
	if err != nil {
		b.Fatal(err)
	}
	defer empty.Close()
	src, dst := netip.MustParseAddrPort("198.18.2.2:40000"), netip.MustParseAddrPort("198.18.1.2:8080")
	for _, bc := range []struct {
		name  string
		flags byte
	}{{"established", tcpACK}, {"syn", tcpSYN}} {
		b.Run(bc.name, func(b *testing.B) {
			coll, pod := tcFixture(b, redirect.Plan{OutboundPort: 15001, InboundPort: 15006, InboundAllPorts: true, ExcludeInboundPorts: []uint16{15001, 15006}})
			prog := coll.Programs[bpf.SluiceProgSluiceTcIngress]
			pkt := packet(src, dst, protoTCP, bc.flags, 0)
			const repeat = 1_000_000
			var base, cost float64
			if err := pod.Do(func() error {
				_, d, err := empty.Benchmark(pkt, repeat, nil)
				if err != nil {
					return err
				}
				base = float64(d.Nanoseconds())
				_, d, err = prog.Benchmark(pkt, repeat, nil)
				cost = float64(d.Nanoseconds())
				return err
			}); err != nil {
				b.Fatal(err)
			}
			b.ReportMetric(0, "ns/op") // b.N plays no part: the kernel repeats the run
			b.ReportMetric(cost/base, "x_empty_prog")
			b.ReportMetric(cost-base, "ns_over_empty/pkt")
		})
	}
}

// TestTCIngressRefuse runs the inbound program, fail-closed, on SYNs for
// which no sidecar listens (a SYN with data and one without): each must come
// back as the reset a closed port sends, redirected out of the interface it
// came in on, with valid checksums. BPF_PROG_RUN's packets are never
// CHECKSUM_PARTIAL, so this checks the complete checksums.
func TestTCIngressRefuse(t *testing.T) {
	testbed.RequirePrivileged(t)
	coll, err := load(true, false, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer coll.Close()
	plan := redirect.Plan{OutboundPort: 15001, InboundPort: 15006, InboundAllPorts: true, ExcludeInboundPorts: []uint16{15001, 15006}}
	if _, err := policyMapsOf(coll.Maps).write(plan.Normalize()); err != nil {
		t.Fatal(err)
	}
	pod, err := testbed.Must(t).AddPod("app")
	if err != nil {
		t.Fatal(err)
	}
	prog := coll.Programs[bpf.SluiceProgSluiceTcIngress]
	for _, tc := range []struct {
		name     string
		src, dst netip.AddrPort
		payload  int
	}{
		{"ipv4", netip.MustParseAddrPort("198.18.2.2:40001"), netip.MustParseAddrPort("198.18.1.2:8080"), 0},
		{"ipv4 syn with data", netip.MustParseAddrPort("198.18.2.2:40002"), netip.MustParseAddrPort("198.18.1.2:8080"), 100},
		{"ipv6", netip.MustParseAddrPort("[2001:2:0:2::2]:40003"), netip.MustParseAddrPort("[2001:2:0:1::2]:8080"), 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			in := packet(tc.src, tc.dst, protoTCP, tcpSYN, 0)
			l3 := 20
			if tc.src.Addr().Is6() {
				l3 = 40
			}
			tcp := in[14+l3:]
			binary.BigEndian.PutUint32(tcp[4:], 0xfffffffe) // seq: the ack wraps
			if tc.payload > 0 {
				in = append(in, make([]byte, tc.payload)...)
				binary.BigEndian.PutUint16(in[14+2:], uint16(l3+20+tc.payload))
			}
			in[0], in[6] = 0xaa, 0xbb // destination and source MACs
			out := make([]byte, 1500)
			var ret uint32
			if err := pod.Do(func() (err error) {
				opts := &ebpf.RunOptions{Data: in, DataOut: out}
				ret, err = prog.Run(opts)
				out = opts.DataOut
				return err
			}); err != nil {
				t.Fatal(err)
			}
			const tcActRedirect = 7
			if ret != tcActRedirect || len(out) != 14+l3+20 {
				t.Fatalf("verdict %d, %d bytes out; want a %d-byte reset redirected (7)", ret, len(out), 14+l3+20)
			}
			if out[0] != 0xbb || out[6] != 0xaa {
				t.Errorf("MACs not swapped: % x", out[:12])
			}
			ip, rst := out[14:14+l3], out[14+l3:]
			var src, dst netip.Addr
			var pseudo []byte
			if l3 == 20 {
				src, dst = netip.AddrFrom4([4]byte(ip[12:16])), netip.AddrFrom4([4]byte(ip[16:20]))
				if binary.BigEndian.Uint16(ip[2:]) != 40 || checksum(ip) != 0 {
					t.Errorf("IPv4 header: length %d, checksum sum %#x", binary.BigEndian.Uint16(ip[2:]), checksum(ip))
				}
				pseudo = append(append(append([]byte{}, ip[12:20]...), 0, protoTCP), 0, 20)
			} else {
				src, dst = netip.AddrFrom16([16]byte(ip[8:24])), netip.AddrFrom16([16]byte(ip[24:40]))
				if binary.BigEndian.Uint16(ip[4:]) != 20 {
					t.Errorf("IPv6 payload length %d", binary.BigEndian.Uint16(ip[4:]))
				}
				pseudo = append(append([]byte{}, ip[8:40]...), 0, 0, 0, 20, 0, 0, 0, protoTCP)
			}
			if src != tc.dst.Addr() || dst != tc.src.Addr() {
				t.Errorf("reset from %s to %s, want %s to %s", src, dst, tc.dst.Addr(), tc.src.Addr())
			}
			sport, dport := binary.BigEndian.Uint16(rst[0:]), binary.BigEndian.Uint16(rst[2:])
			ack := binary.BigEndian.Uint32(rst[8:])
			if sport != tc.dst.Port() || dport != tc.src.Port() || rst[13] != 0x14 || rst[12] != 5<<4 || ack != 0xffffffff {
				t.Errorf("TCP: ports %d->%d flags %#x offset %d ack %#x; want %d->%d RST|ACK, 5, 0xffffffff",
					sport, dport, rst[13], rst[12]>>4, ack, tc.dst.Port(), tc.src.Port())
			}
			if sum := checksum(append(pseudo, rst...)); sum != 0 {
				t.Errorf("TCP checksum does not verify (sum %#x)", sum)
			}
			counts, err := sumCounters(coll.Maps[bpf.SluiceMapCounters])
			if err != nil {
				t.Fatal(err)
			}
			if counts["fail_closed_inbound"] == 0 {
				t.Errorf("counters %v: fail_closed_inbound not counted", counts)
			}
		})
	}
}

// checksum is the Internet checksum of b, 0 when b holds a valid one.
func checksum(b []byte) uint16 {
	var sum uint32
	for i := 0; i+1 < len(b); i += 2 {
		sum += uint32(binary.BigEndian.Uint16(b[i:]))
	}
	if len(b)%2 == 1 {
		sum += uint32(b[len(b)-1]) << 8
	}
	for sum > 0xffff {
		sum = (sum & 0xffff) + sum>>16
	}
	return ^uint16(sum)
}
