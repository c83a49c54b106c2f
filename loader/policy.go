package loader

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"

	"github.com/cilium/ebpf"

	"github.com/sluicemesh/sluice/bpf"
	"github.com/sluicemesh/sluice/redirect"
)

// policyMaps are the maps a capture plan lives in: two policy slots, the
// index of the one in force, and the CIDR tries keyed by slot.
type policyMaps struct {
	policies, active, include, exclude, kernelOnly *ebpf.Map
}

// policyMapNames are the maps policyMapsOf takes.
var policyMapNames = []string{bpf.SluiceMapPolicies, bpf.SluiceMapPolicyActive, bpf.SluiceMapIncludeCidrs,
	bpf.SluiceMapExcludeCidrs, bpf.SluiceMapKernelOnlyCidrs}

func policyMapsOf(maps map[string]*ebpf.Map) policyMaps {
	return policyMaps{
		policies: maps[bpf.SluiceMapPolicies],
		active:   maps[bpf.SluiceMapPolicyActive],
		include:  maps[bpf.SluiceMapIncludeCidrs],
		exclude:  maps[bpf.SluiceMapExcludeCidrs],
		// Absent from the pins of an install made before kernel-only
		// paths existed: read as empty.
		kernelOnly: maps[bpf.SluiceMapKernelOnlyCidrs],
	}
}

// read returns the plan in force and its slot. The plan lacks the offload
// ports, which the install record keeps.
func (m policyMaps) read() (redirect.Plan, uint8, error) {
	slot, err := m.slot()
	if err != nil {
		return redirect.Plan{}, 0, err
	}
	var pol bpf.SluicePolicy
	if err := m.policies.Lookup(uint32(slot), &pol); err != nil {
		return redirect.Plan{}, 0, fmt.Errorf("read policy: %w", err)
	}
	p, err := m.planOf(slot, pol)
	return p, slot, err
}

// The policy layout of installs whose policy held the offload ports: two
// more port sets after the others.
var (
	policySize       = binary.Size(bpf.SluicePolicy{})
	legacyPolicySize = policySize + 2*binary.Size(bpf.SluicePolicy{}.Ports[0])
)

// readLegacy returns the plan in force in the layout of legacyPolicySize,
// offload ports included.
func (m policyMaps) readLegacy() (redirect.Plan, error) {
	slot, err := m.slot()
	if err != nil {
		return redirect.Plan{}, err
	}
	raw := make([]byte, legacyPolicySize)
	if err := m.policies.Lookup(uint32(slot), raw); err != nil {
		return redirect.Plan{}, fmt.Errorf("read policy: %w", err)
	}
	var pol bpf.SluicePolicy
	var offload [2][len(pol.Ports[0])]uint64
	if _, err := binary.Decode(raw, binary.NativeEndian, &pol); err != nil {
		return redirect.Plan{}, fmt.Errorf("decode policy: %w", err)
	}
	if _, err := binary.Decode(raw[policySize:], binary.NativeEndian, &offload); err != nil {
		return redirect.Plan{}, fmt.Errorf("decode policy: %w", err)
	}
	p, err := m.planOf(slot, pol)
	p.OffloadPorts, p.OffloadInboundPorts = portsIn(offload[0][:]), portsIn(offload[1][:])
	return p.Normalize(), err
}

func (m policyMaps) slot() (uint8, error) {
	var active uint32
	if err := m.active.Lookup(uint32(0), &active); err != nil {
		return 0, fmt.Errorf("read active policy slot: %w", err)
	}
	return uint8(active & 1), nil
}

// planOf is the plan of pol and slot's CIDRs.
func (m policyMaps) planOf(slot uint8, pol bpf.SluicePolicy) (redirect.Plan, error) {
	e := slotEntries{policy: pol}
	for _, trie := range []struct {
		m   *ebpf.Map
		dst *[]bpf.SluiceCidrKey
	}{{m.include, &e.include}, {m.exclude, &e.exclude}, {m.kernelOnly, &e.kernelOnly}} {
		if trie.m == nil {
			continue
		}
		keys, err := cidrKeys(trie.m, slot)
		if err != nil {
			return redirect.Plan{}, err
		}
		*trie.dst = keys
	}
	return e.plan(), nil
}

