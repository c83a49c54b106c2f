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

// policyMaps are the node maps a pod's capture plan lives in: its two
// policy slots, the index of the one in force, the port sets' words and the
// CIDR tries, all keyed by pod and slot.
type policyMaps struct {
	policies, active, ports, include, exclude, kernelOnly *ebpf.Map
	pod                                                   uint32
}

// policyMapNames are the maps policyMapsOf takes.
var policyMapNames = []string{bpf.SluiceMapPolicies, bpf.SluiceMapPolicyActive, bpf.SluiceMapPorts,
	bpf.SluiceMapIncludeCidrs, bpf.SluiceMapExcludeCidrs, bpf.SluiceMapKernelOnlyCidrs}

func policyMapsOf(maps map[string]*ebpf.Map, pod uint32) policyMaps {
	return policyMaps{
		policies:   maps[bpf.SluiceMapPolicies],
		active:     maps[bpf.SluiceMapPolicyActive],
		ports:      maps[bpf.SluiceMapPorts],
		include:    maps[bpf.SluiceMapIncludeCidrs],
		exclude:    maps[bpf.SluiceMapExcludeCidrs],
		kernelOnly: maps[bpf.SluiceMapKernelOnlyCidrs],
		pod:        pod,
	}
}

// read returns the plan in force and its slot.
func (m policyMaps) read() (redirect.Plan, uint8, error) {
	keys, err := m.keys()
	if err != nil {
		return redirect.Plan{}, 0, err
	}
	return m.readWith(keys)
}

// readWith is read with the pod's keys already found.
func (m policyMaps) readWith(keys podKeys) (redirect.Plan, uint8, error) {
	slot, err := m.slot()
	if err != nil {
		return redirect.Plan{}, 0, err
	}
	var pol bpf.SluicePolicy
	if err := m.policies.Lookup(2*m.pod+uint32(slot), &pol); err != nil {
		return redirect.Plan{}, 0, fmt.Errorf("read policy: %w", err)
	}
	p, err := m.planOf(slot, pol, keys)
	return p, slot, err
}

// podKeys are the pod's entries in the node's port and CIDR maps, by slot.
type podKeys struct {
	ports                        [2][]bpf.SluicePortKey
	include, exclude, kernelOnly [2][]bpf.SluiceCidrKey
}

// keys finds the pod's entries, one pass over each node map for both
// slots; none, without a pass, when both of its policy slots are empty.
// write fills a slot's policy before its ports and CIDRs and forget empties
// it after them, so two empty slots hold no entries: a new pod's index,
// whose install then reads no node-wide map (in a 65,536-bucket hash a
// pass costs more than the rest of the install).
func (m policyMaps) keys() (podKeys, error) {
	var k podKeys
	var pols [2]bpf.SluicePolicy
	for slot := range pols {
		if err := m.policies.Lookup(2*m.pod+uint32(slot), &pols[slot]); err != nil {
			return k, fmt.Errorf("read policy: %w", err)
		}
	}
	if pols == [2]bpf.SluicePolicy{} {
		return k, nil
	}
	ports, err := keysWhere(m.ports, func(key bpf.SluicePortKey, _ uint64) bool { return key.Pod == m.pod })
	if err != nil {
		return k, fmt.Errorf("read ports: %w", err)
	}
	for _, key := range ports {
		k.ports[key.Slot&1] = append(k.ports[key.Slot&1], key)
	}
	for _, trie := range []struct {
		m   *ebpf.Map
		dst *[2][]bpf.SluiceCidrKey
	}{{m.include, &k.include}, {m.exclude, &k.exclude}, {m.kernelOnly, &k.kernelOnly}} {
		cidrs, err := keysWhere(trie.m, func(key bpf.SluiceCidrKey, _ uint8) bool { return key.Pod == m.pod })
		if err != nil {
			return k, fmt.Errorf("read CIDRs: %w", err)
		}
		for _, key := range cidrs {
			trie.dst[key.Slot&1] = append(trie.dst[key.Slot&1], key)
		}
	}
	return k, nil
}

func (m policyMaps) slot() (uint8, error) {
	var active uint32
	if err := m.active.Lookup(m.pod, &active); err != nil {
		return 0, fmt.Errorf("read active policy slot: %w", err)
	}
	return uint8(active & activeSlot), nil
}

