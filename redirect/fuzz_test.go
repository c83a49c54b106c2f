package redirect

import (
	"flag"
	"fmt"
	"io"
	"net/netip"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"testing"
	"unicode"
)

// The fuzz targets check what a user may rely on, not only that nothing
// panics: an accepted value prints as flag text that parses back to itself,
// a refused one gets one line that names the problem without Go internals,
// and an accepted policy or route file validates into a plan or routes that
// are already in normal form. `make fuzz` runs each for a few seconds; the
// seeds and testdata/fuzz/ run with every `go test`.

// portSeeds and cidrSeeds are what pod specs and proxy-init flags pass, and
// inputs near the edges of what the parsers take.
var (
	portSeeds = []string{
		"15090,15021,15020", "4190,4191,4567,4568", "1-1024", "*", "", " ", ",", "*,80", "80,*",
		"22,3306,22", "443,4190-4191", "9000-9001", "65535", "1-65535", "0", "65536", "70000", "-1", "1-",
		"-5", "200-100", "1--2", "+80", "080", "0x50", "8 0", " 80 , 443 ", "1 - 5", "99999999999999999999",
		"١٢٣", "80\x00", "80,\n443", "%d", "%!s(MISSING)",
	}
	cidrSeeds = []string{
		"*", "", "10.0.0.0/8", "198.18.0.7/15, 2001:2::/48,198.19.1.1", "2001:db8::/32", "::/0", "0.0.0.0/0",
		"10.0.0.0/33", "2001:db8::/129", "not-an-ip", "1.2.3.4", "::1", "::ffff:1.2.3.4", "::ffff:1.2.3.0/120",
		"fe80::1%eth0", "fe80::1%eth0/64", "1.2.3.4/", "/8", "1.2.3.4/-1", "1.2.3.4/08", "01.2.3.4", "1.2.3",
		"*,10.0.0.0/8", "10.0.0.0/8,*", " , ,", "1.2.3.4/32/1", "[::1]", "%v",
	}
	// policySeeds are whole flag sets, one argument a line.
	policySeeds = []string{
		"", "-d\n15090,15021,15020", "-x\n", "-i\n*", "-i\n", "-p\n15001\n-z\n15006\n-u\n1337\n-g\n1337\n-m\nREDIRECT\n-i\n*\n-x\n\n-b\n*\n-d\n15090,15021,15020",
		"--outgoing-proxy-port\n4140\n--incoming-proxy-port\n4143\n--subnets-to-ignore\n198.19.0.0/16\n--outbound-ports-to-ignore\n443,4190-4191\n--inbound-ports-to-ignore\n4191,4190,4567,4568",
		"-q\n9090\n-o\n22,3306,22\n-b\n8080,9000-9001\n-d\n15020,7000", "-m\nredirect", "-m\nTPROXY", "-u\n0\n-g\n0\n--allow-root-proxy",
		"-u\n0", "-u\nroot", "-p\n15006", "-p\n0", "-p\n70000", "-x\n10.0.0.0/33", "-i\n2001:db8::7/32,10.1.2.3", "--splice\n--no-splice",
		"--flows=false\n--splice", "--bogus", "-p", "-x\n*", "-o\n*", "-d\n*", "-q\n*", "-b\n1-65535", "--\n-p\n1",
	}
	routeFileSeeds = []string{
		"routes:\n  - service: 198.19.0.10:80\n    backendRefs:\n      - {address: 198.18.2.2, port: 8080, weight: 90}\n      - {address: 198.18.3.2, port: 8080, weight: 10}\n  - service: \"[2001:db8::10]:443\"\n    mode: round-robin\n    backendRefs:\n      - address: 2001:2:0:2::2\n        port: 8443\n        weight: 1\n",
		`{"routes": [{"service": "198.19.0.10:80", "backendRefs": [{"address": "198.18.2.2", "port": 8080, "weight": 90}, {"address": "198.18.3.2", "port": 8080, "weight": 10}]}, {"service": "[2001:db8::10]:443", "mode": "round-robin", "backendRefs": [{"address": "2001:2:0:2::2", "port": 8443, "weight": 1}]}]}`,
		"routes:\n  - service: 198.19.0.10:80\n    backendRefs:\n      - {address: 198.18.2.2, port: 8080, weight: 1}\n      - {address: 198.18.2.2, port: 8080, weight: 2}\n",
		"routes:\n  - service: 198.19.0.10:80\n    backendRefs:\n      - {address: 198.18.2.2, port: 8080, weight: 0}\n",
		"routes: []", "routes:\n  - service: 1.2.3.4:80\n    backendsRefs: []", "nope: 1", "", "---", "\t{\"routes\": []}",
		"routes:\n  - service: 1.2.3.4:80\n    backendRefs: [{address: 1.2.3.5, port: 1, weight: 1}]\n  - service: 1.2.3.4:80\n    backendRefs: [{address: 1.2.3.5, port: 1, weight: 1}]",
		"routes:\n  - service: nope\n", "routes: [{service: 1.2.3.4:80, backendRefs: [{address: x, port: 1, weight: 1}]}]",
		"routes: [{service: 1.2.3.4:80, backendRefs: [{address: 1.2.3.5, port: 70000, weight: 1}]}]",
		"routes: [{service: 1.2.3.4:80, backendRefs: [{address: 1.2.3.5, port: 1, weight: -1}]}]",
		"routes: [{service: 1.2.3.4:80, backendRefs: [{address: 1.2.3.5, port: 1, weight: 1}, {address: '::ffff:1.2.3.5', port: 1, weight: 1}]}]",
		"routes: [{service: '[::ffff:1.2.3.4]:80', backendRefs: [{address: 1.2.3.5, port: 1, weight: 1}]}, {service: 1.2.3.4:80, backendRefs: [{address: 1.2.3.5, port: 1, weight: 1}]}]",
		"routes: [{service: '[fe80::1%eth0]:80', backendRefs: [{address: 'fe80::2%eth0', port: 1, weight: 1}]}]",
		"routes: [{service: 1.2.3.4:80, mode: sticky, backendRefs: [{address: 1.2.3.5, port: 1, weight: 1}]}]",
		"routes: [{service: 1.2.3.4:80, backendRefs: [{address: 1.2.3.5, port: 1, weight: 1}]}]\n---\nroutes: [{service: 1.2.3.4:81, backendRefs: [{address: 1.2.3.5, port: 1, weight: 1}]}]",
		"routes: &a [*a]", "routes: [{service: 1.2.3.4:80, backendRefs: [{address: 1.2.3.5, port: 0, weight: 1}]}]",
	}
)

