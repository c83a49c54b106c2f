package telemetry

import (
	"net"
	"net/netip"
	"testing"

	"golang.org/x/sys/unix"
)

// cookieOf is a TCP connection's socket cookie, as flow events carry it.
func cookieOf(t testing.TB, c net.Conn) uint64 {
	t.Helper()
	raw, err := c.(*net.TCPConn).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var cookie uint64
	var serr error
	if err := raw.Control(func(fd uintptr) { cookie, serr = unix.GetsockoptUint64(int(fd), unix.SOL_SOCKET, unix.SO_COOKIE) }); err != nil || serr != nil {
		t.Fatal(err, serr)
	}
	return cookie
}

// An exact lookup finds a flow's socket by its tuple and cookie, IPv4,
// IPv6 and IPv4 on a dual-stack listener's accepted socket alike, with the
// bytes it moved; a wrong cookie or a closed socket is not found.
func TestSocketStatsLooksUpEachSocket(t *testing.T) {
	var keys []sockKey
	var conns []net.Conn
	for _, tc := range []struct{ listen, dial string }{{"127.0.0.1:0", ""}, {"[::1]:0", ""}, {"[::]:0", "127.0.0.1"}} {
		ln, err := net.Listen("tcp", tc.listen)
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		addr := ln.Addr().(*net.TCPAddr)
		if tc.dial != "" {
			addr = &net.TCPAddr{IP: net.ParseIP(tc.dial), Port: addr.Port}
		}
		c, err := net.DialTCP("tcp", nil, addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		peer, err := ln.Accept()
		if err != nil {
			t.Fatal(err)
		}
		defer peer.Close()
		if _, err := c.Write(make([]byte, 1000)); err != nil {
			t.Fatal(err)
		}
		if _, err := peer.Read(make([]byte, 1000)); err != nil {
			t.Fatal(err)
		}
		conns = append(conns, c, peer)
		// The dialer's socket, as an outbound flow's, and the accepted
		// one, as an inbound flow's.
		keys = append(keys,
			sockKey{cookieOf(t, c), netip.MustParseAddrPort(c.LocalAddr().String()), netip.MustParseAddrPort(c.RemoteAddr().String())},
			sockKey{cookieOf(t, peer), netip.MustParseAddrPort(peer.LocalAddr().String()), netip.MustParseAddrPort(peer.RemoteAddr().String())})
	}
	wrong := keys[0]
	wrong.cookie++
	stats, err := socketStats(append(keys, wrong))
	if err != nil {
		t.Fatal(err)
	}
	for i, k := range keys {
		s, ok := stats[k.cookie]
		if !ok {
			t.Errorf("socket %d (%s -> %s) not found", i, k.local, k.remote)
			continue
		}
		if i%2 == 0 && s.sent != 1000 || i%2 == 1 && s.received != 1000 {
			t.Errorf("socket %d (%s -> %s): sent %d, received %d; want the 1,000 bytes", i, k.local, k.remote, s.sent, s.received)
		}
	}
	if len(stats) != len(keys) {
		t.Errorf("%d sockets found for %d keys and one wrong cookie", len(stats), len(keys))
	}
	// A pod with more open flows than dumpAbove reads them in one dump:
	// the same answers.
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_SOCK_DIAG)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	dumped := map[uint64]sockStat{}
	if err := dumpSockets(fd, append(keys, wrong), make([]byte, 32768), dumped); err != nil {
		t.Fatal(err)
	}
	for _, k := range keys {
		if d, s := dumped[k.cookie], stats[k.cookie]; d.sent != s.sent || d.received != s.received {
			t.Errorf("socket %s -> %s: the dump read %+v, the lookup %+v", k.local, k.remote, d, s)
		}
	}
	if len(dumped) != len(keys) {
		t.Errorf("the dump found %d sockets for %d keys and one wrong cookie", len(dumped), len(keys))
	}
	conns[0].(*net.TCPConn).SetLinger(0)
	conns[0].Close()
	if stats, err = socketStats(keys[:1]); err != nil || len(stats) != 0 {
		t.Errorf("a closed socket: %v, %v; want none found", stats, err)
	}
}

// BenchmarkSocketStats is the cost of reading open flows' sockets, 256 of
// them: exact lookups, one a flow, against one dump of the namespace (which
// also walks every other namespace's sockets).
func BenchmarkSocketStats(b *testing.B) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	var keys []sockKey
	for range 256 {
		c, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			b.Fatal(err)
		}
		defer c.Close()
		peer, err := ln.Accept()
		if err != nil {
			b.Fatal(err)
		}
		defer peer.Close()
		keys = append(keys, sockKey{cookieOf(b, c), netip.MustParseAddrPort(c.LocalAddr().String()), netip.MustParseAddrPort(c.RemoteAddr().String())})
	}
	b.Run("lookups", func(b *testing.B) {
		for b.Loop() {
			stats, err := socketStats(keys)
			if err != nil || len(stats) != len(keys) {
				b.Fatalf("%d of %d found: %v", len(stats), len(keys), err)
			}
		}
		b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*len(keys)), "ns/socket")
	})
	b.Run("dump", func(b *testing.B) {
		fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_SOCK_DIAG)
		if err != nil {
			b.Fatal(err)
		}
		defer unix.Close(fd)
		buf := make([]byte, 32768)
		for b.Loop() {
			stats := map[uint64]sockStat{}
			if err := dumpSockets(fd, keys, buf, stats); err != nil || len(stats) != len(keys) {
				b.Fatalf("%d of %d found: %v", len(stats), len(keys), err)
			}
		}
		b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*len(keys)), "ns/socket")
	})
}
