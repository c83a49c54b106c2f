package loader

import (
	"encoding/binary"
	"net/netip"
	"slices"

	"github.com/sluicemesh/sluice/bpf"
)

// Capture is what the BPF programs enforce for one pod: the content of the
// config, CIDR and port maps, in the terms a user configured them.
type Capture struct {
	OutboundPort uint16 `json:"outbound_port"`
	InboundPort  uint16 `json:"inbound_port"`
	ProxyUID     uint32 `json:"proxy_uid"`
	ProxyGID     uint32 `json:"proxy_gid"`

	IncludeAllCIDRs bool           `json:"include_all_cidrs"`
	IncludeCIDRs    []netip.Prefix `json:"include_cidrs"`
	ExcludeCIDRs    []netip.Prefix `json:"exclude_cidrs"`

	IncludeOutboundPorts []uint16 `json:"include_outbound_ports"`
	ExcludeOutboundPorts []uint16 `json:"exclude_outbound_ports"`

	InboundAllPorts     bool     `json:"inbound_all_ports"`
	InboundPorts        []uint16 `json:"inbound_ports"`
	ExcludeInboundPorts []uint16 `json:"exclude_inbound_ports"`
}

// mapEntries is a Capture as the BPF maps hold it.
type mapEntries struct {
	config  bpf.SluiceCaptureConfig
	include []bpf.SluiceLpmKey
	exclude []bpf.SluiceLpmKey
	ports   map[uint32]uint8
}

func (c Capture) entries() mapEntries {
	e := mapEntries{
		config: bpf.SluiceCaptureConfig{
			ProxyUid:     c.ProxyUID,
			ProxyGid:     c.ProxyGID,
			OutboundPort: c.OutboundPort,
			InboundPort:  c.InboundPort,
		},
		ports: map[uint32]uint8{},
	}
	if c.IncludeAllCIDRs {
		e.config.Flags |= uint32(bpf.SluiceConfigFlagCONFIG_INCLUDE_ALL_CIDRS)
	}
	if c.InboundAllPorts {
		e.config.Flags |= uint32(bpf.SluiceConfigFlagCONFIG_INBOUND_ALL_PORTS)
	}
	for _, p := range c.IncludeCIDRs {
		e.include = append(e.include, lpmKey(p))
	}
	for _, p := range c.ExcludeCIDRs {
		e.exclude = append(e.exclude, lpmKey(p))
	}
	for _, set := range []struct {
		ports []uint16
		flag  bpf.SluicePortFlag
	}{
		{c.IncludeOutboundPorts, bpf.SluicePortFlagPORT_OUT_INCLUDE},
		{c.ExcludeOutboundPorts, bpf.SluicePortFlagPORT_OUT_EXCLUDE},
		{c.InboundPorts, bpf.SluicePortFlagPORT_IN_INCLUDE},
		{c.ExcludeInboundPorts, bpf.SluicePortFlagPORT_IN_EXCLUDE},
	} {
		for _, port := range set.ports {
			e.ports[uint32(port)] |= uint8(set.flag)
		}
	}
	return e
}

// capture turns map contents back into a Capture (for status).
func (e mapEntries) capture() Capture {
	c := Capture{
		OutboundPort:    e.config.OutboundPort,
		InboundPort:     e.config.InboundPort,
		ProxyUID:        e.config.ProxyUid,
		ProxyGID:        e.config.ProxyGid,
		IncludeAllCIDRs: e.config.Flags&uint32(bpf.SluiceConfigFlagCONFIG_INCLUDE_ALL_CIDRS) != 0,
		InboundAllPorts: e.config.Flags&uint32(bpf.SluiceConfigFlagCONFIG_INBOUND_ALL_PORTS) != 0,
	}
	for _, k := range e.include {
		c.IncludeCIDRs = append(c.IncludeCIDRs, prefixFromKey(k))
	}
	for _, k := range e.exclude {
		c.ExcludeCIDRs = append(c.ExcludeCIDRs, prefixFromKey(k))
	}
	ports := make([]uint32, 0, len(e.ports))
	for port := range e.ports {
		ports = append(ports, port)
	}
	slices.Sort(ports)
	for _, p := range ports {
		flags, port := bpf.SluicePortFlag(e.ports[p]), uint16(p)
		if flags&bpf.SluicePortFlagPORT_OUT_INCLUDE != 0 {
			c.IncludeOutboundPorts = append(c.IncludeOutboundPorts, port)
		}
		if flags&bpf.SluicePortFlagPORT_OUT_EXCLUDE != 0 {
			c.ExcludeOutboundPorts = append(c.ExcludeOutboundPorts, port)
		}
		if flags&bpf.SluicePortFlagPORT_IN_INCLUDE != 0 {
			c.InboundPorts = append(c.InboundPorts, port)
		}
		if flags&bpf.SluicePortFlagPORT_IN_EXCLUDE != 0 {
			c.ExcludeInboundPorts = append(c.ExcludeInboundPorts, port)
		}
	}
	slices.SortFunc(c.IncludeCIDRs, netip.Prefix.Compare)
	slices.SortFunc(c.ExcludeCIDRs, netip.Prefix.Compare)
	return c
}

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

func lpmKey(p netip.Prefix) bpf.SluiceLpmKey {
	p = p.Masked()
	bits := p.Bits()
	if p.Addr().Is4() {
		bits += 96
	}
	return bpf.SluiceLpmKey{Prefixlen: uint32(bits), Addr: Addr6(p.Addr())}
}

func prefixFromKey(k bpf.SluiceLpmKey) netip.Prefix {
	a := AddrFrom6(k.Addr)
	bits := int(k.Prefixlen)
	if a.Is4() {
		bits -= 96
	}
	p, err := a.Prefix(bits)
	if err != nil {
		// Only the loader writes these keys; a bad one means a corrupt map.
		return netip.Prefix{}
	}
	return p
}