// checkError fails unless err is one non-empty line in the user's terms.
// Text such as "%!" may be in the error only as often as the input, which
// the error may quote, holds it.
func checkError(t *testing.T, input any, err error) {
	t.Helper()
	msg := err.Error()
	if msg == "" || strings.ContainsAny(msg, "\n\r") {
		t.Fatalf("%q: error %q: want one non-empty line", input, msg)
	}
	// Some values are echoed upper-cased (-m tproxy is named "TPROXY"):
	// what the input spells in any case is the user's, not Go's.
	quoted := strings.ToUpper(fmt.Sprintf("%v %q", input, input))
	for _, internal := range []string{"strconv.", "netip.", "ParseAddr(", "%!", "EOF", "panic", "invalid syntax", "goroutine"} {
		if strings.Count(msg, internal) > strings.Count(quoted, strings.ToUpper(internal)) {
			t.Fatalf("%q: error %q shows Go's internals (%q): say what is wrong in the user's terms", input, msg, internal)
		}
	}
}

func FuzzPorts(f *testing.F) {
	for _, s := range portSeeds {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		var p Ports
		if err := p.Set(s); err != nil {
			checkError(t, s, err)
			return
		}
		if p.All && len(p.List) > 0 {
			t.Fatalf("%q: '*' and a list %v: the list says nothing beside '*'", s, p.List)
		}
		if !slices.IsSorted(p.List) || len(slices.Compact(slices.Clone(p.List))) != len(p.List) {
			t.Fatalf("%q: list %v is not sorted and deduplicated", s, p.List)
		}
		if slices.Contains(p.List, 0) {
			t.Fatalf("%q: accepted port 0", s)
		}
		var again Ports
		if err := again.Set(p.String()); err != nil || !reflect.DeepEqual(again, p) {
			t.Fatalf("%q: parsed to %+v, whose String %q parses to %+v (%v)", s, p, p.String(), again, err)
		}
	})
}

