package loader

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/sluicemesh/sluice/bpf"
)

// What the built-in sidecar asks of its pod's hooks, at socket option level
// SOL_SLUICE (bpf/sluice.h: enum sluice_sockopt): the plan it serves, and
// the offload handoff. It needs no access to any map or pin for either, and
// the kernel answers only for the pod the calling socket is in.

// Why the kernel did not answer or take a connection.
var (
	// ErrNoHook: no Sluice install in the pod (or one older than these
	// options) answers them.
	ErrNoHook = errors.New("no Sluice install in the pod answers the sidecar's socket options")
	// ErrNotOffloadable: the far socket is not on one of the install's
	// offload ports, so the kernel never readied it.
	ErrNotOffloadable = errors.New("not a connection on an offload port")
	// ErrNotProxy: the caller is not the install's proxy identity.
	ErrNotProxy = errors.New("only the install's proxy identity may hand connections to the kernel")
)

// SidecarPlan is what the sidecar serves of its pod's plan in force.
type SidecarPlan struct {
	OutboundPort, InboundPort uint16
	ProxyUID, ProxyGID        uint32
	SidecarPorts              []uint16
	// Offload: the install has offload ports, so the sidecar offers its
	// connections to the kernel, which takes those on them.
	Offload bool
	// DNSPort is where DNS capture sends the pod's queries, for the
	// sidecar's DNS forwarder; 0 without DNS capture.
	DNSPort uint16
}

// AskPlan asks the hooks of the pod the caller runs in for its plan in
// force: a getsockopt(SOL_SLUICE, SLUICE_PLAN) on a socket of its own,
// which the pod's getsockopt program answers (bpf/getsockopt.c).
func AskPlan() (SidecarPlan, error) {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return SidecarPlan{}, fmt.Errorf("ask the pod's plan: %w", err)
	}
	defer unix.Close(fd)
	var pol bpf.SluicePolicy
	buf := make([]byte, binary.Size(pol))
	size := uint32(len(buf))
	_, _, errno := unix.Syscall6(unix.SYS_GETSOCKOPT, uintptr(fd), uintptr(bpf.SluiceSluiceSockoptSOL_SLUICE),
		uintptr(bpf.SluiceSluiceSockoptSLUICE_PLAN), uintptr(unsafe.Pointer(&buf[0])), uintptr(unsafe.Pointer(&size)), 0)
	if err := sockoptErr(errno); err != nil {
		return SidecarPlan{}, err
	}
	if int(size) != len(buf) {
		return SidecarPlan{}, fmt.Errorf("ask the pod's plan: answered %d bytes, want %d: the install is of another Sluice version", size, len(buf))
	}
	if err := binary.Read(bytes.NewReader(buf), binary.NativeEndian, &pol); err != nil {
		return SidecarPlan{}, err
	}
	plan := SidecarPlan{OutboundPort: pol.OutboundPort, InboundPort: pol.InboundPort, ProxyUID: pol.ProxyUid, ProxyGID: pol.ProxyGid,
		Offload: pol.Flags&uint32(bpf.SluiceConfigFlagCONFIG_OFFLOAD) != 0}
	if pol.Flags&uint32(bpf.SluiceConfigFlagCONFIG_REDIRECT_DNS) != 0 {
		plan.DNSPort = pol.DnsPort
	}
	for _, port := range pol.SidecarPorts {
		if port != 0 {
			plan.SidecarPorts = append(plan.SidecarPorts, port)
		}
	}
	return plan, nil
}

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
	var errno unix.Errno
	if err != nil && !errors.As(err, &errno) {
		return fmt.Errorf("offload: %w", err)
	}
	return sockoptErr(errno)
}

// sockoptErr says what the pod's hooks meant by errno.
func sockoptErr(errno unix.Errno) error {
	switch errno {
	case 0:
		return nil
	case unix.ENOPROTOOPT, unix.EOPNOTSUPP:
		return ErrNoHook
	case unix.ENOENT:
		return ErrNotOffloadable
	case unix.EPERM:
		return ErrNotProxy
	}
	return fmt.Errorf("sluice socket option: %w", errno)
}
