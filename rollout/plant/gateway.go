package plant

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"net/http"
	"net/netip"
	"net/url"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/sluicemesh/sluice/gamma"
	"github.com/sluicemesh/sluice/kube"
	"github.com/sluicemesh/sluice/rollout"
	"github.com/sluicemesh/sluice/telemetry"
)

// Annotations a rollout leaves on the route it moves, for kubectl and
// dashboards (the route's status belongs to its controllers).
const (
	AnnotationRolloutStep     = "rollout.sluice.dev/step"
	AnnotationRolloutRollback = "rollout.sluice.dev/rollback"
)

// Gateway is the rollout's plant in the cluster: a Gateway API route
// (HTTPRoute or TCPRoute) whose backend Services' weights the rollout
// patches, every node's agent carrying them into its pods' kernels, and the
// connects to the Services' endpoints from every captured pod, as the
// agents export them, summed by Prometheus. Backends are the route's
// backend Services, by name.
type Gateway struct {
	ctx      context.Context
	api      *kube.Client
	prom     string // Prometheus' base URL
	promHTTP *http.Client
	path     string // the route's API path
	ns       string
	canary   string
	// owner is which backend Service each endpoint (ADDRESS:PORT) is in,
	// or was last seen in.
	owner map[string]string
	// last is each series' value when last read, by query and labels;
	// total what every series added since, by backend Service: a series
	// that went (a client pod gone) keeps what it added, one that went
	// back (its agent restarted) adds from 0 again.
	last  map[string]float64
	total map[string]rollout.Sample
}

var _ rollout.Plant = (*Gateway)(nil)

// Route kinds a Gateway plant moves, by the name the command line gives.
var gatewayKinds = map[string]string{"httproute": "httproutes", "tcproute": "tcproutes"}

// NewGateway is the plant of a rollout of the route kind (httproute or
// tcproute) namespace/name towards its backend Service canary, measured by
// the Prometheus at prometheus.
func NewGateway(ctx context.Context, api *kube.Client, prometheus, kind, namespace, name, canary string) (*Gateway, error) {
	res, ok := gatewayKinds[kind]
	if !ok {
		return nil, fmt.Errorf("route kind %q: want httproute or tcproute", kind)
	}
	return &Gateway{ctx: ctx, api: api, prom: prometheus, promHTTP: http.DefaultClient, ns: namespace, canary: canary,
		path:  fmt.Sprintf("/apis/gateway.networking.k8s.io/v1/namespaces/%s/%s/%s", url.PathEscape(namespace), res, url.PathEscape(name)),
		owner: map[string]string{}, last: map[string]float64{}, total: map[string]rollout.Sample{}}, nil
}

// rule reads the route and checks it is one a rollout can move: one rule,
// whose backends are Services of the route's namespace, the canary among
// them.
func (g *Gateway) rule() (gamma.Route, error) {
	var r gamma.Route
	if err := g.api.Get(g.ctx, g.path, nil, &r); err != nil {
		if errors.Is(err, kube.ErrNotFound) {
			return r, fmt.Errorf("no such route (%s): check the kind, namespace and name", g.path)
		}
		return r, err
	}
	if len(r.Spec.Rules) != 1 {
		return r, fmt.Errorf("%s has %d rules: a rollout moves the weights of a route with one", g.path, len(r.Spec.Rules))
	}
	found := false
	for _, b := range r.Spec.Rules[0].BackendRefs {
		if ptrOr(b.Group, "") != "" || ptrOr(b.Kind, "Service") != "Service" || ptrOr(b.Namespace, g.ns) != g.ns {
			return r, fmt.Errorf("%s: backend %s is not a Service of namespace %s", g.path, b.Name, g.ns)
		}
		found = found || b.Name == g.canary
	}
	if !found {
		return r, fmt.Errorf("%s has no backend %s: add it with weight 0 (backendRefs: {name: %s, port: ..., weight: 0}) first", g.path, g.canary, g.canary)
	}
	return r, nil
}

// Backends is the route's backend Services and their weights.
func (g *Gateway) Backends() (map[string]uint32, error) {
	r, err := g.rule()
	if err != nil {
		return nil, err
	}
	out := map[string]uint32{}
	for _, b := range r.Spec.Rules[0].BackendRefs {
		out[b.Name] = uint32(max(0, ptrOr(b.Weight, 1)))
	}
	return out, nil
}

// SetWeights patches the two backends' weights, and the step and rollback
// annotations, in one update of the route as it was read (a change made
// meanwhile by someone else is read again, not overwritten).
func (g *Gateway) SetWeights(stable, canary string, sw, cw, step uint32, rollback string) error {
	for try := 0; ; try++ {
		var obj struct {
			Metadata struct {
				ResourceVersion string `json:"resourceVersion"`
			} `json:"metadata"`
			Spec struct {
				Rules []map[string]json.RawMessage `json:"rules"`
			} `json:"spec"`
		}
		if err := g.api.Get(g.ctx, g.path, nil, &obj); err != nil {
			return err
		}
		if len(obj.Spec.Rules) != 1 {
			return fmt.Errorf("%s has %d rules now: a rollout moves the weights of a route with one", g.path, len(obj.Spec.Rules))
		}
		// The rule is written back whole (a merge patch replaces a
		// list), each backend as it was but for its weight.
		var refs []map[string]any
		if err := json.Unmarshal(obj.Spec.Rules[0]["backendRefs"], &refs); err != nil {
			return fmt.Errorf("%s: backendRefs: %w", g.path, err)
		}
		for _, ref := range refs {
			switch ref["name"] {
			case stable:
				ref["weight"] = sw
			case canary:
				ref["weight"] = cw
			}
		}
		data, err := json.Marshal(refs)
		if err != nil {
			return err
		}
		obj.Spec.Rules[0]["backendRefs"] = data
		ann := map[string]any{AnnotationRolloutStep: strconv.Itoa(int(step)), AnnotationRolloutRollback: nil}
		if rollback != "" {
			ann[AnnotationRolloutRollback] = rollback
		}
		patch := map[string]any{
			"metadata": map[string]any{"resourceVersion": obj.Metadata.ResourceVersion, "annotations": ann},
			"spec":     map[string]any{"rules": obj.Spec.Rules},
		}
		err = g.api.MergePatch(g.ctx, g.path, patch)
		if errors.Is(err, kube.ErrConflict) && try < 5 {
			continue
		}
		return err
	}
}

