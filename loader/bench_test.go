package loader

import (
	"net/netip"
	"testing"

	"github.com/sluicemesh/sluice/redirect"
)

// BenchmarkUpdates measures live changes to a real install, as the CLI makes
// them: a new policy (Install rerun with another plan: the idle slot
// written, then made the active one) and a route set (ChangeRoutes: the
// route written to the idle slot, then that slot made active).
func BenchmarkUpdates(b *testing.B) {
	target := install(b, podCgroups(b, "")[0], "")
	b.Run("policy", func(b *testing.B) {
		plans := [2]redirect.Plan{testPlan(), testPlan()}
		plans[1].ExcludeOutboundPorts = []uint16{22}
		i := 0
		for b.Loop() {
			i++
			if _, err := Install(target, plans[i%2], nil, quiet); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("route", func(b *testing.B) {
		svc := netip.MustParseAddrPort("198.19.0.10:80")
		v1, v2 := netip.MustParseAddr("198.18.1.2"), netip.MustParseAddr("198.18.2.2")
		i := uint32(0)
		for b.Loop() {
			i++
			r := redirect.Route{Service: svc, Backends: []redirect.Backend{
				{Address: v1, Port: 8080, Weight: 100 - i%100}, {Address: v2, Port: 8080, Weight: i % 100}}}
			if err := ChangeRoutes(target, RouteChange{Set: []redirect.Route{r}}); err != nil {
				b.Fatal(err)
			}
		}
	})
}
