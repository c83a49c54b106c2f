package testbed

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"time"

	"github.com/sluicemesh/sluice/internal/nsenter"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// podIface is the name of the pod side of the veth, as in Kubernetes.
const podIface = "eth0"

// maxSubnet is the last n for which 198.18.n.0/24 exists.
const maxSubnet = 255

// waitDelay bounds how long Wait keeps copying a started process's output
// after it exited, so a grandchild holding the pipes cannot hang Close.
const waitDelay = 5 * time.Second

// Pod is a network namespace wired to the node by a veth, plus a cgroup for
// its processes, the way Kubernetes builds a pod.
type Pod struct {
	Name   string
	Netns  string     // "/run/netns/<prefix>-<name>"
	Cgroup string     // absolute cgroup v2 directory of the pod
	Iface  string     // "eth0"
	Addr4  netip.Addr // 198.18.<n>.2
	Addr6  netip.Addr // 2001:2:0:<n>::2

	bed *Bed
}

// Host is a remote machine to connect to: wired like a pod, but without a
// cgroup, and with a second IPv4 address on its interface.
type Host struct {
	Name   string
	Netns  string     // "/run/netns/<prefix>-<name>"
	Addr4  netip.Addr // 198.18.<n>.2
	Addr6  netip.Addr // 2001:2:0:<n>::2
	Extra4 netip.Addr // 198.18.<n>.3, a second IPv4 address on the same interface

	bed *Bed
}

// subnet holds the addresses of subnet n.
type subnet struct {
	n            int
	node4, node6 netip.Addr // node side of the veth
	addr4, addr6 netip.Addr // pod or host side
	extra4       netip.Addr
}

func subnetFor(n int) subnet {
	v4 := func(host byte) netip.Addr { return netip.AddrFrom4([4]byte{198, 18, byte(n), host}) }
	v6 := func(host byte) netip.Addr {
		return netip.AddrFrom16([16]byte{0x20, 0x01, 0, 0x02, 0, 0, byte(n >> 8), byte(n), 15: host})
	}
	return subnet{n: n, node4: v4(1), node6: v6(1), addr4: v4(2), addr6: v6(2), extra4: v4(3)}
}

// AddPod adds a pod on the next free subnet, with its netns, veth, addresses,
// default routes via the node, and cgroup "<cgroup parent>/<name>", or
// "<cgroup parent>/<cgroupPath...>" when cgroupPath is given (to build the
// nested, dotted paths of Kubernetes' systemd cgroup driver, such as
// kubepods.slice/kubepods-burstable.slice/kubepods-burstable-podX.slice).
func (b *Bed) AddPod(name string, cgroupPath ...string) (*Pod, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	nsName, sub, err := b.addNetns(name, func(nsName string, sub subnet) error { return b.wire(nsName, sub, false) })
	if err != nil {
		return nil, fmt.Errorf("add pod %s: %w", name, err)
	}
	if len(cgroupPath) == 0 {
		cgroupPath = []string{name}
	}
	cg := b.cgroupRoot
	for _, elem := range cgroupPath {
		if err := validCgroupName(elem); err != nil {
			return nil, fmt.Errorf("add pod %s: cgroup path: %w", name, err)
		}
		cg = filepath.Join(cg, elem)
		if _, err := os.Stat(cg); err == nil {
			continue // a parent shared with another pod
		}
		if err := os.Mkdir(cg, 0o755); err != nil {
			return nil, fmt.Errorf("add pod %s: create cgroup %s: %w", name, cg, err)
		}
		b.cgroups = append(b.cgroups, cg)
	}
	return &Pod{
		Name:   name,
		Netns:  netnsPath(nsName),
		Cgroup: cg,
		Iface:  podIface,
		Addr4:  sub.addr4,
		Addr6:  sub.addr6,
		bed:    b,
	}, nil
}

// AddHost adds a host on the next free subnet, wired like a pod but with no
// cgroup and with Extra4 as a second address.
func (b *Bed) AddHost(name string) (*Host, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	nsName, sub, err := b.addNetns(name, func(nsName string, sub subnet) error { return b.wire(nsName, sub, true) })
	if err != nil {
		return nil, fmt.Errorf("add host %s: %w", name, err)
	}
	return &Host{
		Name:   name,
		Netns:  netnsPath(nsName),
		Addr4:  sub.addr4,
		Addr6:  sub.addr6,
		Extra4: sub.extra4,
		bed:    b,
	}, nil
}

