package dnsfwd

import (
	"bufio"
	"context"
	"encoding/binary"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/sluicemesh/sluice/internal/dnstest"
)

// query is a DNS query for name (type A), RD set.
func query(id uint16, name string) []byte { return dnstest.Query(id, name, dnstest.TypeA) }

// nameserver is a fake upstream on loopback, UDP and TCP on one port: it
// answers a query with the query, QR set and size bytes of padding after
// it (a stand-in for records), TC set over UDP when size is over 512.
type nameserver struct {
	addr netip.AddrPort
	size int
}

func startNameserver(t *testing.T, size int) *nameserver {
	t.Helper()
	udp, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	port := udp.LocalAddr().(*net.UDPAddr).Port
	tcp, err := net.Listen("tcp", udp.LocalAddr().String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { udp.Close(); tcp.Close() })
	ns := &nameserver{addr: netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), uint16(port)), size: size}
	answer := func(q []byte, truncate bool) []byte {
		a := append([]byte(nil), q...)
		a[2] |= 0x80
		if truncate {
			a[2] |= 0x02
			return a
		}
		return append(a, make([]byte, ns.size)...)
	}
	go func() {
		buf := make([]byte, 65535)
		for {
			n, from, err := udp.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			udp.WriteToUDPAddrPort(answer(buf[:n], n+ns.size > 512 && ns.size > 4000), from)
		}
	}()
	go func() {
		for {
			c, err := tcp.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				r := bufio.NewReader(c)
				for {
					q, err := readTCP(r)
					if err != nil {
						return
					}
					writeTCP(c, answer(q, false))
				}
			}()
		}
	}()
	return ns
}

// serve runs a forwarder to upstreams on loopback and returns its address.
func serve(t *testing.T, upstreams ...netip.AddrPort) (*Forwarder, string) {
	t.Helper()
	f := New(upstreams, nil)
	f.Timeout = 300 * time.Millisecond
	udp, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	tcp, err := net.Listen("tcp", udp.LocalAddr().String())
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{}, 2)
	go func() { f.ServeUDP(ctx, udp); done <- struct{}{} }()
	go func() { f.ServeTCP(ctx, tcp); done <- struct{}{} }()
	t.Cleanup(func() { cancel(); <-done; <-done })
	return f, udp.LocalAddr().String()
}

func askUDP(t *testing.T, addr string, q []byte) []byte {
	t.Helper()
	c, err := net.Dial("udp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Write(q); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 65535)
	n, err := c.Read(buf)
	if err != nil {
		t.Fatal(err)
	}
	return buf[:n]
}

func askTCP(t *testing.T, addr string, qs ...[]byte) [][]byte {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	r := bufio.NewReader(c)
	var out [][]byte
	for _, q := range qs {
		if err := writeTCP(c, q); err != nil {
			t.Fatal(err)
		}
		a, err := readTCP(r)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, a)
	}
	return out
}

// A UDP query is answered by the nameserver's answer, byte for byte; two
// queries on one TCP connection are each answered; both are counted.
func TestForwardsUDPAndTCP(t *testing.T) {
	ns := startNameserver(t, 100)
	f, addr := serve(t, ns.addr)
	q := query(0x1234, "web.shop.svc.cluster.local")
	a := askUDP(t, addr, q)
	if len(a) != len(q)+100 || binary.BigEndian.Uint16(a) != 0x1234 || a[2]&0x80 == 0 {
		t.Fatalf("UDP answer of %d bytes, id %#x, flags %#x: want the nameserver's (%d bytes, id 0x1234, QR)", len(a), binary.BigEndian.Uint16(a), a[2], len(q)+100)
	}
	as := askTCP(t, addr, query(1, "a.example"), query(2, "b.example"))
	if len(as) != 2 || binary.BigEndian.Uint16(as[0]) != 1 || binary.BigEndian.Uint16(as[1]) != 2 {
		t.Fatalf("TCP answers %v", as)
	}
	if got := value(f.queries.WithLabelValues("udp")); got != 1 {
		t.Errorf("udp queries %v, want 1", got)
	}
	if got := value(f.queries.WithLabelValues("tcp")); got != 2 {
		t.Errorf("tcp queries %v, want 2", got)
	}
}

