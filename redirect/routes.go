package redirect

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"slices"
	"strconv"
	"strings"

	"go.yaml.in/yaml/v3"
)

// MaxBackends is how many backends one route may have (the BPF side holds
// them inline, so a whole set is replaced in one map update).
const MaxBackends = 16

// MaxRoutes is how many routes one pod holds (the BPF routes map holds two
// slots of them).
const MaxRoutes = 128

// MaxWeight bounds one backend's weight, so any sum of them fits the BPF
// side's 32-bit arithmetic.
const MaxWeight = 1_000_000

// Route modes: how the connect hook picks a backend.
const (
	// ModeRandom picks each connection's backend at random, in proportion
	// to the weights, without modulo bias.
	ModeRandom = "random"
	// ModeRoundRobin is smooth weighted round-robin: a deterministic
	// sequence, so even 10 connections at 90/10 split exactly 9/1.
	ModeRoundRobin = "round-robin"
)

// Route sends connections to a service (a virtual IP and port) to weighted
// backends, chosen at connect time. The field names follow Gateway API's
// backendRefs, so a controller can generate a route file from an HTTPRoute
// or TCPRoute.
type Route struct {
	Service  netip.AddrPort `json:"service" yaml:"service"`
	Mode     string         `json:"mode,omitempty" yaml:"mode,omitempty"`
	Backends []Backend      `json:"backendRefs" yaml:"backendRefs"`
}

// Backend is one weighted destination of a route.
type Backend struct {
	Address netip.Addr `json:"address" yaml:"address"`
	Port    uint16     `json:"port" yaml:"port"`
	Weight  uint32     `json:"weight" yaml:"weight"`
}

// AddrPort is the backend as a dialable address.
func (b Backend) AddrPort() netip.AddrPort { return netip.AddrPortFrom(b.Address, b.Port) }

// Total is the sum of the route's weights.
func (r Route) Total() uint64 {
	var t uint64
	for _, b := range r.Backends {
		t += uint64(b.Weight)
	}
	return t
}

// Validate checks a route; allowZero accepts a route whose every weight is
// 0 (it refuses every new connection), which must be asked for.
func (r Route) Validate(allowZero bool) error {
	if !r.Service.IsValid() || r.Service.Port() == 0 {
		return fmt.Errorf("route service %q: want VIP:PORT, e.g. 198.19.0.10:80 or [2001:db8::10]:80", r.Service)
	}
	if r.Service.Addr().Zone() != "" {
		return fmt.Errorf("route service %q: %s", r.Service, noZone)
	}
	if r.Mode != "" && r.Mode != ModeRandom && r.Mode != ModeRoundRobin {
		return fmt.Errorf("route %s: mode %q: want %s or %s", r.Service, r.Mode, ModeRandom, ModeRoundRobin)
	}
	if len(r.Backends) == 0 {
		return fmt.Errorf("route %s has no backends: give at least one BACKEND=WEIGHT", r.Service)
	}
	if len(r.Backends) > MaxBackends {
		return fmt.Errorf("route %s has %d backends: at most %d", r.Service, len(r.Backends), MaxBackends)
	}
	seen := map[netip.AddrPort]bool{}
	for _, b := range r.Backends {
		// Unmapped, as the BPF side holds it: [::ffff:1.2.3.4]:80 is 1.2.3.4:80.
		ap := netip.AddrPortFrom(b.Address.Unmap(), b.Port)
		switch {
		case b.Address.Zone() != "":
			// Quoted: a zone is any text, a line break too.
			return fmt.Errorf("route %s: backend %q: %s", r.Service, ap, noZone)
		case !b.Address.IsValid() || b.Port == 0:
			return fmt.Errorf("route %s: backend %s: want ADDRESS:PORT", r.Service, ap)
		case b.Address.Unmap().Is4() != r.Service.Addr().Unmap().Is4():
			// SO_ORIGINAL_DST answers in the family the app connected with.
			return fmt.Errorf("route %s: backend %s is of another IP family than the service: give %s backends", r.Service, ap, family(r.Service.Addr()))
		case b.Weight > MaxWeight:
			return fmt.Errorf("route %s: backend %s weight %d: at most %d", r.Service, ap, b.Weight, MaxWeight)
		case seen[ap]:
			return fmt.Errorf("route %s: backend %s is listed twice: give each backend once", r.Service, ap)
		}
		seen[ap] = true
	}
	if r.Total() == 0 && !allowZero {
		return fmt.Errorf("route %s: every weight is 0, which refuses every new connection: pass --allow-zero if that is meant", r.Service)
	}
	return nil
}

// noZone is why an address with a zone is refused: the BPF side holds 16
// bytes of address and would drop the zone.
const noZone = "an IPv6 zone (%eth0) cannot be routed: give the address without it"

func family(a netip.Addr) string {
	if a.Unmap().Is4() {
		return "IPv4"
	}
	return "IPv6"
}

// Normalize unmaps addresses and fills the default mode, so routes compare.
func (r Route) Normalize() Route {
	r.Service = netip.AddrPortFrom(r.Service.Addr().Unmap(), r.Service.Port())
	if r.Mode == "" {
		r.Mode = ModeRandom
	}
	r.Backends = slices.Clone(r.Backends)
	for i := range r.Backends {
		r.Backends[i].Address = r.Backends[i].Address.Unmap()
	}
	return r
}

