// Package podstate is what the kernel keeps for a pod as plain Go values:
// the flow events its hooks send and the routes in force. The loader
// decodes the kernel's structs into them at the boundary, so readers such
// as telemetry depend on neither the BPF bindings nor the loader.
package podstate

import (
	"net/netip"
	"time"

	"github.com/sluicemesh/sluice/redirect"
)

// FlowKind is what a flow event reports.
type FlowKind uint8

const (
	FlowOpened        FlowKind = iota + 1 // the connection is established
	FlowClosed                            // it closed after being established
	FlowConnectFailed                     // it never got established
)

// How a flow ended, as FlowEvent.End says it.
const (
	EndFin     = "fin"
	EndRst     = "rst"
	EndTimeout = "timeout"
	EndRefused = "refused"
)

// FlowEvent is one event of a flow, seen from the socket that carries it on
// the wire.
type FlowEvent struct {
	Cookie     uint64 // the socket's
	Kind       FlowKind
	Inbound    bool // accepted by the pod; otherwise it dialed out
	ViaSidecar bool
	KernelOnly bool // captured, carried with no sidecar
	Local      netip.AddrPort
	Remote     netip.AddrPort
	// OriginalDst is where the connection was going before capture.
	OriginalDst netip.AddrPort
	// StartNs and EndNs are CLOCK_BOOTTIME nanoseconds; EndNs is 0 while
	// the flow is open.
	StartNs, EndNs uint64
	// ConnectLatency, SRTT and MinRTT have the kernel's microsecond grain.
	ConnectLatency time.Duration
	SRTT           time.Duration
	MinRTT         time.Duration
	BytesSent      uint64 // by the pod, acknowledged
	BytesReceived  uint64
	Retransmits    uint32
	End            string // EndFin, EndRst, EndTimeout, EndRefused; "" while open
}

// RouteState is a route in force, with what the kernel counted for it.
type RouteState struct {
	redirect.Route
	// Picks are the connections each backend was picked for, in the
	// order of Backends; they survive rewrites of the route.
	Picks      []uint64 `json:"picks"`
	Generation uint32   `json:"generation"`
	// Rollout is what `sluice route rollout` recorded: the canary's weight
	// in percent while one runs, rollbacks so far and the last one's reason.
	RolloutStep  uint32 `json:"rollout_step,omitempty"`
	Rollbacks    uint32 `json:"rollbacks,omitempty"`
	LastRollback string `json:"last_rollback,omitempty"`
}
