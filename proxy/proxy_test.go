package proxy

import (
	"encoding/binary"
	"net/netip"
	"testing"

	"golang.org/x/sys/unix"
)

func TestParseSockaddr(t *testing.T) {
	in4 := make([]byte, unix.SizeofSockaddrInet4)
	binary.NativeEndian.PutUint16(in4, unix.AF_INET)
	binary.BigEndian.PutUint16(in4[2:], 8080)
	copy(in4[4:], []byte{198, 18, 2, 2})

	in6 := make([]byte, unix.SizeofSockaddrInet6)
	binary.NativeEndian.PutUint16(in6, unix.AF_INET6)
	binary.BigEndian.PutUint16(in6[2:], 443)
	a6 := netip.MustParseAddr("2001:2:0:2::2").As16()
	copy(in6[8:], a6[:])

	tests := []struct {
		name    string
		in      []byte
		want    string
		wantErr bool
	}{
		{"ipv4", in4, "198.18.2.2:8080", false},
		{"ipv6", in6, "[2001:2:0:2::2]:443", false},
		{"ipv6 family, ipv4 length", append([]byte{}, in6[:16]...), "", true},
		{"empty", nil, "", true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := parseSockaddr(tt.in)
			if (err != nil) != tt.wantErr {
				t.Fatalf("err = %v, wantErr %v", err, tt.wantErr)
			}
			if err == nil && got.String() != tt.want {
				t.Errorf("got %s, want %s", got, tt.want)
			}
		})
	}
}

func TestIsLoop(t *testing.T) {
	ap := netip.MustParseAddrPort
	tests := []struct {
		dst, listen, local string
		want               bool
	}{
		// Outbound listener on loopback: only loopback:15001 is itself.
		{"127.0.0.1:15001", "127.0.0.1:15001", "127.0.0.1:15001", true},
		{"198.18.2.2:15001", "127.0.0.1:15001", "127.0.0.1:15001", false},
		{"[::ffff:127.0.0.1]:15001", "127.0.0.1:15001", "127.0.0.1:15001", true},
		{"198.18.2.2:8080", "127.0.0.1:15001", "127.0.0.1:15001", false},
		// Inbound wildcard listener: the pod's own address on 15006 is itself,
		// the pod's address on an app port is the normal inbound case.
		{"198.18.1.2:15006", "0.0.0.0:15006", "198.18.1.2:15006", true},
		{"198.18.1.2:8080", "0.0.0.0:15006", "198.18.1.2:8080", false},
		{"[2001:2:0:1::2]:15006", "[::]:15006", "[2001:2:0:1::2]:15006", true},
		{"198.18.9.9:15006", "0.0.0.0:15006", "198.18.1.2:15006", false},
	}
	for _, tt := range tests {
		if got := isLoop(ap(tt.dst), ap(tt.listen), ap(tt.local)); got != tt.want {
			t.Errorf("isLoop(%s, listener %s, local %s) = %v, want %v", tt.dst, tt.listen, tt.local, got, tt.want)
		}
	}
}
