package loader

import (
	"errors"
	"io"
	"math/rand/v2"
	"net"
	"net/netip"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sluicemesh/sluice/internal/testbed"
)

// Hostile and odd SYNs, crafted and sent from the node's end of the pod's
// veth, never reach the app's own listener: each is steered to the
// sidecar's, or refused or dropped by the kernel. The inbound program runs
// where the kernel picks a listener, after it reassembled fragments and
// walked extension headers, so how a SYN is dressed does not matter.
func TestHostileSYNsNeverReachTheApp(t *testing.T) {
	w := newWirePod(t, false, true)
	cases := []struct {
		name    string
		c       crafted
		steered bool // the kernel accepts it: the sidecar must answer
	}{
		{"ipv4", crafted{flags: tcpSYN}, true},
		{"ipv6", crafted{v6: true, flags: tcpSYN}, true},
		{"ipv6 hop-by-hop", crafted{v6: true, flags: tcpSYN, ext: []uint8{0}}, true},
		{"ipv6 destination options", crafted{v6: true, flags: tcpSYN, ext: []uint8{60}}, true},
		{"ipv6 routing header, nothing left", crafted{v6: true, flags: tcpSYN, ext: []uint8{43}}, false},
		{"ipv6 three headers", crafted{v6: true, flags: tcpSYN, ext: []uint8{0, 60, 60}}, true},
		{"ipv6 eight destination options", crafted{v6: true, flags: tcpSYN, ext: []uint8{0, 60, 60, 60, 60, 60, 60, 60}}, true},
		{"ipv6 atomic fragment", crafted{v6: true, flags: tcpSYN, ext: []uint8{44}}, true},
		{"ipv6 fragments", crafted{v6: true, flags: tcpSYN, payload: 40, fragAt: 24}, true},
		{"ipv6 tiny first fragment", crafted{v6: true, flags: tcpSYN, payload: 40, fragAt: 8}, false},
		{"ipv6 options then fragments", crafted{v6: true, flags: tcpSYN, payload: 40, ext: []uint8{0, 60}, fragAt: 32}, true},
		{"ipv4 fragments", crafted{flags: tcpSYN, payload: 40, fragAt: 24}, true},
		{"ipv4 tiny first fragment", crafted{flags: tcpSYN, payload: 40, fragAt: 8}, true},
		{"ipv4 overlapping fragments", crafted{flags: tcpACK, payload: 40, fragAt: 16, overlap: true}, false},
		{"ipv4 options", crafted{flags: tcpSYN, ipOpts: 8}, true},
		{"ipv4 syn with data", crafted{flags: tcpSYN, payload: 100}, true},
		{"ipv6 syn with data", crafted{v6: true, flags: tcpSYN, payload: 100}, true},
		{"syn fin", crafted{flags: tcpSYN | tcpFIN}, false},
		{"syn rst", crafted{v6: true, flags: tcpSYN | tcpRST}, false},
		{"syn urg psh", crafted{flags: tcpSYN | tcpURG | tcpPSH}, true},
		{"syn ece cwr", crafted{v6: true, flags: tcpSYN | tcpECE | tcpCWR}, true},
	}
	sport := uint16(41000)
	for i := range cases {
		cases[i].c.sport = sport + uint16(i)
		w.raw.send(t, w.raw.frames(cases[i].c)...)
	}
	got := w.raw.replies(t, 1500*time.Millisecond)
	for _, tc := range cases {
		sidecar, app := synAcks(got[tc.c.sport])
		if app != 0 {
			t.Errorf("%s (%s): the app's own listener answered: %+v", tc.name, tc.c, got[tc.c.sport])
		}
		if tc.steered && sidecar == 0 {
			t.Errorf("%s (%s): the sidecar did not answer: %+v", tc.name, tc.c, got[tc.c.sport])
		}
	}
	if n := w.appAccepted(t); n != 0 {
		t.Errorf("the app accepted %d connections", n)
	}
	if counts := w.counters(t); counts["inbound_steered"] == 0 {
		t.Errorf("counters %v: nothing steered", counts)
	}
}

