// Package gamma turns Gateway API routes whose parent is a Service (the
// GAMMA mesh pattern) into the kernel's routes: connections to the parent
// Service's cluster IP and port are split over the ready endpoints of the
// backend Services, by the route's weights. Pure: the cluster's objects
// in, routes and the problems of the routes it cannot express out.
package gamma

import (
	"cmp"
	"fmt"
	"math"
	"net/netip"
	"slices"
	"strings"

	"github.com/sluicemesh/sluice/redirect"
)

// Input is the part of the cluster the routes depend on.
type Input struct {
	Services []*Service
	Slices   []*EndpointSlice
	Routes   []*Route // HTTPRoutes and TCPRoutes
}

// Ref names a route object: Kind namespace/name.
type Ref struct{ Kind, Namespace, Name string }

func (r Ref) String() string { return r.Kind + " " + r.Namespace + "/" + r.Name }

// Problem is why a route, or one of its parents, is not in the kernel.
// A route with a problem is left out whole, never half-applied.
type Problem struct {
	Route  Ref
	Reason string
}

// Result is what the kernel should hold, the same for every captured pod:
// one redirect.Route per parent Service address and port, with the route
// object it comes from, and the problems.
type Result struct {
	Routes   []redirect.Route
	From     map[netip.AddrPort]Ref
	Problems []Problem
}

// route is one route object, HTTP or TCP, as the translation reads it.
type route struct {
	ref      Ref
	created  int64 // unix seconds: the oldest route of a parent port wins
	parents  []ParentRef
	backends []BackendRef
	problem  string // set when the route holds what the kernel cannot do
}

// Translate computes the kernel's routes from in.
func Translate(in Input) Result {
	c := newCluster(in)
	var routes []route
	for _, r := range in.Routes {
		routes = append(routes, fromRoute(r))
	}
	// Gateway API's conflict rule: the oldest route wins a parent port,
	// then the first by namespace/name.
	slices.SortFunc(routes, func(a, b route) int {
		return cmp.Or(cmp.Compare(a.created, b.created), cmp.Compare(a.ref.Namespace, b.ref.Namespace),
			cmp.Compare(a.ref.Name, b.ref.Name), cmp.Compare(a.ref.Kind, b.ref.Kind))
	})
	res := Result{From: map[netip.AddrPort]Ref{}}
	for _, r := range routes {
		if r.problem != "" {
			res.Problems = append(res.Problems, Problem{r.ref, r.problem})
			continue
		}
		out, err := c.translate(r)
		if err == nil {
			for _, kr := range out {
				if other, taken := res.From[kr.Service]; taken {
					err = fmt.Errorf("its parent %s is already routed by the older %s", kr.Service, other)
					break
				}
			}
		}
		if err != nil {
			res.Problems = append(res.Problems, Problem{r.ref, err.Error()})
			continue
		}
		for _, kr := range out {
			res.From[kr.Service] = r.ref
			res.Routes = append(res.Routes, kr)
		}
	}
	slices.SortFunc(res.Routes, func(a, b redirect.Route) int { return a.Service.Compare(b.Service) })
	return res
}

// fromRoute reads an HTTPRoute or TCPRoute, saying what in it the kernel
// cannot do.
func fromRoute(r *Route) route {
	out := route{ref: Ref{r.Kind, r.Metadata.Namespace, r.Metadata.Name}, created: r.Metadata.CreationTimestamp.Unix(), parents: r.Spec.ParentRefs}
	// The kernel picks a backend when the connection is made, before any
	// request: one rule matching every request, without filters, is what
	// it can do.
	if len(r.Spec.Rules) != 1 {
		out.problem = fmt.Sprintf("%d rules: the kernel splits connections, not requests, so it takes one rule that matches every request", len(r.Spec.Rules))
		return out
	}
	rule := r.Spec.Rules[0]
	for _, m := range rule.Matches {
		if !matchesAll(m) {
			out.problem = "its rule matches some requests only (path, headers, query or method): the kernel splits connections, not requests"
			return out
		}
	}
	if len(rule.Filters) > 0 || len(rule.Timeouts) > 0 || len(rule.Retry) > 0 || len(rule.SessionPersistence) > 0 {
		out.problem = "its rule has filters, timeouts, retries or session persistence: per-request features the kernel does not have"
		return out
	}
	for _, b := range rule.BackendRefs {
		if len(b.Filters) > 0 {
			out.problem = fmt.Sprintf("backend %s has filters: a per-request feature the kernel does not have", b.Name)
			return out
		}
	}
	out.backends = rule.BackendRefs
	return out
}

