package loader

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"github.com/sluicemesh/sluice/bpf"
)

// hook is one program attached to the pod's cgroup.
type hook struct {
	prog   string
	attach ebpf.AttachType
	pin    string
}

// hooks in attach order: everything that answers for a redirected connection
// (sockops, getsockopt, getpeername) is in place before connect starts
// redirecting, so no connection is captured half-way. Uninstall goes in
// reverse and stops capturing first.
var hooks = []hook{
	{bpf.SluiceProgSluiceSockops, ebpf.AttachCGroupSockOps, "link_sockops"},
	{bpf.SluiceProgSluiceGetsockopt, ebpf.AttachCGroupGetsockopt, "link_getsockopt"},
	{bpf.SluiceProgSluiceGetpeername4, ebpf.AttachCgroupInet4GetPeername, "link_getpeername4"},
	{bpf.SluiceProgSluiceGetpeername6, ebpf.AttachCgroupInet6GetPeername, "link_getpeername6"},
	{bpf.SluiceProgSluiceConnect4, ebpf.AttachCGroupInet4Connect, "link_connect4"},
	{bpf.SluiceProgSluiceConnect6, ebpf.AttachCGroupInet6Connect, "link_connect6"},
}

// tcHook is inbound capture on the pod's interface; tcx needs no qdisc, so
// install never creates or removes one.
var tcHook = hook{bpf.SluiceProgSluiceTcIngress, ebpf.AttachTCXIngress, "link_tc_ingress"}

// pinnedMaps are the maps pinned beside the links: the policy, so status can
// show it and later versions can change it in place, and the original
// destinations, so the sidecar and the flows CLI can read them.
var pinnedMaps = []string{
	bpf.SluiceMapCaptureCfg,
	bpf.SluiceMapIncludeCidrs,
	bpf.SluiceMapExcludeCidrs,
	bpf.SluiceMapPortPolicy,
	bpf.SluiceMapOrigByCookie,
	bpf.SluiceMapOrigByTuple,
}

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

// ErrAlreadyInstalled and ErrNotInstalled let callers tell the two expected
// states apart from real failures.
var (
	ErrAlreadyInstalled = errors.New("already installed")
	ErrNotInstalled     = errors.New("not installed")
)

// Install loads the programs with c's policy, attaches them to t's cgroup and
// pins links and maps in t.PinDir. It is all-or-nothing: on any error every
// step already taken is undone.
func Install(t Target, c Capture, log *slog.Logger) (err error) {
	if _, err := os.Stat(t.PinDir); err == nil {
		return fmt.Errorf("%w on %s (pins at %s): run 'sluice uninstall --cgroup %s' first", ErrAlreadyInstalled, t.Cgroup, t.PinDir, t.Cgroup)
	}
	if err := ensureBPFFS(t.PinDir); err != nil {
		return err
	}

	coll, err := load(t.Interface != "")
	if err != nil {
		return err
	}
	defer coll.Close()

	var steps undo
	defer func() {
		if err != nil {
			if uerr := steps.run(); uerr != nil {
				err = errors.Join(err, fmt.Errorf("undo install: %w", uerr))
			}
		}
	}()

	if err := writeEntries(coll, c.entries()); err != nil {
		return err
	}

	created, err := mkdirPins(t.PinDir)
	if err != nil {
		return err
	}
	// Pushed shallowest first, so undo removes the deepest first.
	for i := len(created) - 1; i >= 0; i-- {
		steps.push(func() error { return os.Remove(created[i]) })
	}

	for _, name := range pinnedMaps {
		m := coll.Maps[name]
		if err := m.Pin(filepath.Join(t.PinDir, name)); err != nil {
			return fmt.Errorf("pin map %s: %w", name, err)
		}
		steps.push(m.Unpin)
	}

	pin := func(l link.Link, h hook) error {
		steps.push(l.Close)
		if err := l.Pin(filepath.Join(t.PinDir, h.pin)); err != nil {
			return fmt.Errorf("pin link %s: %w", h.pin, err)
		}
		steps.push(l.Unpin)
		return nil
	}
	for _, h := range hooks {
		l, err := link.AttachCgroup(link.CgroupOptions{Path: t.Cgroup, Attach: h.attach, Program: coll.Programs[h.prog]})
		if err != nil {
			return fmt.Errorf("attach %s to %s: %w", h.prog, t.Cgroup, err)
		}
		// The pin holds the attachment from here on; our descriptor can go.
		defer l.Close()
		if err := pin(l, h); err != nil {
			return err
		}
		log.Debug("attached", "prog", h.prog, "cgroup", t.Cgroup)
	}
	// Inbound steering goes last: getsockopt already answers for it.
	if t.Interface != "" {
		l, err := attachTC(t, coll.Programs[tcHook.prog])
		if err != nil {
			return err
		}
		defer l.Close()
		if err := pin(l, tcHook); err != nil {
			return err
		}
		log.Debug("attached", "prog", tcHook.prog, "interface", t.Interface, "netns", t.Netns)
	}
	log.Debug("installed", "cgroup", t.Cgroup, "pin_dir", t.PinDir)
	return nil
}