// ParseBackends parses `sluice route set` arguments: ADDRESS:PORT=WEIGHT each.
func ParseBackends(args []string) ([]Backend, error) {
	var out []Backend
	for _, a := range args {
		addr, w, ok := strings.Cut(a, "=")
		if !ok {
			return nil, fmt.Errorf("backend %q: want ADDRESS:PORT=WEIGHT, e.g. 198.18.2.2:8080=90", a)
		}
		ap, err := netip.ParseAddrPort(addr)
		if err != nil {
			return nil, fmt.Errorf("backend %q: %q is not ADDRESS:PORT (IPv6 in brackets: [2001:db8::1]:8080)", a, addr)
		}
		weight, err := strconv.ParseUint(w, 10, 32)
		if err != nil {
			return nil, fmt.Errorf("backend %q: weight %q: want a whole number from 0 to %d", a, w, MaxWeight)
		}
		out = append(out, Backend{Address: ap.Addr(), Port: ap.Port(), Weight: uint32(weight)})
	}
	return out, nil
}

// ParseService parses VIP:PORT.
func ParseService(s string) (netip.AddrPort, error) {
	ap, err := netip.ParseAddrPort(s)
	if err != nil || ap.Port() == 0 {
		return netip.AddrPort{}, fmt.Errorf("service %q: want VIP:PORT, e.g. 198.19.0.10:80 or [2001:db8::10]:80", s)
	}
	if ap.Addr().Zone() != "" {
		return netip.AddrPort{}, fmt.Errorf("service %q: %s", s, noZone)
	}
	return ap, nil
}

// RouteFile is what `sluice route apply -f` reads (YAML or JSON):
//
//	routes:
//	  - service: 198.19.0.10:80
//	    mode: random            # or round-robin
//	    backendRefs:
//	      - {address: 198.18.2.2, port: 8080, weight: 90}
//	      - {address: 198.18.3.2, port: 8080, weight: 10}
type RouteFile struct {
	Routes []Route `json:"routes" yaml:"routes"`
}

// routeFileText is a RouteFile as written: its addresses are parsed after
// decoding, so that a bad one is named with its route and a fix, not with
// netip's own error (ParseAddr("x"): unable to parse IP).
type routeFileText struct {
	Routes []struct {
		Service  string `yaml:"service"`
		Mode     string `yaml:"mode"`
		Backends []struct {
			Address string `yaml:"address"`
			Port    uint16 `yaml:"port"`
			Weight  uint32 `yaml:"weight"`
		} `yaml:"backendRefs"`
	} `yaml:"routes"`
}

func (f routeFileText) parse() (RouteFile, error) {
	var out RouteFile
	for _, rt := range f.Routes {
		svc, err := ParseService(rt.Service)
		if err != nil {
			return RouteFile{}, fmt.Errorf("route %w", err)
		}
		r := Route{Service: svc, Mode: rt.Mode}
		for _, b := range rt.Backends {
			a, err := netip.ParseAddr(b.Address)
			if err != nil {
				return RouteFile{}, fmt.Errorf("route %s: backend address %q: want an IP address, e.g. 198.18.2.2 or 2001:db8::2", svc, b.Address)
			}
			r.Backends = append(r.Backends, Backend{Address: a, Port: b.Port, Weight: b.Weight})
		}
		out.Routes = append(out.Routes, r)
	}
	return out, nil
}

// ParseRouteFile reads a route file and validates every route in it; a
// service listed twice is an error. Unknown fields are refused, so a typo
// (backendsRefs) does not silently drop backends.
func ParseRouteFile(data []byte, allowZero bool) ([]Route, error) {
	var text routeFileText
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	if err := dec.Decode(&text); errors.Is(err, io.EOF) {
		return nil, errors.New("route file is empty: want a top-level 'routes:' list")
	} else if err != nil {
		return nil, fmt.Errorf("route file: %v", oneLineYAML(err))
	}
	// Two files joined with --- would otherwise apply the first alone.
	if err := dec.Decode(new(yaml.Node)); !errors.Is(err, io.EOF) {
		return nil, errors.New("route file holds more than one YAML document: put every route in one 'routes:' list")
	}
	f, err := text.parse()
	if err != nil {
		return nil, err
	}
	if len(f.Routes) == 0 {
		return nil, errors.New("route file has no routes: want a top-level 'routes:' list")
	}
	seen := map[netip.AddrPort]bool{}
	out := make([]Route, 0, len(f.Routes))
	for _, r := range f.Routes {
		if err := r.Validate(allowZero); err != nil {
			return nil, err
		}
		r = r.Normalize()
		if seen[r.Service] {
			return nil, fmt.Errorf("route file lists service %s twice: give each service once", r.Service)
		}
		seen[r.Service] = true
		out = append(out, r)
	}
	return out, nil
}

func oneLineYAML(err error) string {
	return strings.Join(strings.Fields(err.Error()), " ")
}
