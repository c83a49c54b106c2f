package kube

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/sluicemesh/sluice/gamma"
	"github.com/sluicemesh/sluice/internal/kubetest"
)

// apiServer is a fake API server: lists and watches of Services and
// EndpointSlices (Gateway API's kinds are served or not), a token to ask
// for, and the events posted.
type apiServer struct {
	t       *testing.T
	mu      sync.Mutex
	gateway bool                   // whether HTTPRoute and TCPRoute are served
	watches map[string]chan string // path -> events to stream
	lists   map[string]int         // path -> lists served
	events  []map[string]any
	gone    bool // the next watch of Services answers 410
}

func (s *apiServer) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Header.Get("Authorization") != "Bearer "+kubetest.Token {
		http.Error(w, `{"message":"Unauthorized"}`, http.StatusUnauthorized)
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if r.Method == http.MethodPost {
		var ev map[string]any
		json.NewDecoder(r.Body).Decode(&ev)
		s.events = append(s.events, ev)
		w.WriteHeader(http.StatusCreated)
		return
	}
	if strings.Contains(r.URL.Path, "gateway") && !s.gateway {
		http.Error(w, `{"message":"the server could not find the requested resource"}`, http.StatusNotFound)
		return
	}
	if r.URL.Query().Get("watch") != "true" {
		s.lists[r.URL.Path]++
		items := map[string]string{
			"/api/v1/services": `{"metadata":{"namespace":"shop","name":"web","resourceVersion":"5"},"spec":{"clusterIP":"198.19.0.10","ports":[{"name":"http","port":80}]}}`,
			"/api/v1/pods":     webV2Pod,
		}[r.URL.Path]
		fmt.Fprintf(w, `{"metadata":{"resourceVersion":"10"},"items":[%s]}`, items)
		return
	}
	if s.gone && r.URL.Path == "/api/v1/services" {
		s.gone = false
		fmt.Fprintln(w, `{"type":"ERROR","object":{"kind":"Status","code":410,"message":"too old resource version"}}`)
		return
	}
	ch := s.watches[r.URL.Path]
	if ch == nil {
		ch = make(chan string, 10)
		s.watches[r.URL.Path] = ch
	}
	s.mu.Unlock()
	defer s.mu.Lock()
	w.(http.Flusher).Flush()
	for {
		select {
		case <-r.Context().Done():
			return
		case ev, ok := <-ch:
			if !ok {
				return // the server ends the watch
			}
			fmt.Fprintln(w, ev)
			w.(http.Flusher).Flush()
		}
	}
}