func FuzzCIDRs(f *testing.F) {
	for _, s := range cidrSeeds {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		var c CIDRs
		if err := c.Set(s); err != nil {
			checkError(t, s, err)
			return
		}
		if strings.Contains(s, "%") {
			t.Fatalf("%q: accepted an IPv6 zone, which a prefix cannot hold (parsed to %s)", s, c.String())
		}
		if c.All && len(c.List) > 0 {
			t.Fatalf("%q: '*' and a list %v: the list says nothing beside '*'", s, c.List)
		}
		for _, p := range c.List {
			if !p.IsValid() || p != p.Masked() || p.Addr().Zone() != "" {
				t.Fatalf("%q: accepted %s, which is not a masked prefix without a zone", s, p)
			}
			if p.Addr().Is4In6() && p.Bits() == 128 {
				t.Fatalf("%q: bare IPv4-mapped address kept as %s", s, p)
			}
		}
		var again CIDRs
		if err := again.Set(c.String()); err != nil || !reflect.DeepEqual(again, c) {
			t.Fatalf("%q: parsed to %+v, whose String %q parses to %+v (%v)", s, c, c.String(), again, err)
		}
	})
}

// FuzzPortAndIDFlag feeds one value to -p (PortFlag) and -u (IDFlag).
func FuzzPortAndIDFlag(f *testing.F) {
	for _, s := range []string{"15001", "1", "65535", "0", "65536", "-1", "1337", " 1337 ", "root", "istio-proxy", "",
		"4294967294", "4294967295", "4294967296", "+5", "0x539", "1e3", "1_000", "\t80\n"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		var port uint16
		if err := PortFlag(&port).Set(s); err != nil {
			checkError(t, s, err)
		} else {
			if port == 0 {
				t.Fatalf("%q: accepted port 0", s)
			}
			var again uint16
			v := PortFlag(&port)
			if err := PortFlag(&again).Set(v.String()); err != nil || again != port {
				t.Fatalf("%q: port %d prints as %q, which parses to %d (%v)", s, port, v.String(), again, err)
			}
		}
		var id uint32
		if err := IDFlag(&id, "uid").Set(s); err != nil {
			checkError(t, s, err)
			if !strings.Contains(err.Error(), "uid") {
				t.Fatalf("%q: error %q does not name the uid", s, err)
			}
			return
		}
		if id == 1<<32-1 {
			t.Fatalf("%q: accepted uid -1 (4294967295), which means no uid", s)
		}
		var again uint32
		v := IDFlag(&id, "uid")
		if err := IDFlag(&again, "uid").Set(v.String()); err != nil || again != id {
			t.Fatalf("%q: uid %d prints as %q, which parses to %d (%v)", s, id, v.String(), again, err)
		}
	})
}

// FuzzParseBackends takes `sluice route set` arguments, one a line.
func FuzzParseBackends(f *testing.F) {
	for _, s := range []string{"198.18.2.2:8080=90\n198.18.3.2:8080=10", "[2001:db8::1]:8080=1", "198.18.2.2:80", "198.18.2.2=5",
		"198.18.2.2:80=-1", "198.18.2.2:80=x", "a:b=c", "198.18.2:8080=1", "[::ffff:1.2.3.4]:80=1\n1.2.3.4:80=1",
		"[fe80::1%eth0]:80=1", "1.2.3.4:0=1", "1.2.3.4:80=4294967296", "1.2.3.4:80=1000001", "1.2.3.4:80==1", "=", ""} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		args := strings.Split(s, "\n")
		backends, err := ParseBackends(args)
		if err != nil {
			checkError(t, args, err)
			return
		}
		if len(backends) != len(args) {
			t.Fatalf("%q: %d arguments, %d backends", args, len(args), len(backends))
		}
		printed := make([]string, len(backends))
		for i, b := range backends {
			printed[i] = fmt.Sprintf("%s=%d", b.AddrPort(), b.Weight)
		}
		again, err := ParseBackends(printed)
		if err != nil || !reflect.DeepEqual(again, backends) {
			t.Fatalf("%q: parsed to %v, which prints as %q and parses to %v (%v)", args, backends, printed, again, err)
		}
		r := Route{Service: netip.MustParseAddrPort("198.19.0.10:80"), Backends: backends}
		if backends[0].Address.Unmap().Is6() {
			r.Service = netip.MustParseAddrPort("[2001:db8::10]:80")
		}
		checkRoute(t, args, r, r.Validate(true))
	})
}

