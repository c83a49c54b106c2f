package agent

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/sluicemesh/sluice/gamma"
	"github.com/sluicemesh/sluice/internal/kubetest"
	"github.com/sluicemesh/sluice/kube"
	"github.com/sluicemesh/sluice/loader"
	"github.com/sluicemesh/sluice/redirect"
)

// cluster is a fake API server holding a few objects by list path; a
// watch streams what send queues, and ends after a moment of quiet.
type cluster struct {
	mu      sync.Mutex
	objects map[string][]string    // list path -> items, as JSON
	events  map[string]chan string // list path -> watch events, as JSON
}

func newCluster() *cluster {
	c := &cluster{objects: map[string][]string{}, events: map[string]chan string{}}
	for _, p := range []string{"/api/v1/services", "/apis/discovery.k8s.io/v1/endpointslices", "/apis/gateway.networking.k8s.io/v1/httproutes",
		"/apis/gateway.networking.k8s.io/v1/tcproutes", "/api/v1/pods", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"} {
		c.objects[p], c.events[p] = nil, make(chan string, 16)
	}
	return c
}

func (c *cluster) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	c.mu.Lock()
	items, ok := c.objects[r.URL.Path]
	ch := c.events[r.URL.Path]
	c.mu.Unlock()
	if !ok {
		w.WriteHeader(http.StatusCreated) // an event posted
		return
	}
	if r.URL.Query().Get("watch") != "true" {
		fmt.Fprintf(w, `{"metadata":{"resourceVersion":"1"},"items":[%s]}`, strings.Join(items, ","))
		return
	}
	w.(http.Flusher).Flush()
	for {
		select {
		case ev := <-ch:
			fmt.Fprintln(w, ev)
			w.(http.Flusher).Flush()
		case <-time.After(200 * time.Millisecond):
			return
		case <-r.Context().Done():
			return
		}
	}
}

func (c *cluster) send(path, typ, obj string) {
	c.events[path] <- fmt.Sprintf(`{"type":%q,"object":%s}`, typ, obj)
}

func service(name, ip string) string {
	return fmt.Sprintf(`{"metadata":{"namespace":"shop","name":%q,"resourceVersion":"1"},"spec":{"clusterIP":%q,"ports":[{"name":"http","port":80,"protocol":"TCP"}]}}`, name, ip)
}

func slice(svc, addr string) string {
	return fmt.Sprintf(`{"metadata":{"namespace":"shop","name":"%s-1","resourceVersion":"1","labels":{"kubernetes.io/service-name":%q}},"ports":[{"name":"http","port":8080,"protocol":"TCP"}],"endpoints":[{"addresses":[%q],"conditions":{"ready":true}}]}`, svc, svc, addr)
}

func httpRoute(v1, v2 int) string {
	return fmt.Sprintf(`{"metadata":{"namespace":"shop","name":"web","resourceVersion":"%d","creationTimestamp":"2026-12-01T00:00:00Z"},"spec":{"parentRefs":[{"group":"","kind":"Service","name":"web"}],"rules":[{"backendRefs":[{"name":"web-v1","port":80,"weight":%d},{"name":"web-v2","port":80,"weight":%d}]}]}}`, 100+v2, v1, v2)
}

// apiClient is a client of srv, trusting its certificate.
func apiClient(t *testing.T, srv *httptest.Server) *kube.Client {
	api, err := kube.FromKubeconfig(kubetest.Kubeconfig(t, srv))
	if err != nil {
		t.Fatal(err)
	}
	return api
}

// shop is the cluster's objects: Services web (the parent), web-v1 and
// web-v2 with an endpoint each, and an HTTPRoute on web at 100/0.
func shop() *cluster {
	c := newCluster()
	c.objects["/api/v1/services"] = []string{service("web", "198.19.0.10"), service("web-v1", "198.19.0.11"), service("web-v2", "198.19.0.12")}
	c.objects["/apis/discovery.k8s.io/v1/endpointslices"] = []string{slice("web-v1", "198.18.5.1"), slice("web-v2", "198.18.5.2")}
	c.objects["/apis/gateway.networking.k8s.io/v1/httproutes"] = []string{httpRoute(100, 0)}
	return c
}