func (s *apiServer) send(path, ev string) {
	for {
		s.mu.Lock()
		ch := s.watches[path]
		s.mu.Unlock()
		if ch != nil {
			ch <- ev
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
}

const webV2Pod = `{"metadata":{"namespace":"shop","name":"web-v2-5d9f-x1","resourceVersion":"6","labels":{"app":"web","version":"v2","pod-template-hash":"5d9f"},` +
	`"ownerReferences":[{"kind":"ReplicaSet","name":"web-v2-5d9f","controller":true}]},"spec":{"serviceAccountName":"web"},"status":{"podIPs":[{"ip":"198.18.5.2"}]}}`

func waitFor(t *testing.T, what string, f func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !f() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not after 5 s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// The watcher lists every kind (Gateway API's not served: an empty,
// complete view, listed again as soon as their CRD is installed), follows
// the watch's changes, lists again after a 410, and says something
// changed; events go to the route's namespace.
func TestWatcherFollowsTheAPI(t *testing.T) {
	s := &apiServer{t: t, watches: map[string]chan string{}, lists: map[string]int{}}
	srv := httptest.NewTLSServer(s)
	defer srv.Close()
	api, err := FromKubeconfig(kubetest.Kubeconfig(t, srv))
	if err != nil {
		t.Fatal(err)
	}
	w := New(api, "node-1", slog.New(slog.DiscardHandler))
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	// An hour between tries of a kind not served: Gateway API's routes
	// must be listed when their CRD arrives, not at the next try.
	go func() { defer close(done); w.Run(ctx, time.Hour) }()
	defer func() { cancel(); <-done }()

	var in gamma.Input
	waitFor(t, "the first complete snapshot", func() bool {
		var ok bool
		in, ok = w.Snapshot()
		return ok
	})
	if len(in.Services) != 1 || in.Services[0].Metadata.Name != "web" || in.Services[0].Spec.ClusterIP != "198.19.0.10" || len(in.Routes) != 0 {
		t.Fatalf("snapshot %+v", in)
	}
	<-w.Changed()
	// Pods name the flows' peers: a Deployment's pod by the Deployment.
	waitFor(t, "the pod's address known", func() bool { _, ok := w.Peer(netip.MustParseAddr("198.18.5.2")); return ok })
	id, _ := w.Peer(netip.MustParseAddr("::ffff:198.18.5.2"))
	if id.Workload != "web-v2" || id.Namespace != "shop" || id.App != "web" || id.Version != "v2" || id.Principal != "spiffe://cluster.local/ns/shop/sa/web" {
		t.Errorf("peer %+v", id)
	}
	s.send("/api/v1/pods", `{"type":"DELETED","object":`+webV2Pod+`}`)
	waitFor(t, "the pod's address forgotten", func() bool { _, ok := w.Peer(netip.MustParseAddr("198.18.5.2")); return !ok })
	s.send("/apis/discovery.k8s.io/v1/endpointslices", `{"type":"ADDED","object":{"metadata":{"namespace":"shop","name":"web-x","resourceVersion":"11","labels":{"kubernetes.io/service-name":"web"}},"endpoints":[{"addresses":["198.18.240.21"],"conditions":{"ready":true}}]}}`)
	<-w.Changed()
	waitFor(t, "the slice added", func() bool { in, _ = w.Snapshot(); return len(in.Slices) == 1 })
	if in.Slices[0].Endpoints[0].Addresses[0] != "198.18.240.21" {
		t.Errorf("slice %+v", in.Slices[0])
	}
	s.send("/apis/discovery.k8s.io/v1/endpointslices", `{"type":"DELETED","object":{"metadata":{"namespace":"shop","name":"web-x","resourceVersion":"12"}}}`)
	waitFor(t, "the slice deleted", func() bool { in, _ = w.Snapshot(); return len(in.Slices) == 0 })

	// Gateway API's CRDs installed: the routes are listed at once.
	s.mu.Lock()
	s.gateway = true
	s.mu.Unlock()
	s.send("/apis/apiextensions.k8s.io/v1/customresourcedefinitions", `{"type":"ADDED","object":{"metadata":{"name":"httproutes.gateway.networking.k8s.io","resourceVersion":"12"}}}`)
	s.send("/apis/gateway.networking.k8s.io/v1/httproutes", `{"type":"ADDED","object":{"metadata":{"namespace":"shop","name":"web","resourceVersion":"13"},"spec":{"parentRefs":[{"kind":"Service","name":"web"}]}}}`)
	waitFor(t, "the HTTPRoute", func() bool {
		in, _ = w.Snapshot()
		return len(in.Routes) == 1
	})
	if in.Routes[0].Kind != gamma.HTTPRoute || in.Routes[0].Spec.ParentRefs[0].Name != "web" {
		t.Errorf("route %+v", in.Routes[0])
	}

	// A 410 on the watch: listed again.
	s.mu.Lock()
	s.gone = true
	lists := s.lists["/api/v1/services"]
	close(s.watches["/api/v1/services"])
	delete(s.watches, "/api/v1/services")
	s.mu.Unlock()
	waitFor(t, "a new list after 410", func() bool {
		s.mu.Lock()
		defer s.mu.Unlock()
		return s.lists["/api/v1/services"] > lists
	})

	w.Report(ctx, []gamma.Problem{{Route: gamma.Ref{Kind: gamma.HTTPRoute, Namespace: "shop", Name: "web"}, Reason: "3 rules"}})
	w.Report(ctx, []gamma.Problem{{Route: gamma.Ref{Kind: gamma.HTTPRoute, Namespace: "shop", Name: "web"}, Reason: "3 rules"}})
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.events) != 1 || s.events[0]["reason"] != "NotInKernel" || !strings.Contains(fmt.Sprint(s.events[0]["message"]), "3 rules") {
		t.Errorf("events %v: want one NotInKernel naming the reason", s.events)
	}
}

// A kubeconfig that skips the server's verification is refused.
func TestKubeconfigRefusesSkipVerify(t *testing.T) {
	path := filepath.Join(t.TempDir(), "config")
	os.WriteFile(path, []byte("current-context: x\ncontexts: [{name: x, context: {cluster: c, user: u}}]\nclusters: [{name: c, cluster: {server: \"https://198.18.0.1:6443\", insecure-skip-tls-verify: true}}]\nusers: [{name: u, user: {token: t}}]\n"), 0o600)
	if _, err := FromKubeconfig(path); err == nil || !strings.Contains(err.Error(), "insecure-skip-tls-verify") {
		t.Errorf("FromKubeconfig: %v", err)
	}
}
