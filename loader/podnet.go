package loader

import (
	"fmt"
	"net"
	"net/netip"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/sluicemesh/sluice/bpf"
	"github.com/sluicemesh/sluice/internal/nsenter"
	"github.com/sluicemesh/sluice/redirect"
)

// podNet is what install learns in the pod's network namespace, in one
// visit: entering a namespace takes a goroutine on a locked thread and two
// setns, and install used to make five visits, a third of its time.
type podNet struct {
	cookie uint64 // the namespace's cookie, which the hooks find the pod by
	// With inbound capture: the interface's index, its first global
	// unicast address of each family (the source connect gives captured
	// sockets, as they would have without a sidecar; invalid for a family
	// it lacks), every global unicast address of the pod but loopback's
	// (where inbound expects the pod's connections), and the sidecar's
	// ports reserve() kept out of the pod's local port range or could not.
	ifindex              int
	own4, own6           netip.Addr
	addrs                []netip.Addr
	reserved, unreserved []uint16
	reserveErr           error // a reservation that failed: no reason to stop an install
}

// readPodNet visits t's network namespace (t.Netns, or with none given that
// of a process in the pod's cgroup: the init container itself, or the
// pod's processes for an install from the host) and, with inbound, reads
// the interface and addresses and reserves the sidecar's ports there. A
// cgroup with no process to ask and no t.Netns is refused: the caller's own
// namespace would be a guess, and a wrong one captures nothing.
// rangeProg, the node's sluice_port_range, may be nil (reserveHere).
func readPodNet(t Target, inbound bool, plan redirect.Plan, rangeProg *ebpf.Program) (podNet, error) {
	var n podNet
	ns := t.Netns
	if ns == "" {
		if ns = netnsOfCgroup(t.Cgroup); ns == "" {
			return n, fmt.Errorf("cannot tell the network namespace of the pod in %s: its cgroup holds no process yet; pass --netns with the pod's (e.g. /run/netns/NAME or /proc/PID/ns/net)", t.Cgroup)
		}
	}
	err := nsenter.Do(ns, func() error {
		var err error
		if n.cookie, err = cookieHere(); err != nil {
			return fmt.Errorf("network namespace cookie of the pod: %w", err)
		}
		if !inbound {
			return nil
		}
		if err := n.addrsHere(t); err != nil {
			return err
		}
		n.reserved, n.unreserved, n.reserveErr = reserveHere(plan, rangeProg)
		return nil
	})
	return n, err
}

// soNetnsCookie is SO_NETNS_COOKIE (Linux 5.14).
const soNetnsCookie = 71

// cookieHere is the calling thread's network namespace cookie.
func cookieHere() (uint64, error) {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return 0, err
	}
	defer unix.Close(fd)
	return unix.GetsockoptUint64(fd, unix.SOL_SOCKET, soNetnsCookie)
}

// addrsHere reads t.Interface and the pod's addresses in the calling
// thread's network namespace.
func (n *podNet) addrsHere(t Target) error {
	ifaces, err := net.Interfaces()
	if err != nil {
		return fmt.Errorf("interfaces of the pod: %w", err)
	}
	found := false
	for _, iface := range ifaces {
		if iface.Flags&net.FlagLoopback != 0 && iface.Name != t.Interface {
			continue
		}
		addrs, err := unicastAddrs(iface)
		if err != nil {
			return fmt.Errorf("addresses of the pod: %w", err)
		}
		if iface.Flags&net.FlagLoopback == 0 {
			n.addrs = append(n.addrs, addrs...)
		}
		if iface.Name != t.Interface {
			continue
		}
		found, n.ifindex = true, iface.Index
		for _, ip := range addrs {
			switch {
			case ip.Is4() && !n.own4.IsValid():
				n.own4 = ip
			case ip.Is6() && !n.own6.IsValid():
				n.own6 = ip
			}
		}
	}
	if !found {
		where := "this network namespace"
		if t.Netns != "" {
			where = "netns " + t.Netns
		}
		return fmt.Errorf("no interface %s in %s: pass --interface with the pod's interface (see 'ip link')", t.Interface, where)
	}
	return nil
}

// writePodAddrs records the pod's own addresses (podNet.own4, own6) for
// connect to give captured sockets the source address they would have
// without a sidecar. A family the interface lacks is recorded as none.
func (n podNet) writePodAddrs(m *ebpf.Map) error {
	for slot, a := range map[bpf.SluicePodAddrSlot]netip.Addr{bpf.SluicePodAddrSlotPOD_ADDR_IPV4: n.own4, bpf.SluicePodAddrSlotPOD_ADDR_IPV6: n.own6} {
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
