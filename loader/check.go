package loader

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/features"
	"github.com/cilium/ebpf/link"

	"github.com/sluicemesh/sluice/bpf"
	"github.com/sluicemesh/sluice/internal/nsenter"
)

// Probe is one kernel capability Sluice needs and whether this kernel has it.
type Probe struct {
	Name string `json:"name"`
	// Optional is a capability only some features need: without it the
	// rest works, and install refuses those features by name.
	Optional bool  `json:"optional,omitempty"`
	Err      error `json:"-"`
	// Error is Err as text, for --json.
	Error string `json:"error,omitempty"`
}

// Check probes every program type, map type, helper and attachment Sluice
// uses, ending with a real load and a real cgroup attach in a throwaway
// cgroup of its own. It needs root.
func Check() []Probe {
	var probes []Probe
	add := func(name string, err error) {
		p := Probe{Name: name, Err: err}
		if err != nil {
			p.Error = err.Error()
		}
		probes = append(probes, p)
	}

	_, err := os.Stat("/sys/kernel/btf/vmlinux")
	add("kernel BTF (/sys/kernel/btf/vmlinux)", err)
	for _, pt := range []ebpf.ProgramType{ebpf.CGroupSockAddr, ebpf.SockOps, ebpf.CGroupSockopt, ebpf.SkLookup} {
		add("program type "+pt.String(), features.HaveProgramType(pt))
	}
	for _, mt := range []ebpf.MapType{ebpf.Array, ebpf.Hash, ebpf.LPMTrie, ebpf.SkStorage, ebpf.SockMap} {
		add("map type "+mt.String(), features.HaveMapType(mt))
	}
	for _, h := range []struct {
		pt ebpf.ProgramType
		fn asm.BuiltinFunc
	}{
		{ebpf.CGroupSockAddr, asm.FnSkStorageGet},
		{ebpf.CGroupSockAddr, asm.FnGetCurrentUidGid},
		{ebpf.CGroupSockopt, asm.FnGetCurrentUidGid},
		{ebpf.SockOps, asm.FnSkStorageGet},
		{ebpf.SockOps, asm.FnSockOpsCbFlagsSet},
		{ebpf.SockOps, asm.FnSockMapUpdate},
		{ebpf.SkLookup, asm.FnSkAssign},
	} {
		add(fmt.Sprintf("helper %s in %s", h.fn, h.pt), features.HaveProgramHelper(h.pt, h.fn))
	}

	mount, err := Cgroup2Mount()
	add("cgroup v2 mounted", err)

	coll, err := loadFresh()
	add("load programs (verifier)", err)
	if err == nil {
		defer coll.Close()
		if mount != "" {
			add("attach to a cgroup with bpf_link", probeAttach(mount, coll.Programs[bpf.SluiceProgSluiceConnect4]))
		}
		add("sk_lookup links on a network namespace", probeSkLookup(coll.Programs[bpf.SluiceProgSluiceSkLookup]))
	}
	add("splice and offload: spliced bytes counted (sk_psock.msg_tot_len)", spliceBacklogBTF())
	probes[len(probes)-1].Optional = true
	return probes
}

// probeAttach attaches connect4 to a cgroup it creates and removes at once.
// The cgroup holds no process, so nothing is ever captured.
func probeAttach(mount string, prog *ebpf.Program) error {
	dir := filepath.Join(mount, fmt.Sprintf("sluice-check-%d", os.Getpid()))
	if err := os.Mkdir(dir, 0o755); err != nil {
		return fmt.Errorf("create probe cgroup: %w", err)
	}
	l, err := link.AttachCgroup(link.CgroupOptions{Path: dir, Attach: ebpf.AttachCGroupInet4Connect, Program: prog})
	if err == nil {
		if _, ierr := l.Info(); errors.Is(ierr, ebpf.ErrNotSupported) {
			// cilium/ebpf fell back to PROG_ATTACH: links could not be pinned.
			err = errors.New("kernel lacks bpf_link for cgroups (needs Linux 5.7+)")
		}
		err = errors.Join(err, l.Close())
	}
	return errors.Join(err, os.Remove(dir))
}

// probeSkLookup attaches the inbound program to a network namespace it
// creates for the probe and drops again, so no real traffic ever meets it.
func probeSkLookup(prog *ebpf.Program) error {
	return nsenter.DoNew(func() error {
		ns, err := os.Open("/proc/thread-self/ns/net")
		if err != nil {
			return err
		}
		defer ns.Close()
		l, err := link.AttachNetNs(int(ns.Fd()), prog)
		if err != nil {
			return err
		}
		return l.Close()
	})
}
