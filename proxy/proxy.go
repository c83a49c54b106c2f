// Package proxy is Sluice's built-in transparent TCP proxy: it learns each
// captured connection's original destination with getsockopt(SO_ORIGINAL_DST)
// and forwards the bytes. It knows nothing of BPF and works the same behind
// iptables REDIRECT.
//
// It is an event loop, as HAProxy and Envoy are, not a goroutine per
// connection: one epoll loop per CPU owns its connections' sockets and moves
// bytes with read() and write() as they become ready. An open connection then
// costs its two sockets and a small record; a buffer is held only while bytes
// wait for a slow side to take them. read() rather than splice(2): a socket
// in Sluice's splice table never shows spliced bytes to splice(2).
package proxy

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// soOriginalDst is SO_ORIGINAL_DST (SOL_IP) and IP6T_SO_ORIGINAL_DST (SOL_IPV6).
const soOriginalDst = 80

// Direction names the listener a connection arrived on.
type Direction string

const (
	Outbound Direction = "outbound" // the app's connections out of the pod
	Inbound  Direction = "inbound"  // connections into the pod, for the app
)

// inboundSource4 and inboundSource6 are where the proxy dials the
// application from: loopback sources, which inbound capture leaves alone.
// IPv4's is Istio's 127.0.0.6, which the application can tell apart; IPv6
// has only ::1 on lo (Istio adds ::6 to lo first).
var (
	inboundSource4 = &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 6}}
	inboundSource6 = &unix.SockaddrInet6{Addr: [16]byte{15: 1}}
)

// Options configures the built-in proxy; zero values take the defaults.
type Options struct {
	DialTimeout time.Duration // default 5s
	IdleTimeout time.Duration // a connection with no bytes either way for this long is closed; default 1h
	BufferSize  int           // bytes read at once, and held for a side that cannot take them yet; default 64 KiB
	// Loops is how many event loops run, each holding one of the
	// process's Ps (GOMAXPROCS) for good; default GOMAXPROCS-1 (at least
	// 1), to leave one for the rest of the process.
	Loops  int
	Logger *slog.Logger
	// Offload, when set, is offered every connection once its upstream is
	// connected.
	Offload Offloader

	// originalDst replaces getsockopt(SO_ORIGINAL_DST), for tests without
	// a kernel redirect.
	originalDst func(fd int, local netip.AddrPort) (netip.AddrPort, error)
}

// Offloader hands the app's sending direction of a proxied connection to the
// kernel, which then writes the app's messages to the far socket itself
// (Sluice's offload). The proxy keeps reading the app's socket, since bytes
// the kernel leaves there still go through the proxy, and so does the end of
// the stream; it then leaves each byte on that socket's queue until the far
// socket has taken it (it peeks, writes, then reads), because the kernel
// sends the app's next message straight on only while that queue is empty.
type Offloader interface {
	// Offload hands the connection over, or returns nil. app and proxy
	// are the two ends of the hop to the app (the app's socket and the
	// proxy's: its accepted one outbound, its dialed one inbound), far the
	// proxy's other socket; nothing has been read from either yet.
	// release takes the connection back before its sockets close.
	Offload(dir Direction, dst, app, proxy netip.AddrPort, far int) (release func())
}

// Proxy is a transparent TCP proxy: for each accepted connection it asks the
// kernel for the original destination with getsockopt(SO_ORIGINAL_DST), the
// same call Envoy and HAProxy make, dials it and copies bytes both ways. It
// works the same behind Sluice's BPF hooks and behind iptables REDIRECT.
type Proxy struct {
	opts Options
	bufs sync.Pool // *[]byte of BufferSize, for bytes a side cannot take yet

	start     sync.Once
	startErr  error
	loops     []*loop
	open      atomic.Int64 // connections open, in every loop
	loopsDone sync.WaitGroup
}