// matchesAll tells whether m matches every request: no condition but a
// path prefix of "/".
func matchesAll(m Match) bool {
	if len(m.Headers) > 0 || len(m.QueryParams) > 0 || m.Method != nil {
		return false
	}
	if m.Path == nil {
		return true
	}
	return cmp.Or(ptr(m.Path.Type), "PathPrefix") == "PathPrefix" && cmp.Or(ptr(m.Path.Value), "/") == "/"
}

// cluster indexes the Services and their ready endpoints.
type cluster struct {
	services map[[2]string]*Service
	slices   map[[2]string][]*EndpointSlice // by namespace, Service name
}

func newCluster(in Input) cluster {
	c := cluster{services: map[[2]string]*Service{}, slices: map[[2]string][]*EndpointSlice{}}
	for _, s := range in.Services {
		c.services[[2]string{s.Metadata.Namespace, s.Metadata.Name}] = s
	}
	for _, s := range in.Slices {
		if svc := s.Metadata.Labels[LabelServiceName]; svc != "" {
			k := [2]string{s.Metadata.Namespace, svc}
			c.slices[k] = append(c.slices[k], s)
		}
	}
	return c
}

// isService tells whether a reference's group and kind are core's Service
// (the defaults of a backend reference; a parent's must be said).
func isService(group, kind *string, kindDefault string) bool {
	return ptr(group) == "" && cmp.Or(ptr(kind), kindDefault) == "Service"
}

// translate is the kernel routes of r: one per parent Service address and
// port.
func (c cluster) translate(r route) ([]redirect.Route, error) {
	var parents []*Service
	var ports []*int32
	for _, p := range r.parents {
		if !isService(p.Group, p.Kind, "Gateway") {
			continue // a Gateway's route: the gateway's to carry out
		}
		ns := cmp.Or(ptr(p.Namespace), r.ref.Namespace)
		svc := c.services[[2]string{ns, p.Name}]
		if svc == nil {
			return nil, fmt.Errorf("parent Service %s/%s does not exist", ns, p.Name)
		}
		parents, ports = append(parents, svc), append(ports, p.Port)
	}
	if len(parents) == 0 {
		return nil, nil
	}
	var out []redirect.Route
	for i, svc := range parents {
		addrs := clusterIPs(svc)
		if len(addrs) == 0 {
			return nil, fmt.Errorf("parent Service %s/%s has no cluster IP (headless, or ExternalName)", svc.Metadata.Namespace, svc.Metadata.Name)
		}
		for _, sp := range svc.Spec.Ports {
			if cmp.Or(sp.Protocol, "TCP") != "TCP" || ports[i] != nil && *ports[i] != sp.Port {
				continue
			}
			for _, a := range addrs {
				backends, err := c.backends(r, a)
				if err != nil {
					return nil, err
				}
				out = append(out, redirect.Route{Service: netip.AddrPortFrom(a, uint16(sp.Port)), Mode: redirect.ModeRoundRobin, Backends: backends})
			}
		}
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("no TCP port of its parent Services is the parentRef's port")
	}
	return out, nil
}

func clusterIPs(svc *Service) []netip.Addr {
	var out []netip.Addr
	ips := svc.Spec.ClusterIPs
	if len(ips) == 0 {
		ips = []string{svc.Spec.ClusterIP}
	}
	for _, ip := range ips {
		if a, err := netip.ParseAddr(ip); err == nil {
			out = append(out, a)
		}
	}
	return out
}

