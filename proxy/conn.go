package proxy

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// conn is one proxied connection: the accepted socket (down) and the one the
// proxy dialed (up).
type conn struct {
	down, up   side
	dir        Direction
	client     netip.AddrPort
	dst        netip.AddrPort
	start      int64  // mono() when accepted
	last       int64  // mono() when bytes last arrived either way
	sent       int64  // written upstream
	received   int64  // written downstream
	connecting bool   // up's connect has not completed
	release    func() // takes back what Options.Offload took; nil when it took nothing
	queued     bool   // in loop.again
	closed     bool
}

// side is one socket of a connection and what the loop knows of it.
type side struct {
	fd                 int
	readable, writable bool // readiness seen and not used up (EAGAIN clears it)
	hup                bool // its peer's FIN (or an error) was signalled
	// greedy: read until EAGAIN, never stop at a short read. For the
	// socket on the hop between app and proxy, which Sluice may splice: a
	// spliced socket's read drains the spliced queue first and returns
	// short while TCP's queue may still hold bytes, with no event to come.
	greedy bool
	eof    bool // its peer finished sending
	// peek: the app's socket of an offloaded connection, whose bytes are
	// forwarded by forwardPeeked.
	peek bool
	shut bool // the proxy finished sending to it
	// pending are bytes read from the other side that this one could not
	// take yet, in buf, a pooled buffer held only meanwhile.
	pending []byte
	buf     *[]byte
}

// turnSteps bounds how many reads and writes one connection gets per turn,
// so that a bulk transfer shares its loop with the other connections.
const turnSteps = 16

// progress moves what can be moved on c without blocking, and closes it
// once both directions are done.
func (l *loop) progress(c *conn) {
	if c.closed {
		return
	}
	if c.connecting {
		if !c.up.writable {
			return
		}
		if err := connected(c.up.fd, c.dst); err == unix.EALREADY {
			c.up.writable = false // a stale readiness event
			return
		} else if err != nil {
			l.fail(c, fmt.Errorf("dial %s: %w", c.dst, err))
			return
		}
		c.connecting = false
		if o := l.p.opts.Offload; o != nil {
			app, far := c.appSide()
			// The app's end of the hop is the client that connected
			// (outbound) or the destination dialed (inbound).
			peer := c.client
			if c.dir == Inbound {
				peer = c.dst
			}
			if sa, err := unix.Getsockname(app.fd); err == nil {
				if c.release = o.Offload(c.dir, c.dst, peer, sockaddrPort(sa), far.fd); c.release != nil {
					app.peek = true
				}
			}
		}
	}
	for range turnSteps {
		a, err := l.step(c, &c.down, &c.up, &c.sent)
		if err != nil {
			l.finish(c, err)
			return
		}
		b, err := l.step(c, &c.up, &c.down, &c.received)
		if err != nil {
			l.finish(c, err)
			return
		}
		if !a && !b {
			if c.down.eof && c.up.eof && c.down.shut && c.up.shut {
				l.finish(c, nil)
			}
			return
		}
	}
	if !c.queued {
		c.queued = true
		l.again = append(l.again, c)
	}
}

// appSide returns c's socket on the hop to the app, and its other one.
func (c *conn) appSide() (app, far *side) {
	if c.dir == Inbound {
		return &c.up, &c.down
	}
	return &c.down, &c.up
}

// connected reports how a non-blocking connect ended: nil when it did,
// EALREADY while it is still under way, or its error. It asks as HAProxy
// does, with connect() again: one call where SO_ERROR would need a second
// to tell "connected" from "not yet".
func connected(fd int, dst netip.AddrPort) error {
	_, sa := sockaddr(dst)
	switch err := unix.Connect(fd, sa); err {
	case nil, unix.EISCONN:
		return nil
	case unix.EALREADY, unix.EINPROGRESS:
		return unix.EALREADY
	default:
		return err
	}
}

