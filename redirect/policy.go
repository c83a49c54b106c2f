// Package redirect turns what a user asks for (Istio and Linkerd flags, Sluice's
// own) into a validated capture Plan. It is pure: it touches no kernel state
// and imports no BPF library, so it is tested without root and linked into
// anything that needs to read a plan.
package redirect

import (
	"errors"
	"flag"
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"
)

// Defaults follow Istio's sidecar so existing pod specs keep their meaning.
const (
	DefaultOutboundPort = 15001
	DefaultInboundPort  = 15006
	DefaultProxyID      = 1337
	// DefaultMetricsPort is where `sluice run` serves /metrics and /flows,
	// the port Istio's Envoy serves its stats on.
	DefaultMetricsPort = 15090
)

// Policy is the capture configuration for one pod, as a user states it.
type Policy struct {
	OutboundPort uint16
	InboundPort  uint16
	ProxyUID     uint32
	ProxyGID     uint32
	// MetricsPort is the sidecar's --metrics-addr port: reserved for the
	// proxy identity like the capture ports, never captured inbound.
	MetricsPort uint16
	// Mode is Istio's inbound interception mode; only REDIRECT is supported.
	Mode string

	IncludeCIDRs CIDRs
	ExcludeCIDRs CIDRs

	IncludeOutboundPorts Ports
	ExcludeOutboundPorts Ports
	InboundPorts         Ports
	ExcludeInboundPorts  Ports

	// Linkerd is set when a Linkerd proxy-init flag was used: Linkerd's
	// proxy ports then join the inbound ports never captured.
	Linkerd bool
	// AllowRootProxy accepts uid or gid 0 as the proxy identity, which
	// exempts every root process in the pod from capture.
	AllowRootProxy bool
	// Flows measures the pod's flows in the kernel for the sidecar to
	// export; off, Sluice only captures.
	Flows bool
	// Splice passes bytes between the app and the sidecar socket to socket.
	Splice bool
	// FailOpen lets traffic go direct while no sidecar listens.
	FailOpen bool

	// Kernel-only ports and CIDRs: captured, but carried with no sidecar.
	KernelOnlyPorts        Ports
	KernelOnlyCIDRs        CIDRs
	KernelOnlyInboundPorts Ports

	// Offload ports: proxied, then handed to the kernel (needs Splice).
	OffloadPorts        Ports
	OffloadInboundPorts Ports

	// ResolveServices asks the node's agent to keep the pod's routes of
	// every Service.
	ResolveServices bool

	// DNS capture (Istio's --redirect-dns, --capture-all-dns).
	RedirectDNS   bool
	CaptureAllDNS bool
	DNSPort       uint16
	// DNSServers are the nameservers whose queries are taken: the
	// command reads them from resolv.conf when none are given.
	DNSServers Addrs
}

// DefaultDNSPort is the sidecar's DNS port, Istio's.
const DefaultDNSPort = 15053

// Sidecar ports that are never captured inbound, besides -p and -z: Istio's
// merged metrics, health and Envoy stats ports, and Linkerd's proxy admin
// ports when Linkerd flags are in use (what their injectors skip).
var (
	istioSidecarPorts   = []uint16{15020, 15021, 15090}
	linkerdSidecarPorts = []uint16{4190, 4191}
)

// DefaultPolicy captures every outbound destination and every inbound port,
// as istio-iptables does with the injector's usual flags.
func DefaultPolicy() Policy {
	return Policy{
		OutboundPort: DefaultOutboundPort,
		InboundPort:  DefaultInboundPort,
		ProxyUID:     DefaultProxyID,
		ProxyGID:     DefaultProxyID,
		MetricsPort:  DefaultMetricsPort,
		DNSPort:      DefaultDNSPort,
		Mode:         "REDIRECT",
		IncludeCIDRs: CIDRs{All: true},
		InboundPorts: Ports{All: true},
		Flows:        true,
	}
}

