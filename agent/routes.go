package agent

import (
	"context"
	"net/netip"
	"os"
	"slices"
	"time"

	"github.com/sluicemesh/sluice/gamma"
	"github.com/sluicemesh/sluice/kube"
	"github.com/sluicemesh/sluice/loader"
	"github.com/sluicemesh/sluice/redirect"
)

// clusterRoutes is what the cluster's Gateway API routes ask of every
// captured pod's kernel, and of those that resolve Services the Services'
// routes too, and how far each pod is.
type clusterRoutes struct {
	want     []redirect.Route
	services []gamma.ServiceRoute // for pods installed with --resolve-services
	gen      gens                 // bumped as want and services change
	// owned are the services this agent ever routed from the cluster: a
	// route of one the cluster no longer asks for is deleted; routes set
	// by hand (sluice route set) on other services are left alone.
	owned map[netip.AddrPort]bool
	// resolved are the Services it ever resolved: owned in the pods
	// that resolve Services only (a route set by hand on a cluster IP
	// in another pod stays).
	resolved map[netip.AddrPort]bool
	applied  map[podKey]gens // the generations in force in each pod
	pinDirs  []string        // the pin root's entries when last looked at
	failed   bool            // a pod was left behind: try again next poll
	failSaid map[podKey]gens // the generations whose failure was logged
	leftSaid map[podKey]int  // the Service ports without room, as last logged
}

// gens are the generations of the routes (every pod's) and of the
// Services' (the resolving pods'): an endpoint changing brings up to date
// only the pods that resolve Services.
type gens struct{ routes, services uint64 }

// of is the generations pod k should be at.
func (g gens) of(k podKey) gens {
	if !k.resolve {
		g.services = 0
	}
	return g
}

// podKey is a pod's pin directory and whether it resolves Services: an
// install rerun in place with the other choice is a pod to bring up to
// date.
type podKey struct {
	dir     string
	resolve bool
}

// FollowCluster keeps every captured pod's routes as w's cluster asks:
// when a watched object changes, at once, and for a pod installed since,
// within poll. It returns when ctx ends.
func (a *Agent) FollowCluster(ctx context.Context, w *kube.Watcher, poll time.Duration) {
	cr := &clusterRoutes{owned: map[netip.AddrPort]bool{}, resolved: map[netip.AddrPort]bool{}, applied: map[podKey]gens{},
		failSaid: map[podKey]gens{}, leftSaid: map[podKey]int{}}
	t := time.NewTicker(poll)
	defer t.Stop()
	synced := false
	for {
		select {
		case <-ctx.Done():
			return
		case <-w.Changed():
			synced = a.recompute(ctx, w, cr) || synced
		case <-t.C:
			if !synced {
				// Until every kind was listed once, no route is
				// touched: a partial view would delete routes in force.
				synced = a.recompute(ctx, w, cr)
			}
		}
		if synced {
			a.applyClusterRoutes(cr)
		}
	}
}

// recompute takes a snapshot and, when complete, sets what the pods
// should hold; it reports whether it was.
func (a *Agent) recompute(ctx context.Context, w *kube.Watcher, cr *clusterRoutes) bool {
	in, synced := w.Snapshot()
	if !synced {
		return false
	}
	res := gamma.Translate(in)
	w.Report(ctx, res.Problems)
	services, un := gamma.Services(in, res.From)
	if !slices.EqualFunc(services, cr.services, func(a, b gamma.ServiceRoute) bool { return sameRoute(a.Route, b.Route) }) {
		for _, s := range services {
			cr.resolved[s.Service] = true
		}
		if len(services) != len(cr.services) {
			a.opts.Logger.Info("services to resolve for the pods that ask", "ports", len(services),
				"without_ready_endpoint", un.NoEndpoint, "over_16_endpoints", un.TooManyEndpts, "affinity_or_local", un.KubeProxyOnly)
		}
		cr.services = services
		cr.gen.services++
	}
	if !slices.EqualFunc(res.Routes, cr.want, sameRoute) || cr.gen.routes == 0 {
		for _, r := range res.Routes {
			cr.owned[r.Service] = true
			if !slices.ContainsFunc(cr.want, func(w redirect.Route) bool { return sameRoute(w, r) }) {
				a.opts.Logger.Info("route from the cluster", "service", r.Service, "from", res.From[r.Service].String(), "backends", gamma.Describe(r))
			}
		}
		for _, w := range cr.want {
			if !slices.ContainsFunc(res.Routes, func(r redirect.Route) bool { return r.Service == w.Service }) {
				a.opts.Logger.Info("route from the cluster removed", "service", w.Service)
			}
		}
		cr.want = res.Routes
		cr.gen.routes++
	}
	return true
}

