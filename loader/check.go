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
	"golang.org/x/sys/unix"

	"github.com/sluicemesh/sluice/bpf"
	"github.com/sluicemesh/sluice/internal/nsenter"
)

// Probe is one kernel capability Sluice needs and whether this kernel has it.
type Probe struct {
	Name string `json:"name"`
	Err  error  `json:"-"`
	// Error is Err as text, for --json.
	Error string `json:"error,omitempty"`
}

// NewProbe is the probe name with its result.
func NewProbe(name string, err error) Probe {
	p := Probe{Name: name, Err: err}
	if err != nil {
		p.Error = err.Error()
	}
	return p
}

// Check probes every program type, map type, helper and attachment Sluice
// uses, ending with a real load and a real cgroup attach in a throwaway
// cgroup of its own, then what optional features need; more are probes
// its caller made (telemetry's sock_diag). It needs root.
func Check(more ...Probe) Report {
	var probes []Probe
	add := func(name string, err error) { probes = append(probes, NewProbe(name, err)) }

	_, err := os.Stat("/sys/kernel/btf/vmlinux")
	add(probeBTF, err)
	for _, pt := range programTypes {
		add(programTypeProbe(pt), features.HaveProgramType(pt))
	}
	for _, mt := range mapTypes {
		add(mapTypeProbe(mt), features.HaveMapType(mt))
	}
	for _, h := range helpers {
		add(h.probe(), features.HaveProgramHelper(h.pt, h.fn))
	}

	mount, err := Cgroup2Mount()
	add(probeCgroup2, err)

	coll, err := loadFresh()
	add(probeLoad, err)
	if err == nil {
		defer coll.Close()
		if mount != "" {
			add(probeCgroupLink, probeAttach(mount, coll.Programs[bpf.SluiceProgSluiceConnect4]))
		}
		add(probeNetnsLink, probeSkLookup(coll.Programs[bpf.SluiceProgSluiceSkLookup]))
	}
	add(probeSpliceCount, spliceBacklogBTF())
	add(probeMPTCP, probeSocket(unix.AF_INET, unix.IPPROTO_MPTCP))
	add(probeIPv6, probeSocket(unix.AF_INET6, unix.IPPROTO_TCP))
	probes = append(probes, more...)
	return Report{Kernel: kernelRelease(), Capabilities: capabilitiesOf(probes), Probes: probes}
}

// Report is what Check found: the capabilities a user turns on, each
// available or not and why, and the probes they rest on.
type Report struct {
	Kernel       string       `json:"kernel"`
	Capabilities []Capability `json:"capabilities"`
	Probes       []Probe      `json:"probes"`
}

// CoreMissing names the core capabilities this kernel cannot do: Sluice
// cannot work here when any is.
func (r Report) CoreMissing() []string {
	var missing []string
	for _, c := range r.Capabilities {
		if c.Core && !c.Available {
			missing = append(missing, c.Name)
		}
	}
	return missing
}

// Capability is one thing Sluice does, whether this kernel can, and what
// it needs of the kernel.
type Capability struct {
	Name string `json:"name"`
	// Core capabilities are what every install uses; without one Sluice
	// cannot work. Install refuses a flag asking for an optional one the
	// kernel lacks.
	Core      bool   `json:"core,omitempty"`
	Available bool   `json:"available"`
	Why       string `json:"why,omitempty"`  // what is missing, when not available
	Needs     string `json:"needs"`          // what of the kernel it uses
	Since     string `json:"since"`          // the Linux version that has it
	Flag      string `json:"flag,omitempty"` // the install flag install refuses where it is not available
}

// MinimumKernel is the oldest Linux Sluice supports: the oldest it is
// tested on (make test-kernel KERNEL=6.1, in CI). The programs load as one
// object that calls helpers from 5.18 and 5.19 (bpf_set_retval,
// bpf_skc_to_mptcp_sock), so 5.15 cannot load them.
const MinimumKernel = "6.1"

