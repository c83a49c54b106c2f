package loader

import (
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net/netip"
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
//   - nothing installed: make the pod's maps, write the plan, pin, attach
//     the node's programs (loading them first if no pod runs this build);
//     all or nothing;
//   - the same install, complete: change nothing;
//   - a half install (a killed earlier run): keep what is there and finish it;
//   - another plan or a newer build: switch the plan in one step and update
//     programs in place (link.Update), so capture never lapses.
//
// args are the install's flags, recorded so status can name the command
// that repairs a half install. Install refuses pins that belong to another
// cgroup, a pin directory holding files Sluice did not make, and a second
// Sluice already capturing the pod through other pins.
//
// The steps, each a method of installer below: prepare (bpffs, the pin
// root, its lock), inspect (what the pins hold, whose they are, who else
// captures the pod), decide (nothing to do, the policy only, or the full
// path), and on the full path load (the node's programs, loaded if absent,
// and the pod's maps: the pinned ones that fit, new ones for the rest), pin
// (the record first, marked unfinished, then every map), attach (splice,
// the pod's index and policy in the node's maps, its registration, hooks),
// removeStale (what older installs pinned) and finish (the record names
// the build; the build the pod ran before lets go of it). A failure undoes,
// in reverse, what a fresh install did.
func Install(t Target, plan redirect.Plan, args []string, log *slog.Logger) (res Result, err error) {
	in := &installer{t: t, plan: plan, log: log, unlock: func() {}}
	return in.run(args)
}

// run is Install's steps.
func (in *installer) run(args []string) (res Result, err error) {
	if err := kernelCanDo(filepath.Dir(in.t.PinDir), in.plan); err != nil {
		return Result{}, err
	}
	defer func() { err = in.end(err) }()
	if err := in.prepare(); err != nil {
		return in.res, err
	}
	if err := in.inspect(args); err != nil {
		return in.res, err
	}
	switch path, err := in.decide(); {
	case err != nil:
		return in.res, err
	case path == pathNothing:
		return in.res, nil
	case path == pathPolicy:
		return in.res, in.rewritePolicy()
	}
	for _, step := range []func() error{in.load, in.pin, in.attach, in.removeStale, in.finish} {
		if err := step(); err != nil {
			return in.res, err
		}
	}
	return in.res, nil
}

// installer is one run of Install, step by step.
type installer struct {
	t      Target
	plan   redirect.Plan
	log    *slog.Logger
	res    Result
	steps  undo   // what a failure undoes
	unlock func() // the pin root's lock
	// argsSHA256 is the digest of flags too long to record, for Upgrade
	// to keep that of the install it repeats.
	argsSHA256 string

	inbound  bool
	netnsIno uint64
	want     record
	cur      pinState // what the pins held before
	fresh    bool     // no install record there

	old     *Pins                // the pinned maps found, kept open
	reuse   map[string]*ebpf.Map // those the load keeps
	replace map[string]bool      // those it replaces
	made    map[string]*ebpf.Map // the pod maps made anew
	node    *node                // this build's programs and node maps
	net     podNet               // what the pod's network namespace holds
	keepTC  bool                 // the older install's tcx program stays for a running sidecar
}

// podMap is the pod's map name, kept or made anew.
func (in *installer) podMap(name string) *ebpf.Map {
	if m := in.made[name]; m != nil {
		return m
	}
	return in.reuse[name]
}

// podMaps are the pod's maps, kept or made anew.
func (in *installer) podMaps() map[string]*ebpf.Map {
	out := map[string]*ebpf.Map{}
	for _, name := range podMapNames {
		if m := in.podMap(name); m != nil {
			out[name] = m
		}
	}
	return out
}

// end undoes a failed install while still holding the lock (no other
// install may find a directory that is about to go), then lets go of it.
func (in *installer) end(err error) error {
	if err != nil {
		if uerr := in.steps.run(); uerr != nil {
			err = errors.Join(err, fmt.Errorf("undo install: %w", uerr))
		}
	}
	for _, m := range in.made {
		m.Close()
	}
	if in.node != nil {
		in.node.Close()
	}
	if in.old != nil {
		in.old.Close()
	}
	in.unlock()
	return err
}

func (in *installer) change(what string, args ...any) {
	in.res.Changes = append(in.res.Changes, fmt.Sprintf(what, args...))
	in.log.Debug(in.res.Changes[len(in.res.Changes)-1], "cgroup", in.t.Cgroup)
}

// prepare mounts bpffs if needed, creates the pin root and locks it.
func (in *installer) prepare() error {
	unmount, err := ensureBPFFS(in.t.PinDir)
	if err != nil {
		return err
	}
	if unmount != nil {
		in.steps.push(unmount)
	}
	root := filepath.Dir(in.t.PinDir)
	created, err := mkdirs(root, pinRootMode)
	for _, d := range created {
		in.steps.push(func() error { return os.Remove(d) })
	}
	if err != nil {
		return err
	}
	held, err := lock(root)
	if err != nil {
		return err
	}
	in.unlock = held
	return nil
}

// inspect reads what the pins hold and refuses pins that are not this
// pod's Sluice's, or a pod another Sluice captures; then it visits the
// pod's network namespace (readPodNet), where for inbound capture it
// reserves the sidecar's ports.
func (in *installer) inspect(args []string) error {
	t := in.t
	in.inbound = t.Interface != ""
	if in.inbound {
		var err error
		if in.netnsIno, err = netnsInode(t); err != nil {
			return err
		}
	}
	plan := in.plan.Normalize()
	in.want = record{Format: recordFormat, Cgroup: t.Cgroup, CgroupID: t.CgroupID, Netns: t.Netns, NetnsInode: in.netnsIno,
		Interface: t.Interface, Args: args, ArgsSHA256: in.argsSHA256, Sidecar: sidecarOf(plan), Identity: t.Identity, Plan: &plan}
	cur, err := readPins(t.PinDir)
	if err != nil {
		return err
	}
	if cur.rec != nil {
		if err := checkOwner(t, *cur.rec); err != nil {
			return err
		}
	} else if len(cur.names) > 0 {
		return fmt.Errorf("pin dir %s holds files Sluice did not create (%v): pick another --pin-dir", t.PinDir, cur.names)
	}
	in.cur, in.fresh = cur, cur.rec == nil
	if cur.rec != nil && cur.rec.Object == bpf.ObjectHash() {
		// The short paths keep the pod where it is in the node's maps.
		in.want.Index, in.want.NetnsCookie = cur.rec.Index, cur.rec.NetnsCookie
	}
	ours, err := pinnedPrograms(t.PinDir)
	if err != nil {
		return err
	}
	if err := otherSluice(t, in.inbound, ours); err != nil {
		return err
	}
	var rangeProg *ebpf.Program
	if in.inbound {
		if rangeProg, err = openNodeProgram(filepath.Dir(t.PinDir), bpf.SluiceProgSluicePortRange); err != nil {
			return err
		}
		defer rangeProg.Close()
	}
	if in.net, err = readPodNet(t, in.inbound, in.plan, rangeProg); err != nil {
		return err
	}
	in.want.Ifindex = in.net.ifindex
	in.reportReserved()
	return nil
}

// reportReserved says which sidecar ports readPodNet kept out of the pod's
// local port range. Not being able to (no /proc/sys, or read-only) does not
// stop the install: the bind hook and sockops' owner check still guard the
// ports.
func (in *installer) reportReserved() {
	if in.net.reserveErr != nil {
		in.log.Warn("cannot reserve the sidecar's ports in the pod's local port range", "err", in.net.reserveErr)
	}
	if len(in.net.reserved) > 0 {
		in.res.Changes = append(in.res.Changes, fmt.Sprintf("sidecar ports %v reserved in the pod's local port range", in.net.reserved))
	}
	if len(in.net.unreserved) > 0 {
		in.log.Warn("the pod's local port range holds sidecar ports, which the kernel may hand to any process of the pod (a listen or connect with no bind meets no bind hook), and its sysctls are read-only here",
			"ports", in.net.unreserved, "fix", "add them to net.ipv4.ip_local_reserved_ports in the pod's securityContext.sysctls, or move net.ipv4.ip_local_port_range")
	}
}

// installPath is what a run of Install has to do.
type installPath int

const (
	pathFull    installPath = iota // load, pin, attach, finish
	pathNothing                    // exactly this install is there, complete
	pathPolicy                     // only the policy (or the flags) changed
)

// decide picks the path. Only an install complete with this build, on the
// same target, takes a short one: nothing when the flags and the plan are
// the same, the policy only when its splice table is big enough for the
// plan. An older install's tcx program, left for a sidecar since
// restarted, is removed on the full path.
func (in *installer) decide() (installPath, error) {
	if in.fresh || slices.Contains(in.cur.names, legacyTCPin) {
		return pathFull, nil
	}
	rec := *in.cur.rec
	if rec.Object != bpf.ObjectHash() || !rec.sameTarget(in.want) {
		return pathFull, nil
	}
	s, err := Status(in.t)
	if err != nil || !s.Complete {
		return pathFull, nil
	}
	if s.SpliceCapacity < int(spliceTableSize(in.plan.Splice)) {
		return pathFull, nil
	}
	if s.Plan.RedirectDNS != in.plan.RedirectDNS {
		// DNS capture's hooks come or go: only the full path attaches
		// and removes hooks.
		return pathFull, nil
	}
	if rec.Interface != "" {
		// An address the pod got since: inbound to it is refused until
		// it is registered, which the full path does.
		missing, err := unregisteredAddrs(filepath.Dir(in.t.PinDir), rec.Object, rec.Index, in.net.addrs)
		if err != nil || len(missing) > 0 {
			in.change("addresses %v registered for inbound capture", missing)
			return pathFull, nil
		}
	}
	if rec.argsDigest() == in.want.argsDigest() && s.Plan.Equal(in.plan) && maps.Equal(rec.Identity, in.want.Identity) {
		return pathNothing, nil
	}
	return pathPolicy, nil
}

// rewritePolicy is the policy-only path: it writes the plan into the
// pinned maps (the idle slot, then the switch) and the record's new flags,
// without loading a program.
func (in *installer) rewritePolicy() error {
	p := pinsOf(in.t, *in.cur.rec, ReadWrite)
	defer p.Close()
	m, err := p.policy()
	if err != nil {
		return err
	}
	meta, err := p.Map(bpf.SluiceMapMeta)
	if err != nil {
		return err
	}
	changed, err := m.write(in.plan)
	if err != nil {
		return err
	}
	if changed {
		in.res.Changes = append(in.res.Changes, "policy written")
	}
	// An earlier build's install gave pins to the proxy's group.
	if err := setModes(in.t.PinDir); err != nil {
		return err
	}
	in.want.Object = in.cur.rec.Object
	return writeRecord(meta, in.want)
}

// load opens this build's programs on the node (loading them if no pod
// runs them yet) and the pod's maps: those pinned that fit this build, and
// new ones for the rest.
func (in *installer) load() error {
	in.old = pinsOf(in.t, record{}, ReadWrite)
	in.reuse, in.replace, in.made = map[string]*ebpf.Map{}, map[string]bool{}, map[string]*ebpf.Map{}
	for _, name := range podMapNames {
		m, err := in.old.Map(name)
		if errors.Is(err, ErrMissingMap) {
			continue
		}
		if err != nil {
			return err
		}
		in.reuse[name] = m
	}
	oldCounters, err := in.chooseReplaced()
	if err != nil {
		return err
	}
	node, loaded, err := openNode(filepath.Dir(in.t.PinDir))
	if err != nil {
		return err
	}
	in.node = node
	if loaded {
		in.change("programs loaded on the node")
	}
	// Undone last: a failed install leaves no node state that no pod runs.
	in.steps.push(func() error { return leaveNode(filepath.Dir(in.t.PinDir), bpf.ObjectHash(), 0, in.t.PinDir) })
	var missing []string
	for _, name := range pinnedMaps {
		if in.reuse[name] == nil {
			missing = append(missing, name)
		}
	}
	if in.made, err = makePodMaps(missing, in.plan.Splice); err != nil {
		return err
	}
	if oldCounters != nil {
		return copyCounters(oldCounters, in.made[bpf.SluiceMapCounters])
	}
	return nil
}

// chooseReplaced moves from reuse to replace the pinned maps the load must
// not keep, and returns the old counters when they are replaced, to carry
// over. A pinned map of live state whose layout this build changed cannot
// be replaced without losing connections: the install stops.
func (in *installer) chooseReplaced() (oldCounters *ebpf.Map, err error) {
	// A splice table (or offload's) too small for the plan is replaced:
	// it can hold nothing, since no socket joins while splice is off.
	for _, name := range spliceMaps {
		if m := in.reuse[name]; m != nil && m.MaxEntries() < spliceTableSize(in.plan.Splice) {
			delete(in.reuse, name)
			in.replace[name] = true
		}
	}
	for _, name := range podMapNames {
		m := in.reuse[name]
		if m == nil {
			continue
		}
		incompatible := fitsPodMap(name, m)
		if incompatible == nil {
			continue
		}
		// The counters are carried over into a map of the new layout.
		if name != bpf.SluiceMapCounters {
			return nil, fmt.Errorf("the pinned map %s is from an incompatible Sluice version (%w): run 'sluice uninstall' for this pod, then install again", name, incompatible)
		}
		delete(in.reuse, name)
		in.replace[name] = true
		oldCounters = m
	}
	return oldCounters, nil
}

// pin writes the record, marked unfinished, and pins every map the load
// made. From the record on the directory is provably Sluice's, and a rerun
// after a crash knows what to finish.
func (in *installer) pin() error {
	if err := fault("write record"); err != nil {
		return err
	}
	if err := writeRecord(in.podMap(bpf.SluiceMapMeta), in.want); err != nil {
		return err
	}
	if in.fresh {
		dirs, err := mkdirs(in.t.PinDir, pinDirMode)
		for _, d := range dirs {
			in.steps.push(func() error { return os.Remove(d) })
		}
		if err != nil {
			return err
		}
	}
	for _, name := range pinnedMaps {
		if in.reuse[name] != nil {
			continue
		}
		m := in.made[name]
		pin := filepath.Join(in.t.PinDir, name)
		if in.replace[name] {
			if err := os.Remove(pin); err != nil {
				return fmt.Errorf("replace map %s: %w", name, err)
			}
			in.change("%s replaced", name)
		}
		if err := fault("pin " + name); err != nil {
			return err
		}
		if err := m.Pin(pin); err != nil {
			return fmt.Errorf("pin map %s: %w", name, err)
		}
		if in.fresh {
			in.steps.push(m.Unpin)
		}
	}
	return setModes(in.t.PinDir)
}

// attach attaches the splice program (before the policy can let a socket
// join its table), writes the policy, registers the pod with the node's
// programs and attaches every hook.
func (in *installer) attach() error {
	progs := in.node.progs
	if err := fault("attach " + bpf.SluiceProgSluiceSplice); err != nil {
		return err
	}
	if action, err := ensureSplice(in.podMap(bpf.SluiceMapSpliceSocks), progs[bpf.SluiceProgSluiceSplice]); err != nil {
		return err
	} else if action != linkKept {
		in.change("%s %s", bpf.SluiceProgSluiceSplice, action)
	}
	if err := fault("write policy"); err != nil {
		return err
	}
	if err := in.allocate(); err != nil {
		return err
	}
	if changed, err := policyMapsOf(in.node.maps, in.want.Index).write(in.plan); err != nil {
		return err
	} else if changed {
		in.change("policy written")
	}
	var addrs []netip.Addr
	if in.inbound {
		if err := in.prepareInbound(); err != nil {
			return err
		}
		addrs = in.net.addrs
	}
	hooks := hooksFor(in.plan.RedirectDNS, in.inbound)
	if err := in.register(addrs); err != nil {
		return err
	}
	for _, h := range hooks {
		if err := fault("attach " + h.pin); err != nil {
			return err
		}
		action, err := ensureLink(h, in.t, in.netnsIno, progs[h.prog], in.t.PinDir, len(in.replace) > 0)
		if err != nil {
			return err
		}
		if action == linkAttached && in.fresh {
			pin := filepath.Join(in.t.PinDir, h.pin)
			in.steps.push(func() error { return removeLink(pin) })
		}
		if action != linkKept {
			in.change("%s %s", h.pin, action)
		}
	}
	return nil
}

// allocate gives the pod its index in the node's maps: the one it has, or
// a free one. A failure from here on takes the pod out of them again.
func (in *installer) allocate() error {
	if err := fault("register"); err != nil {
		return err
	}
	idx, err := in.node.podIndex(in.net.cookie, in.t.Cgroup, func(idx uint32) string {
		if in.cur.rec != nil && in.cur.rec.Index == idx && in.cur.rec.Object == bpf.ObjectHash() {
			return ""
		}
		return in.podOf(idx)
	})
	if err != nil {
		return err
	}
	if in.cur.rec == nil || in.cur.rec.Index != idx || in.cur.rec.Object != bpf.ObjectHash() {
		in.steps.push(func() error { return unregister(in.node.maps, idx) })
		if err := in.node.take(idx); err != nil {
			return err
		}
		in.change("pod registered with the node's programs (index %d)", idx)
	}
	in.want.Index, in.want.NetnsCookie = idx, in.net.cookie
	return nil
}

// register makes the node's programs find the pod at its index: by its
// network namespace, and by addrs (inbound capture).
func (in *installer) register(addrs []netip.Addr) error {
	return in.node.register(in.want.Index, in.net.cookie, in.podMaps(), addrs, in.livePodOf)
}

// podOf names the other pod (its cgroup) at idx in this build's node
// state, or "" when no other install record claims it.
func (in *installer) podOf(idx uint32) string { return in.claims(idx, false) }

// livePodOf is podOf for pods whose cgroup still exists.
func (in *installer) livePodOf(idx uint32) string { return in.claims(idx, true) }

func (in *installer) claims(idx uint32, liveOnly bool) string {
	pods, _ := List(filepath.Dir(in.t.PinDir))
	for _, p := range pods {
		if p.CgroupID == in.t.CgroupID || liveOnly && p.Gone() {
			continue
		}
		if rec, err := readRecord(p.PinDir); err == nil && rec.Index == idx && rec.Object == bpf.ObjectHash() {
			return p.Cgroup
		}
	}
	return ""
}

// prepareInbound writes the pod's addresses and registers a sidecar
// listener already open, before inbound capture can need it (an upgrade
// under a running sidecar, or a reinstall).
func (in *installer) prepareInbound() error {
	if err := in.net.writePodAddrs(in.podMap(bpf.SluiceMapPodAddrs)); err != nil {
		return err
	}
	missed, err := registerListeners(in.t, in.plan, in.podMap(bpf.SluiceMapInboundListeners))
	if err != nil {
		return err
	}
	// A running sidecar's listener sk_lookup cannot hand connections to
	// (an older sidecar's MPTCP one): the older install's tcx program
	// keeps steering to it until the sidecar restarts and install runs
	// again.
	in.keepTC = missed > 0 && slices.Contains(in.cur.names, legacyTCPin)
	if missed > 0 {
		in.log.Warn("the running sidecar's inbound listener cannot be registered for inbound capture (MPTCP, as sidecars older than this install listen, or held by a process install may not copy descriptors from, without CAP_SYS_PTRACE): restart the sidecar, then rerun install",
			"cgroup", in.t.Cgroup, "listeners", missed, "older_capture_kept", in.keepTC)
	}
	return nil
}

// removeStale removes an older install's tcx program once sk_lookup
// captures in its place, and inbound capture no longer asked for.
func (in *installer) removeStale() error {
	var stale []string
	if !in.keepTC {
		stale = append(stale, legacyTCPin)
	} else {
		in.change("%s kept for the running sidecar", legacyTCPin)
	}
	if !in.inbound {
		stale = append(stale, inboundHook.pin)
	}
	if !in.plan.RedirectDNS {
		for _, h := range dnsHooks {
			stale = append(stale, h.pin)
		}
	}
	for _, pin := range legacyPins[1:] {
		if !slices.Contains(in.cur.names, pin) {
			continue
		}
		if err := os.Remove(filepath.Join(in.t.PinDir, pin)); err != nil {
			return fmt.Errorf("remove the older install's %s: %w", pin, err)
		}
		in.change("%s moved to the node", pin)
	}
	for _, pin := range stale {
		if !slices.Contains(in.cur.names, pin) {
			continue
		}
		if err := removeLink(filepath.Join(in.t.PinDir, pin)); err != nil {
			return err
		}
		in.change("%s removed", pin)
	}
	return nil
}

// finish marks the record finished with the object it runs.
func (in *installer) finish() error {
	in.want.Object = bpf.ObjectHash()
	if err := fault("finish record"); err != nil {
		return err
	}
	if err := writeRecord(in.podMap(bpf.SluiceMapMeta), in.want); err != nil {
		return err
	}
	// The build the pod ran before lets go of it, and goes once no pod
	// runs it.
	if old := in.cur.rec; old != nil && old.Object != "" && old.Object != in.want.Object {
		if err := leaveNode(filepath.Dir(in.t.PinDir), old.Object, old.Index, in.t.PinDir); err != nil {
			return err
		}
	}
	if in.cur.rec == nil || in.cur.rec.Object != in.want.Object {
		in.change("install finished")
	}
	return nil
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
