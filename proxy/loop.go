package proxy

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"runtime"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// loop is one event loop: an epoll instance, the connections it owns (both
// of their sockets are registered with it, edge-triggered) and the
// listeners it accepts from. Only its goroutine touches its state; others
// hand it work with call.
type loop struct {
	p       *Proxy
	epfd    int
	wakeFD  int // an eventfd: call wakes the loop with it
	cmds    chan command
	exited  chan struct{}
	stopped bool

	// owners says, by descriptor number, what each of the loop's sockets
	// is: a listener, or one of a connection's two sockets. A slice, not
	// a map: it is looked up for every event.
	owners    []owner
	paused    map[*listener]int64 // listeners left alone until then (out of descriptors)
	again     []*conn             // connections whose turn ended with bytes still to move
	scratch   []byte
	now       int64 // mono() at the last wake-up
	nextSweep int64
}

type command struct {
	f    func(*loop) error
	done chan error
}

type owner struct {
	c   *conn
	lst *listener
}

// own records what fd is, growing owners as needed.
func (l *loop) own(fd int, o owner) {
	if fd >= len(l.owners) {
		l.owners = append(l.owners, make([]owner, fd+1-len(l.owners)+len(l.owners)/2)...)
	}
	l.owners[fd] = o
}

func (l *loop) owner(fd int) owner {
	if fd < 0 || fd >= len(l.owners) {
		return owner{}
	}
	return l.owners[fd]
}

// listener is one listening socket, shared by every loop.
type listener struct {
	fd     int
	dir    Direction
	addr   netip.AddrPort
	failed chan error // the first error no retry helps
}

// sweepEvery is how often a loop looks for dials and connections past their
// timeouts, and for listeners to resume.
const sweepEvery = int64(250 * time.Millisecond)

// eventBatch is how many readiness events one epoll_wait returns at most.
const eventBatch = 256

// epoch makes mono(): nanoseconds on the monotonic clock, in an int64.
var epoch = time.Now()

func mono() int64 { return int64(time.Since(epoch)) }

func newLoop(p *Proxy) (*loop, error) {
	epfd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return nil, os.NewSyscallError("epoll_create1", err)
	}
	wake, err := unix.Eventfd(0, unix.EFD_NONBLOCK|unix.EFD_CLOEXEC)
	if err != nil {
		unix.Close(epfd)
		return nil, os.NewSyscallError("eventfd", err)
	}
	l := &loop{
		p: p, epfd: epfd, wakeFD: wake,
		cmds:    make(chan command, 16),
		exited:  make(chan struct{}),
		paused:  map[*listener]int64{},
		scratch: make([]byte, p.opts.BufferSize),
	}
	if err := unix.EpollCtl(epfd, unix.EPOLL_CTL_ADD, wake, &unix.EpollEvent{Events: unix.EPOLLIN, Fd: int32(wake)}); err != nil {
		l.closeFDs()
		return nil, os.NewSyscallError("epoll_ctl", err)
	}
	return l, nil
}

func (l *loop) closeFDs() {
	unix.Close(l.epfd)
	unix.Close(l.wakeFD)
}

// call runs f on the loop's goroutine and returns its error; nil once the
// loop has stopped.
func (l *loop) call(f func(*loop) error) error {
	done := make(chan error, 1)
	select {
	case l.cmds <- command{f, done}:
	case <-l.exited:
		return nil
	}
	var one = [8]byte{1}
	unix.Write(l.wakeFD, one[:])
	select {
	case err := <-done:
		return err
	case <-l.exited:
		return nil
	}
}

// run waits for events in epoll_wait on a thread of its own, as HAProxy's
// threads do, and calls it (and the socket reads and writes) as raw system
// calls: the Go scheduler is not told, so the loop keeps its P, and an
// event is handled at once instead of after the scheduler hands the thread
// a P back. Each loop thus holds a P for good (Options.Loops). The runtime
// still preempts it when it must (a signal interrupts epoll_wait).
func (l *loop) run() {
	runtime.LockOSThread()
	defer close(l.exited)
	defer l.closeFDs()
	events := make([]unix.EpollEvent, eventBatch)
	for !l.stopped {
		timeout := int((l.nextSweep - mono()) / int64(time.Millisecond))
		if len(l.again) > 0 || timeout < 0 {
			timeout = 0 // bytes still to move: only look
		}
		r, _, errno := unix.RawSyscall6(unix.SYS_EPOLL_PWAIT, uintptr(l.epfd), uintptr(unsafe.Pointer(&events[0])), uintptr(len(events)), uintptr(timeout), 0, 0)
		n := int(r)
		switch errno {
		case 0:
		case unix.EINTR:
			n = 0
		default:
			// Only a bug gets here (EBADF, EINVAL): stop rather than spin.
			l.p.opts.Logger.Error("event loop failed; its connections close", "err", os.NewSyscallError("epoll_wait", errno))
			l.stop()
			return
		}
		l.now = mono()
		for _, ev := range events[:n] {
			l.handle(ev)
		}
		again := l.again
		l.again = nil
		for _, c := range again {
			c.queued = false
			l.progress(c)
		}
		if l.now >= l.nextSweep {
			l.sweep()
			l.nextSweep = l.now + sweepEvery
		}
	}
}