// RegisterFlags adds the istio-iptables flags (short and long forms) and
// Linkerd proxy-init's equivalents to fs, all writing into p.
func (p *Policy) RegisterFlags(fs *flag.FlagSet) {
	for _, f := range []struct {
		names []string // the Istio short name first
		usage string
		value flag.Value
	}{
		{[]string{"p", "proxy-port", "outgoing-proxy-port"}, "sidecar's outbound listener (127.0.0.1 and ::1)", portValue{&p.OutboundPort}},
		{[]string{"z", "inbound-capture-port", "incoming-proxy-port"}, "sidecar's inbound listener", portValue{&p.InboundPort}},
		{[]string{"u", "proxy-uid"}, "uid of the proxy, whose connections are never captured", idValue{&p.ProxyUID, "uid"}},
		{[]string{"g", "proxy-gid"}, "gid of the proxy, whose connections are never captured", idValue{&p.ProxyGID, "gid"}},
		{[]string{"m", "istio-inbound-interception-mode"}, "inbound interception mode; only REDIRECT", modeValue{&p.Mode}},
		{[]string{"i", "istio-service-cidr"}, "outbound destinations to capture, comma-separated; '*' = all, '' = none", &p.IncludeCIDRs},
		{[]string{"x", "istio-service-exclude-cidr"}, "outbound destinations never captured", &p.ExcludeCIDRs},
		{[]string{"q", "istio-include-outbound-ports"}, "outbound ports captured whatever the destination", &p.IncludeOutboundPorts},
		{[]string{"o", "istio-local-outbound-ports-exclude", "outbound-ports-to-ignore"}, "outbound ports never captured", &p.ExcludeOutboundPorts},
		{[]string{"b", "istio-inbound-ports"}, "inbound ports to capture; '*' = all", &p.InboundPorts},
		{[]string{"d", "istio-local-exclude-ports", "inbound-ports-to-ignore"}, "inbound ports never captured", &p.ExcludeInboundPorts},
	} {
		fs.Var(f.value, f.names[0], f.usage)
		for _, alias := range f.names[1:] {
			var v flag.Value = f.value
			if linkerdFlags[alias] {
				v = markValue{v, &p.Linkerd}
			}
			fs.Var(v, alias, "same as -"+f.names[0])
		}
	}
	fs.BoolVar(&p.AllowRootProxy, "allow-root-proxy", false, "accept -u 0 or -g 0 (every root process in the pod then goes uncaptured)")
	fs.Var(portValue{&p.MetricsPort}, "metrics-port", "the port of the sidecar's --metrics-addr: only the proxy uid/gid may bind it (as the capture ports),\n"+
		"so no process in the pod can take it while the sidecar restarts; never captured inbound")
	fs.BoolVar(&p.Flows, "flows", true, "measure the pod's flows in the kernel for the sidecar's metrics (--flows=false: capture only)")
	fs.BoolVar(&p.Splice, "splice", false, "pass bytes between the app and the sidecar socket to socket, skipping loopback TCP.\n"+
		"Off by default: a process in the pod that reads its sockets with splice(2), as Go's io.Copy\n"+
		"between two TCP connections does, would not see the bytes. Needs a kernel that counts spliced\n"+
		"bytes (sk_psock.msg_tot_len: Debian's 6.12.118, Linux 6.18; not 6.1): 'sluice check' says")
	fs.Var(negated{&p.Splice}, "no-splice", "same as --splice=false")
	fs.BoolVar(&p.FailOpen, "fail-open", false, "while no sidecar listens, let captured connections go direct (counted as fail_open_*)")
	fs.Var(&p.KernelOnlyPorts, "kernel-only-ports", "outbound destination ports whose captured connections go straight on, with no sidecar\n"+
		"(telemetry and canary routes in the kernel only)")
	fs.Var(&p.KernelOnlyCIDRs, "kernel-only-cidrs", "outbound destinations whose captured connections go straight on, with no sidecar")
	fs.Var(&p.KernelOnlyInboundPorts, "kernel-only-inbound-ports", "inbound ports whose connections go straight to the app, counted, with no sidecar")
	fs.Var(&p.OffloadPorts, "offload-ports", "outbound destination ports whose connections the sidecar accepts and dials, then hands to the kernel:\n"+
		"the app's bytes go straight out on the sidecar's upstream socket, not through it (needs --splice)")
	fs.Var(&p.OffloadInboundPorts, "offload-inbound-ports", "inbound app ports handed to the kernel the same way: the app's replies go straight\n"+
		"out on the sidecar's accepted socket (needs --splice)")
	fs.BoolVar(&p.ResolveServices, "resolve-services", false, "have the node's agent (agent --kubernetes) resolve every Service in this pod's kernel: a captured connect\n"+
		"to a cluster IP goes to one of the Service's ready endpoints, picked at connect time, with no kube-proxy hop\n"+
		"(the app still sees the cluster IP as its peer; at most 128 Service ports a pod, the pod's namespace first)")
	fs.BoolVar(&p.RedirectDNS, "redirect-dns", false, "send the pod's DNS (UDP and TCP port 53 to its nameservers) to the sidecar's --dns-port on loopback;\n"+
		"the reply's source is given back as the nameserver asked, and the proxy's own queries go out untouched")
	fs.BoolVar(&p.CaptureAllDNS, "capture-all-dns", false, "with --redirect-dns: port 53 of any address, not only the nameservers")
	fs.Var(portValue{&p.DNSPort}, "dns-port", "with --redirect-dns: the sidecar's DNS port (127.0.0.1 and ::1, UDP and TCP), reserved for the proxy")
	fs.Var(&p.DNSServers, "dns-servers", "with --redirect-dns: the nameservers whose queries are taken, comma-separated (default: those of\n"+
		"--resolv-conf)")
	fs.Var(negated{&p.FailOpen}, "fail-closed", "while no sidecar listens, refuse captured connections at once, both ways (the default)")
}

