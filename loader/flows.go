package loader

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"path/filepath"
	"sync"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/ringbuf"

	"github.com/sluicemesh/sluice/bpf"
)

// FlowSource is a pod's flow events and counters, opened from its pins with
// the access the sidecar has (the proxy group's). Only one FlowSource should
// read a pod's events: each event is read once.
type FlowSource struct {
	*RouteReader
	events   *ringbuf.Reader
	counters *ebpf.Map
	close    sync.Once
	closeErr error
}

// OpenFlows opens t's flow ring buffer and counters; the pins must belong to
// t's cgroup.
func OpenFlows(t Target) (*FlowSource, error) {
	rec, err := readRecord(t.PinDir)
	if err != nil {
		return nil, err
	}
	if err := checkOwner(t, rec); err != nil {
		return nil, err
	}
	ring, err := ebpf.LoadPinnedMap(filepath.Join(t.PinDir, bpf.SluiceMapFlowEvents), nil)
	if err != nil {
		return nil, pinsError(t.PinDir, err)
	}
	defer ring.Close()
	events, err := ringbuf.NewReader(ring)
	if err != nil {
		return nil, fmt.Errorf("read flow events: %w", err)
	}
	counters, err := ebpf.LoadPinnedMap(filepath.Join(t.PinDir, bpf.SluiceMapCounters), &ebpf.LoadPinOptions{ReadOnly: true})
	if err != nil {
		events.Close()
		return nil, pinsError(t.PinDir, err)
	}
	routes, err := OpenRoutes(t)
	if err != nil {
		events.Close()
		counters.Close()
		return nil, err
	}
	return &FlowSource{RouteReader: routes, events: events, counters: counters}, nil
}

// ErrClosed is what Next returns once the source is closed.
var ErrClosed = errors.New("flow source closed")

// Next waits up to timeout for the next flow event. It returns
// os.ErrDeadlineExceeded when none came.
func (s *FlowSource) Next(timeout time.Duration) (bpf.SluiceFlowEvent, error) {
	var ev bpf.SluiceFlowEvent
	s.events.SetDeadline(time.Now().Add(timeout))
	rec, err := s.events.Read()
	if errors.Is(err, ringbuf.ErrClosed) {
		return ev, ErrClosed
	}
	if err != nil {
		return ev, err
	}
	if err := binary.Read(bytes.NewReader(rec.RawSample), binary.NativeEndian, &ev); err != nil {
		return ev, fmt.Errorf("decode flow event of %d bytes: %w", len(rec.RawSample), err)
	}
	return ev, nil
}

// Counters reads the hooks' counters (see counterNames).
func (s *FlowSource) Counters() (map[string]uint64, error) { return sumCounters(s.counters) }

// Close makes a waiting Next return ErrClosed; closing again does nothing.
func (s *FlowSource) Close() error {
	s.close.Do(func() {
		s.closeErr = errors.Join(s.events.Close(), s.counters.Close(), s.RouteReader.Close())
	})
	return s.closeErr
}
