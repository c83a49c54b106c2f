package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"time"
)

// The routes checks (10): Gateway API's CRDs installed, two versions of a
// server behind their Services and a parent Service, an HTTPRoute on the
// parent (the GAMMA pattern), and an injected client in the restricted
// namespace. The agent (--kubernetes) makes the route every captured pod's
// kernel route; patches of the weights move the split.

// gatewayCRDs applies Gateway API's standard CRDs, from the module this
// repository's tests use (sigs.k8s.io/gateway-api in go.mod).
func (k *checker) gatewayCRDs() (string, error) {
	out, err := exec.Command("go", "list", "-m", "-f", "{{.Dir}}", "sigs.k8s.io/gateway-api").Output()
	if err != nil {
		return "", fmt.Errorf("go list -m sigs.k8s.io/gateway-api: %w", err)
	}
	dir := filepath.Join(strings.TrimSpace(string(out)), "config", "crd", "standard")
	// Server-side: the CRDs are too large for the last-applied annotation.
	if _, err := k.c.kubectl(k.ctx, "apply", "--server-side", "-f", dir); err != nil {
		return "", err
	}
	if _, err := k.c.kubectl(k.ctx, "wait", "--for=condition=Established", "crd/httproutes.gateway.networking.k8s.io", "crd/tcproutes.gateway.networking.k8s.io", "--timeout", "60s"); err != nil {
		return "", err
	}
	return "standard channel from " + dir, nil
}

// versionManifest is server version v, the Deployment v (busybox httpd as
// uid 10001 serving /www/id = v, admitted by "restricted" and injected in
// shop), and its Service web-v.
func (k *checker) versionManifest(v string) string {
	return fmt.Sprintf(`apiVersion: apps/v1
kind: Deployment
metadata: {name: %[1]s, namespace: %[2]s}
spec:
  replicas: 1
  selector: {matchLabels: {app: web, version: %[1]s}}
  template:
    metadata: {labels: {app: web, version: %[1]s}}
    spec:
      terminationGracePeriodSeconds: 1
      securityContext: {runAsNonRoot: true, runAsUser: 10001, seccompProfile: {type: RuntimeDefault}}
      containers:
        - name: app
          image: %[3]s
          imagePullPolicy: Never
          command: ["/bin/sh", "-c", %[4]q]
          readinessProbe: {tcpSocket: {port: 8080}, periodSeconds: 1}
          securityContext: {allowPrivilegeEscalation: false, capabilities: {drop: ["ALL"]}}
          volumeMounts: [{name: www, mountPath: /www}]
      volumes: [{name: www, emptyDir: {}}]
---
apiVersion: v1
kind: Service
metadata: {name: web-%[1]s, namespace: %[2]s}
spec:
  selector: {app: web, version: %[1]s}
  ports: [{name: http, port: 80, targetPort: 8080}]
`, v, cniNS, k.imgs.busyboxRef, "mkdir -p /www && echo "+v+" > /www/id && exec httpd -f -p 8080 -h /www")
}

// sleeperManifest is a Deployment name in shop whose pod (app=name, with
// annotations, a YAML flow map, unless "") sleeps: a client to exec in.
func (k *checker) sleeperManifest(name, annotations string) string {
	if annotations != "" {
		annotations = "\n      annotations: " + annotations
	}
	return fmt.Sprintf(`apiVersion: apps/v1
kind: Deployment
metadata: {name: %[1]s, namespace: %[2]s}
spec:
  replicas: 1
  selector: {matchLabels: {app: %[1]s}}
  template:
    metadata:
      labels: {app: %[1]s}%[4]s
    spec:
      terminationGracePeriodSeconds: 1
      securityContext: {runAsNonRoot: true, runAsUser: 10001, seccompProfile: {type: RuntimeDefault}}
      containers:
        - name: app
          image: %[3]s
          imagePullPolicy: Never
          command: ["sleep", "3600"]
          securityContext: {allowPrivilegeEscalation: false, capabilities: {drop: ["ALL"]}}
`, name, cniNS, k.imgs.busyboxRef, annotations)
}

