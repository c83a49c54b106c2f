package loader

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"sync"
	"time"

	"github.com/cilium/ebpf/ringbuf"

	"github.com/sluicemesh/sluice/bpf"
	"github.com/sluicemesh/sluice/podstate"
)

// FlowSource is a pod's flow events and counters, opened from its pins with
// the access the sidecar has (the proxy group's). Only one FlowSource should
// read a pod's events: each event is read once.
type FlowSource struct {
	pins     *Pins
	events   *ringbuf.Reader
	close    sync.Once
	closeErr error
}

// OpenFlows opens t's flow ring buffer, counters and routes; the pins must
// belong to t's cgroup.
func OpenFlows(t Target) (*FlowSource, error) {
	p, err := Open(t, ReadOnly, bpf.SluiceMapCounters, bpf.SluiceMapRoutes, bpf.SluiceMapRoutesActive)
	if err != nil {
		return nil, err
	}
	// A consumer moves the ring's read position: it writes.
	ring, err := p.open(bpf.SluiceMapFlowEvents, ReadWrite)
	if err != nil {
		p.Close()
		return nil, err
	}
	events, err := ringbuf.NewReader(ring)
	if err != nil {
		p.Close()
		return nil, fmt.Errorf("read flow events: %w", err)
	}
	return &FlowSource{pins: p, events: events}, nil
}

// Next waits up to timeout for the next flow event. It returns
// os.ErrDeadlineExceeded when none came, and io.EOF once the source is
// closed.
func (s *FlowSource) Next(timeout time.Duration) (podstate.FlowEvent, error) {
	s.events.SetDeadline(time.Now().Add(timeout))
	rec, err := s.events.Read()
	if errors.Is(err, ringbuf.ErrClosed) {
		return podstate.FlowEvent{}, io.EOF
	}
	if err != nil {
		return podstate.FlowEvent{}, err
	}
	return decodeFlowEvent(rec.RawSample)
}

// decodeFlowEvent turns the kernel's struct flow_event into its Go value:
// the one place that knows its layout and enums.
func decodeFlowEvent(raw []byte) (podstate.FlowEvent, error) {
	var ev bpf.SluiceFlowEvent
	if err := binary.Read(bytes.NewReader(raw), binary.NativeEndian, &ev); err != nil {
		return podstate.FlowEvent{}, fmt.Errorf("decode flow event of %d bytes: %w", len(raw), err)
	}
	us := func(n uint32) time.Duration { return time.Duration(n) * time.Microsecond }
	flag := func(f bpf.SluiceFlowFlag) bool { return ev.Flow&uint32(f) != 0 }
	return podstate.FlowEvent{
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

// Routes returns the routes in force, through maps kept open: the sidecar
// that reads them has dropped root and may not reach the pins again.
func (s *FlowSource) Routes() ([]RouteState, error) { return s.pins.Routes() }

// Version changes whenever the routes do, for one map lookup: a reader
// that caches Routes rereads them only when it changed.
func (s *FlowSource) Version() (uint32, error) { return s.pins.RoutesVersion() }

// Counters reads the hooks' counters (see counterNames).
func (s *FlowSource) Counters() (map[string]uint64, error) { return s.pins.Counters() }

// Close makes a waiting Next return io.EOF; closing again does nothing.
func (s *FlowSource) Close() error {
	s.close.Do(func() {
		s.closeErr = errors.Join(s.events.Close(), s.pins.Close())
	})
	return s.closeErr
}
