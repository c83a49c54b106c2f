package loader

import (
	"net/netip"
	"reflect"
	"strings"
	"testing"
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

func TestCaptureEntriesRoundTrip(t *testing.T) {
	c := Capture{
		OutboundPort: 15001, InboundPort: 15006, ProxyUID: 1337, ProxyGID: 1338,
		IncludeCIDRs:         []netip.Prefix{netip.MustParsePrefix("0.0.0.0/0"), netip.MustParsePrefix("198.18.0.0/15"), netip.MustParsePrefix("2001:2::/48")},
		ExcludeCIDRs:         []netip.Prefix{netip.MustParsePrefix("198.18.7.7/32"), netip.MustParsePrefix("::/0")},
		IncludeOutboundPorts: []uint16{9090},
		ExcludeOutboundPorts: []uint16{22, 9090},
		InboundAllPorts:      true,
		ExcludeInboundPorts:  []uint16{15001, 15006},
	}
	e := c.entries()
	if e.include[0].Prefixlen != 96 || e.include[1].Prefixlen != 96+15 || e.include[2].Prefixlen != 48 {
		t.Errorf("IPv4 prefixes must be stored as 96+len: %+v", e.include)
	}
	if e.ports[9090] != 3 {
		t.Errorf("port 9090 flags = %d, want include|exclude", e.ports[9090])
	}
	got := e.capture()
	want := c
	want.ExcludeCIDRs = []netip.Prefix{netip.MustParsePrefix("198.18.7.7/32"), netip.MustParsePrefix("::/0")}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("round trip\n got %+v\nwant %+v", got, want)
	}
}

func TestTargetOf(t *testing.T) {
	mount, err := Cgroup2Mount()
	if err != nil {
		t.Skipf("no cgroup2 mount: %v", err)
	}
	tests := []struct {
		cgroup, pinDir string
		want           Target
		wantErr        string
	}{
		{cgroup: mount + "/kubepods/pod1/", want: Target{Cgroup: mount + "/kubepods/pod1", PodID: "kubepods_pod1", PinDir: DefaultPinRoot + "/kubepods_pod1"}},
		{cgroup: mount + "/a", pinDir: "/sys/fs/bpf/x", want: Target{Cgroup: mount + "/a", PodID: "a", PinDir: "/sys/fs/bpf/x"}},
		{cgroup: mount, wantErr: "is the root of the cgroup v2 hierarchy"},
		{cgroup: "/etc", wantErr: "is not a cgroup v2 directory"},
		{cgroup: "", wantErr: "no cgroup given"},
	}
	for _, tt := range tests {
		got, err := TargetOf(tt.cgroup, tt.pinDir)
		if tt.wantErr != "" {
			if err == nil || !contains(err.Error(), tt.wantErr) {
				t.Errorf("TargetOf(%q): err %v, want %q", tt.cgroup, err, tt.wantErr)
			}
			continue
		}
		if err != nil || got != tt.want {
			t.Errorf("TargetOf(%q) = %+v, %v; want %+v", tt.cgroup, got, err, tt.want)
		}
	}
}

func contains(s, sub string) bool { return strings.Contains(s, sub) }
