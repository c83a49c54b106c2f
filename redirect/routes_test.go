package redirect

import (
	"net/netip"
	"strings"
	"testing"
)

func TestParseRouteFile(t *testing.T) {
	yamlFile := `
routes:
  - service: 198.19.0.10:80
    backendRefs:
      - {address: 198.18.2.2, port: 8080, weight: 90}
      - {address: 198.18.3.2, port: 8080, weight: 10}
  - service: "[2001:db8::10]:443"
    mode: round-robin
    backendRefs:
      - address: 2001:2:0:2::2
        port: 8443
        weight: 1
`
	jsonFile := `{"routes": [{"service": "198.19.0.10:80", "backendRefs": [{"address": "198.18.2.2", "port": 8080, "weight": 90}, {"address": "198.18.3.2", "port": 8080, "weight": 10}]}, {"service": "[2001:db8::10]:443", "mode": "round-robin", "backendRefs": [{"address": "2001:2:0:2::2", "port": 8443, "weight": 1}]}]}`
	for name, data := range map[string]string{"yaml": yamlFile, "json": jsonFile} {
		t.Run(name, func(t *testing.T) {
			routes, err := ParseRouteFile([]byte(data), false)
			if err != nil {
				t.Fatal(err)
			}
			if len(routes) != 2 || routes[0].Mode != ModeRandom || routes[1].Mode != ModeRoundRobin || routes[0].Total() != 100 {
				t.Fatalf("parsed %+v", routes)
			}
			if got := routes[1].Backends[0].AddrPort(); got != netip.MustParseAddrPort("[2001:2:0:2::2]:8443") {
				t.Errorf("backend %s", got)
			}
		})
	}
}

func TestRouteErrors(t *testing.T) {
	svc := netip.MustParseAddrPort("198.19.0.10:80")
	b := func(s string, w uint32) Backend {
		ap := netip.MustParseAddrPort(s)
		return Backend{Address: ap.Addr(), Port: ap.Port(), Weight: w}
	}
	tests := []struct {
		name  string
		route Route
		want  string
	}{
		{"no backends", Route{Service: svc}, "has no backends"},
		{"all zero", Route{Service: svc, Backends: []Backend{b("198.18.2.2:80", 0)}}, "--allow-zero"},
		{"duplicate", Route{Service: svc, Backends: []Backend{b("198.18.2.2:80", 1), b("198.18.2.2:80", 2)}}, "listed twice"},
		{"family", Route{Service: svc, Backends: []Backend{b("[2001:2::2]:80", 1)}}, "another IP family"},
		{"weight", Route{Service: svc, Backends: []Backend{b("198.18.2.2:80", MaxWeight+1)}}, "at most"},
		{"mode", Route{Service: svc, Mode: "sticky", Backends: []Backend{b("198.18.2.2:80", 1)}}, `mode "sticky"`},
		{"port 0", Route{Service: netip.MustParseAddrPort("198.19.0.10:0"), Backends: []Backend{b("198.18.2.2:80", 1)}}, "want VIP:PORT"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.route.Validate(false)
			if err == nil || !strings.Contains(err.Error(), tt.want) || strings.Contains(err.Error(), "\n") {
				t.Errorf("error %v, want one line with %q", err, tt.want)
			}
		})
	}
	if err := (Route{Service: svc, Backends: []Backend{b("198.18.2.2:80", 0)}}).Validate(true); err != nil {
		t.Errorf("all zero with allowZero: %v", err)
	}
	for _, args := range [][]string{{"198.18.2.2:80"}, {"198.18.2.2=5"}, {"198.18.2.2:80=-1"}, {"198.18.2.2:80=x"}} {
		if _, err := ParseBackends(args); err == nil {
			t.Errorf("ParseBackends(%q) accepted", args)
		}
	}
	for _, f := range []string{"routes: []", "routes:\n  - service: 1.2.3.4:80\n    backendsRefs: []", "nope: 1", "routes:\n  - service: 1.2.3.4:80\n    backendRefs: [{address: 1.2.3.5, port: 1, weight: 1}]\n  - service: 1.2.3.4:80\n    backendRefs: [{address: 1.2.3.5, port: 1, weight: 1}]"} {
		if _, err := ParseRouteFile([]byte(f), false); err == nil {
			t.Errorf("route file %q accepted", f)
		}
	}
}
