package redirect

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
