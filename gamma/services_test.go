package gamma

import (
	"fmt"
	"net/netip"
	"testing"

	"github.com/sluicemesh/sluice/redirect"
)

// Every Service port with a ready endpoint resolves to its ready, not
// terminating, endpoints; a routed parent keeps its route's weights; no
// endpoint, too many, a headless or a UDP Service, session affinity and a
// Local internal traffic policy are left to kube-proxy.
func TestServicesResolved(t *testing.T) {
	in := shop()
	in.Slices[0] = endpoints("web-v1", 8080, "198.18.240.21", "!198.18.240.22", "~198.18.240.24")
	in.Services = append(in.Services, service("empty", "198.19.0.13", 80), service("headless", "None", 80))
	in.Services = append(in.Services, service("dns", "198.19.0.14", 53))
	in.Services[len(in.Services)-1].Spec.Ports[0].Protocol = "UDP"
	big := service("big", "198.19.0.15", 80)
	var addrs []string
	for i := range redirect.MaxBackends + 1 {
		addrs = append(addrs, fmt.Sprintf("198.18.241.%d", i+1))
	}
	in.Services = append(in.Services, big, service("sticky", "198.19.0.16", 80), service("local", "198.19.0.17", 80))
	in.Services[len(in.Services)-2].Spec.SessionAffinity = "ClientIP"
	in.Services[len(in.Services)-1].Spec.InternalTrafficPolicy = "Local"
	in.Slices = append(in.Slices, endpoints("sticky", 8080, "198.18.242.1"), endpoints("local", 8080, "198.18.242.2"))
	in.Slices = append(in.Slices, endpoints("big", 8080, addrs...))
	in.Routes = []*Route{httpRoute("web", 0, "web", backend("web-v1", 80, 50), backend("web-v2", 80, 50))}

	res := Translate(in)
	got, un := Services(in, res.From)
	if un.NoEndpoint != 1 || un.TooManyEndpts != 1 || un.KubeProxyOnly != 2 {
		t.Errorf("unresolved %+v, want 1 with no endpoint (empty), 1 with too many (big), 2 kube-proxy's (sticky, local)", un)
	}
	want := map[netip.AddrPort]string{
		netip.MustParseAddrPort("198.19.0.11:80"): "198.18.240.21:8080",
		netip.MustParseAddrPort("198.19.0.12:80"): "198.18.240.23:8080",
	}
	if len(got) != len(want) {
		t.Fatalf("resolved %v, want %v", got, want)
	}
	for _, r := range got {
		if r.Namespace != "shop" || r.Mode != redirect.ModeRoundRobin || len(r.Backends) != 1 || r.Backends[0].AddrPort().String() != want[r.Service] {
			t.Errorf("%s resolved to %+v, want %s alone", r.Service, r.Route, want[r.Service])
		}
		if err := r.Validate(true); err != nil {
			t.Error(err)
		}
	}
}
