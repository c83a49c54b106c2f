package redirect

import (
	"flag"
	"io"
	"net/netip"
	"reflect"
	"strings"
	"testing"
)

func parse(t *testing.T, args ...string) (Plan, error) {
	t.Helper()
	p := DefaultPolicy()
	fs := flag.NewFlagSet("test", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	p.RegisterFlags(fs)
	if err := fs.Parse(args); err != nil {
		return Plan{}, err
	}
	return p.Plan()
}

func TestPolicyFlags(t *testing.T) {
	defaults := Plan{
		OutboundPort: 15001, InboundPort: 15006, ProxyUID: 1337, ProxyGID: 1337,
		IncludeAllCIDRs: true, InboundAllPorts: true, ExcludeInboundPorts: []uint16{15001, 15006, 15020, 15021, 15090},
		SidecarPorts: []uint16{15001, 15006, 15020, 15021, 15090},
	}
	with := func(f func(*Plan)) Plan {
		c := defaults
		f(&c)
		return c
	}
	pfx := netip.MustParsePrefix
	tests := []struct {
		name string
		args []string
		want Plan
	}{
		{"defaults", nil, defaults},
		{"istio short flags", []string{"-p", "15101", "-z", "15106", "-u", "2000", "-g", "2001"}, with(func(c *Plan) {
			c.OutboundPort, c.InboundPort, c.ProxyUID, c.ProxyGID = 15101, 15106, 2000, 2001
			c.ExcludeInboundPorts = []uint16{15020, 15021, 15090, 15101, 15106}
			c.SidecarPorts = c.ExcludeInboundPorts
		})},
		{"istio long flags", []string{"--proxy-port=15101", "--proxy-uid=7", "--istio-service-exclude-cidr=198.18.0.0/24"}, with(func(c *Plan) {
			c.OutboundPort, c.ProxyUID = 15101, 7
			c.ExcludeInboundPorts = []uint16{15006, 15020, 15021, 15090, 15101}
			c.SidecarPorts = c.ExcludeInboundPorts
			c.ExcludeCIDRs = []netip.Prefix{pfx("198.18.0.0/24")}
		})},
		{"linkerd flags", []string{"--outgoing-proxy-port", "4140", "--incoming-proxy-port", "4143", "--outbound-ports-to-ignore", "443,4190-4191", "--inbound-ports-to-ignore", "4191"}, with(func(c *Plan) {
			c.OutboundPort, c.InboundPort = 4140, 4143
			c.ExcludeOutboundPorts = []uint16{443, 4190, 4191}
			c.ExcludeInboundPorts = []uint16{4140, 4143, 4190, 4191, 15020, 15021, 15090}
			c.SidecarPorts = []uint16{4140, 4143, 4190, 4191, 15020, 15021, 15090}
		})},
		{"include list, ipv6, bare address, unmasked prefix", []string{"-i", "198.18.0.7/15, 2001:2::/48,198.19.1.1"}, with(func(c *Plan) {
			c.IncludeAllCIDRs = false
			c.IncludeCIDRs = []netip.Prefix{pfx("198.18.0.0/15"), pfx("198.19.1.1/32"), pfx("2001:2::/48")}
		})},
		{"include nothing", []string{"-i", ""}, with(func(c *Plan) { c.IncludeAllCIDRs = false })},
		{"ports", []string{"-q", "9090", "-o", "22,3306,22", "-b", "8080,9000-9001", "-d", "15020,7000"}, with(func(c *Plan) {
			c.IncludeOutboundPorts = []uint16{9090}
			c.ExcludeOutboundPorts = []uint16{22, 3306}
			c.InboundAllPorts = false
			c.InboundPorts = []uint16{8080, 9000, 9001}
			c.ExcludeInboundPorts = []uint16{7000, 15001, 15006, 15020, 15021, 15090}
		})},
		{"metrics port", []string{"--metrics-port", "9099"}, with(func(c *Plan) {
			c.ExcludeInboundPorts = []uint16{9099, 15001, 15006, 15020, 15021, 15090}
			c.SidecarPorts = c.ExcludeInboundPorts
		})},
		{"mode is case-insensitive", []string{"-m", "redirect"}, defaults},
		{"root proxy when asked for", []string{"-u", "0", "-g", "0", "--allow-root-proxy"}, with(func(c *Plan) { c.ProxyUID, c.ProxyGID = 0, 0 })},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := parse(t, tt.args...)
			if err != nil {
				t.Fatalf("unexpected error: %v", err)
			}
			if !reflect.DeepEqual(got, tt.want) {
				t.Errorf("capture mismatch\n got %+v\nwant %+v", got, tt.want)
			}
		})
	}
}

