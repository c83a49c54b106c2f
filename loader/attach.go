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
	"golang.org/x/sys/unix"

	"github.com/sluicemesh/sluice/bpf"
)

// hook is one program and where it attaches: the pod's cgroup, or
// (sk_lookup) the pod's network namespace. Either way the attachment is a
// bpf_link, pinned so it outlives the installing process, and updated in
// place with link.Update so a program is replaced with no moment of no
// capture.
type hook struct {
	prog   string
	attach ebpf.AttachType
	pin    string
}

func (h hook) netns() bool { return h.attach == ebpf.AttachSkLookup }

// cgroupHooks in attach order: everything that answers for a redirected
// connection (sockops, getsockopt, getpeername) and guards the capture ports
// (bind) is in place before connect starts redirecting, so no connection is
// captured half-way. Uninstall goes in reverse and stops capturing first.
var cgroupHooks = []hook{
	{bpf.SluiceProgSluiceSockops, ebpf.AttachCGroupSockOps, "link_sockops"},
	{bpf.SluiceProgSluiceGetsockopt, ebpf.AttachCGroupGetsockopt, "link_getsockopt"},
	{bpf.SluiceProgSluiceSetsockopt, ebpf.AttachCGroupSetsockopt, "link_setsockopt"},
	{bpf.SluiceProgSluiceGetpeername4, ebpf.AttachCgroupInet4GetPeername, "link_getpeername4"},
	{bpf.SluiceProgSluiceGetpeername6, ebpf.AttachCgroupInet6GetPeername, "link_getpeername6"},
	{bpf.SluiceProgSluiceBind4, ebpf.AttachCGroupInet4Bind, "link_bind4"},
	{bpf.SluiceProgSluiceBind6, ebpf.AttachCGroupInet6Bind, "link_bind6"},
	{bpf.SluiceProgSluiceConnect4, ebpf.AttachCGroupInet4Connect, "link_connect4"},
	{bpf.SluiceProgSluiceConnect6, ebpf.AttachCGroupInet6Connect, "link_connect6"},
}

// dnsHooks are DNS capture's (install --redirect-dns), attached only for
// a plan with it, before connect (which takes connected UDP queries): a
// reply's source is given back before any query is sent to the DNS port.
var dnsHooks = []hook{
	{bpf.SluiceProgSluiceRecvmsg4, ebpf.AttachCGroupUDP4Recvmsg, "link_recvmsg4"},
	{bpf.SluiceProgSluiceRecvmsg6, ebpf.AttachCGroupUDP6Recvmsg, "link_recvmsg6"},
	{bpf.SluiceProgSluiceSendmsg4, ebpf.AttachCGroupUDP4Sendmsg, "link_sendmsg4"},
	{bpf.SluiceProgSluiceSendmsg6, ebpf.AttachCGroupUDP6Sendmsg, "link_sendmsg6"},
}

// hooksFor are the hooks of an install, in attach order: the cgroup's,
// DNS capture's before connect, and the inbound hook.
func hooksFor(dns, inbound bool) []hook {
	connect := len(cgroupHooks) - 2 // connect4 and connect6 come last
	out := slices.Clone(cgroupHooks[:connect])
	if dns {
		out = append(out, dnsHooks...)
	}
	out = append(out, cgroupHooks[connect:]...)
	if inbound {
		out = append(out, inboundHook)
	}
	return out
}

// inboundHook is inbound capture: the kernel asks it which listener takes a
// connection arriving in the pod's network namespace.
var inboundHook = hook{bpf.SluiceProgSluiceSkLookup, ebpf.AttachSkLookup, "link_sk_lookup"}

// legacyTCPin is where installs before sk_lookup pinned their tcx program on
// the pod's interface: an upgrade replaces it with inboundHook, and
// uninstall removes it.
const legacyTCPin = "link_tc_ingress"

// legacyRRPin is where installs before programs were the node's pinned
// their round-robin state, now the node's: an upgrade and uninstall remove
// it.
const legacyRRPin = "rr_states"

// legacyPolicyPins are where installs before the node's maps held the
// policy pinned the pod's: an upgrade and uninstall remove them.
var legacyPolicyPins = []string{"policies", "policy_active", "include_cidrs", "exclude_cidrs", "kernel_only_cidrs"}

