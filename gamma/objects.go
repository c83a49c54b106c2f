package gamma

import (
	"encoding/json"
	"time"
)

// The cluster's objects as the API server's JSON has them, with only the
// fields the translation reads: k8s.io/api's and Gateway API's Go types
// register their protobuf descriptors at start, which costs every Sluice
// process (sidecars, the CNI plugin) 8 MiB more resident memory.
type (
	// Meta is an object's metadata.
	Meta struct {
		Namespace         string            `json:"namespace"`
		Name              string            `json:"name"`
		UID               string            `json:"uid,omitempty"`
		Labels            map[string]string `json:"labels,omitempty"`
		CreationTimestamp time.Time         `json:"creationTimestamp"`
		ResourceVersion   string            `json:"resourceVersion,omitempty"`
	}

	// Service is a core/v1 Service.
	Service struct {
		Metadata Meta `json:"metadata"`
		Spec     struct {
			ClusterIP  string        `json:"clusterIP,omitempty"`
			ClusterIPs []string      `json:"clusterIPs,omitempty"`
			Ports      []ServicePort `json:"ports,omitempty"`
			// What kube-proxy does beyond spreading connections,
			// which resolving a Service in the kernel does not.
			SessionAffinity       string `json:"sessionAffinity,omitempty"`
			InternalTrafficPolicy string `json:"internalTrafficPolicy,omitempty"`
		} `json:"spec"`
	}
	ServicePort struct {
		Name     string `json:"name,omitempty"`
		Port     int32  `json:"port"`
		Protocol string `json:"protocol,omitempty"`
	}

	// EndpointSlice is a discovery.k8s.io/v1 EndpointSlice.
	EndpointSlice struct {
		Metadata  Meta           `json:"metadata"`
		Ports     []EndpointPort `json:"ports,omitempty"`
		Endpoints []Endpoint     `json:"endpoints,omitempty"`
	}
	EndpointPort struct {
		Name     *string `json:"name,omitempty"`
		Port     *int32  `json:"port,omitempty"`
		Protocol *string `json:"protocol,omitempty"`
	}
	Endpoint struct {
		Addresses  []string `json:"addresses"`
		Conditions struct {
			Ready       *bool `json:"ready,omitempty"`
			Terminating *bool `json:"terminating,omitempty"`
		} `json:"conditions"`
	}

	// Route is a gateway.networking.k8s.io/v1 HTTPRoute or TCPRoute: Kind
	// says which (a list's items do not carry it: the reader sets it).
	Route struct {
		Kind     string `json:"kind"`
		Metadata Meta   `json:"metadata"`
		Spec     struct {
			ParentRefs []ParentRef `json:"parentRefs,omitempty"`
			Rules      []Rule      `json:"rules,omitempty"`
		} `json:"spec"`
	}
	ParentRef struct {
		Group     *string `json:"group,omitempty"`
		Kind      *string `json:"kind,omitempty"`
		Namespace *string `json:"namespace,omitempty"`
		Name      string  `json:"name"`
		Port      *int32  `json:"port,omitempty"`
	}
	// Rule is a route's rule. What the kernel cannot do is kept raw: only
	// whether it is there matters.
	Rule struct {
		Matches            []Match           `json:"matches,omitempty"`
		Filters            []json.RawMessage `json:"filters,omitempty"`
		BackendRefs        []BackendRef      `json:"backendRefs,omitempty"`
		Timeouts           json.RawMessage   `json:"timeouts,omitempty"`
		Retry              json.RawMessage   `json:"retry,omitempty"`
		SessionPersistence json.RawMessage   `json:"sessionPersistence,omitempty"`
	}
	Match struct {
		Path *struct {
			Type  *string `json:"type,omitempty"`
			Value *string `json:"value,omitempty"`
		} `json:"path,omitempty"`
		Headers     []json.RawMessage `json:"headers,omitempty"`
		QueryParams []json.RawMessage `json:"queryParams,omitempty"`
		Method      *string           `json:"method,omitempty"`
	}
	BackendRef struct {
		Group     *string           `json:"group,omitempty"`
		Kind      *string           `json:"kind,omitempty"`
		Namespace *string           `json:"namespace,omitempty"`
		Name      string            `json:"name"`
		Port      *int32            `json:"port,omitempty"`
		Weight    *int32            `json:"weight,omitempty"`
		Filters   []json.RawMessage `json:"filters,omitempty"`
	}
)

// Route kinds.
const (
	HTTPRoute = "HTTPRoute"
	TCPRoute  = "TCPRoute"
)

// LabelServiceName on an EndpointSlice names its Service.
const LabelServiceName = "kubernetes.io/service-name"