// negated is a boolean flag that clears what another one sets.
type negated struct{ b *bool }

func (n negated) String() string   { return "false" }
func (n negated) IsBoolFlag() bool { return true }
func (n negated) Set(s string) error {
	v, err := strconv.ParseBool(s)
	if err != nil {
		return errors.New("parse error") // as flag's own boolean flags say it
	}
	*n.b = !v
	return nil
}

// linkerdFlags are the flags only Linkerd's proxy-init spells this way.
var linkerdFlags = map[string]bool{
	"outgoing-proxy-port": true, "incoming-proxy-port": true,
	"outbound-ports-to-ignore": true, "inbound-ports-to-ignore": true,
}

// markValue records that its flag was given.
type markValue struct {
	flag.Value
	given *bool
}

// String serves flag.PrintDefaults, which calls it on a zero markValue.
func (m markValue) String() string {
	if m.Value == nil {
		return ""
	}
	return m.Value.String()
}

func (m markValue) Set(s string) error {
	*m.given = true
	return m.Value.Set(s)
}

// Plan validates the policy and turns it into what the BPF maps enforce.
// The sidecar's own listeners are never captured inbound, whatever -b says.
func (p Policy) Plan() (Plan, error) {
	if p.Mode != "REDIRECT" {
		return Plan{}, fmt.Errorf("interception mode %q is not supported: use -m REDIRECT (Sluice steers inbound traffic with TC, not TPROXY)", p.Mode)
	}
	if p.OutboundPort == 0 || p.InboundPort == 0 {
		return Plan{}, errors.New("proxy ports must be set: use -p and -z with ports 1-65535")
	}
	if p.OutboundPort == p.InboundPort {
		return Plan{}, fmt.Errorf("outbound port -p and inbound port -z are both %d: give the sidecar two different ports", p.OutboundPort)
	}
	// '*' means all only to -i and -b; the plan has no "exclude every
	// destination" or "every port", so refuse it rather than ignore it.
	for _, f := range []struct {
		name string
		all  bool
	}{{"-x", p.ExcludeCIDRs.All}, {"-q", p.IncludeOutboundPorts.All}, {"-o", p.ExcludeOutboundPorts.All}, {"-d", p.ExcludeInboundPorts.All},
		{"--kernel-only-ports", p.KernelOnlyPorts.All}, {"--kernel-only-cidrs", p.KernelOnlyCIDRs.All}, {"--kernel-only-inbound-ports", p.KernelOnlyInboundPorts.All},
		{"--offload-ports", p.OffloadPorts.All}, {"--offload-inbound-ports", p.OffloadInboundPorts.All}} {
		if f.all {
			return Plan{}, fmt.Errorf("%s '*' is not supported: list the CIDRs or ports (only -i and -b take '*')", f.name)
		}
	}
	if (len(p.OffloadPorts.List) > 0 || len(p.OffloadInboundPorts.List) > 0) && !p.Splice {
		return Plan{}, errors.New("--offload-ports and --offload-inbound-ports hand the app's spliced messages to the kernel: add --splice")
	}
	if (p.ProxyUID == 0 || p.ProxyGID == 0) && !p.AllowRootProxy {
		return Plan{}, fmt.Errorf("proxy uid/gid %d/%d would exempt every root process in the pod from capture: run the proxy as its own uid and gid (e.g. -u 1337 -g 1337), or pass --allow-root-proxy if that is meant", p.ProxyUID, p.ProxyGID)
	}
	if p.MetricsPort == p.OutboundPort || p.MetricsPort == p.InboundPort {
		return Plan{}, fmt.Errorf("--metrics-port %d is also a proxy listener's port (-p %d, -z %d): give the sidecar's metrics a port of their own", p.MetricsPort, p.OutboundPort, p.InboundPort)
	}
	for _, l := range []struct {
		name  string
		cidrs []netip.Prefix
	}{{"-i", p.IncludeCIDRs.List}, {"-x", p.ExcludeCIDRs.List}, {"--kernel-only-cidrs", p.KernelOnlyCIDRs.List}} {
		if n := len(normPrefixes(l.cidrs)); n > MaxCIDRs {
			return Plan{}, fmt.Errorf("%s lists %d CIDRs, at most %d per list (IPv4 and IPv6 together): merge neighbouring ranges into wider prefixes", l.name, n, MaxCIDRs)
		}
	}
	own := slices.Concat([]uint16{p.OutboundPort, p.InboundPort}, istioSidecarPorts)
	if p.MetricsPort != 0 {
		own = append(own, p.MetricsPort)
	}
	var dnsServers []netip.Addr
	if p.RedirectDNS {
		switch {
		case p.DNSPort == 0:
			return Plan{}, errors.New("--dns-port 0: give the sidecar's DNS port (Istio's is 15053)")
		case p.DNSPort == p.OutboundPort || p.DNSPort == p.InboundPort:
			return Plan{}, fmt.Errorf("--dns-port %d is also a proxy listener's port (-p %d, -z %d): give the DNS forwarder a port of its own", p.DNSPort, p.OutboundPort, p.InboundPort)
		case !p.CaptureAllDNS && len(p.DNSServers) == 0:
			return Plan{}, errors.New("--redirect-dns without nameservers: give --dns-servers, a --resolv-conf naming some, or --capture-all-dns")
		case len(dedupAddrs(p.DNSServers)) > MaxDNSServers:
			return Plan{}, fmt.Errorf("--dns-servers names %d nameservers: at most %d", len(dedupAddrs(p.DNSServers)), MaxDNSServers)
		}
		own = append(own, p.DNSPort)
		dnsServers = p.DNSServers
	} else if p.CaptureAllDNS {
		return Plan{}, errors.New("--capture-all-dns needs --redirect-dns: it says which DNS is captured")
	}
	if n := len(dedup(own)); n > MaxSidecarPorts {
		return Plan{}, fmt.Errorf("the sidecar's ports %v are %d: the kernel's policy holds %d", dedup(own), n, MaxSidecarPorts)
	}
	if p.Linkerd {
		own = append(own, linkerdSidecarPorts...)
	}
	return Plan{
		OutboundPort:           p.OutboundPort,
		InboundPort:            p.InboundPort,
		ProxyUID:               p.ProxyUID,
		ProxyGID:               p.ProxyGID,
		IncludeAllCIDRs:        p.IncludeCIDRs.All,
		IncludeCIDRs:           p.IncludeCIDRs.List,
		ExcludeCIDRs:           p.ExcludeCIDRs.List,
		IncludeOutboundPorts:   p.IncludeOutboundPorts.List,
		ExcludeOutboundPorts:   p.ExcludeOutboundPorts.List,
		InboundAllPorts:        p.InboundPorts.All,
		InboundPorts:           p.InboundPorts.List,
		ExcludeInboundPorts:    slices.Concat(p.ExcludeInboundPorts.List, own),
		SidecarPorts:           own,
		NoFlows:                !p.Flows,
		Splice:                 p.Splice,
		FailOpen:               p.FailOpen,
		KernelOnlyPorts:        p.KernelOnlyPorts.List,
		KernelOnlyCIDRs:        p.KernelOnlyCIDRs.List,
		KernelOnlyInboundPorts: p.KernelOnlyInboundPorts.List,
		OffloadPorts:           p.OffloadPorts.List,
		OffloadInboundPorts:    p.OffloadInboundPorts.List,
		ResolveServices:        p.ResolveServices,
		RedirectDNS:            p.RedirectDNS,
		CaptureAllDNS:          p.RedirectDNS && p.CaptureAllDNS,
		DNSPort:                dnsPort(p),
		DNSServers:             dnsServers,
	}.Normalize(), nil
}