func TestPolicyFlagErrors(t *testing.T) {
	tests := []struct {
		args []string
		want string // part of the one-line error
	}{
		{[]string{"-x", "198.18.0.0/33"}, `"198.18.0.0/33" is not a CIDR`},
		{[]string{"-i", "not-an-ip"}, `"not-an-ip" is not a CIDR`},
		{[]string{"-p", "0"}, "port 0 is out of range: want 1-65535"},
		{[]string{"-p", "70000"}, "port 70000 is out of range"},
		{[]string{"-z", "http"}, `"http" is not a port number`},
		{[]string{"-o", "22,x"}, `"x" is not a port number`},
		{[]string{"-o", "200-100"}, "runs backwards"},
		{[]string{"-u", "istio-proxy"}, `"istio-proxy" is not a numeric uid`},
		{[]string{"-g", "-1"}, "is not a numeric gid"},
		{[]string{"-m", "TPROXY"}, `interception mode "TPROXY" is not supported`},
		{[]string{"-p", "15006"}, "both 15006"},
		{[]string{"--metrics-port", "15006"}, "--metrics-port 15006 is also a proxy listener's port"},
		{[]string{"-u", "0"}, "would exempt every root process in the pod from capture"},
		{[]string{"-g", "0"}, "pass --allow-root-proxy if that is meant"},
	}
	for _, tt := range tests {
		t.Run(strings.Join(tt.args, " "), func(t *testing.T) {
			_, err := parse(t, tt.args...)
			if err == nil {
				t.Fatal("expected an error")
			}
			if !strings.Contains(err.Error(), tt.want) || strings.Contains(err.Error(), "\n") {
				t.Errorf("error %q: want one line containing %q", err, tt.want)
			}
		})
	}
}

// flag.PrintDefaults calls String on a zero value of every flag's type; a
// Value that cannot take that printed "panic calling String method" into
// `sluice install --help`.
func TestFlagHelpPrintsNoPanic(t *testing.T) {
	p := DefaultPolicy()
	fs := flag.NewFlagSet("test", flag.ContinueOnError)
	p.RegisterFlags(fs)
	var out strings.Builder
	fs.SetOutput(&out)
	fs.PrintDefaults()
	if strings.Contains(out.String(), "panic") {
		t.Errorf("help output has a panic:\n%s", out.String())
	}
	if !strings.Contains(out.String(), "-outgoing-proxy-port") {
		t.Errorf("help output lacks the Linkerd flags:\n%s", out.String())
	}
}

// A list holds MaxCIDRs, IPv4 and IPv6 together; one more is refused in one
// line naming the list, the count, the limit and the fix.
func TestCIDRLimit(t *testing.T) {
	many := func(n int) []netip.Prefix {
		out := make([]netip.Prefix, n)
		for i := range out {
			a := netip.MustParseAddr("2001:2:0:ff00::").As16()
			a[14], a[15] = byte(i>>8), byte(i)
			out[i] = netip.PrefixFrom(netip.AddrFrom16(a), 128)
		}
		return out
	}
	p := DefaultPolicy()
	p.ExcludeCIDRs.List = many(MaxCIDRs)
	if _, err := p.Plan(); err != nil {
		t.Errorf("%d exclude CIDRs: %v", MaxCIDRs, err)
	}
	p.KernelOnlyCIDRs.List = many(MaxCIDRs + 1)
	_, err := p.Plan()
	if err == nil || !strings.Contains(err.Error(), "--kernel-only-cidrs lists 8193 CIDRs, at most 8192") || strings.Contains(err.Error(), "\n") {
		t.Errorf("%d kernel-only CIDRs: %v", MaxCIDRs+1, err)
	}
}
