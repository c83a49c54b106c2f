// Package kube is the node agent's view of the cluster: it lists and
// watches the objects Sluice's routes come from (Services, EndpointSlices,
// and Gateway API's HTTPRoutes and TCPRoutes once their CRDs are served),
// keeps them for gamma.Translate and signals when any changed; and the
// pods, by address, which name the workload at a flow's other end. It reads,
// and records events on routes it cannot carry out; nothing else. When the
// API server is unreachable it retries, and what it last saw stays.
//
// It speaks the API's JSON itself, over list and watch, instead of using
// client-go: client-go and the API's Go types add 17 MiB to the resident
// memory of every Sluice process, sidecars and the CNI plugin included,
// and the agent needs four lists and watches.
package kube

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/netip"
	"net/url"
	"strings"
	"sync"
	"time"

	"github.com/sluicemesh/sluice/gamma"
)

// Watcher lists and watches the cluster's objects.
type Watcher struct {
	api     *Client
	log     *slog.Logger
	node    string // the events' source
	changed chan struct{}

	mu        sync.Mutex
	services  store[gamma.Service]
	slices    store[gamma.EndpointSlice]
	httpRoute store[gamma.Route]
	tcpRoute  store[gamma.Route]
	pods      store[Pod]
	peers     map[netip.Addr]peer // the pods by IP, kept by indexPod
	// crds are Gateway API's HTTPRoute CRD when installed: its arrival
	// closes crdArrived, which the routes' lists wait on (rather than
	// polling every node's API server for kinds not served).
	crds       store[struct{ Metadata gamma.Meta }]
	crdArrived chan struct{}

	reported map[gamma.Ref]string // the problem last recorded on each route
}

// store is one kind's objects by namespace/name, and whether a list of
// them completed once; changed, when set, is told of each change (under
// the Watcher's lock).
type store[T any] struct {
	items   map[string]*T
	synced  bool
	changed func(old, new *T)
	quiet   bool // its changes are no routes' business: Changed is not told
}

// set puts items in place of the store's, telling changed.
func (st *store[T]) set(items map[string]*T) {
	if st.changed != nil {
		for _, old := range st.items {
			st.changed(old, nil)
		}
		for _, it := range items {
			st.changed(nil, it)
		}
	}
	st.items, st.synced = items, true
}

// put sets (or, with obj nil, deletes) the object at k.
func (st *store[T]) put(k string, obj *T) {
	old := st.items[k]
	if obj == nil {
		delete(st.items, k)
	} else {
		st.items[k] = obj
	}
	if st.changed != nil {
		st.changed(old, obj)
	}
}

// New makes a Watcher of api's cluster; node names this node in events.
func New(api *Client, node string, log *slog.Logger) *Watcher {
	w := &Watcher{api: api, log: log, node: node, changed: make(chan struct{}, 1), reported: map[gamma.Ref]string{}, peers: map[netip.Addr]peer{}}
	w.pods.changed, w.pods.quiet = w.indexPod, true
	w.crdArrived = make(chan struct{})
	w.crds.changed, w.crds.quiet = func(_, _ *struct{ Metadata gamma.Meta }) {
		close(w.crdArrived)
		w.crdArrived = make(chan struct{})
	}, true
	return w
}

// Changed receives a value after any watched object changed (many changes
// may share one).
func (w *Watcher) Changed() <-chan struct{} { return w.changed }

func (w *Watcher) notify() {
	select {
	case w.changed <- struct{}{}:
	default:
	}
}

