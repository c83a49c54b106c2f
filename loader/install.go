package loader

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"github.com/sluicemesh/sluice/bpf"
	"github.com/sluicemesh/sluice/redirect"
)

// undo is a reverse-order stack of teardown steps that runs every step and
// joins their errors instead of stopping at the first.
type undo []func() error

func (u *undo) push(f func() error) { *u = append(*u, f) }

func (u undo) run() error {
	var errs []error
	for i := len(u) - 1; i >= 0; i-- {
		errs = append(errs, u[i]())
	}
	return errors.Join(errs...)
}

// ErrNotInstalled lets callers tell "nothing to do" from a failure.
var ErrNotInstalled = errors.New("not installed")

// Result says what an Install changed; empty when the pod already had
// exactly this install.
type Result struct {
	Changes []string `json:"changes"`
}

// Install makes t's install match plan, and is safe to rerun, as Kubernetes
// reruns init containers:
//   - nothing installed: load, write the plan, pin, attach; all or nothing;
//   - the same install, complete: change nothing;
//   - a half install (a killed earlier run): keep what is there and finish it;
//   - another plan or a newer build: switch the plan in one step and update
//     programs in place (link.Update), so capture never lapses.
//
// args are the install's flags, recorded so status can name the command
// that repairs a half install. Install refuses pins that belong to another
// cgroup, a pin directory holding files Sluice did not make, and a second
// Sluice already capturing the pod through other pins.
func Install(t Target, plan redirect.Plan, args []string, log *slog.Logger) (res Result, err error) {
	var steps undo
	unlock := func() {}
	defer func() {
		// Undone while still holding the lock: no other install may find a
		// directory that is about to go.
		if err != nil {
			if uerr := steps.run(); uerr != nil {
				err = errors.Join(err, fmt.Errorf("undo install: %w", uerr))
			}
		}
		unlock()
	}()
	unmount, err := ensureBPFFS(t.PinDir)
	if err != nil {
		return res, err
	}
	if unmount != nil {
		steps.push(unmount)
	}
	root := filepath.Dir(t.PinDir)
	created, err := mkdirs(root, pinRootMode)
	for _, d := range created {
		steps.push(func() error { return os.Remove(d) })
	}
	if err != nil {
		return res, err
	}
	held, err := lock(root)
	if err != nil {
		return res, err
	}
	unlock = held

	inbound := t.Interface != ""
	ifindex, netnsIno := 0, uint64(0)
	if inbound {
		if ifindex, err = interfaceIndex(t); err != nil {
			return res, err
		}
		if netnsIno, err = netnsInode(t); err != nil {
			return res, err
		}
	}
	want := record{Format: recordFormat, Cgroup: t.Cgroup, CgroupID: t.CgroupID, Netns: t.Netns, NetnsInode: netnsIno,
		Interface: t.Interface, Ifindex: ifindex, Args: args}

	cur, err := readPins(t.PinDir)
	if err != nil {
		return res, err
	}
	if cur.rec != nil {
		if err := checkOwner(t, *cur.rec); err != nil {
			return res, err
		}
	} else if len(cur.names) > 0 {
		return res, fmt.Errorf("pin dir %s holds files Sluice did not create (%v): pick another --pin-dir", t.PinDir, cur.names)
	}
	fresh := cur.rec == nil

	ours, err := pinnedPrograms(t.PinDir)
	if err != nil {
		return res, err
	}
	if err := otherSluice(t, inbound, ours); err != nil {
		return res, err
	}
	if inbound {
		// Not being able to tell (no /proc/sys) does not stop the install:
		// the bind hook and sockops' owner check still guard the ports.
		reserved, unreserved, err := reserveSidecarPorts(t, plan)
		if err != nil {
			log.Warn("cannot reserve the sidecar's ports in the pod's local port range", "err", err)
		}
		if len(reserved) > 0 {
			res.Changes = append(res.Changes, fmt.Sprintf("sidecar ports %v reserved in the pod's local port range", reserved))
		}
		if len(unreserved) > 0 {
			log.Warn("the pod's local port range holds sidecar ports, which the kernel may hand to any process of the pod (a listen or connect with no bind meets no bind hook), and its sysctls are read-only here",
				"ports", unreserved, "fix", "add them to net.ipv4.ip_local_reserved_ports in the pod's securityContext.sysctls, or move net.ipv4.ip_local_port_range")
		}
	}
	if !fresh {
		// An older install's tcx program, left for a sidecar since
		// restarted, is removed on the full path.
		legacy := slices.Contains(cur.names, legacyTCPin)
		done, err := finished(t, *cur.rec, want, plan)
		if err != nil || done && !legacy {
			return res, err
		}
		if !legacy {
			if ok, changed, err := rewritePolicy(t, *cur.rec, want, plan); err != nil || ok {
				if changed {
					res.Changes = append(res.Changes, "policy written")
				}
				return res, err
			}
		}
	}

	reuse, err := pinnedMapsIn(t.PinDir)
	if err != nil {
		return res, err
	}
	defer func() {
		for _, m := range reuse {
			m.Close()
		}
	}()
	// A splice table (or offload's) too small for the plan is replaced:
	// it can hold nothing, since no socket joins while splice is off. The
	// programs that use it are then updated even where their instructions
	// are the same.
	replace := map[string]bool{}
	for _, name := range spliceMaps {
		if m := reuse[name]; m != nil && m.MaxEntries() < spliceTableSize(plan.Splice) {
			m.Close()
			delete(reuse, name)
			replace[name] = true
		}
	}
	spec, err := bpf.LoadSluice()
	if err != nil {
		return res, fmt.Errorf("read embedded BPF object: %w", err)
	}
	// A map whose layout an upgrade changed is replaced where that loses
	// nothing: the plan's maps are written again below, and the counters
	// are carried over. Maps of live state must stay compatible. The
	// plan's maps go together: programs still attached read the active
	// index and the policy slots as one, so a new policies map behind an
	// old index (or the reverse) would show them an empty slot.
	incompatible := func(name string) bool {
		m := reuse[name]
		return m != nil && spec.Maps[name].Compatible(m) != nil
	}
	planChanged := slices.ContainsFunc(policyMapNames, incompatible)
	var oldCounters *ebpf.Map
	for _, name := range replaceableMaps {
		m := reuse[name]
		if m == nil || !incompatible(name) && !(planChanged && slices.Contains(policyMapNames, name)) {
			continue
		}
		delete(reuse, name)
		replace[name] = true
		if name == bpf.SluiceMapCounters {
			oldCounters = m
		}
		defer m.Close()
	}
	if err := fault("load"); err != nil {
		return res, err
	}
	coll, err := load(inbound, plan.Splice, reuse)
	if err != nil {
		return res, err
	}
	defer coll.Close()
	if oldCounters != nil {
		if err := copyCounters(oldCounters, coll.Maps[bpf.SluiceMapCounters]); err != nil {
			return res, err
		}
	}
	change := func(what string, args ...any) {
		res.Changes = append(res.Changes, fmt.Sprintf(what, args...))
		log.Debug(res.Changes[len(res.Changes)-1], "cgroup", t.Cgroup)
	}

	// The record goes first, marked unfinished: from here on the directory
	// is provably Sluice's, and a rerun after a crash knows what to finish.
	meta := coll.Maps[bpf.SluiceMapMeta]
	if err := fault("write record"); err != nil {
		return res, err
	}
	if err := writeRecord(meta, want); err != nil {
		return res, err
	}
	if fresh {
		dirs, err := mkdirs(t.PinDir, pinDirMode)
		for _, d := range dirs {
			steps.push(func() error { return os.Remove(d) })
		}
		if err != nil {
			return res, err
		}
	}
	for _, name := range pinnedMaps {
		if reuse[name] != nil {
			continue
		}
		m := coll.Maps[name]
		pin := filepath.Join(t.PinDir, name)
		if replace[name] {
			if err := os.Remove(pin); err != nil {
				return res, fmt.Errorf("replace map %s: %w", name, err)
			}
			change("%s replaced", name)
		}
		if err := fault("pin " + name); err != nil {
			return res, err
		}
		if err := m.Pin(pin); err != nil {
			return res, fmt.Errorf("pin map %s: %w", name, err)
		}
		if fresh {
			steps.push(m.Unpin)
		}
	}
	if err := setModes(t.PinDir, plan.ProxyGID); err != nil {
		return res, err
	}
	// Before the policy can let a socket join the table.
	if err := fault("attach " + bpf.SluiceProgSluiceSplice); err != nil {
		return res, err
	}
	if action, err := ensureSplice(coll.Maps[bpf.SluiceMapSpliceSocks], coll.Programs[bpf.SluiceProgSluiceSplice]); err != nil {
		return res, err
	} else if action != linkKept {
		change("%s %s", bpf.SluiceProgSluiceSplice, action)
	}
	if err := fault("write policy"); err != nil {
		return res, err
	}
	if changed, err := policyMapsOf(coll.Maps).write(plan); err != nil {
		return res, err
	} else if changed {
		change("policy written")
	}

	hooks := cgroupHooks
	keepTC := false
	if inbound {
		if err := writePodAddrs(t, coll.Maps[bpf.SluiceMapPodAddrs]); err != nil {
			return res, err
		}
		// A sidecar already listening (an upgrade under it, or a
		// reinstall) is found before inbound capture can need it.
		missed, err := registerListeners(t, plan, coll.Maps[bpf.SluiceMapInboundListeners])
		if err != nil {
			return res, err
		}
		// A running sidecar's listener sk_lookup cannot hand connections
		// to (an older sidecar's MPTCP one): the older install's tcx
		// program keeps steering to it until the sidecar restarts and
		// install runs again.
		keepTC = missed > 0 && slices.Contains(cur.names, legacyTCPin)
		if missed > 0 {
			log.Warn("the running sidecar's inbound listener cannot be registered for inbound capture (MPTCP, as sidecars older than this install listen, or held by a process install may not copy descriptors from, without CAP_SYS_PTRACE): restart the sidecar, then rerun install",
				"cgroup", t.Cgroup, "listeners", missed, "older_capture_kept", keepTC)
		}
		hooks = append(hooks[:len(hooks):len(hooks)], inboundHook)
	}
	for _, h := range hooks {
		if err := fault("attach " + h.pin); err != nil {
			return res, err
		}
		action, err := ensureLink(h, t, netnsIno, coll.Programs[h.prog], t.PinDir, len(replace) > 0)
		if err != nil {
			return res, err
		}
		if action == linkAttached && fresh {
			pin := filepath.Join(t.PinDir, h.pin)
			steps.push(func() error { return removeLink(pin) })
		}
		if action != linkKept {
			change("%s %s", h.pin, action)
		}
	}
	// An older install's tcx program goes once sk_lookup captures in its
	// place; inbound capture no longer asked for goes too.
	var stale []string
	if !keepTC {
		stale = append(stale, legacyTCPin)
	} else {
		change("%s kept for the running sidecar", legacyTCPin)
	}
	if !inbound {
		stale = append(stale, inboundHook.pin)
	}
	for _, pin := range stale {
		if !slices.Contains(cur.names, pin) {
			continue
		}
		if err := removeLink(filepath.Join(t.PinDir, pin)); err != nil {
			return res, err
		}
		change("%s removed", pin)
	}

	want.Object = bpf.ObjectHash()
	if err := fault("finish record"); err != nil {
		return res, err
	}
	if err := writeRecord(meta, want); err != nil {
		return res, err
	}
	if cur.rec == nil || cur.rec.Object != want.Object {
		change("install finished")
	}
	return res, nil
}

