package loader

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/sluicemesh/sluice/bpf"
	"github.com/sluicemesh/sluice/internal/testbed"
	"github.com/sluicemesh/sluice/redirect"
)

// The listeners of a wire pod tell each other apart by the MSS their
// SYN-ACKs advertise: a SYN-ACK with appMSS means a SYN reached the app's
// own listener past the sidecar.
const (
	appMSS     = 1000
	sidecarMSS = 1200
	appPort    = 8080
)

// wirePod is a pod with Sluice installed (inbound too), an app listening on
// appPort and, unless asked otherwise, the sidecar's inbound listeners,
// registered as sockops registers them. Packets are crafted and sent to it
// from the node's end of its veth.
type wirePod struct {
	bed    *testbed.Bed
	pod    *testbed.Pod
	target Target
	raw    *rawPort
	host   *testbed.Host // a client's machine, once addHost made it
	apps   []int         // the app's listeners (IPv4, IPv6)
	sides  []int         // the sidecar's (IPv4, IPv6), when it listens
}

func newWirePod(t *testing.T, failOpen, sidecar bool) *wirePod {
	t.Helper()
	testbed.RequirePrivileged(t)
	bed := testbed.Must(t)
	pod, err := bed.AddPod("app")
	if err != nil {
		t.Fatal(err)
	}
	target, err := ResolveTarget(pod.Cgroup, "")
	if err != nil {
		t.Fatal(err)
	}
	target.Netns, target.Interface = pod.Netns, pod.Iface
	p := redirect.DefaultPolicy()
	p.FailOpen = failOpen
	plan, err := p.Plan()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := Install(target, plan, nil, quiet); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := Uninstall(target, quiet); err != nil {
			t.Error(err)
		}
	})
	w := &wirePod{bed: bed, pod: pod, target: target}
	w.apps = []int{listenIn(t, pod, "tcp4", appPort, appMSS), listenIn(t, pod, "tcp6", appPort, appMSS)}
	if sidecar {
		m, err := ebpf.LoadPinnedMap(filepath.Join(target.PinDir, bpf.SluiceMapInboundListeners), nil)
		if err != nil {
			t.Fatal(err)
		}
		defer m.Close()
		for slot, kind := range []string{"tcp4", "tcp6"} {
			fd := listenIn(t, pod, kind, plan.InboundPort, sidecarMSS)
			w.sides = append(w.sides, fd)
			if err := m.Update(uint32(slot), uint64(fd), ebpf.UpdateAny); err != nil {
				t.Fatal(err)
			}
		}
	}
	w.raw = openRawPort(t, bed, pod)
	return w
}

func (w *wirePod) counters(t *testing.T) map[string]uint64 {
	t.Helper()
	p, err := Open(w.target, ReadOnly)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	counts, err := p.Counters()
	if err != nil {
		t.Fatal(err)
	}
	return counts
}

// appAccepted reports how many connections the app's listeners had
// waiting, taking them.
func (w *wirePod) appAccepted(t *testing.T) int {
	t.Helper()
	n := 0
	for _, fd := range w.apps {
		unix.SetNonblock(fd, true)
		for {
			c, _, err := unix.Accept(fd)
			if err != nil {
				break
			}
			unix.Close(c)
			n++
		}
	}
	return n
}

// sidecarAccept waits up to 3 s for a connection on the sidecar's listener
// of the family of v6, and returns it.
func (w *wirePod) sidecarAccept(t *testing.T, v6 bool) int {
	t.Helper()
	ln := w.sides[0]
	if v6 {
		ln = w.sides[1]
	}
	fds := []unix.PollFd{{Fd: int32(ln), Events: unix.POLLIN}}
	if n, err := unix.Poll(fds, 3000); err != nil || n == 0 {
		t.Fatalf("the sidecar's listener got no connection in 3 s (poll: %v)", err)
	}
	c, _, err := unix.Accept4(ln, unix.SOCK_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(c) })
	return c
}

func (w *wirePod) addHost(t *testing.T) {
	t.Helper()
	h, err := w.bed.AddHost("client")
	if err != nil {
		t.Fatal(err)
	}
	w.host = h
}