// step moves one chunk from src to dst: the bytes dst could not take before,
// or one read of src. It reports whether anything moved.
func (l *loop) step(c *conn, src, dst *side, count *int64) (bool, error) {
	if len(dst.pending) > 0 {
		if !dst.writable {
			return false, nil
		}
		n, err := rawWrite(dst.fd, dst.pending)
		switch {
		case err == unix.EAGAIN:
			dst.writable = false
			return false, nil
		case err == unix.EINTR:
			return true, nil
		case err != nil:
			return false, os.NewSyscallError("write", err)
		}
		*count += int64(n)
		dst.pending = dst.pending[n:]
		if len(dst.pending) == 0 {
			l.p.bufs.Put(dst.buf)
			dst.pending, dst.buf = nil, nil
		}
		return true, nil
	}
	if src.eof {
		if !dst.shut {
			dst.shut = true
			// ENOTCONN: the peer has gone already; closing says the rest.
			unix.Shutdown(dst.fd, unix.SHUT_WR)
		}
		return false, nil
	}
	if !src.readable {
		return false, nil
	}
	if src.peek {
		return l.forwardPeeked(c, src, dst, count)
	}
	n, err := rawRead(src.fd, l.scratch)
	switch {
	case err == unix.EAGAIN:
		src.readable = false
		return false, nil
	case err == unix.EINTR:
		return true, nil
	case err != nil:
		return false, os.NewSyscallError("read", err)
	case n == 0:
		// Only an offloaded connection's far socket can have had its
		// reset taken by another call.
		return true, endOfStream(src, c.release != nil)
	case n < len(l.scratch) && !src.hup && !src.greedy:
		// A short read took all there was: with edge-triggered events
		// the next bytes to arrive bring an event of their own, so no
		// read is spent on learning EAGAIN. Not after a FIN was
		// signalled: its event may have come with the data's, and the
		// end of stream is then only seen by reading on.
		src.readable = false
	}
	c.last = l.now
	w, err := rawWrite(dst.fd, l.scratch[:n])
	switch {
	case err == unix.EAGAIN || err == unix.EINTR:
		w = 0
	case err != nil:
		return false, os.NewSyscallError("write", err)
	}
	*count += int64(w)
	if w < n {
		// dst's send buffer is full: keep the rest until it drains, and
		// read no more from src meanwhile (TCP then slows src's sender).
		dst.buf = l.p.bufs.Get().(*[]byte)
		dst.pending = (*dst.buf)[:copy(*dst.buf, l.scratch[w:n])]
		dst.writable = false
	}
	return true, nil
}

// forwardPeeked is step for the app's socket of an offloaded connection:
// bytes leave src's queue only once dst has taken them, so that the kernel,
// which sends the app's next message straight to dst only while src's queue
// is empty, never puts it before them. Nothing is held in between: what dst
// cannot take yet stays on src.
func (l *loop) forwardPeeked(c *conn, src, dst *side, count *int64) (bool, error) {
	if !dst.writable {
		return false, nil
	}
	n, err := rawRecv(src.fd, l.scratch, unix.MSG_PEEK)
	switch {
	case err == unix.EAGAIN:
		src.readable = false
		return false, nil
	case err == unix.EINTR:
		return true, nil
	case err != nil:
		return false, os.NewSyscallError("recv", err)
	case n == 0:
		return true, endOfStream(src, false)
	}
	c.last = l.now
	w, err := rawWrite(dst.fd, l.scratch[:n])
	switch {
	case err == unix.EAGAIN:
		dst.writable = false
		return false, nil
	case err == unix.EINTR:
		return true, nil
	case err != nil:
		return false, os.NewSyscallError("write", err)
	}
	// Now take off src what dst took: the same bytes, since only this
	// loop reads src.
	if r, err := rawRecv(src.fd, l.scratch[:w], 0); err != nil || r != w {
		return false, fmt.Errorf("offloaded connection: %d bytes forwarded, %d taken off the app's socket: %v", w, r, err)
	}
	*count += int64(w)
	if w < n {
		dst.writable = false
	}
	return true, nil
}

