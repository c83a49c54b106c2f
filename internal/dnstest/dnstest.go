// Package dnstest builds and reads the DNS messages Sluice's tests send and
// answer: one question, and records of its type that point back at its
// name. It is no resolver: it reads only what it writes.
package dnstest

import (
	"encoding/binary"
	"fmt"
	"io"
	"net/netip"
	"strings"
)

// Query types the tests ask.
const (
	TypeA    = 1
	TypeAAAA = 28
)

// Response codes the tests answer.
const (
	RcodeNoError  = 0
	RcodeNXDomain = 3
)

// Query is a query for name of qtype (class IN), RD set.
func Query(id uint16, name string, qtype uint16) []byte {
	msg := binary.BigEndian.AppendUint16(nil, id)
	msg = append(msg, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0)
	for _, label := range strings.Split(strings.TrimSuffix(name, "."), ".") {
		msg = append(msg, byte(len(label)))
		msg = append(msg, label...)
	}
	msg = append(msg, 0)
	msg = binary.BigEndian.AppendUint16(msg, qtype)
	return binary.BigEndian.AppendUint16(msg, 1)
}

// QueryEDNS is Query with an EDNS OPT record: the UDP answer size the asker
// takes, and padding bytes (the Padding option) to make the query as large
// as a test needs.
func QueryEDNS(id uint16, name string, qtype, udpSize uint16, padding int) []byte {
	msg := Query(id, name, qtype)
	binary.BigEndian.PutUint16(msg[10:], 1) // ARCOUNT
	msg = append(msg, 0)                    // the root name
	msg = binary.BigEndian.AppendUint16(msg, 41)
	msg = binary.BigEndian.AppendUint16(msg, udpSize)
	msg = append(msg, 0, 0, 0, 0) // extended RCODE, version, flags
	msg = binary.BigEndian.AppendUint16(msg, uint16(4+padding))
	msg = binary.BigEndian.AppendUint16(msg, 12) // Padding
	msg = binary.BigEndian.AppendUint16(msg, uint16(padding))
	return append(msg, make([]byte, padding)...)
}

// EDNSSize is the UDP answer size a query's OPT record (right after its
// question, as QueryEDNS writes it) says the asker takes; 512, DNS's own,
// without one.
func EDNSSize(q []byte) uint16 {
	_, _, end, ok := Question(q)
	if !ok || binary.BigEndian.Uint16(q[10:]) == 0 || end+11 > len(q) || q[end] != 0 ||
		binary.BigEndian.Uint16(q[end+1:]) != 41 {
		return 512
	}
	return max(512, binary.BigEndian.Uint16(q[end+3:]))
}

// Question reads a message's one question: its name (lower case, no final
// dot), type, and where it ends.
func Question(m []byte) (name string, qtype uint16, end int, ok bool) {
	if len(m) < 12 || binary.BigEndian.Uint16(m[4:]) != 1 {
		return "", 0, 0, false
	}
	var labels []string
	i := 12
	for i < len(m) && m[i] != 0 {
		n := int(m[i])
		if n > 63 || i+1+n > len(m) {
			return "", 0, 0, false
		}
		labels = append(labels, string(m[i+1:i+1+n]))
		i += 1 + n
	}
	if i+5 > len(m) {
		return "", 0, 0, false
	}
	return strings.ToLower(strings.Join(labels, ".")), binary.BigEndian.Uint16(m[i+1:]), i + 5, true
}

// Answer answers query q (nil when q has no question): the question echoed
// with QR, AA and RA set, rcode, TC when truncated, then one record of the
// question's type for each rdata, by pointer to the question's name, TTL 30.
func Answer(q []byte, rcode byte, truncated bool, rdata ...[]byte) []byte {
	_, qtype, end, ok := Question(q)
	if !ok {
		return nil
	}
	a := append([]byte(nil), q[:end]...)
	a[2] |= 0x84 // QR, AA
	if truncated {
		a[2] |= 0x02
	}
	a[3] = 0x80 | rcode&0x0f // RA
	binary.BigEndian.PutUint16(a[6:], uint16(len(rdata)))
	binary.BigEndian.PutUint16(a[8:], 0)
	binary.BigEndian.PutUint16(a[10:], 0)
	for _, rd := range rdata {
		a = append(a, 0xc0, 12) // the question's name
		a = binary.BigEndian.AppendUint16(a, qtype)
		a = append(a, 0, 1, 0, 0, 0, 30)
		a = binary.BigEndian.AppendUint16(a, uint16(len(rd)))
		a = append(a, rd...)
	}
	return a
}

// Records are the addresses in an answer Answer wrote, and whether it was
// truncated; an error for another response code or a record Answer does
// not write.
func Records(m []byte) (addrs []netip.Addr, truncated bool, err error) {
	_, _, i, ok := Question(m)
	if !ok {
		return nil, false, fmt.Errorf("no DNS answer: %x", m)
	}
	if m[3]&0x0f != 0 {
		return nil, false, fmt.Errorf("answer code %d", m[3]&0x0f)
	}
	for range binary.BigEndian.Uint16(m[6:]) {
		if i+12 > len(m) || m[i] != 0xc0 {
			return nil, false, fmt.Errorf("a record this package does not write: %x", m[i:])
		}
		n := int(binary.BigEndian.Uint16(m[i+10:]))
		if i+12+n > len(m) {
			return nil, false, fmt.Errorf("a record cut short: %x", m[i:])
		}
		if a, ok := netip.AddrFromSlice(m[i+12 : i+12+n]); ok {
			addrs = append(addrs, a)
		}
		i += 12 + n
	}
	return addrs, m[2]&0x02 != 0, nil
}

// ReadTCP reads one length-prefixed message, as DNS over TCP sends it.
func ReadTCP(r io.Reader) ([]byte, error) {
	var n uint16
	if err := binary.Read(r, binary.BigEndian, &n); err != nil {
		return nil, err
	}
	m := make([]byte, n)
	_, err := io.ReadFull(r, m)
	return m, err
}

// WriteTCP writes m length-prefixed.
func WriteTCP(w io.Writer, m []byte) error {
	_, err := w.Write(append(binary.BigEndian.AppendUint16(nil, uint16(len(m))), m...))
	return err
}
