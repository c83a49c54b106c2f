// Package proxy is Sluice's built-in transparent TCP proxy: it learns each
// captured connection's original destination with getsockopt(SO_ORIGINAL_DST)
// and forwards the bytes. It knows nothing of BPF and works the same behind
// iptables REDIRECT.
package proxy

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"sync"
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

// inboundSource4 is where the proxy dials the application from for IPv4, as
// Istio does: a loopback source the application can tell apart, which no
// capture sees again (inbound capture sits on the pod's interface, not lo).
var inboundSource4 = &net.TCPAddr{IP: net.IPv4(127, 0, 0, 6)}

// Options configures the built-in proxy; zero values take the defaults.
type Options struct {
	DialTimeout time.Duration // default 5s
	IdleTimeout time.Duration // a direction with no bytes for this long is closed; default 1h
	BufferSize  int           // per direction; default 32 KiB
	Logger      *slog.Logger
}

// Proxy is a transparent TCP proxy: for each accepted connection it asks the
// kernel for the original destination with getsockopt(SO_ORIGINAL_DST), the
// same call Envoy and HAProxy make, dials it and copies bytes both ways. It
// works the same behind Sluice's BPF hooks and behind iptables REDIRECT.
type Proxy struct {
	opts Options
	bufs sync.Pool

	// stop ends every dial and open connection when a drain runs out.
	stop     context.Context
	stopNow  context.CancelFunc
	handlers sync.WaitGroup
}

func New(opts Options) *Proxy {
	if opts.DialTimeout == 0 {
		opts.DialTimeout = 5 * time.Second
	}
	if opts.IdleTimeout == 0 {
		opts.IdleTimeout = time.Hour
	}
	if opts.BufferSize == 0 {
		opts.BufferSize = 32 << 10
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	p := &Proxy{opts: opts}
	p.stop, p.stopNow = context.WithCancel(context.Background())
	p.bufs.New = func() any { b := make([]byte, opts.BufferSize); return &b }
	return p
}

// Serve accepts on ln until ctx is done (it then returns nil and leaves the
// open connections to Shutdown) or ln fails (it returns the error). dir
// names the traffic ln receives, for the logs.
func (p *Proxy) Serve(ctx context.Context, ln net.Listener, dir Direction) error {
	listenAddr := ln.Addr().(*net.TCPAddr).AddrPort()
	stop := context.AfterFunc(ctx, func() { ln.Close() })
	defer stop()
	for {
		c, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			return fmt.Errorf("accept on %s: %w", ln.Addr(), err)
		}
		p.handlers.Add(1)
		go func() {
			defer p.handlers.Done()
			p.handle(c.(*net.TCPConn), dir, listenAddr)
		}()
	}
}

