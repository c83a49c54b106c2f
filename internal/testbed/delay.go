package testbed

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"sync"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/sluicemesh/sluice/internal/nsenter"
)

// This kernel has no netem (and no fq for EDT pacing), so a host far away is
// built in user space: its link to the node is two TUN devices, one in the
// node's netns and one (eth0) in the host's, joined by goroutines that hold
// every packet for the delay before passing it on. A round trip through it
// takes twice the delay.

// delayQueue bounds the packets in flight one way, as a real link's buffer
// would; more are dropped.
const delayQueue = 8192

// AddDelayedHost adds a host like AddHost, but whose link to the node holds
// every packet for delay in each direction.
func (b *Bed) AddDelayedHost(name string, delay time.Duration) (*Host, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	nsName, sub, err := b.addNetns(name, func(nsName string, sub subnet) error { return b.wireDelayed(nsName, sub, delay) })
	if err != nil {
		return nil, fmt.Errorf("add delayed host %s: %w", name, err)
	}
	return &Host{
		Name:  name,
		Netns: netnsPath(nsName),
		Addr4: sub.addr4,
		Addr6: sub.addr6,
		bed:   b,
	}, nil
}

// wireDelayed makes the TUN pair and starts the goroutines that join it.
// b.mu must be held.
func (b *Bed) wireDelayed(nsName string, sub subnet, delay time.Duration) error {
	nodeTun, err := openTun(netnsPath(b.nodeNetns), fmt.Sprintf("tun%d", sub.n))
	if err != nil {
		return err
	}
	b.links = append(b.links, nodeTun)
	hostTun, err := openTun(netnsPath(nsName), podIface)
	if err != nil {
		return err
	}
	b.links = append(b.links, hostTun)

	if err := addAddrs(b.node, nodeTun.Name(), netip.PrefixFrom(sub.node4, 24), netip.PrefixFrom(sub.node6, 64)); err != nil {
		return err
	}
	if err := linkUp(b.node, nodeTun.Name()); err != nil {
		return err
	}
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
	if err := addAddrs(inside, podIface, netip.PrefixFrom(sub.addr4, 24), netip.PrefixFrom(sub.addr6, 64)); err != nil {
		return err
	}
	if err := linkUp(inside, podIface); err != nil {
		return err
	}
	// A TUN device has no neighbours to resolve: routes name the device.
	eth0, err := inside.LinkByName(podIface)
	if err != nil {
		return err
	}
	for _, dst := range []netip.Prefix{netip.MustParsePrefix("0.0.0.0/0"), netip.MustParsePrefix("::/0")} {
		if err := inside.RouteAdd(&netlink.Route{LinkIndex: eth0.Attrs().Index, Dst: prefixToIPNet(dst)}); err != nil {
			return fmt.Errorf("add default route on %s: %w", podIface, err)
		}
	}
	go relayDelayed(nodeTun, hostTun, delay)
	go relayDelayed(hostTun, nodeTun, delay)
	return nil
}

// openTun creates the TUN device name inside the netns at nsPath and returns
// its queue as a file Go's poller reads without blocking a thread, so that
// closing it ends a read in progress.
func openTun(nsPath, name string) (*os.File, error) {
	var f *os.File
	err := nsenter.Do(nsPath, func() error {
		fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC|unix.O_NONBLOCK, 0)
		if err != nil {
			return fmt.Errorf("open /dev/net/tun: %w", err)
		}
		ifr, err := unix.NewIfreq(name)
		if err != nil {
			unix.Close(fd)
			return err
		}
		ifr.SetUint16(unix.IFF_TUN | unix.IFF_NO_PI)
		if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
			unix.Close(fd)
			return fmt.Errorf("create tun %s: %w", name, err)
		}
		f = os.NewFile(uintptr(fd), name)
		return nil
	})
	return f, err
}

// relayDelayed copies packets from src to dst, each one delay after it
// arrived, in order, until src is closed.
func relayDelayed(src, dst *os.File, delay time.Duration) {
	type packet struct {
		due  time.Time
		data []byte
	}
	queue := make(chan packet, delayQueue)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for p := range queue {
			time.Sleep(time.Until(p.due))
			if _, err := dst.Write(p.data); errors.Is(err, os.ErrClosed) {
				return
			}
		}
	}()
	buf := make([]byte, 65536)
	for {
		n, err := src.Read(buf)
		if err != nil {
			break
		}
		select {
		case queue <- packet{time.Now().Add(delay), append([]byte(nil), buf[:n]...)}:
		default: // the link's buffer is full: drop, as a real one would
		}
	}
	close(queue)
	wg.Wait()
}