// CIDRs is a comma-separated list of IPv4/IPv6 prefixes; "*" means all.
// Each Set replaces the list, as a repeated istio-iptables flag does.
type CIDRs struct {
	All  bool
	List []netip.Prefix
}

func (c *CIDRs) String() string {
	if c == nil {
		return ""
	}
	if c.All {
		return "*"
	}
	parts := make([]string, len(c.List))
	for i, p := range c.List {
		parts[i] = p.String()
	}
	return strings.Join(parts, ",")
}

func (c *CIDRs) Set(s string) error {
	*c = CIDRs{}
	for _, item := range splitList(s) {
		if item == "*" {
			c.All = true
			continue
		}
		p, err := parseCIDR(item)
		if err != nil {
			return err
		}
		c.List = append(c.List, p)
	}
	if c.All {
		c.List = nil // beside '*' a list adds nothing, and String would drop it
	}
	return nil
}

// parseCIDR accepts a prefix or a bare address (taken as a single host), as
// istio-iptables does.
func parseCIDR(s string) (netip.Prefix, error) {
	if !strings.Contains(s, "/") {
		a, err := netip.ParseAddr(s)
		if err != nil || a.Zone() != "" { // a prefix has no zone: ParsePrefix refuses fe80::1%eth0/128 too
			return netip.Prefix{}, fmt.Errorf("%q is not a CIDR: want a.b.c.d/n or an IPv6 prefix such as 2001:db8::/32", s)
		}
		return netip.PrefixFrom(a.Unmap(), a.Unmap().BitLen()), nil
	}
	p, err := netip.ParsePrefix(s)
	if err != nil {
		return netip.Prefix{}, fmt.Errorf("%q is not a CIDR: want a.b.c.d/n (n 0-32) or an IPv6 prefix (n 0-128)", s)
	}
	// Capture takes a v4-mapped destination for the IPv4 address it is, so
	// a v4-mapped prefix means that IPv4 prefix.
	if p.Addr().Is4In6() && p.Bits() >= 96 {
		p = netip.PrefixFrom(p.Addr().Unmap(), p.Bits()-96)
	}
	return p.Masked(), nil
}