// legacyFlowsPin is where installs before the flow ring was the node's
// pinned the pod's: an upgrade and uninstall remove it.
const legacyFlowsPin = "flow_events"

// legacyPins are what older installs pinned and this one does not.
var legacyPins = append([]string{legacyTCPin, legacyRRPin, legacyFlowsPin}, legacyPolicyPins...)

var allHooks = hooksFor(true, true)

// linkAction says what ensureLink did.
type linkAction string

const (
	linkKept     linkAction = "kept"     // already ran this program here
	linkUpdated  linkAction = "updated"  // ran another program: replaced in place
	linkAttached linkAction = "attached" // was missing or detached: attached anew
)

// ensureLink makes the link pinned at dir/h.pin run prog on t: it keeps a
// link that already does (unless renew: the program's maps were replaced,
// which its tag does not show), updates one that runs another program, and
// replaces a pin whose link no longer holds its attachment (the cgroup or
// network namespace is gone). A new link is attached and then pinned; if
// this process dies in between, the kernel drops the link with its
// descriptor.
func ensureLink(h hook, t Target, netnsIno uint64, prog *ebpf.Program, dir string, renew bool) (linkAction, error) {
	pin := filepath.Join(dir, h.pin)
	if l, err := link.LoadPinnedLink(pin, nil); err == nil {
		action, err := reuseLink(l, h, t.CgroupID, netnsIno, prog, renew)
		l.Close()
		if action != "" || err != nil {
			return action, err
		}
		if err := os.Remove(pin); err != nil {
			return "", fmt.Errorf("remove detached link %s: %w", pin, err)
		}
	} else if !errors.Is(err, os.ErrNotExist) {
		return "", fmt.Errorf("open link %s: %w", pin, err)
	}

	l, err := attachNew(h, t, prog)
	if err != nil {
		return "", err
	}
	// Once pinned, the pin holds the attachment; this descriptor can go.
	defer l.Close()
	if err := fault("pin " + h.pin); err != nil {
		return "", err
	}
	if err := l.Pin(pin); err != nil {
		return "", fmt.Errorf("pin link %s: %w", h.pin, err)
	}
	return linkAttached, nil
}

// reuseLink keeps or updates a pinned link that is still attached where it
// should be, and returns "" for one that is not.
func reuseLink(l link.Link, h hook, cgroupID, netnsIno uint64, prog *ebpf.Program, renew bool) (linkAction, error) {
	info, err := l.Info()
	if err != nil {
		return "", fmt.Errorf("link info %s: %w", h.pin, err)
	}
	if !attachedAt(info, cgroupID, netnsIno) {
		return "", nil
	}
	same, err := sameProgram(info.Program, prog)
	if err != nil || (same && !renew) {
		return linkKept, err
	}
	if err := l.Update(prog); err != nil {
		return "", fmt.Errorf("update %s in place: %w", h.pin, err)
	}
	return linkUpdated, nil
}

// attachedAt reports whether a link still holds its attachment to the cgroup
// cgroupID or to the network namespace whose inode is netnsIno. A link whose
// cgroup or namespace is gone reports 0.
func attachedAt(info *link.Info, cgroupID, netnsIno uint64) bool {
	if cg := info.Cgroup(); cg != nil {
		return cg.CgroupId != 0 && cg.CgroupId == cgroupID
	}
	if ns := info.NetNs(); ns != nil {
		return ns.NetnsInode != 0 && uint64(ns.NetnsInode) == netnsIno
	}
	return false
}

// sameProgram reports whether a link runs prog itself. Not the same
// instructions (the tag): programs are the node's, one instance a build,
// and two instances of one object (another build of the same programs, or
// a copy loaded again after the node's went) hold different maps: a link
// left on the other would find the pod in maps no install writes.
func sameProgram(id ebpf.ProgramID, prog *ebpf.Program) (bool, error) {
	info, err := prog.Info()
	if err != nil {
		return false, fmt.Errorf("program info: %w", err)
	}
	own, ok := info.ID()
	if !ok {
		return false, errors.New("program info: the kernel gives no program ID (Linux 4.13 or later)")
	}
	return own == id, nil
}

