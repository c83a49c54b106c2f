package redirect

import (
	"fmt"
	"net/netip"

	"github.com/spf13/pflag"
)

// ParseLinkerd reads a Linkerd proxy-init command line with that tool's
// meanings and defaults: -p is the inbound (incoming) port and -o the
// outbound one, the opposite of istio-iptables; every outbound destination
// and, unless -r names some, every inbound port is captured; ignore lists
// take ports and ranges and accumulate over repeated flags.
func ParseLinkerd(args []string) (Invocation, error) {
	const tool = "proxy-init"
	inv := Invocation{ProbePort: DefaultProbePort, ProbeTimeout: DefaultProbeTimeout}
	p := DefaultPolicy()
	p.Linkerd = true
	var (
		inPort, outPort, uid, gid = -1, -1, -1, -1
		subnets                   []string
		ipv6                      = true
		logFormat                 = "plain"
		ignoredBool               bool
		ignoredInt                int
		ignoredString             string
	)
	redirectPorts := &appendValue{set: p.InboundPorts.Set}
	inIgnore := &appendValue{set: p.ExcludeInboundPorts.Set}
	outIgnore := &appendValue{set: p.ExcludeOutboundPorts.Set}
	fs := pflag.NewFlagSet(tool, pflag.ContinueOnError)
	fs.IntVarP(&inPort, "incoming-proxy-port", "p", inPort, "port to redirect incoming traffic to")
	fs.IntVarP(&outPort, "outgoing-proxy-port", "o", outPort, "port to redirect outgoing traffic to")
	fs.IntVarP(&uid, "proxy-uid", "u", uid, "uid the proxy runs as; its traffic is never captured")
	fs.IntVar(&gid, "proxy-gid", gid, "gid the proxy runs as (default: --proxy-uid)")
	fs.VarP(redirectPorts, "ports-to-redirect", "r", "inbound ports to capture (default all)")
	fs.Var(inIgnore, "inbound-ports-to-ignore", "inbound ports and ranges never captured")
	fs.Var(outIgnore, "outbound-ports-to-ignore", "outbound ports and ranges never captured")
	fs.StringSliceVar(&subnets, "subnets-to-ignore", nil, "source subnets whose inbound traffic is not captured (not supported)")
	fs.BoolVar(&inv.DryRun, "simulate", false, "print the plan, change nothing")
	fs.StringVar(&inv.Netns, "netns", "", "the pod's network namespace (default: this one)")
	fs.BoolVarP(&ignoredBool, "use-wait-flag", "w", false, "no meaning: no iptables lock is taken")
	fs.IntVar(&ignoredInt, "timeout-close-wait-secs", 0, "no meaning: capture uses no conntrack entry")
	fs.StringVar(&logFormat, "log-format", logFormat, "plain or json")
	fs.StringVar(&inv.LogLevel, "log-level", "info", "debug, info, warn or error")
	fs.StringVar(&ignoredString, "iptables-mode", "legacy", "no meaning: no firewall rules are written")
	fs.BoolVar(&ipv6, "ipv6", ipv6, "capture IPv6 too; false: IPv6 destinations go direct")
	fs.StringVar(&ignoredString, "firewall-bin-path", "", "no meaning: no firewall rules are written")
	fs.StringVar(&ignoredString, "firewall-save-bin-path", "", "no meaning: no firewall rules are written")
	if err := parseWith(tool, fs, args); err != nil {
		return inv, err
	}
	for _, c := range []struct {
		name string
		v    int
		dst  *uint16
	}{{"--incoming-proxy-port", inPort, &p.InboundPort}, {"--outgoing-proxy-port", outPort, &p.OutboundPort}} {
		if c.v < 1 || c.v > 65535 {
			return inv, fmt.Errorf("%s must be a valid TCP port number (1-65535)", c.name)
		}
		*c.dst = uint16(c.v)
	}
	if uid < 0 {
		return inv, fmt.Errorf("--proxy-uid is required: the uid the proxy runs as (Linkerd's is 2102)")
	}
	if gid < 0 {
		// proxy-init matches the proxy by uid alone; Sluice also lets the
		// proxy's gid bind the capture ports, so it takes the uid's number.
		gid = uid
	}
	p.ProxyUID, p.ProxyGID = uint32(uid), uint32(gid)
	if len(subnets) > 0 {
		return inv, unsupported("--subnets-to-ignore", "inbound capture cannot skip source subnets yet; leave it out")
	}
	if !ipv6 {
		p.ExcludeCIDRs.List = append(p.ExcludeCIDRs.List, netip.MustParsePrefix("::/0"))
	}
	switch logFormat {
	case "plain":
	case "json":
		inv.LogJSON = true
	default:
		return inv, fmt.Errorf("--log-format %q: want plain or json", logFormat)
	}
	inv.Policy = p
	inv.Ignored = noted(fs, "use-wait-flag", "timeout-close-wait-secs", "iptables-mode", "firewall-bin-path", "firewall-save-bin-path")
	return inv, nil
}