// addNetns creates the netns "<prefix>-<name>" and connects it to the node
// with link. The netns is registered before it is created, so whatever a
// failure leaves behind is removed by Close. b.mu must be held.
func (b *Bed) addNetns(name string, link func(nsName string, sub subnet) error) (string, subnet, error) {
	if b.closed {
		return "", subnet{}, errors.New("bed is closed")
	}
	if err := validName(name); err != nil {
		return "", subnet{}, err
	}
	if name == "node" {
		return "", subnet{}, errors.New(`name "node" is taken by the node netns`)
	}
	if b.names[name] {
		return "", subnet{}, errors.New("name already in use")
	}
	if b.nextNet > maxSubnet {
		return "", subnet{}, fmt.Errorf("no subnet left (at most %d pods and hosts)", maxSubnet)
	}
	b.names[name] = true
	sub := subnetFor(b.nextNet)
	b.nextNet++

	nsName := b.prefix + "-" + name
	if err := deleteNetns(nsName); err != nil {
		return "", subnet{}, fmt.Errorf("remove leftover: %w", err)
	}
	b.netnses = append(b.netnses, nsName)
	if err := createNetns(nsName); err != nil {
		return "", subnet{}, err
	}
	if err := link(nsName, sub); err != nil {
		return "", subnet{}, err
	}
	return nsName, sub, nil
}

// wire connects the netns nsName to the node with a veth pair: "veth<n>" in
// the node, "eth0" inside, addresses on both ends and default routes inside.
func (b *Bed) wire(nsName string, sub subnet, extra bool) error {
	ns, err := netns.GetFromName(nsName)
	if err != nil {
		return fmt.Errorf("open netns %s: %w", nsName, err)
	}
	defer ns.Close()
	inside, err := netlink.NewHandleAt(ns, unix.NETLINK_ROUTE)
	if err != nil {
		return fmt.Errorf("netlink in netns %s: %w", nsName, err)
	}
	defer inside.Close()

	if err := linkUp(inside, "lo"); err != nil {
		return err
	}

	// Creating the peer directly in the target netns avoids a temporary
	// name in the node netns and a rename afterwards.
	nodeIface := fmt.Sprintf("veth%d", sub.n)
	veth := &netlink.Veth{
		LinkAttrs:     netlink.LinkAttrs{Name: nodeIface},
		PeerName:      podIface,
		PeerNamespace: netlink.NsFd(ns),
	}
	if err := b.node.LinkAdd(veth); err != nil {
		return fmt.Errorf("add veth %s: %w", nodeIface, err)
	}

	if err := addAddrs(b.node, nodeIface, netip.PrefixFrom(sub.node4, 24), netip.PrefixFrom(sub.node6, 64)); err != nil {
		return err
	}
	if err := linkUp(b.node, nodeIface); err != nil {
		return err
	}

	addrs := []netip.Prefix{netip.PrefixFrom(sub.addr4, 24), netip.PrefixFrom(sub.addr6, 64)}
	if extra {
		addrs = append(addrs, netip.PrefixFrom(sub.extra4, 24))
	}
	if err := addAddrs(inside, podIface, addrs...); err != nil {
		return err
	}
	if err := linkUp(inside, podIface); err != nil {
		return err
	}
	return addDefaultRoutes(inside, podIface, sub.node4, sub.node6)
}

func linkUp(h *netlink.Handle, name string) error {
	link, err := h.LinkByName(name)
	if err != nil {
		return fmt.Errorf("find link %s: %w", name, err)
	}
	if err := h.LinkSetUp(link); err != nil {
		return fmt.Errorf("set link %s up: %w", name, err)
	}
	return nil
}

// addAddrs adds addresses to a link. They are added with IFA_F_NODAD so
// IPv6 addresses are usable at once instead of staying tentative during
// duplicate address detection.
func addAddrs(h *netlink.Handle, name string, prefixes ...netip.Prefix) error {
	link, err := h.LinkByName(name)
	if err != nil {
		return fmt.Errorf("find link %s: %w", name, err)
	}
	for _, p := range prefixes {
		addr := &netlink.Addr{IPNet: prefixToIPNet(p), Flags: unix.IFA_F_NODAD}
		if err := h.AddrAdd(link, addr); err != nil {
			return fmt.Errorf("add address %s to %s: %w", p, name, err)
		}
	}
	return nil
}

