package loader

import (
	"fmt"
	"net"
	"net/netip"

	"github.com/cilium/ebpf"

	"github.com/sluicemesh/sluice/bpf"
	"github.com/sluicemesh/sluice/internal/nsenter"
)

// writePodAddrs records the pod's own addresses, the first global unicast
// one of each family on t's interface, for connect to give captured sockets
// the source address they would have without a sidecar. A family the
// interface lacks is recorded as none.
func writePodAddrs(t Target, m *ebpf.Map) error {
	var v4, v6 netip.Addr
	err := nsenter.Do(t.Netns, func() error {
		iface, err := net.InterfaceByName(t.Interface)
		if err != nil {
			return err
		}
		addrs, err := unicastAddrs(*iface)
		for _, ip := range addrs {
			switch {
			case ip.Is4() && !v4.IsValid():
				v4 = ip
			case ip.Is6() && !v6.IsValid():
				v6 = ip
			}
		}
		return err
	})
	if err != nil {
		return fmt.Errorf("addresses of %s: %w", t.Interface, err)
	}
	for slot, a := range map[bpf.SluicePodAddrSlot]netip.Addr{bpf.SluicePodAddrSlotPOD_ADDR_IPV4: v4, bpf.SluicePodAddrSlotPOD_ADDR_IPV6: v6} {
		var v bpf.SluiceAddr6
		if a.IsValid() {
			v = Addr6(a)
		}
		if err := m.Put(uint32(slot), &v); err != nil {
			return fmt.Errorf("write the pod's addresses: %w", err)
		}
	}
	return nil
}

// unicastAddrs returns iface's global unicast addresses, IPv4 unmapped.
func unicastAddrs(iface net.Interface) ([]netip.Addr, error) {
	addrs, err := iface.Addrs()
	if err != nil {
		return nil, err
	}
	var out []netip.Addr
	for _, a := range addrs {
		if n, ok := a.(*net.IPNet); ok {
			if ip, ok := netip.AddrFromSlice(n.IP); ok && ip.IsGlobalUnicast() {
				out = append(out, ip.Unmap())
			}
		}
	}
	return out, nil
}
