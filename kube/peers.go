package kube

import (
	"cmp"
	"net/netip"
	"strings"

	"github.com/sluicemesh/sluice/gamma"
	"github.com/sluicemesh/sluice/telemetry"
)

// Pod is a core/v1 Pod, with what names its workload.
type Pod struct {
	Metadata struct {
		gamma.Meta
		OwnerReferences []struct {
			Kind       string `json:"kind"`
			Name       string `json:"name"`
			Controller *bool  `json:"controller,omitempty"`
		} `json:"ownerReferences,omitempty"`
	} `json:"metadata"`
	Spec struct {
		ServiceAccountName string `json:"serviceAccountName,omitempty"`
		HostNetwork        bool   `json:"hostNetwork,omitempty"`
	} `json:"spec"`
	Status struct {
		PodIPs []struct {
			IP string `json:"ip"`
		} `json:"podIPs,omitempty"`
	} `json:"status"`
}

// Identity is who the pod is, as Istio's telemetry names a workload: its
// controller (a Deployment's name, not its ReplicaSet's), namespace, app
// and version labels, and its service account as a SPIFFE principal.
func (p *Pod) Identity() telemetry.Identity {
	m := p.Metadata
	workload := m.Name
	for _, o := range m.OwnerReferences {
		if o.Controller == nil || !*o.Controller {
			continue
		}
		workload = o.Name
		if hash := m.Labels["pod-template-hash"]; o.Kind == "ReplicaSet" && hash != "" {
			workload = strings.TrimSuffix(o.Name, "-"+hash)
		}
	}
	app := cmp.Or(m.Labels["app.kubernetes.io/name"], m.Labels["app"])
	id := telemetry.Identity{
		Workload:          workload,
		Namespace:         m.Namespace,
		App:               app,
		Version:           cmp.Or(m.Labels["app.kubernetes.io/version"], m.Labels["version"]),
		CanonicalService:  cmp.Or(m.Labels["service.istio.io/canonical-name"], app, workload),
		CanonicalRevision: cmp.Or(m.Labels["service.istio.io/canonical-revision"], m.Labels["app.kubernetes.io/version"], m.Labels["version"], "latest"),
	}
	if sa := cmp.Or(p.Spec.ServiceAccountName, "default"); m.Namespace != "" {
		id.Principal = "spiffe://cluster.local/ns/" + m.Namespace + "/sa/" + sa
	}
	return id
}

// addrs are the pod's own IPs: none for a pod on the node's network,
// whose address is every such pod's and the node's.
func (p *Pod) addrs() []netip.Addr {
	if p.Spec.HostNetwork {
		return nil
	}
	var out []netip.Addr
	for _, ip := range p.Status.PodIPs {
		if a, err := netip.ParseAddr(ip.IP); err == nil {
			out = append(out, a.Unmap())
		}
	}
	return out
}

// indexPod keeps the address index as a pod changes (old or new nil when
// it was added or deleted).
func (w *Watcher) indexPod(old, new *Pod) {
	if old != nil {
		for _, a := range old.addrs() {
			if w.peers[a].pod == old {
				delete(w.peers, a)
			}
		}
	}
	if new != nil {
		id := new.Identity() // once here, not at every flow event
		for _, a := range new.addrs() {
			w.peers[a] = peer{new, id}
		}
	}
}

// Peer is the workload of the pod at addr, for the flow exporters.
func (w *Watcher) Peer(addr netip.Addr) (telemetry.Identity, bool) {
	w.mu.Lock()
	p, ok := w.peers[addr.Unmap()]
	w.mu.Unlock()
	return p.id, ok
}

// peer is a pod at an address, and who it is.
type peer struct {
	pod *Pod
	id  telemetry.Identity
}
