package loader

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"github.com/sluicemesh/sluice/bpf"
)

// State is what is installed for one pod, read back from its pins.
type State struct {
	Target  Target      `json:"target"`
	Links   []LinkState `json:"links"`
	Capture Capture     `json:"capture"`
}

// LinkState is one pinned link and the program it keeps attached.
type LinkState struct {
	Pin       string `json:"pin"`
	LinkID    uint32 `json:"link_id"`
	ProgramID uint32 `json:"program_id"`
	Program   string `json:"program"`
	CgroupID  uint64 `json:"cgroup_id,omitempty"`
	Ifindex   uint32 `json:"ifindex,omitempty"` // tc ingress, inside the pod's netns
	Attached  bool   `json:"attached"`
}

// Status reads t's pins. It returns ErrNotInstalled when there are none.
func Status(t Target) (State, error) {
	s := State{Target: t}
	if _, err := os.Stat(t.PinDir); errors.Is(err, os.ErrNotExist) {
		return s, fmt.Errorf("%w on %s: no pins at %s", ErrNotInstalled, t.Cgroup, t.PinDir)
	}
	for _, h := range append(hooks, tcHook) {
		pin := filepath.Join(t.PinDir, h.pin)
		if _, err := os.Stat(pin); h == tcHook && err != nil {
			continue // installed without inbound capture
		}
		ls, err := linkState(pin)
		if err != nil {
			return s, err
		}
		s.Links = append(s.Links, ls)
	}
	e, err := readEntries(t.PinDir)
	if err != nil {
		return s, err
	}
	s.Capture = e.capture()
	return s, nil
}

func linkState(pin string) (LinkState, error) {
	ls := LinkState{Pin: pin}
	l, err := link.LoadPinnedLink(pin, nil)
	if errors.Is(err, os.ErrNotExist) {
		return ls, nil
	}
	if err != nil {
		return ls, fmt.Errorf("open link %s: %w", pin, err)
	}
	defer l.Close()
	info, err := l.Info()
	if err != nil {
		return ls, fmt.Errorf("link info %s: %w", pin, err)
	}
	ls.LinkID, ls.ProgramID = uint32(info.ID), uint32(info.Program)
	if cg := info.Cgroup(); cg != nil {
		ls.CgroupID = cg.CgroupId
		// A detached cgroup link reports cgroup id 0.
		ls.Attached = cg.CgroupId != 0
	}
	if tcx := info.TCX(); tcx != nil {
		ls.Ifindex = tcx.Ifindex
		ls.Attached = tcx.Ifindex != 0
	}
	if prog, err := ebpf.NewProgramFromID(info.Program); err == nil {
		if pi, err := prog.Info(); err == nil {
			ls.Program = pi.Name
		}
		prog.Close()
	}
	return ls, nil
}

// ReadCapture reads the policy in force from a pod's pinned maps.
func ReadCapture(pinDir string) (Capture, error) {
	e, err := readEntries(pinDir)
	return e.capture(), err
}

func readEntries(pinDir string) (mapEntries, error) {
	e := mapEntries{ports: map[uint32]uint8{}}
	open := func(name string) (*ebpf.Map, error) {
		m, err := ebpf.LoadPinnedMap(filepath.Join(pinDir, name), &ebpf.LoadPinOptions{ReadOnly: true})
		if err != nil {
			return nil, fmt.Errorf("open pinned map %s: %w", name, err)
		}
		return m, nil
	}

	cfg, err := open(bpf.SluiceMapCaptureCfg)
	if err != nil {
		return e, err
	}
	defer cfg.Close()
	if err := cfg.Lookup(uint32(0), &e.config); err != nil {
		return e, fmt.Errorf("read capture config: %w", err)
	}

	for name, dst := range map[string]*[]bpf.SluiceLpmKey{
		bpf.SluiceMapIncludeCidrs: &e.include,
		bpf.SluiceMapExcludeCidrs: &e.exclude,
	} {
		m, err := open(name)
		if err != nil {
			return e, err
		}
		var k bpf.SluiceLpmKey
		var v uint8
		it := m.Iterate()
		for it.Next(&k, &v) {
			*dst = append(*dst, k)
		}
		m.Close()
		if err := it.Err(); err != nil {
			return e, fmt.Errorf("read %s: %w", name, err)
		}
	}

	ports, err := open(bpf.SluiceMapPortPolicy)
	if err != nil {
		return e, err
	}
	defer ports.Close()
	var port uint32
	var flags uint8
	it := ports.Iterate()
	for it.Next(&port, &flags) {
		if flags != 0 {
			e.ports[port] = flags
		}
	}
	if err := it.Err(); err != nil {
		return e, fmt.Errorf("read port policy: %w", err)
	}
	return e, nil
}