// routeManifest is the HTTPRoute on the parent Service web at v1/v2.
func routeManifest(v1, v2 int) string {
	return fmt.Sprintf(`apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web, namespace: %s}
spec:
  parentRefs: [{group: "", kind: Service, name: web, port: 80}]
  rules:
    - backendRefs:
        - {name: web-v1, port: 80, weight: %d}
        - {name: web-v2, port: 80, weight: %d}
`, cniNS, v1, v2)
}

// routedSetup runs v1, v2, the parent Service, the HTTPRoute at 100/0 and
// the client, and waits for the client pod's kernel route.
func (k *checker) routedSetup() (string, error) {
	manifest := k.versionManifest("v1") + "---\n" + k.versionManifest("v2") + fmt.Sprintf(`---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: %[1]s}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
`, cniNS) + k.sleeperManifest("client", "") + "---\n" + routeManifest(100, 0)
	if err := k.apply("routed", manifest); err != nil {
		return "", err
	}
	for _, app := range []string{"version=v1", "version=v2", "app=client"} {
		pod, err := k.podOf(cniNS, app)
		if err != nil {
			return "", err
		}
		if app == "app=client" {
			k.ip["client/pod"] = cniNS + "/" + pod
		}
	}
	vip, err := k.c.kubectl(k.ctx, "get", "service", "-n", cniNS, "web", "-o", "jsonpath={.spec.clusterIP}")
	if err != nil {
		return "", err
	}
	k.ip["web-vip"] = string(vip)
	took, err := k.routeIs(100, 0, 10*time.Second)
	if err != nil {
		return "", err
	}
	got, err := k.split(20)
	if err != nil {
		return "", err
	}
	if got["v1"] != 20 {
		return "", fmt.Errorf("at 100/0, 20 connections to %s:80 reached %v, want v1 only", vip, got)
	}
	return fmt.Sprintf("client %s's kernel route of %s:80 at 100/0 %.1fs after the client was Ready; 20 connections: %v", k.ip["client/pod"], vip, took.Seconds(), got), nil
}

// kernelRoute is a pod's kernel route as `sluice route list --json` shows it.
type kernelRoute struct {
	Service  string `json:"service"`
	Backends []struct {
		Address string `json:"address"`
		Weight  uint32 `json:"weight"`
	} `json:"backendRefs"`
}

// routesOf is the kernel routes of pod (namespace/name), by service, as
// `sluice route list` on the node shows them.
func (k *checker) routesOf(pod string) (map[string]kernelRoute, error) {
	dir, _, err := k.cgroupOf(splitPod(pod))
	if err != nil {
		return nil, err
	}
	out, err := exec.Command(k.sluiceBin(), "route", "list", "--cgroup", dir, "--json").Output()
	if err != nil {
		return nil, fmt.Errorf("sluice route list: %w", err)
	}
	var routes []kernelRoute
	if err := json.Unmarshal(out, &routes); err != nil {
		return nil, err
	}
	by := map[string]kernelRoute{}
	for _, r := range routes {
		by[r.Service] = r
	}
	return by, nil
}

// clientRoute is the client pod's kernel route of the parent Service's
// address: the weights of v1's and v2's endpoints (a version without a
// ready endpoint is absent).
func (k *checker) clientRoute() (map[string]uint32, error) {
	routes, err := k.routesOf(k.ip["client/pod"])
	if err != nil {
		return nil, err
	}
	r, ok := routes[k.ip["web-vip"]+":80"]
	if !ok {
		return nil, nil
	}
	w := map[string]uint32{}
	for _, b := range r.Backends {
		w[k.versionOf(b.Address)] += b.Weight
	}
	return w, nil
}

// versionOf is v1 or v2 for the address of its pod.
func (k *checker) versionOf(addr string) string {
	for _, v := range []string{"v1", "v2"} {
		if k.ip[v] == "" {
			out, _ := k.c.kubectl(k.ctx, "get", "pod", "-n", cniNS, "-l", "version="+v, "-o", "jsonpath={.items[*].status.podIP}")
			k.ip[v] = string(out)
		}
		if slices.Contains(strings.Fields(k.ip[v]), addr) {
			return v
		}
	}
	return addr
}

