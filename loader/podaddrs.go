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
		addrs, err := iface.Addrs()
		if err != nil {
			return err
		}
		for _, a := range addrs {
			n, ok := a.(*net.IPNet)
			if !ok {
				continue
			}
			ip, ok := netip.AddrFromSlice(n.IP)
			if !ok || !ip.IsGlobalUnicast() {
				continue
			}
			switch ip = ip.Unmap(); {
			case ip.Is4() && !v4.IsValid():
				v4 = ip
			case ip.Is6() && !v6.IsValid():
				v6 = ip
			}
		}
		return nil
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
