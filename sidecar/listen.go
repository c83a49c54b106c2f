package sidecar

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strconv"
	"strings"
	"syscall"

	"github.com/sluicemesh/sluice/proxy"
)

type listener struct {
	net.Listener
	dir proxy.Direction
}

// listenAddr is one listener listen opens.
type listenAddr struct {
	network, addr string
	port          uint16
	dir           proxy.Direction
}

// listen opens the outbound listener on loopback and the inbound one on every
// address, each for IPv4 and IPv6 separately: one dual-stack socket would
// hand IPv4 connections over as v4-mapped AF_INET6. It fails unless it holds
// every listener, except that a pod without IPv6 is served over IPv4 alone:
// there no IPv6 connection can be captured either.
func listen(outPort, inPort uint16, log *slog.Logger) ([]listener, error) {
	return listenOn([]listenAddr{
		{"tcp4", "127.0.0.1", outPort, proxy.Outbound},
		{"tcp6", "::1", outPort, proxy.Outbound},
		{"tcp4", "0.0.0.0", inPort, proxy.Inbound},
		{"tcp6", "::", inPort, proxy.Inbound},
	}, log)
}

func listenOn(want []listenAddr, log *slog.Logger) ([]listener, error) {
	var lns []listener
	for _, l := range want {
		addr := net.JoinHostPort(l.addr, strconv.Itoa(int(l.port)))
		// The inbound listener is plain TCP: the kernel hands it inbound
		// connections from a sockmap, which takes no MPTCP socket (Go's
		// listeners are MPTCP by default). Inbound MPTCP clients fall
		// back to TCP, as they do with any TCP server.
		var lc net.ListenConfig
		lc.SetMultipathTCP(l.dir == proxy.Outbound)
		ln, err := lc.Listen(context.Background(), l.network, addr)
		if err != nil && l.network == "tcp6" && (errors.Is(err, syscall.EADDRNOTAVAIL) || errors.Is(err, syscall.EAFNOSUPPORT)) {
			log.Info("IPv6 is off in this pod; serving IPv4 only", "addr", addr)
			continue
		}
		if err != nil {
			for _, open := range lns {
				open.Close()
			}
			return nil, fmt.Errorf("listen on %s (%s): %w", addr, listenHint(err), err)
		}
		lns = append(lns, listener{ln, l.dir})
	}
	return lns, nil
}

// listenHint says what most likely keeps a capture port from being bound.
func listenHint(err error) string {
	if errors.Is(err, syscall.EPERM) || errors.Is(err, syscall.EACCES) {
		return "only the proxy uid/gid the pod was installed with may bind the capture ports"
	}
	return "is another proxy running?"
}

func addrs(lns []listener) string {
	parts := make([]string, len(lns))
	for i, ln := range lns {
		parts[i] = ln.Addr().String()
	}
	return strings.Join(parts, ",")
}
