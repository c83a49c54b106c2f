package loader

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"sync"

	"github.com/cilium/ebpf"

	"github.com/sluicemesh/sluice/bpf"
	"github.com/sluicemesh/sluice/internal/nsenter"
)

// A node runs one copy of each build's programs, loaded and verified once
// and pinned under <pin root>/node/<object hash>/ with the maps every pod
// shares: the arrays of the pods' own maps (bpf/sluice.h: POD_MAP), the
// pods by network namespace and by address, and the round-robin state.
// A pod is its own maps (pinned in its directory, as before), an index in
// those arrays, and its links to the node's programs.

// maxPods is MAX_PODS: pod indexes run from 1 to maxPods-1.
const maxPods = 2048

const nodeDirMode = 0o700

// nodeDir is where the build object pins its node state under root.
func nodeDir(root, object string) string { return filepath.Join(root, "node", object) }

// nodeBuilds names the builds with node state under root: none when there
// is no node directory.
func nodeBuilds(root string) ([]string, error) {
	entries, err := os.ReadDir(filepath.Join(root, "node"))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read node state: %w", err)
	}
	var out []string
	for _, e := range entries {
		out = append(out, e.Name())
	}
	return out, nil
}

// node is a build's node state, open.
type node struct {
	dir   string
	progs map[string]*ebpf.Program
	maps  map[string]*ebpf.Map
}

func (n *node) Close() {
	for _, p := range n.progs {
		p.Close()
	}
	for _, m := range n.maps {
		m.Close()
	}
}

// openNode opens this build's node state under root, loading the programs
// and pinning them and the node maps first if no complete copy is there
// (none, or one a killed install left half made: no pod uses that yet, since
// a pod registers only once its node is complete). The caller holds root's
// lock. loaded says whether this call loaded the programs.
func openNode(root string) (n *node, loaded bool, err error) {
	dir := nodeDir(root, bpf.ObjectHash())
	progs, maps := objectNames()
	if n, err := loadNode(dir, progs, maps); err == nil {
		return n, false, nil
	} else if !errors.Is(err, os.ErrNotExist) {
		return nil, false, err
	}
	if err := os.RemoveAll(dir); err != nil {
		return nil, false, fmt.Errorf("remove half-made node state %s: %w", dir, err)
	}
	made, err := mkdirs(dir, nodeDirMode)
	defer func() {
		if err != nil {
			os.RemoveAll(dir)
			for i := len(made) - 1; i >= 0; i-- {
				os.Remove(made[i])
			}
		}
	}()
	if err != nil {
		return nil, false, err
	}
	if err := fault("load"); err != nil {
		return nil, false, err
	}
	spec, err := bpf.LoadSluice()
	if err != nil {
		return nil, false, fmt.Errorf("read embedded BPF object: %w", err)
	}
	coll, err := load(spec)
	if err != nil {
		return nil, false, err
	}
	n = &node{dir: dir, progs: coll.Programs, maps: map[string]*ebpf.Map{}}
	coll.Programs = nil
	for _, name := range maps {
		n.maps[name] = coll.Maps[name]
		delete(coll.Maps, name)
	}
	coll.Close() // what is left: the constants' maps, which the programs hold
	// The programs are pinned last: a directory holding them all is
	// complete.
	for _, name := range maps {
		if err := n.maps[name].Pin(filepath.Join(dir, name)); err != nil {
			n.Close()
			return nil, false, fmt.Errorf("pin node map %s: %w", name, err)
		}
	}
	for _, name := range progs {
		if err := n.progs[name].Pin(filepath.Join(dir, name)); err != nil {
			n.Close()
			return nil, false, fmt.Errorf("pin program %s: %w", name, err)
		}
	}
	return n, true, nil
}

// loadNode opens a complete node directory; os.ErrNotExist when it is
// missing or incomplete.
func loadNode(dir string, progs, maps []string) (*node, error) {
	n := &node{dir: dir, progs: map[string]*ebpf.Program{}, maps: map[string]*ebpf.Map{}}
	for _, name := range progs {
		p, err := ebpf.LoadPinnedProgram(filepath.Join(dir, name), nil)
		if err != nil {
			n.Close()
			if errors.Is(err, os.ErrNotExist) {
				return nil, err
			}
			return nil, fmt.Errorf("open program %s: %w", filepath.Join(dir, name), err)
		}
		n.progs[name] = p
	}
	for _, name := range maps {
		m, err := ebpf.LoadPinnedMap(filepath.Join(dir, name), nil)
		if err != nil {
			n.Close()
			if errors.Is(err, os.ErrNotExist) {
				return nil, err
			}
			return nil, fmt.Errorf("open node map %s: %w", filepath.Join(dir, name), err)
		}
		n.maps[name] = m
	}
	return n, nil
}

