package sidecar

import (
	"errors"
	"net/netip"
	"strings"
	"testing"

	"github.com/sluicemesh/sluice/loader"
	"github.com/sluicemesh/sluice/proxy"
)

// The offloader offers connections only while the install has offload
// ports, follows the install, and leaves a connection the kernel declines
// (not on an offload port) proxied without a word.
func TestOffloaderOffersWhileTheInstallHasOffloadPorts(t *testing.T) {
	log, logs := testLogger(t)
	o := newOffloader(false, log)
	kernel := map[uint16]bool{8080: true} // the install's offload ports
	o.hand = func(app, _ netip.AddrPort, _ int) (func() error, error) {
		if !kernel[app.Port()] {
			return nil, loader.ErrNotOffloadable
		}
		return func() error { return nil }, nil
	}
	side := netip.MustParseAddrPort("127.0.0.1:15001")
	offer := func(port uint16) bool {
		app := netip.AddrPortFrom(netip.MustParseAddr("198.18.1.2"), port)
		release := o.Offload(proxy.Outbound, netip.MustParseAddrPort("198.18.2.2:80"), app, side, 3)
		if release != nil {
			release()
		}
		return release != nil
	}
	if offer(8080) {
		t.Error("offloaded with no offload ports in the install")
	}
	o.on.Store(true)
	if !offer(8080) || offer(9090) {
		t.Error("want the connection the kernel takes offloaded, and only it")
	}
	if n := o.handed.Load(); n != 1 {
		t.Errorf("counted %d offloaded, want 1", n)
	}
	if logs.String() != "" {
		t.Errorf("logged for a declined connection:\n%s", logs)
	}
}

func TestOffloaderFailureProxiesAndWarnsOnce(t *testing.T) {
	log, logs := testLogger(t)
	o := newOffloader(true, log)
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
