package sidecar

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"syscall"

	"github.com/sluicemesh/sluice/dnsfwd"
	"github.com/sluicemesh/sluice/loader"
)

// startDNS opens the DNS forwarder's sockets, UDP and TCP on 127.0.0.1 and
// ::1, on --dns-port, else the port the install's DNS capture sends the
// pod's queries to, and adds it to the runners; it returns what it serves,
// "" when there is no DNS port. It runs as the proxy: the install reserves
// the port for it, and its own queries to the nameservers go out
// uncaptured.
func (s *sidecar) startDNS(plan *loader.SidecarPlan) (string, error) {
	port := s.cfg.DNSPort
	if !s.cfg.DNSPortSet && plan != nil {
		port = plan.DNSPort
	}
	if port == 0 {
		return "", nil
	}
	upstreams := s.cfg.DNSUpstreams
	if len(upstreams) == 0 {
		var err error
		if upstreams, err = dnsfwd.Nameservers(cmp.Or(s.cfg.ResolvConf, "/etc/resolv.conf")); err != nil {
			return "", fmt.Errorf("the DNS forwarder's nameservers: %w (give --dns-upstreams)", err)
		}
	}
	f := dnsfwd.New(upstreams, s.log)
	served := ""
	for _, host := range []string{"127.0.0.1", "::1"} {
		addr := net.JoinHostPort(host, strconv.Itoa(int(port)))
		udp, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(netip.MustParseAddrPort(addr)))
		if err != nil && host == "::1" && (errors.Is(err, syscall.EADDRNOTAVAIL) || errors.Is(err, syscall.EAFNOSUPPORT)) {
			continue // no IPv6 in this pod: no IPv6 query to take either
		}
		if err != nil {
			return "", fmt.Errorf("DNS: listen on udp %s (%s): %w", addr, listenHint(err), err)
		}
		tcp, err := net.Listen("tcp", addr)
		if err != nil {
			udp.Close()
			return "", fmt.Errorf("DNS: listen on tcp %s (%s): %w", addr, listenHint(err), err)
		}
		s.runners = append(s.runners,
			func(ctx context.Context) error { return f.ServeUDP(ctx, udp) },
			func(ctx context.Context) error { return f.ServeTCP(ctx, tcp) })
		served += ",dns " + addr
	}
	s.dns = f
	s.log.Info("DNS forwarder", "port", port, "nameservers", upstreams)
	return served, nil
}
