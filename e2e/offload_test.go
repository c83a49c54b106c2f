package e2e

import (
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/sluicemesh/sluice/bpf"
	"github.com/sluicemesh/sluice/internal/testbed"
)

// offloadArgs installs offload on port 8080 both ways.
var offloadArgs = []string{"--splice", "--offload-ports", "8080", "--offload-inbound-ports", "8080"}

// With offload, captured connections to an offload port are intact both
// ways, outbound and inbound, over IPv4 and IPv6; the sidecar still
// accepted and dialed them, and the app's messages went straight out on its
// far socket: the offload counters moved.
func TestOffloadIntact(t *testing.T) {
	c := newCapturedPod(t, offloadArgs...)
	c.startSidecar(t)
	if err := c.pod.StartEcho(self(t), "[::]:8080"); err != nil {
		t.Fatal(err)
	}
	for _, tc := range c.everyWay() {
		before := statusJSON(t, c.cgroup).Counters
		addr := netip.AddrPortFrom(tc.addr, 8080).String()
		var res testbed.ClientResult
		dir := "outbound"
		if tc.inbound {
			res, dir = c.inbound(t, addr), "inbound"
		} else {
			res = c.client(t, addr)
		}
		e := c.proxiedEntry(t, res, addr, dir)
		after := statusJSON(t, c.cgroup)
		d := diff(before, after.Counters)
		t.Logf("%s: %+v", tc.name, d)
		// The app's bytes went either through the sidecar or straight
		// out on its far socket, which some must have.
		bySidecar, want := e.Num("sent"), int64(payload)
		if tc.inbound {
			bySidecar, want = e.Num("received"), echoed(res)
		}
		t.Logf("%s: %d bytes through the sidecar + %d offloaded = %d, app sent %d", tc.name, bySidecar, d["offload_bytes"], bySidecar+int64(d["offload_bytes"]), want)
		if e["offloaded"] != true || d["offload_messages"] == 0 || bySidecar >= want {
			t.Errorf("%s: offloaded %v, %d messages (%d bytes) offloaded and %d of the app's %d bytes through the sidecar; want some offloaded",
				tc.name, e["offloaded"], d["offload_messages"], d["offload_bytes"], bySidecar, want)
		}
		// The flow is measured on the sidecar's socket on the wire,
		// which carried every byte either way.
		reporter, sent, received := "source", float64(payload), float64(echoed(res))
		if tc.inbound {
			reporter, sent, received = "destination", float64(echoed(res)), float64(payload)
		}
		c.expectFlowBytes(t, map[string]string{"reporter": reporter, "destination_service": addr}, sent, received)
		if after.SpliceSockets != 0 || after.OffloadSockets != 0 {
			t.Errorf("%s: %d sockets left in the splice table and %d in offload's after the connection closed", tc.name, after.SpliceSockets, after.OffloadSockets)
		}
	}

	// 16 MiB each way at once, checked byte by byte.
	const size = 16 << 20
	before := statusJSON(t, c.cgroup).Counters
	var res bulkResult
	addr := netip.AddrPortFrom(c.host.Addr4, 8080).String()
	if err := runHelper(t, c.pod, helper(t, "bulk", addr, fmt.Sprint(size), "0s"), -1, &res); err != nil || res.Sent != size || res.Received != size || res.Mismatch >= 0 {
		t.Fatalf("bulk: sent %d, echoed %d, first wrong byte at %d (%v); want %d both ways", res.Sent, res.Received, res.Mismatch, err, size)
	}
	d := diff(before, statusJSON(t, c.cgroup).Counters)
	t.Logf("bulk: %+v", d)
	if d["offload_bytes"] == 0 {
		t.Errorf("bulk: nothing offloaded")
	}
}

// expectFlowBytes waits for the one closed flow with labels in the
// sidecar's metrics and checks its byte counts.
func (c *capturedPod) expectFlowBytes(t *testing.T, labels map[string]string, sent, received float64) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	fams := c.scrape(t)
	for sample(fams, "sluice_tcp_connections_closed_total", labels) < 1 && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
		fams = c.scrape(t)
	}
	for metric, want := range map[string]float64{"sluice_tcp_sent_bytes_total": sent, "sluice_tcp_received_bytes_total": received} {
		if got := sample(fams, metric, labels); got != want {
			t.Errorf("%v: %s = %v, want %v", labels, metric, got, want)
		}
	}
}

