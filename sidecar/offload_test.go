package sidecar

import (
	"errors"
	"net/netip"
	"strings"
	"testing"

	"github.com/sluicemesh/sluice/proxy"
	"github.com/sluicemesh/sluice/redirect"
)

func TestOffloaderMatchesPortsByDirection(t *testing.T) {
	log, _ := testLogger(t)
	o := newOffloader(redirect.Plan{OffloadPorts: []uint16{80, 443}, OffloadInboundPorts: []uint16{8080}}, log)
	var handed []netip.AddrPort
	o.hand = func(app, _ netip.AddrPort, _ int) (func() error, error) {
		handed = append(handed, app)
		return func() error { return nil }, nil
	}
	app := netip.MustParseAddrPort("10.0.0.1:40000")
	side := netip.MustParseAddrPort("127.0.0.1:15001")
	for _, tc := range []struct {
		dir  proxy.Direction
		dst  string
		want bool
	}{
		{proxy.Outbound, "198.18.2.2:80", true},
		{proxy.Outbound, "198.18.2.2:443", true},
		{proxy.Outbound, "198.18.2.2:8080", false}, // an inbound port
		{proxy.Inbound, "10.0.0.1:8080", true},
		{proxy.Inbound, "10.0.0.1:80", false}, // an outbound port
	} {
		release := o.Offload(tc.dir, netip.MustParseAddrPort(tc.dst), app, side, 3)
		if (release != nil) != tc.want {
			t.Errorf("Offload(%v, %s) offloaded %v, want %v", tc.dir, tc.dst, release != nil, tc.want)
		}
		if release != nil {
			release()
		}
	}
	if n := o.handed.Load(); n != 3 || len(handed) != 3 {
		t.Errorf("handed %d (counted %d), want 3", len(handed), n)
	}
}

func TestOffloaderFailureProxiesAndWarnsOnce(t *testing.T) {
	log, logs := testLogger(t)
	o := newOffloader(redirect.Plan{OffloadPorts: []uint16{80}}, log)
	o.hand = func(netip.AddrPort, netip.AddrPort, int) (func() error, error) {
		return nil, errors.New("socket gone")
	}
	dst := netip.MustParseAddrPort("198.18.2.2:80")
	for range 3 {
		if o.Offload(proxy.Outbound, dst, netip.AddrPort{}, netip.AddrPort{}, 3) != nil {
			t.Fatal("a failed offload returned a release")
		}
	}
	if n := strings.Count(logs.String(), "offload failed; proxying instead"); n != 1 {
		t.Errorf("warned %d times, want once:\n%s", n, logs)
	}
	if n := o.handed.Load(); n != 0 {
		t.Errorf("counted %d offloaded, want 0", n)
	}
}
