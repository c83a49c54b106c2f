package redirect

import (
	"fmt"
	"strings"

	"github.com/spf13/pflag"
)

// ParseIstio reads an istio-iptables command line and environment with that
// tool's meanings and defaults: every flag's long and short name, and the
// environment variable istio-iptables binds to it (the long name upper-cased,
// dashes to underscores, plus ISTIO_META_DNS_CAPTURE, INVALID_DROP and
// ISTIO_DUAL_STACK), a variable applying unless the flag is given. As in
// istio-iptables, nothing is captured that -i (outbound) and -b (inbound) do
// not name, and -g defaults to -u. getenv is os.LookupEnv outside tests.
func ParseIstio(args []string, getenv func(string) (string, bool)) (Invocation, error) {
	const tool = "istio-iptables"
	inv := Invocation{ProbePort: DefaultProbePort, ProbeTimeout: DefaultProbeTimeout, LogLevel: "info"}
	p := DefaultPolicy()
	p.IncludeCIDRs, p.InboundPorts = CIDRs{}, Ports{}
	var (
		tunnelPort     uint16 = 15008
		excludeIfaces  string
		virtIfaces     string
		tproxyMark     string
		tproxyTable    string
		logOutputLevel = "default:info"
		ignoredBool    bool
		ignoredString  string
		ignoredStrings []string
		ignoredInt     int
	)
	fs := pflag.NewFlagSet(tool, pflag.ContinueOnError)
	v := fs.VarP
	v(pvalue{portValue{&p.OutboundPort}, "port"}, "envoy-port", "p", "port to which all outbound TCP traffic is redirected")
	v(pvalue{portValue{&p.InboundPort}, "port"}, "inbound-capture-port", "z", "port to which all inbound TCP traffic is redirected")
	v(pvalue{portValue{&tunnelPort}, "port"}, "inbound-tunnel-port", "e", "Istio's tunnel port, never captured inbound")
	v(pvalue{idValue{&p.ProxyUID, "uid"}, "uid"}, "proxy-uid", "u", "uid of the proxy, never captured")
	v(pvalue{idValue{&p.ProxyGID, "gid"}, "gid"}, "proxy-gid", "g", "gid of the proxy, never captured (default: -u)")
	v(pvalue{modeValue{&p.Mode}, "string"}, "istio-inbound-interception-mode", "m", "REDIRECT (TPROXY is not supported)")
	v(pvalue{&p.InboundPorts, "ports"}, "istio-inbound-ports", "b", "inbound ports to capture; '*' = all, '' (default) = none")
	v(pvalue{&p.ExcludeInboundPorts, "ports"}, "istio-local-exclude-ports", "d", "inbound ports never captured")
	fs.StringVarP(&excludeIfaces, "istio-exclude-interfaces", "c", "", "interfaces never captured (not supported)")
	v(pvalue{&p.IncludeCIDRs, "cidrs"}, "istio-service-cidr", "i", "outbound destinations to capture; '*' = all, '' (default) = none")
	v(pvalue{&p.ExcludeCIDRs, "cidrs"}, "istio-service-exclude-cidr", "x", "outbound destinations never captured")
	v(pvalue{&p.IncludeOutboundPorts, "ports"}, "istio-outbound-ports", "q", "outbound ports captured whatever the destination")
	v(pvalue{&p.ExcludeOutboundPorts, "ports"}, "istio-local-outbound-ports-exclude", "o", "outbound ports never captured")
	fs.StringVarP(&virtIfaces, "kube-virt-interfaces", "k", "", "virtual interfaces whose inbound traffic is outbound (not supported)")
	fs.StringVarP(&tproxyMark, "istio-inbound-tproxy-mark", "t", "1337", "TPROXY mark (TPROXY mode only)")
	fs.StringVarP(&tproxyTable, "istio-inbound-tproxy-route-table", "r", "133", "TPROXY route table (TPROXY mode only)")
	fs.BoolVarP(&inv.DryRun, "dry-run", "n", false, "print the plan, change nothing")
	v(pvalue{portValue{&inv.ProbePort}, "port"}, "iptables-probe-port", "", "validation probe port")
	fs.DurationVar(&inv.ProbeTimeout, "probe-timeout", inv.ProbeTimeout, "validation timeout")
	fs.BoolVar(&inv.SkipApply, "skip-rule-apply", false, "install nothing (capture was installed by a CNI); with --run-validation, validate only")
	fs.BoolVar(&inv.Validate, "run-validation", false, "prove capture end to end")
	fs.BoolVar(&p.RedirectDNS, "redirect-dns", false, "send the pod's DNS (UDP and TCP port 53 to the nameservers of /etc/resolv.conf) to 127.0.0.1:15053")
	fs.BoolVar(&ignoredBool, "drop-invalid", false, "no meaning: there is no conntrack state to drop")
	fs.BoolVar(&ignoredBool, "dual-stack", false, "no meaning: IPv4 and IPv6 are always captured alike")
	fs.BoolVar(&p.CaptureAllDNS, "capture-all-dns", false, "with --redirect-dns: port 53 of any address, not only the nameservers")
	fs.StringVar(&inv.Netns, "network-namespace", "", "the pod's network namespace (default: this one)")
	fs.BoolVar(&ignoredBool, "cni-mode", false, "no meaning: Sluice works from the pod's cgroup")
	fs.BoolVar(&ignoredBool, "reconcile", false, "no meaning: install always reconciles what is there")
	fs.BoolVar(&inv.Cleanup, "cleanup-only", false, "remove the pod's capture")
	fs.BoolVar(&ignoredBool, "force-apply", false, "no meaning: install always reconciles what is there")
	fs.BoolVar(&ignoredBool, "native-nftables", false, "no meaning: no firewall rules are written")
	fs.StringVar(&ignoredString, "force-iptables-binary", "", "no meaning: no firewall rules are written")
	// istio.io/pkg/log's options, which every Istio binary takes.
	fs.StringVar(&logOutputLevel, "log_output_level", logOutputLevel, "SCOPE:LEVEL,...; the default scope's level is used")
	fs.BoolVar(&inv.LogJSON, "log_as_json", false, "log as JSON")
	fs.StringVar(&ignoredString, "log_caller", "", "accepted, no effect")
	fs.StringVar(&ignoredString, "log_stacktrace_level", "default:none", "accepted, no effect")
	fs.StringArrayVar(&ignoredStrings, "log_target", []string{"stdout"}, "accepted, no effect (logs go to stderr)")
	fs.StringVar(&ignoredString, "log_rotate", "", "accepted, no effect")
	fs.IntVar(&ignoredInt, "log_rotate_max_age", 30, "accepted, no effect")
	fs.IntVar(&ignoredInt, "log_rotate_max_size", 104857600, "accepted, no effect")
	fs.IntVar(&ignoredInt, "log_rotate_max_backups", 1000, "accepted, no effect")

	if err := istioEnv(fs, getenv); err != nil {
		return inv, err
	}
	if err := parseWith(tool, fs, args); err != nil {
		return inv, err
	}
	if !fs.Changed("proxy-gid") {
		p.ProxyGID = p.ProxyUID
	}
	switch {
	case p.Mode == "TPROXY":
		return inv, unsupported("-m TPROXY", "inbound capture keeps the original destination without TPROXY; use -m REDIRECT")
	case p.Mode != "REDIRECT" && p.Mode != "":
		return inv, fmt.Errorf("-m %q: want REDIRECT", p.Mode)
	case virtIfaces != "":
		return inv, unsupported("-k (kube-virt-interfaces)", "capture follows the pod's cgroup, not its interfaces; leave it empty")
	case excludeIfaces != "":
		return inv, unsupported("-c (istio-exclude-interfaces)", "outbound capture follows the pod's cgroup, not its interfaces; leave it empty")
	}
	p.Mode = "REDIRECT"
	// As in istio-iptables, --capture-all-dns says nothing without
	// --redirect-dns.
	p.CaptureAllDNS = p.CaptureAllDNS && p.RedirectDNS
	// Istio never redirects its tunnel port inbound.
	p.ExcludeInboundPorts.List = append(p.ExcludeInboundPorts.List, tunnelPort)
	lvl, err := istioLevel(logOutputLevel)
	if err != nil {
		return inv, fmt.Errorf("--log_output_level %q: %v", logOutputLevel, err)
	}
	inv.LogLevel = lvl
	inv.Policy = p
	inv.Ignored = noted(fs, "istio-inbound-tproxy-mark", "istio-inbound-tproxy-route-table", "drop-invalid", "dual-stack",
		"cni-mode", "reconcile", "force-apply", "native-nftables", "force-iptables-binary",
		"log_caller", "log_stacktrace_level", "log_target", "log_rotate", "log_rotate_max_age", "log_rotate_max_size", "log_rotate_max_backups")
	return inv, nil
}

