package e2e

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/sluicemesh/sluice/internal/dnstest"
	"github.com/sluicemesh/sluice/internal/testbed"
)

// DNS capture's end-to-end tests: a nameserver on the remote host, the
// pod's queries taken to the sidecar's forwarder on 15053, which asks it.

// The names the test nameserver knows: web.test. has one A and one AAAA;
// big.test. has 40 A records, too many for a 512-byte UDP answer: over UDP
// it answers truncated (TC) unless the query's EDNS takes more, over TCP
// whole.
var (
	webA    = netip.MustParseAddr("198.18.77.7")
	webAAAA = netip.MustParseAddr("2001:2::77")
)

const bigRecords = 40

// where.test. is answered with the address the query came to: the
// nameserver's IPv4 address, or whereV6 from its IPv6 one; which of the
// nameserver's addresses a forwarder asked shows in the answer.
var whereV6 = netip.MustParseAddr("198.18.77.66")

// nameserver is the test's DNS server on the remote host, UDP and TCP on
// port 53 of both its addresses, counting the queries it answers and
// remembering the source of the last.
type nameserver struct {
	queries atomic.Int64
	mu      sync.Mutex
	last    netip.AddrPort
}

func startNameserver(t testing.TB, host *testbed.Host) *nameserver {
	t.Helper()
	ns := &nameserver{}
	for _, a := range []netip.Addr{host.Addr4, host.Addr6} {
		addr := netip.AddrPortFrom(a, 53)
		var udp *net.UDPConn
		var tcp net.Listener
		err := host.Do(func() (err error) {
			if udp, err = net.ListenUDP("udp", net.UDPAddrFromAddrPort(addr)); err != nil {
				return err
			}
			tcp, err = net.Listen("tcp", addr.String())
			return err
		})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { udp.Close(); tcp.Close() })
		go ns.serveUDP(udp)
		go ns.serveTCP(tcp)
	}
	return ns
}

func (ns *nameserver) saw(from netip.AddrPort) {
	ns.queries.Add(1)
	ns.mu.Lock()
	ns.last = from
	ns.mu.Unlock()
}

func (ns *nameserver) lastSource() netip.AddrPort {
	ns.mu.Lock()
	defer ns.mu.Unlock()
	return ns.last
}

func (ns *nameserver) serveUDP(c *net.UDPConn) {
	buf := make([]byte, 65535)
	for {
		n, from, err := c.ReadFromUDPAddrPort(buf)
		if err != nil {
			return
		}
		ns.saw(from)
		if a := dnsAnswer(buf[:n], true, c.LocalAddr().(*net.UDPAddr).AddrPort().Addr()); a != nil {
			c.WriteToUDPAddrPort(a, from)
		}
	}
}

func (ns *nameserver) serveTCP(l net.Listener) {
	for {
		c, err := l.Accept()
		if err != nil {
			return
		}
		go func() {
			defer c.Close()
			r := bufio.NewReader(c)
			for {
				q, err := dnstest.ReadTCP(r)
				if err != nil {
					return
				}
				ns.saw(netip.MustParseAddrPort(c.RemoteAddr().String()))
				if a := dnsAnswer(q, false, netip.MustParseAddrPort(l.Addr().String()).Addr()); a != nil {
					dnstest.WriteTCP(c, a)
				}
			}
		}()
	}
}