// planOf is the plan of pol and slot's port sets and CIDRs.
func (m policyMaps) planOf(slot uint8, pol bpf.SluicePolicy, keys podKeys) (redirect.Plan, error) {
	e := slotEntries{policy: pol, include: keys.include[slot], exclude: keys.exclude[slot], kernelOnly: keys.kernelOnly[slot]}
	e.ports = map[bpf.SluicePortKey]uint64{}
	for _, k := range keys.ports[slot] {
		var w uint64
		if err := m.ports.Lookup(k, &w); err != nil {
			return redirect.Plan{}, fmt.Errorf("read ports: %w", err)
		}
		e.ports[k] = w
	}
	return e.plan(), nil
}

// write puts p in force as one visible step: it fills the slot not in force,
// then flips the active index, so a hook sees either the whole old plan or
// the whole new one. The old slot is left as it was until the next write, so
// a hook that read the old index a moment before the flip still finds a
// complete plan. It reports whether anything changed. A pod never written
// reads as slot 0 with nothing in it, and gets slot 1.
func (m policyMaps) write(p redirect.Plan) (bool, error) {
	keys, err := m.keys()
	if err != nil {
		return false, err
	}
	cur, slot, err := m.readWith(keys)
	if err != nil {
		return false, err
	}
	var never bpf.SluicePolicy
	if err := m.policies.Lookup(2*m.pod+uint32(slot), &never); err == nil && never != (bpf.SluicePolicy{}) && cur.Equal(p) {
		return false, nil
	}
	next := slot ^ 1
	e := entriesOf(p, m.pod, next)
	// The slot's policy first: keys looks for entries only where a
	// policy is (and no hook reads the slot before the flip).
	if err := m.policies.Put(2*m.pod+uint32(next), &e.policy); err != nil {
		return false, fmt.Errorf("write policy: %w", err)
	}
	if err := m.clear(next, keys); err != nil {
		return false, err
	}
	one := uint8(1)
	for _, list := range []struct {
		trie *ebpf.Map
		keys []bpf.SluiceCidrKey
		what string
	}{{m.include, e.include, "include"}, {m.exclude, e.exclude, "exclude"}, {m.kernelOnly, e.kernelOnly, "kernel-only"}} {
		for _, k := range list.keys {
			if err := list.trie.Put(k, one); err != nil {
				return false, fmt.Errorf("write %s CIDR %s: %w", list.what, prefixFromKey(k), err)
			}
		}
	}
	for k, w := range e.ports {
		if err := m.ports.Put(k, w); err != nil {
			return false, fmt.Errorf("write ports: %w", err)
		}
	}
	if err := m.active.Put(m.pod, uint32(next)|activeTaken); err != nil {
		return false, fmt.Errorf("switch to the new policy: %w", err)
	}
	return true, nil
}

// clear empties the pod's slot: its CIDRs and its port words.
func (m policyMaps) clear(slot uint8, keys podKeys) error {
	for _, trie := range []struct {
		m     *ebpf.Map
		stale []bpf.SluiceCidrKey
	}{{m.include, keys.include[slot]}, {m.exclude, keys.exclude[slot]}, {m.kernelOnly, keys.kernelOnly[slot]}} {
		for _, k := range trie.stale {
			if err := trie.m.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
				return fmt.Errorf("clear CIDR %s: %w", prefixFromKey(k), err)
			}
		}
	}
	for _, k := range keys.ports[slot] {
		if err := m.ports.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return fmt.Errorf("clear ports: %w", err)
		}
	}
	return nil
}

// forget removes the pod's policy from the node maps: both slots, and its
// slot in force back to 0. The index stays taken: unregister frees it
// last.
func (m policyMaps) forget() error {
	keys, err := m.keys()
	if err != nil {
		return err
	}
	var errs []error
	for slot := range uint8(2) {
		// A slot's policy goes after its entries, and only once they
		// are gone (keys).
		if err := m.clear(slot, keys); err != nil {
			errs = append(errs, err)
			continue
		}
		if err := m.policies.Put(2*m.pod+uint32(slot), &bpf.SluicePolicy{}); err != nil {
			errs = append(errs, fmt.Errorf("clear policy: %w", err))
		}
	}
	if err := m.active.Put(m.pod, uint32(activeTaken)); err != nil {
		errs = append(errs, fmt.Errorf("clear policy index: %w", err))
	}
	return errors.Join(errs...)
}

