package gamma

import (
	"encoding/json"
	"net/netip"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	gwv1 "sigs.k8s.io/gateway-api/apis/v1"

	"github.com/sluicemesh/sluice/redirect"
)

// as is obj, one of k8s.io/api's or Gateway API's types, read from its
// JSON as the watcher reads the API server's: the translation's types
// must take the real objects' fields.
func as[T any](obj any) *T {
	data, err := json.Marshal(obj)
	if err != nil {
		panic(err)
	}
	out := new(T)
	if err := json.Unmarshal(data, out); err != nil {
		panic(err)
	}
	return out
}

func service(name, ip string, ports ...int32) *Service {
	return as[Service](k8sService(name, ip, ports...))
}

func k8sService(name, ip string, ports ...int32) *corev1.Service {
	s := &corev1.Service{ObjectMeta: metav1.ObjectMeta{Namespace: "shop", Name: name}, Spec: corev1.ServiceSpec{ClusterIP: ip, ClusterIPs: []string{ip}}}
	for _, p := range ports {
		s.Spec.Ports = append(s.Spec.Ports, corev1.ServicePort{Name: "http", Port: p, Protocol: corev1.ProtocolTCP})
	}
	return s
}

// endpoints is an EndpointSlice of svc: its port "http" on targetPort, one
// endpoint per address, "!" in front of an address marking it not ready
// and "~" terminating.
func endpoints(svc string, targetPort int32, addrs ...string) *EndpointSlice {
	name, proto := "http", corev1.ProtocolTCP
	s := &discoveryv1.EndpointSlice{
		ObjectMeta: metav1.ObjectMeta{Namespace: "shop", Name: svc + "-abc", Labels: map[string]string{discoveryv1.LabelServiceName: svc}},
		Ports:      []discoveryv1.EndpointPort{{Name: &name, Port: &targetPort, Protocol: &proto}},
	}
	for _, a := range addrs {
		ready, terminating := true, false
		if rest, ok := strings.CutPrefix(a, "!"); ok {
			a, ready = rest, false
		}
		if rest, ok := strings.CutPrefix(a, "~"); ok {
			a, ready, terminating = rest, true, true
		}
		s.Endpoints = append(s.Endpoints, discoveryv1.Endpoint{Addresses: []string{a}, Conditions: discoveryv1.EndpointConditions{Ready: &ready, Terminating: &terminating}})
	}
	return as[EndpointSlice](s)
}

func backend(name string, port, weight int32) gwv1.BackendRef {
	p := gwv1.PortNumber(port)
	return gwv1.BackendRef{BackendObjectReference: gwv1.BackendObjectReference{Name: gwv1.ObjectName(name), Port: &p}, Weight: &weight}
}

func serviceParent(name string) gwv1.ParentReference {
	g, k := gwv1.Group(""), gwv1.Kind("Service")
	return gwv1.ParentReference{Group: &g, Kind: &k, Name: gwv1.ObjectName(name)}
}

func httpRoute(name string, age time.Duration, parent string, backends ...gwv1.BackendRef) *Route {
	return read(k8sHTTPRoute(name, age, parent, backends...))
}

// read is r as the watcher reads it, its kind set.
func read(r any) *Route {
	out := as[Route](r)
	switch r.(type) {
	case *gwv1.HTTPRoute:
		out.Kind = HTTPRoute
	case *gwv1.TCPRoute:
		out.Kind = TCPRoute
	}
	return out
}

func k8sHTTPRoute(name string, age time.Duration, parent string, backends ...gwv1.BackendRef) *gwv1.HTTPRoute {
	r := &gwv1.HTTPRoute{ObjectMeta: metav1.ObjectMeta{Namespace: "shop", Name: name, CreationTimestamp: metav1.NewTime(time.Unix(1e9, 0).Add(-age))}}
	r.Spec.ParentRefs = []gwv1.ParentReference{serviceParent(parent)}
	rule := gwv1.HTTPRouteRule{}
	for _, b := range backends {
		rule.BackendRefs = append(rule.BackendRefs, gwv1.HTTPBackendRef{BackendRef: b})
	}
	r.Spec.Rules = []gwv1.HTTPRouteRule{rule}
	return r
}

func tcpRoute(name, parent string, backends ...gwv1.BackendRef) *Route {
	r := &gwv1.TCPRoute{ObjectMeta: metav1.ObjectMeta{Namespace: "shop", Name: name, CreationTimestamp: metav1.NewTime(time.Unix(1e9, 0))}}
	r.Spec.ParentRefs = []gwv1.ParentReference{serviceParent(parent)}
	r.Spec.Rules = []gwv1.TCPRouteRule{{BackendRefs: backends}}
	return read(r)
}

// shop is a parent Service web and its versions v1 (two pods) and v2 (one).
func shop() Input {
	return Input{
		Services: []*Service{service("web", "198.19.0.10", 80), service("web-v1", "198.19.0.11", 80), service("web-v2", "198.19.0.12", 80)},
		Slices: []*EndpointSlice{
			endpoints("web-v1", 8080, "198.18.240.21", "198.18.240.22"),
			endpoints("web-v2", 8080, "198.18.240.23"),
		},
	}
}

func weights(r redirect.Route) map[string]uint32 {
	out := map[string]uint32{}
	for _, b := range r.Backends {
		out[b.AddrPort().String()] = b.Weight
	}
	return out
}

