package telemetry

import (
	"cmp"
	"os"
)

// Identity is who the pod is, for the source side of outbound flows and the
// destination side of inbound ones. Empty fields are reported as "unknown",
// never left out: Kiali drops series that lack a label.
type Identity struct {
	Workload          string
	Namespace         string
	Principal         string
	App               string
	Version           string
	CanonicalService  string
	CanonicalRevision string
	Cluster           string
}

// IdentityFromEnv reads what the Kubernetes downward API (or Istio's
// injector) puts in the environment of the pod's install. SLUICE_* variables win.
func IdentityFromEnv() Identity {
	first := func(names ...string) string {
		for _, n := range names {
			if v := os.Getenv(n); v != "" {
				return v
			}
		}
		return ""
	}
	id := Identity{
		Workload:          first("SLUICE_WORKLOAD", "ISTIO_META_WORKLOAD_NAME"),
		Namespace:         first("SLUICE_NAMESPACE", "POD_NAMESPACE"),
		Principal:         first("SLUICE_PRINCIPAL"),
		App:               first("SLUICE_APP"),
		Version:           first("SLUICE_VERSION"),
		CanonicalService:  first("SLUICE_CANONICAL_SERVICE"),
		CanonicalRevision: first("SLUICE_CANONICAL_REVISION"),
		Cluster:           first("SLUICE_CLUSTER", "ISTIO_META_CLUSTER_ID"),
	}
	return id.WithDefaults()
}

// WithDefaults fills in Istio's own defaults: the canonical service falls
// back to the app (then the workload), the canonical revision to the
// version.
func (id Identity) WithDefaults() Identity {
	if id.CanonicalService == "" {
		id.CanonicalService = cmp.Or(id.App, id.Workload)
	}
	if id.CanonicalRevision == "" {
		id.CanonicalRevision = id.Version
	}
	return id
}

const unknown = "unknown"

func orUnknown(s string) string {
	if s == "" {
		return unknown
	}
	return s
}

// istioLabels is Istio's full layer-4 label set, in its order.
var istioLabels = []string{
	"reporter",
	"source_workload", "source_workload_namespace", "source_principal", "source_app", "source_version",
	"source_canonical_service", "source_canonical_revision", "source_cluster",
	"destination_workload", "destination_workload_namespace", "destination_principal", "destination_app", "destination_version",
	"destination_service", "destination_service_name", "destination_service_namespace",
	"destination_canonical_service", "destination_canonical_revision", "destination_cluster",
	"request_protocol", "response_flags", "connection_security_policy",
}

// side is one end's label values, in istioLabels' order for a side.
func (id Identity) side() []string {
	return []string{orUnknown(id.Workload), orUnknown(id.Namespace), orUnknown(id.Principal), orUnknown(id.App),
		orUnknown(id.Version), orUnknown(id.CanonicalService), orUnknown(id.CanonicalRevision), orUnknown(id.Cluster)}
}

// labelValues gives a flow's Istio labels. Outbound flows are reported by
// the source (this pod); inbound ones by the destination (this pod); the
// other side is peer, the workload at the other end when the agent knows
// it from the cluster, else unknown (the outside world).
// service is the destination as Sluice knows it: the original destination's
// address and port, or "other" beyond the cardinality limit.
func (id Identity) labelValues(direction, service string, peer Identity) []string {
	src, dst, reporter := id.side(), peer.side(), "source"
	if direction == Inbound {
		src, dst, reporter = peer.side(), id.side(), "destination"
	}
	v := make([]string, 0, len(istioLabels))
	v = append(v, reporter)
	v = append(v, src...)
	v = append(v, dst[:5]...) // workload, namespace, principal, app, version
	v = append(v, service, service, dst[1])
	v = append(v, dst[5:]...) // canonical service, revision, cluster
	return append(v, "tcp", "-", "none")
}

// identityKeys name Identity's fields in Map and IdentityFromMap.
const (
	keyWorkload          = "workload"
	keyNamespace         = "namespace"
	keyPrincipal         = "principal"
	keyApp               = "app"
	keyVersion           = "version"
	keyCanonicalService  = "canonical_service"
	keyCanonicalRevision = "canonical_revision"
	keyCluster           = "cluster"
)

// Map is id as install records it for the node's agent: its set fields.
func (id Identity) Map() map[string]string {
	m := map[string]string{}
	for k, v := range map[string]string{keyWorkload: id.Workload, keyNamespace: id.Namespace, keyPrincipal: id.Principal, keyApp: id.App,
		keyVersion: id.Version, keyCanonicalService: id.CanonicalService, keyCanonicalRevision: id.CanonicalRevision, keyCluster: id.Cluster} {
		if v != "" {
			m[k] = v
		}
	}
	return m
}

// IdentityFromMap reads what Map wrote.
func IdentityFromMap(m map[string]string) Identity {
	return Identity{Workload: m[keyWorkload], Namespace: m[keyNamespace], Principal: m[keyPrincipal], App: m[keyApp],
		Version: m[keyVersion], CanonicalService: m[keyCanonicalService], CanonicalRevision: m[keyCanonicalRevision], Cluster: m[keyCluster]}
}