func New(opts Options) *Proxy {
	if opts.DialTimeout == 0 {
		opts.DialTimeout = 5 * time.Second
	}
	if opts.IdleTimeout == 0 {
		opts.IdleTimeout = time.Hour
	}
	if opts.BufferSize == 0 {
		opts.BufferSize = 64 << 10
	}
	if opts.Loops == 0 {
		opts.Loops = max(1, runtime.GOMAXPROCS(0)-1)
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.originalDst == nil {
		opts.originalDst = originalDst
	}
	p := &Proxy{opts: opts}
	p.bufs.New = func() any { b := make([]byte, opts.BufferSize); return &b }
	return p
}

// startLoops starts the event loops once, at the first Serve.
func (p *Proxy) startLoops() error {
	p.start.Do(func() {
		for range p.opts.Loops {
			l, err := newLoop(p)
			if err != nil {
				p.startErr = err
				break
			}
			p.loops = append(p.loops, l)
		}
		if p.startErr != nil {
			for _, l := range p.loops {
				l.closeFDs()
			}
			p.loops = nil
			return
		}
		for _, l := range p.loops {
			p.loopsDone.Add(1)
			go func() {
				defer p.loopsDone.Done()
				l.run()
			}()
		}
	})
	return p.startErr
}

// Serve accepts on ln until ctx is done (it then returns nil and leaves the
// open connections to Shutdown) or accepting fails (it returns the error).
// dir names the traffic ln receives. Every event loop accepts from ln; the
// kernel wakes one per connection. Serve takes ln over and closes it.
func (p *Proxy) Serve(ctx context.Context, ln net.Listener, dir Direction) error {
	defer ln.Close()
	tl, ok := ln.(*net.TCPListener)
	if !ok {
		return fmt.Errorf("serve %s: not a TCP listener", ln.Addr())
	}
	addr := tl.Addr().(*net.TCPAddr).AddrPort()
	// A copy of the socket the loops own: closing ln then takes it out of
	// Go's poller, which would be woken for every connection for nothing.
	f, err := tl.File()
	if err != nil {
		return fmt.Errorf("serve %s: %w", addr, err)
	}
	defer f.Close()
	ln.Close()
	fd := int(f.Fd())
	// Fd puts the socket in blocking mode, and the loops must never block.
	if err := unix.SetNonblock(fd, true); err != nil {
		return fmt.Errorf("serve %s: %w", addr, err)
	}
	noDelay(fd)
	if err := p.startLoops(); err != nil {
		return err
	}
	lst := &listener{fd: fd, dir: dir, addr: addr, failed: make(chan error, 1)}
	for i, l := range p.loops {
		if err := l.call(func(l *loop) error { return l.addListener(lst) }); err != nil {
			for _, added := range p.loops[:i] {
				added.call(func(l *loop) error { l.removeListener(lst); return nil })
			}
			return fmt.Errorf("serve %s: %w", addr, err)
		}
	}
	select {
	case <-ctx.Done():
		err = nil
	case err = <-lst.failed:
		err = fmt.Errorf("accept on %s: %w", addr, err)
	}
	// The socket is closed only once no loop uses it any more.
	for _, l := range p.loops {
		l.call(func(l *loop) error { l.removeListener(lst); return nil })
	}
	return err
}

// Shutdown lets the open connections finish for up to drain, then closes
// the rest and stops the loops. Call it once every Serve has returned.
func (p *Proxy) Shutdown(drain time.Duration) {
	if len(p.loops) == 0 {
		return
	}
	deadline := time.Now().Add(drain)
	for p.open.Load() > 0 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if n := p.open.Load(); n > 0 {
		p.opts.Logger.Warn("drain period over; closing the open connections", "drain", drain, "open", n)
	}
	for _, l := range p.loops {
		l.call(func(l *loop) error { l.stop(); return nil })
	}
	p.loopsDone.Wait()
}

// isLoop reports whether dst is the listener itself: a connection straight to
// the listener (its port is never captured) would dial itself forever. Only
// the address the listener serves counts, so a captured connection to a
// remote server that happens to use the same port goes through.
func isLoop(dst, listen, local netip.AddrPort) bool {
	if dst.Port() != listen.Port() {
		return false
	}
	if listen.Addr().IsUnspecified() {
		// A wildcard listener serves every local address; this
		// connection's own local address is one of them.
		return dst.Addr().Unmap() == local.Addr().Unmap()
	}
	return dst.Addr().Unmap() == listen.Addr().Unmap()
}

// OriginalDst returns where the client of a captured connection was going
// before it was redirected, answered by conntrack (iptables REDIRECT) or by
// Sluice's cgroup/getsockopt hook in exactly the same format. c is a TCP
// connection, or the DNS forwarder's UDP socket connected to a query's
// source (the nameserver that query was sent to).
func OriginalDst(c interface {
	syscall.Conn
	LocalAddr() net.Addr
}) (netip.AddrPort, error) {
	local, err := netip.ParseAddrPort(c.LocalAddr().String())
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("the connection's local address: %w", err)
	}
	raw, err := c.SyscallConn()
	if err != nil {
		return netip.AddrPort{}, err
	}
	var dst netip.AddrPort
	cerr := raw.Control(func(fd uintptr) {
		dst, err = originalDst(int(fd), local)
	})
	return dst, errors.Join(cerr, err)
}

