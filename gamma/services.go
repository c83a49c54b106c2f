package gamma

import (
	"cmp"
	"net/netip"
	"slices"

	"github.com/sluicemesh/sluice/redirect"
)

// ServiceRoute is a Service's port resolved to its ready endpoints, for the
// pods that ask for every Service (install --resolve-services).
type ServiceRoute struct {
	Namespace string
	redirect.Route
}

// Unresolved counts the Service ports Services leaves to kube-proxy, by
// reason.
type Unresolved struct {
	NoEndpoint    int // no ready endpoint: kube-proxy refuses them as it would
	TooManyEndpts int // more than redirect.MaxBackends ready endpoints
	// Session affinity (ClientIP) or internalTrafficPolicy Local: what
	// kube-proxy does for them, the kernel's routes do not.
	KubeProxyOnly int
}

// Services resolves every Service with a cluster IP: each TCP port of each
// of its cluster IPs becomes a round-robin route over the port's ready,
// not terminating, endpoints in that IP's family, equally weighted. Ports
// that routed already names (a Gateway API route's parents) are left out:
// the route's weights win; so are Services with session affinity or a
// Local internal traffic policy, which kube-proxy keeps. Sorted by
// namespace, then address.
func Services(in Input, routed map[netip.AddrPort]Ref) ([]ServiceRoute, Unresolved) {
	c := newCluster(in)
	var out []ServiceRoute
	var un Unresolved
	for _, svc := range in.Services {
		if svc.Spec.SessionAffinity == "ClientIP" || svc.Spec.InternalTrafficPolicy == "Local" {
			un.KubeProxyOnly++
			continue
		}
		for _, a := range clusterIPs(svc) {
			for _, sp := range svc.Spec.Ports {
				at := netip.AddrPortFrom(a, uint16(sp.Port))
				if cmp.Or(sp.Protocol, "TCP") != "TCP" || routed[at].Name != "" {
					continue
				}
				eps := c.ready(svc, sp.Port, a)
				switch {
				case len(eps) == 0:
					un.NoEndpoint++
					continue
				case len(eps) > redirect.MaxBackends:
					un.TooManyEndpts++
					continue
				}
				r := redirect.Route{Service: at, Mode: redirect.ModeRoundRobin}
				for _, ep := range eps {
					r.Backends = append(r.Backends, redirect.Backend{Address: ep.Addr(), Port: ep.Port(), Weight: 1})
				}
				out = append(out, ServiceRoute{svc.Metadata.Namespace, r})
			}
		}
	}
	slices.SortFunc(out, func(a, b ServiceRoute) int {
		return cmp.Or(cmp.Compare(a.Namespace, b.Namespace), a.Service.Compare(b.Service))
	})
	return out, un
}