// podNetstat reads one counter of /proc/net/netstat (or snmp) in the pod.
func (w *wirePod) podNetstat(t *testing.T, group, name string) int64 {
	t.Helper()
	var v int64 = -1
	if err := w.pod.Do(func() error {
		data, err := os.ReadFile("/proc/thread-self/net/netstat")
		if err != nil {
			return err
		}
		lines := strings.Split(string(data), "\n")
		for i := 0; i+1 < len(lines); i += 2 {
			names, values := strings.Fields(lines[i]), strings.Fields(lines[i+1])
			if len(names) == 0 || names[0] != group+":" || len(values) != len(names) {
				continue
			}
			for j, n := range names {
				if n == name {
					v, err = strconv.ParseInt(values[j], 10, 64)
					return err
				}
			}
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	return v
}

// podHasTimeWait reports whether the pod holds a TIME_WAIT socket whose
// remote end is remote.
func (w *wirePod) podHasTimeWait(t *testing.T, remote netip.AddrPort) bool {
	t.Helper()
	found := false
	if err := w.pod.Do(func() error {
		out, err := exec.Command("ss", "-Htn", "state", "time-wait", "dst", remote.String()).Output()
		found = len(strings.TrimSpace(string(out))) > 0
		return err
	}); err != nil {
		t.Fatal(err)
	}
	return found
}

// podSysctl sets a sysctl of the pod's network namespace (a path below
// /proc/sys/net).
func (w *wirePod) podSysctl(t *testing.T, name, value string) {
	t.Helper()
	if err := w.pod.Do(func() error {
		return os.WriteFile("/proc/sys/net/"+name, []byte(value), 0o644)
	}); err != nil {
		t.Fatal(err)
	}
}

// rawPort sends Ethernet frames into a pod from the node's end of its veth,
// and reads what the pod sends back.
type rawPort struct {
	fd              int
	ifindex         int
	podMAC, nodeMAC net.HardwareAddr
	node4, node6    netip.Addr
	pod4, pod6      netip.Addr
}

func openRawPort(t *testing.T, bed *testbed.Bed, pod *testbed.Pod) *rawPort {
	t.Helper()
	name, node4, node6 := pod.NodeSide()
	r := &rawPort{fd: -1, node4: node4, node6: node6, pod4: pod.Addr4, pod6: pod.Addr6}
	if err := pod.Do(func() error {
		iface, err := net.InterfaceByName(pod.Iface)
		if err == nil {
			r.podMAC = iface.HardwareAddr
		}
		return err
	}); err != nil {
		t.Fatal(err)
	}
	if err := bed.DoNode(func() error {
		iface, err := net.InterfaceByName(name)
		if err != nil {
			return err
		}
		r.ifindex, r.nodeMAC = iface.Index, iface.HardwareAddr
		fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, int(htons(unix.ETH_P_ALL)))
		if err != nil {
			return err
		}
		r.fd = fd
		return unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_ALL), Ifindex: r.ifindex})
	}); err != nil {
		if r.fd >= 0 {
			unix.Close(r.fd)
		}
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(r.fd) })
	// The pod resolves the node's addresses before it answers them.
	return r
}

func htons(v uint16) uint16 { return v>>8 | v<<8 }

func (r *rawPort) send(t *testing.T, frames ...[]byte) {
	t.Helper()
	for _, f := range frames {
		if err := unix.Sendto(r.fd, f, 0, &unix.SockaddrLinklayer{Ifindex: r.ifindex, Halen: 6}); err != nil {
			t.Fatalf("send %d-byte frame: %v", len(f), err)
		}
	}
}

// reply is a TCP segment the pod sent to the node.
type reply struct {
	sport, dport uint16 // the pod's port, the crafted packet's source port
	flags        byte
	mss          int // the MSS option, 0 without one
}

// replies reads what the pod sends for d, by the crafted packets' source
// port.
func (r *rawPort) replies(t *testing.T, d time.Duration) map[uint16][]reply {
	t.Helper()
	out := map[uint16][]reply{}
	tv := unix.NsecToTimeval((50 * time.Millisecond).Nanoseconds())
	if err := unix.SetsockoptTimeval(r.fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 4096)
	for deadline := time.Now().Add(d); time.Now().Before(deadline); {
		n, from, err := unix.Recvfrom(r.fd, buf, 0)
		if errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			t.Fatal(err)
		}
		if ll, ok := from.(*unix.SockaddrLinklayer); ok && ll.Pkttype == unix.PACKET_OUTGOING {
			continue
		}
		if rep, ok := r.parse(buf[:n]); ok {
			out[rep.dport] = append(out[rep.dport], rep)
		}
	}
	return out
}