// An HTTPRoute on the parent Service splits its cluster IP:port over the
// versions' ready endpoints by weight, each version's share divided among
// its pods, in round-robin (an exact split), and valid as a kernel route.
func TestWeightsOverEndpoints(t *testing.T) {
	in := shop()
	in.Routes = []*Route{httpRoute("web", 0, "web", backend("web-v1", 80, 50), backend("web-v2", 80, 50))}
	res := Translate(in)
	if len(res.Problems) != 0 || len(res.Routes) != 1 {
		t.Fatalf("routes %v, problems %v", res.Routes, res.Problems)
	}
	r := res.Routes[0]
	if r.Service != netip.MustParseAddrPort("198.19.0.10:80") || r.Mode != redirect.ModeRoundRobin || res.From[r.Service].Name != "web" {
		t.Errorf("route %+v from %v", r, res.From[r.Service])
	}
	want := map[string]uint32{"198.18.240.21:8080": 500000, "198.18.240.22:8080": 500000, "198.18.240.23:8080": 1000000}
	if got := weights(r); len(got) != 3 || got["198.18.240.21:8080"] != want["198.18.240.21:8080"] || got["198.18.240.23:8080"] != want["198.18.240.23:8080"] {
		t.Errorf("weights %v, want %v", got, want)
	}
	if err := r.Validate(true); err != nil {
		t.Error(err)
	}
}

// 100/0 sends every connection to v1; a version whose endpoints are not
// ready, or terminating, gets no connection; a TCPRoute does as an
// HTTPRoute.
func TestWeightsFollowReadiness(t *testing.T) {
	in := shop()
	in.Slices[0] = endpoints("web-v1", 8080, "198.18.240.21", "!198.18.240.22", "~198.18.240.24")
	in.Routes = []*Route{tcpRoute("web", "web", backend("web-v1", 80, 100), backend("web-v2", 80, 0))}
	res := Translate(in)
	if len(res.Problems) != 0 || len(res.Routes) != 1 {
		t.Fatalf("routes %v, problems %v", res.Routes, res.Problems)
	}
	if got := weights(res.Routes[0]); len(got) != 2 || got["198.18.240.21:8080"] != redirect.MaxWeight || got["198.18.240.23:8080"] != 0 {
		t.Errorf("weights %v: want v1's ready pod alone weighted, v2's at 0", got)
	}
	in.Slices[1] = endpoints("web-v2", 8080, "!198.18.240.23")
	in.Routes[0] = tcpRoute("web", "web", backend("web-v1", 80, 10), backend("web-v2", 80, 90))
	if got := weights(Translate(in).Routes[0]); len(got) != 1 || got["198.18.240.21:8080"] != redirect.MaxWeight {
		t.Errorf("v2 with no ready endpoint: weights %v, want v1's alone", got)
	}
}

// What the kernel cannot do is a problem of that route, which is left out
// whole; the other routes are in force.
func TestProblems(t *testing.T) {
	in := shop()
	in.Services = append(in.Services, service("api", "198.19.0.20", 80), service("many", "198.19.0.21", 80))
	path := "/admin"
	k8sByPath := k8sHTTPRoute("api-path", 0, "api", backend("web-v1", 80, 1))
	k8sByPath.Spec.Rules[0].Matches = []gwv1.HTTPRouteMatch{{Path: &gwv1.HTTPPathMatch{Value: &path}}}
	byPath := read(k8sByPath)
	missing := httpRoute("api-missing", 0, "api", backend("nope", 80, 1))
	var many []string
	for i := range 17 {
		many = append(many, netip.AddrFrom4([4]byte{198, 18, 241, byte(i + 1)}).String())
	}
	in.Slices = append(in.Slices, endpoints("many", 8080, many...))
	tooMany := tcpRoute("api-many", "api", backend("many", 80, 1))
	younger := httpRoute("web-younger", -time.Hour, "web", backend("web-v2", 80, 1))
	in.Routes = []*Route{httpRoute("web", 0, "web", backend("web-v1", 80, 1)), byPath, missing, younger, tooMany}
	res := Translate(in)
	if len(res.Routes) != 1 || res.From[res.Routes[0].Service].Name != "web" {
		t.Errorf("routes %v from %v, want web's alone", res.Routes, res.From)
	}
	want := map[string]string{
		"HTTPRoute shop/api-path":    "matches some requests only",
		"HTTPRoute shop/api-missing": "backend Service shop/nope does not exist",
		"TCPRoute shop/api-many":     "17 ready endpoints over its backends: the kernel takes at most 16",
		"HTTPRoute shop/web-younger": "already routed by the older HTTPRoute shop/web",
	}
	got := map[string]string{}
	for _, p := range res.Problems {
		got[p.Route.String()] = p.Reason
	}
	for route, reason := range want {
		if !strings.Contains(got[route], reason) {
			t.Errorf("%s: problem %q, want %q", route, got[route], reason)
		}
	}
	if len(got) != len(want) {
		t.Errorf("problems %v, want %d", got, len(want))
	}
}

// A route of a Gateway (not a Service) is the gateway's: no kernel route,
// no problem.
func TestGatewayRoutesLeftToTheGateway(t *testing.T) {
	in := shop()
	r := k8sHTTPRoute("north-south", 0, "web", backend("web-v1", 80, 1))
	r.Spec.ParentRefs = []gwv1.ParentReference{{Name: "public"}}
	in.Routes = []*Route{read(r)}
	if res := Translate(in); len(res.Routes) != 0 || len(res.Problems) != 0 {
		t.Errorf("routes %v, problems %v", res.Routes, res.Problems)
	}
}