// Run lists and watches until ctx ends. A kind the API server does not
// serve (Gateway API without its CRDs) is listed again as soon as the
// HTTPRoute CRD is installed, or after retry.
func (w *Watcher) Run(ctx context.Context, retry time.Duration) {
	var wg sync.WaitGroup
	run := func(f func()) { wg.Add(1); go func() { defer wg.Done(); f() }() }
	run(func() {
		reflect(ctx, w, "/api/v1/services", "Service", &w.services, func(s *gamma.Service) *gamma.Meta { return &s.Metadata }, retry)
	})
	run(func() {
		reflect(ctx, w, "/apis/discovery.k8s.io/v1/endpointslices", "EndpointSlice", &w.slices, func(s *gamma.EndpointSlice) *gamma.Meta { return &s.Metadata }, retry)
	})
	run(func() {
		reflect(ctx, w, "/api/v1/pods", "Pod", &w.pods, func(p *Pod) *gamma.Meta { return &p.Metadata.Meta }, retry)
	})
	run(func() {
		reflect(ctx, w, "/apis/apiextensions.k8s.io/v1/customresourcedefinitions?fieldSelector=metadata.name%3Dhttproutes.gateway.networking.k8s.io",
			"CustomResourceDefinition", &w.crds, func(c *struct{ Metadata gamma.Meta }) *gamma.Meta { return &c.Metadata }, retry)
	})
	for path, kind := range map[string]string{"httproutes": gamma.HTTPRoute, "tcproutes": gamma.TCPRoute} {
		st := &w.httpRoute
		if kind == gamma.TCPRoute {
			st = &w.tcpRoute
		}
		run(func() {
			reflect(ctx, w, "/apis/gateway.networking.k8s.io/v1/"+path, kind, st, func(r *gamma.Route) *gamma.Meta { r.Kind = kind; return &r.Metadata }, retry)
		})
	}
	wg.Wait()
}

// errGone is a watch's 410: its resource version is too old; list again.
var errGone = errors.New("resource version too old")

// reflect keeps st as the API server has path's objects: list, then watch
// from the list's version, again after every error. meta gives an object's
// metadata (and sets what a list's items lack).
func reflect[T any](ctx context.Context, w *Watcher, path, kind string, st *store[T], meta func(*T) *gamma.Meta, retry time.Duration) {
	backoff := time.Second
	for ctx.Err() == nil {
		w.mu.Lock()
		arrived := w.crdArrived // before the list: a CRD arriving during it counts
		w.mu.Unlock()
		items, version, err := list(ctx, w.api, path, meta)
		switch {
		case errors.Is(err, ErrNotFound):
			w.mu.Lock()
			// Nothing of the kind exists: that is a complete view (and
			// if its CRD was removed, its objects are gone).
			st.set(map[string]*T{})
			w.mu.Unlock()
			w.notify()
			select { // until its CRD may have come
			case <-ctx.Done():
			case <-arrived:
			case <-time.After(retry):
			}
			continue
		case err != nil:
			if ctx.Err() == nil {
				w.log.Warn("list", "kind", kind, "err", err, "retry_in", backoff)
			}
			sleep(ctx, backoff)
			backoff = min(2*backoff, 30*time.Second)
			continue
		}
		backoff = time.Second
		w.mu.Lock()
		st.set(items)
		w.mu.Unlock()
		w.notify()
		for ctx.Err() == nil {
			if version, err = watch(ctx, w, path, version, st, meta); err != nil {
				break
			}
		}
		if err != nil && !errors.Is(err, errGone) && ctx.Err() == nil {
			w.log.Warn("watch", "kind", kind, "err", err)
			sleep(ctx, time.Second)
		}
	}
}

func sleep(ctx context.Context, d time.Duration) {
	select {
	case <-ctx.Done():
	case <-time.After(d):
	}
}

func key(m *gamma.Meta) string { return m.Namespace + "/" + m.Name }

// list reads every object of path, page by page.
func list[T any](ctx context.Context, api *Client, path string, meta func(*T) *gamma.Meta) (map[string]*T, string, error) {
	items := map[string]*T{}
	path, q := splitQuery(path)
	q.Set("limit", "500")
	for {
		var page struct {
			Metadata struct {
				ResourceVersion string `json:"resourceVersion"`
				Continue        string `json:"continue"`
			} `json:"metadata"`
			Items []*T `json:"items"`
		}
		if err := api.get(ctx, path, q, &page); err != nil {
			return nil, "", err
		}
		for _, it := range page.Items {
			items[key(meta(it))] = it
		}
		if page.Metadata.Continue == "" {
			return items, page.Metadata.ResourceVersion, nil
		}
		q.Set("continue", page.Metadata.Continue)
	}
}