// backends are the ready endpoints of r's backend Services in family's IP
// family, each backend Service's weight shared by its endpoints.
func (c cluster) backends(r route, family netip.Addr) ([]redirect.Backend, error) {
	type share struct {
		weight    float64
		endpoints []netip.AddrPort
	}
	var shares []share
	for _, b := range r.backends {
		if !isService(b.Group, b.Kind, "Service") {
			return nil, fmt.Errorf("backend %s is no Service", b.Name)
		}
		ns := r.ref.Namespace
		if b.Namespace != nil && *b.Namespace != ns {
			return nil, fmt.Errorf("backend %s/%s is in another namespace: a ReferenceGrant would be needed, which Sluice does not read yet", *b.Namespace, b.Name)
		}
		if b.Port == nil {
			return nil, fmt.Errorf("backend %s has no port", b.Name)
		}
		svc := c.services[[2]string{ns, b.Name}]
		if svc == nil {
			return nil, fmt.Errorf("backend Service %s/%s does not exist", ns, b.Name)
		}
		weight := int32(1)
		if b.Weight != nil {
			weight = *b.Weight
		}
		eps := c.ready(svc, *b.Port, family)
		shares = append(shares, share{float64(weight), eps})
	}
	if len(shares) == 0 {
		return nil, fmt.Errorf("no backends")
	}
	// Each endpoint's weight is its Service's over the Service's ready
	// endpoints, scaled so the largest is redirect.MaxWeight: a
	// Service with no ready endpoint gets no connection.
	var most float64
	n := 0
	for _, s := range shares {
		if len(s.endpoints) > 0 {
			most = max(most, s.weight/float64(len(s.endpoints)))
			n += len(s.endpoints)
		}
	}
	if n == 0 {
		return nil, fmt.Errorf("no backend Service has a ready endpoint")
	}
	if n > redirect.MaxBackends {
		return nil, fmt.Errorf("%d ready endpoints over its backends: the kernel takes at most %d", n, redirect.MaxBackends)
	}
	var out []redirect.Backend
	for _, s := range shares {
		for _, ep := range s.endpoints {
			w := uint32(0)
			if most > 0 {
				w = uint32(math.Round(s.weight / float64(len(s.endpoints)) / most * redirect.MaxWeight))
			}
			out = append(out, redirect.Backend{Address: ep.Addr(), Port: ep.Port(), Weight: w})
		}
	}
	return out, nil
}

// ready are the addresses and ports of svc's ready, not terminating,
// endpoints serving its port servicePort, in family's IP family.
func (c cluster) ready(svc *Service, servicePort int32, family netip.Addr) []netip.AddrPort {
	var name string
	found := false
	for _, p := range svc.Spec.Ports {
		if p.Port == servicePort {
			name, found = p.Name, true
		}
	}
	if !found {
		return nil
	}
	seen := map[netip.AddrPort]bool{}
	var out []netip.AddrPort
	for _, s := range c.slices[[2]string{svc.Metadata.Namespace, svc.Metadata.Name}] {
		var port uint16
		for _, p := range s.Ports {
			if p.Port != nil && ptr(p.Name) == name && cmp.Or(ptr(p.Protocol), "TCP") == "TCP" {
				port = uint16(*p.Port)
			}
		}
		if port == 0 {
			continue
		}
		for _, ep := range s.Endpoints {
			if ep.Conditions.Ready != nil && !*ep.Conditions.Ready || ptr(ep.Conditions.Terminating) {
				continue
			}
			for _, a := range ep.Addresses {
				addr, err := netip.ParseAddr(a)
				if err != nil || addr.Is4() != family.Is4() {
					continue
				}
				if ap := netip.AddrPortFrom(addr, port); !seen[ap] {
					seen[ap] = true
					out = append(out, ap)
				}
			}
		}
	}
	slices.SortFunc(out, func(a, b netip.AddrPort) int { return a.Compare(b) })
	return out
}

func ptr[T any](p *T) T {
	var zero T
	if p != nil {
		return *p
	}
	return zero
}

// Describe is a route's backends as one line, for logs and events.
func Describe(r redirect.Route) string {
	var b strings.Builder
	for i, be := range r.Backends {
		if i > 0 {
			b.WriteByte(' ')
		}
		fmt.Fprintf(&b, "%s=%d", be.AddrPort(), be.Weight)
	}
	return b.String()
}