// finished reports whether the install in t's pins is already exactly what
// is asked for: finished by this build, with the same target and plan, and
// every link attached where it belongs. A rerun then changes nothing.
func finished(t Target, rec, want record, plan redirect.Plan) (bool, error) {
	if rec.Object != bpf.ObjectHash() || !rec.sameTarget(want) || rec.argsDigest() != want.argsDigest() {
		return false, nil
	}
	s, err := Status(t)
	if err != nil || !s.Complete {
		return false, nil
	}
	return s.Plan.Equal(plan), nil
}

// rewritePolicy is the fast path of a rerun that changes the policy only:
// an install complete with this build, on the same target, whose splice
// table is big enough for the plan. It writes the plan into the pinned
// maps (the idle slot, then the switch) and the record's new flags,
// without loading a program; ok is false when the full path is needed, and
// changed says whether the policy in force changed.
func rewritePolicy(t Target, rec, want record, plan redirect.Plan) (ok, changed bool, err error) {
	if rec.Object != bpf.ObjectHash() || !rec.sameTarget(want) {
		return false, false, nil
	}
	s, err := Status(t)
	if err != nil || !s.Complete || s.SpliceCapacity < int(spliceTableSize(plan.Splice)) {
		return false, false, nil
	}
	maps := map[string]*ebpf.Map{}
	defer func() {
		for _, m := range maps {
			m.Close()
		}
	}()
	for _, name := range append(policyMapNames, bpf.SluiceMapMeta) {
		m, err := ebpf.LoadPinnedMap(filepath.Join(t.PinDir, name), nil)
		if err != nil {
			return false, false, fmt.Errorf("open pinned map %s: %w", name, err)
		}
		maps[name] = m
	}
	changed, err = policyMapsOf(maps).write(plan)
	if err != nil {
		return false, false, err
	}
	// The proxy group may be what changed: the sidecar's pins follow it.
	if err := setModes(t.PinDir, plan.ProxyGID); err != nil {
		return false, false, err
	}
	want.Object = rec.Object
	return true, changed, writeRecord(maps[bpf.SluiceMapMeta], want)
}

