package loader

import (
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"path/filepath"
	"sync"
	"time"
	"unsafe"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/ringbuf"

	"github.com/sluicemesh/sluice/bpf"
	"github.com/sluicemesh/sluice/podstate"
)

// NodeFlows is the flow events of every pod on the node that runs this
// build, from the build's ring: the node's agent reads it (one reader: each
// event is read once).
type NodeFlows struct {
	root     string
	id       ebpf.MapID
	events   *ringbuf.Reader
	rec      ringbuf.Record // reused: Next allocates nothing
	close    sync.Once
	closeErr error
}

// OpenNodeFlows opens the flow ring of this build's node state under root:
// ErrNotInstalled while no pod on the node runs this build.
func OpenNodeFlows(root string) (*NodeFlows, error) {
	path := filepath.Join(nodeDir(root, bpf.ObjectHash()), bpf.SluiceMapFlowEvents)
	ring, err := ebpf.LoadPinnedMap(path, nil)
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("%w: no pod runs this build on the node (no %s)", ErrNotInstalled, path)
	}
	if err != nil {
		return nil, fmt.Errorf("open the node's flow events: %w", err)
	}
	defer ring.Close() // the reader holds its own
	id, err := mapID(ring)
	if err != nil {
		return nil, err
	}
	events, err := ringbuf.NewReader(ring)
	if err != nil {
		return nil, fmt.Errorf("read flow events: %w", err)
	}
	return &NodeFlows{root: root, id: id, events: events}, nil
}

// Replaced reports whether the ring read is no longer the build's: its
// last pod left and took the node state with it (a later install made
// another). Reopen then.
func (s *NodeFlows) Replaced() bool {
	ring, err := ebpf.LoadPinnedMap(filepath.Join(nodeDir(s.root, bpf.ObjectHash()), bpf.SluiceMapFlowEvents), &ebpf.LoadPinOptions{ReadOnly: true})
	if err != nil {
		return true
	}
	defer ring.Close()
	id, err := mapID(ring)
	return err != nil || id != s.id
}

func mapID(m *ebpf.Map) (ebpf.MapID, error) {
	info, err := m.Info()
	if err != nil {
		return 0, fmt.Errorf("read the node's flow events: %w", err)
	}
	id, ok := info.ID()
	if !ok {
		return 0, errors.New("read the node's flow events: the kernel gives no map ID")
	}
	return id, nil
}

// Next waits up to timeout for the next flow event, and returns it with
// its pod's network namespace (Installed.NetnsCookie). It returns
// os.ErrDeadlineExceeded when none came, and io.EOF once closed.
func (s *NodeFlows) Next(timeout time.Duration) (uint64, podstate.FlowEvent, error) {
	s.events.SetDeadline(time.Now().Add(timeout))
	err := s.events.ReadInto(&s.rec)
	if errors.Is(err, ringbuf.ErrClosed) {
		return 0, podstate.FlowEvent{}, io.EOF
	}
	if err != nil {
		return 0, podstate.FlowEvent{}, err
	}
	return decodeFlowEvent(s.rec.RawSample)
}

// Close makes a waiting Next return io.EOF; closing again does nothing.
func (s *NodeFlows) Close() error {
	s.close.Do(func() { s.closeErr = s.events.Close() })
	return s.closeErr
}

// decodeFlowEvent turns the kernel's struct flow_event into its Go value:
// the one place that knows its layout and enums.
func decodeFlowEvent(raw []byte) (uint64, podstate.FlowEvent, error) {
	// A copy of the kernel's bytes over bpf2go's mirror of the struct
	// (same layout, padding spelled out): binary.Read took 1.2 µs and two
	// allocations an event, by reflection.
	var ev bpf.SluiceFlowEvent
	size := int(unsafe.Sizeof(ev))
	if len(raw) < size {
		return 0, podstate.FlowEvent{}, fmt.Errorf("decode flow event of %d bytes: want %d", len(raw), size)
	}
	copy(unsafe.Slice((*byte)(unsafe.Pointer(&ev)), size), raw)
	us := func(n uint32) time.Duration { return time.Duration(n) * time.Microsecond }
	flag := func(f bpf.SluiceFlowFlag) bool { return ev.Flow&uint32(f) != 0 }
	return ev.NetnsCookie, podstate.FlowEvent{
		Cookie:         ev.Cookie,
		Kind:           flowKinds[bpf.SluiceFlowKind(ev.Kind)],
		Inbound:        flag(bpf.SluiceFlowFlagFLOW_INBOUND),
		ViaSidecar:     flag(bpf.SluiceFlowFlagFLOW_VIA_SIDECAR),
		KernelOnly:     flag(bpf.SluiceFlowFlagFLOW_KERNEL_ONLY),
		Local:          netip.AddrPortFrom(AddrFrom6(ev.Local), ev.LocalPort),
		Remote:         netip.AddrPortFrom(AddrFrom6(ev.Remote), ev.RemotePort),
		OriginalDst:    netip.AddrPortFrom(AddrFrom6(ev.Orig.Addr), ev.Orig.Port),
		StartNs:        ev.StartNs,
		EndNs:          ev.EndNs,
		ConnectLatency: us(ev.ConnectUs),
		SRTT:           us(ev.SrttUs),
		MinRTT:         us(ev.MinRttUs),
		BytesSent:      ev.BytesSent,
		BytesReceived:  ev.BytesReceived,
		Retransmits:    ev.Retrans,
		End:            flowEnds[bpf.SluiceFlowEnd(ev.End)],
	}, nil
}

// An unknown kind decodes as 0, which readers take for a failure, as they
// did any kind but open and close.
var flowKinds = map[bpf.SluiceFlowKind]podstate.FlowKind{
	bpf.SluiceFlowKindFLOW_OPEN:           podstate.FlowOpened,
	bpf.SluiceFlowKindFLOW_CLOSE:          podstate.FlowClosed,
	bpf.SluiceFlowKindFLOW_CONNECT_FAILED: podstate.FlowConnectFailed,
}

var flowEnds = map[bpf.SluiceFlowEnd]string{
	bpf.SluiceFlowEndEND_FIN:     podstate.EndFin,
	bpf.SluiceFlowEndEND_RST:     podstate.EndRst,
	bpf.SluiceFlowEndEND_TIMEOUT: podstate.EndTimeout,
	bpf.SluiceFlowEndEND_REFUSED: podstate.EndRefused,
}
