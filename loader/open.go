package loader

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"

	"github.com/cilium/ebpf"

	"github.com/sluicemesh/sluice/bpf"
	"github.com/sluicemesh/sluice/redirect"
)

// Access is what a handle on a pod's pins may do with the maps it opens.
type Access int

const (
	// ReadOnly opens maps for lookups only: what status and the agent's
	// readers need.
	ReadOnly Access = iota
	// ReadWrite opens maps for updates too.
	ReadWrite
)

// ErrMissingMap marks a map a handle was asked for that the pins lack: an
// install that did not finish, or one made by a Sluice without that map.
var ErrMissingMap = errors.New("missing map")

// Pins is one handle on a pod's pins: whose they are is checked once, as it
// opens, and the maps it opens stay open until Close, so a sidecar that
// dropped root keeps what it opened before. Every reader and writer of a
// pod's maps (routes, flows, offload, status, the plan) is built on one.
// A Pins is safe for concurrent use.
type Pins struct {
	target Target
	rec    record
	access Access

	mu   sync.Mutex
	maps map[string]*ebpf.Map
}

// Open opens t's pins with access: it reads the install record, refuses
// pins that belong to another cgroup, and opens the maps named (bpf.SluiceMap*
// names). A map missing from the pins fails with ErrMissingMap, naming it.
func Open(t Target, access Access, maps ...string) (*Pins, error) {
	rec, err := readRecord(t.PinDir)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("%w on %s: no pins at %s: run 'sluice install --cgroup %s' first", ErrNotInstalled, t.Cgroup, t.PinDir, t.Cgroup)
		}
		return nil, err
	}
	if err := checkOwner(t, rec); err != nil {
		return nil, err
	}
	p := pinsOf(t, rec, access)
	for _, name := range maps {
		if _, err := p.Map(name); err != nil {
			p.Close()
			return nil, err
		}
	}
	return p, nil
}

// pinsOf is a handle on pins whose record was read, and owner checked, by
// the caller.
func pinsOf(t Target, rec record, access Access) *Pins {
	return &Pins{target: t, rec: rec, access: access, maps: map[string]*ebpf.Map{}}
}

// Map returns the pinned map name, opening it with the handle's access on
// first use.
func (p *Pins) Map(name string) (*ebpf.Map, error) { return p.open(name, p.access) }

// open returns the pinned map name opened with access; a map already open
// is returned as it is.
func (p *Pins) open(name string, access Access) (*ebpf.Map, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if m := p.maps[name]; m != nil {
		return m, nil
	}
	m, err := ebpf.LoadPinnedMap(filepath.Join(p.target.PinDir, name), &ebpf.LoadPinOptions{ReadOnly: access == ReadOnly})
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("%w %s in the pins at %s: the install did not finish or is another Sluice version's: rerun 'sluice install' on the pod", ErrMissingMap, name, p.target.PinDir)
	}
	if err != nil {
		return nil, pinsError(p.target.PinDir, err)
	}
	p.maps[name] = m
	return m, nil
}

// Close closes every map the handle opened.
// nodeMap opens the node map name of the build the pod runs.
func (p *Pins) nodeMap(name string) (*ebpf.Map, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	key := "node/" + name
	if m := p.maps[key]; m != nil {
		return m, nil
	}
	if p.rec.Index == 0 {
		return nil, fmt.Errorf("%w %s: the install at %s is older than node-owned programs: rerun 'sluice install' on the pod", ErrMissingMap, name, p.target.PinDir)
	}
	maps, err := openNodeMaps(filepath.Dir(p.target.PinDir), p.rec.Object, name)
	if err != nil {
		return nil, err
	}
	p.maps[key] = maps[name]
	return maps[name], nil
}

func (p *Pins) Close() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	var errs []error
	for name, m := range p.maps {
		errs = append(errs, m.Close())
		delete(p.maps, name)
	}
	return errors.Join(errs...)
}

// policy returns the node maps of the pod's plan.
func (p *Pins) policy() (policyMaps, error) {
	if p.rec.Index == 0 || p.rec.Object != bpf.ObjectHash() {
		return policyMaps{}, errOlderLayout
	}
	maps := map[string]*ebpf.Map{}
	for _, name := range policyMapNames {
		m, err := p.nodeMap(name)
		if err != nil {
			return policyMaps{}, err
		}
		maps[name] = m
	}
	return policyMapsOf(maps, p.rec.Index), nil
}

// routeMaps returns the maps the routes live in, or errNoRouteMaps for a
// pod that had no route yet; the round-robin state only for a writable
// handle, the one that needs it.
func (p *Pins) routeMaps() (routeMaps, error) {
	var m routeMaps
	var err error
	// routes_active first: pinned, it says routes is too (makeRouteMaps).
	if m.active, err = p.Map(bpf.SluiceMapRoutesActive); err != nil {
		if errors.Is(err, ErrMissingMap) {
			err = errNoRouteMaps
		}
		return m, err
	}
	if m.routes, err = p.Map(bpf.SluiceMapRoutes); err != nil {
		return m, err
	}
	if p.access == ReadWrite {
		m.rr, err = p.nodeMap(bpf.SluiceMapRrStates)
		m.pod = p.rec.Index
	}
	return m, err
}

// Plan reads the plan in force, from the node's policy maps. An install
// from before the node's maps held the policy is errOlderLayout.
func (p *Pins) Plan() (redirect.Plan, error) {
	m, err := p.policy()
	if err != nil {
		return redirect.Plan{}, err
	}
	plan, _, err := m.read()
	return plan.Normalize(), err
}

// Counters reads the hooks' counters (see counterNames).
func (p *Pins) Counters() (map[string]uint64, error) {
	m, err := p.Map(bpf.SluiceMapCounters)
	if err != nil {
		return nil, err
	}
	return sumCounters(m)
}

// Routes reads the routes in force.
func (p *Pins) Routes() ([]RouteState, error) {
	m, err := p.routeMaps()
	if errors.Is(err, errNoRouteMaps) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	return m.states()
}

// count returns how many entries map name holds.
func (p *Pins) count(name string) (int, error) {
	m, err := p.Map(name)
	if err != nil {
		return 0, err
	}
	n, err := entries(m)
	if err != nil {
		return 0, fmt.Errorf("read %s: %w", name, err)
	}
	return n, nil
}

// RoutesVersion changes whenever the routes do, and costs one map lookup
// (a pin lookup until the pod's first route).
func (p *Pins) RoutesVersion() (uint32, error) {
	m, err := p.Map(bpf.SluiceMapRoutesActive)
	if errors.Is(err, ErrMissingMap) {
		return 0, nil
	}
	if err != nil {
		return 0, err
	}
	var active uint32
	if err := m.Lookup(uint32(0), &active); err != nil {
		return 0, fmt.Errorf("read active route slot: %w", err)
	}
	return active, nil
}
