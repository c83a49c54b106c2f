package sidecar

import (
	"net"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/sluicemesh/sluice/proxy"
)

func TestListenServesIPv4WhenIPv6AddressIsMissing(t *testing.T) {
	log, logs := testLogger(t)
	// 2001:db8::1 is on no interface: EADDRNOTAVAIL, as in a pod
	// without IPv6 (or EAFNOSUPPORT where IPv6 is off altogether).
	lns, err := listenOn([]listenAddr{
		{"tcp4", "127.0.0.1", 0, proxy.Outbound},
		{"tcp6", "2001:db8::1", 0, proxy.Outbound},
	}, log)
	if err != nil {
		t.Fatal(err)
	}
	defer lns[0].Close()
	if len(lns) != 1 || lns[0].dir != proxy.Outbound {
		t.Fatalf("listeners %v, want the IPv4 one alone", addrs(lns))
	}
	if !strings.Contains(logs.String(), "IPv6 is off in this pod; serving IPv4 only") {
		t.Errorf("no IPv6-off line:\n%s", logs)
	}
}

func TestListenFailsWholeAndClosesWhatItOpened(t *testing.T) {
	log, _ := testLogger(t)
	held, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer held.Close()
	port := uint16(held.Addr().(*net.TCPAddr).Port)
	_, err = listenOn([]listenAddr{
		{"tcp4", "127.0.0.2", port, proxy.Inbound},
		{"tcp4", "127.0.0.1", port, proxy.Outbound},
	}, log)
	if err == nil || !strings.Contains(err.Error(), "is another proxy running?") {
		t.Fatalf("listen on a held port = %v, want an error with the hint", err)
	}
	// The first listener was closed: its address is free again.
	ln, err := net.Listen("tcp4", net.JoinHostPort("127.0.0.2", strconv.Itoa(int(port))))
	if err != nil {
		t.Fatalf("the listener opened before the failure is still open: %v", err)
	}
	ln.Close()
}

func TestListenHint(t *testing.T) {
	for _, tc := range []struct {
		err  error
		want string
	}{
		{syscall.EADDRINUSE, "is another proxy running?"},
		{syscall.EACCES, "only the proxy uid/gid"},
		{&net.OpError{Op: "listen", Err: syscall.EPERM}, "only the proxy uid/gid"},
	} {
		if got := listenHint(tc.err); !strings.HasPrefix(got, tc.want) {
			t.Errorf("listenHint(%v) = %q, want %q...", tc.err, got, tc.want)
		}
	}
}
