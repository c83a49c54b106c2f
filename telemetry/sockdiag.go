package telemetry

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// sockStat is what sock_diag tells of a flow's socket.
type sockStat struct {
	sent, received uint64
	srtt, minRTT   float64
	retrans        uint32
}

// finReceived reports whether a socket in TCP state st has had the peer's
// FIN: CLOSE_WAIT, LAST_ACK, CLOSING or TIME_WAIT.
func finReceived(st uint8) bool {
	switch st {
	case 8, 9, 11, 6:
		return true
	}
	return false
}

// sockKey names one flow's socket as sock_diag looks it up: the tuple from
// the socket's side, and its cookie (so a newer socket on the same tuple is
// not taken for it).
type sockKey struct {
	cookie        uint64
	local, remote netip.AddrPort
}

// key is the socket of f in the pod: the end that opened it for an outbound
// flow, the accepted one for an inbound flow.
func (f *Flow) key() sockKey {
	if f.Direction == Inbound {
		return sockKey{f.Cookie, f.Destination, f.Source}
	}
	return sockKey{f.Cookie, f.Source, f.Destination}
}

// Sizes and codes of linux/inet_diag.h and linux/netlink.h.
const (
	sizeofNlMsghdr    = 16
	sizeofInetDiagReq = 56 // struct inet_diag_req_v2
	sizeofInetDiagMsg = 72 // struct inet_diag_msg
	inetDiagInfo      = 2  // INET_DIAG_INFO: struct tcp_info
)

// socketStats reads the TCP state of the sockets keys name, in the calling
// thread's network namespace, with one exact sock_diag lookup each (tuple
// and cookie, the kernel's hash lookup). Not a dump: the kernel's TCP hash
// tables are shared by every network namespace, so a dump walks every
// socket of the node to find the pod's; with 50 pods under churn, one dump
// per pod and scrape was most of the agent's CPU. A socket that is gone (or
// in TIME_WAIT, which has no TCP info) is absent from the result.
func socketStats(keys []sockKey) (map[uint64]sockStat, error) {
	out := make(map[uint64]sockStat, len(keys))
	if len(keys) == 0 {
		return out, nil
	}
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_SOCK_DIAG)
	if err != nil {
		return nil, fmt.Errorf("sock_diag socket: %w", err)
	}
	defer unix.Close(fd)
	buf := make([]byte, 32768)
	if len(keys) > dumpAbove {
		return out, dumpSockets(fd, keys, buf, out)
	}
	var errs []error
	for i, k := range keys {
		s, found, err := lookupSocket(fd, uint32(i+1), k, buf)
		switch {
		case err != nil:
			errs = append(errs, err)
		case found:
			out[k.cookie] = s
		}
	}
	return out, errors.Join(errs...)
}

// dumpAbove is how many open flows a pod has before one dump of the
// namespace's sockets is read instead of a lookup each. A lookup costs
// about 7 µs (two system calls); a dump walks every TCP socket of the node,
// whatever its namespace: 4 ms with the node's few thousand here, more on
// a busy node (go test ./telemetry -bench SocketStats). So up to 1,024
// open flows a pod pays at most 7 ms a scrape, and a pod holding 30,000
// pays a dump, not 0.2 s of lookups.
const dumpAbove = 1024