func attachNew(h hook, t Target, prog *ebpf.Program) (link.Link, error) {
	if !h.netns() {
		l, err := link.AttachCgroup(link.CgroupOptions{Path: t.Cgroup, Attach: h.attach, Program: prog})
		if err != nil {
			return nil, fmt.Errorf("attach %s to %s: %w", h.prog, t.Cgroup, err)
		}
		return l, nil
	}
	ns, err := os.Open(netnsPath(t))
	if err != nil {
		return nil, fmt.Errorf("open netns %s: %w", netnsPath(t), err)
	}
	defer ns.Close()
	l, err := link.AttachNetNs(int(ns.Fd()), prog)
	if err != nil {
		return nil, fmt.Errorf("attach %s to netns %s: %w", h.prog, netnsPath(t), err)
	}
	return l, nil
}

// netnsPath is t's network namespace: the pod's, or this process's for an
// install on an interface of the caller's own namespace.
func netnsPath(t Target) string {
	if t.Netns != "" {
		return t.Netns
	}
	return "/proc/self/ns/net"
}

// netnsInode identifies t's network namespace as links report it.
func netnsInode(t Target) (uint64, error) {
	var st unix.Stat_t
	if err := unix.Stat(netnsPath(t), &st); err != nil {
		if errors.Is(err, unix.ENOENT) {
			return 0, fmt.Errorf("netns %s does not exist: pass the pod's network namespace, e.g. /run/netns/NAME or /proc/PID/ns/net", netnsPath(t))
		}
		return 0, fmt.Errorf("netns %s: %w", netnsPath(t), err)
	}
	return st.Ino, nil
}

// removeLink detaches the link pinned at pin (so the program leaves even if
// some process still holds a descriptor to the link) and unpins it. A
// missing pin is not an error.
func removeLink(pin string) error {
	l, err := link.LoadPinnedLink(pin, nil)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("open link %s: %w", pin, err)
	}
	defer l.Close()
	var errs []error
	if err := l.Detach(); err != nil && !errors.Is(err, os.ErrNotExist) {
		errs = append(errs, fmt.Errorf("detach %s: %w", pin, err))
	}
	if err := l.Unpin(); err != nil {
		errs = append(errs, fmt.Errorf("unpin %s: %w", pin, err))
	}
	return errors.Join(errs...)
}

// otherSluice refuses to stack a second Sluice on t: any Sluice program
// that runs for the pod's cgroup (attached to it or inherited from a parent)
// or in its network namespace, other than through the links pinned in t's
// own directory, belongs to another install with its pins elsewhere.
func otherSluice(t Target, inbound bool, ours map[ebpf.ProgramID]bool) error {
	cg, err := os.Open(t.Cgroup)
	if err != nil {
		return fmt.Errorf("open cgroup %s: %w", t.Cgroup, err)
	}
	defer cg.Close()
	for _, h := range cgroupHooks {
		res, err := link.QueryPrograms(link.QueryOptions{Target: int(cg.Fd()), Attach: h.attach, QueryFlags: queryEffective})
		if err != nil {
			return fmt.Errorf("list programs on %s: %w", t.Cgroup, err)
		}
		if err := foreign(res, ours, "cgroup "+t.Cgroup); err != nil {
			return err
		}
	}
	if !inbound {
		return nil
	}
	ns, err := os.Open(netnsPath(t))
	if err != nil {
		return fmt.Errorf("open netns %s: %w", netnsPath(t), err)
	}
	defer ns.Close()
	res, err := link.QueryPrograms(link.QueryOptions{Target: int(ns.Fd()), Attach: inboundHook.attach})
	if err != nil {
		return fmt.Errorf("list programs on netns %s: %w", netnsPath(t), err)
	}
	return foreign(res, ours, "netns "+netnsPath(t))
}

// queryEffective is BPF_F_QUERY_EFFECTIVE: also the programs a cgroup
// inherits from its parents.
const queryEffective = 1

func foreign(res *link.QueryResult, ours map[ebpf.ProgramID]bool, where string) error {
	for _, ap := range res.Programs {
		if ours[ap.ID] {
			continue
		}
		p, err := ebpf.NewProgramFromID(ap.ID)
		if err != nil {
			continue // freed since the query
		}
		info, err := p.Info()
		p.Close()
		if err == nil && strings.HasPrefix(info.Name, "sluice_") {
			return fmt.Errorf("another Sluice install already captures %s (program %s, id %d), with its pins elsewhere: uninstall it first (sluice uninstall with its --pin-dir, or on the cgroup it was installed on)", where, info.Name, ap.ID)
		}
	}
	return nil
}
