package e2e

import (
	"fmt"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/sluicemesh/sluice/internal/testbed"
)

// With --splice, captured connections are intact both ways, over IPv4 and
// IPv6, outbound and inbound, and their bytes went socket to socket: the
// splice program counted them.
func TestSpliceIntact(t *testing.T) {
	c := newCapturedPod(t, "--splice")
	c.startSidecar(t)
	if err := c.pod.StartEcho(self(t), "[::]:8080"); err != nil {
		t.Fatal(err)
	}
	for _, tc := range c.everyWay() {
		before := statusJSON(t, c.cgroup).Counters
		addr := netip.AddrPortFrom(tc.addr, 8080).String()
		if tc.inbound {
			res := c.inbound(t, addr)
			c.expectProxiedDir(t, res, addr, "inbound")
		} else {
			res := c.client(t, addr)
			c.expectProxied(t, res, addr)
		}
		after := statusJSON(t, c.cgroup)
		d := diff(before, after.Counters)
		t.Logf("%s: %+v", tc.name, d)
		if d["splice_sockets_joined"] != 2 || d["splice_messages"] == 0 {
			t.Errorf("%s: %d sockets joined the splice table and %d messages were spliced; want both ends, and bytes", tc.name, d["splice_sockets_joined"], d["splice_messages"])
		}
		if after.SpliceSockets != 0 {
			t.Errorf("%s: %d sockets left in the splice table after the connection closed", tc.name, after.SpliceSockets)
		}
	}
}

func diff(before, after map[string]uint64) map[string]uint64 {
	d := map[string]uint64{}
	for k, v := range after {
		if v != before[k] {
			d[k] = v - before[k]
		}
	}
	return d
}

// A reader slower than its writer must not make the kernel queue without
// bound: the app reads the echo slowly, so the sidecar's writes to it pile
// up in the app's socket. Splice has no flow control of its own; past 1 MiB
// unread the connection goes back to TCP, whose window then holds the
// writer back. The bytes stay intact and in order across the switch. The
// kernel's TCP memory (/proc/net/sockstat: the whole machine's, so tests
// running beside this one add to it) stays far below the transfer's size,
// where unbounded queuing reaches nearly all of it (120 MiB of 128 measured
// before the limit existed). The same transfer first runs without splice,
// for the record.
func TestSpliceSlowReaderBounded(t *testing.T) {
	c := newCapturedPod(t)
	c.startSidecar(t, "--log-level", "info")
	addr := netip.AddrPortFrom(c.host.Addr4, 8080).String()
	// After the bulk, request/response on the same connection: every byte
	// of it must come through once splicing has stopped too.
	const size, rounds = 256 << 20, 200
	transfer := func() float64 {
		t.Helper()
		var res bulkResult
		peak, err := testbed.PeakTCPMemory(func() error {
			return runHelper(t, c.pod, helper(t, "bulk", addr, fmt.Sprint(size), "1ms", fmt.Sprint(rounds)), -1, &res)
		})
		if err != nil {
			t.Fatalf("bulk transfer, then request/response: %v (%+v)", err, res)
		}
		if want := int64(size + 64*rounds); res.Sent != want || res.Received != want || res.Mismatch >= 0 {
			t.Fatalf("sent %d, echoed %d, first wrong byte at %d; want %d both ways and none wrong", res.Sent, res.Received, res.Mismatch, want)
		}
		return peak
	}
	baseline := transfer()

	mustCLI(t, "install", "--cgroup", c.cgroup, "--netns", c.pod.Netns, "--splice")
	if s := statusJSON(t, c.cgroup); !s.Plan.Splice || s.SpliceCapacity < 2 {
		t.Fatalf("after install --splice: splice %v, table for %d sockets", s.Plan.Splice, s.SpliceCapacity)
	}
	before := statusJSON(t, c.cgroup).Counters
	spliced := transfer()
	d := diff(before, statusJSON(t, c.cgroup).Counters)
	t.Logf("counters %+v; TCP memory peaked %.1f MiB above the start spliced, %.1f MiB without", d, spliced, baseline)
	if d["splice_stopped_reader_behind"] == 0 || d["splice_messages"] == 0 {
		t.Errorf("want the connection spliced and then sent back to TCP when its reader fell behind; counters %v", d)
	}
	// Bounded runs peaked at 30-70 MiB here, tests beside them included.
	if limit := 0.6 * float64(size>>20); spliced > limit {
		t.Errorf("TCP memory grew by %.1f MiB moving %d MiB to a slow reader with splice, %.1f MiB without (limit %.1f): not bounded", spliced, size>>20, baseline, limit)
	}
}