// openNodeProgram opens this build's program name on the node under root;
// nil when no pod has loaded the build yet.
func openNodeProgram(root, name string) (*ebpf.Program, error) {
	path := filepath.Join(nodeDir(root, bpf.ObjectHash()), name)
	p, err := ebpf.LoadPinnedProgram(path, nil)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("open program %s: %w", path, err)
	}
	return p, nil
}

// openNodeMaps opens the node maps of the build object under root.
func openNodeMaps(root, object string, names ...string) (map[string]*ebpf.Map, error) {
	out := map[string]*ebpf.Map{}
	for _, name := range names {
		m, err := ebpf.LoadPinnedMap(filepath.Join(nodeDir(root, object), name), nil)
		if err != nil {
			for _, m := range out {
				m.Close()
			}
			return nil, fmt.Errorf("open node map %s: %w", name, err)
		}
		out[name] = m
	}
	return out, nil
}

// podIndex returns the index the pod whose network namespace has cookie
// holds in n, or a free one for it. A namespace already holding another
// pod (another cgroup) is refused: the hooks find their pod by namespace.
func (n *node) podIndex(cookie uint64, cgroup string, others func(idx uint32) string) (uint32, error) {
	var idx uint32
	if err := n.maps[bpf.SluiceMapPods].Lookup(cookie, &idx); err == nil {
		if owner := others(idx); owner != "" {
			return 0, fmt.Errorf("the network namespace of %s already holds a Sluice pod (cgroup %s): Sluice captures one pod per network namespace; uninstall that one first", cgroup, owner)
		}
		return idx, nil
	} else if !errors.Is(err, ebpf.ErrKeyNotExist) {
		return 0, fmt.Errorf("read pods: %w", err)
	}
	active, err := readArray(n.maps[bpf.SluiceMapPolicyActive], maxPods)
	if err != nil {
		return 0, fmt.Errorf("read policy_active: %w", err)
	}
	for i := uint32(1); i < maxPods; i++ {
		if active[i]&activeTaken == 0 {
			return i, nil
		}
	}
	// An install that died between taking an index and registering the
	// pod left it taken by no pod: the first index no pod holds is free.
	used := map[uint32]bool{}
	if _, err := keysWhere(n.maps[bpf.SluiceMapPods], func(_ uint64, idx uint32) bool {
		used[idx] = true
		return false
	}); err != nil {
		return 0, fmt.Errorf("read pods: %w", err)
	}
	for i := uint32(1); i < maxPods; i++ {
		if !used[i] {
			return i, nil
		}
	}
	return 0, fmt.Errorf("this node already has %d Sluice pods, the most one build holds", maxPods-1)
}

// The bits of a pod's policy_active entry. The hooks read the slot in force
// (the low bit); the next one marks the index as a pod's, from install's
// allocation until unregister's end, so install finds a free index in one
// read of the array instead of a walk of the pods map.
const (
	activeSlot  = 1
	activeTaken = 2
)

// take marks idx as a pod's (slot 0 in force, both slots empty until the
// policy is written).
func (n *node) take(idx uint32) error {
	if err := n.maps[bpf.SluiceMapPolicyActive].Put(idx, uint32(activeTaken)); err != nil {
		return fmt.Errorf("take index %d: %w", idx, err)
	}
	return nil
}

// readArray reads the n uint32 values of an array map in one batch.
func readArray(m *ebpf.Map, n int) ([]uint32, error) {
	keys, vals := make([]uint32, n), make([]uint32, n)
	var cursor ebpf.MapBatchCursor
	got := 0
	for got < n {
		c, err := m.BatchLookup(&cursor, keys[got:], vals[got:], nil)
		got += c
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			break
		}
		if err != nil {
			return nil, err
		}
	}
	out := make([]uint32, n)
	for i := range got {
		if keys[i] < uint32(n) {
			out[keys[i]] = vals[i]
		}
	}
	return out, nil
}