// The probes' names, which capabilities name as what they rest on.
const (
	probeBTF         = "kernel BTF (/sys/kernel/btf/vmlinux)"
	probeCgroup2     = "cgroup v2 mounted"
	probeLoad        = "load programs (verifier)"
	probeCgroupLink  = "attach to a cgroup with bpf_link"
	probeNetnsLink   = "sk_lookup links on a network namespace"
	probeSpliceCount = "spliced bytes counted (sk_psock.msg_tot_len)"
	probeMPTCP       = "MPTCP sockets (CONFIG_MPTCP, net.mptcp.enabled)"
	probeIPv6        = "IPv6 sockets"
	// ProbeSockDiag is the probe of telemetry's socket reads, which the
	// caller makes (loader does not read sockets).
	ProbeSockDiag = "TCP sock_diag (inet_diag, tcp_diag)"
)

var (
	programTypes = []ebpf.ProgramType{ebpf.CGroupSockAddr, ebpf.SockOps, ebpf.CGroupSockopt, ebpf.SkLookup, ebpf.SkMsg, ebpf.Syscall}
	mapTypes     = []ebpf.MapType{ebpf.Array, ebpf.Hash, ebpf.LPMTrie, ebpf.SkStorage, ebpf.SockMap, ebpf.SockHash, ebpf.RingBuf, ebpf.ArrayOfMaps}
	helpers      = []helper{
		{ebpf.CGroupSockAddr, asm.FnSkStorageGet},
		{ebpf.CGroupSockAddr, asm.FnGetCurrentUidGid},
		{ebpf.CGroupSockAddr, asm.FnSkLookupUdp},
		{ebpf.CGroupSockAddr, asm.FnSetRetval},
		{ebpf.CGroupSockopt, asm.FnGetCurrentUidGid},
		{ebpf.SockOps, asm.FnSkStorageGet},
		{ebpf.SockOps, asm.FnSockOpsCbFlagsSet},
		{ebpf.SockOps, asm.FnSockMapUpdate},
		{ebpf.SockOps, asm.FnRingbufOutput},
		{ebpf.SockOps, asm.FnSkcToMptcpSock},
		{ebpf.SkLookup, asm.FnSkAssign},
		{ebpf.SkMsg, asm.FnMsgRedirectHash},
	}
)

type helper struct {
	pt ebpf.ProgramType
	fn asm.BuiltinFunc
}

func (h helper) probe() string                    { return fmt.Sprintf("helper %s in %s", h.fn, h.pt) }
func programTypeProbe(pt ebpf.ProgramType) string { return "program type " + pt.String() }
func mapTypeProbe(mt ebpf.MapType) string         { return "map type " + mt.String() }