// Random SYNs (flags, extension header chains, fragments, IPv4 options,
// payload) from a fixed seed: none reaches the app's own listener.
func TestRandomSYNsNeverReachTheApp(t *testing.T) {
	w := newWirePod(t, false, true)
	const n = 300
	seed := uint64(time.Now().UnixNano())
	t.Logf("seed %d", seed)
	rng := rand.New(rand.NewPCG(seed, 25))
	exts := []uint8{0, 60, 43, 44}
	flags := []byte{tcpFIN, tcpRST, tcpPSH, tcpACK, tcpURG, tcpECE, tcpCWR}
	var sent []crafted
	for i := range n {
		c := crafted{v6: rng.IntN(2) == 0, sport: 43000 + uint16(i), flags: tcpSYN, payload: rng.IntN(65)}
		for _, f := range flags {
			if rng.IntN(5) == 0 {
				c.flags |= f
			}
		}
		if c.v6 {
			for range rng.IntN(7) {
				c.ext = append(c.ext, exts[rng.IntN(len(exts))])
			}
		} else {
			c.ipOpts = 4 * rng.IntN(3)
		}
		if rng.IntN(3) == 0 && c.payload >= 16 {
			c.fragAt = 8 * (1 + rng.IntN((20+c.payload)/8-1))
			c.overlap = rng.IntN(4) == 0
		}
		sent = append(sent, c)
		w.raw.send(t, w.raw.frames(c)...)
	}
	got := w.raw.replies(t, 1500*time.Millisecond)
	answered := 0
	for _, c := range sent {
		sidecar, app := synAcks(got[c.sport])
		if app != 0 {
			t.Errorf("the app's own listener answered %s: %+v", c, got[c.sport])
		}
		if sidecar > 0 {
			answered++
		}
	}
	t.Logf("%d of %d random SYNs answered by the sidecar, none by the app", answered, n)
	if answered == 0 {
		t.Error("the sidecar answered none: the packets never reached the pod")
	}
	if n := w.appAccepted(t); n != 0 {
		t.Errorf("the app accepted %d connections", n)
	}
}

// dialFrom connects from the host's src (port 0: any) to dst within 3 s.
// SO_REUSEADDR lets a test reuse a source port the way a client does.
func dialFrom(t *testing.T, host *testbed.Host, src, dst netip.AddrPort) (net.Conn, error) {
	t.Helper()
	var c net.Conn
	err := host.Do(func() (err error) {
		d := net.Dialer{Timeout: 3 * time.Second, LocalAddr: net.TCPAddrFromAddrPort(src),
			Control: func(_, _ string, rc syscall.RawConn) error {
				var serr error
				err := rc.Control(func(fd uintptr) { serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEADDR, 1) })
				return errors.Join(err, serr)
			}}
		c, err = d.Dial("tcp", dst.String())
		return err
	})
	if err == nil {
		t.Cleanup(func() { c.Close() })
	}
	return c, err
}

// exchange sends a line from the client and checks the sidecar's end gets
// it.
func exchange(t *testing.T, client net.Conn, sidecar int) {
	t.Helper()
	if _, err := client.Write([]byte("hello\n")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 16)
	n, err := unix.Read(sidecar, buf)
	if err != nil || string(buf[:n]) != "hello\n" {
		t.Fatalf("the sidecar read %q, %v", buf[:n], err)
	}
}

func family(v6 bool) string { return map[bool]string{false: "IPv4", true: "IPv6"}[v6] }

func (w *wirePod) addrs(v6 bool) (podAddr netip.Addr, host *testbed.Host, hostAddr netip.Addr) {
	return map[bool]netip.Addr{false: w.pod.Addr4, true: w.pod.Addr6}[v6], w.host, map[bool]netip.Addr{false: w.host.Addr4, true: w.host.Addr6}[v6]
}

// With SYN cookies (tcp_syncookies=2: every SYN is answered with one), the
// client's ACK finishes the handshake at the sidecar's listener, which sent
// the cookie, and the connection is the sidecar's.
func TestSYNCookieHandshakesReachTheSidecar(t *testing.T) {
	w := newWirePod(t, false, true)
	w.addHost(t)
	w.podSysctl(t, "ipv4/tcp_syncookies", "2")
	for _, v6 := range []bool{false, true} {
		pod, host, _ := w.addrs(v6)
		c, err := dialFrom(t, host, netip.AddrPort{}, netip.AddrPortFrom(pod, appPort))
		if err != nil {
			t.Fatalf("%s: connect through a SYN cookie: %v", family(v6), err)
		}
		exchange(t, c, w.sidecarAccept(t, v6))
	}
	if n := w.appAccepted(t); n != 0 {
		t.Errorf("the app accepted %d connections", n)
	}
	if got := w.podNetstat(t, "TcpExt", "SyncookiesRecv"); got < 2 {
		t.Errorf("SyncookiesRecv %d: the handshakes did not go through cookies", got)
	}
}

// A client that reuses its source port right after the pod closed first
// (the pod's end of the old connection in TIME_WAIT) connects at once, as
// plain Linux lets it: the kernel recycles the TIME_WAIT tuple and looks up
// the listener again, which is the sidecar's.
func TestTimeWaitTupleIsRecycled(t *testing.T) {
	w := newWirePod(t, false, true)
	w.addHost(t)
	for i, v6 := range []bool{false, true} {
		pod, host, hostAddr := w.addrs(v6)
		src := netip.AddrPortFrom(hostAddr, uint16(45000+i))
		dst := netip.AddrPortFrom(pod, appPort)
		c, err := dialFrom(t, host, src, dst)
		if err != nil {
			t.Fatal(err)
		}
		s := w.sidecarAccept(t, v6)
		exchange(t, c, s)
		unix.Close(s) // the pod closes first: its end goes to TIME_WAIT
		if n, err := c.Read(make([]byte, 1)); n != 0 || !errors.Is(err, io.EOF) {
			t.Fatalf("client read %d, %v; want EOF", n, err)
		}
		c.Close()
		if !w.podHasTimeWait(t, src) {
			t.Fatalf("no TIME_WAIT for %s in the pod", src)
		}
		c2, err := dialFrom(t, host, src, dst)
		if err != nil {
			t.Fatalf("%s: reconnect from %s within the TIME_WAIT: %v", family(v6), src, err)
		}
		exchange(t, c2, w.sidecarAccept(t, v6))
	}
	if n := w.appAccepted(t); n != 0 {
		t.Errorf("the app accepted %d connections", n)
	}
}

