package loader

import (
	"errors"
	"fmt"
	"net/netip"
	"sync/atomic"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/sluicemesh/sluice/bpf"
)

// Offload is the sidecar's hand on offload's maps: it tells the kernel that
// the app's messages on a connection go straight out on the sidecar's far
// socket (the splice program's offload, bpf/splice.c), and takes that back.
type Offload struct {
	pins         *Pins
	socks, peers *ebpf.Map
	ids          [2]ebpf.MapID
	closed       atomic.Bool
}

// OpenOffload opens t's offload maps for writing. It needs only read and
// write access to those two pins (the proxy group has it).
func OpenOffload(t Target) (*Offload, error) {
	p, err := Open(t, ReadWrite, bpf.SluiceMapOffloadSocks, bpf.SluiceMapOffloadPeers)
	if err != nil {
		return nil, err
	}
	// Both are open: Map returns them as they are.
	o := &Offload{pins: p}
	o.socks, _ = p.Map(bpf.SluiceMapOffloadSocks)
	o.peers, _ = p.Map(bpf.SluiceMapOffloadPeers)
	for i, m := range []*ebpf.Map{o.socks, o.peers} {
		if info, err := m.Info(); err == nil {
			o.ids[i], _ = info.ID()
		}
	}
	return o, nil
}

// Same reports whether o and other are the same maps: a rerun of install
// that resizes them (splice turned on) replaces them.
func (o *Offload) Same(other *Offload) bool {
	return o.ids == other.ids && o.ids[0] != 0
}

// Close closes the maps. What was handed to them needs no taking back
// after: once replaced, no program reads them.
func (o *Offload) Close() error {
	o.closed.Store(true)
	return o.pins.Close()
}

// Hand hands a proxied connection's app-to-far direction to the kernel, and
// returns what takes it back (before the sockets close; the far socket
// leaves the sockhash by itself as it closes). app and sidecar are the two
// ends of the hop to the app (the app's socket and the sidecar's), far the
// sidecar's socket on the other side, connected. From the call on, the
// sidecar must leave every byte it reads on its end of the hop until it has
// written it to far (peek, write, then read), since the kernel sends the
// app's next message straight on only when that queue is empty.
func (o *Offload) Hand(app, sidecar netip.AddrPort, far int) (release func() error, err error) {
	// The splice table's key of the app's end: the hop as the app sees it.
	key := bpf.SluiceTupleKey{Client: Addr6(app.Addr()), ClientPort: app.Port(), Server: Addr6(sidecar.Addr()), ServerPort: sidecar.Port()}
	cookie, err := unix.GetsockoptUint64(far, unix.SOL_SOCKET, unix.SO_COOKIE)
	if err != nil {
		return nil, fmt.Errorf("offload: socket cookie: %w", err)
	}
	if err := o.socks.Update(cookie, uint64(far), ebpf.UpdateAny); err != nil {
		return nil, fmt.Errorf("offload: add the far socket to %s: %w", bpf.SluiceMapOffloadSocks, err)
	}
	if err := o.peers.Update(key, cookie, ebpf.UpdateAny); err != nil {
		o.socks.Delete(cookie)
		return nil, fmt.Errorf("offload: write %s: %w", bpf.SluiceMapOffloadPeers, err)
	}
	return func() error {
		if o.closed.Load() {
			return nil
		}
		if err := o.peers.Delete(key); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return fmt.Errorf("offload: delete from %s: %w", bpf.SluiceMapOffloadPeers, err)
		}
		return nil
	}, nil
}