// register makes the node's programs find the pod: its maps at idx in every
// array, then its addresses and, last, its network namespace, which the
// hooks look up first.
// An address another pod holds is taken over only when live says that pod
// is gone (Kubernetes hands a deleted pod's address to the next one before
// the agent collects what the deleted one left).
func (n *node) register(idx uint32, cookie uint64, podMaps map[string]*ebpf.Map, addrs []netip.Addr, live func(idx uint32) string) error {
	var slots []outerSlot
	for name, m := range podMaps {
		if outer := n.maps[name]; outer != nil && outer.Type() == ebpf.ArrayOfMaps {
			slots = append(slots, outerSlot{name, outer, m})
		}
	}
	if err := setOuter(idx, slots); err != nil {
		return err
	}
	for _, a := range addrs {
		var owner uint32
		err := n.maps[bpf.SluiceMapPodIps].Lookup(Addr6(a), &owner)
		if err == nil && owner != idx {
			if other := live(owner); other != "" {
				return fmt.Errorf("address %s already belongs to another Sluice pod of this node (cgroup %s): pods of a node must not share addresses", a, other)
			}
		}
		if err := n.maps[bpf.SluiceMapPodIps].Put(Addr6(a), idx); err != nil {
			return fmt.Errorf("register address %s: %w", a, err)
		}
	}
	if err := n.maps[bpf.SluiceMapPods].Put(cookie, idx); err != nil {
		return fmt.Errorf("register the pod: %w", err)
	}
	return nil
}

// unregister removes every trace of the pod at idx from the node maps m
// (a build's, open): the node's programs find it no more.
func unregister(m map[string]*ebpf.Map, idx uint32) error {
	errs := []error{
		deleteWhere(m[bpf.SluiceMapPods], func(_ uint64, v uint32) bool { return v == idx }),
		deleteWhere(m[bpf.SluiceMapPodIps], func(_ bpf.SluiceAddr6, v uint32) bool { return v == idx }),
		deleteWhere(m[bpf.SluiceMapRrStates], func(k bpf.SluiceRrKey, _ bpf.SluiceRrState) bool { return k.Pod == idx }),
	}
	if m[bpf.SluiceMapPorts] != nil {
		errs = append(errs, policyMapsOf(m, idx).forget())
	}
	var slots []outerSlot
	for name, outer := range m {
		if outer.Type() == ebpf.ArrayOfMaps {
			slots = append(slots, outerSlot{name, outer, nil})
		}
	}
	errs = append(errs, setOuter(idx, slots))
	// The index is free once nothing of the pod is left in the maps; one
	// that could not be emptied stays taken (podIndex reclaims it when
	// no index is left).
	if err := errors.Join(errs...); err != nil {
		return err
	}
	if active := m[bpf.SluiceMapPolicyActive]; active != nil {
		if err := active.Put(idx, uint32(0)); err != nil {
			return fmt.Errorf("free index %d: %w", idx, err)
		}
	}
	return nil
}

// deleteWhere deletes the entries of m that match; a nil m has none.
func deleteWhere[K, V any](m *ebpf.Map, match func(K, V) bool) error {
	if m == nil {
		return nil
	}
	keys, err := keysWhere(m, match)
	if err != nil {
		return fmt.Errorf("read %s: %w", m.String(), err)
	}
	for _, k := range keys {
		if err := m.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return fmt.Errorf("delete from %s: %w", m.String(), err)
		}
	}
	return nil
}

// leaveNode unregisters the pod at idx (whose pins are at self) from the
// build object's node state under root and removes that state once no
// other pod runs it. The caller holds root's lock.
func leaveNode(root, object string, idx uint32, self string) error {
	dir := nodeDir(root, object)
	entries, err := os.ReadDir(dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("read node state %s: %w", dir, err)
	}
	m := map[string]*ebpf.Map{}
	defer func() {
		for _, mp := range m {
			mp.Close()
		}
	}()
	for _, e := range entries {
		mp, err := ebpf.LoadPinnedMap(filepath.Join(dir, e.Name()), nil)
		if err != nil {
			continue // a program
		}
		m[e.Name()] = mp
	}
	if idx != 0 {
		if err := unregister(m, idx); err != nil {
			return err
		}
	}
	// Other pods still run this build while an install record says so:
	// registrations with no record (pins removed behind Sluice's back)
	// keep nothing alive.
	if runsOn(root, object, self) {
		return nil
	}
	if err := os.RemoveAll(dir); err != nil {
		return fmt.Errorf("remove node state %s: %w", dir, err)
	}
	os.Remove(filepath.Dir(dir)) // the node directory, once empty
	return nil
}