// follow serves c as the API server and has the node's agent follow it
// until the test ends.
func (n *node) follow(t *testing.T, c *cluster) *cluster {
	srv := httptest.NewTLSServer(c)
	w := kube.New(apiClient(t, srv), "node-1", quiet)
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); w.Run(ctx, time.Second) }()
	go func() { defer wg.Done(); n.agent().FollowCluster(ctx, w, 100*time.Millisecond) }()
	t.Cleanup(func() { cancel(); wg.Wait(); srv.Close() })
	return c
}

// routeWithin waits up to d for every pod's route of svc to be want (as
// weightsOf words it), and returns how long that took.
func (n *node) routeWithin(t *testing.T, what string, d time.Duration, svc, want string, pods ...string) time.Duration {
	t.Helper()
	start := time.Now()
	for _, p := range pods {
		for got := weightsOf(t, n.tgts[p], svc); got != want; got = weightsOf(t, n.tgts[p], svc) {
			if time.Since(start) > d {
				t.Fatalf("%s: pod %s's route of %s is %q, want %q", what, p, svc, got, want)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	return time.Since(start)
}

// weightsOf is the pod's route of svc as "backend=weight" words, "" when
// it has none.
func weightsOf(t *testing.T, tgt loader.Target, svc string) string {
	routes, err := loader.Routes(tgt)
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range routes {
		if r.Service == netip.MustParseAddrPort(svc) {
			var words []string
			for _, b := range r.Backends {
				words = append(words, fmt.Sprintf("%s=%d", b.AddrPort(), b.Weight))
			}
			return r.Mode + " " + strings.Join(words, " ")
		}
	}
	return ""
}

// An HTTPRoute whose parent is a Service becomes every captured pod's route
// of that Service's cluster IP, over the backends' endpoints; patched
// weights reach every pod within a moment, a pod installed later gets the
// route too, and a deleted HTTPRoute takes its route out, leaving routes
// set by hand alone.
func TestRoutesFollowTheCluster(t *testing.T) {
	n := newNode(t, "a", "b")
	manual := redirect.Route{Service: netip.MustParseAddrPort("198.19.9.9:80"), Backends: []redirect.Backend{{Address: netip.MustParseAddr("198.18.9.9"), Port: 80, Weight: 1}}}
	if err := loader.ChangeRoutes(n.tgts["a"], loader.RouteChange{Set: []redirect.Route{manual}}); err != nil {
		t.Fatal(err)
	}
	c := n.follow(t, shop())

	const svc = "198.19.0.10:80"
	within := func(what string, d time.Duration, want string, pods ...string) time.Duration {
		t.Helper()
		return n.routeWithin(t, what, d, svc, want, pods...)
	}
	within("100/0", 5*time.Second, "round-robin 198.18.5.1:8080=1000000 198.18.5.2:8080=0", "a", "b")

	c.send("/apis/gateway.networking.k8s.io/v1/httproutes", "MODIFIED", httpRoute(0, 100))
	took := within("patched to 0/100", 2*time.Second, "round-robin 198.18.5.1:8080=0 198.18.5.2:8080=1000000", "a", "b")
	t.Logf("0/100 in both pods %v after the watch event", took)

	n.add(t, "c")
	within("a pod installed since", 2*time.Second, "round-robin 198.18.5.1:8080=0 198.18.5.2:8080=1000000", "c")

	c.send("/apis/gateway.networking.k8s.io/v1/httproutes", "DELETED", httpRoute(0, 100))
	within("route deleted", 2*time.Second, "", "a", "b", "c")
	if got := weightsOf(t, n.tgts["a"], "198.19.9.9:80"); got == "" {
		t.Error("the route set by hand went with the cluster's")
	}
}

// A pod installed with --resolve-services gets a route of every Service
// with a ready endpoint (the HTTPRoute's parent keeps the HTTPRoute's), and
// follows its endpoints; a pod that did not ask gets the HTTPRoute's alone,
// and keeps a route set by hand on a Service's cluster IP.
func TestServicesResolvedForThePodsThatAsk(t *testing.T) {
	n := newNode(t, "plain")
	plan, err := redirect.DefaultPolicy().Plan()
	if err != nil {
		t.Fatal(err)
	}
	plan.ResolveServices = true
	n.addWith(t, plan, "resolving")
	manual := redirect.Route{Service: netip.MustParseAddrPort("198.19.0.11:80"), Backends: []redirect.Backend{{Address: netip.MustParseAddr("198.18.9.9"), Port: 80, Weight: 1}}}
	if err := loader.ChangeRoutes(n.tgts["plain"], loader.RouteChange{Set: []redirect.Route{manual}}); err != nil {
		t.Fatal(err)
	}
	c := n.follow(t, shop())

	within := func(what, pod, svc, want string) { t.Helper(); n.routeWithin(t, what, 5*time.Second, svc, want, pod) }
	within("parent", "resolving", "198.19.0.10:80", "round-robin 198.18.5.1:8080=1000000 198.18.5.2:8080=0")
	within("v1", "resolving", "198.19.0.11:80", "round-robin 198.18.5.1:8080=1")
	within("v2", "resolving", "198.19.0.12:80", "round-robin 198.18.5.2:8080=1")
	within("parent", "plain", "198.19.0.10:80", "round-robin 198.18.5.1:8080=1000000 198.18.5.2:8080=0")
	if got := weightsOf(t, n.tgts["plain"], "198.19.0.11:80"); got != "random 198.18.9.9:80=1" {
		t.Errorf("a pod that did not ask: its route of web-v1 set by hand is %q", got)
	}

	// v1's endpoint moves, then v2 has none: the route follows, then goes
	// (kube-proxy answers for a Service with no endpoint, as before).
	moved := strings.Replace(slice("web-v1", "198.18.5.3"), `"resourceVersion":"1"`, `"resourceVersion":"2"`, 1)
	c.send("/apis/discovery.k8s.io/v1/endpointslices", "MODIFIED", moved)
	within("v1's endpoint moved", "resolving", "198.19.0.11:80", "round-robin 198.18.5.3:8080=1")
	c.send("/apis/discovery.k8s.io/v1/endpointslices", "DELETED", slice("web-v2", "198.18.5.2"))
	within("v2 without endpoints", "resolving", "198.19.0.12:80", "")
	if got := weightsOf(t, n.tgts["plain"], "198.19.0.11:80"); got != "random 198.18.9.9:80=1" {
		t.Errorf("after web-v1's endpoint moved, the route set by hand in a pod that did not ask is %q", got)
	}
}

// A pod's own namespace's Services come first, and no more than its room.
func TestPodServicesOwnNamespaceFirst(t *testing.T) {
	route := func(ns, addr string) gamma.ServiceRoute {
		return gamma.ServiceRoute{Namespace: ns, Route: redirect.Route{Service: netip.MustParseAddrPort(addr)}}
	}
	all := []gamma.ServiceRoute{route("a", "198.19.0.1:80"), route("b", "198.19.0.2:80"), route("b", "198.19.0.3:80"), route("c", "198.19.0.4:80")}
	got, left := podServices(all, "b", 3)
	var addrs []string
	for _, r := range got {
		addrs = append(addrs, r.Service.String())
	}
	if strings.Join(addrs, " ") != "198.19.0.2:80 198.19.0.3:80 198.19.0.1:80" || left != 1 {
		t.Errorf("got %v, %d left; want b's two, then a's, 1 left", addrs, left)
	}
	if got, left := podServices(all, "b", -2); len(got) != 0 || left != 4 {
		t.Errorf("no room: got %v, %d left", got, left)
	}
}
