package dnsfwd

import (
	"errors"
	"net"
	"net/netip"

	"github.com/sluicemesh/sluice/proxy"
)

// udpOrigin asks the kernel which nameserver the query from source was
// sent to: a UDP socket connected to source is handed it by DNS capture
// (the connect hook finds the app's socket as a reply to it would, and its
// getsockopt answers SO_ORIGINAL_DST with the nameserver). Without capture
// the getsockopt fails, as it does for a query sent to the forwarder
// itself.
func udpOrigin(source netip.AddrPort) (netip.AddrPort, error) {
	source = netip.AddrPortFrom(source.Addr().Unmap(), source.Port())
	c, err := net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(source))
	if err != nil {
		return netip.AddrPort{}, err
	}
	defer c.Close()
	return proxy.OriginalDst(c)
}

// tcpOrigin is the nameserver a captured TCP connection was made to.
func tcpOrigin(c net.Conn) (netip.AddrPort, error) {
	tc, ok := c.(*net.TCPConn)
	if !ok {
		return netip.AddrPort{}, errors.New("not a TCP connection")
	}
	return proxy.OriginalDst(tc)
}
