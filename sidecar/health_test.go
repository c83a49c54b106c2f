package sidecar

import (
	"errors"
	"net/http"
	"net/http/httptest"
	"testing"

	"github.com/sluicemesh/sluice/loader"
)

// /ready follows the pod's capture when the sidecar started with one; a
// sidecar with none (iptables REDIRECT) is ready on its listeners; /healthz
// is 200 while it serves.
func TestHealthEndpoints(t *testing.T) {
	answers := func() (loader.SidecarPlan, error) { return loader.SidecarPlan{}, nil }
	gone := func() (loader.SidecarPlan, error) { return loader.SidecarPlan{}, errors.New("protocol not available") }
	for _, c := range []struct {
		name  string
		h     health
		ready int
	}{
		{"capture answers", health{hooks: true, ask: answers}, http.StatusOK},
		{"capture removed", health{hooks: true, ask: gone}, http.StatusServiceUnavailable},
		{"no capture at start", health{hooks: false, ask: gone}, http.StatusOK},
	} {
		mux := http.NewServeMux()
		c.h.register(mux)
		for path, want := range map[string]int{"/ready": c.ready, "/healthz": http.StatusOK} {
			rec := httptest.NewRecorder()
			mux.ServeHTTP(rec, httptest.NewRequest("GET", path, nil))
			if rec.Code != want {
				t.Errorf("%s: GET %s = %d %q, want %d", c.name, path, rec.Code, rec.Body, want)
			}
		}
	}
}