// capabilities are what Sluice does, from its core to its options, each
// with the probes it rests on. Every one needs the object to load (one
// object: parts a kernel lacks are left out by CO-RE, not by building
// another); since is when Linux got the newest part it uses.
var capabilities = []struct {
	Capability
	probes []string
}{
	{Capability{Name: "outbound capture, SO_ORIGINAL_DST", Core: true, Since: "5.8",
		Needs: "cgroup connect4/6, getsockopt and getpeername programs on a cgroup bpf_link, socket storage"},
		[]string{probeBTF, probeCgroup2, probeLoad, probeCgroupLink,
			programTypeProbe(ebpf.CGroupSockAddr), programTypeProbe(ebpf.CGroupSockopt), programTypeProbe(ebpf.SockOps),
			mapTypeProbe(ebpf.SkStorage), helper{ebpf.CGroupSockAddr, asm.FnSkStorageGet}.probe(),
			helper{ebpf.CGroupSockopt, asm.FnGetCurrentUidGid}.probe(), helper{ebpf.SockOps, asm.FnSkStorageGet}.probe()}},
	{Capability{Name: "inbound capture (sk_lookup)", Core: true, Since: "5.9",
		Needs: "an sk_lookup program on the pod's network namespace hands new connections to the sidecar (bpf_sk_assign)"},
		[]string{probeLoad, probeNetnsLink, programTypeProbe(ebpf.SkLookup), helper{ebpf.SkLookup, asm.FnSkAssign}.probe()}},
	{Capability{Name: "fail-closed inbound", Since: "5.9",
		Needs: "the same sk_lookup program drops a connection to a captured port while no sidecar listens"},
		[]string{probeLoad, probeNetnsLink}},
	{Capability{Name: "IPv6 capture", Since: "5.9",
		Needs: "the kernel's IPv6 stack (not ipv6.disable=1)"},
		[]string{probeLoad, probeIPv6}},
	{Capability{Name: "flows and latency telemetry", Since: "5.8",
		Needs: "sockops state callbacks, a ring buffer; open flows' bytes read by sock_diag"},
		[]string{probeLoad, mapTypeProbe(ebpf.RingBuf), helper{ebpf.SockOps, asm.FnSockOpsCbFlagsSet}.probe(),
			helper{ebpf.SockOps, asm.FnRingbufOutput}.probe(), ProbeSockDiag}},
	{Capability{Name: "routes (canary weights)", Since: "5.7",
		Needs: "LPM tries and arrays of maps read by connect4/6"},
		[]string{probeLoad, mapTypeProbe(ebpf.LPMTrie), mapTypeProbe(ebpf.ArrayOfMaps)}},
	{Capability{Name: "kernel-only", Since: "5.8",
		Needs: "connect4/6 leave the destination as it is; sockops measure the flow"},
		[]string{probeLoad, probeCgroupLink}},
	{Capability{Name: "splice", Since: "2026",
		Needs: "sockhash and sk_msg redirect between the app's and the sidecar's sockets, flow control by sk_psock.msg_tot_len", Flag: "--splice"},
		[]string{probeLoad, mapTypeProbe(ebpf.SockHash), helper{ebpf.SkMsg, asm.FnMsgRedirectHash}.probe(), probeSpliceCount}},
	{Capability{Name: "offload", Since: "2026",
		Needs: "splice's parts, and setsockopt from the sidecar to hand a connection to the kernel", Flag: "--offload-ports"},
		[]string{probeLoad, mapTypeProbe(ebpf.SockHash), helper{ebpf.SkMsg, asm.FnMsgRedirectHash}.probe(), probeSpliceCount}},
	{Capability{Name: "DNS capture", Since: "5.18",
		Needs: "cgroup sendmsg4/6 and recvmsg4/6 programs; connect4/6 and sendmsg look up the sidecar's UDP listener and refuse a query at once", Flag: "--redirect-dns"},
		[]string{probeLoad, probeCgroupLink, helper{ebpf.CGroupSockAddr, asm.FnSkLookupUdp}.probe(), helper{ebpf.CGroupSockAddr, asm.FnSetRetval}.probe()}},
	{Capability{Name: "MPTCP", Since: "5.19",
		Needs: "MPTCP sockets; bpf_skc_to_mptcp_sock finds a subflow's connection"},
		[]string{probeLoad, probeMPTCP, helper{ebpf.SockOps, asm.FnSkcToMptcpSock}.probe()}},
}

// capabilitiesOf says, from the probes, which capabilities this kernel has.
// A probe that was not made counts as missing.
func capabilitiesOf(probes []Probe) []Capability {
	byName := make(map[string]*Probe, len(probes))
	for i := range probes {
		byName[probes[i].Name] = &probes[i]
	}
	out := make([]Capability, 0, len(capabilities))
	for _, c := range capabilities {
		got := c.Capability
		got.Available = true
		for _, name := range c.probes {
			if why := missing(byName[name], name); why != "" {
				got.Available, got.Why = false, why
				break
			}
		}
		out = append(out, got)
	}
	return out
}

// missing says why a probe failed, or "" when it passed.
func missing(p *Probe, name string) string {
	switch {
	case p == nil:
		return name + ": not probed (an earlier probe failed)"
	case p.Err != nil:
		return name + ": " + p.Error
	}
	return ""
}

// probeSocket opens and closes a socket of that family and protocol: the
// kernel's IPv6 and MPTCP can be compiled out or turned off.
func probeSocket(family, proto int) error {
	fd, err := unix.Socket(family, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, proto)
	if err != nil {
		return err
	}
	return unix.Close(fd)
}

// olderThanMinimum tells whether release (uname -r) is a Linux before
// MinimumKernel; one it cannot read is not.
func olderThanMinimum(release string) bool {
	var major, minor, minMajor, minMinor int
	if n, _ := fmt.Sscanf(release, "%d.%d", &major, &minor); n != 2 {
		return false
	}
	fmt.Sscanf(MinimumKernel, "%d.%d", &minMajor, &minMinor)
	return major < minMajor || major == minMajor && minor < minMinor
}

// kernelRelease is uname -r.
func kernelRelease() string {
	var uts unix.Utsname
	if err := unix.Uname(&uts); err != nil {
		return "unknown"
	}
	return unix.ByteSliceToString(uts.Release[:])
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
