package e2e

import (
	"net/netip"
	"testing"
	"time"
)

// The handshake table holds a connection only until the proxy's side of it
// is established. When nobody in the pod takes it (here the listener on the
// capture port is outside the pod's cgroup, so no hook sees its side), the
// app's socket removes it as it closes: the table cannot fill up.
func TestHandshakeEntryLeavesWithTheApp(t *testing.T) {
	c := newCapturedPod(t)
	if _, err := c.pod.ListenEcho("127.0.0.1:15001"); err != nil {
		t.Fatal(err)
	}
	entries := func() int { return handshakeEntries(t, c.cgroup) }
	h := startHold(t, c.pod, netip.AddrPortFrom(c.host.Addr4, 8080).String(), 3)
	if n := entries(); n != 3 {
		t.Errorf("%d handshake entries while 3 unclaimed connections are open, want 3", n)
	}
	h.in.Close()
	if err := h.cmd.Wait(); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for entries() != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("%d handshake entries left after the app closed its connections", entries())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// handshakeEntries counts the entries of the pod's handshake table.
func handshakeEntries(t *testing.T, cgroup string) int {
	t.Helper()
	return statusJSON(t, cgroup).Handshakes
}