// dnsAnswer answers a query the test nameserver knows, asked at its address
// here (nil for no DNS message).
func dnsAnswer(q []byte, udp bool, here netip.Addr) []byte {
	name, qtype, _, ok := dnstest.Question(q)
	if !ok {
		return nil
	}
	switch {
	case name == "web.test" && qtype == dnstest.TypeA:
		return dnstest.Answer(q, dnstest.RcodeNoError, false, webA.AsSlice())
	case name == "web.test" && qtype == dnstest.TypeAAAA:
		return dnstest.Answer(q, dnstest.RcodeNoError, false, webAAAA.AsSlice())
	case name == "where.test" && qtype == dnstest.TypeA && here.Is4():
		return dnstest.Answer(q, dnstest.RcodeNoError, false, here.AsSlice())
	case name == "where.test" && qtype == dnstest.TypeA:
		return dnstest.Answer(q, dnstest.RcodeNoError, false, whereV6.AsSlice())
	case name == "big.test" && qtype == dnstest.TypeA:
		var rdata [][]byte
		for i := range bigRecords {
			rdata = append(rdata, []byte{198, 18, 78, byte(i + 1)})
		}
		a := dnstest.Answer(q, dnstest.RcodeNoError, false, rdata...)
		if udp && len(a) > int(dnstest.EDNSSize(q)) {
			return dnstest.Answer(q, dnstest.RcodeNoError, true) // ask again over TCP
		}
		return a
	}
	return dnstest.Answer(q, dnstest.RcodeNXDomain, false)
}

// dnsResult is what the resolve helper saw.
type dnsResult struct {
	Addrs []string
	From  string // the answer's source (sendto), or the TCP peer (getpeername)
	Took  time.Duration
}

