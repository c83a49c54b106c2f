package main

import (
	"net/netip"
	"strings"
	"testing"
	"time"
)

// Every port the sidecar must own is the proxy identity's alone: the
// metrics port (15090, and the one install is given), Istio's health ports,
// besides the capture ports. A process in the pod that took the metrics
// port while the sidecar restarted held it against every restart after.
func TestSidecarPortsReservedForProxy(t *testing.T) {
	c := newCapturedPod(t, "--metrics-port", "9099")
	reserved := []string{"0.0.0.0:15090", "[::]:15090", "127.0.0.1:15020", "[::]:15021", "0.0.0.0:9099", "[::1]:9099"}
	const ordinary = "0.0.0.0:9098"
	var bound map[string]string
	if err := runHelper(t, c.pod, helper(t, "bind", append(reserved, ordinary)...), 1000, &bound); err != nil {
		t.Fatal(err)
	}
	for _, addr := range reserved {
		if !strings.Contains(bound[addr], "operation not permitted") {
			t.Errorf("uid 1000 binding the sidecar's %s: %q, want operation not permitted", addr, bound[addr])
		}
	}
	if bound[ordinary] != "" {
		t.Errorf("uid 1000 binding an ordinary port %s: %s", ordinary, bound[ordinary])
	}
	if err := runHelper(t, c.pod, helper(t, "bind", reserved...), 1337, &bound); err != nil {
		t.Fatal(err)
	}
	for addr, err := range bound {
		if err != "" {
			t.Errorf("the proxy uid binding %s: %s", addr, err)
		}
	}
}

// A metrics port the sidecar cannot bind does not take the proxy down: it
// says at start that the port is not reserved, proxies captured connections
// while it logs why it has no metrics, and serves them once the port is
// free, counting the failures. It used to exit 1 at every restart.
func TestMetricsPortTakenKeepsProxying(t *testing.T) {
	c := newCapturedPod(t)
	// An app process: install reserved 15090, not 9099.
	squatter, err := listenInPodAs(t, c.pod, "0.0.0.0:9099", 1000)
	if err != nil {
		t.Fatal(err)
	}
	c.startSidecar(t, "--metrics-addr", ":9099")
	warn, err := c.sidecar.WaitFor("metrics port not reserved for the proxy by the install: any process in the pod may take it first", nil, 5*time.Second)
	if err != nil {
		t.Error(err)
	} else if warn.Num("metrics_port") != 9099 || !strings.Contains(warn.Str("fix"), "--metrics-port 9099") {
		t.Errorf("warning %v: want it to name port 9099 and install's --metrics-port", warn)
	}
	failed, err := c.sidecar.WaitFor("cannot listen for metrics: proxying goes on without /metrics and /flows, retrying", nil, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if failed.Str("level") != "ERROR" || failed.Str("metrics_addr") != ":9099" || !strings.Contains(failed.Str("err"), "address already in use") {
		t.Errorf("metrics failure logged as %v: want an error naming :9099 and why", failed)
	}
	addr := netip.AddrPortFrom(c.host.Addr4, 8080).String()
	c.expectProxied(t, c.client(t, addr), addr)

	squatter.Process.Kill()
	squatter.Wait()
	if _, err := c.sidecar.WaitFor("metrics listening", nil, 10*time.Second); err != nil {
		t.Fatal(err)
	}
	if n := sample(c.scrapePort(t, 9099), "sluice_metrics_listen_failures_total", nil); n < 1 {
		t.Errorf("sluice_metrics_listen_failures_total = %v after a failed bind, want at least 1", n)
	}
}
