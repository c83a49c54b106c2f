package sidecar

import (
	"fmt"
	"net/http"

	"github.com/sluicemesh/sluice/loader"
)

// health answers the kubelet's probes on the metrics port. The sidecar
// binds its listeners before it serves them, so while it serves:
//   - /healthz (liveness) is 200: a failed proxy listener ends the process
//     instead, so there is nothing a restart would mend that it can see;
//   - /ready is 200 when the pod's capture answers too: the pod's hooks
//     give its plan (a socket option, as at start), so a pod whose capture
//     was removed under the sidecar leaves the Service's endpoints. A
//     sidecar that started with no install answering (behind iptables
//     REDIRECT, or an older Sluice's pins) is ready on its listeners alone,
//     unless run with --require-capture (sluice inject --cni gives it):
//     a pod the CNI plugin did not capture then never becomes ready, and
//     its app, behind the sidecar's startup probe, never starts.
//
// Neither is served once the sidecar drains: the metrics server stops
// with the proxy's listeners.
type health struct {
	hooks bool                               // the pod's hooks answered at start, or must
	ask   func() (loader.SidecarPlan, error) // loader.AskPlan
}

func (h health) register(mux *http.ServeMux) {
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) {
		fmt.Fprintln(w, "ok")
	})
	mux.HandleFunc("/ready", func(w http.ResponseWriter, _ *http.Request) {
		if h.hooks {
			if _, err := h.ask(); err != nil {
				http.Error(w, "not ready: the pod's capture does not answer (was it uninstalled? 'sluice status' on the node says): "+err.Error(), http.StatusServiceUnavailable)
				return
			}
		}
		fmt.Fprintln(w, "ready")
	})
}
