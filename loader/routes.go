package loader

import (
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"os"
	"path/filepath"
	"slices"

	"github.com/cilium/ebpf"

	"github.com/sluicemesh/sluice/bpf"
	"github.com/sluicemesh/sluice/podstate"
	"github.com/sluicemesh/sluice/redirect"
)

// RouteState is a route in force, with what the kernel counted for it.
type RouteState = podstate.RouteState

// ErrNoRoute marks a change naming a service that has no route.
var ErrNoRoute = errors.New("no route")

// errNoRouteMaps marks a pod that had no route yet: its route maps are made
// by the first (makeRouteMaps).
var errNoRouteMaps = errors.New("no route maps")

// Rollback reasons as the route records them.
const (
	RollbackFailures  = "connect_failures"
	RollbackLatency   = "connect_latency"
	RollbackNoTraffic = "no_traffic"
)

var rollbackReasons = map[uint32]string{
	uint32(bpf.SluiceRollbackReasonROLLBACK_FAILURES):   RollbackFailures,
	uint32(bpf.SluiceRollbackReasonROLLBACK_LATENCY):    RollbackLatency,
	uint32(bpf.SluiceRollbackReasonROLLBACK_NO_TRAFFIC): RollbackNoTraffic,
}

// routeMaps are the maps the routes live in; rr (round-robin state) is
// opened for writers only.
type routeMaps struct {
	routes, active, rr *ebpf.Map
	pod                uint32 // the pod's index in rr, a node map
}

// forgetRoundRobin deletes the round-robin state of svcs: a route deleted
// or set anew must start its sequence over, and the state of routes that
// are gone must not take up the table (once full, picks fall back to
// random).
func (m routeMaps) forgetRoundRobin(svcs []netip.AddrPort) error {
	for _, svc := range svcs {
		k := bpf.SluiceRrKey{Vip: Addr6(svc.Addr()), Port: svc.Port(), Pod: m.pod}
		if err := m.rr.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return fmt.Errorf("free round-robin state of %s: %w", svc, err)
		}
	}
	return nil
}

// read returns the routes in force, by service, and their slot.
func (m routeMaps) read() (map[netip.AddrPort]bpf.SluiceRoute, uint8, error) {
	var active uint32
	if err := m.active.Lookup(uint32(0), &active); err != nil {
		return nil, 0, fmt.Errorf("read active route slot: %w", err)
	}
	slot := uint8(active & 1)
	out := map[netip.AddrPort]bpf.SluiceRoute{}
	var k bpf.SluiceRouteKey
	var v bpf.SluiceRoute
	it := m.routes.Iterate()
	for it.Next(&k, &v) {
		if k.Slot == slot {
			out[netip.AddrPortFrom(AddrFrom6(k.Vip), k.Port)] = v
		}
	}
	if err := it.Err(); err != nil {
		return nil, 0, fmt.Errorf("read routes: %w", err)
	}
	return out, slot, nil
}

// Routes returns t's routes in force. It needs read access to the pins:
// root's.
func Routes(t Target) ([]RouteState, error) {
	p, err := Open(t, ReadOnly)
	if err != nil {
		return nil, err
	}
	defer p.Close()
	return p.Routes()
}

func (m routeMaps) states() ([]RouteState, error) {
	cur, _, err := m.read()
	if err != nil {
		return nil, err
	}
	out := make([]RouteState, 0, len(cur))
	for svc, v := range cur {
		out = append(out, routeState(svc, v))
	}
	slices.SortFunc(out, func(a, b RouteState) int { return a.Service.Compare(b.Service) })
	return out, nil
}

func routeState(svc netip.AddrPort, v bpf.SluiceRoute) RouteState {
	s := RouteState{Route: redirect.Route{Service: svc, Mode: redirect.ModeRandom}, Generation: v.Generation,
		RolloutStep: v.RolloutStep, Rollbacks: v.Rollbacks, LastRollback: rollbackReasons[v.LastRollback]}
	if v.Mode == uint32(bpf.SluiceRouteModeROUTE_ROUND_ROBIN) {
		s.Mode = redirect.ModeRoundRobin
	}
	for _, b := range v.Backends[:min(int(v.Count), len(v.Backends))] {
		s.Backends = append(s.Backends, redirect.Backend{Address: AddrFrom6(b.Addr), Port: b.Port, Weight: b.Weight})
		s.Picks = append(s.Picks, b.Picks)
	}
	return s
}

