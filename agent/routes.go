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
// captured pod's kernel, and how far each pod is.
type clusterRoutes struct {
	want []redirect.Route
	gen  uint64 // bumped when want changes
	// owned are the services this agent ever routed from the cluster: a
	// route of one the cluster no longer asks for is deleted; routes set
	// by hand (sluice route set) on other services are left alone.
	owned   map[netip.AddrPort]bool
	applied map[string]uint64 // pin directory -> gen in force there
	pinDirs []string          // the pin root's entries when last looked at
	failed  bool              // a pod was left behind: try again next poll
	said    map[string]uint64 // pin directory -> gen whose failure was logged
}

// FollowCluster keeps every captured pod's routes as w's cluster asks:
// when a watched object changes, at once, and for a pod installed since,
// within poll. It returns when ctx ends.
func (a *Agent) FollowCluster(ctx context.Context, w *kube.Watcher, poll time.Duration) {
	cr := &clusterRoutes{owned: map[netip.AddrPort]bool{}, applied: map[string]uint64{}, said: map[string]uint64{}}
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
	if !slices.EqualFunc(res.Routes, cr.want, sameRoute) || cr.gen == 0 {
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
		cr.want, cr.gen = res.Routes, cr.gen+1
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
	for _, gen := range cr.applied {
		behind = behind || gen != cr.gen
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
	live := map[string]bool{}
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
		live[in.PinDir] = true
		if cr.applied[in.PinDir] == cr.gen {
			continue
		}
		if err := applyPod(in.Target(), cr); err != nil {
			if cr.said[in.PinDir] != cr.gen { // once a generation, though retried every poll
				a.opts.Logger.Warn("cluster routes not applied to a pod: retrying", "cgroup", in.Cgroup, "err", err)
				cr.said[in.PinDir] = cr.gen
			}
			cr.failed = true
			continue
		}
		cr.applied[in.PinDir] = cr.gen
	}
	for dir := range cr.applied {
		if !live[dir] {
			delete(cr.applied, dir)
			delete(cr.said, dir)
		}
	}
}

// applyPod sets the wanted routes in one pod and deletes those of the
// cluster's it no longer asks for, in one step.
func applyPod(t loader.Target, cr *clusterRoutes) error {
	cur, err := loader.Routes(t)
	if err != nil {
		return err
	}
	change := loader.RouteChange{Set: cr.want}
	for _, r := range cur {
		if cr.owned[r.Service] && !slices.ContainsFunc(cr.want, func(w redirect.Route) bool { return w.Service == r.Service }) {
			change.Delete = append(change.Delete, r.Service)
		}
	}
	if len(change.Set) == 0 && len(change.Delete) == 0 {
		return nil
	}
	return loader.ChangeRoutes(t, change)
}
