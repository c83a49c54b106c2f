package sidecar

import (
	"context"
	"errors"
	"log/slog"
	"net/netip"
	"sync/atomic"
	"time"

	"github.com/sluicemesh/sluice/loader"
	"github.com/sluicemesh/sluice/proxy"
)

// offloader offers the proxy's connections to the kernel while the
// install has offload ports: the kernel takes those on them
// (loader.HandOffload), and the sidecar holds no map. It follows the
// install: a rerun of install that adds or removes offload ports applies
// to the next connections, as the rest of the policy does.
type offloader struct {
	on     atomic.Bool
	log    *slog.Logger
	warned atomic.Bool
	handed atomic.Int64 // connections offloaded
	// hand is loader.HandOffload; a test gives the offloader another.
	hand func(app, sidecar netip.AddrPort, far int) (func() error, error)
}

// OffloadRefresh is how often the offloader asks the install again.
const OffloadRefresh = time.Second

func newOffloader(on bool, log *slog.Logger) *offloader {
	o := &offloader{log: log, hand: loader.HandOffload}
	o.on.Store(on)
	return o
}

// follow asks the pod's hooks whether the install has offload ports, with
// ask, until ctx ends.
func (o *offloader) follow(ask func() (loader.SidecarPlan, error)) runner {
	return func(ctx context.Context) error {
		t := time.NewTicker(OffloadRefresh)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return nil
			case <-t.C:
			}
			// An install being replaced may fail this: keep the last.
			plan, err := ask()
			if err != nil {
				o.log.Debug("offload: ask the install again", "err", err)
				continue
			}
			o.on.Store(plan.Offload)
		}
	}
}

func (o *offloader) Offload(dir proxy.Direction, dst, app, sidecar netip.AddrPort, far int) func() {
	if !o.on.Load() {
		return nil
	}
	release, err := o.hand(app, sidecar, far)
	if errors.Is(err, loader.ErrNotOffloadable) {
		return nil // not on an offload port: proxied, as asked
	}
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
