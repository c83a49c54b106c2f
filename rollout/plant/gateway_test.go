package plant

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/sluicemesh/sluice/internal/kubetest"
	"github.com/sluicemesh/sluice/kube"
	"github.com/sluicemesh/sluice/rollout"
)

const routePath = "/apis/gateway.networking.k8s.io/v1/namespaces/shop/httproutes/web"

// cluster is a fake API server holding one HTTPRoute (patched with merge
// patches, refused on a stale resourceVersion), the backends'
// EndpointSlices, and a fake Prometheus whose connect series grow with the
// route's weights at every query: ten connects a query, split by weight.
type cluster struct {
	mu        sync.Mutex
	route     map[string]any
	rv        int
	conflicts int // PATCHes still to refuse with 409
	patches   []string
	failing   string // backend whose connects all fail
	resetAt   int    // the count query after which every counter starts over (an agent restarted); 0: never
	counts    int
	// per endpoint: established, latency sum, failed
	est, lat, fail map[string]float64
}

// endpoint is where each backend Service's pod is.
var endpoint = map[string]string{"web-v1": "198.18.5.1:8080", "web-v2": "198.18.5.2:8080"}

func newGatewayCluster(v1, v2 int) *cluster {
	var route map[string]any
	if err := json.Unmarshal([]byte(fmt.Sprintf(`{"kind":"HTTPRoute","metadata":{"namespace":"shop","name":"web","resourceVersion":"1","annotations":{"team":"shop"}},
		"spec":{"parentRefs":[{"group":"","kind":"Service","name":"web"}],
		"rules":[{"matches":[{"path":{"type":"PathPrefix","value":"/"}}],"backendRefs":[{"name":"web-v1","port":80,"weight":%d},{"name":"web-v2","port":80,"weight":%d}]}]}}`, v1, v2)), &route); err != nil {
		panic(err)
	}
	return &cluster{route: route, rv: 1, est: map[string]float64{}, lat: map[string]float64{}, fail: map[string]float64{}}
}

func (c *cluster) weights() (v1, v2 float64) {
	refs := c.route["spec"].(map[string]any)["rules"].([]any)[0].(map[string]any)["backendRefs"].([]any)
	return refs[0].(map[string]any)["weight"].(float64), refs[1].(map[string]any)["weight"].(float64)
}

func (c *cluster) annotations() map[string]any {
	return c.route["metadata"].(map[string]any)["annotations"].(map[string]any)
}

func (c *cluster) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	c.mu.Lock()
	defer c.mu.Unlock()
	switch {
	case r.URL.Path == routePath && r.Method == http.MethodGet:
		json.NewEncoder(w).Encode(c.route)
	case r.URL.Path == routePath && r.Method == http.MethodPatch:
		if r.Header.Get("Content-Type") != "application/merge-patch+json" {
			http.Error(w, "want a merge patch", http.StatusUnsupportedMediaType)
			return
		}
		body, _ := io.ReadAll(r.Body)
		var patch struct {
			Metadata struct {
				ResourceVersion string         `json:"resourceVersion"`
				Annotations     map[string]any `json:"annotations"`
			} `json:"metadata"`
			Spec struct {
				Rules []any `json:"rules"`
			} `json:"spec"`
		}
		json.Unmarshal(body, &patch)
		if c.conflicts > 0 || patch.Metadata.ResourceVersion != strconv.Itoa(c.rv) {
			c.conflicts--
			c.rv++ // someone else's change
			c.route["metadata"].(map[string]any)["resourceVersion"] = strconv.Itoa(c.rv)
			w.WriteHeader(http.StatusConflict)
			fmt.Fprint(w, `{"message":"the object has been modified"}`)
			return
		}
		for k, v := range patch.Metadata.Annotations {
			if v == nil {
				delete(c.annotations(), k)
			} else {
				c.annotations()[k] = v
			}
		}
		c.route["spec"].(map[string]any)["rules"] = patch.Spec.Rules
		c.rv++
		c.route["metadata"].(map[string]any)["resourceVersion"] = strconv.Itoa(c.rv)
		v1, v2 := c.weights()
		c.patches = append(c.patches, fmt.Sprintf("%v/%v", v1, v2))
	case r.URL.Path == "/apis/discovery.k8s.io/v1/namespaces/shop/endpointslices":
		svc := strings.TrimPrefix(r.URL.Query().Get("labelSelector"), "kubernetes.io/service-name=")
		addr, port, _ := strings.Cut(endpoint[svc], ":")
		fmt.Fprintf(w, `{"items":[{"metadata":{"name":"%s-1","labels":{"kubernetes.io/service-name":%q}},"ports":[{"name":"http","port":%s}],"endpoints":[{"addresses":[%q]}]}]}`, svc, svc, port, addr)
	case r.URL.Path == "/api/v1/query":
		q := r.URL.Query().Get("query")
		var series map[string]float64
		switch {
		case strings.Contains(q, "_count"):
			if c.counts++; c.counts == c.resetAt {
				c.est, c.lat, c.fail = map[string]float64{}, map[string]float64{}, map[string]float64{}
			}
			// Traffic since the last query: ten connects by weight.
			v1, v2 := c.weights()
			for svc, w := range map[string]float64{"web-v1": v1, "web-v2": v2} {
				n := 10 * w / (v1 + v2)
				if svc == c.failing {
					c.fail[endpoint[svc]] += n
					continue
				}
				c.est[endpoint[svc]] += n
				c.lat[endpoint[svc]] += n * 0.001
			}
			series = c.est
		case strings.Contains(q, "_sum"):
			series = c.lat
		case strings.Contains(q, "failures"):
			series = c.fail
		}
		var result []string
		for ep, v := range series {
			result = append(result, fmt.Sprintf(`{"metric":{"destination_service":%q},"value":[1,"%g"]}`, ep, v))
		}
		// Another destination, and the outside world: no backend's.
		result = append(result, `{"metric":{"destination_service":"198.18.9.9:443"},"value":[1,"50"]}`, `{"metric":{"destination_service":"other"},"value":[1,"7"]}`)
		fmt.Fprintf(w, `{"status":"success","data":{"resultType":"vector","result":[%s]}}`, strings.Join(result, ","))
	default:
		http.NotFound(w, r)
	}
}

