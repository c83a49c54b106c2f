package redirect

import (
	"net/netip"
	"slices"
)

// Plan is what the BPF programs enforce for one pod, in the terms a user
// configured it: validated, with defaults filled in. The loader writes it
// into the maps as it is and reads it back for status.
type Plan struct {
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

	// SidecarPorts are the sidecar's own ports (its listeners, metrics and
	// health): connections to them are the sidecar's business, not the
	// pod's flows. At most MaxSidecarPorts.
	SidecarPorts []uint16 `json:"sidecar_ports"`

	// NoFlows turns flow telemetry off: capture only.
	NoFlows bool `json:"no_flows,omitempty"`
	// Splice passes bytes between the app's and the sidecar's ends of a
	// connection socket to socket, skipping loopback TCP.
	Splice bool `json:"splice,omitempty"`
	// FailOpen lets captured connections go direct (counted) while no
	// sidecar listens; otherwise they are refused at once, both ways.
	FailOpen bool `json:"fail_open,omitempty"`

	// Kernel-only: captured connections to these destination ports or
	// CIDRs go straight to their destination (or the canary route's pick)
	// with no sidecar, measured and routed in the kernel alone; inbound
	// ones to these ports go straight to the app, measured.
	KernelOnlyPorts        []uint16       `json:"kernel_only_ports,omitempty"`
	KernelOnlyCIDRs        []netip.Prefix `json:"kernel_only_cidrs,omitempty"`
	KernelOnlyInboundPorts []uint16       `json:"kernel_only_inbound_ports,omitempty"`

	// Offload: the sidecar accepts captured connections to these
	// destination ports (inbound: to these app ports), dials, and then
	// hands the app's sending direction to the kernel, which puts the
	// app's messages straight onto the sidecar's far socket. Needs Splice.
	OffloadPorts        []uint16 `json:"offload_ports,omitempty"`
	OffloadInboundPorts []uint16 `json:"offload_inbound_ports,omitempty"`

	// ResolveServices: the node's agent keeps the pod's routes of every
	// Service (cluster IP and port to its ready endpoints), so a connect
	// to a Service is sent to an endpoint in the kernel. The hooks need
	// nothing for it: the routes do the work.
	ResolveServices bool `json:"resolve_services,omitempty"`

	// DNS capture: UDP and TCP port 53 to DNSServers (to any address with
	// CaptureAllDNS) go to the sidecar's DNSPort on loopback, the reply's
	// source given back as the server asked; never the proxy identity's.
	RedirectDNS   bool         `json:"redirect_dns,omitempty"`
	CaptureAllDNS bool         `json:"capture_all_dns,omitempty"`
	DNSPort       uint16       `json:"dns_port,omitempty"`
	DNSServers    []netip.Addr `json:"dns_servers,omitempty"`
}

// MaxDNSServers is how many nameservers the BPF policy holds: resolv.conf
// takes 3 (glibc's MAXNS).
const MaxDNSServers = 4

// MaxSidecarPorts is how many sidecar ports the BPF policy holds.
const MaxSidecarPorts = 8

// MaxCIDRs is how many CIDRs one list of a plan may hold, IPv4 and IPv6
// together: the BPF side's CIDR_SLOT_ENTRIES (sluice.h).
const MaxCIDRs = 8192

// Normalize sorts and deduplicates every list and masks every prefix, so two
// plans that enforce the same thing compare equal.
func (p Plan) Normalize() Plan {
	p.IncludeCIDRs = normPrefixes(p.IncludeCIDRs)
	p.ExcludeCIDRs = normPrefixes(p.ExcludeCIDRs)
	p.IncludeOutboundPorts = dedup(p.IncludeOutboundPorts)
	p.ExcludeOutboundPorts = dedup(p.ExcludeOutboundPorts)
	p.InboundPorts = dedup(p.InboundPorts)
	p.ExcludeInboundPorts = dedup(p.ExcludeInboundPorts)
	p.SidecarPorts = dedup(p.SidecarPorts)
	p.KernelOnlyPorts = dedup(p.KernelOnlyPorts)
	p.KernelOnlyCIDRs = normPrefixes(p.KernelOnlyCIDRs)
	p.KernelOnlyInboundPorts = dedup(p.KernelOnlyInboundPorts)
	p.OffloadPorts = dedup(p.OffloadPorts)
	p.OffloadInboundPorts = dedup(p.OffloadInboundPorts)
	p.DNSServers = dedupAddrs(p.DNSServers)
	return p
}

// Equal reports whether two plans enforce the same policy: ResolveServices,
// which the node's agent carries out, not the pod's hooks, is no part of it.
func (p Plan) Equal(o Plan) bool {
	a, b := p.Normalize(), o.Normalize()
	return a.OutboundPort == b.OutboundPort && a.InboundPort == b.InboundPort &&
		a.ProxyUID == b.ProxyUID && a.ProxyGID == b.ProxyGID &&
		a.IncludeAllCIDRs == b.IncludeAllCIDRs && a.InboundAllPorts == b.InboundAllPorts && a.NoFlows == b.NoFlows && a.Splice == b.Splice && a.FailOpen == b.FailOpen &&
		a.RedirectDNS == b.RedirectDNS && a.CaptureAllDNS == b.CaptureAllDNS && a.DNSPort == b.DNSPort &&
		slices.Equal(a.DNSServers, b.DNSServers) &&
		slices.Equal(a.IncludeCIDRs, b.IncludeCIDRs) && slices.Equal(a.ExcludeCIDRs, b.ExcludeCIDRs) &&
		slices.Equal(a.IncludeOutboundPorts, b.IncludeOutboundPorts) &&
		slices.Equal(a.ExcludeOutboundPorts, b.ExcludeOutboundPorts) &&
		slices.Equal(a.InboundPorts, b.InboundPorts) && slices.Equal(a.ExcludeInboundPorts, b.ExcludeInboundPorts) &&
		slices.Equal(a.SidecarPorts, b.SidecarPorts) &&
		slices.Equal(a.KernelOnlyPorts, b.KernelOnlyPorts) && slices.Equal(a.KernelOnlyCIDRs, b.KernelOnlyCIDRs) &&
		slices.Equal(a.KernelOnlyInboundPorts, b.KernelOnlyInboundPorts) &&
		slices.Equal(a.OffloadPorts, b.OffloadPorts) && slices.Equal(a.OffloadInboundPorts, b.OffloadInboundPorts)
}

func normPrefixes(ps []netip.Prefix) []netip.Prefix {
	if len(ps) == 0 {
		return nil
	}
	out := make([]netip.Prefix, len(ps))
	for i, p := range ps {
		out[i] = p.Masked()
	}
	slices.SortFunc(out, netip.Prefix.Compare)
	return slices.Compact(out)
}

func dedup(ports []uint16) []uint16 {
	if len(ports) == 0 {
		return nil
	}
	ports = slices.Clone(ports)
	slices.Sort(ports)
	return slices.Compact(ports)
}

// dedupAddrs sorts and deduplicates addresses, IPv4 v4-mapped ones as IPv4.
func dedupAddrs(as []netip.Addr) []netip.Addr {
	if len(as) == 0 {
		return nil
	}
	out := make([]netip.Addr, len(as))
	for i, a := range as {
		out[i] = a.Unmap()
	}
	slices.SortFunc(out, func(a, b netip.Addr) int { return a.Compare(b) })
	return slices.Compact(out)
}
