// Package telemetry turns a pod's flow events (from the kernel's ring buffer)
// and its live sockets (from sock_diag) into what a platform team already
// uses: Prometheus metrics with Istio's layer-4 names and labels, a live
// flow table, and a stream of closed flows.
package telemetry

import (
	"net/netip"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sluicemesh/sluice/podstate"
)

// Flow is one connection of the pod to or from the outside, seen from the
// socket that carries it on the wire (the sidecar's upstream or accepted
// socket, or the app's own when it was not captured).
type Flow struct {
	Cookie      uint64         `json:"cookie"`
	Direction   string         `json:"direction"` // outbound or inbound
	Source      netip.AddrPort `json:"source"`    // the end that opened it
	Destination netip.AddrPort `json:"destination"`
	// OriginalDst is where the connection was going before capture: for
	// inbound flows the pod's own address and port.
	OriginalDst netip.AddrPort `json:"original_destination"`
	State       string         `json:"state"`         // open, closed or failed
	End         string         `json:"end,omitempty"` // fin, rst, timeout, refused
	Start       time.Time      `json:"start"`
	Duration    float64        `json:"duration_seconds"`
	// ConnectLatency is SYN sent to established (outbound), or SYN-ACK
	// sent to its ACK (inbound).
	ConnectLatency float64 `json:"connect_latency_seconds"`
	SRTT           float64 `json:"srtt_seconds"`
	MinRTT         float64 `json:"min_rtt_seconds"`
	BytesSent      uint64  `json:"bytes_sent"` // by the pod, acknowledged
	BytesReceived  uint64  `json:"bytes_received"`
	Retransmits    uint32  `json:"retransmits"`
	// The flags sit beside Retransmits, where the padding was: a follower
	// buffers 256 flows in 64 KiB.
	ViaSidecar bool `json:"via_sidecar"`
	// KernelOnly is a captured flow that policy carries with no sidecar
	// (--kernel-only-*): measured, and routed, in the kernel alone.
	KernelOnly bool `json:"kernel_only,omitempty"`

	// service is the destination_service label the flow counts under,
	// peer the workload at its other end.
	service string
	peer    *Identity
}

// series is the layer-4 counters' series the flow counts in.
func (f Flow) series() labelKey { return labelKey{f.Direction, f.service, f.peer} }

// Flow states.
const (
	StateOpen   = "open"
	StateClosed = "closed"
	StateFailed = "failed"
)

// Directions.
const (
	Outbound = "outbound"
	Inbound  = "inbound"
)

// clock turns the kernel's boot-time nanoseconds into wall-clock time.
type clock struct{ boot time.Time }

func newClock() clock {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_BOOTTIME, &ts); err != nil {
		return clock{boot: time.Now()}
	}
	return clock{boot: time.Now().Add(-time.Duration(ts.Nano()))}
}

func (c clock) at(ns uint64) time.Time { return c.boot.Add(time.Duration(ns)) }

// flowOf is the flow one event reports.
func flowOf(ev podstate.FlowEvent, c clock) Flow {
	f := Flow{
		Cookie:         ev.Cookie,
		ViaSidecar:     ev.ViaSidecar,
		KernelOnly:     ev.KernelOnly,
		OriginalDst:    ev.OriginalDst,
		Start:          c.at(ev.StartNs),
		ConnectLatency: seconds(ev.ConnectLatency),
		SRTT:           seconds(ev.SRTT),
		MinRTT:         seconds(ev.MinRTT),
		BytesSent:      ev.BytesSent,
		BytesReceived:  ev.BytesReceived,
		Retransmits:    ev.Retransmits,
		End:            ev.End,
	}
	if ev.Inbound {
		f.Direction, f.Source, f.Destination = Inbound, ev.Remote, ev.Local
	} else {
		f.Direction, f.Source, f.Destination = Outbound, ev.Local, ev.Remote
	}
	switch ev.Kind {
	case podstate.FlowOpened:
		f.State = StateOpen
	case podstate.FlowClosed:
		f.State = StateClosed
	default:
		f.State = StateFailed
	}
	if ev.EndNs != 0 {
		f.Duration = c.at(ev.EndNs).Sub(f.Start).Seconds()
	}
	return f
}

// seconds is d, of the kernel's microsecond grain, in seconds.
func seconds(d time.Duration) float64 { return float64(d.Microseconds()) / 1e6 }

func micros(us uint32) float64 { return float64(us) / 1e6 }