// runsOn reports whether the install record of a pod under root, other
// than the one pinned at self, says it runs on the build object. It stops
// at the first: with many pods on the node, uninstall reads one or two
// records, not all of them.
func runsOn(root, object, self string) bool {
	entries, _ := os.ReadDir(root)
	for _, e := range entries {
		dir := filepath.Join(root, e.Name())
		if _, err := strconv.ParseUint(e.Name(), 10, 64); err != nil || !e.IsDir() || dir == self {
			continue
		}
		if rec, err := readRecord(dir); err == nil && rec.Object == object && rec.Index != 0 {
			return true
		}
	}
	return false
}

// netnsOfCgroup returns the network namespace of the first process in
// cgroup or below it that this one can see, or "" when there is none. An
// init container sees only itself (the pod's other processes are listed as
// 0, outside its PID namespace): its own namespace is the pod's.
func netnsOfCgroup(cgroup string) string {
	pid := firstProcess(cgroup, "0")
	if pid == "" {
		return ""
	}
	ns := filepath.Join("/proc", pid, "ns", "net")
	if _, err := os.Stat(ns); err != nil {
		return ""
	}
	return ns
}

// UninstallNode removes what the node holds for every build under root:
// programs and node maps no pod runs. It refuses while a pod still runs
// them, naming it: uninstall the pods first (or let the agent collect the
// ones that are gone). ErrNotInstalled means there was nothing.
func UninstallNode(root string) error {
	if _, err := os.Stat(root); err != nil {
		return fmt.Errorf("%w: no pins at %s", ErrNotInstalled, root)
	}
	unlock, err := lock(root)
	if err != nil {
		return err
	}
	defer unlock()
	builds, err := nodeBuilds(root)
	if err != nil {
		return err
	}
	if len(builds) == 0 {
		return fmt.Errorf("%w: no node state at %s", ErrNotInstalled, filepath.Join(root, "node"))
	}
	pods, err := List(root)
	if err != nil {
		return err
	}
	for _, p := range pods {
		if rec, err := readRecord(p.PinDir); err == nil && rec.Index != 0 {
			return fmt.Errorf("pod %s still runs on the node's programs: run 'sluice uninstall --cgroup %s' first (or, for a pod that is gone, let 'sluice agent' collect it)", p.Cgroup, p.Cgroup)
		}
	}
	var errs []error
	for _, b := range builds {
		errs = append(errs, os.RemoveAll(nodeDir(root, b)))
	}
	errs = append(errs, os.Remove(filepath.Join(root, "node")))
	return errors.Join(errs...)
}

// nodeCounterNames name the node_counters map's entries.
var nodeCounterNames = map[bpf.SluiceNodeCounter]string{
	bpf.SluiceNodeCounterNODE_INBOUND_UNKNOWN_ADDRESS: "inbound_unknown_address_refused",
}

// NodeCounters reads what the hooks counted for no pod they could name,
// summed over every build on the node under root: none when there is none.
func NodeCounters(root string) (map[string]uint64, error) {
	out := map[string]uint64{}
	builds, err := nodeBuilds(root)
	if err != nil {
		return nil, err
	}
	for _, b := range builds {
		m, err := ebpf.LoadPinnedMap(filepath.Join(nodeDir(root, b), bpf.SluiceMapNodeCounters), &ebpf.LoadPinOptions{ReadOnly: true})
		if errors.Is(err, os.ErrNotExist) {
			continue // a build from before node counters, or half made
		}
		if err != nil {
			return nil, fmt.Errorf("open node counters of build %s: %w", b, err)
		}
		for c, name := range nodeCounterNames {
			var perCPU []uint64
			if err := m.Lookup(uint32(c), &perCPU); err != nil {
				m.Close()
				return nil, fmt.Errorf("read node counter %s: %w", name, err)
			}
			for _, n := range perCPU {
				out[name] += n
			}
		}
		m.Close()
	}
	return out, nil
}

// NodeMemory is the kernel memory (memlock) of the node's state under root,
// every build's programs and node maps, which all pods share; a pod's own
// maps are its Status's. The node's hash maps are charged for the entries
// they hold, so this grows a little with each pod (its policy, ports,
// addresses).
func NodeMemory(root string) (Memory, error) {
	var mem Memory
	builds, err := nodeBuilds(root)
	if err != nil {
		return mem, err
	}
	for _, b := range builds {
		dir := nodeDir(root, b)
		pins, err := os.ReadDir(dir)
		if err != nil {
			return mem, fmt.Errorf("read node state: %w", err)
		}
		for _, pin := range pins {
			path := filepath.Join(dir, pin.Name())
			if m, err := ebpf.LoadPinnedMap(path, &ebpf.LoadPinOptions{ReadOnly: true}); err == nil {
				if info, err := m.Info(); err == nil {
					n, _ := info.Memlock()
					mem.Maps += n
				}
				m.Close()
			} else if p, err := ebpf.LoadPinnedProgram(path, nil); err == nil {
				if info, err := p.Info(); err == nil {
					n, _ := info.Memlock()
					mem.Programs += n
				}
				p.Close()
			} else if !errors.Is(err, os.ErrNotExist) {
				return mem, fmt.Errorf("open node pin %s: %w", path, err)
			}
		}
	}
	return mem, nil
}