// istioEnv applies the environment variables istio-iptables binds to its
// flags, before the command line, which overrides them.
func istioEnv(fs *pflag.FlagSet, getenv func(string) (string, bool)) error {
	extra := map[string][]string{
		"redirect-dns": {"ISTIO_META_DNS_CAPTURE"},
		"drop-invalid": {"INVALID_DROP"},
		"dual-stack":   {"ISTIO_DUAL_STACK"},
	}
	var err error
	fs.VisitAll(func(f *pflag.Flag) {
		if err != nil || f.Name == "envoy-port" || strings.HasPrefix(f.Name, "log_") {
			return // istio-iptables binds no variable to these
		}
		for _, name := range append([]string{strings.ToUpper(strings.ReplaceAll(f.Name, "-", "_"))}, extra[f.Name]...) {
			if val, ok := getenv(name); ok {
				if serr := fs.Set(f.Name, val); serr != nil {
					err = fmt.Errorf("environment %s=%q: %v", name, val, serr)
					return
				}
			}
		}
	})
	return err
}

// istioLevel takes the default scope's level from an Istio
// --log_output_level value ("default:debug,ads:warn" or "debug").
func istioLevel(s string) (string, error) {
	level := ""
	for _, item := range strings.Split(s, ",") {
		scope, lvl, ok := strings.Cut(strings.TrimSpace(item), ":")
		if !ok {
			scope, lvl = "default", scope
		}
		if scope == "default" {
			level = lvl
		}
	}
	switch level {
	case "", "info":
		return "info", nil
	case "debug", "warn", "error":
		return level, nil
	case "fatal", "none":
		return "error", nil
	}
	return "", fmt.Errorf("level %q: want debug, info, warn, error, fatal or none", level)
}