// keysWhere returns the keys of m's entries that match. The node's maps
// hold every pod's entries, and install and uninstall look for one pod's:
// a hash map is read in batches, a few system calls for all of them
// instead of two an entry, so a pod's install does not slow down with the
// pods already on the node. (An LPM trie has no batch reads: its entries
// are CIDRs, which a default install has none of.)
func keysWhere[K, V any](m *ebpf.Map, match func(K, V) bool) ([]K, error) {
	var keys []K
	if m.Type() == ebpf.Hash {
		ks, vs := make([]K, batchSize), make([]V, batchSize)
		var cursor ebpf.MapBatchCursor
		for {
			n, err := m.BatchLookup(&cursor, ks, vs, nil)
			for i := range n {
				if match(ks[i], vs[i]) {
					keys = append(keys, ks[i])
				}
			}
			if errors.Is(err, ebpf.ErrKeyNotExist) {
				return keys, nil
			}
			if err != nil {
				return nil, err
			}
		}
	}
	var k K
	var v V
	it := m.Iterate()
	for it.Next(&k, &v) {
		if match(k, v) {
			keys = append(keys, k)
		}
	}
	return keys, it.Err()
}

// batchSize is how many entries one batch read returns at most: more than
// a hash bucket ever holds (the kernel refuses a batch smaller than a
// bucket).
const batchSize = 4096

// slotEntries is a Plan as one policy slot holds it.
type slotEntries struct {
	policy     bpf.SluicePolicy
	ports      map[bpf.SluicePortKey]uint64 // the words with a port in them
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
		{&p.OffloadPorts, bpf.SluicePortSetPORT_OUT_OFFLOAD},
		{&p.OffloadInboundPorts, bpf.SluicePortSetPORT_IN_OFFLOAD},
	}
}

func entriesOf(p redirect.Plan, pod uint32, slot uint8) slotEntries {
	e := slotEntries{ports: map[bpf.SluicePortKey]uint64{}, policy: bpf.SluicePolicy{
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
	if len(p.OffloadPorts) > 0 || len(p.OffloadInboundPorts) > 0 {
		e.policy.Flags |= uint32(bpf.SluiceConfigFlagCONFIG_OFFLOAD)
	}
	copy(e.policy.SidecarPorts[:], p.SidecarPorts)
	if p.RedirectDNS {
		e.policy.Flags |= uint32(bpf.SluiceConfigFlagCONFIG_REDIRECT_DNS)
		if p.CaptureAllDNS {
			e.policy.Flags |= uint32(bpf.SluiceConfigFlagCONFIG_CAPTURE_ALL_DNS)
		}
		e.policy.DnsPort = p.DNSPort
		for i, a := range p.DNSServers[:min(len(p.DNSServers), len(e.policy.DnsServers))] {
			e.policy.DnsServers[i] = Addr6(a)
			e.policy.DnsCount++
		}
	}
	for _, ps := range portSets(&p) {
		for _, port := range *ps.ports {
			e.ports[bpf.SluicePortKey{Pod: pod, Slot: slot, Set: uint8(ps.set), Word: port >> 6}] |= 1 << (port & 63)
		}
	}
	for _, c := range p.IncludeCIDRs {
		e.include = append(e.include, cidrKey(c, pod, slot))
	}
	for _, c := range p.ExcludeCIDRs {
		e.exclude = append(e.exclude, cidrKey(c, pod, slot))
	}
	for _, c := range p.KernelOnlyCIDRs {
		e.kernelOnly = append(e.kernelOnly, cidrKey(c, pod, slot))
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
		RedirectDNS:     pol.Flags&uint32(bpf.SluiceConfigFlagCONFIG_REDIRECT_DNS) != 0,
		CaptureAllDNS:   pol.Flags&uint32(bpf.SluiceConfigFlagCONFIG_CAPTURE_ALL_DNS) != 0,
		DNSPort:         pol.DnsPort,
	}
	for _, a := range pol.DnsServers[:min(int(pol.DnsCount), len(pol.DnsServers))] {
		p.DNSServers = append(p.DNSServers, AddrFrom6(a))
	}
	for _, port := range pol.SidecarPorts {
		if port != 0 {
			p.SidecarPorts = append(p.SidecarPorts, port)
		}
	}
	for _, ps := range portSets(&p) {
		set := make([]uint64, 1024)
		for k, w := range e.ports {
			if k.Set == uint8(ps.set) {
				set[k.Word] = w
			}
		}
		*ps.ports = portsIn(set)
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

// cidrKeyBits is the pod, slot and family bytes that lead every CIDR key.
const cidrKeyBits = 48

func cidrKey(p netip.Prefix, pod uint32, slot uint8) bpf.SluiceCidrKey {
	p = p.Masked()
	k := bpf.SluiceCidrKey{Prefixlen: uint32(cidrKeyBits + p.Bits()), Pod: pod, Slot: slot, Family: afInet6}
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