// An answer too big for UDP comes back truncated (TC) as the nameserver
// sent it, and the client's retry over TCP gets the whole 5,000 bytes; an
// EDNS-sized UDP answer (3,000 bytes) passes whole.
func TestTruncatedThenTCP(t *testing.T) {
	ns := startNameserver(t, 5000)
	_, addr := serve(t, ns.addr)
	q := query(7, "big.example")
	if a := askUDP(t, addr, q); a[2]&0x02 == 0 || len(a) != len(q) {
		t.Fatalf("UDP answer %d bytes, flags %#x: want the truncated one", len(a), a[2])
	}
	if as := askTCP(t, addr, q); len(as[0]) != len(q)+5000 {
		t.Fatalf("TCP answer %d bytes, want %d", len(as[0]), len(q)+5000)
	}
	edns := startNameserver(t, 3000)
	_, addr = serve(t, edns.addr)
	if a := askUDP(t, addr, q); len(a) != len(q)+3000 {
		t.Fatalf("EDNS-sized UDP answer %d bytes, want %d", len(a), len(q)+3000)
	}
}

// The first nameserver silent, the second answers; with none answering,
// the client gets SERVFAIL at once rather than its own timeout, counted.
func TestNameserversInTurnThenServfail(t *testing.T) {
	silent, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer silent.Close()
	dead := silent.LocalAddr().(*net.UDPAddr).AddrPort()
	ns := startNameserver(t, 10)
	_, addr := serve(t, dead, ns.addr)
	q := query(9, "x.example")
	if a := askUDP(t, addr, q); len(a) != len(q)+10 {
		t.Fatalf("answer of %d bytes, want the second nameserver's", len(a))
	}

	f, addr := serve(t, dead)
	a := askUDP(t, addr, q)
	if binary.BigEndian.Uint16(a) != 9 || a[2]&0x80 == 0 || a[3]&0x0f != 2 {
		t.Fatalf("answer %x: want SERVFAIL to id 9", a[:4])
	}
	if got := value(f.errors.WithLabelValues("udp", ReasonTimeout)); got != 1 {
		t.Errorf("udp timeouts %v, want 1", got)
	}
}

func TestNameservers(t *testing.T) {
	path := filepath.Join(t.TempDir(), "resolv.conf")
	os.WriteFile(path, []byte("search shop.svc.cluster.local svc.cluster.local\nnameserver 198.19.128.10\nnameserver 2001:2::53\noptions ndots:5\n"), 0o644)
	got, err := Nameservers(path)
	if err != nil || len(got) != 2 || got[0].String() != "198.19.128.10:53" || got[1].String() != "[2001:2::53]:53" {
		t.Fatalf("Nameservers = %v, %v", got, err)
	}
	os.WriteFile(path, []byte("search x\n"), 0o644)
	if _, err := Nameservers(path); err == nil || !strings.Contains(err.Error(), "names no nameserver") {
		t.Fatalf("no nameserver: %v", err)
	}
}

func value(c prometheus.Counter) float64 {
	var m dto.Metric
	c.Write(&m)
	return m.GetCounter().GetValue()
}

// The nameserver the kernel names is asked, not the upstreams; a port other
// than 53, or no answer, leaves the upstreams.
func TestOriginChoosesTheNameserverAsked(t *testing.T) {
	ns := netip.MustParseAddrPort("198.18.0.53:53")
	for _, c := range []struct {
		named netip.AddrPort
		err   error
		want  []netip.AddrPort
	}{
		{ns, nil, []netip.AddrPort{ns}},
		{netip.MustParseAddrPort("[::ffff:198.18.0.53]:53"), nil, []netip.AddrPort{ns}},
		{netip.MustParseAddrPort("127.0.0.1:15053"), nil, nil},
		{ns, os.ErrNotExist, nil},
	} {
		got := origin(func(string) (netip.AddrPort, error) { return c.named, c.err }, "query")
		if !slices.Equal(got, c.want) {
			t.Errorf("named %s (%v): ask %v, want %v", c.named, c.err, got, c.want)
		}
	}
	if got := origin[string](nil, "query"); got != nil {
		t.Errorf("no lookup: ask %v", got)
	}
}