// write puts p in force as one visible step: it fills the slot not in force,
// then flips the active index, so a hook sees either the whole old plan or
// the whole new one. The old slot is left as it was until the next write, so
// a hook that read the old index a moment before the flip still finds a
// complete plan. It reports whether anything changed. p's offload ports are
// not the maps' (the record keeps them).
func (m policyMaps) write(p redirect.Plan) (bool, error) {
	cur, slot, err := m.read()
	if err != nil {
		return false, err
	}
	p.OffloadPorts, p.OffloadInboundPorts = nil, nil
	if cur.Equal(p) {
		return false, nil
	}
	next := slot ^ 1
	for _, trie := range []*ebpf.Map{m.include, m.exclude, m.kernelOnly} {
		stale, err := cidrKeys(trie, next)
		if err != nil {
			return false, err
		}
		for _, k := range stale {
			if err := trie.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
				return false, fmt.Errorf("clear CIDR %s: %w", prefixFromKey(k), err)
			}
		}
	}
	e := entriesOf(p, next)
	one := uint8(1)
	for _, k := range e.include {
		if err := m.include.Put(k, one); err != nil {
			return false, fmt.Errorf("write include CIDR %s: %w", prefixFromKey(k), err)
		}
	}
	for _, k := range e.exclude {
		if err := m.exclude.Put(k, one); err != nil {
			return false, fmt.Errorf("write exclude CIDR %s: %w", prefixFromKey(k), err)
		}
	}
	for _, k := range e.kernelOnly {
		if err := m.kernelOnly.Put(k, one); err != nil {
			return false, fmt.Errorf("write kernel-only CIDR %s: %w", prefixFromKey(k), err)
		}
	}
	if err := m.policies.Put(uint32(next), &e.policy); err != nil {
		return false, fmt.Errorf("write policy: %w", err)
	}
	if err := m.active.Put(uint32(0), uint32(next)); err != nil {
		return false, fmt.Errorf("switch to the new policy: %w", err)
	}
	return true, nil
}

func cidrKeys(trie *ebpf.Map, slot uint8) ([]bpf.SluiceCidrKey, error) {
	var keys []bpf.SluiceCidrKey
	var k bpf.SluiceCidrKey
	var v uint8
	it := trie.Iterate()
	for it.Next(&k, &v) {
		if k.Slot == slot {
			keys = append(keys, k)
		}
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("read CIDRs: %w", err)
	}
	return keys, nil
}

// slotEntries is a Plan as one policy slot holds it.
type slotEntries struct {
	policy     bpf.SluicePolicy
	include    []bpf.SluiceCidrKey
	exclude    []bpf.SluiceCidrKey
	kernelOnly []bpf.SluiceCidrKey
}

// portSets pairs each of a plan's port lists with the bit set holding it.
func portSets(p *redirect.Plan) []struct {
	ports *[]uint16
	set   bpf.SluicePortSet
} {
	return []struct {
		ports *[]uint16
		set   bpf.SluicePortSet
	}{
		{&p.ExcludeOutboundPorts, bpf.SluicePortSetPORT_OUT_EXCLUDE},
		{&p.IncludeOutboundPorts, bpf.SluicePortSetPORT_OUT_INCLUDE},
		{&p.ExcludeInboundPorts, bpf.SluicePortSetPORT_IN_EXCLUDE},
		{&p.InboundPorts, bpf.SluicePortSetPORT_IN_INCLUDE},
		{&p.KernelOnlyPorts, bpf.SluicePortSetPORT_OUT_KERNEL_ONLY},
		{&p.KernelOnlyInboundPorts, bpf.SluicePortSetPORT_IN_KERNEL_ONLY},
	}
}

func entriesOf(p redirect.Plan, slot uint8) slotEntries {
	e := slotEntries{policy: bpf.SluicePolicy{
		ProxyUid:     p.ProxyUID,
		ProxyGid:     p.ProxyGID,
		OutboundPort: p.OutboundPort,
		InboundPort:  p.InboundPort,
	}}
	if p.IncludeAllCIDRs {
		e.policy.Flags |= uint32(bpf.SluiceConfigFlagCONFIG_INCLUDE_ALL_CIDRS)
	}
	if p.InboundAllPorts {
		e.policy.Flags |= uint32(bpf.SluiceConfigFlagCONFIG_INBOUND_ALL_PORTS)
	}
	if p.NoFlows {
		e.policy.Flags |= uint32(bpf.SluiceConfigFlagCONFIG_NO_FLOWS)
	}
	if p.FailOpen {
		e.policy.Flags |= uint32(bpf.SluiceConfigFlagCONFIG_FAIL_OPEN)
	}
	if p.Splice {
		e.policy.Flags |= uint32(bpf.SluiceConfigFlagCONFIG_SPLICE)
	}
	copy(e.policy.SidecarPorts[:], p.SidecarPorts)
	for _, ps := range portSets(&p) {
		for _, port := range *ps.ports {
			e.policy.Ports[ps.set][port>>6] |= 1 << (port & 63)
		}
	}
	for _, c := range p.IncludeCIDRs {
		e.include = append(e.include, cidrKey(c, slot))
	}
	for _, c := range p.ExcludeCIDRs {
		e.exclude = append(e.exclude, cidrKey(c, slot))
	}
	for _, c := range p.KernelOnlyCIDRs {
		e.kernelOnly = append(e.kernelOnly, cidrKey(c, slot))
	}
	return e
}