// checkRoute checks Validate's verdict on r against what the BPF side can
// hold: one family, no zones, distinct backends once unmapped, bounded
// weights.
func checkRoute(t *testing.T, input any, r Route, err error) {
	t.Helper()
	if err != nil {
		checkError(t, input, err)
		return
	}
	n := r.Normalize()
	if !reflect.DeepEqual(n.Normalize(), n) {
		t.Fatalf("%q: Normalize is not idempotent: %+v, then %+v", input, n, n.Normalize())
	}
	if n.Service.Addr().Zone() != "" || n.Service.Port() == 0 || n.Service.Addr().Is4In6() {
		t.Fatalf("%q: accepted service %s", input, n.Service)
	}
	if len(n.Backends) == 0 || len(n.Backends) > MaxBackends {
		t.Fatalf("%q: accepted %d backends", input, len(n.Backends))
	}
	seen := map[netip.AddrPort]bool{}
	for _, b := range n.Backends {
		ap := b.AddrPort()
		switch {
		case b.Address.Zone() != "" || b.Port == 0 || b.Address.Is4In6():
			t.Fatalf("%q: accepted backend %s, which the BPF side cannot hold as given", input, ap)
		case b.Address.Is4() != n.Service.Addr().Is4():
			t.Fatalf("%q: accepted backend %s for service %s of another family", input, ap, n.Service)
		case b.Weight > MaxWeight:
			t.Fatalf("%q: accepted weight %d", input, b.Weight)
		case seen[ap]:
			t.Fatalf("%q: accepted backend %s twice", input, ap)
		}
		seen[ap] = true
	}
	if err := n.Validate(true); err != nil {
		t.Fatalf("%q: accepted, but its normal form %+v is refused: %v", input, n, err)
	}
}

func FuzzParseRouteFile(f *testing.F) {
	for _, s := range routeFileSeeds {
		f.Add([]byte(s), false)
	}
	f.Add([]byte(routeFileSeeds[3]), true)
	f.Fuzz(func(t *testing.T, data []byte, allowZero bool) {
		routes, err := ParseRouteFile(data, allowZero)
		if err != nil {
			checkError(t, string(data), err)
			return
		}
		if len(routes) == 0 {
			t.Fatalf("%q: accepted a file with no routes", data)
		}
		services := map[netip.AddrPort]bool{}
		for _, r := range routes {
			if !reflect.DeepEqual(r.Normalize(), r) {
				t.Fatalf("%q: route %+v is not in normal form", data, r)
			}
			if services[r.Service] {
				t.Fatalf("%q: service %s accepted twice", data, r.Service)
			}
			services[r.Service] = true
			if r.Total() == 0 && !allowZero {
				t.Fatalf("%q: accepted route %s with every weight 0", data, r.Service)
			}
			checkRoute(t, string(data), r, r.Validate(allowZero))
		}
	})
}

