package agent

import (
	"context"
	"encoding/pem"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

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
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "ca.crt"), pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: srv.Certificate().Raw}), 0o600)
	cfg := filepath.Join(dir, "config")
	os.WriteFile(cfg, []byte(fmt.Sprintf("current-context: x\ncontexts: [{name: x, context: {cluster: c, user: u}}]\nclusters: [{name: c, cluster: {server: %q, certificate-authority: ca.crt}}]\nusers: [{name: u, user: {token: t}}]\n", srv.URL)), 0o600)
	api, err := kube.FromKubeconfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return api
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
	c := newCluster()
	c.objects["/api/v1/services"] = []string{service("web", "198.19.0.10"), service("web-v1", "198.19.0.11"), service("web-v2", "198.19.0.12")}
	c.objects["/apis/discovery.k8s.io/v1/endpointslices"] = []string{slice("web-v1", "198.18.5.1"), slice("web-v2", "198.18.5.2")}
	c.objects["/apis/gateway.networking.k8s.io/v1/httproutes"] = []string{httpRoute(100, 0)}
	srv := httptest.NewTLSServer(c)
	defer srv.Close()

	w := kube.New(apiClient(t, srv), "node-1", quiet)
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); w.Run(ctx, time.Second) }()
	go func() { defer wg.Done(); n.agent().FollowCluster(ctx, w, 100*time.Millisecond) }()
	defer func() { cancel(); wg.Wait() }()

	const svc = "198.19.0.10:80"
	within := func(what string, d time.Duration, want string, pods ...string) time.Duration {
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