// RouteChange is one change of a pod's routes: services to set (replacing
// their backend sets whole) and services to delete.
type RouteChange struct {
	Set    []redirect.Route
	Delete []netip.AddrPort
	// Rollout, when set, records a rollout's progress on its route.
	Rollout *RolloutRecord
}

// RolloutRecord is what a rollout step writes on its route.
type RolloutRecord struct {
	Service  netip.AddrPort
	Step     uint32 // the canary's weight in percent
	Rollback string // RollbackFailures, RollbackLatency or RollbackNoTraffic when rolling back
}

// ChangeRoutes applies change to t's routes as one visible step: the
// connect hook sees every route as it was or every route as it is after,
// never a mix, and routes the change does not name are carried over as they
// were (their round-robin sequence goes on; a route deleted, or set where
// there was none, starts its own over). Concurrent changes, from any
// process, are serialized. Routes are validated first; a delete of a
// service without a route fails with ErrNoRoute; on any error nothing
// changes.
func ChangeRoutes(t Target, change RouteChange) error {
	for _, r := range change.Set {
		// Zero weights were allowed or refused by the caller.
		if err := r.Validate(true); err != nil {
			return err
		}
	}
	unlock, err := lock(filepath.Dir(t.PinDir))
	if err != nil {
		return err
	}
	defer unlock()
	p, err := Open(t, ReadWrite)
	if err != nil {
		return err
	}
	defer p.Close()
	m, err := p.routeMaps()
	if errors.Is(err, errNoRouteMaps) {
		if len(change.Set) == 0 {
			// No route yet: a delete or rollout names none.
			_, _, _, err := change.apply(nil)
			return err
		}
		if err = p.makeRouteMaps(); err == nil {
			m, err = p.routeMaps()
		}
	}
	if err != nil {
		return err
	}
	cur, slot, err := m.read()
	if err != nil {
		return err
	}
	next, added, deleted, err := change.apply(cur)
	if err != nil {
		return err
	}
	if len(next) > int(m.routes.MaxEntries()/2) {
		return fmt.Errorf("%d routes: a pod holds at most %d", len(next), redirect.MaxRoutes)
	}

	// A new route's state goes before the flip (no route in force uses it
	// yet: one left by a deleted route would carry on its sequence)...
	if err := m.forgetRoundRobin(added); err != nil {
		return err
	}
	if err := m.writeSlot(next, slot^1); err != nil {
		return err
	}
	// ...a deleted route's after it, once no new connect can pick it.
	return m.forgetRoundRobin(deleted)
}

// makeRouteMaps makes the pod's route maps, with its first route: an idle
// pod's kernel memory holds neither (5 KiB). They are put where the node's
// programs find the pod's maps before they are pinned, routes before
// routes_active: a crash leaves routes_active unpinned, and the next change
// makes both anew (nothing was written to them yet). The caller holds the
// pin root's lock.
func (p *Pins) makeRouteMaps() error {
	if p.rec.Index == 0 {
		// An install from before programs were the node's made them.
		return fmt.Errorf("%w %s in the pins at %s: rerun 'sluice install' on the pod", ErrMissingMap, bpf.SluiceMapRoutesActive, p.target.PinDir)
	}
	made, err := makePodMaps(routeMapNames, false)
	if err != nil {
		return err
	}
	defer func() {
		for _, m := range made {
			m.Close()
		}
	}()
	var slots []outerSlot
	for _, name := range routeMapNames {
		outer, err := p.nodeMap(name)
		if err != nil {
			return err
		}
		slots = append(slots, outerSlot{name, outer, made[name]})
	}
	if err := setOuter(p.rec.Index, slots); err != nil {
		return err
	}
	for _, name := range routeMapNames {
		pin := filepath.Join(p.target.PinDir, name)
		if err := os.Remove(pin); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("replace map %s: %w", name, err)
		}
		if err := made[name].Pin(pin); err != nil {
			return fmt.Errorf("pin map %s: %w", name, err)
		}
		if err := chownMod(pin, 0, ownerMode); err != nil {
			return err
		}
	}
	return nil
}