// waitOffloaded waits until n connections are offloaded and n far sockets
// are in offload's table.
func waitOffloaded(t *testing.T, c *capturedPod, n int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		s := statusJSON(t, c.cgroup)
		if s.OffloadConnections == n && s.OffloadSockets == n {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d connections offloaded, %d far sockets in offload's table; want %d", s.OffloadConnections, s.OffloadSockets, n)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// listenHost listens on addr in the remote host's namespace.
func listenHost(t *testing.T, c *capturedPod, addr string) net.Listener {
	t.Helper()
	var ln net.Listener
	if err := c.host.Do(func() (err error) { ln, err = net.Listen("tcp", addr); return err }); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	return ln
}

// Offloaded connections end as direct ones would: the server half-closes
// first and still gets every byte the app sends after; the app or the
// server killed mid-transfer ends the connection (a reset for the app when
// the server's end is reset), and offload's tables empty either way. The
// app half-closing first is TestOffloadIntact's bulk.
func TestOffloadEnds(t *testing.T) {
	c := newCapturedPod(t, "--splice", "--offload-ports", "8080,9091,9092")
	c.startSidecar(t)

	// The server speaks first and half-closes first; then the app sends
	// 4 MiB, which the server hashes, and half-closes.
	ln := listenHost(t, c, netip.AddrPortFrom(c.host.Addr4, 9091).String())
	serverSent, serverGot := make(chan string, 1), make(chan string, 1)
	go func() {
		conn, err := ln.Accept()
		if err != nil {
			serverSent <- err.Error()
			return
		}
		defer conn.Close()
		_, sum, err := sendPattern(conn, 1<<20)
		serverSent <- sum
		if err != nil {
			return
		}
		conn.(*net.TCPConn).CloseWrite()
		h := sha256.New()
		n, err := io.Copy(h, conn)
		serverGot <- fmt.Sprintf("%d %x %v", n, h.Sum(nil), err)
	}()
	before := statusJSON(t, c.cgroup).Counters
	var res serverFirstResult
	if err := runHelper(t, c.pod, helper(t, "serverfirst", netip.AddrPortFrom(c.host.Addr4, 9091).String(), fmt.Sprint(4<<20)), -1, &res); err != nil {
		t.Fatalf("server first: %v (%+v)", err, res)
	}
	if want := <-serverSent; res.Received != 1<<20 || res.ServerSHA != want {
		t.Errorf("app got %d bytes (%s) before the server's FIN, want %d (%s)", res.Received, res.ServerSHA, 1<<20, want)
	}
	if got, want := <-serverGot, fmt.Sprintf("%d %s <nil>", res.Sent, res.SentSHA); got != want {
		t.Errorf("server after its own half-close got %q, want %q", got, want)
	}
	d := diff(before, statusJSON(t, c.cgroup).Counters)
	t.Logf("server first: %+v", d)
	if d["offload_bytes"] == 0 {
		t.Errorf("nothing offloaded after the server's half-close: %v", d)
	}

	// The app is killed mid-transfer.
	addr := netip.AddrPortFrom(c.host.Addr4, 8080).String()
	app := helper(t, "bulk", addr, fmt.Sprint(1<<40), "1ms")
	if err := c.pod.Start(app); err != nil {
		t.Fatal(err)
	}
	waitOffloaded(t, c, 1)
	app.Process.Kill()
	app.Wait()
	if _, err := c.sidecar.WaitFor("proxied", func(e testbed.LogEntry) bool { return e.Str("orig_dst") == addr && e["offloaded"] == true }, 10*time.Second); err != nil {
		t.Errorf("sidecar after the app was killed: %v", err)
	}
	waitOffloaded(t, c, 0)

	// The server resets its end mid-transfer: it reads 1 MiB, then closes
	// with unread bytes, as a killed server's kernel would.
	ln = listenHost(t, c, netip.AddrPortFrom(c.host.Addr4, 9092).String())
	go func() {
		conn, err := ln.Accept()
		if err != nil {
			return
		}
		fmt.Fprintf(conn, "peer=%s\n", conn.RemoteAddr())
		io.CopyN(io.Discard, conn, 1<<20)
		conn.(*net.TCPConn).SetLinger(0)
		conn.Close()
	}()
	var bres bulkResult
	err := runHelper(t, c.pod, helper(t, "bulk", netip.AddrPortFrom(c.host.Addr4, 9092).String(), fmt.Sprint(1<<40), "0s"), -1, &bres)
	if err == nil || !strings.Contains(err.Error(), "connection reset") && !strings.Contains(err.Error(), "broken pipe") {
		t.Errorf("app whose server reset the connection: %v; want the reset", err)
	}
	waitOffloaded(t, c, 0)
}

// 200 offloaded connections at once, each 256 KiB both ways, checked byte by
// byte; then 100,000 short offloaded connections: every one succeeds, and no
// entry is left in offload's tables or the splice table.
func TestOffloadManyLeaveNothing(t *testing.T) {
	c := newCapturedPod(t, "--splice", "--offload-ports", "8080,9090")
	c.startSidecar(t, "--log-level", "info")
	reuseTimeWait(t, c.pod)
	before := statusJSON(t, c.cgroup).Counters
	var mres manyResult
	if err := runHelper(t, c.pod, helper(t, "many", "200", netip.AddrPortFrom(c.host.Addr4, 8080).String(), fmt.Sprint(256<<10)), -1, &mres); err != nil {
		t.Fatalf("200 at once: %v", err)
	}
	d := diff(before, statusJSON(t, c.cgroup).Counters)
	t.Logf("200 at once: %+v", d)
	if d["offload_messages"] == 0 {
		t.Errorf("200 at once: nothing offloaded: %v", d)
	}

	const n = 100_000
	var res churnResult
	targets := []string{netip.AddrPortFrom(c.host.Addr4, 9090).String(), netip.AddrPortFrom(c.host.Addr6, 9090).String()}
	if err := runHelper(t, c.pod, helper(t, "churn", append([]string{fmt.Sprint(n), "16"}, targets...)...), -1, &res); err != nil {
		t.Fatal(err)
	}
	if res.OK != n {
		t.Errorf("%d of %d short connections succeeded (%d failed, first: %s)", res.OK, n, res.Failed, res.FirstErr)
	}
	// The sidecar says how many it handed over as it stops.
	if err := c.sidecar.Cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	e, err := c.sidecar.WaitFor("offload", nil, 20*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if got := e.Num("connections_offloaded"); got != n+200 {
		t.Errorf("sidecar offloaded %d connections, want all %d", got, n+200)
	}
	s := statusJSON(t, c.cgroup)
	if s.OffloadConnections != 0 || s.OffloadSockets != 0 || s.SpliceSockets != 0 || s.Handshakes != 0 {
		t.Errorf("after every connection closed: %d offloaded connections, %d far sockets, %d spliced sockets, %d handshake notes; want none",
			s.OffloadConnections, s.OffloadSockets, s.SpliceSockets, s.Handshakes)
	}
}

// A running sidecar follows a rerun of install that turns offload on, here
// from the pod's annotations as the init container reads them: the next
// connections to the port are offloaded.
func TestOffloadFollowsInstall(t *testing.T) {
	c := newCapturedPod(t)
	c.startSidecar(t)
	annotations := filepath.Join(t.TempDir(), "annotations")
	if err := os.WriteFile(annotations, []byte("app=\"x\"\nsluice.dev/splice=\"true\"\nsluice.dev/offload-ports=\"8080\"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	mustCLI(t, "install", "--cgroup", c.cgroup, "--netns", c.pod.Netns, "--annotations", annotations)
	if p := statusJSON(t, c.cgroup).Plan; !p.Splice || len(p.OffloadPorts) != 1 || p.OffloadPorts[0] != 8080 {
		t.Fatalf("after install --annotations: splice %v, offload ports %v; want the annotations' true and 8080", p.Splice, p.OffloadPorts)
	}
	addr := netip.AddrPortFrom(c.host.Addr4, 8080).String()
	deadline := time.Now().Add(10 * time.Second)
	for {
		before := statusJSON(t, c.cgroup).Counters
		res := c.client(t, addr)
		e := c.proxiedEntry(t, res, addr, "outbound")
		d := diff(before, statusJSON(t, c.cgroup).Counters)
		if e["offloaded"] == true && d["offload_messages"] > 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("connections still not offloaded 10 s after install turned offload on: %v\n%s", d, c.sidecar.Output())
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// The handoff is the kernel's: the sidecar names the app's end with a
// setsockopt on its far socket, and the pod's hook takes it only from the
// proxy identity, only on the proxy's own socket to an offload port, and
// only a value of the app's end's size. Nothing else needs, or gets, a map.
func TestOffloadHandoffIsTheKernels(t *testing.T) {
	c := newCapturedPod(t, offloadArgs...)
	if err := c.pod.StartEcho(self(t), "127.0.0.1:7070"); err != nil {
		t.Fatal(err)
	}
	if err := c.pod.WaitListening(7070, 5*time.Second); err != nil {
		t.Fatal(err)
	}
	const proxyUID = 1337 // install's default
	hand := int(bpf.SluiceSluiceSockoptSLUICE_OFFLOAD_HAND)
	level := int(bpf.SluiceSluiceSockoptSOL_SLUICE)
	app := make([]byte, binary.Size(bpf.SluiceTupleKey{}))
	offloadPort := netip.AddrPortFrom(c.host.Addr4, 8080).String()
	otherPort := netip.AddrPortFrom(c.host.Addr4, 9090).String()
	exe := testbed.WorldExecutable(t)
	for _, tc := range []struct {
		name      string
		addr      string
		uid       uint32
		value     []byte
		wantErrno string
	}{
		{"the proxy's dial to an offload port", offloadPort, proxyUID, app, ""},
		{"the proxy's dial to another port", otherPort, proxyUID, app, "ENOENT"},
		{"a value that is no app end", offloadPort, proxyUID, app[:8], "EINVAL"},
		{"another identity of the pod", "127.0.0.1:7070", 1000, app, "EPERM"},
	} {
		before := statusJSON(t, c.cgroup).Counters
		res, err := c.pod.SetsockoptAs(exe, tc.addr, tc.uid, tc.uid, level, hand, tc.value)
		if err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		handed := diff(before, statusJSON(t, c.cgroup).Counters)["offload_handed"]
		t.Logf("%s (from %s): %q, %d handed", tc.name, res.Local, res.Errno, handed)
		if res.Errno != tc.wantErrno {
			t.Errorf("%s: setsockopt answered %q, want %q", tc.name, res.Errno, tc.wantErrno)
		}
		if want := map[bool]uint64{true: 1}[tc.wantErrno == ""]; handed != want {
			t.Errorf("%s: %d connections handed to the kernel", tc.name, handed)
		}
	}
}
