package sidecar

import (
	"context"
	"log/slog"
	"net/netip"
	"slices"
	"sync/atomic"
	"time"

	"github.com/sluicemesh/sluice/loader"
	"github.com/sluicemesh/sluice/proxy"
	"github.com/sluicemesh/sluice/redirect"
)

// offloader offers the proxy's connections to the kernel by the install's
// offload ports: outbound by original destination port, inbound by the
// app's port. It follows the install: a rerun of install with other
// offload ports applies to the next connections, as the rest of the policy
// does. The handoff is a setsockopt the pod's hooks answer
// (loader.HandOffload): the sidecar holds no map.
type offloader struct {
	ports  atomic.Pointer[offloadPorts]
	log    *slog.Logger
	warned atomic.Bool
	handed atomic.Int64 // connections offloaded
	// hand is loader.HandOffload; a test gives the offloader another.
	hand func(app, sidecar netip.AddrPort, far int) (func() error, error)
}

type offloadPorts struct{ outbound, inbound []uint16 }

// OffloadRefresh is how often the offloader rereads the install's ports.
const OffloadRefresh = time.Second

func newOffloader(plan redirect.Plan, log *slog.Logger) *offloader {
	o := &offloader{log: log, hand: loader.HandOffload}
	o.ports.Store(&offloadPorts{plan.OffloadPorts, plan.OffloadInboundPorts})
	return o
}

// follow rereads target's offload ports until ctx ends.
func (o *offloader) follow(target loader.Target) runner {
	return func(ctx context.Context) error {
		t := time.NewTicker(OffloadRefresh)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return nil
			case <-t.C:
			}
			// An install being replaced fails this: keep the last.
			out, in, err := loader.OffloadPorts(target)
			if err != nil {
				o.log.Debug("offload: reread the install's ports", "err", err)
				continue
			}
			o.ports.Store(&offloadPorts{out, in})
		}
	}
}

func (o *offloader) Offload(dir proxy.Direction, dst, app, sidecar netip.AddrPort, far int) func() {
	p := o.ports.Load()
	ports := p.outbound
	if dir == proxy.Inbound {
		ports = p.inbound
	}
	if !slices.Contains(ports, dst.Port()) {
		return nil
	}
	release, err := o.hand(app, sidecar, far)
	if err != nil {
		// Once: every connection would fail alike. It stays proxied.
		if !o.warned.Swap(true) {
			o.log.Warn("offload failed; proxying instead", "direction", dir, "orig_dst", dst, "err", err)
		}
		return nil
	}
	o.handed.Add(1)
	return func() {
		if err := release(); err != nil {
			o.log.Warn("offload: taking a connection back", "err", err)
		}
	}
}