// apply returns the routes after the change, and the services it adds and
// deletes; cur is not changed.
func (change RouteChange) apply(cur map[netip.AddrPort]bpf.SluiceRoute) (next map[netip.AddrPort]bpf.SluiceRoute, added, deleted []netip.AddrPort, err error) {
	next = maps.Clone(cur)
	for _, svc := range change.Delete {
		svc = unmapped(svc)
		if _, ok := next[svc]; !ok {
			return nil, nil, nil, fmt.Errorf("%w for %s: nothing deleted (see 'sluice route list')", ErrNoRoute, svc)
		}
		delete(next, svc)
		deleted = append(deleted, svc)
	}
	for _, r := range change.Set {
		r = r.Normalize()
		if _, ok := cur[r.Service]; !ok {
			added = append(added, r.Service)
		}
		next[r.Service] = routeValue(r, cur[r.Service])
	}
	if rec := change.Rollout; rec != nil {
		svc := unmapped(rec.Service)
		v, ok := next[svc]
		if !ok {
			return nil, nil, nil, fmt.Errorf("%w for %s", ErrNoRoute, svc)
		}
		v.RolloutStep = rec.Step
		for code, name := range rollbackReasons {
			if name == rec.Rollback {
				v.Rollbacks++
				v.LastRollback = code
			}
		}
		next[svc] = v
	}
	return next, added, deleted, nil
}

// writeSlot fills the slot not in force with next, then puts it in force.
func (m routeMaps) writeSlot(next map[netip.AddrPort]bpf.SluiceRoute, other uint8) error {
	// Leftovers of the slot's last use go first.
	var k bpf.SluiceRouteKey
	var v bpf.SluiceRoute
	var stale []bpf.SluiceRouteKey
	it := m.routes.Iterate()
	for it.Next(&k, &v) {
		if k.Slot == other {
			stale = append(stale, k)
		}
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("read routes: %w", err)
	}
	for _, k := range stale {
		if err := m.routes.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return fmt.Errorf("clear route slot: %w", err)
		}
	}
	for svc, v := range next {
		key := bpf.SluiceRouteKey{Vip: Addr6(svc.Addr()), Port: svc.Port(), Slot: other}
		if err := m.routes.Put(key, &v); err != nil {
			return fmt.Errorf("write route %s: %w", svc, err)
		}
	}
	// The connect hook reads the low bit; the bits above count the
	// changes, for readers that want to know the routes changed.
	var active uint32
	if err := m.active.Lookup(uint32(0), &active); err != nil {
		return fmt.Errorf("read active route slot: %w", err)
	}
	if err := m.active.Put(uint32(0), (active>>1+1)<<1|uint32(other)); err != nil {
		return fmt.Errorf("switch to the new routes: %w", err)
	}
	return nil
}

// routeValue is r as the BPF side holds it. The backends' pick counts and
// the rollout record carry over from old; the generation changes when the
// backend set or mode does, which restarts a round-robin sequence.
func routeValue(r redirect.Route, old bpf.SluiceRoute) bpf.SluiceRoute {
	v := bpf.SluiceRoute{Count: uint32(len(r.Backends)), Generation: old.Generation,
		RolloutStep: old.RolloutStep, Rollbacks: old.Rollbacks, LastRollback: old.LastRollback}
	if r.Mode == redirect.ModeRoundRobin {
		v.Mode = uint32(bpf.SluiceRouteModeROUTE_ROUND_ROBIN)
	}
	for i, b := range r.Backends {
		v.Backends[i] = bpf.SluiceBackend{Addr: Addr6(b.Address), Port: b.Port, Family: afInet6, Weight: b.Weight}
		if b.Address.Is4() {
			v.Backends[i].Family = afInet
		}
		v.Total += b.Weight
		for _, ob := range old.Backends[:min(int(old.Count), len(old.Backends))] {
			if ob.Addr == v.Backends[i].Addr && ob.Port == b.Port {
				v.Backends[i].Picks = ob.Picks
			}
		}
	}
	same := old.Count == v.Count && old.Mode == v.Mode
	for i := range v.Backends {
		a, b := v.Backends[i], old.Backends[i]
		same = same && a.Addr == b.Addr && a.Port == b.Port && a.Weight == b.Weight
	}
	if !same {
		v.Generation = old.Generation + 1
	}
	return v
}

func unmapped(ap netip.AddrPort) netip.AddrPort {
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
}
