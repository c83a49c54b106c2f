package kube

import (
	"context"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/sluicemesh/sluice/gamma"
	"github.com/sluicemesh/sluice/internal/kubetest"
)

// fixture is a cluster of n Services, each with an EndpointSlice of two
// ready endpoints and two pods, as the API server lists them.
type fixture struct{ n int }

func (f fixture) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.URL.Query().Get("watch") == "true" {
		<-r.Context().Done()
		return
	}
	var items []string
	for i := range f.n {
		a, b := fmt.Sprintf("198.18.%d.%d", 100+i/250, 2*(i%125)+1), fmt.Sprintf("198.18.%d.%d", 100+i/250, 2*(i%125)+2)
		switch {
		case strings.HasSuffix(r.URL.Path, "/services"):
			items = append(items, fmt.Sprintf(`{"metadata":{"namespace":"ns%d","name":"svc%d","uid":"%08d-0000-0000-0000-000000000000","resourceVersion":"1","creationTimestamp":"2026-12-01T00:00:00Z","labels":{"app":"svc%d"}},"spec":{"clusterIP":"198.19.%d.%d","clusterIPs":["198.19.%d.%d"],"ports":[{"name":"http","port":80,"protocol":"TCP","targetPort":8080}],"selector":{"app":"svc%d"},"type":"ClusterIP"}}`,
				i%20, i, i, i, i/250, i%250, i/250, i%250, i))
		case strings.HasSuffix(r.URL.Path, "/endpointslices"):
			items = append(items, fmt.Sprintf(`{"metadata":{"namespace":"ns%d","name":"svc%d-abcde","resourceVersion":"1","labels":{"kubernetes.io/service-name":"svc%d"}},"addressType":"IPv4","ports":[{"name":"http","port":8080,"protocol":"TCP"}],"endpoints":[{"addresses":[%q],"conditions":{"ready":true,"serving":true,"terminating":false},"nodeName":"node-1"},{"addresses":[%q],"conditions":{"ready":true,"serving":true,"terminating":false},"nodeName":"node-2"}]}`,
				i%20, i, i, a, b))
		case strings.HasSuffix(r.URL.Path, "/pods"):
			for j, ip := range []string{a, b} {
				items = append(items, fmt.Sprintf(`{"metadata":{"namespace":"ns%d","name":"svc%d-5d9f-%d","resourceVersion":"1","labels":{"app":"svc%d","version":"v1","pod-template-hash":"5d9f"},"ownerReferences":[{"apiVersion":"apps/v1","kind":"ReplicaSet","name":"svc%d-5d9f","uid":"x","controller":true}]},"spec":{"serviceAccountName":"default","containers":[{"name":"app","image":"registry.example/app:1"}]},"status":{"phase":"Running","podIP":%q,"podIPs":[{"ip":%q}]}}`,
					i%20, i, j, i, i, ip, ip))
			}
		}
	}
	fmt.Fprintf(w, `{"metadata":{"resourceVersion":"1"},"items":[%s]}`, strings.Join(items, ","))
}

func heap() uint64 {
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return m.HeapAlloc
}

// The agent's view of a cluster of 1,000 Services (each with an
// EndpointSlice of two endpoints, and their 2,000 pods), with the
// Services' routes it keeps for the pods that resolve them, stays within
// 8 MiB of heap: a guard, so a change that keeps whole objects, or caches
// them twice, fails here.
func TestWatcherMemoryWith1000Services(t *testing.T) {
	srv := httptest.NewTLSServer(fixture{n: 1000})
	defer srv.Close()
	api, err := FromKubeconfig(kubetest.Kubeconfig(t, srv))
	if err != nil {
		t.Fatal(err)
	}
	before := heap()
	w := New(api, "node-1", slog.New(slog.DiscardHandler))
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); w.Run(ctx, time.Hour) }()
	defer func() { cancel(); <-done }()
	var in gamma.Input
	waitFor(t, "the lists", func() bool {
		var ok bool
		in, ok = w.Snapshot()
		w.mu.Lock()
		pods := len(w.pods.items)
		w.mu.Unlock()
		return ok && len(in.Services) == 1000 && len(in.Slices) == 1000 && pods == 2000
	})
	services, _ := gamma.Services(in, nil)
	in = gamma.Input{} // the snapshot's slices are the agent's only while it computes
	used := heap() - before
	if len(services) != 1000 {
		t.Fatalf("%d Services resolved, want 1,000", len(services))
	}
	runtime.KeepAlive(services)
	t.Logf("1,000 Services, 1,000 EndpointSlices, 2,000 pods watched, the Services' routes kept: %.1f MiB of heap", float64(used)/(1<<20))
	if used > 8<<20 {
		t.Errorf("the watcher holds %.1f MiB for 1,000 Services, want at most 8", float64(used)/(1<<20))
	}
}
