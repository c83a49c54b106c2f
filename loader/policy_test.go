package loader

import (
	"net/netip"
	"reflect"
	"testing"

	"github.com/sluicemesh/sluice/bpf"
	"github.com/sluicemesh/sluice/redirect"
)

func TestAddr6RoundTrip(t *testing.T) {
	for _, s := range []string{"198.18.2.2", "0.0.0.0", "2001:2::1", "::1", "::"} {
		a := netip.MustParseAddr(s)
		if got := AddrFrom6(Addr6(a)); got != a {
			t.Errorf("%s came back as %s", a, got)
		}
	}
	// The BPF side compares the last word with the IPv4 address as it sits
	// in memory (network order) and the third with ::ffff.
	w := Addr6(netip.MustParseAddr("198.18.2.2")).W
	b := [4]byte{}
	for i := range b {
		b[i] = byte(w[3] >> (8 * i))
	}
	if b != [4]byte{198, 18, 2, 2} || w[0] != 0 || w[1] != 0 || w[2] != 0xffff0000 {
		t.Errorf("unexpected words %#x", w)
	}
}

func TestPlanEntriesRoundTrip(t *testing.T) {
	p := redirect.Plan{
		OutboundPort: 15001, InboundPort: 15006, ProxyUID: 1337, ProxyGID: 1338,
		IncludeCIDRs:         []netip.Prefix{netip.MustParsePrefix("0.0.0.0/0"), netip.MustParsePrefix("198.18.0.0/15"), netip.MustParsePrefix("2001:2::/48")},
		ExcludeCIDRs:         []netip.Prefix{netip.MustParsePrefix("198.18.7.7/32"), netip.MustParsePrefix("::/0")},
		IncludeOutboundPorts: []uint16{9090},
		ExcludeOutboundPorts: []uint16{0, 22, 63, 64, 9090, 65535},
		InboundAllPorts:      true,
		ExcludeInboundPorts:  []uint16{15001, 15006},
		SidecarPorts:         []uint16{15001, 15006, 15090},
	}.Normalize()
	e := entriesOf(p, 7, 1)
	if k := e.include[0]; k.Prefixlen != 48 || k.Family != afInet || k.Slot != 1 || k.Pod != 7 {
		t.Errorf("0.0.0.0/0 is key %+v, want prefixlen 48 (pod, slot and family only), IPv4, slot 1, pod 7", k)
	}
	if k := e.exclude[1]; k.Prefixlen != 48 || k.Family != afInet6 {
		t.Errorf("::/0 is key %+v, want prefixlen 48 and family IPv6: it must never cover IPv4", k)
	}
	first := bpf.SluicePortKey{Pod: 7, Slot: 1, Set: uint8(bpf.SluicePortSetPORT_OUT_EXCLUDE), Word: 0}
	if got := e.ports[first]; got != 1|1<<22|1<<63 {
		t.Errorf("first word of excluded ports = %#x, want bits 0, 22 and 63", got)
	}
	// Only words with a port in them are stored: 0-63, 64, 9090, 65535
	// (excluded), 9090 (included), 15001 and 15006 (inbound, excluded).
	if len(e.ports) != 6 {
		t.Errorf("%d port words stored, want 6: %v", len(e.ports), e.ports)
	}
	if got := e.plan(); !reflect.DeepEqual(got, p) {
		t.Errorf("round trip\n got %+v\nwant %+v", got, p)
	}
}
