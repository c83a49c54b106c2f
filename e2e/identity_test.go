package e2e

import (
	"fmt"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"
)

// A connection held open through 100,000 others keeps its identity: its
// state lives on its socket, not in a table that evicts. Afterwards the only
// shared table is empty again and nothing was refused.
func TestLongLivedConnectionKeepsItsIdentity(t *testing.T) {
	c := newCapturedPod(t)
	c.agent(t) // reading the flows as they come, as on a node
	// Info level: no log line per connection.
	c.startSidecar(t, "--log-level", "info")
	held := netip.AddrPortFrom(c.host.Addr4, 8080).String()
	h := startHold(t, c.pod, held, 1)
	if h.state.Peer != held || h.state.ServerSaw == h.state.Local {
		t.Fatalf("held connection: peer %s, socket %s, server saw %s; want peer %s through the sidecar", h.state.Peer, h.state.Local, h.state.ServerSaw, held)
	}
	reuseTimeWait(t, c.pod)
	rssBefore := vmRSS(t, c.sidecar.Cmd.Process.Pid)
	const n = 100_000
	var res churnResult
	targets := []string{held, netip.AddrPortFrom(c.host.Extra4, 8080).String(), netip.AddrPortFrom(c.host.Addr6, 8080).String()}
	if err := runHelper(t, c.pod, helper(t, "churn", append([]string{fmt.Sprint(n), "16"}, targets...)...), -1, &res); err != nil {
		t.Fatal(err)
	}
	if res.OK != n {
		t.Errorf("%d of %d short connections succeeded (%d failed, first: %s)", res.OK, n, res.Failed, res.FirstErr)
	}
	after := h.exchange(t, "still there?")
	if after.Peer != held || after.Local != h.state.Local {
		t.Errorf("after %d connections the held one sees peer %s (socket %s), want %s", n, after.Peer, after.Local, held)
	}
	// Every short connection is one flow of the sidecar's upstream: each
	// is counted closed, also one whose close event the ring buffer lost
	// (the agent finds its socket gone), and none stays live.
	var opened, closed, live, lost float64
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(500 * time.Millisecond) {
		fams := c.scrape(t)
		opened = sample(fams, "sluice_tcp_connections_opened_total", map[string]string{"reporter": "source"})
		closed = sample(fams, "sluice_tcp_connections_closed_total", map[string]string{"reporter": "source"})
		live = sample(fams, "sluice_live_flows", nil)
		lost = sample(fams, "sluice_kernel_events_total", map[string]string{"event": "flow_event_lost_ring_full"})
		if closed >= n && live == 1 || time.Now().After(deadline) {
			break
		}
	}
	if opened != n+1 || closed != n || live != 1 {
		t.Errorf("after %d connections: %v flows opened, %v closed, %v live; want %d, %d and 1 (the held one)", n, opened, closed, live, n+1, n)
	}
	rssAfter := vmRSS(t, c.sidecar.Cmd.Process.Pid)
	t.Logf("flow events the ring buffer lost: %v; sidecar RSS %d KiB before, %d KiB after", lost, rssBefore, rssAfter)
	if rssAfter > rssBefore+100<<10 {
		t.Errorf("the sidecar grew from %d KiB to %d KiB over %d connections", rssBefore, rssAfter, n)
	}
	h.in.Close()
	if err := h.cmd.Wait(); err != nil {
		t.Errorf("hold helper: %v", err)
	}

	s := statusJSON(t, c.cgroup)
	if entries := s.Handshakes; entries != 0 {
		t.Errorf("%d handshake entries left after the connections ended, want 0", entries)
	}
	for name, n := range s.Counters {
		if strings.HasPrefix(name, "connect_") || strings.HasPrefix(name, "handshake_") || name == "flow_untracked_no_state" {
			if n != 0 {
				t.Errorf("counter %s = %d, want 0", name, n)
			}
		}
	}
}

// vmRSS is a process's resident memory in KiB.
func vmRSS(t *testing.T, pid int) int {
	t.Helper()
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(data), "\n") {
		if rest, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			var kib int
			fmt.Sscan(rest, &kib)
			return kib
		}
	}
	t.Fatalf("no VmRSS for pid %d", pid)
	return 0
}