func (l *loop) handle(ev unix.EpollEvent) {
	fd := int(ev.Fd)
	if fd == l.wakeFD {
		var buf [8]byte
		unix.Read(l.wakeFD, buf[:])
		for {
			select {
			case cmd := <-l.cmds:
				cmd.done <- cmd.f(l)
				continue
			default:
			}
			return
		}
	}
	o := l.owner(fd)
	if o.lst != nil {
		l.accept(o.lst)
		return
	}
	c := o.c
	if c == nil || c.closed {
		return
	}
	s := &c.down
	if fd == c.up.fd {
		s = &c.up
	}
	// Readiness is a hint the socket calls confirm: an event for a closed
	// descriptor whose number was reused costs one EAGAIN.
	if ev.Events&(unix.EPOLLIN|unix.EPOLLRDHUP|unix.EPOLLHUP|unix.EPOLLERR) != 0 {
		s.readable = true
	}
	if ev.Events&(unix.EPOLLRDHUP|unix.EPOLLHUP|unix.EPOLLERR) != 0 {
		s.hup = true
	}
	if ev.Events&(unix.EPOLLOUT|unix.EPOLLHUP|unix.EPOLLERR) != 0 {
		s.writable = true
	}
	l.progress(c)
}

func (l *loop) addListener(lst *listener) error {
	// EPOLLEXCLUSIVE: a new connection wakes one loop, not all of them.
	if err := unix.EpollCtl(l.epfd, unix.EPOLL_CTL_ADD, lst.fd, &unix.EpollEvent{Events: unix.EPOLLIN | unix.EPOLLEXCLUSIVE, Fd: int32(lst.fd)}); err != nil {
		return os.NewSyscallError("epoll_ctl", err)
	}
	l.own(lst.fd, owner{lst: lst})
	return nil
}

func (l *loop) removeListener(lst *listener) {
	if _, paused := l.paused[lst]; !paused {
		unix.EpollCtl(l.epfd, unix.EPOLL_CTL_DEL, lst.fd, nil)
	}
	delete(l.paused, lst)
	l.own(lst.fd, owner{})
}

// acceptBatch is how many connections one readiness event accepts at most,
// so that a flood of new connections does not starve the open ones.
const acceptBatch = 32

func (l *loop) accept(lst *listener) {
	for range acceptBatch {
		fd, sa, err := unix.Accept4(lst.fd, unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC)
		switch {
		case err == nil:
			l.open(fd, sockaddrPort(sa), lst)
		case err == unix.EAGAIN:
			return
		case err == unix.EINTR || err == unix.ECONNABORTED:
		case err == unix.EMFILE || err == unix.ENFILE || err == unix.ENOBUFS || err == unix.ENOMEM:
			// Level-triggered: the connection would wake the loop
			// again at once. Leave the listener alone for a moment.
			l.p.opts.Logger.Warn("cannot accept: out of descriptors or memory; pausing accepts for 100ms", "addr", lst.addr, "err", err)
			unix.EpollCtl(l.epfd, unix.EPOLL_CTL_DEL, lst.fd, nil)
			l.paused[lst] = l.now + int64(100*time.Millisecond)
			return
		default:
			select {
			case lst.failed <- os.NewSyscallError("accept4", err):
			default:
			}
			l.removeListener(lst)
			return
		}
	}
}

// open takes an accepted connection: it learns the original destination and
// starts dialing it.
func (l *loop) open(fd int, client netip.AddrPort, lst *listener) {
	log := l.p.opts.Logger
	// The socket's family is the listener's (IPv6 listeners are v6-only);
	// its own address matters only to the rare connection to a wildcard
	// listener's port.
	local := lst.addr
	dst, err := l.p.opts.originalDst(fd, local)
	if err != nil {
		log.Warn("no original destination; closing", "direction", lst.dir, "client", client, "err", err)
		unix.Close(fd)
		return
	}
	if dst.Port() == lst.addr.Port() && lst.addr.Addr().IsUnspecified() {
		if sa, err := unix.Getsockname(fd); err == nil {
			local = sockaddrPort(sa)
		}
	}
	if isLoop(dst, lst.addr, local) {
		log.Warn("original destination is the proxy's own listener; closing", "direction", lst.dir, "client", client, "orig_dst", dst)
		unix.Close(fd)
		return
	}
	up, err := dial(dst, lst.dir)
	if err != nil {
		log.Warn("dial original destination", "direction", lst.dir, "client", client, "orig_dst", dst, "err", err)
		unix.Close(fd)
		return
	}
	c := &conn{down: side{fd: fd, greedy: lst.dir == Outbound}, up: side{fd: up, greedy: lst.dir == Inbound},
		dir: lst.dir, client: client, dst: dst, start: l.now, last: l.now, connecting: true}
	for _, s := range []int{fd, up} {
		ev := unix.EpollEvent{Events: unix.EPOLLIN | unix.EPOLLOUT | unix.EPOLLRDHUP | unix.EPOLLET, Fd: int32(s)}
		if err := unix.EpollCtl(l.epfd, unix.EPOLL_CTL_ADD, s, &ev); err != nil {
			log.Warn("cannot watch a connection; closing it", "direction", lst.dir, "client", client, "err", os.NewSyscallError("epoll_ctl", err))
			unix.Close(fd)
			unix.Close(up)
			return
		}
	}
	l.own(fd, owner{c: c})
	l.own(up, owner{c: c})
	l.p.open.Add(1)
}