// dumpSockets reads every TCP socket of the namespace, both families, and
// keeps those keys name.
func dumpSockets(fd int, keys []sockKey, buf []byte, out map[uint64]sockStat) error {
	want := make(map[uint64]bool, len(keys))
	for _, k := range keys {
		want[k.cookie] = true
	}
	var errs []error
	for i, family := range []uint8{unix.AF_INET, unix.AF_INET6} {
		req := diagRequest(uint32(i+1), unix.NLM_F_REQUEST|unix.NLM_F_DUMP, family)
		if err := unix.Sendto(fd, req, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
			errs = append(errs, fmt.Errorf("sock_diag dump: %w", err))
			continue
		}
		if err := readDump(fd, uint32(i+1), buf, want, out); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// readDump reads a dump's answers until its end.
func readDump(fd int, seq uint32, buf []byte, want map[uint64]bool, out map[uint64]sockStat) error {
	for {
		n, _, err := unix.Recvfrom(fd, buf, 0)
		if err != nil {
			return fmt.Errorf("sock_diag dump: %w", err)
		}
		msgs, err := syscall.ParseNetlinkMessage(buf[:n])
		if err != nil {
			return fmt.Errorf("sock_diag dump: %w", err)
		}
		for _, m := range msgs {
			switch {
			case m.Header.Seq != seq:
				continue
			case m.Header.Type == unix.NLMSG_DONE:
				return nil
			case m.Header.Type == unix.NLMSG_ERROR:
				return fmt.Errorf("sock_diag dump: %w", unix.Errno(-int32(binary.NativeEndian.Uint32(m.Data))))
			case len(m.Data) < sizeofInetDiagMsg:
				continue
			}
			cookie := binary.NativeEndian.Uint64(m.Data[44:]) // inet_diag_msg.id.idiag_cookie
			if !want[cookie] {
				continue
			}
			if s, ok, err := parseDiagMsg(m.Data); err == nil && ok {
				out[cookie] = s
			}
		}
	}
}

// diagRequest is a SOCK_DIAG_BY_FAMILY request for TCP info, every state.
func diagRequest(seq uint32, flags uint16, family uint8) []byte {
	req := make([]byte, sizeofNlMsghdr+sizeofInetDiagReq)
	ne := binary.NativeEndian
	ne.PutUint32(req[0:], uint32(len(req)))
	ne.PutUint16(req[4:], unix.SOCK_DIAG_BY_FAMILY)
	ne.PutUint16(req[6:], flags)
	ne.PutUint32(req[8:], seq)
	r := req[sizeofNlMsghdr:]
	r[0], r[1], r[2] = family, unix.IPPROTO_TCP, 1<<(inetDiagInfo-1)
	ne.PutUint32(r[4:], ^uint32(0)) // every state
	return req
}

// lookupSocket asks for one socket and reads the answer: its TCP info, or
// ENOENT/ESTALE when it is gone or the tuple is another socket's now.
func lookupSocket(fd int, seq uint32, k sockKey, buf []byte) (sockStat, bool, error) {
	ne := binary.NativeEndian
	family := uint8(unix.AF_INET6)
	local, remote := k.local.Addr().Unmap(), k.remote.Addr().Unmap()
	if local.Is4() && remote.Is4() {
		family = unix.AF_INET // finds v4-mapped sockets of AF_INET6 too
	}
	req := diagRequest(seq, unix.NLM_F_REQUEST, family)
	id := req[sizeofNlMsghdr+8:]
	binary.BigEndian.PutUint16(id[0:], k.local.Port())
	binary.BigEndian.PutUint16(id[2:], k.remote.Port())
	putAddr(id[4:20], local)
	putAddr(id[20:36], remote)
	ne.PutUint32(id[40:], uint32(k.cookie))
	ne.PutUint32(id[44:], uint32(k.cookie>>32))
	if err := unix.Sendto(fd, req, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return sockStat{}, false, fmt.Errorf("sock_diag lookup: %w", err)
	}
	for {
		n, _, err := unix.Recvfrom(fd, buf, 0)
		if err != nil {
			return sockStat{}, false, fmt.Errorf("sock_diag answer: %w", err)
		}
		msgs, err := syscall.ParseNetlinkMessage(buf[:n])
		if err != nil {
			return sockStat{}, false, fmt.Errorf("sock_diag answer: %w", err)
		}
		for _, m := range msgs {
			if m.Header.Seq != seq {
				continue // a late answer to an earlier request
			}
			if m.Header.Type == unix.NLMSG_ERROR {
				if len(m.Data) < 4 {
					return sockStat{}, false, errors.New("sock_diag answer: a short error")
				}
				switch errno := unix.Errno(-int32(ne.Uint32(m.Data))); errno {
				case 0, unix.ENOENT, unix.ESTALE:
					return sockStat{}, false, nil
				default:
					return sockStat{}, false, fmt.Errorf("sock_diag lookup: %w", errno)
				}
			}
			return parseDiagMsg(m.Data)
		}
	}
}

func putAddr(b []byte, a netip.Addr) {
	if a.Is4() {
		v4 := a.As4()
		copy(b, v4[:])
		return
	}
	v6 := a.As16()
	copy(b, v6[:])
}

// parseDiagMsg reads the TCP info of an inet_diag_msg answer.
func parseDiagMsg(data []byte) (sockStat, bool, error) {
	if len(data) < sizeofInetDiagMsg {
		return sockStat{}, false, fmt.Errorf("sock_diag answer of %d bytes", len(data))
	}
	state := data[1]
	attrs := data[sizeofInetDiagMsg:]
	for len(attrs) >= 4 {
		l, typ := int(binary.NativeEndian.Uint16(attrs[0:])), binary.NativeEndian.Uint16(attrs[2:])
		if l < 4 || l > len(attrs) {
			return sockStat{}, false, errors.New("sock_diag answer: a malformed attribute")
		}
		if typ == inetDiagInfo {
			var ti unix.TCPInfo
			// The kernel's struct only grows: a shorter one (an older
			// kernel) leaves the fields it lacks zero.
			copy(unsafe.Slice((*byte)(unsafe.Pointer(&ti)), unsafe.Sizeof(ti)), attrs[4:l])
			// Data bytes only, as the kernel's close-time event counts
			// them: bytes_received includes the peer's FIN once it came.
			received := ti.Bytes_received
			if finReceived(state) && received > 0 {
				received--
			}
			return sockStat{sent: ti.Bytes_sent - ti.Bytes_retrans, received: received,
				srtt: micros(ti.Rtt), minRTT: micros(ti.Min_rtt), retrans: ti.Total_retrans}, true, nil
		}
		attrs = attrs[min((l+3)&^3, len(attrs)):]
	}
	return sockStat{}, false, nil // TIME_WAIT: no TCP info
}

// CheckSockDiag asks the kernel for a dump of no TCP sockets: it fails
// where sock_diag cannot read TCP sockets (inet_diag or tcp_diag not built,
// or their modules not loadable), and flows' live byte counts with it.
func CheckSockDiag() error {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_SOCK_DIAG)
	if err != nil {
		return fmt.Errorf("sock_diag socket: %w", err)
	}
	defer unix.Close(fd)
	req := diagRequest(1, unix.NLM_F_REQUEST|unix.NLM_F_DUMP, unix.AF_INET)
	binary.NativeEndian.PutUint32(req[sizeofNlMsghdr+4:], 0) // no state: an empty answer
	if err := unix.Sendto(fd, req, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return fmt.Errorf("sock_diag dump: %w", err)
	}
	return readDump(fd, 1, make([]byte, 8192), nil, map[uint64]sockStat{})
}