// resolve is a helper role: it asks nameserver (ADDRESS:53) for name
// (type A, or AAAA with a name ending in "/6") the way mode says:
//   - go: Go's own resolver, over a connected UDP socket (TCP on
//     truncation), dialing the nameserver;
//   - sendto: an unconnected UDP socket, sendto and recvfrom, as musl does;
//     the answer's source is reported;
//   - sendto-dual: the same from a dual-stack IPv6 socket, an IPv4
//     nameserver as a v4-mapped address;
//   - tcp: over TCP; the connection's peer is reported;
//   - udp-then-tcp: UDP first, and over TCP if the answer is truncated;
//   - edns: sendto as above, the query over 512 bytes (EDNS padding) and
//     taking a 4096-byte answer;
//   - repeat: COUNT queries in turn from one unconnected socket, each
//     answered by the nameserver asked; Took is the loop's.
//
// args: mode nameserver name [COUNT]
func resolve(args []string) (any, error) {
	mode, server, name := args[0], netip.MustParseAddrPort(args[1]), args[2]
	qtype := uint16(dnstest.TypeA)
	if n, ok := strings.CutSuffix(name, "/6"); ok {
		name, qtype = n, dnstest.TypeAAAA
	}
	start := time.Now()
	var res dnsResult
	defer func() { res.Took = time.Since(start) }()
	switch mode {
	case "go":
		r := &net.Resolver{PreferGo: true, Dial: func(ctx context.Context, network, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, network, server.String())
		}}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		network := "ip4"
		if qtype == dnstest.TypeAAAA {
			network = "ip6"
		}
		ips, err := r.LookupNetIP(ctx, network, name)
		for _, ip := range ips {
			res.Addrs = append(res.Addrs, ip.Unmap().String())
		}
		res.Took = time.Since(start)
		return res, err
	case "repeat":
		count, err := strconv.Atoi(args[3])
		if err != nil {
			return res, err
		}
		c, err := net.ListenUDP("udp", nil)
		if err != nil {
			return res, err
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(time.Minute))
		buf := make([]byte, 65535)
		start := time.Now()
		for i := range count {
			if _, err := c.WriteToUDPAddrPort(dnstest.Query(uint16(i), name, qtype), server); err != nil {
				return res, err
			}
			n, from, err := c.ReadFromUDPAddrPort(buf)
			if err != nil {
				return res, fmt.Errorf("query %d: %w", i, err)
			}
			if addrs, _, err := dnstest.Records(buf[:n]); err != nil || len(addrs) == 0 || netip.AddrPortFrom(from.Addr().Unmap(), from.Port()) != server {
				return res, fmt.Errorf("query %d: answered %v from %s (%v)", i, addrs, from, err)
			}
		}
		res.Took = time.Since(start)
		return res, nil
	case "sendto", "sendto-dual", "udp-then-tcp", "edns":
		network := "udp4"
		if server.Addr().Is6() {
			network = "udp6"
		}
		if mode == "sendto-dual" {
			network = "udp" // AF_INET6, IPv4 as ::ffff:a.b.c.d
		}
		c, err := net.ListenUDP(network, nil)
		if err != nil {
			return res, err
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		q := dnstest.Query(0x5151, name, qtype)
		if mode == "edns" {
			q = dnstest.QueryEDNS(0x5151, name, qtype, 4096, 600)
		}
		if _, err := c.WriteToUDPAddrPort(q, server); err != nil {
			res.Took = time.Since(start)
			return res, err
		}
		buf := make([]byte, 65535)
		n, from, err := c.ReadFromUDPAddrPort(buf)
		if err != nil {
			return res, err
		}
		res.From = netip.AddrPortFrom(from.Addr().Unmap(), from.Port()).String()
		addrs, truncated, err := dnstest.Records(buf[:n])
		if err != nil || !truncated || mode == "sendto" || mode == "edns" {
			for _, a := range addrs {
				res.Addrs = append(res.Addrs, a.String())
			}
			return res, err
		}
		fallthrough
	case "tcp":
		c, err := net.DialTimeout("tcp", server.String(), 10*time.Second)
		if err != nil {
			return res, err
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		res.From = c.RemoteAddr().String()
		if err := dnstest.WriteTCP(c, dnstest.Query(0x5152, name, qtype)); err != nil {
			return res, err
		}
		m, err := dnstest.ReadTCP(c)
		if err != nil {
			return res, err
		}
		addrs, _, err := dnstest.Records(m)
		for _, a := range addrs {
			res.Addrs = append(res.Addrs, a.String())
		}
		return res, err
	}
	return res, fmt.Errorf("mode %q: want go, sendto, sendto-dual, tcp, udp-then-tcp, edns or repeat", mode)
}

// dnsPod is a captured pod with DNS capture on for the remote host's
// nameserver (both its addresses), its sidecar's forwarder asking that
// nameserver.
type dnsPod struct {
	*capturedPod
	ns      *nameserver
	servers []netip.AddrPort
}

func newDNSPod(t testing.TB, installArgs ...string) *dnsPod {
	t.Helper()
	c := newUncapturedPod(t, nil)
	p := &dnsPod{capturedPod: c, servers: []netip.AddrPort{netip.AddrPortFrom(c.host.Addr4, 53), netip.AddrPortFrom(c.host.Addr6, 53)}}
	p.ns = startNameserver(t, c.host)
	args := append([]string{"install", "--cgroup", c.cgroup, "--netns", c.pod.Netns, "--redirect-dns",
		"--dns-servers", c.host.Addr4.String() + "," + c.host.Addr6.String()}, installArgs...)
	mustCLI(t, args...)
	t.Cleanup(func() { mustCLI(t, "uninstall", "--cgroup", c.cgroup) })
	return p
}

// startForwarder starts the sidecar with its forwarder, whose upstream (for
// a query the kernel has no nameserver of) is the nameserver's IPv4
// address only.
func (p *dnsPod) startForwarder(t testing.TB) {
	t.Helper()
	p.startSidecar(t, "--dns-upstreams", p.servers[0].String())
	if _, err := p.sidecar.WaitFor("DNS forwarder", nil, 5*time.Second); err != nil {
		t.Fatal(err)
	}
}

// ask runs the resolve helper in the pod as uid.
func (p *dnsPod) ask(t testing.TB, uid int, mode string, server netip.AddrPort, name string, more ...string) (dnsResult, error) {
	t.Helper()
	var res dnsResult
	err := runHelper(t, p.pod, helper(t, "resolve", append([]string{mode, server.String(), name}, more...)...), uid, &res)
	return res, err
}

func (p *dnsPod) counters(t testing.TB) map[string]uint64 {
	return statusJSON(t, p.cgroup).Counters
}

// Every way an app asks, over IPv4 and IPv6, is answered through the
// sidecar's forwarder (counted there and in the kernel), with the answer's
// source the nameserver the app asked (sendto, TCP's peer); the nameserver
// sees the queries come from the pod. A truncated answer's TCP retry goes
// the same way and gets all 40 records.
func TestDNSCapturedEveryWay(t *testing.T) {
	p := newDNSPod(t)
	p.startForwarder(t)
	for _, server := range p.servers {
		for _, c := range []struct{ mode, name, want string }{
			{"go", "web.test", webA.String()},
			{"go", "web.test/6", webAAAA.String()},
			{"sendto", "web.test", webA.String()},
			{"sendto-dual", "web.test", webA.String()},
			{"tcp", "web.test", webA.String()},
		} {
			before := p.counters(t)["dns_redirected"]
			res, err := p.ask(t, 1000, c.mode, server, c.name)
			if err != nil {
				t.Fatalf("%s %s via %s: %v", c.mode, c.name, server, err)
			}
			if len(res.Addrs) != 1 || res.Addrs[0] != c.want {
				t.Errorf("%s %s via %s: %v, want %s", c.mode, c.name, server, res.Addrs, c.want)
			}
			if c.mode != "go" && res.From != server.String() {
				t.Errorf("%s via %s: the answer came from %s, want the nameserver asked", c.mode, server, res.From)
			}
			if d := p.counters(t)["dns_redirected"] - before; d == 0 {
				t.Errorf("%s %s via %s: not redirected (dns_redirected unchanged)", c.mode, c.name, server)
			}
		}
	}
	res, err := p.ask(t, 1000, "udp-then-tcp", p.servers[0], "big.test")
	if err != nil || len(res.Addrs) != bigRecords {
		t.Errorf("a truncated answer's TCP retry: %d records (%v), want %d", len(res.Addrs), err, bigRecords)
	}
	if from := p.ns.lastSource().Addr(); from != p.pod.Addr4 {
		t.Errorf("the nameserver saw the last query from %s, want the pod's %s", from, p.pod.Addr4)
	}
	for _, server := range p.servers {
		res, err = p.ask(t, 1000, "edns", server, "big.test")
		if err != nil || len(res.Addrs) != bigRecords || res.From != server.String() {
			t.Errorf("a query of over 512 bytes via %s (EDNS): %d records from %s (%v), want %d in one UDP answer from the nameserver",
				server, len(res.Addrs), res.From, err, bigRecords)
		}
	}
	m := p.scrapeSidecar(t, 15090)
	if n := sample(m, "sluice_dns_queries_total", map[string]string{"protocol": "udp"}); n < 6 {
		t.Errorf("the forwarder counted %v UDP queries, want at least 6", n)
	}
	if n := sample(m, "sluice_dns_queries_total", map[string]string{"protocol": "tcp"}); n < 3 {
		t.Errorf("the forwarder counted %v TCP queries, want at least 3", n)
	}
}

// The forwarder asks the nameserver the app asked, not its upstream: its
// answer to where.test says which of the nameserver's addresses was asked.
// With --capture-all-dns, a nameserver the install was not told of is
// captured too.
func TestDNSForwardsToTheNameserverAsked(t *testing.T) {
	p := newDNSPod(t)
	// The install now names the IPv4 address only: the IPv6 one is
	// captured as any address is.
	mustCLI(t, "install", "--cgroup", p.cgroup, "--netns", p.pod.Netns, "--redirect-dns", "--capture-all-dns",
		"--dns-servers", p.host.Addr4.String())
	p.startForwarder(t)
	want := map[netip.AddrPort]string{p.servers[0]: p.host.Addr4.String(), p.servers[1]: whereV6.String()}
	for _, server := range p.servers {
		for _, mode := range []string{"go", "sendto", "sendto-dual", "tcp"} {
			if mode == "sendto-dual" && server.Addr().Is6() {
				continue
			}
			before := p.counters(t)["dns_redirected"]
			res, err := p.ask(t, 1000, mode, server, "where.test")
			if err != nil {
				t.Fatalf("%s via %s: %v", mode, server, err)
			}
			if len(res.Addrs) != 1 || res.Addrs[0] != want[server] {
				t.Errorf("%s via %s: answered %v, want %s (the nameserver asked answers)", mode, server, res.Addrs, want[server])
			}
			if p.counters(t)["dns_redirected"] == before {
				t.Errorf("%s via %s: not redirected", mode, server)
			}
		}
	}
}

// The C libraries' resolvers (getaddrinfo) check an answer's source against
// the nameserver they asked: glibc's (from Python) over a connected UDP
// socket, and musl's (a static binary built with musl-gcc), which sends to
// its nameservers from one unconnected socket. With /etc/resolv.conf naming
// the remote nameserver, both resolve through the forwarder.
func TestDNSCapturedLibc(t *testing.T) {
	p := newDNSPod(t)
	p.startForwarder(t)
	dir := worldReadableDir(t)
	conf := filepath.Join(dir, "resolv.conf")
	if err := os.WriteFile(conf, []byte("nameserver "+p.host.Addr4.String()+"\noptions attempts:1 timeout:2\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	musl := filepath.Join(dir, "musl-resolve")
	if out, err := exec.Command("musl-gcc", "-static", "-O2", "-o", musl, "testdata/musl-resolve.c").CombinedOutput(); err != nil {
		t.Fatalf("musl-gcc (musl-tools; scripts/deps.sh installs it): %v: %s", err, out)
	}
	for _, c := range []struct{ libc, cmd string }{
		{"glibc", `/usr/bin/python3 -c 'import socket; print(" ".join(sorted({a[4][0] for a in socket.getaddrinfo("web.test", 80, socket.AF_INET)})))'`},
		{"musl", musl + " web.test"},
	} {
		script := fmt.Sprintf(`mount --bind %s /etc/resolv.conf && exec setpriv --reuid 1000 --regid 1000 --clear-groups %s`, conf, c.cmd)
		cmd := exec.Command("sh", "-c", script)
		cmd.SysProcAttr = &syscall.SysProcAttr{Unshareflags: syscall.CLONE_NEWNS}
		var out, errOut strings.Builder
		cmd.Stdout, cmd.Stderr = &out, &errOut
		before := p.ns.queries.Load()
		redirected := p.counters(t)["dns_redirected"]
		if err := p.pod.Start(cmd); err != nil {
			t.Fatal(err)
		}
		if err := cmd.Wait(); err != nil {
			t.Errorf("%s's getaddrinfo: %v: %s", c.libc, err, errOut.String())
			continue
		}
		if got := strings.TrimSpace(out.String()); got != webA.String() {
			t.Errorf("%s's getaddrinfo(web.test) = %q, want %s", c.libc, got, webA)
		}
		if p.ns.queries.Load() == before || p.counters(t)["dns_redirected"] == redirected {
			t.Errorf("%s's query did not go through the forwarder", c.libc)
		}
	}
}

// The proxy identity's own queries go to the nameserver untouched; another
// process of the pod cannot bind the DNS port, UDP or TCP.
func TestDNSProxyUncapturedAndPortReserved(t *testing.T) {
	p := newDNSPod(t)
	p.startForwarder(t)
	before := p.counters(t)["dns_redirected"]
	res, err := p.ask(t, 1337, "sendto", p.servers[0], "web.test")
	if err != nil || len(res.Addrs) != 1 {
		t.Fatalf("the proxy's own query: %v, %v", res, err)
	}
	if d := p.counters(t)["dns_redirected"] - before; d != 0 {
		t.Errorf("the proxy's own query was redirected (%d)", d)
	}
	var bound map[string]string
	if err := runHelper(t, p.pod, helper(t, "bind", "udp:127.0.0.1:15053", "udp:[::1]:15053", "127.0.0.1:15053"), 1000, &bound); err != nil {
		t.Fatal(err)
	}
	for addr, err := range bound {
		// The sidecar holds them, so even an unguarded bind would fail:
		// the hook's refusal is EPERM, not EADDRINUSE.
		if !strings.Contains(err, "operation not permitted") {
			t.Errorf("uid 1000 binding %s: %q, want operation not permitted", addr, err)
		}
	}
}

// With no forwarder listening, fail-closed refuses a query at once (no
// resolver timeout), counted; fail-open sends it to the nameserver asked,
// counted.
func TestDNSFailPolicy(t *testing.T) {
	p := newDNSPod(t)
	for _, mode := range []string{"go", "sendto"} {
		before := p.counters(t)["dns_fail_closed"]
		res, err := p.ask(t, 1000, mode, p.servers[0], "web.test")
		if err == nil || !strings.Contains(err.Error(), "connection refused") {
			t.Errorf("fail-closed, %s: %v (%v), want connection refused", mode, err, res)
		}
		if res.Took > 2*time.Second {
			t.Errorf("fail-closed, %s: refused after %v, want at once", mode, res.Took)
		}
		if p.counters(t)["dns_fail_closed"] == before {
			t.Errorf("fail-closed, %s: not counted", mode)
		}
	}
	mustCLI(t, "install", "--cgroup", p.cgroup, "--netns", p.pod.Netns, "--redirect-dns",
		"--dns-servers", p.host.Addr4.String()+","+p.host.Addr6.String(), "--fail-open")
	for _, server := range p.servers {
		before := p.counters(t)["dns_fail_open"]
		res, err := p.ask(t, 1000, "sendto", server, "web.test")
		if err != nil || len(res.Addrs) != 1 || res.From != server.String() {
			t.Errorf("fail-open via %s: %v, %v: want the nameserver's answer", server, res, err)
		}
		if p.counters(t)["dns_fail_open"] == before {
			t.Errorf("fail-open via %s: not counted", server)
		}
	}
}

// BenchmarkDNSForwarder measures a UDP query's round trip through DNS
// capture and the sidecar's forwarder (which learns the nameserver asked
// from the kernel, and asks it) against the same queries sent straight to
// the nameserver by the proxy identity, uncaptured, in one pod and one run:
// forwarder/direct is the ratio of their times per query.
//
//	go test -tags demo -run '^$' -bench DNSForwarder -benchtime 2000x ./e2e
func BenchmarkDNSForwarder(b *testing.B) {
	p := newDNSPod(b)
	p.startForwarder(b)
	per := map[string]time.Duration{}
	for _, c := range []struct {
		name string
		uid  int
	}{{"direct", 1337}, {"forwarder", 1000}} {
		before := p.counters(b)["dns_redirected"]
		res, err := p.ask(b, c.uid, "repeat", p.servers[0], "web.test", strconv.Itoa(b.N))
		if err != nil {
			b.Fatalf("%s: %v", c.name, err)
		}
		if redirected := p.counters(b)["dns_redirected"] - before; (redirected > 0) != (c.name == "forwarder") {
			b.Fatalf("%s: %d queries redirected", c.name, redirected)
		}
		per[c.name] = res.Took / time.Duration(b.N)
	}
	b.ReportMetric(float64(per["direct"].Nanoseconds())/1e3, "direct_us/query")
	b.ReportMetric(float64(per["forwarder"].Nanoseconds())/1e3, "forwarder_us/query")
	b.ReportMetric(float64(per["forwarder"])/float64(per["direct"]), "forwarder/direct")
}