// routeIs waits until the client's kernel route holds v1:v2 (in weight
// proportion) and returns how long that took.
func (k *checker) routeIs(v1, v2 int, limit time.Duration) (time.Duration, error) {
	start := time.Now()
	var got map[string]uint32
	for {
		var err error
		if got, err = k.clientRoute(); err != nil {
			return 0, err
		}
		if got != nil && int(got["v1"])*v2 == int(got["v2"])*v1 && got["v1"]+got["v2"] > 0 {
			return time.Since(start), nil
		}
		if time.Since(start) > limit {
			logs, _ := k.c.kubectl(k.ctx, "logs", "-n", "sluice-system", k.ip["agent/pod"], "--tail", "30")
			return 0, fmt.Errorf("the client's kernel route is %v, not %d/%d, %v after; the agent's log ends:\n%s", got, v1, v2, limit, logs)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// split makes n connections from the client to the parent Service and
// counts which version answered each.
func (k *checker) split(n int) (map[string]int, error) {
	out, err := k.exec(k.ip["client/pod"], "app", fmt.Sprintf("for i in $(seq %d); do timeout 5 wget -qO- http://%s/id || echo failed; done", n, k.ip["web-vip"]))
	if err != nil {
		return nil, err
	}
	got := map[string]int{}
	for _, l := range strings.Fields(out) {
		got[l]++
	}
	return got, nil
}

// patch sets the HTTPRoute's weights, and returns when the patch was
// accepted.
func (k *checker) patch(v1, v2 int) error {
	_, err := k.c.kubectl(k.ctx, "patch", "httproute", "-n", cniNS, "web", "--type", "json", "-p",
		fmt.Sprintf(`[{"op":"replace","path":"/spec/rules/0/backendRefs/0/weight","value":%d},{"op":"replace","path":"/spec/rules/0/backendRefs/1/weight","value":%d}]`, v1, v2))
	return err
}

// weightsFollow: patches to 50/50 and 0/100 reach the client's kernel
// within 2 s each (ten patches timed, p50 and p90 reported); at 50/50, 200
// connections split 100/100 (round-robin: exact), at 0/100 all reach v2,
// and a connection held open across the patch stays on v1.
func (k *checker) weightsFollow(t *timings) (string, error) {
	var took []time.Duration
	for i := range 10 {
		v1, v2 := 50, 50
		if i%2 == 1 {
			v1, v2 = 100, 0
		}
		start := time.Now()
		if err := k.patch(v1, v2); err != nil {
			return "", err
		}
		if _, err := k.routeIs(v1, v2, 2*time.Second); err != nil {
			return "", fmt.Errorf("patch %d to %d/%d: %w", i+1, v1, v2, err)
		}
		took = append(took, time.Since(start))
	}
	slices.Sort(took)
	t.routePatch = [2]time.Duration{took[len(took)/2], took[len(took)*9/10]}
	if err := k.patch(50, 50); err != nil {
		return "", err
	}
	if _, err := k.routeIs(50, 50, 2*time.Second); err != nil {
		return "", err
	}
	half, err := k.split(200)
	if err != nil {
		return "", err
	}
	if half["v1"] < 90 || half["v2"] < 90 || half["v1"]+half["v2"] != 200 {
		return "", fmt.Errorf("at 50/50, 200 connections reached %v: want each within 5 points of half", half)
	}
	// A connection to v1 held open across the patch to 0/100: a request
	// sent before, its end after.
	if err := k.patch(100, 0); err != nil {
		return "", err
	}
	if _, err := k.routeIs(100, 0, 2*time.Second); err != nil {
		return "", err
	}
	held := make(chan string, 1)
	go func() {
		out, err := k.exec(k.ip["client/pod"], "app", fmt.Sprintf(`{ printf 'GET /id HTTP/1.0\r\n'; sleep 3; printf '\r\n'; } | nc %s 80 | tail -1`, k.ip["web-vip"]))
		if err != nil {
			out = err.Error()
		}
		held <- strings.TrimSpace(out)
	}()
	time.Sleep(time.Second)
	if err := k.patch(0, 100); err != nil {
		return "", err
	}
	if _, err := k.routeIs(0, 100, 2*time.Second); err != nil {
		return "", err
	}
	all, err := k.split(200)
	if err != nil {
		return "", err
	}
	if all["v2"] != 200 {
		return "", fmt.Errorf("at 0/100, 200 connections reached %v: want v2 only", all)
	}
	if h := <-held; h != "v1" {
		return "", fmt.Errorf("the connection held open across the patch to 0/100 was answered by %q, want v1 (open connections stay)", h)
	}
	return fmt.Sprintf("patch to the client's kernel route p50 %v, p90 %v (10 patches); 50/50: %v of 200; 0/100: %v of 200; the connection held across it: v1",
		t.routePatch[0].Round(time.Millisecond), t.routePatch[1].Round(time.Millisecond), half, all), nil
}

// scaledAway: at 50/50, v2 scaled to no ready endpoint: the kernel route
// drops v2's endpoint and every new connection reaches v1.
func (k *checker) scaledAway() (string, error) {
	if err := k.patch(50, 50); err != nil {
		return "", err
	}
	if _, err := k.routeIs(50, 50, 2*time.Second); err != nil {
		return "", err
	}
	start := time.Now()
	if _, err := k.c.kubectl(k.ctx, "scale", "deployment", "-n", cniNS, "v2", "--replicas", "0"); err != nil {
		return "", err
	}
	var got map[string]uint32
	err := k.c.poll(k.ctx, 30*time.Second, "v2's endpoint out of the kernel route", func() error {
		var err error
		if got, err = k.clientRoute(); err == nil && (got["v2"] != 0 || got["v1"] == 0) {
			err = fmt.Errorf("route %v", got)
		}
		return err
	})
	if err != nil {
		return "", err
	}
	took := time.Since(start)
	all, err := k.split(50)
	if err != nil {
		return "", err
	}
	if all["v1"] != 50 {
		return "", fmt.Errorf("v2 scaled to 0: 50 connections reached %v, want v1 only", all)
	}
	return fmt.Sprintf("v2's endpoint left the kernel route %.1fs after the scale (the pod's termination included); 50 connections: %v", took.Seconds(), all), nil
}

// peerEdge: the flows name the workloads on both ends: the client's
// outbound flows to v2 carry destination_workload="v2" (the agent knows
// v2's pod by its address), v2's inbound ones source_workload="client";
// and a real Prometheus with deploy/'s jobs and recording rules returns
// Kiali's edge, istio_tcp_sent_bytes_total{source_workload="client",
// destination_workload="v2"}.
func (k *checker) peerEdge() (string, error) {
	agent := k.ip["agent"]
	edges := [][]string{
		{`reporter="source"`, `source_workload="client"`, `destination_workload="v2"`, `destination_workload_namespace="shop"`},
		{`reporter="destination"`, `source_workload="client"`, `source_workload_namespace="shop"`, `destination_workload="v2"`},
	}
	got := make([]float64, len(edges))
	for i, e := range edges {
		err := k.c.poll(k.ctx, 10*time.Second, "the agent's series "+strings.Join(e, ","), func() error {
			v, err := metric(agent, agentPort, "sluice_tcp_sent_bytes_total", e...)
			if err == nil && v == 0 {
				err = fmt.Errorf("no bytes")
			}
			got[i] = v
			return err
		})
		if err != nil {
			return "", err
		}
	}
	ctx, out, stop, err := k.startPrometheus("prometheus-edge")
	if err != nil {
		return "", err
	}
	defer stop()
	const q = `sum(istio_tcp_sent_bytes_total{source_workload="client",destination_workload="v2"})`
	var edge float64
	err = k.c.poll(ctx, 60*time.Second, "Prometheus to record the edge", func() error {
		var err error
		if edge, err = promValue(q); err == nil && edge == 0 {
			err = fmt.Errorf("%s = 0", q)
		}
		return err
	})
	if err != nil {
		return "", fmt.Errorf("%w\nPrometheus said:\n%s", err, out.String())
	}
	return fmt.Sprintf("agent: client -> v2 %v bytes (reporter source), %v (reporter destination); Prometheus %s = %v", got[0], got[1], q, edge), nil
}

// notInKernel: an HTTPRoute the kernel cannot carry out (a path match: the
// kernel splits connections, not requests) on the parent Service web-v1 gets
// a Warning event NotInKernel naming why, and no pod gets a route of
// web-v1's address.
func (k *checker) notInKernel() (string, error) {
	manifest := fmt.Sprintf(`apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: by-path, namespace: %s}
spec:
  parentRefs: [{group: "", kind: Service, name: web-v1, port: 80}]
  rules:
    - matches: [{path: {type: PathPrefix, value: /admin}}]
      backendRefs: [{name: web-v2, port: 80}]
`, cniNS)
	if err := k.apply("by-path", manifest); err != nil {
		return "", err
	}
	var msg string
	err := k.c.poll(k.ctx, 10*time.Second, "the NotInKernel event", func() error {
		out, err := k.c.kubectl(k.ctx, "get", "events", "-n", cniNS, "--field-selector", "involvedObject.name=by-path,reason=NotInKernel", "-o", "jsonpath={.items[*].message}")
		if msg = string(out); err == nil && !strings.Contains(msg, "matches some requests only") {
			err = fmt.Errorf("no NotInKernel event naming the path match yet: %q", msg)
		}
		return err
	})
	if err != nil {
		return "", err
	}
	vip, err := k.c.kubectl(k.ctx, "get", "service", "-n", cniNS, "web-v1", "-o", "jsonpath={.spec.clusterIP}")
	if err != nil {
		return "", err
	}
	ns, pod := splitPod(k.ip["client/pod"])
	dir, _, err := k.cgroupOf(ns, pod)
	if err != nil {
		return "", err
	}
	out, err := exec.Command(k.sluiceBin(), "route", "list", "--cgroup", dir, "--json").Output()
	if err != nil {
		return "", err
	}
	if strings.Contains(string(out), `"`+string(vip)+`:80"`) {
		return "", fmt.Errorf("the client has a route of web-v1's %s:80 from a route the kernel cannot do: %s", vip, out)
	}
	if _, err := k.c.kubectl(k.ctx, "delete", "httproute", "-n", cniNS, "by-path"); err != nil {
		return "", err
	}
	return "event: " + tail(msg, 1), nil
}

// servicesResolved: a pod annotated sluice.dev/resolve-services (and
// kernel-only to the Services' range, so no sidecar either) reaches web-v1
// by its cluster IP in a cluster with no kube-proxy: the agent gave its
// kernel a route of every Service. The client pod, which did not ask,
// cannot (its sidecar dials the cluster IP, which nothing here answers).
// v2 scaled back up: its Service's route appears and v2 answers.
func (k *checker) servicesResolved() (string, error) {
	manifest := k.sleeperManifest("resolver", fmt.Sprintf(`{sluice.dev/resolve-services: "true", sluice.dev/kernel-only-cidrs: %q}`, k.c.svcCIDR))
	if err := k.apply("resolver", manifest); err != nil {
		return "", err
	}
	name, err := k.podOf(cniNS, "app=resolver")
	if err != nil {
		return "", err
	}
	pod := cniNS + "/" + name
	ready := time.Now()
	vip := map[string]string{}
	for _, v := range []string{"v1", "v2"} {
		out, err := k.c.kubectl(k.ctx, "get", "service", "-n", cniNS, "web-"+v, "-o", "jsonpath={.spec.clusterIP}")
		if err != nil {
			return "", err
		}
		vip[v] = string(out) + ":80"
	}
	// has waits for pod's kernel route of the Service at svc to name the
	// pods of version v alone.
	has := func(svc, v string, limit time.Duration) error {
		return k.c.poll(k.ctx, limit, "the resolver's route of "+svc, func() error {
			routes, err := k.routesOf(pod)
			if err != nil {
				return err
			}
			r, ok := routes[svc]
			if !ok || len(r.Backends) == 0 {
				return fmt.Errorf("no route of %s", svc)
			}
			k.ip[v] = "" // the version's pods may have changed
			for _, b := range r.Backends {
				if got := k.versionOf(b.Address); got != v {
					return fmt.Errorf("route of %s names %s, want %s's pods", svc, got, v)
				}
			}
			return nil
		})
	}
	if err := has(vip["v1"], "v1", 10*time.Second); err != nil {
		return "", err
	}
	took := time.Since(ready)
	out, err := k.exec(pod, "app", fmt.Sprintf("for i in $(seq 20); do timeout 5 wget -qO- http://%s/id || echo failed; done", vip["v1"]))
	if err != nil {
		return "", err
	}
	if n := strings.Count(out, "v1"); n != 20 {
		return "", fmt.Errorf("20 connections from the resolving pod to web-v1's cluster IP %s: %d answered by v1: %q", vip["v1"], n, out)
	}
	if routes, err := k.routesOf(k.ip["client/pod"]); err != nil || routes[vip["v1"]].Service != "" {
		return "", fmt.Errorf("the client, which did not ask, resolves web-v1 (%v, %v)", routes[vip["v1"]], err)
	}
	if out, _ := k.exec(k.ip["client/pod"], "app", fmt.Sprintf("timeout 5 wget -qO- http://%s/id || echo failed", vip["v1"])); out != "failed" {
		return "", fmt.Errorf("the client, which did not ask, reached web-v1's cluster IP (%q): this cluster has no kube-proxy, so the check proves nothing", out)
	}
	scaled := time.Now()
	if _, err := k.c.kubectl(k.ctx, "scale", "deployment", "-n", cniNS, "v2", "--replicas", "1"); err != nil {
		return "", err
	}
	if err := has(vip["v2"], "v2", 60*time.Second); err != nil {
		return "", err
	}
	up := time.Since(scaled)
	if out, err := k.exec(pod, "app", fmt.Sprintf("timeout 5 wget -qO- http://%s/id || echo failed", vip["v2"])); err != nil || out != "v2" {
		return "", fmt.Errorf("web-v2's cluster IP %s once v2 was back answered %q (%v)", vip["v2"], out, err)
	}
	return fmt.Sprintf("the resolving pod's route of web-v1 %s %.1fs after it was Ready; 20 of 20 connections to it answered by v1 with no kube-proxy and no sidecar; the client (not asking) has no such route and fails; v2 scaled up: its route %.1fs after the scale (its pod's start included), v2 answers",
		vip["v1"], took.Seconds(), up.Seconds()), nil
}

// clusterRollout: `sluice route rollout --httproute` moves the HTTPRoute
// from v1 to v2 by steps while the client keeps connecting, judged by
// Prometheus over the agents' series, and ends at 0/100 in the route and
// in the client's kernel; a canary whose every connect is refused
// (web-bad: an endpoint with no sidecar, on a port nothing listens on) is
// rolled back with the reason on the route. (A pod with a sidecar would
// not do: its sidecar accepts the connect, so the connect gate passes, as
// it would in front of Envoy.)
func (k *checker) clusterRollout() (string, error) {
	if err := k.patch(100, 0); err != nil {
		return "", err
	}
	if _, err := k.routeIs(100, 0, 10*time.Second); err != nil {
		return "", err
	}
	ctx, promOut, stop, err := k.startPrometheus("prometheus-rollout")
	if err != nil {
		return "", err
	}
	defer stop()
	// The client connects on through both rollouts (bounded: 1,200
	// connects, a 50 ms pause each).
	traffic, cancel := context.WithCancel(ctx)
	defer cancel()
	ns, pod := splitPod(k.ip["client/pod"])
	go k.c.kubectl(traffic, "exec", "-n", ns, pod, "-c", "app", "--", "/bin/sh", "-c",
		fmt.Sprintf("for i in $(seq 1200); do timeout 5 wget -qO- http://%s/id >/dev/null 2>&1; sleep 0.05; done", k.ip["web-vip"]))
	// Prometheus up and scraping the agent's connect series.
	const scraped = `sum(sluice_tcp_destination_connect_duration_seconds_count)`
	err = k.c.poll(ctx, 60*time.Second, "Prometheus to scrape the connects", func() error {
		v, err := promValue(scraped)
		if err == nil && v == 0 {
			err = fmt.Errorf("%s = 0", scraped)
		}
		return err
	})
	if err != nil {
		return "", fmt.Errorf("%w\nPrometheus said:\n%s", err, promOut.String())
	}
	rollout := func(to string) (string, error) {
		cmd := exec.CommandContext(ctx, k.sluiceBin(), "route", "rollout", "--httproute", cniNS+"/web", "--to", to, "--step", "50", "--interval", "4s",
			"--max-wait", "20s", "--prometheus", "http://"+promAddr, "--kubeconfig", k.c.path("pki", "admin.kubeconfig"))
		out, err := cmd.CombinedOutput()
		return string(out), err
	}
	annotation := func(name string) string {
		out, _ := k.c.kubectl(k.ctx, "get", "httproute", "-n", cniNS, "web", "-o", "jsonpath={.metadata.annotations.rollout\\.sluice\\.dev/"+name+"}")
		return string(out)
	}
	start := time.Now()
	out, err := rollout("web-v2")
	if err != nil {
		return "", fmt.Errorf("rollout to web-v2: %v:\n%s\nPrometheus said:\n%s", err, out, promOut.String())
	}
	took := time.Since(start)
	if !strings.Contains(out, "percent=50") || annotation("step") != "0" {
		return "", fmt.Errorf("rollout to web-v2 did not step through 50%% or left step %q:\n%s", annotation("step"), out)
	}
	if _, err := k.routeIs(0, 100, 2*time.Second); err != nil {
		return "", err
	}

	// web-bad: the canary that fails, an endpoint refusing every connect
	// (server1, which has no sidecar to accept for it, on a port nothing
	// listens on). The route is v2 100, web-bad 0.
	manifest := fmt.Sprintf(`apiVersion: v1
kind: Service
metadata: {name: web-bad, namespace: %[1]s}
spec:
  ports: [{name: http, port: 80}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-bad-1, namespace: %[1]s, labels: {kubernetes.io/service-name: web-bad}}
addressType: IPv4
ports: [{name: http, port: 8081, protocol: TCP}]
endpoints: [{addresses: [%[2]q], conditions: {ready: true}}]
`, cniNS, k.ip["server1"])
	if err := k.apply("web-bad", manifest); err != nil {
		return "", err
	}
	if _, err := k.c.kubectl(k.ctx, "patch", "httproute", "-n", cniNS, "web", "--type", "json", "-p",
		`[{"op":"replace","path":"/spec/rules/0/backendRefs/0/name","value":"web-bad"},{"op":"replace","path":"/spec/rules/0/backendRefs/0/weight","value":0}]`); err != nil {
		return "", err
	}
	out, err = rollout("web-bad")
	var exit *exec.ExitError
	if !errors.As(err, &exit) || exit.ExitCode() != 1 || !strings.Contains(out, "rolled back") {
		return "", fmt.Errorf("rollout to web-bad: %v, want exit 1 rolled back:\n%s", err, out)
	}
	if got := annotation("rollback"); got != "connect_failures" {
		return "", fmt.Errorf("after the rollback the route's rollout.sluice.dev/rollback is %q, want connect_failures:\n%s", got, out)
	}
	weights, err := k.c.kubectl(k.ctx, "get", "httproute", "-n", cniNS, "web", "-o", "jsonpath={.spec.rules[0].backendRefs[*].weight}")
	if err != nil || string(weights) != "0 100" {
		return "", fmt.Errorf("after the rollback the route's weights are %q (%v), want web-bad 0, web-v2 100", weights, err)
	}
	return fmt.Sprintf("v1 -> v2 in two steps of 50%% judged by Prometheus, %.1fs, the client's kernel at 0/100; to web-bad (refused connects): rolled back to 0/100, rollout.sluice.dev/rollback=connect_failures",
		took.Seconds()), nil
}
