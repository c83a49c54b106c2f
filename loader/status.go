package loader

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"github.com/sluicemesh/sluice/bpf"
	"github.com/sluicemesh/sluice/redirect"
)

// State is what is installed for one pod, read back from its pins.
type State struct {
	Target Target `json:"target"`
	// Complete is true when every pin the install needs is there and every
	// link holds its attachment. Otherwise Missing says what is not, and
	// Repair is the command that finishes the install.
	Complete bool     `json:"complete"`
	Missing  []string `json:"missing,omitempty"`
	Repair   string   `json:"repair,omitempty"`
	// Object is the BPF build the install runs; Upgrade is set when it is
	// not this binary's (a rerun of install updates it in place).
	Object  string        `json:"object"`
	Upgrade bool          `json:"upgrade,omitempty"`
	Links   []LinkState   `json:"links"`
	Plan    redirect.Plan `json:"plan"`
	Memory  Memory        `json:"memory"`
	// Counters are what the hooks counted since the install (see
	// counterNames).
	Counters map[string]uint64 `json:"counters"`
	// Handshakes is how many captured connections the proxy's side has not
	// taken yet: 0 at rest.
	Handshakes int `json:"handshakes"`
	// SpliceSockets is how many sockets are in the splice table now: the
	// two ends of every spliced connection open, 0 at rest.
	SpliceSockets int `json:"splice_sockets"`
	// SpliceCapacity is the splice table's size: 1 while splice was never
	// on.
	SpliceCapacity int `json:"splice_capacity"`
	// OffloadConnections is how many connections the sidecar has handed to
	// the kernel now, and OffloadSockets how many of its open sockets on
	// offload ports are in offload's table (handed or not): both 0 at rest.
	OffloadConnections int `json:"offload_connections"`
	OffloadSockets     int `json:"offload_sockets"`
}

// LinkState is one pinned link and the program it keeps attached.
type LinkState struct {
	Pin        string `json:"pin"`
	LinkID     uint32 `json:"link_id"`
	ProgramID  uint32 `json:"program_id"`
	Program    string `json:"program"`
	CgroupID   uint64 `json:"cgroup_id,omitempty"`
	NetnsInode uint32 `json:"netns_inode,omitempty"` // sk_lookup, on the pod's netns
	Attached   bool   `json:"attached"`
}

// Memory is the kernel memory the install's maps and programs hold, as the
// kernel accounts it (memlock). Per-connection socket storage is charged to
// the sockets and not counted here; nor are the programs of an install on
// the node's programs, which every pod shares (Programs is then 0).
type Memory struct {
	Maps     uint64 `json:"maps_bytes"`
	Programs uint64 `json:"programs_bytes"`
}

// Total is maps and programs together.
func (m Memory) Total() uint64 { return m.Maps + m.Programs }

// Status reads t's pins. It returns ErrNotInstalled when there are none and
// refuses pins that belong to another cgroup.
func Status(t Target) (State, error) {
	s := State{Target: t}
	cur, err := readPins(t.PinDir)
	if err != nil {
		return s, err
	}
	if !cur.exists || (cur.rec == nil && len(cur.names) == 0) {
		return s, fmt.Errorf("%w on %s: no pins at %s", ErrNotInstalled, t.Cgroup, t.PinDir)
	}
	if cur.rec == nil {
		return s, fmt.Errorf("%s is not a Sluice pin directory (no install record; it holds %v)", t.PinDir, cur.names)
	}
	rec := *cur.rec
	if err := checkOwner(t, rec); err != nil {
		return s, err
	}
	if s.Target.CgroupID == 0 {
		s.Target.CgroupID = rec.CgroupID
	}
	s.Target.Netns, s.Target.Interface, s.Target.Identity = rec.Netns, rec.Interface, rec.Identity
	s.Object = rec.Object
	s.Upgrade = rec.Object != "" && rec.Object != bpf.ObjectHash()
	if rec.Object == "" {
		s.Missing = append(s.Missing, "the install did not finish")
	}
	p := pinsOf(t, rec, ReadOnly)
	defer p.Close()
	s.readMaps(p)
	if err := s.readLinks(t, rec); err != nil {
		return s, err
	}
	s.readNode(t, rec)
	if err := s.readContents(p, cur.names); err != nil {
		return s, err
	}
	s.Complete = len(s.Missing) == 0
	if !s.Complete {
		s.Repair = repairCommand(rec)
	}
	return s, nil
}