// watch applies path's changes to st from version until the server ends
// the watch, and returns the version to go on from.
func watch[T any](ctx context.Context, w *Watcher, path, version string, st *store[T], meta func(*T) *gamma.Meta) (string, error) {
	path, q := splitQuery(path)
	for k, v := range map[string]string{"watch": "true", "resourceVersion": version, "allowWatchBookmarks": "true", "timeoutSeconds": "300"} {
		q.Set(k, v)
	}
	body, err := w.api.stream(ctx, path, q)
	if err != nil {
		return version, err
	}
	defer body.Close()
	dec := json.NewDecoder(body)
	for {
		var ev struct {
			Type   string          `json:"type"`
			Object json.RawMessage `json:"object"`
		}
		if err := dec.Decode(&ev); errors.Is(err, io.EOF) {
			return version, nil // the server's timeout: watch again
		} else if err != nil {
			return version, err
		}
		if ev.Type == "ERROR" {
			var status struct {
				Code    int    `json:"code"`
				Message string `json:"message"`
			}
			json.Unmarshal(ev.Object, &status)
			if status.Code == http.StatusGone {
				return version, errGone
			}
			return version, fmt.Errorf("watch %s: %d %s", path, status.Code, status.Message)
		}
		obj := new(T)
		if err := json.Unmarshal(ev.Object, obj); err != nil {
			return version, fmt.Errorf("watch %s: %w", path, err)
		}
		m := meta(obj)
		version = m.ResourceVersion
		if ev.Type == "BOOKMARK" {
			continue
		}
		w.mu.Lock()
		if ev.Type == "DELETED" {
			st.put(key(m), nil)
		} else {
			st.put(key(m), obj)
		}
		w.mu.Unlock()
		if !st.quiet {
			w.notify()
		}
	}
}

// splitQuery is a path's query (a field selector), apart.
func splitQuery(path string) (string, url.Values) {
	path, query, _ := strings.Cut(path, "?")
	q, _ := url.ParseQuery(query)
	return path, q
}

// Snapshot is the watched objects now, and whether every kind was listed
// once (before, routes computed from it would delete routes in force).
func (w *Watcher) Snapshot() (gamma.Input, bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	var in gamma.Input
	if !w.services.synced || !w.slices.synced || !w.httpRoute.synced || !w.tcpRoute.synced {
		return in, false
	}
	for _, s := range w.services.items {
		in.Services = append(in.Services, s)
	}
	for _, s := range w.slices.items {
		in.Slices = append(in.Slices, s)
	}
	for _, r := range w.httpRoute.items {
		in.Routes = append(in.Routes, r)
	}
	for _, r := range w.tcpRoute.items {
		in.Routes = append(in.Routes, r)
	}
	return in, true
}

// Report records each new problem as a Warning event on its route (once
// per reason, by this node's agent), and logs it.
func (w *Watcher) Report(ctx context.Context, problems []gamma.Problem) {
	now := map[gamma.Ref]string{}
	for _, p := range problems {
		now[p.Route] = p.Reason
		if w.reported[p.Route] == p.Reason {
			continue
		}
		w.log.Warn("route not in the kernel", "route", p.Route.String(), "reason", p.Reason)
		if err := w.event(ctx, p); err != nil {
			w.log.Warn("event not recorded", "route", p.Route.String(), "err", err)
		}
	}
	w.reported = now
}

func (w *Watcher) event(ctx context.Context, p gamma.Problem) error {
	now := time.Now().UTC().Format(time.RFC3339)
	ev := map[string]any{
		"apiVersion": "v1", "kind": "Event",
		"metadata": map[string]any{"generateName": p.Route.Name + ".", "namespace": p.Route.Namespace},
		"involvedObject": map[string]any{
			"apiVersion": "gateway.networking.k8s.io/v1", "kind": p.Route.Kind, "namespace": p.Route.Namespace, "name": p.Route.Name,
		},
		"reason":             "NotInKernel",
		"message":            "Sluice cannot carry out this route, so it is in no pod's kernel: " + p.Reason,
		"type":               "Warning",
		"source":             map[string]any{"component": "sluice-agent", "host": w.node},
		"reportingComponent": "sluice.dev/agent",
		"reportingInstance":  "sluice-agent-" + w.node,
		"firstTimestamp":     now,
		"lastTimestamp":      now,
		"count":              1,
	}
	return w.api.post(ctx, "/api/v1/namespaces/"+url.PathEscape(p.Route.Namespace)+"/events", ev)
}