// With --fail-open, a client holding a connection to the sidecar's own
// port from source port P does not make the next connection from P look
// like one with no sidecar: it is steered to the sidecar, not let through
// to the app.
func TestFailOpenFindsTheListenerWhateverTheClientHolds(t *testing.T) {
	w := newWirePod(t, true, true)
	w.addHost(t)
	for i, v6 := range []bool{false, true} {
		pod, host, hostAddr := w.addrs(v6)
		src := netip.AddrPortFrom(hostAddr, uint16(46000+i))
		direct, err := dialFrom(t, host, src, netip.AddrPortFrom(pod, 15006))
		if err != nil {
			t.Fatal(err)
		}
		exchange(t, direct, w.sidecarAccept(t, v6))
		c, err := dialFrom(t, host, src, netip.AddrPortFrom(pod, appPort))
		if err != nil {
			t.Fatal(err)
		}
		exchange(t, c, w.sidecarAccept(t, v6))
	}
	if n := w.appAccepted(t); n != 0 {
		t.Errorf("the app accepted %d connections: fail-open let them past the sidecar", n)
	}
	if counts := w.counters(t); counts["fail_open_inbound"] != 0 {
		t.Errorf("counters %v: fail-open taken with the sidecar listening", counts)
	}
}

// Fail-closed with no sidecar, the pod answers a SYN for a captured port
// exactly as it answers one for a closed port nobody captures (15020,
// excluded by default): a reset where the kernel sends one, and nothing to
// an address that is not the pod's or to a source no reset may go to.
func TestRefusedOnlyAsAClosedPort(t *testing.T) {
	w := newWirePod(t, false, false)
	r := w.raw
	const closedPort = 15020
	bcast4 := netip.AddrFrom4([4]byte{198, 18, r.pod4.As4()[2], 255})
	other4 := netip.AddrFrom4([4]byte{198, 18, r.pod4.As4()[2], 99})
	other6 := netip.MustParseAddr(r.pod6.String() + "9")
	cases := []struct {
		name  string
		c     crafted
		reset bool // what a closed port answers
	}{
		{"ipv4", crafted{flags: tcpSYN}, true},
		{"ipv6", crafted{v6: true, flags: tcpSYN}, true},
		{"ipv4 to another address", crafted{flags: tcpSYN, dst: other4}, false},
		{"ipv4 to the subnet's broadcast", crafted{flags: tcpSYN, dst: bcast4}, false},
		{"ipv4 from the subnet's broadcast", crafted{flags: tcpSYN, src: bcast4}, true},
		{"ipv4 from multicast", crafted{flags: tcpSYN, src: netip.MustParseAddr("224.0.0.1")}, false},
		{"ipv6 to another address", crafted{v6: true, flags: tcpSYN, dst: other6}, false},
		{"ipv6 from multicast", crafted{v6: true, flags: tcpSYN, src: netip.MustParseAddr("ff02::1")}, false},
	}
	for i := range cases {
		captured, closed := cases[i].c, cases[i].c
		captured.sport = uint16(47000 + 2*i)
		closed.sport, closed.dport = captured.sport+1, closedPort
		r.send(t, append(r.frames(captured), r.frames(closed)...)...)
	}
	got := r.replies(t, time.Second)
	resets := func(sport uint16) int {
		n := 0
		for _, rep := range got[sport] {
			if rep.flags&tcpRST != 0 {
				n++
			}
		}
		return n
	}
	for i, tc := range cases {
		sport := uint16(47000 + 2*i)
		if closed := resets(sport + 1); (closed > 0) != tc.reset {
			t.Fatalf("%s: a closed port answered %+v: this kernel answers otherwise than the test expects", tc.name, got[sport+1])
		}
		if len(got[sport]) != len(got[sport+1]) || resets(sport) != resets(sport+1) {
			t.Errorf("%s: the captured port answered %+v, a closed port %+v", tc.name, got[sport], got[sport+1])
		}
	}
	if n := w.appAccepted(t); n != 0 {
		t.Errorf("the app accepted %d connections", n)
	}
	if counts := w.counters(t); counts["fail_closed_inbound"] < 2 {
		t.Errorf("counters %v: want the refusals counted", counts)
	}
}