// addDefaultRoutes routes everything (v4 and v6) out of link via the given gateways.
func addDefaultRoutes(h *netlink.Handle, name string, gws ...netip.Addr) error {
	link, err := h.LinkByName(name)
	if err != nil {
		return fmt.Errorf("find link %s: %w", name, err)
	}
	for _, gw := range gws {
		// An explicit zero-length Dst tells netlink the address family.
		dst := netip.PrefixFrom(netip.IPv4Unspecified(), 0)
		if gw.Is6() {
			dst = netip.PrefixFrom(netip.IPv6Unspecified(), 0)
		}
		route := &netlink.Route{LinkIndex: link.Attrs().Index, Dst: prefixToIPNet(dst), Gw: net.IP(gw.AsSlice())}
		if err := h.RouteAdd(route); err != nil {
			return fmt.Errorf("add default route via %s: %w", gw, err)
		}
	}
	return nil
}

func prefixToIPNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: net.IP(p.Addr().AsSlice()), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

// Do runs fn on a locked OS thread switched into the pod's netns and
// switches back afterwards. Sockets created inside fn stay in the pod's
// netns and may be used from any goroutine afterwards. fn runs on another
// goroutine, so it must not call t.FailNow.
func (p *Pod) Do(fn func() error) error { return nsenter.Do(p.Netns, fn) }

// Do runs fn on a locked OS thread switched into the host's netns, see Pod.Do.
func (h *Host) Do(fn func() error) error { return nsenter.Do(h.Netns, fn) }

// Start starts cmd inside the pod: in its cgroup (clone3 with
// CLONE_INTO_CGROUP, so it never runs outside it) and in its netns. Other
// SysProcAttr settings, such as a Credential, are kept. The Bed kills the
// process at Close if it is still running. Start replaces cmd.SysProcAttr
// with a copy and sets cmd.WaitDelay if it is zero.
func (p *Pod) Start(cmd *exec.Cmd) error {
	fd, err := unix.Open(p.Cgroup, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("start in pod %s: open cgroup: %w", p.Name, err)
	}
	defer unix.Close(fd)

	var attr syscall.SysProcAttr
	if cmd.SysProcAttr != nil {
		attr = *cmd.SysProcAttr
	}
	attr.UseCgroupFD = true
	attr.CgroupFD = fd
	cmd.SysProcAttr = &attr
	if err := p.bed.start(p.Netns, cmd); err != nil {
		return fmt.Errorf("start in pod %s: %w", p.Name, err)
	}
	return nil
}

// Start starts cmd inside the host's netns; the Bed kills it at Close if it
// is still running.
func (h *Host) Start(cmd *exec.Cmd) error {
	if err := h.bed.start(h.Netns, cmd); err != nil {
		return fmt.Errorf("start in host %s: %w", h.Name, err)
	}
	return nil
}

// StartInNode starts cmd inside the node's netns, where the pods' and
// hosts' links end (as a node's agent runs there); the Bed kills it at
// Close if it is still running.
func (b *Bed) StartInNode(cmd *exec.Cmd) error {
	if err := b.start(netnsPath(b.nodeNetns), cmd); err != nil {
		return fmt.Errorf("start in the node: %w", err)
	}
	return nil
}

// start forks cmd from a thread inside the netns at nsPath: the child
// inherits the network namespace of the thread that forked it.
func (b *Bed) start(nsPath string, cmd *exec.Cmd) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return errors.New("bed is closed")
	}
	if cmd.WaitDelay == 0 {
		cmd.WaitDelay = waitDelay
	}
	err := nsenter.Do(nsPath, cmd.Start)
	// Even if only switching back failed, the process runs and is ours to kill.
	if cmd.Process != nil {
		b.procs = append(b.procs, cmd)
	}
	if err != nil {
		return fmt.Errorf("start %s: %w", cmd.Path, err)
	}
	return nil
}

// Delete removes the pod's cgroup and network namespace now, as Kubernetes
// deletes a pod whose teardown never ran: whatever was installed for it
// stays behind. The pod must have no processes left.
func (p *Pod) Delete() error {
	if err := removeCgroup(p.Cgroup, time.Now().Add(cgroupDrainTimeout)); err != nil {
		return err
	}
	return deleteNetns(filepath.Base(p.Netns))
}

// NodeSide is the node's end of the pod's veth: its name and addresses in
// the bed's node netns (enter it with Bed.DoNode). Tests that craft packets
// for the pod send them from here.
func (p *Pod) NodeSide() (iface string, addr4, addr6 netip.Addr) {
	sub := subnetFor(int(p.Addr4.As4()[2]))
	return fmt.Sprintf("veth%d", sub.n), sub.node4, sub.node6
}
