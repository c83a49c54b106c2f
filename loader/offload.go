package loader

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"

	"golang.org/x/sys/unix"

	"github.com/sluicemesh/sluice/bpf"
)

// Offload errors: why the kernel did not take a connection.
var (
	// ErrNoOffloadHook: no Sluice install runs in the pod (or one older
	// than this handoff): nothing answers the option.
	ErrNoOffloadHook = errors.New("no Sluice install in the pod answers the offload handoff")
	// ErrNotOffloadable: the far socket is not on one of the install's
	// offload ports (or splice is off), so the kernel never readied it.
	ErrNotOffloadable = errors.New("not a connection on an offload port")
	// ErrNotProxy: the caller is not the install's proxy identity.
	ErrNotProxy = errors.New("only the install's proxy identity may hand connections to the kernel")
)

// HandOffload hands a proxied connection's app-to-far direction to the
// kernel, and returns what takes it back (before the sockets close; the far
// socket leaves the kernel's table by itself as it closes). app and sidecar
// are the two ends of the hop to the app (the app's socket and the
// sidecar's), far the sidecar's socket on the other side, connected. From
// the call on, the sidecar must leave every byte it reads on its end of the
// hop until it has written it to far (peek, write, then read), since the
// kernel sends the app's next message straight on only when that queue is
// empty.
//
// It is a setsockopt on far that the pod's setsockopt program answers
// (bpf/setsockopt.c): the kernel checks that the caller is the proxy
// identity and far is its own socket on an offload port, and writes the
// pod's maps itself. The caller needs no BPF access at all.
func HandOffload(app, sidecar netip.AddrPort, far int) (release func() error, err error) {
	// The splice table's key of the app's end: the hop as the app sees it.
	key := bpf.SluiceTupleKey{Client: Addr6(app.Addr()), ClientPort: app.Port(), Server: Addr6(sidecar.Addr()), ServerPort: sidecar.Port()}
	var buf bytes.Buffer
	if err := binary.Write(&buf, binary.NativeEndian, key); err != nil {
		return nil, err
	}
	value := buf.String()
	if err := offloadOpt(far, bpf.SluiceSluiceSockoptSLUICE_OFFLOAD_HAND, value); err != nil {
		return nil, err
	}
	return func() error {
		return offloadOpt(far, bpf.SluiceSluiceSockoptSLUICE_OFFLOAD_RELEASE, value)
	}, nil
}

func offloadOpt(fd int, opt bpf.SluiceSluiceSockopt, value string) error {
	err := unix.SetsockoptString(fd, int(bpf.SluiceSluiceSockoptSOL_SLUICE), int(opt), value)
	switch {
	case err == nil:
		return nil
	case errors.Is(err, unix.ENOPROTOOPT), errors.Is(err, unix.EOPNOTSUPP):
		return ErrNoOffloadHook
	case errors.Is(err, unix.ENOENT):
		return ErrNotOffloadable
	case errors.Is(err, unix.EPERM):
		return ErrNotProxy
	default:
		return fmt.Errorf("offload: %w", err)
	}
}