// endOfStream marks src finished once a read returned 0. With maybeReset,
// it returns ECONNRESET instead when that 0 means a reset whose error
// another call took: with offload, the app's own sends on the far socket
// see the reset first. A socket the proxy has not shut down reaches
// TCP_CLOSE only by a reset (a FIN leaves it in CLOSE_WAIT).
func endOfStream(src *side, maybeReset bool) error {
	if maybeReset && !src.shut {
		if info, err := unix.GetsockoptTCPInfo(src.fd, unix.IPPROTO_TCP, unix.TCP_INFO); err == nil && info.State == tcpClose {
			return os.NewSyscallError("read", unix.ECONNRESET)
		}
	}
	src.eof = true
	return nil
}

// tcpClose is TCP_CLOSE, the state of a socket after a reset.
const tcpClose = 7

// fail ends a connection whose dial failed, with a warning.
func (l *loop) fail(c *conn, err error) {
	l.p.opts.Logger.Warn("dial original destination", "direction", c.dir, "client", c.client, "orig_dst", c.dst, "err", err)
	l.finish(c, err)
}

// finish closes both sockets of c and forgets it.
func (l *loop) finish(c *conn, err error) {
	c.closed = true
	log := l.p.opts.Logger
	// Built only when asked for: attributes cost an allocation each.
	if log.Enabled(context.Background(), slog.LevelDebug) {
		var upstream netip.AddrPort
		if sa, err := unix.Getsockname(c.up.fd); err == nil {
			upstream = sockaddrPort(sa)
		}
		log.Debug("proxied", "direction", string(c.dir), "client", c.client.String(), "orig_dst", c.dst.String(),
			"upstream", upstream.String(), "offloaded", c.release != nil, "sent", c.sent, "received", c.received,
			"duration", time.Duration(l.now-c.start).Round(time.Microsecond), "err", err)
	}
	if c.release != nil {
		c.release()
	}
	// A reset on one side is passed on as one, as a direct connection
	// would have seen it, rather than as an orderly end. EPIPE is a write
	// to a side reset before (the proxy never writes after its own
	// shutdown).
	reset := errors.Is(err, unix.ECONNRESET) || errors.Is(err, unix.EPIPE)
	for _, s := range []*side{&c.down, &c.up} {
		l.own(s.fd, owner{})
		if reset {
			unix.SetsockoptLinger(s.fd, unix.SOL_SOCKET, unix.SO_LINGER, &unix.Linger{Onoff: 1})
		}
		unix.Close(s.fd)
		if s.buf != nil {
			l.p.bufs.Put(s.buf)
			s.pending, s.buf = nil, nil
		}
	}
	l.p.open.Add(-1)
}

// rawRead and rawWrite are read and write on a non-blocking socket, which
// never block: raw system calls, as in loop.run.
func rawRead(fd int, b []byte) (int, error) {
	r, _, e := unix.RawSyscall(unix.SYS_READ, uintptr(fd), uintptr(unsafe.Pointer(&b[0])), uintptr(len(b)))
	if e != 0 {
		return 0, e
	}
	return int(r), nil
}

func rawRecv(fd int, b []byte, flags int) (int, error) {
	r, _, e := unix.RawSyscall6(unix.SYS_RECVFROM, uintptr(fd), uintptr(unsafe.Pointer(&b[0])), uintptr(len(b)), uintptr(flags), 0, 0)
	if e != 0 {
		return 0, e
	}
	return int(r), nil
}

func rawWrite(fd int, b []byte) (int, error) {
	r, _, e := unix.RawSyscall(unix.SYS_WRITE, uintptr(fd), uintptr(unsafe.Pointer(&b[0])), uintptr(len(b)))
	if e != 0 {
		return 0, e
	}
	return int(r), nil
}