// readMaps notes the maps missing from the pins (route maps are made by the
// first route) and adds up the memory of the others.
func (s *State) readMaps(p *Pins) {
	for _, name := range podMapNames {
		m, err := p.Map(name)
		if err != nil {
			if !slices.Contains(routeMapNames, name) {
				s.Missing = append(s.Missing, "map "+name)
			}
			continue
		}
		if info, err := m.Info(); err == nil {
			memlock, _ := info.Memlock()
			s.Memory.Maps += memlock
		}
	}
}

// readNode notes a pod the node's programs do not find: its build's node
// state gone, or the pod not registered there.
func (s *State) readNode(t Target, rec record) {
	if rec.Object == "" || rec.Index == 0 {
		return
	}
	maps, err := openNodeMaps(filepath.Dir(t.PinDir), rec.Object, bpf.SluiceMapPods)
	if err != nil {
		s.Missing = append(s.Missing, "the node's programs ("+nodeDir(filepath.Dir(t.PinDir), rec.Object)+")")
		return
	}
	defer maps[bpf.SluiceMapPods].Close()
	var idx uint32
	if err := maps[bpf.SluiceMapPods].Lookup(rec.NetnsCookie, &idx); err != nil || idx != rec.Index {
		s.Missing = append(s.Missing, "the pod's registration with the node's programs")
	}
}

// readLinks reads every hook's link, noting those missing or detached from
// t's cgroup (or, with no id given, any) and the recorded namespace.
func (s *State) readLinks(t Target, rec record) error {
	hooks := hooksFor(rec.Plan != nil && rec.Plan.RedirectDNS, rec.Interface != "")
	for _, h := range hooks {
		ls, memlock, err := linkState(filepath.Join(t.PinDir, h.pin), t.CgroupID, rec.NetnsInode)
		switch {
		case errors.Is(err, os.ErrNotExist):
			s.Missing = append(s.Missing, h.pin+" (not attached)")
			continue
		case err != nil:
			return err
		case !ls.Attached:
			s.Missing = append(s.Missing, h.pin+" (detached: its cgroup or network namespace is gone)")
		}
		if rec.Index == 0 {
			s.Memory.Programs += memlock
		}
		s.Links = append(s.Links, ls)
	}
	return nil
}

// readContents reads what the maps pinned (names) hold: the splice table,
// the plan, offload's and the handshakes' entries, the counters.
func (s *State) readContents(p *Pins, names []string) error {
	var err error
	if slices.Contains(names, bpf.SluiceMapSpliceSocks) {
		sp, err := spliceState(p)
		if err != nil {
			return err
		}
		if sp.program == "" {
			s.Missing = append(s.Missing, bpf.SluiceProgSluiceSplice+" (not attached to "+bpf.SluiceMapSpliceSocks+")")
		}
		if p.rec.Index == 0 {
			s.Memory.Programs += sp.memlock
		}
		s.SpliceSockets, s.SpliceCapacity = sp.sockets, sp.capacity
	}
	if p.rec.Index != 0 || slices.Contains(names, legacyPolicyPins[0]) {
		// An older build's policy layout is unreadable here: the install
		// still runs, status offers the upgrade and shows the plan the
		// install recorded, if it did.
		s.Plan, err = p.Plan()
		switch {
		case err != nil && s.Upgrade && errors.Is(err, errOlderLayout):
			if p.rec.Plan != nil {
				s.Plan = *p.rec.Plan
			}
		case err != nil:
			return err
		}
	}
	for _, m := range []struct {
		name string
		n    *int
	}{{bpf.SluiceMapOffloadPeers, &s.OffloadConnections}, {bpf.SluiceMapOffloadSocks, &s.OffloadSockets}, {bpf.SluiceMapHandshakes, &s.Handshakes}} {
		if slices.Contains(names, m.name) {
			if *m.n, err = p.count(m.name); err != nil {
				return err
			}
		}
	}
	if slices.Contains(names, bpf.SluiceMapCounters) {
		if s.Counters, err = p.Counters(); err != nil {
			return err
		}
	}
	return nil
}

