package dnstest

import (
	"bytes"
	"net/netip"
	"slices"
	"testing"
)

// What Answer writes, Records reads back; Question reads what Query writes.
func TestRoundTrip(t *testing.T) {
	q := Query(0x5151, "Web.Test.", TypeA)
	if name, qtype, end, ok := Question(q); !ok || name != "web.test" || qtype != TypeA || end != len(q) {
		t.Fatalf("Question(Query) = %q %d %d %v", name, qtype, end, ok)
	}
	want := []netip.Addr{netip.MustParseAddr("198.18.77.7"), netip.MustParseAddr("198.18.77.8")}
	a := Answer(q, RcodeNoError, false, want[0].AsSlice(), want[1].AsSlice())
	if a[0] != q[0] || a[1] != q[1] {
		t.Errorf("the answer's ID %x, want the query's %x", a[:2], q[:2])
	}
	got, truncated, err := Records(a)
	if err != nil || truncated || !slices.Equal(got, want) {
		t.Errorf("Records = %v %v %v, want %v", got, truncated, err, want)
	}
	if _, truncated, err := Records(Answer(q, RcodeNoError, true)); err != nil || !truncated {
		t.Errorf("a truncated answer: truncated %v, %v", truncated, err)
	}
	if _, _, err := Records(Answer(q, RcodeNXDomain, false)); err == nil {
		t.Error("NXDOMAIN read as an answer")
	}
	if Answer([]byte{1, 2, 3}, 0, false) != nil {
		t.Error("answered no question")
	}
	e := QueryEDNS(0x5152, "big.test", TypeA, 4096, 600)
	if len(e) <= 512 || EDNSSize(e) != 4096 || EDNSSize(q) != 512 {
		t.Errorf("an EDNS query of %d bytes: size %d (without EDNS: %d), want over 512 bytes, 4096 and 512", len(e), EDNSSize(e), EDNSSize(q))
	}
	if name, _, _, ok := Question(e); !ok || name != "big.test" {
		t.Errorf("Question(QueryEDNS) = %q %v", name, ok)
	}
	var buf bytes.Buffer
	if err := WriteTCP(&buf, a); err != nil {
		t.Fatal(err)
	}
	if m, err := ReadTCP(&buf); err != nil || !bytes.Equal(m, a) {
		t.Errorf("ReadTCP(WriteTCP) = %x, %v", m, err)
	}
}
