package probe

import (
	"net/netip"
	"strings"
	"testing"

	"github.com/sluicemesh/sluice/redirect"
)

// The probe's address must be one capture sends to the sidecar: exclusions
// win over -i as they do in the kernel, and kernel-only ranges and ports
// never reach the sidecar.
func TestAddress(t *testing.T) {
	pfx := netip.MustParsePrefix
	for _, tc := range []struct {
		name string
		plan redirect.Plan
		want string // "" for an error
	}{
		{"everything", redirect.Plan{IncludeAllCIDRs: true}, "198.19.255.254:15002"},
		{"include list", redirect.Plan{IncludeCIDRs: []netip.Prefix{pfx("198.18.4.0/24")}}, "198.18.4.255:15002"},
		{"exclusion beats a narrower include", redirect.Plan{IncludeCIDRs: []netip.Prefix{pfx("198.18.4.0/24"), pfx("198.18.8.0/24")}, ExcludeCIDRs: []netip.Prefix{pfx("198.18.0.0/21")}}, "198.18.8.255:15002"},
		{"kernel-only range skipped", redirect.Plan{IncludeAllCIDRs: true, KernelOnlyCIDRs: []netip.Prefix{pfx("198.19.0.0/16")}}, ""},
		{"excluded port", redirect.Plan{IncludeAllCIDRs: true, ExcludeOutboundPorts: []uint16{15002}}, ""},
		{"kernel-only port", redirect.Plan{IncludeAllCIDRs: true, KernelOnlyPorts: []uint16{15002}}, ""},
		{"nothing captured", redirect.Plan{}, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := Address(tc.plan, 15002)
			switch {
			case tc.want == "" && err == nil:
				t.Errorf("picked %s, want an error", got)
			case tc.want != "" && (err != nil || got.String() != tc.want):
				t.Errorf("picked %s (%v), want %s", got, err, tc.want)
			case err != nil && strings.Contains(err.Error(), "\n"):
				t.Errorf("error %q is not one line", err)
			}
		})
	}
}
