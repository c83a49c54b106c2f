package plant

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"testing"

	"github.com/sluicemesh/sluice/internal/testbed"
	"github.com/sluicemesh/sluice/loader"
	"github.com/sluicemesh/sluice/redirect"
)

var quiet = slog.New(slog.NewTextHandler(io.Discard, nil))

// installedPod is a throwaway pod with Sluice installed, its pins under a
// root of the test's own.
func installedPod(t *testing.T) loader.Target {
	t.Helper()
	testbed.RequirePrivileged(t)
	bed := testbed.Must(t)
	root := filepath.Join(loader.DefaultPinRoot+"-plant-test", fmt.Sprint(os.Getpid()))
	t.Cleanup(func() { os.RemoveAll(filepath.Dir(root)) })
	plan, err := redirect.DefaultPolicy().Plan()
	if err != nil {
		t.Fatal(err)
	}
	pod, err := bed.AddPod("plant")
	if err != nil {
		t.Fatal(err)
	}
	tgt, err := loader.ResolveTarget(pod.Cgroup, "")
	if err != nil {
		t.Fatal(err)
	}
	tgt.PinDir = filepath.Join(root, fmt.Sprint(tgt.CgroupID))
	tgt.Netns = pod.Netns
	if _, err := loader.Install(tgt, plan, nil, quiet); err != nil {
		t.Fatal(err)
	}
	// Registered after the bed: runs before the bed removes the pod.
	t.Cleanup(func() {
		if err := loader.Uninstall(tgt, quiet); err != nil && !errors.Is(err, loader.ErrNotInstalled) {
			t.Error(err)
		}
	})
	return tgt
}

// Backends reads the pod's route with the canary at 0, and SetWeights
// rewrites it in the route's own mode with the rollout's step recorded.
func TestBackendsAndSetWeightsUseThePodsRoute(t *testing.T) {
	tgt := installedPod(t)
	svc := netip.MustParseAddrPort("198.19.0.10:80")
	stable := netip.MustParseAddrPort("198.18.2.2:8080")
	canary := netip.MustParseAddrPort("198.18.3.2:8080")
	r := redirect.Route{Service: svc, Mode: redirect.ModeRoundRobin, Backends: []redirect.Backend{{Address: stable.Addr(), Port: stable.Port(), Weight: 100}}}
	if err := loader.ChangeRoutes(tgt, loader.RouteChange{Set: []redirect.Route{r}}); err != nil {
		t.Fatal(err)
	}
	p := New(tgt, svc, canary, "")
	got, err := p.Backends()
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 2 || got[stable.String()] != 100 || got[canary.String()] != 0 {
		t.Fatalf("Backends = %v, want stable 100, canary 0", got)
	}
	if err := p.SetWeights(stable.String(), canary.String(), 90, 10, 10, ""); err != nil {
		t.Fatal(err)
	}
	routes, err := loader.Routes(tgt)
	if err != nil {
		t.Fatal(err)
	}
	if len(routes) != 1 || routes[0].Mode != redirect.ModeRoundRobin || routes[0].RolloutStep != 10 || len(routes[0].Backends) != 2 ||
		routes[0].Backends[0].Weight != 90 || routes[0].Backends[1].Weight != 10 {
		t.Fatalf("after SetWeights: %+v, want %s 90/10 round-robin at step 10", routes, svc)
	}

	_, err = New(tgt, netip.MustParseAddrPort("198.19.0.11:80"), canary, "").Backends()
	if !errors.Is(err, loader.ErrNoRoute) {
		t.Fatalf("Backends of a service with no route = %v, want ErrNoRoute", err)
	}
}