func sameRoute(a, b redirect.Route) bool {
	return a.Service == b.Service && a.Mode == b.Mode && slices.Equal(a.Backends, b.Backends)
}

// applyClusterRoutes brings every pod not at the current generation to it.
// It lists the installs only when the generation or the pin root's entries
// changed, so an idle pass is one directory read.
func (a *Agent) applyClusterRoutes(cr *clusterRoutes) {
	entries, err := os.ReadDir(a.opts.PinRoot)
	if err != nil {
		return // no pod installed yet
	}
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	behind := cr.failed || !slices.Equal(names, cr.pinDirs)
	for k, gen := range cr.applied {
		behind = behind || gen != cr.gen.of(k)
	}
	if !behind {
		return
	}
	cr.pinDirs, cr.failed = names, false
	installs, err := loader.List(a.opts.PinRoot)
	if err != nil {
		a.opts.Logger.Warn("cluster routes: list the pods", "err", err)
		return
	}
	live := map[podKey]bool{}
	for _, in := range installs {
		if in.Gone() {
			continue
		}
		if in.Object == "" {
			// Its install is under way: look again next poll (its
			// directory, already seen, will not say so).
			cr.failed = true
			continue
		}
		k := podKey{in.PinDir, in.ResolveServices}
		live[k] = true
		gen := cr.gen.of(k)
		if cr.applied[k] == gen {
			continue
		}
		room, left, err := applyPod(in, cr)
		if err != nil {
			if cr.failSaid[k] != gen { // once a generation, though retried every poll
				a.opts.Logger.Warn("cluster routes not applied to a pod: retrying", "cgroup", in.Cgroup, "err", err)
				cr.failSaid[k] = gen
			}
			cr.failed = true
			continue
		}
		if left != cr.leftSaid[k] {
			if left > 0 {
				a.opts.Logger.Warn("services not resolved in a pod: no room for their routes, kube-proxy carries them",
					"cgroup", in.Cgroup, "service_ports", left, "room", room)
			}
			cr.leftSaid[k] = left
		}
		cr.applied[k] = gen
	}
	for k := range cr.applied {
		if !live[k] {
			delete(cr.applied, k)
			delete(cr.failSaid, k)
			delete(cr.leftSaid, k)
		}
	}
}

// applyPod sets the routes one pod should hold from the cluster and
// deletes those of the cluster's it no longer asks for, in one step. It
// returns the room the pod had for Services' routes and how many Service
// ports found none.
func applyPod(in loader.Installed, cr *clusterRoutes) (room, left int, err error) {
	t := in.Target()
	cur, err := loader.Routes(t)
	if err != nil {
		return 0, 0, err
	}
	ours := func(svc netip.AddrPort) bool { return cr.owned[svc] || in.ResolveServices && cr.resolved[svc] }
	want := cr.want
	if in.ResolveServices {
		manual := 0
		for _, r := range cur {
			if !ours(r.Service) {
				manual++
			}
		}
		room = max(0, redirect.MaxRoutes-len(cr.want)-manual)
		var services []redirect.Route
		services, left = podServices(cr.services, in.Identity["namespace"], room)
		want = slices.Concat(cr.want, services)
	}
	// Only what differs is set: a route set again would start its
	// round-robin over, and an endpoint of one Service changing would
	// restart every route of every pod.
	var change loader.RouteChange
	for _, w := range want {
		if !slices.ContainsFunc(cur, func(r loader.RouteState) bool { return sameRoute(r.Route, w) }) {
			change.Set = append(change.Set, w)
		}
	}
	for _, r := range cur {
		if ours(r.Service) && !slices.ContainsFunc(want, func(w redirect.Route) bool { return w.Service == r.Service }) {
			change.Delete = append(change.Delete, r.Service)
		}
	}
	if len(change.Set) == 0 && len(change.Delete) == 0 {
		return room, left, nil
	}
	return room, left, loader.ChangeRoutes(t, change)
}

// podServices are the Service routes a pod of namespace ns gets within
// room: its own namespace's first (what its app most likely calls), then
// the others' in order. It returns how many were left out.
func podServices(all []gamma.ServiceRoute, ns string, room int) ([]redirect.Route, int) {
	var out []redirect.Route
	for _, own := range []bool{true, false} {
		for _, s := range all {
			if (s.Namespace == ns) == own && len(out) < room {
				out = append(out, s.Route)
			}
		}
	}
	return out, len(all) - len(out)
}