// Ports is a comma-separated list of ports and ranges (a-b, as Linkerd
// accepts); "*" means all.
type Ports struct {
	All  bool
	List []uint16
}

func (p *Ports) String() string {
	if p == nil {
		return ""
	}
	if p.All {
		return "*"
	}
	parts := make([]string, len(p.List))
	for i, port := range p.List {
		parts[i] = strconv.Itoa(int(port))
	}
	return strings.Join(parts, ",")
}

func (p *Ports) Set(s string) error {
	*p = Ports{}
	// A set, not a list: "1-65535,1-65535" costs no more memory than once.
	var set [1 << 16]bool
	for _, item := range splitList(s) {
		if item == "*" {
			p.All = true
			continue
		}
		lo, hi, isRange := strings.Cut(item, "-")
		first, err := parsePort(lo)
		if err != nil {
			return err
		}
		last := first
		if isRange {
			if last, err = parsePort(hi); err != nil {
				return err
			}
			if last < first {
				return fmt.Errorf("port range %q runs backwards: write it low-high", item)
			}
		}
		for port := int(first); port <= int(last); port++ {
			set[port] = true
		}
	}
	if p.All {
		return nil // beside '*' a list adds nothing, and String would drop it
	}
	for port, in := range set {
		if in {
			p.List = append(p.List, uint16(port))
		}
	}
	return nil
}