// pinnedMapsIn opens every map already pinned in dir, for the new load to
// reuse.
func pinnedMapsIn(dir string) (map[string]*ebpf.Map, error) {
	maps := map[string]*ebpf.Map{}
	for _, name := range pinnedMaps {
		m, err := ebpf.LoadPinnedMap(filepath.Join(dir, name), nil)
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			for _, m := range maps {
				m.Close()
			}
			return nil, fmt.Errorf("open pinned map %s: %w", name, err)
		}
		maps[name] = m
	}
	return maps, nil
}

// pinnedPrograms returns the programs the links pinned in dir run.
func pinnedPrograms(dir string) (map[ebpf.ProgramID]bool, error) {
	ids := map[ebpf.ProgramID]bool{}
	for _, h := range allHooks {
		l, err := link.LoadPinnedLink(filepath.Join(dir, h.pin), nil)
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("open link %s: %w", h.pin, err)
		}
		info, err := l.Info()
		l.Close()
		if err != nil {
			return nil, fmt.Errorf("link info %s: %w", h.pin, err)
		}
		ids[info.Program] = true
	}
	return ids, nil
}

// replaceableMaps are the maps an upgrade may replace when their layout
// changed: install rewrites the plan's, and carries the counters over.
var replaceableMaps = append(slices.Clone(policyMapNames), bpf.SluiceMapCounters)

// copyCounters carries every per-CPU count of from into to.
func copyCounters(from, to *ebpf.Map) error {
	for k := uint32(0); k < from.MaxEntries() && k < to.MaxEntries(); k++ {
		var perCPU []uint64
		if err := from.Lookup(k, &perCPU); err != nil {
			return fmt.Errorf("carry counters over: %w", err)
		}
		if err := to.Update(k, perCPU, ebpf.UpdateAny); err != nil {
			return fmt.Errorf("carry counters over: %w", err)
		}
	}
	return nil
}

// testFault, set only by tests, fails the install step it names (see fault)
// to prove that a failure at any step leaves nothing behind.
var testFault func(step string) error

// fault returns the injected failure for step, if a test asked for one.
func fault(step string) error {
	if testFault == nil {
		return nil
	}
	return testFault(step)
}