// plan turns a slot's contents back into a Plan (for status and for
// comparing against the plan asked for).
func (e slotEntries) plan() redirect.Plan {
	pol := e.policy
	p := redirect.Plan{
		OutboundPort:    pol.OutboundPort,
		InboundPort:     pol.InboundPort,
		ProxyUID:        pol.ProxyUid,
		ProxyGID:        pol.ProxyGid,
		IncludeAllCIDRs: pol.Flags&uint32(bpf.SluiceConfigFlagCONFIG_INCLUDE_ALL_CIDRS) != 0,
		InboundAllPorts: pol.Flags&uint32(bpf.SluiceConfigFlagCONFIG_INBOUND_ALL_PORTS) != 0,
		NoFlows:         pol.Flags&uint32(bpf.SluiceConfigFlagCONFIG_NO_FLOWS) != 0,
		Splice:          pol.Flags&uint32(bpf.SluiceConfigFlagCONFIG_SPLICE) != 0,
		FailOpen:        pol.Flags&uint32(bpf.SluiceConfigFlagCONFIG_FAIL_OPEN) != 0,
	}
	for _, port := range pol.SidecarPorts {
		if port != 0 {
			p.SidecarPorts = append(p.SidecarPorts, port)
		}
	}
	for _, ps := range portSets(&p) {
		*ps.ports = portsIn(pol.Ports[ps.set][:])
	}
	for _, k := range e.include {
		p.IncludeCIDRs = append(p.IncludeCIDRs, prefixFromKey(k))
	}
	for _, k := range e.exclude {
		p.ExcludeCIDRs = append(p.ExcludeCIDRs, prefixFromKey(k))
	}
	for _, k := range e.kernelOnly {
		p.KernelOnlyCIDRs = append(p.KernelOnlyCIDRs, prefixFromKey(k))
	}
	return p.Normalize()
}

// portsIn lists the ports of a port set, one bit per port.
func portsIn(set []uint64) []uint16 {
	var ports []uint16
	for w, word := range set {
		for bit := 0; word != 0; bit++ {
			if word&1 != 0 {
				ports = append(ports, uint16(w*64+bit))
			}
			word >>= 1
		}
	}
	return ports
}

// cidrKeyBits is the slot and family bytes that lead every CIDR key.
const cidrKeyBits = 16

func cidrKey(p netip.Prefix, slot uint8) bpf.SluiceCidrKey {
	p = p.Masked()
	k := bpf.SluiceCidrKey{Prefixlen: uint32(cidrKeyBits + p.Bits()), Slot: slot, Family: afInet6}
	if p.Addr().Is4() {
		k.Family = afInet
	}
	copy(k.Addr[:], p.Addr().AsSlice())
	return k
}

func prefixFromKey(k bpf.SluiceCidrKey) netip.Prefix {
	bits := int(k.Prefixlen) - cidrKeyBits
	a := netip.AddrFrom16(k.Addr)
	if k.Family == afInet {
		a = netip.AddrFrom4([4]byte(k.Addr[:4]))
	}
	p, err := a.Prefix(bits)
	if err != nil {
		// Only the loader writes these keys; a bad one means a corrupt map.
		return netip.Prefix{}
	}
	return p
}

// Address families as the BPF side stores them.
const (
	afInet  = 2
	afInet6 = 10
)

// Addr6 converts an address to the BPF side's form: 16 bytes in network order,
// IPv4 v4-mapped. The words are filled in native order because the BPF
// program reads the same bytes as __u32 without swapping.
func Addr6(a netip.Addr) bpf.SluiceAddr6 {
	b := a.As16()
	var out bpf.SluiceAddr6
	for i := range out.W {
		out.W[i] = binary.NativeEndian.Uint32(b[4*i:])
	}
	return out
}

// AddrFrom6 is the inverse of Addr6; v4-mapped addresses come back as IPv4.
func AddrFrom6(a bpf.SluiceAddr6) netip.Addr {
	var b [16]byte
	for i, w := range a.W {
		binary.NativeEndian.PutUint32(b[4*i:], w)
	}
	return netip.AddrFrom16(b).Unmap()
}