// unregisteredAddrs returns those of addrs that the build object's node
// state under root does not give to the pod at idx.
func unregisteredAddrs(root, object string, idx uint32, addrs []netip.Addr) ([]netip.Addr, error) {
	maps, err := openNodeMaps(root, object, bpf.SluiceMapPodIps)
	if err != nil {
		return nil, err
	}
	defer maps[bpf.SluiceMapPodIps].Close()
	var missing []netip.Addr
	for _, a := range addrs {
		var owner uint32
		if err := maps[bpf.SluiceMapPodIps].Lookup(Addr6(a), &owner); err != nil || owner != idx {
			missing = append(missing, a)
		}
	}
	return missing, nil
}

// PodNetns returns a path to the pod's network namespace as it is now: that
// of a process in its cgroup, checked to be the one its hooks know.
func PodNetns(in Installed) (string, error) {
	ns := netnsOfCgroup(in.Cgroup)
	if ns == "" {
		return "", fmt.Errorf("no process in %s: its network namespace is out of reach", in.Cgroup)
	}
	var cookie uint64
	err := nsenter.Do(ns, func() (err error) {
		cookie, err = cookieHere()
		return err
	})
	if err != nil {
		return "", fmt.Errorf("network namespace cookie of the pod: %w", err)
	}
	if in.NetnsCookie != 0 && cookie != in.NetnsCookie {
		return "", fmt.Errorf("the processes of %s are in another network namespace than the pod's install", in.Cgroup)
	}
	return ns, nil
}

// procs is how many setOuter calls need GOMAXPROCS raised, and what it was
// before the first.
var procs struct {
	sync.Mutex
	users, prev, raised int
}

// raiseProcs raises GOMAXPROCS to n until the function it returns is
// called, so that n goroutines can be in a blocking system call at once. A
// goroutine blocked in a system call keeps its P until the runtime's
// monitor takes it back, which in a process that has been idle for a while
// (the agent, between pods) takes up to 20 ms: with GOMAXPROCS 2, a pod's
// nine writes to the maps of maps went two at a time, 33 ms an install in
// make bench-node's resident process against 11 ms with the writes all at
// once. GOMAXPROCS goes back to what it was when the last user is done
// (setting it stops the runtime from following a change of the
// container's CPU limit: the process keeps the value it had).
func raiseProcs(n int) (restore func()) {
	procs.Lock()
	defer procs.Unlock()
	if procs.users == 0 {
		procs.prev = runtime.GOMAXPROCS(0)
		procs.raised = procs.prev
	}
	procs.users++
	if n > procs.raised {
		runtime.GOMAXPROCS(n)
		procs.raised = n
	}
	return func() {
		procs.Lock()
		defer procs.Unlock()
		if procs.users--; procs.users == 0 && procs.raised != procs.prev {
			runtime.GOMAXPROCS(procs.prev)
		}
	}
}

// outerSlot is one of the node's maps of pod maps and what its slot of a
// pod is to hold: the pod's map, or nil to empty it.
type outerSlot struct {
	name  string
	outer *ebpf.Map
	inner *ebpf.Map
}

// setOuter writes the pod's slot idx of every outer map at once. Each
// write to a map of maps returns only after an RCU grace period (so no
// program still runs with the old inner map), 8-16 ms on a 2-core VM:
// made one after the other, a pod's nine took 100 ms of every install and
// uninstall; made together, their waits overlap.
func setOuter(idx uint32, slots []outerSlot) error {
	defer raiseProcs(len(slots) + 1)()
	errs := make([]error, len(slots))
	var wg sync.WaitGroup
	for i, s := range slots {
		wg.Go(func() {
			if s.inner == nil {
				if err := s.outer.Delete(idx); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
					errs[i] = fmt.Errorf("unregister from %s: %w", s.name, err)
				}
			} else if err := s.outer.Put(idx, s.inner); err != nil {
				errs[i] = fmt.Errorf("register the pod's %s: %w", s.name, err)
			}
		})
	}
	wg.Wait()
	return errors.Join(errs...)
}