// attachTC attaches the inbound program to t.Interface. The kernel resolves
// the interface index in the caller's network namespace, so both happen on a
// thread inside t.Netns.
func attachTC(t Target, prog *ebpf.Program) (link.Link, error) {
	var l link.Link
	err := inNetns(t.Netns, func() error {
		iface, err := net.InterfaceByName(t.Interface)
		if err != nil {
			where := "this network namespace"
			if t.Netns != "" {
				where = "netns " + t.Netns
			}
			return fmt.Errorf("no interface %s in %s: pass --interface with the pod's interface (see 'ip link')", t.Interface, where)
		}
		l, err = link.AttachTCX(link.TCXOptions{Interface: iface.Index, Program: prog, Attach: ebpf.AttachTCXIngress})
		if err != nil {
			return fmt.Errorf("attach %s to %s ingress: %w", tcHook.prog, t.Interface, err)
		}
		return nil
	})
	return l, err
}

// load loads the maps and programs, leaving out the inbound program unless
// withTC, with the host's page size set.
func load(withTC bool) (*ebpf.Collection, error) {
	spec, err := bpf.LoadSluice()
	if err != nil {
		return nil, fmt.Errorf("read embedded BPF object: %w", err)
	}
	if !withTC {
		delete(spec.Programs, bpf.SluiceProgSluiceTcIngress)
	}
	if err := spec.Variables[bpf.SluiceVarPageSize].Set(uint32(os.Getpagesize())); err != nil {
		return nil, fmt.Errorf("set page_size: %w", err)
	}
	// The value now sits in .rodata's contents. Without Variables the
	// collection does not mmap .rodata; such a mapping would hold the map
	// until Go's garbage collector unmaps it, long after uninstall.
	clear(spec.Variables)
	coll, err := ebpf.NewCollection(spec)
	if err != nil {
		var ve *ebpf.VerifierError
		if errors.As(err, &ve) {
			// The full log is what a kernel developer needs to see.
			return nil, fmt.Errorf("load BPF programs: %+v", ve)
		}
		return nil, fmt.Errorf("load BPF programs: %w", err)
	}
	return coll, nil
}

func writeEntries(coll *ebpf.Collection, e mapEntries) error {
	if err := coll.Maps[bpf.SluiceMapCaptureCfg].Put(uint32(0), e.config); err != nil {
		return fmt.Errorf("write capture config: %w", err)
	}
	one := uint8(1)
	for _, k := range e.include {
		if err := coll.Maps[bpf.SluiceMapIncludeCidrs].Put(k, one); err != nil {
			return fmt.Errorf("write include CIDR %s: %w", prefixFromKey(k), err)
		}
	}
	for _, k := range e.exclude {
		if err := coll.Maps[bpf.SluiceMapExcludeCidrs].Put(k, one); err != nil {
			return fmt.Errorf("write exclude CIDR %s: %w", prefixFromKey(k), err)
		}
	}
	for port, flags := range e.ports {
		if err := coll.Maps[bpf.SluiceMapPortPolicy].Put(port, flags); err != nil {
			return fmt.Errorf("write port %d policy: %w", port, err)
		}
	}
	return nil
}

// mkdirPins creates dir and any missing parents and returns the ones it
// created, deepest first, so undo removes exactly those.
func mkdirPins(dir string) ([]string, error) {
	var missing []string
	for d := dir; ; d = filepath.Dir(d) {
		if _, err := os.Stat(d); err == nil || d == filepath.Dir(d) {
			break
		}
		missing = append(missing, d)
	}
	for i := len(missing) - 1; i >= 0; i-- {
		if err := os.Mkdir(missing[i], 0o700); err != nil {
			return nil, fmt.Errorf("create pin dir %s: %w", missing[i], err)
		}
	}
	return missing, nil
}

// Uninstall detaches every program of t's install and removes its pins and
// the pin directory (and the pin root if nothing else is left in it). It
// keeps going after an error so as much as possible is removed.
func Uninstall(t Target, log *slog.Logger) error {
	if _, err := os.Stat(t.PinDir); errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("%w on %s: no pins at %s", ErrNotInstalled, t.Cgroup, t.PinDir)
	}
	// Inbound steering stops first, then connect stops redirecting.
	errs := []error{removeLink(filepath.Join(t.PinDir, tcHook.pin))}
	for i := len(hooks) - 1; i >= 0; i-- {
		errs = append(errs, removeLink(filepath.Join(t.PinDir, hooks[i].pin)))
	}
	for _, name := range pinnedMaps {
		if err := os.Remove(filepath.Join(t.PinDir, name)); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, fmt.Errorf("unpin map %s: %w", name, err))
		}
	}
	if err := os.Remove(t.PinDir); err != nil {
		errs = append(errs, fmt.Errorf("remove pin dir (unknown pins left behind?): %w", err))
	}
	// Only an empty pin root goes; other pods' pins keep it.
	_ = os.Remove(filepath.Dir(t.PinDir))
	if err := errors.Join(errs...); err != nil {
		return err
	}
	log.Debug("uninstalled", "cgroup", t.Cgroup, "pin_dir", t.PinDir)
	return nil
}

// removeLink detaches the link explicitly, so the programs leave the cgroup
// even if some process still holds a descriptor to the link, then unpins it.
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
	if err := l.Detach(); err != nil {
		errs = append(errs, fmt.Errorf("detach %s: %w", pin, err))
	}
	if err := l.Unpin(); err != nil {
		errs = append(errs, fmt.Errorf("unpin %s: %w", pin, err))
	}
	return errors.Join(errs...)
}