// parse reads a TCP segment the pod sent, from whatever source address,
// out of an Ethernet frame.
func (r *rawPort) parse(f []byte) (reply, bool) {
	if len(f) < 14 {
		return reply{}, false
	}
	var tcp []byte
	switch binary.BigEndian.Uint16(f[12:]) {
	case unix.ETH_P_IP:
		ip := f[14:]
		if len(ip) < 20 || ip[9] != unix.IPPROTO_TCP {
			return reply{}, false
		}
		tcp = ip[int(ip[0]&0x0f)*4:]
	case unix.ETH_P_IPV6:
		ip := f[14:]
		if len(ip) < 40 || ip[6] != unix.IPPROTO_TCP {
			return reply{}, false
		}
		tcp = ip[40:]
	default:
		return reply{}, false
	}
	if len(tcp) < 20 {
		return reply{}, false
	}
	rep := reply{sport: binary.BigEndian.Uint16(tcp), dport: binary.BigEndian.Uint16(tcp[2:]), flags: tcp[13]}
	opts := tcp[20:min(len(tcp), int(tcp[12]>>4)*4)]
	for i := 0; i < len(opts); {
		switch kind := opts[i]; {
		case kind == 0:
			i = len(opts)
		case kind == 1:
			i++
		case i+1 < len(opts) && opts[i+1] >= 2:
			if kind == 2 && opts[i+1] == 4 && i+4 <= len(opts) {
				rep.mss = int(binary.BigEndian.Uint16(opts[i+2:]))
			}
			i += int(opts[i+1])
		default:
			i = len(opts)
		}
	}
	return rep, true
}

// A crafted packet: a TCP segment from the node to the pod, with the IP
// layer's odd parts a case asks for.
type crafted struct {
	v6      bool
	sport   uint16
	dport   uint16     // appPort when not set
	dst     netip.Addr // the pod's address when not set
	src     netip.Addr // the node's address when not set
	flags   byte
	payload int
	ipOpts  int     // bytes of IPv4 options (NOPs), a multiple of 4
	ext     []uint8 // IPv6 extension headers before TCP: 0 hop-by-hop, 60 destination options, 43 routing (type 0, nothing left), 44 an atomic fragment
	fragAt  int     // split the TCP segment into two fragments at this byte (a multiple of 8)
	overlap bool    // the second fragment starts 8 bytes early (and, from byte 8, rewrites the TCP flags to SYN only)
}

const (
	tcpFIN = 0x01
	tcpSYN = 0x02
	tcpRST = 0x04
	tcpPSH = 0x08
	tcpACK = 0x10
	tcpURG = 0x20
	tcpECE = 0x40
	tcpCWR = 0x80
)

var ipID uint16

// frames builds c as Ethernet frames from the node's end of the veth.
func (r *rawPort) frames(c crafted) [][]byte {
	src, dst := c.src, c.dst
	if !src.IsValid() {
		src = map[bool]netip.Addr{false: r.node4, true: r.node6}[c.v6]
	}
	if !dst.IsValid() {
		dst = map[bool]netip.Addr{false: r.pod4, true: r.pod6}[c.v6]
	}
	dport := c.dport
	if dport == 0 {
		dport = appPort
	}
	seg := tcpSegment(src, dst, c.sport, dport, c.flags, make([]byte, c.payload))
	parts := [][2]int{{0, len(seg)}} // byte ranges of seg, one a fragment
	if c.fragAt > 0 {
		second := c.fragAt
		if c.overlap {
			second -= 8
		}
		parts = [][2]int{{0, c.fragAt}, {second, len(seg)}}
	}
	ipID++
	var out [][]byte
	for i, p := range parts {
		data := seg[p[0]:p[1]]
		if c.overlap && i == 1 && p[0] <= 13 {
			data = append([]byte{}, data...)
			data[13-p[0]] = tcpSYN // flags byte of the TCP header, at offset 13
		}
		more := len(parts) > 1 && i == 0
		var ip []byte
		if c.v6 {
			ip = ipv6Packet(src, dst, c.ext, len(parts) > 1, p[0], more, ipID, data)
		} else {
			ip = ipv4Packet(src, dst, c.ipOpts, len(parts) > 1, p[0], more, ipID, data)
		}
		eth := make([]byte, 14, 14+len(ip))
		copy(eth, r.podMAC)
		copy(eth[6:], r.nodeMAC)
		binary.BigEndian.PutUint16(eth[12:], map[bool]uint16{false: unix.ETH_P_IP, true: unix.ETH_P_IPV6}[c.v6])
		out = append(out, append(eth, ip...))
	}
	return out
}