func linkState(pin string, cgroupID, netnsIno uint64) (LinkState, uint64, error) {
	ls := LinkState{Pin: pin}
	l, err := link.LoadPinnedLink(pin, nil)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return ls, 0, err
		}
		return ls, 0, fmt.Errorf("open link %s: %w", pin, err)
	}
	defer l.Close()
	info, err := l.Info()
	if err != nil {
		return ls, 0, fmt.Errorf("link info %s: %w", pin, err)
	}
	ls.LinkID, ls.ProgramID = uint32(info.ID), uint32(info.Program)
	if cg := info.Cgroup(); cg != nil {
		ls.CgroupID = cg.CgroupId
	}
	if ns := info.NetNs(); ns != nil {
		ls.NetnsInode = ns.NetnsInode
	}
	ls.Attached = attachedAt(info, cgroupID, netnsIno)
	var memlock uint64
	if prog, err := ebpf.NewProgramFromID(info.Program); err == nil {
		if pi, err := prog.Info(); err == nil {
			ls.Program = pi.Name
			memlock, _ = pi.Memlock()
		}
		prog.Close()
	}
	return ls, memlock, nil
}

// ReadPlan is what a sidecar reads of an install whose hooks do not answer
// AskPlan (an older Sluice's, which cannot take an offload either): its
// ports and proxy identity, from the install record, which must belong to
// t's cgroup. It needs only read access to the sidecar's pins (the proxy
// group's), not root, and no node map.
func ReadPlan(t Target) (SidecarPlan, error) {
	p, err := Open(t, ReadOnly)
	if err != nil {
		return SidecarPlan{}, err
	}
	defer p.Close()
	sc := p.rec.Sidecar
	if sc == nil { // an install before the record kept it: root reads it
		plan, err := p.Plan()
		return SidecarPlan{OutboundPort: plan.OutboundPort, InboundPort: plan.InboundPort, ProxyUID: plan.ProxyUID, ProxyGID: plan.ProxyGID, SidecarPorts: plan.SidecarPorts}, err
	}
	return SidecarPlan{OutboundPort: sc.OutboundPort, InboundPort: sc.InboundPort, ProxyUID: sc.ProxyUID, ProxyGID: sc.ProxyGID, SidecarPorts: sc.Ports}, nil
}

// errOlderLayout is a policy this build cannot read: installed by another
// Sluice version.
var errOlderLayout = errors.New("the pod's policy maps have another Sluice version's layout: rerun 'sluice install' on the pod to upgrade it in place")

