package loader

import (
	"errors"
	"fmt"
	"net/netip"
	"path/filepath"
	"sync/atomic"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/sluicemesh/sluice/bpf"
)

// Offload is the sidecar's hand on offload's maps: it tells the kernel that
// the app's messages on a connection go straight out on the sidecar's far
// socket (the splice program's offload, bpf/splice.c), and takes that back.
type Offload struct {
	socks, peers *ebpf.Map
	ids          [2]ebpf.MapID
	closed       atomic.Bool
}

// OpenOffload opens t's offload maps for writing. It needs only read and
// write access to those two pins (the proxy group has it).
func OpenOffload(t Target) (*Offload, error) {
	rec, err := readRecord(t.PinDir)
	if err != nil {
		return nil, err
	}
	if err := checkOwner(t, rec); err != nil {
		return nil, err
	}
	socks, err := ebpf.LoadPinnedMap(filepath.Join(t.PinDir, bpf.SluiceMapOffloadSocks), nil)
	if err != nil {
		return nil, pinsError(t.PinDir, err)
	}
	peers, err := ebpf.LoadPinnedMap(filepath.Join(t.PinDir, bpf.SluiceMapOffloadPeers), nil)
	if err != nil {
		socks.Close()
		return nil, pinsError(t.PinDir, err)
	}
	o := &Offload{socks: socks, peers: peers}
	for i, m := range []*ebpf.Map{socks, peers} {
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
	return errors.Join(o.socks.Close(), o.peers.Close())
}

// Hand hands a proxied connection's app-to-far direction to the kernel, and
// returns what takes it back (before app closes; the far socket leaves the
// sockhash by itself as it closes). app is the sidecar's socket on the hop
// to the app, far its socket on the other side; both connected. From the
// call on, the sidecar must leave every byte it reads from app on app's
// queue until it has written it to far (peek, write, then read), since the
// kernel sends the app's next message straight on only when that queue is
// empty.
func (o *Offload) Hand(app, far int) (release func() error, err error) {
	key, err := appKey(app)
	if err != nil {
		return nil, err
	}
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

// appKey is the splice table's key of the app's end of the hop whose
// sidecar end is fd: the connection as the app sees it.
func appKey(fd int) (bpf.SluiceTupleKey, error) {
	var key bpf.SluiceTupleKey
	local, err := unix.Getsockname(fd)
	if err != nil {
		return key, fmt.Errorf("offload: getsockname: %w", err)
	}
	remote, err := unix.Getpeername(fd)
	if err != nil {
		return key, fmt.Errorf("offload: getpeername: %w", err)
	}
	app, sidecar := addrPort(remote), addrPort(local)
	key.Client, key.ClientPort = Addr6(app.Addr()), app.Port()
	key.Server, key.ServerPort = Addr6(sidecar.Addr()), sidecar.Port()
	return key, nil
}

func addrPort(sa unix.Sockaddr) netip.AddrPort {
	switch sa := sa.(type) {
	case *unix.SockaddrInet4:
		return netip.AddrPortFrom(netip.AddrFrom4(sa.Addr), uint16(sa.Port))
	case *unix.SockaddrInet6:
		return netip.AddrPortFrom(netip.AddrFrom16(sa.Addr), uint16(sa.Port))
	}
	return netip.AddrPort{}
}