// tcpSegment is a TCP header (no options) and payload with a valid checksum.
func tcpSegment(src, dst netip.Addr, sport, dport uint16, flags byte, payload []byte) []byte {
	seg := make([]byte, 20, 20+len(payload))
	binary.BigEndian.PutUint16(seg[0:], sport)
	binary.BigEndian.PutUint16(seg[2:], dport)
	binary.BigEndian.PutUint32(seg[4:], uint32(sport)<<16|0x1234)
	if flags&tcpACK != 0 {
		binary.BigEndian.PutUint32(seg[8:], 0x5678)
	}
	seg[12] = 5 << 4
	seg[13] = flags
	binary.BigEndian.PutUint16(seg[14:], 65535)
	seg = append(seg, payload...)
	var pseudo []byte
	if src.Is4() {
		s, d := src.As4(), dst.As4()
		pseudo = append(append(append(pseudo, s[:]...), d[:]...), 0, unix.IPPROTO_TCP, byte(len(seg)>>8), byte(len(seg)))
	} else {
		s, d := src.As16(), dst.As16()
		pseudo = append(append(append(pseudo, s[:]...), d[:]...), 0, 0, byte(len(seg)>>8), byte(len(seg)), 0, 0, 0, unix.IPPROTO_TCP)
	}
	binary.BigEndian.PutUint16(seg[16:], checksum(append(pseudo, seg...)))
	return seg
}

func ipv4Packet(src, dst netip.Addr, optLen int, frag bool, offset int, more bool, id uint16, data []byte) []byte {
	hl := 20 + optLen
	ip := make([]byte, hl, hl+len(data))
	ip[0] = 0x40 | byte(hl/4)
	binary.BigEndian.PutUint16(ip[2:], uint16(hl+len(data)))
	binary.BigEndian.PutUint16(ip[4:], id)
	if frag {
		fo := uint16(offset / 8)
		if more {
			fo |= 0x2000
		}
		binary.BigEndian.PutUint16(ip[6:], fo)
	}
	ip[8], ip[9] = 64, unix.IPPROTO_TCP
	for i := 20; i < hl; i++ {
		ip[i] = 1 // NOP
	}
	s, d := src.As4(), dst.As4()
	copy(ip[12:], s[:])
	copy(ip[16:], d[:])
	binary.BigEndian.PutUint16(ip[10:], checksum(ip))
	return append(ip, data...)
}

// ipv6Packet chains the extension headers ext (then a fragment header when
// frag) before data.
func ipv6Packet(src, dst netip.Addr, ext []uint8, frag bool, offset int, more bool, id uint16, data []byte) []byte {
	hdrs := append([]uint8{}, ext...)
	if frag {
		hdrs = append(hdrs, 44)
	}
	var chain []byte
	for i, h := range hdrs {
		next := uint8(unix.IPPROTO_TCP)
		if i+1 < len(hdrs) {
			next = hdrs[i+1]
		}
		switch h {
		case 44:
			fo := uint16(offset/8) << 3
			if more {
				fo |= 1
			}
			fh := []byte{next, 0, byte(fo >> 8), byte(fo), 0, 0, byte(id >> 8), byte(id)}
			chain = append(chain, fh...)
		case 43:
			chain = append(chain, next, 0, 0, 0, 0, 0, 0, 0)
		default: // options: one PadN filling the 8 bytes
			chain = append(chain, next, 0, 1, 4, 0, 0, 0, 0)
		}
	}
	ip := make([]byte, 40, 40+len(chain)+len(data))
	ip[0] = 0x60
	binary.BigEndian.PutUint16(ip[4:], uint16(len(chain)+len(data)))
	ip[6], ip[7] = unix.IPPROTO_TCP, 64
	if len(hdrs) > 0 {
		ip[6] = hdrs[0]
	}
	s, d := src.As16(), dst.As16()
	copy(ip[8:], s[:])
	copy(ip[24:], d[:])
	return append(append(ip, chain...), data...)
}

// checksum is the Internet checksum of b, 0 when b holds a valid one.
func checksum(b []byte) uint16 {
	var sum uint32
	for i := 0; i+1 < len(b); i += 2 {
		sum += uint32(binary.BigEndian.Uint16(b[i:]))
	}
	if len(b)%2 == 1 {
		sum += uint32(b[len(b)-1]) << 8
	}
	for sum > 0xffff {
		sum = (sum & 0xffff) + sum>>16
	}
	return ^uint16(sum)
}

// synAcks sorts the SYN-ACKs of rs by which listener sent them.
func synAcks(rs []reply) (sidecar, app int) {
	for _, r := range rs {
		if r.flags&(tcpSYN|tcpACK) != tcpSYN|tcpACK {
			continue
		}
		switch r.mss {
		case sidecarMSS:
			sidecar++
		case appMSS:
			app++
		}
	}
	return sidecar, app
}

func (c crafted) String() string {
	return fmt.Sprintf("v6=%v flags=%#x payload=%d ipopts=%d ext=%v frag=%d overlap=%v", c.v6, c.flags, c.payload, c.ipOpts, c.ext, c.fragAt, c.overlap)
}