// originalDst asks with the level of the connection's family as its local
// end shows it: IPv4 (v4-mapped too) answers at SOL_IP.
func originalDst(fd int, local netip.AddrPort) (netip.AddrPort, error) {
	level, size := unix.SOL_IP, unix.SizeofSockaddrInet4
	if !local.Addr().Unmap().Is4() {
		level, size = unix.SOL_IPV6, unix.SizeofSockaddrInet6
	}
	var buf [unix.SizeofSockaddrInet6]byte
	n := uint32(size)
	_, _, errno := unix.Syscall6(unix.SYS_GETSOCKOPT, uintptr(fd), uintptr(level), soOriginalDst,
		uintptr(unsafe.Pointer(&buf[0])), uintptr(unsafe.Pointer(&n)), 0)
	if errno != 0 {
		return netip.AddrPort{}, fmt.Errorf("getsockopt SO_ORIGINAL_DST: %w", errno)
	}
	return parseSockaddr(buf[:n])
}

// parseSockaddr decodes a struct sockaddr_in or sockaddr_in6 as the kernel
// writes it: family in host order, port and address in network order.
func parseSockaddr(b []byte) (netip.AddrPort, error) {
	if len(b) < 2 {
		return netip.AddrPort{}, fmt.Errorf("sockaddr of %d bytes is too short", len(b))
	}
	family := binary.NativeEndian.Uint16(b)
	switch {
	case family == unix.AF_INET && len(b) >= unix.SizeofSockaddrInet4:
		return netip.AddrPortFrom(netip.AddrFrom4([4]byte(b[4:8])), binary.BigEndian.Uint16(b[2:])), nil
	case family == unix.AF_INET6 && len(b) >= unix.SizeofSockaddrInet6:
		return netip.AddrPortFrom(netip.AddrFrom16([16]byte(b[8:24])), binary.BigEndian.Uint16(b[2:])), nil
	}
	return netip.AddrPort{}, fmt.Errorf("unexpected sockaddr: family %d, %d bytes", family, len(b))
}

// sockaddrPort converts what getsockname and getpeername return.
func sockaddrPort(sa unix.Sockaddr) netip.AddrPort {
	switch a := sa.(type) {
	case *unix.SockaddrInet4:
		return netip.AddrPortFrom(netip.AddrFrom4(a.Addr), uint16(a.Port))
	case *unix.SockaddrInet6:
		return netip.AddrPortFrom(netip.AddrFrom16(a.Addr), uint16(a.Port))
	}
	return netip.AddrPort{}
}