// FuzzPolicyPlan parses a fuzzed flag set (one argument a line) and checks
// the plan an accepted one gives.
func FuzzPolicyPlan(f *testing.F) {
	for _, s := range policySeeds {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		var args []string
		if s != "" {
			args = strings.Split(s, "\n")
		}
		p, plan, err := planOf(args)
		if err != nil {
			// The flag package prints a flag's name as given, control
			// characters and all: its text is not ours to check (the CLI
			// escapes it).
			unprintable := slices.ContainsFunc(args, func(a string) bool { return strings.ContainsFunc(a, unicode.IsControl) })
			if err != flag.ErrHelp && !unprintable {
				checkError(t, args, err)
			}
			return
		}
		if !reflect.DeepEqual(plan.Normalize(), plan) || !reflect.DeepEqual(plan.Normalize().Normalize(), plan.Normalize()) {
			t.Fatalf("%q: plan %+v is not in normal form", args, plan)
		}
		for flag, all := range map[string]bool{"-x": p.ExcludeCIDRs.All, "-q": p.IncludeOutboundPorts.All,
			"-o": p.ExcludeOutboundPorts.All, "-d": p.ExcludeInboundPorts.All} {
			if all {
				t.Fatalf("%q: accepted %s '*', which the plan has no way to say", args, flag)
			}
		}
		if plan.OutboundPort == 0 || plan.InboundPort == 0 || plan.OutboundPort == plan.InboundPort {
			t.Fatalf("%q: accepted proxy ports %d and %d", args, plan.OutboundPort, plan.InboundPort)
		}
		if (plan.ProxyUID == 0 || plan.ProxyGID == 0) && !p.AllowRootProxy {
			t.Fatalf("%q: accepted root as the proxy without --allow-root-proxy", args)
		}
		if len(plan.SidecarPorts) > MaxSidecarPorts {
			t.Fatalf("%q: %d sidecar ports, the BPF side holds %d", args, len(plan.SidecarPorts), MaxSidecarPorts)
		}
		for _, port := range plan.SidecarPorts {
			if !slices.Contains(plan.ExcludeInboundPorts, port) {
				t.Fatalf("%q: sidecar port %d is captured inbound", args, port)
			}
		}
		for _, pfx := range slices.Concat(plan.IncludeCIDRs, plan.ExcludeCIDRs) {
			if pfx != pfx.Masked() {
				t.Fatalf("%q: prefix %s is not masked", args, pfx)
			}
		}
		// The policy, written back as flags, gives the same plan.
		printed := policyArgs(p)
		_, again, err := planOf(printed)
		if err != nil || !again.Equal(plan) {
			t.Fatalf("%q: plan %+v; written back as %q it gives %+v (%v)", args, plan, printed, again, err)
		}
	})
}

func planOf(args []string) (Policy, Plan, error) {
	p := DefaultPolicy()
	fs := flag.NewFlagSet("fuzz", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	p.RegisterFlags(fs)
	if err := fs.Parse(args); err != nil {
		return p, Plan{}, err
	}
	plan, err := p.Plan()
	return p, plan, err
}

// policyArgs writes p as the flags that set it.
func policyArgs(p Policy) []string {
	outbound := "-p"
	if p.Linkerd {
		outbound = "--outgoing-proxy-port"
	}
	return []string{
		outbound, strconv.Itoa(int(p.OutboundPort)), "-z", strconv.Itoa(int(p.InboundPort)),
		"-u", strconv.FormatUint(uint64(p.ProxyUID), 10), "-g", strconv.FormatUint(uint64(p.ProxyGID), 10),
		"-m", p.Mode, "-i", p.IncludeCIDRs.String(), "-x", p.ExcludeCIDRs.String(),
		"-q", p.IncludeOutboundPorts.String(), "-o", p.ExcludeOutboundPorts.String(),
		"-b", p.InboundPorts.String(), "-d", p.ExcludeInboundPorts.String(),
		"--allow-root-proxy=" + strconv.FormatBool(p.AllowRootProxy), "--flows=" + strconv.FormatBool(p.Flows),
		"--splice=" + strconv.FormatBool(p.Splice),
	}
}

// FuzzParseAnnotations reads fuzzed annotation files: a refusal is one line,
// and what is accepted reads back the same once written as the kubelet
// writes it.
func FuzzParseAnnotations(f *testing.F) {
	f.Add("sluice.dev/offload-ports=\"8080\"\nnote=\"a \\\"b\\\"\\nc\"\n")
	f.Add("k=v")
	f.Add("\n\nk=\"\"\n")
	f.Fuzz(func(t *testing.T, data string) {
		ann, err := ParseAnnotations(strings.NewReader(data))
		if err != nil {
			checkError(t, data, err)
			return
		}
		var b strings.Builder
		for k, v := range ann {
			fmt.Fprintf(&b, "%s=%s\n", k, strconv.Quote(v))
		}
		again, err := ParseAnnotations(strings.NewReader(b.String()))
		if err != nil || !reflect.DeepEqual(again, ann) {
			t.Fatalf("%q: parsed %q, written back and parsed %q (%v)", data, ann, again, err)
		}
	})
}