// Many connections at once, bulk and short, all spliced: every byte intact,
// and every socket leaves the splice table with its connection (two ends
// joined per connection, none left over).
func TestSpliceManyConnectionsLeaveNothing(t *testing.T) {
	c := newCapturedPod(t, "--splice")
	c.startSidecar(t, "--log-level", "info")
	reuseTimeWait(t, c.pod)
	before := statusJSON(t, c.cgroup).Counters

	const bulkConns, bulkSize = 16, 4 << 20
	var wg sync.WaitGroup
	errs := make(chan error, bulkConns)
	for i := range bulkConns {
		addr := netip.AddrPortFrom([]netip.Addr{c.host.Addr4, c.host.Addr6}[i%2], 8080).String()
		wg.Go(func() {
			var res bulkResult
			err := runHelper(t, c.pod, helper(t, "bulk", addr, fmt.Sprint(bulkSize), "0s"), -1, &res)
			if err == nil && (res.Received != bulkSize || res.Mismatch >= 0) {
				err = fmt.Errorf("echoed %d of %d bytes, first wrong byte at %d", res.Received, bulkSize, res.Mismatch)
			}
			errs <- err
		})
	}
	const n = 100_000
	var res churnResult
	targets := []string{netip.AddrPortFrom(c.host.Addr4, 9090).String(), netip.AddrPortFrom(c.host.Addr6, 9090).String()}
	if err := runHelper(t, c.pod, helper(t, "churn", append([]string{fmt.Sprint(n), "16"}, targets...)...), -1, &res); err != nil {
		t.Fatal(err)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Errorf("bulk connection: %v", err)
		}
	}
	if res.OK != n {
		t.Errorf("%d of %d short connections succeeded (%d failed, first: %s)", res.OK, n, res.Failed, res.FirstErr)
	}
	s := statusJSON(t, c.cgroup)
	d := diff(before, s.Counters)
	t.Logf("counters %+v", d)
	if want := uint64(2 * (n + bulkConns)); d["splice_sockets_joined"] != want || d["splice_table_full"] != 0 {
		t.Errorf("%d sockets joined the splice table (%d found it full), want %d: both ends of every connection", d["splice_sockets_joined"], d["splice_table_full"], want)
	}
	if s.SpliceSockets != 0 || s.Handshakes != 0 {
		t.Errorf("after every connection closed: %d sockets in the splice table, %d handshake notes; want none", s.SpliceSockets, s.Handshakes)
	}
}

// A spliced connection ends cleanly when either side is killed: the app
// (the sidecar sees it close and closes upstream) or the sidecar (the app
// sees its connection fail, not hang); the splice table empties either way.
func TestSpliceKilledSides(t *testing.T) {
	c := newCapturedPod(t, "--splice")
	c.startSidecar(t)
	addr := netip.AddrPortFrom(c.host.Addr4, 8080).String()

	// The app is killed in the middle of a transfer.
	app := helper(t, "bulk", addr, fmt.Sprint(1<<40), "1ms")
	if err := c.pod.Start(app); err != nil {
		t.Fatal(err)
	}
	waitSpliced(t, c, 2)
	app.Process.Kill()
	app.Wait()
	if _, err := c.sidecar.WaitFor("proxied", func(e testbed.LogEntry) bool { return e.Str("orig_dst") == addr }, 10*time.Second); err != nil {
		t.Errorf("sidecar after the app was killed: %v", err)
	}
	waitSpliced(t, c, 0)

	// The sidecar is killed in the middle of a transfer.
	app = helper(t, "bulk", addr, fmt.Sprint(1<<40), "1ms")
	var out strings.Builder
	app.Stdout = &out
	if err := c.pod.Start(app); err != nil {
		t.Fatal(err)
	}
	waitSpliced(t, c, 2)
	c.sidecar.Cmd.Process.Kill()
	done := make(chan error, 1)
	go func() { done <- app.Wait() }()
	select {
	case err := <-done:
		if err == nil || !strings.Contains(out.String(), "error") {
			t.Errorf("app after the sidecar was killed: exit %v, %s; want its transfer to fail", err, out.String())
		}
	case <-time.After(20 * time.Second):
		app.Process.Kill()
		t.Fatal("app hung after the sidecar was killed")
	}
	waitSpliced(t, c, 0)
}

// waitSpliced waits until the splice table holds n sockets.
func waitSpliced(t *testing.T, c *capturedPod, n int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		s := statusJSON(t, c.cgroup)
		if s.SpliceSockets == n {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("splice table holds %d sockets, want %d", s.SpliceSockets, n)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