// dial starts a non-blocking connect to dst (inbound IPv4 from 127.0.0.6).
func dial(dst netip.AddrPort, dir Direction) (int, error) {
	family, sa := sockaddr(dst)
	fd, err := unix.Socket(family, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return -1, os.NewSyscallError("socket", err)
	}
	noDelay(fd)
	if dir == Inbound {
		if err := bindInboundSource(fd, family); err != nil {
			unix.Close(fd)
			return -1, err
		}
	}
	if err := unix.Connect(fd, sa); err != nil && err != unix.EINPROGRESS {
		unix.Close(fd)
		return -1, os.NewSyscallError("connect", err)
	}
	return fd, nil
}

// bindInboundSource binds fd to the inbound source of its family (127.0.0.6,
// ::1) with its port left to connect, as Envoy binds its upstream source:
// connect then picks the port for the whole 4-tuple, as a plain connect
// does, sharing it across destinations and reusing ports in TIME_WAIT. A
// port picked at bind time must be free of every socket, TIME_WAIT ones
// included, so each connection the sidecar closed first would hold its port
// for a minute, and a pod with a narrow ip_local_port_range would refuse
// inbound connections. A loopback source also lets the kernel reuse a
// TIME_WAIT tuple after a second (tcp_tw_reuse's default, 2, is loopback
// only), where the pod's own address would hold it for the whole minute.
func bindInboundSource(fd, family int) error {
	if err := unix.SetsockoptInt(fd, unix.IPPROTO_IP, unix.IP_BIND_ADDRESS_NO_PORT, 1); err != nil {
		return os.NewSyscallError("setsockopt IP_BIND_ADDRESS_NO_PORT", err)
	}
	src := unix.Sockaddr(inboundSource4)
	if family == unix.AF_INET6 {
		src = inboundSource6
	}
	if err := unix.Bind(fd, src); err != nil {
		return os.NewSyscallError("bind the inbound source", err)
	}
	return nil
}

func sockaddr(dst netip.AddrPort) (int, unix.Sockaddr) {
	if addr := dst.Addr().Unmap(); addr.Is4() {
		return unix.AF_INET, &unix.SockaddrInet4{Port: int(dst.Port()), Addr: addr.As4()}
	}
	return unix.AF_INET6, &unix.SockaddrInet6{Port: int(dst.Port()), Addr: dst.Addr().As16()}
}

// noDelay sends small writes at once, as Go's net package and HAProxy do: a
// proxy that waits to coalesce adds a round trip to request/response.
// Accepted sockets inherit it from their listener.
func noDelay(fd int) {
	unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_NODELAY, 1)
}

// sweep ends dials and connections past their timeouts and resumes paused
// listeners.
func (l *loop) sweep() {
	dialTimeout, idleTimeout := int64(l.p.opts.DialTimeout), int64(l.p.opts.IdleTimeout)
	for fd, o := range l.owners {
		c := o.c
		switch {
		case c == nil || fd != c.down.fd || c.closed:
		case c.connecting && l.now-c.start > dialTimeout:
			l.fail(c, fmt.Errorf("dial %s: %w", c.dst, os.ErrDeadlineExceeded))
		case l.now-c.last > idleTimeout:
			l.finish(c, errIdle)
		}
	}
	for lst, until := range l.paused {
		if l.now >= until {
			delete(l.paused, lst)
			unix.EpollCtl(l.epfd, unix.EPOLL_CTL_ADD, lst.fd, &unix.EpollEvent{Events: unix.EPOLLIN | unix.EPOLLEXCLUSIVE, Fd: int32(lst.fd)})
		}
	}
}

var (
	errIdle    = errors.New("idle timeout")
	errStopped = errors.New("drain period over")
)

// stop closes every connection the loop still has and ends it.
func (l *loop) stop() {
	for fd, o := range l.owners {
		if c := o.c; c != nil && fd == c.down.fd && !c.closed {
			l.finish(c, errStopped)
		}
	}
	l.stopped = true
}