// Shutdown lets the open connections finish for up to drain, then closes
// the rest and waits for them. Call it once every Serve has returned.
func (p *Proxy) Shutdown(drain time.Duration) {
	done := make(chan struct{})
	go func() {
		p.handlers.Wait()
		close(done)
	}()
	timer := time.NewTimer(drain)
	defer timer.Stop()
	select {
	case <-done:
	case <-timer.C:
		p.opts.Logger.Warn("drain period over; closing the open connections", "drain", drain)
		p.stopNow()
		<-done
	}
	p.stopNow()
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

func (p *Proxy) handle(down *net.TCPConn, dir Direction, listenAddr netip.AddrPort) {
	defer down.Close()
	log := p.opts.Logger
	dst, err := OriginalDst(down)
	if err != nil {
		log.Warn("no original destination; closing", "direction", dir, "client", down.RemoteAddr(), "err", err)
		return
	}
	if isLoop(dst, listenAddr, down.LocalAddr().(*net.TCPAddr).AddrPort()) {
		log.Warn("original destination is the proxy's own listener; closing", "direction", dir, "client", down.RemoteAddr(), "orig_dst", dst)
		return
	}

	// No context for the dial: a cancellable one costs a goroutine per
	// dial, and a drain that runs out closes what is open anyway.
	dialer := net.Dialer{Timeout: p.opts.DialTimeout}
	if dir == Inbound && dst.Addr().Unmap().Is4() {
		dialer.LocalAddr = inboundSource4
	}
	upConn, err := dialer.Dial("tcp", dst.String())
	if err != nil {
		log.Warn("dial original destination", "direction", dir, "client", down.RemoteAddr(), "orig_dst", dst, "err", err)
		return
	}
	up := upConn.(*net.TCPConn)
	defer up.Close()
	// A drain that runs out cuts the connection.
	release := context.AfterFunc(p.stop, func() {
		down.Close()
		up.Close()
	})
	defer release()

	start := time.Now()
	var sent, received int64
	errc := make(chan error, 1)
	go func() {
		var err error
		sent, err = p.pipe(up, down)
		errc <- err
	}()
	received, err = p.pipe(down, up)
	if err != nil {
		// Unblock the other direction: a reset or timeout ends the connection.
		down.Close()
		up.Close()
	}
	if err2 := <-errc; err == nil {
		err = err2
	}
	// Built only when asked for: attributes cost an allocation each.
	if log.Enabled(context.Background(), slog.LevelDebug) {
		log.Debug("proxied", "direction", string(dir), "client", down.RemoteAddr().String(), "orig_dst", dst.String(),
			"upstream", up.LocalAddr().String(), "sent", sent, "received", received,
			"duration", time.Since(start).Round(time.Microsecond), "err", err)
	}
}

// pipe copies src to dst with read()/write() and half-closes dst at EOF.
// It deliberately avoids io.Copy: between two TCPConns that uses splice(2),
// which never sees data a sockmap redirect delivers to the socket.
//
// It holds a buffer only while bytes move: it waits for src to be readable
// with no buffer (RawConn.Read's callback runs when the socket is ready),
// takes one from the pool for the read and the write, and gives it back.
// An idle connection then costs its two goroutines, not 64 KiB of buffers.
func (p *Proxy) pipe(dst, src *net.TCPConn) (int64, error) {
	rc, err := src.SyscallConn()
	if err != nil {
		return 0, err
	}
	var (
		total    int64
		buf      *[]byte
		n        int
		rerr     error
		deadline time.Time // when the idle deadlines were last pushed
	)
	read := func(fd uintptr) bool {
		b := p.bufs.Get().(*[]byte)
		n, rerr = unix.Read(int(fd), *b)
		if rerr == unix.EAGAIN {
			p.bufs.Put(b)
			return false // wait for readability, holding nothing
		}
		buf = b
		return true
	}
	for {
		// Pushing deadlines costs a timer update each: only every quarter
		// of the idle timeout.
		if now := time.Now(); now.Sub(deadline) > p.opts.IdleTimeout/4 {
			deadline = now
			if err := src.SetReadDeadline(now.Add(p.opts.IdleTimeout)); err != nil {
				return total, err
			}
			if err := dst.SetWriteDeadline(now.Add(p.opts.IdleTimeout)); err != nil {
				return total, err
			}
		}
		if err := rc.Read(read); err != nil {
			return total, err
		}
		if rerr == unix.EINTR {
			p.bufs.Put(buf)
			continue
		}
		if rerr != nil {
			p.bufs.Put(buf)
			return total, os.NewSyscallError("read", rerr)
		}
		if n == 0 {
			p.bufs.Put(buf)
			return total, dst.CloseWrite()
		}
		w, werr := dst.Write((*buf)[:n])
		p.bufs.Put(buf)
		total += int64(w)
		if werr != nil {
			return total, werr
		}
	}
}

// OriginalDst returns the destination the client connected to before it was
// redirected, answered by conntrack (iptables REDIRECT) or by Sluice's
// cgroup/getsockopt hook in exactly the same format.
func OriginalDst(c *net.TCPConn) (netip.AddrPort, error) {
	raw, err := c.SyscallConn()
	if err != nil {
		return netip.AddrPort{}, err
	}
	level, size := unix.SOL_IP, unix.SizeofSockaddrInet4
	if local := c.LocalAddr().(*net.TCPAddr).AddrPort().Addr(); !local.Unmap().Is4() {
		level, size = unix.SOL_IPV6, unix.SizeofSockaddrInet6
	}
	var buf [unix.SizeofSockaddrInet6]byte
	n := uint32(size)
	var errno unix.Errno
	cerr := raw.Control(func(fd uintptr) {
		_, _, errno = unix.Syscall6(unix.SYS_GETSOCKOPT, fd, uintptr(level), soOriginalDst,
			uintptr(unsafe.Pointer(&buf[0])), uintptr(unsafe.Pointer(&n)), 0)
	})
	if cerr != nil {
		return netip.AddrPort{}, cerr
	}
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