// Measure is every backend Service's connects so far, from every captured
// pod: the agents' per-destination series in Prometheus, each endpoint's
// counted for the Service it is (or was last) in.
func (g *Gateway) Measure() (map[string]rollout.Sample, error) {
	r, err := g.rule()
	if err != nil {
		return nil, err
	}
	for _, b := range r.Spec.Rules[0].BackendRefs {
		var list struct {
			Items []gamma.EndpointSlice `json:"items"`
		}
		q := url.Values{"labelSelector": {gamma.LabelServiceName + "=" + b.Name}}
		if err := g.api.Get(g.ctx, fmt.Sprintf("/apis/discovery.k8s.io/v1/namespaces/%s/endpointslices", url.PathEscape(g.ns)), q, &list); err != nil {
			return nil, err
		}
		for _, s := range list.Items {
			for _, p := range s.Ports {
				for _, ep := range s.Endpoints {
					for _, a := range ep.Addresses {
						if addr, err := netip.ParseAddr(a); err == nil && p.Port != nil {
							g.owner[netip.AddrPortFrom(addr, uint16(*p.Port)).String()] = b.Name
						}
					}
				}
			}
		}
	}
	eps := make([]string, 0, len(g.owner))
	for ep := range g.owner {
		eps = append(eps, regexp.QuoteMeta(ep))
	}
	slices.Sort(eps)
	selector := fmt.Sprintf(`{%s=~%q}`, telemetry.LabelDestinationService, strings.Join(eps, "|"))
	for _, m := range []struct {
		metric string
		add    func(*rollout.Sample, float64)
	}{
		{telemetry.MetricDestinationConnectDuration + "_count", func(s *rollout.Sample, v float64) { s.Established += uint64(v) }},
		{telemetry.MetricDestinationConnectDuration + "_sum", func(s *rollout.Sample, v float64) { s.LatencySum += v }},
		{telemetry.MetricDestinationConnectFailures, func(s *rollout.Sample, v float64) { s.Failed += uint64(v) }},
	} {
		series, err := g.query(m.metric + selector)
		if err != nil {
			return nil, err
		}
		for _, se := range series {
			svc, ours := g.owner[se.endpoint]
			if !ours {
				continue
			}
			key := m.metric + se.labels
			added := se.value - g.last[key]
			if se.value < g.last[key] {
				added = se.value // a counter started over
			}
			g.last[key] = se.value
			t := g.total[svc]
			m.add(&t, added)
			g.total[svc] = t
		}
	}
	return maps.Clone(g.total), nil
}

// series is one series of an instant query's answer.
type series struct {
	labels   string // every label, sorted: the series' identity
	endpoint string // its destination_service
	value    float64
}

// query runs an instant query and returns its series. A Prometheus that
// does not answer is asked again, three times a second apart: an error
// here ends the rollout with the weights where they are, mid-way.
func (g *Gateway) query(q string) (out []series, err error) {
	for try := 0; try < 3; try++ {
		if try > 0 {
			select {
			case <-g.ctx.Done():
				return nil, g.ctx.Err()
			case <-time.After(time.Second):
			}
		}
		if out, err = g.queryOnce(q); err == nil {
			return out, nil
		}
	}
	return nil, err
}

func (g *Gateway) queryOnce(q string) ([]series, error) {
	ctx, cancel := context.WithTimeout(g.ctx, 30*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, g.prom+"/api/v1/query?"+url.Values{"query": {q}}.Encode(), nil)
	if err != nil {
		return nil, err
	}
	resp, err := g.promHTTP.Do(req)
	if err != nil {
		return nil, fmt.Errorf("query Prometheus at %s (see --prometheus): %w", g.prom, err)
	}
	defer resp.Body.Close()
	var answer struct {
		Status string `json:"status"`
		Error  string `json:"error"`
		Data   struct {
			Result []struct {
				Metric map[string]string `json:"metric"`
				Value  [2]any            `json:"value"`
			} `json:"result"`
		} `json:"data"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&answer); err != nil {
		return nil, fmt.Errorf("Prometheus at %s answered %s with no query result (see --prometheus): %v", g.prom, resp.Status, err)
	}
	if answer.Status != "success" {
		return nil, fmt.Errorf("Prometheus at %s: %s: %s", g.prom, q, cmp.Or(answer.Error, resp.Status))
	}
	var out []series
	for _, r := range answer.Data.Result {
		s, _ := r.Value[1].(string)
		v, err := strconv.ParseFloat(s, 64)
		if err != nil {
			return nil, fmt.Errorf("Prometheus at %s: %s: value %v", g.prom, q, r.Value[1])
		}
		names := slices.Sorted(maps.Keys(r.Metric))
		var id strings.Builder
		for _, n := range names {
			fmt.Fprintf(&id, "%s=%q,", n, r.Metric[n])
		}
		out = append(out, series{labels: id.String(), endpoint: r.Metric[telemetry.LabelDestinationService], value: v})
	}
	return out, nil
}

func ptrOr[T any](p *T, or T) T {
	if p != nil {
		return *p
	}
	return or
}