func parsePort(s string) (uint16, error) {
	n, err := strconv.Atoi(s)
	if err != nil {
		return 0, fmt.Errorf("%q is not a port number: want 1-65535", s)
	}
	if n < 1 || n > 65535 {
		return 0, fmt.Errorf("port %d is out of range: want 1-65535", n)
	}
	return uint16(n), nil
}

func splitList(s string) []string {
	var out []string
	for _, item := range strings.Split(s, ",") {
		if item = strings.TrimSpace(item); item != "" {
			out = append(out, item)
		}
	}
	return out
}

// PortFlag and IDFlag parse a single port or numeric uid/gid into p, with the
// same errors as the policy flags.
func PortFlag(p *uint16) flag.Value            { return portValue{p} }
func IDFlag(p *uint32, kind string) flag.Value { return idValue{p, kind} }

type portValue struct{ p *uint16 }

func (v portValue) String() string {
	if v.p == nil {
		return ""
	}
	return strconv.Itoa(int(*v.p))
}

func (v portValue) Set(s string) error {
	port, err := parsePort(strings.TrimSpace(s))
	if err != nil {
		return err
	}
	*v.p = port
	return nil
}

type idValue struct {
	p    *uint32
	kind string
}

func (v idValue) String() string {
	if v.p == nil {
		return ""
	}
	return strconv.FormatUint(uint64(*v.p), 10)
}

func (v idValue) Set(s string) error {
	n, err := strconv.ParseUint(strings.TrimSpace(s), 10, 32)
	if err != nil || n == 1<<32-1 {
		return fmt.Errorf("%q is not a numeric %s: give the number (e.g. 1337), not a name", s, v.kind)
	}
	*v.p = uint32(n)
	return nil
}

type modeValue struct{ p *string }

func (v modeValue) String() string {
	if v.p == nil {
		return ""
	}
	return *v.p
}

func (v modeValue) Set(s string) error {
	*v.p = strings.ToUpper(strings.TrimSpace(s))
	return nil
}

// dnsPort is the plan's DNS port: none without DNS capture.
func dnsPort(p Policy) uint16 {
	if !p.RedirectDNS {
		return 0
	}
	return p.DNSPort
}

// Addrs is a comma-separated list of IP addresses; each Set replaces it.
type Addrs []netip.Addr

func (a *Addrs) String() string {
	if a == nil {
		return ""
	}
	words := make([]string, len(*a))
	for i, x := range *a {
		words[i] = x.String()
	}
	return strings.Join(words, ",")
}

func (a *Addrs) Set(s string) error {
	*a = nil
	for _, w := range strings.Split(s, ",") {
		if w = strings.TrimSpace(w); w == "" {
			continue
		}
		x, err := netip.ParseAddr(w)
		if err != nil || x.Zone() != "" {
			return fmt.Errorf("%q is not an IP address", w)
		}
		*a = append(*a, x.Unmap())
	}
	return nil
}