// counterNames name the counters map's entries for status and metrics.
var counterNames = map[bpf.SluiceCounter]string{
	bpf.SluiceCounterCOUNT_INBOUND_STEERED:         "inbound_steered",
	bpf.SluiceCounterCOUNT_INBOUND_NO_LISTENER:     "inbound_no_listener",
	bpf.SluiceCounterCOUNT_INBOUND_ASSIGN_FAILED:   "inbound_assign_failed",
	bpf.SluiceCounterCOUNT_CONNECT_NO_STATE:        "connect_refused_no_state",
	bpf.SluiceCounterCOUNT_HANDSHAKE_TABLE_FULL:    "handshake_table_full",
	bpf.SluiceCounterCOUNT_FLOW_NO_STATE:           "flow_untracked_no_state",
	bpf.SluiceCounterCOUNT_FLOW_EVENT_LOST:         "flow_event_lost_ring_full",
	bpf.SluiceCounterCOUNT_CLOSE_LOST_OUTBOUND:     "flow_close_lost_outbound",
	bpf.SluiceCounterCOUNT_CLOSE_LOST_INBOUND:      "flow_close_lost_inbound",
	bpf.SluiceCounterCOUNT_BOTH_LOST_OUTBOUND:      "flow_open_and_close_lost_outbound",
	bpf.SluiceCounterCOUNT_BOTH_LOST_INBOUND:       "flow_open_and_close_lost_inbound",
	bpf.SluiceCounterCOUNT_ROUTE_REFUSED:           "route_refused_no_backend",
	bpf.SluiceCounterCOUNT_SPLICE_JOINED:           "splice_sockets_joined",
	bpf.SluiceCounterCOUNT_SPLICE_FULL:             "splice_table_full",
	bpf.SluiceCounterCOUNT_SPLICE_MSGS:             "splice_messages",
	bpf.SluiceCounterCOUNT_SPLICE_BYTES:            "splice_bytes",
	bpf.SluiceCounterCOUNT_SPLICE_STOPPED:          "splice_stopped_reader_behind",
	bpf.SluiceCounterCOUNT_SPLICE_NO_PEER:          "splice_stopped_no_peer",
	bpf.SluiceCounterCOUNT_FAIL_CLOSED_INBOUND:     "fail_closed_inbound",
	bpf.SluiceCounterCOUNT_FAIL_OPEN_OUTBOUND:      "fail_open_outbound",
	bpf.SluiceCounterCOUNT_FAIL_OPEN_INBOUND:       "fail_open_inbound",
	bpf.SluiceCounterCOUNT_KERNEL_ONLY_OUTBOUND:    "kernel_only_outbound",
	bpf.SluiceCounterCOUNT_KERNEL_ONLY_INBOUND:     "kernel_only_inbound",
	bpf.SluiceCounterCOUNT_OFFLOAD_MSGS:            "offload_messages",
	bpf.SluiceCounterCOUNT_OFFLOAD_BYTES:           "offload_bytes",
	bpf.SluiceCounterCOUNT_OFFLOAD_VIA_PROXY:       "offload_via_sidecar",
	bpf.SluiceCounterCOUNT_INBOUND_LISTENER_FAILED: "inbound_listener_unregistered",
	bpf.SluiceCounterCOUNT_RR_FALLBACK:             "route_round_robin_fallback",
	bpf.SluiceCounterCOUNT_OFFLOAD_FULL:            "offload_table_full",
	bpf.SluiceCounterCOUNT_OFFLOAD_HANDED:          "offload_handed",
	bpf.SluiceCounterCOUNT_DNS_REDIRECTED:          "dns_redirected",
	bpf.SluiceCounterCOUNT_DNS_FAIL_CLOSED:         "dns_fail_closed",
	bpf.SluiceCounterCOUNT_DNS_FAIL_OPEN:           "dns_fail_open",
}

// sumCounters adds up the per-CPU values of every counter.
func sumCounters(m *ebpf.Map) (map[string]uint64, error) {
	out := map[string]uint64{}
	for c, name := range counterNames {
		if uint32(c) >= m.MaxEntries() {
			continue // an older install's map, without this counter
		}
		var perCPU []uint64
		if err := m.Lookup(uint32(c), &perCPU); err != nil {
			return nil, fmt.Errorf("read counter %s: %w", name, err)
		}
		for _, n := range perCPU {
			out[name] += n
		}
	}
	return out, nil
}

func entries(m *ebpf.Map) (int, error) {
	var key, value []byte
	n := 0
	it := m.Iterate()
	for it.Next(&key, &value) {
		n++
	}
	return n, it.Err()
}

// repairCommand is the command line that finishes an install, from the one
// that made it: install's flags, or a whole command line when it was made by
// a mesh personality (istio-iptables, proxy-init) or inside the pod. Flags
// too long to record cannot be repeated here: the user reruns the command
// that made the install.
func repairCommand(rec record) string {
	args := rec.Args
	if len(args) == 0 && rec.ArgsSHA256 != "" {
		return fmt.Sprintf("the install command that made it, with the same flags (too long to record; sha256 %.12s…), as the pod's init container ran it", rec.ArgsSHA256)
	}
	if len(args) == 0 || strings.HasPrefix(args[0], "-") {
		args = append([]string{"install"}, args...)
	}
	cmd := "sluice " + shellQuote(args)
	if !slices.ContainsFunc(args, func(a string) bool {
		return strings.TrimLeft(a, "-") == "cgroup" || strings.HasPrefix(strings.TrimLeft(a, "-"), "cgroup=")
	}) {
		cmd += " (in the pod, as its init container ran it)"
	}
	return cmd
}
