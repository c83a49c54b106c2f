package main

import (
	"log/slog"
	"net/netip"
	"slices"
	"sync/atomic"

	"github.com/sluicemesh/sluice/loader"
	"github.com/sluicemesh/sluice/proxy"
	"github.com/sluicemesh/sluice/redirect"
)

// offloader offers the proxy's connections to the kernel by the install's
// offload ports: outbound by original destination port, inbound by the
// app's port.
type offloader struct {
	maps              *loader.Offload
	outbound, inbound []uint16
	log               *slog.Logger
	warned            atomic.Bool
	handed            atomic.Int64 // connections offloaded
}

func newOffloader(maps *loader.Offload, plan redirect.Plan, log *slog.Logger) *offloader {
	return &offloader{maps: maps, outbound: plan.OffloadPorts, inbound: plan.OffloadInboundPorts, log: log}
}

func (o *offloader) Offload(dir proxy.Direction, dst netip.AddrPort, app, far int) func() {
	ports := o.outbound
	if dir == proxy.Inbound {
		ports = o.inbound
	}
	if !slices.Contains(ports, dst.Port()) {
		return nil
	}
	release, err := o.maps.Hand(app, far)
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