func gatewayRollout(t *testing.T, c *cluster) error {
	t.Helper()
	srv := httptest.NewTLSServer(c)
	defer srv.Close()
	api, err := kube.FromKubeconfig(kubetest.Kubeconfig(t, srv))
	if err != nil {
		t.Fatal(err)
	}
	p, err := NewGateway(context.Background(), api, srv.URL, "httproute", "shop", "web", "web-v2")
	if err != nil {
		t.Fatal(err)
	}
	p.promHTTP = srv.Client() // the fake Prometheus is the same TLS server
	cfg := rollout.Config{Service: "httproute shop/web", Canary: "web-v2", Step: 25, Interval: time.Millisecond, MaxFailureRatio: 0.05, MaxLatency: time.Second, MinConnects: 1}
	return rollout.Run(context.Background(), cfg, p, slog.New(slog.NewTextHandler(io.Discard, nil)))
}

// A healthy canary: the HTTPRoute is patched 25 points a step to 0/100,
// every patch keeping the route's other fields, after a patch refused as
// stale is read again; the step annotation says where it is. The agents'
// counters starting over mid-way (a restart) fail no step.
func TestGatewayRolloutPatchesTheRoute(t *testing.T) {
	c := newGatewayCluster(100, 0)
	c.conflicts = 1
	c.resetAt = 3
	if err := gatewayRollout(t, c); err != nil {
		t.Fatal(err)
	}
	if got := strings.Join(c.patches, " "); got != "75/25 50/50 25/75 0/100 0/100" {
		t.Errorf("patches %s, want 75/25 50/50 25/75 0/100, then 0/100 done", got)
	}
	ann := c.annotations()
	if ann["team"] != "shop" || ann[AnnotationRolloutStep] != "0" || ann[AnnotationRolloutRollback] != nil {
		t.Errorf("annotations %v: want the route's own kept, step 0 (done), no rollback", ann)
	}
	rule := c.route["spec"].(map[string]any)["rules"].([]any)[0].(map[string]any)
	if _, ok := rule["matches"]; !ok || rule["backendRefs"].([]any)[0].(map[string]any)["port"] != float64(80) {
		t.Errorf("the patched rule lost fields: %v", rule)
	}
}

// A canary whose connects fail: rolled back to 100/0 at the first step,
// the reason on the route.
func TestGatewayRolloutRollsBack(t *testing.T) {
	c := newGatewayCluster(100, 0)
	c.failing = "web-v2"
	err := gatewayRollout(t, c)
	if !errors.Is(err, rollout.ErrRolledBack) {
		t.Fatalf("rollout = %v, want rolled back", err)
	}
	if got := strings.Join(c.patches, " "); got != "75/25 100/0" {
		t.Errorf("patches %s, want 75/25 then back to 100/0", got)
	}
	if ann := c.annotations(); ann[AnnotationRolloutRollback] != rollout.ReasonFailures || ann[AnnotationRolloutStep] != "0" {
		t.Errorf("annotations %v: want rollback %s", ann, rollout.ReasonFailures)
	}
}

// A route without the canary among its backends, or with two rules, is
// refused before anything is patched, saying what to do.
func TestGatewayRolloutRefusesRoutesItCannotMove(t *testing.T) {
	c := newGatewayCluster(100, 0)
	c.route["spec"].(map[string]any)["rules"].([]any)[0].(map[string]any)["backendRefs"] = []any{map[string]any{"name": "web-v1", "port": 80}}
	if err := gatewayRollout(t, c); err == nil || !strings.Contains(err.Error(), "no backend web-v2: add it with weight 0") {
		t.Errorf("rollout to a backend the route lacks = %v", err)
	}
	c.route["spec"].(map[string]any)["rules"] = []any{map[string]any{}, map[string]any{}}
	if err := gatewayRollout(t, c); err == nil || !strings.Contains(err.Error(), "2 rules") {
		t.Errorf("rollout of a two-rule route = %v", err)
	}
	if len(c.patches) != 0 {
		t.Errorf("patched %v", c.patches)
	}
}
