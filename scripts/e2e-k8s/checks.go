package main

import (
	"bufio"
	"bytes"
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// result is one check of the Sluice step: its name, whether it passed and
// what it saw.
type result struct {
	name   string
	err    error
	detail string
	took   time.Duration
}

// checker runs the Sluice checks in order and collects their results.
type checker struct {
	c       *cluster
	ctx     context.Context
	imgs    images
	results []result
	ip      map[string]string // pod key -> IP; key+"/pod" its pod's name, key+"/uid" its uid ("agent": the agent's)
	sum     map[string]string // pod name -> sha256 of its /www/file
}

// check runs one check, logs and records its result, and returns its error.
func (k *checker) check(name string, f func() (string, error)) error {
	start := time.Now()
	detail, err := f()
	r := result{name: name, err: err, detail: detail, took: time.Since(start)}
	k.results = append(k.results, r)
	if err != nil {
		slog.Error("check FAILED", "check", name, "err", err, "took", r.took.Round(time.Millisecond))
	} else {
		slog.Info("check passed", "check", name, "detail", detail, "took", r.took.Round(time.Millisecond))
	}
	return err
}

func (k *checker) printSummary() {
	fmt.Println("---- Sluice checks ----")
	for _, r := range k.results {
		status := "PASS"
		if r.err != nil {
			status = "FAIL"
		}
		fmt.Printf("%s  %-58s %6.1fs  %s\n", status, r.name, r.took.Seconds(), r.detail)
		if r.err != nil {
			fmt.Printf("      %v\n", r.err)
		}
	}
}

// www is the shell that gives an httpd pod a random 256 KiB /www/file and
// /www/id naming it, then serves /www on 8080 logging every request's peer.
func www(id string) string {
	return fmt.Sprintf("mkdir -p /www && head -c 262144 /dev/urandom > /www/file && echo %s > /www/id && exec httpd -f -vv -p 8080 -h /www", id)
}

// sluiceChecks are the checks with the Sluice image: plain servers untouched,
// the agent (the only reader of the node's flow ring: every pod's flow
// series are its), the template pod's outbound and inbound capture, the
// Istio and Linkerd drop-ins, the agent's collection and a canary route set
// through it, restarts, a real Prometheus and offload. The first failure
// stops them (later ones build on earlier ones).
func (c *cluster) sluiceChecks(ctx context.Context, imgs images, t *timings) (*checker, error) {
	k := &checker{c: c, ctx: ctx, imgs: imgs, ip: map[string]string{}, sum: map[string]string{}}
	if _, err := c.ctr("images", "import", c.sluiceImage); err != nil {
		return k, err
	}
	steps := []struct {
		name string
		f    func() (string, error)
	}{
		{"1. two server pods without Sluice Ready", func() (string, error) { return k.servers(t) }},
		{"1. server pods untouched: no pins, no install", k.untouched},
		{"1. server1 <-> server2 traffic intact", k.plainTraffic},
		{"2. deploy/cni/: agent (flows, sluice-cni), injector Ready", func() (string, error) { return k.agent(t) }},
		{"2. Sluice pod (pod-template.yaml) Ready", func() (string, error) { return k.templatePod(t) }},
		{"2. outbound app -> server1 through the sidecar", func() (string, error) { return k.outbound("app") }},
		{"2. inbound server1 -> app through the sidecar", func() (string, error) { return k.inbound("app") }},
		{"2. sidecar's :15090 proxy figures only, no flow series", func() (string, error) { return k.sidecarMetrics("app") }},
		{"2. agent /flows?pod=uid: open flow's bytes from pod netns", k.liveFlow},
		{"3. Istio drop-in + sidecar Ready", func() (string, error) { return k.dropIn(t, "istio") }},
		{"3. Istio drop-in outbound app -> server1", func() (string, error) { return k.outbound("app-istio") }},
		{"3. Istio drop-in inbound server1 -> app", func() (string, error) { return k.inbound("app-istio") }},
		{"3. Linkerd drop-in + sidecar Ready", func() (string, error) { return k.dropIn(t, "linkerd") }},
		{"3. Linkerd drop-in outbound app -> server1", func() (string, error) { return k.outbound("app-linkerd") }},
		{"3. Linkerd drop-in inbound server1 -> app", func() (string, error) { return k.inbound("app-linkerd") }},
		{"4. agent collects a deleted Sluice pod's pins", func() (string, error) { return k.collect(t) }},
		{"5. canary route through the agent: 20 conns reach both", k.canary},
		{"6. sidecar killed: restarted, pod up, captured again", k.sidecarCrash},
		{"6. agent pod deleted: capture untouched, agent back", k.agentRestart},
		{"6. no agent: captured; its flow waits in the node's ring", k.agentAbsent},
		{"6. sandbox killed: init reruns, Ready, captured both ways", k.sandboxRestart},
		{"7. Prometheus, deploy/'s scrape jobs: flows via the agent", k.prometheusScrapes},
		{"8. offload by annotation: pod-template + sluice.dev/* Ready", func() (string, error) { return k.offloadPod(t) }},
		{"8. offloaded outbound app -> server1", func() (string, error) { return k.outbound("app-offload") }},
		{"8. offloaded inbound server1 -> app, app's bytes by kernel", k.offloadedInbound},
		{"9. plain Deployment, unlabelled namespace: untouched", func() (string, error) { return k.plainWeb(t) }},
		{"9. labelled restricted namespace: injected, admitted, Ready", func() (string, error) { return k.cniWeb(t) }},
		{"9. CNI pod outbound web -> server1 through the sidecar", func() (string, error) { return k.outbound("web") }},
		{"9. CNI pod inbound server1 -> web through the sidecar", func() (string, error) { return k.inbound("web") }},
		{"9. CNI pod deleted: no pin, no link left (sluice-cni DEL)", k.cniDelete},
		{"9. misspelt annotation: injector refuses, sandbox fails", k.misspelt},
		{"9. sluice inject output applied: init mode Ready, captured", func() (string, error) { return k.injectedWeb(t) }},
		{"9. injected (init mode) outbound web -> server1", func() (string, error) { return k.outbound("web-init") }},
		{"10. Gateway API CRDs installed", k.gatewayCRDs},
		{"10. v1, v2, parent Service, HTTPRoute 100/0: all to v1", k.routedSetup},
		{"10. weights patched: the kernel follows in 2 s, exact split", func() (string, error) { return k.weightsFollow(t) }},
		{"10. flows name both workloads; Prometheus has the edge", k.peerEdge},
		{"10. a path match: NotInKernel event, no route at all", k.notInKernel},
		{"10. v2 scaled to 0 ready endpoints: new connections to v1", k.scaledAway},
		{"10. sluice.dev/resolve-services: Services resolved in the pod's kernel", k.servicesResolved},
		{"10. sluice route rollout --httproute: gated steps, a failing canary rolled back", k.clusterRollout},
		{"11. Istio drop-in with ISTIO_META_DNS_CAPTURE: a Service name resolved through the sidecar", k.dnsDropIn},
		{"11. CNI pod annotated sluice.dev/redirect-dns: resolved through the injector's sidecar", k.dnsCNI},
	}
	for _, s := range steps {
		if err := k.check(s.name, s.f); err != nil {
			return k, fmt.Errorf("check %q: %w", s.name, err)
		}
	}
	return k, nil
}

// apply writes manifest to the run directory and applies it.
func (k *checker) apply(name, manifest string) error {
	path := k.c.path(name + ".yaml")
	if err := os.WriteFile(path, []byte(manifest), 0o644); err != nil {
		return err
	}
	_, err := k.c.kubectl(k.ctx, "apply", "-f", path)
	return err
}

// podOf waits for a Ready pod with label app=<app> (in ns) and returns its
// name; it records its cgroup ids for teardown.
func (k *checker) podOf(ns, selector string) (string, error) {
	var name string
	err := k.c.poll(k.ctx, k.c.timeout, "a pod "+selector, func() error {
		out, err := k.c.kubectl(k.ctx, "get", "pod", "-n", ns, "-l", selector, "--field-selector", "status.phase!=Succeeded,status.phase!=Failed",
			"-o", "name")
		if err != nil {
			return err
		}
		names := strings.Fields(string(out))
		if len(names) == 0 {
			return errors.New("none yet")
		}
		name = strings.TrimPrefix(names[0], "pod/")
		return nil
	})
	if err != nil {
		return "", err
	}
	if _, err := k.c.kubectl(k.ctx, "wait", "-n", ns, "--for=condition=Ready", "pod/"+name, "--timeout", k.c.timeout.String()); err != nil {
		desc, _ := k.c.kubectl(k.ctx, "describe", "pod", "-n", ns, name)
		// What a crash-looping container said last (kubectl's own
		// error when none has restarted).
		logs, lerr := k.c.kubectl(k.ctx, "logs", "-n", ns, name, "--all-containers", "--previous", "--tail", "20")
		if lerr != nil {
			logs = []byte(lerr.Error())
		}
		return "", fmt.Errorf("%w\n%s\nprevious containers' last lines:\n%s", err, desc, logs)
	}
	k.c.seenIDs = append(k.c.seenIDs, podCgroupIDs()...)
	return name, nil
}

func (k *checker) field(ns, pod, jsonpath string) (string, error) {
	out, err := k.c.kubectl(k.ctx, "get", "pod", "-n", ns, pod, "-o", "jsonpath="+jsonpath)
	return strings.TrimSpace(string(out)), err
}

// exec runs a shell script in the pod's container and returns its stdout.
// pod is a name in default, or NAMESPACE/NAME.
func (k *checker) exec(pod, container, script string) (string, error) {
	ns, name := splitPod(pod)
	out, err := k.c.kubectl(k.ctx, "exec", "-n", ns, name, "-c", container, "--", "/bin/sh", "-c", script)
	return strings.TrimSpace(string(out)), err
}

// splitPod is the namespace and name of a pod recorded as NAME (in
// default) or NAMESPACE/NAME.
func splitPod(pod string) (ns, name string) {
	if ns, name, ok := strings.Cut(pod, "/"); ok {
		return ns, name
	}
	return "default", pod
}

// workload is the workload name the pod of key records (its flows' source
// and destination_workload): the key, unless one was recorded.
func (k *checker) workload(key string) string { return cmp.Or(k.ip[key+"/workload"], key) }

func (k *checker) sha(pod, container string) (string, error) {
	out, err := k.exec(pod, container, "sha256sum /www/file")
	if err != nil {
		return "", err
	}
	f := strings.Fields(out)
	if len(f) == 0 {
		return "", fmt.Errorf("sha256sum in %s: no output", pod)
	}
	return f[0], nil
}

// fetch fetches http://addr/file from the pod's container and returns the
// sha256 of what arrived and its length.
func (k *checker) fetch(pod, container, url string) (sum string, n int, err error) {
	out, err := k.exec(pod, container, fmt.Sprintf("wget -qO /tmp/got %s && sha256sum /tmp/got && wc -c < /tmp/got", url))
	if err != nil {
		return "", 0, err
	}
	f := strings.Fields(out)
	if len(f) != 3 {
		return "", 0, fmt.Errorf("fetch %s from %s: unexpected output %q", url, pod, out)
	}
	n, err = strconv.Atoi(f[2])
	return f[0], n, err
}

// servers runs server1 and server2: busybox httpd on 8080, no Sluice.
func (k *checker) servers(t *timings) (string, error) {
	var b strings.Builder
	for _, s := range []string{"server1", "server2"} {
		fmt.Fprintf(&b, `---
apiVersion: v1
kind: Pod
metadata:
  name: %s
  labels: {role: server}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: httpd
    image: %s
    imagePullPolicy: Never
    command: ["/bin/sh", "-c", %q]
    readinessProbe:
      tcpSocket: {port: 8080}
      periodSeconds: 1
`, s, k.imgs.busyboxRef, www(s))
	}
	start := time.Now()
	if err := k.apply("servers", b.String()); err != nil {
		return "", err
	}
	for _, s := range []string{"server1", "server2"} {
		if err := k.c.podReady(k.ctx, "pod/"+s); err != nil {
			return "", err
		}
	}
	k.c.seenIDs = append(k.c.seenIDs, podCgroupIDs()...)
	t.servers = time.Since(start)
	for _, s := range []string{"server1", "server2"} {
		ip, err := k.field("default", s, "{.status.podIP}")
		if err != nil {
			return "", err
		}
		k.ip[s] = ip
		if k.sum[s], err = k.sha(s, "httpd"); err != nil {
			return "", err
		}
	}
	return fmt.Sprintf("server1 %s, server2 %s, Ready in %.1fs", k.ip["server1"], k.ip["server2"], t.servers.Seconds()), nil
}

// podCgroup is the pod's cgroup2 directory and its id (inode), found by uid.
func podCgroup(uid string) (string, uint64, error) {
	var dir string
	_ = filepath.WalkDir("/sys/fs/cgroup/unified/kubepods", func(path string, d fs.DirEntry, err error) error {
		if err == nil && d.IsDir() && d.Name() == "pod"+uid {
			dir = path
			return filepath.SkipAll
		}
		return nil
	})
	if dir == "" {
		return "", 0, fmt.Errorf("no cgroup pod%s under /sys/fs/cgroup/unified/kubepods", uid)
	}
	var st syscall.Stat_t
	if err := syscall.Stat(dir, &st); err != nil {
		return "", 0, err
	}
	return dir, st.Ino, nil
}

// cgroupOf is the pod's cgroup directory and id.
func (k *checker) cgroupOf(ns, pod string) (string, uint64, error) {
	uid, err := k.field(ns, pod, "{.metadata.uid}")
	if err != nil {
		return "", 0, err
	}
	return podCgroup(uid)
}

// sluiceBin is the static sluice `make image` built, run on the node.
func (k *checker) sluiceBin() string { return filepath.Join(k.c.repo, "bin", "sluice-static") }

// untouched: no pin directory for the servers' pod cgroups nor any of
// their containers', and `sluice status` finds nothing installed.
func (k *checker) untouched() (string, error) {
	var notes []string
	for _, s := range []string{"server1", "server2"} {
		dir, id, err := k.cgroupOf("default", s)
		if err != nil {
			return "", err
		}
		err = filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
			if err != nil || !d.IsDir() {
				return nil
			}
			var st syscall.Stat_t
			if syscall.Stat(path, &st) == nil {
				if _, err := os.Stat(filepath.Join(bpffs, "sluice", strconv.FormatUint(st.Ino, 10))); err == nil {
					return fmt.Errorf("%s: pins under %s/sluice/%d", s, bpffs, st.Ino)
				}
			}
			return nil
		})
		if err != nil {
			return "", err
		}
		out, err := exec.Command(k.sluiceBin(), "status", "--cgroup", dir).CombinedOutput()
		if err == nil {
			return "", fmt.Errorf("sluice status --cgroup %s says installed:\n%s", dir, out)
		}
		notes = append(notes, fmt.Sprintf("%s cgroup %d: no pins, status exit %v", s, id, err))
	}
	return strings.Join(notes, "; "), nil
}

// plainTraffic: server2 fetches server1's file and server1 server2's,
// intact, and each server logs the other's IP.
func (k *checker) plainTraffic() (string, error) {
	for _, p := range [][2]string{{"server2", "server1"}, {"server1", "server2"}} {
		from, to := p[0], p[1]
		sum, n, err := k.fetch(from, "httpd", "http://"+k.ip[to]+":8080/file")
		if err != nil {
			return "", err
		}
		if sum != k.sum[to] || n != 262144 {
			return "", fmt.Errorf("%s got %d bytes sha256 %s from %s, want 262144 bytes %s", from, n, sum, to, k.sum[to])
		}
		if err := k.logged("default", to, "httpd", peer(k.ip[from])); err != nil {
			return "", err
		}
	}
	return "256 KiB each way, sha256 equal, peers' IPs seen", nil
}

// peer is how busybox httpd -vv logs a client's IPv4 address on its
// dual-stack socket.
func peer(ip string) string { return "[::ffff:" + ip + "]:" }

// logged fails unless the container's log holds want.
func (k *checker) logged(ns, pod, container, want string) error {
	out, err := k.c.kubectl(k.ctx, "logs", "-n", ns, pod, "-c", container)
	if err != nil {
		return err
	}
	if !strings.Contains(string(out), want) {
		return fmt.Errorf("%s/%s log has no %q; it ends:\n%s", pod, container, want, tail(string(out), 10))
	}
	return nil
}

func tail(s string, n int) string {
	l := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(l) > n {
		l = l[len(l)-n:]
	}
	return strings.Join(l, "\n")
}

// appCommand replaces a manifest's app image with busybox httpd serving /www.
func (k *checker) appCommand(manifest, id string) (string, error) {
	const app = "          image: registry.example/app:1\n"
	if !strings.Contains(manifest, app) {
		return "", fmt.Errorf("manifest has no line %q to replace", strings.TrimSpace(app))
	}
	return strings.Replace(manifest, app, fmt.Sprintf(`          image: %s
          imagePullPolicy: Never
          command: ["/bin/sh", "-c", %q]
`, k.imgs.busyboxRef, www(id)), 1), nil
}

// templatePod applies deploy/pod/pod-template.yaml with the app busybox.
func (k *checker) templatePod(t *timings) (string, error) {
	data, err := os.ReadFile(k.c.template)
	if err != nil {
		return "", err
	}
	manifest, err := k.appCommand(string(data), "app")
	if err != nil {
		return "", err
	}
	start := time.Now()
	if err := k.apply("sluice-pod", manifest); err != nil {
		return "", err
	}
	pod, err := k.podOf("default", "app=app")
	if err != nil {
		k.c.sluiceReport(k.ctx, "app", []string{"sluice-init", "sluice-proxy", "app"})
		return "", err
	}
	t.sluicePod = time.Since(start)
	return k.describeSluicePod(pod, "app", t.sluicePod)
}

// describeSluicePod records the pod's IP and file sum and checks its pins.
// pod is a name in default, or NAMESPACE/NAME.
func (k *checker) describeSluicePod(pod, key string, took time.Duration) (string, error) {
	ns, name := splitPod(pod)
	ip, err := k.field(ns, name, "{.status.podIP}")
	if err != nil {
		return "", err
	}
	k.ip[key] = ip
	k.ip[key+"/pod"] = pod
	if k.sum[key], err = k.sha(pod, "app"); err != nil {
		return "", err
	}
	uid, err := k.field(ns, name, "{.metadata.uid}")
	if err != nil {
		return "", err
	}
	k.ip[key+"/uid"] = uid
	_, id, err := podCgroup(uid)
	if err != nil {
		return "", err
	}
	if _, err := os.Stat(filepath.Join(bpffs, "sluice", strconv.FormatUint(id, 10))); err != nil {
		return "", fmt.Errorf("%s is Ready but has no pins: %w", pod, err)
	}
	return fmt.Sprintf("%s %s cgroup %d pinned, Ready in %.1fs", pod, ip, id, took.Seconds()), nil
}

// agentPort is where the agent serves /metrics and /flows.
const agentPort = 9102

// get fetches http://ip:port/path from the node and fails unless it answers
// 200.
func get(ip string, port int, path string) ([]byte, error) {
	cl := http.Client{Timeout: 5 * time.Second}
	resp, err := cl.Get(fmt.Sprintf("http://%s:%d%s", ip, port, path))
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil, err
	}
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("%s:%d%s: %s: %s", ip, port, path, resp.Status, b)
	}
	return b, nil
}

// flowMetric sums the agent's samples of name for the pod of key (its
// series carry the pod's uid as pod_uid) whose labels include every one of
// want. The agent is the only reader of the node's flow ring: every pod's
// flows, and its kernel counters, are on the agent's /metrics.
func (k *checker) flowMetric(key, name string, want ...string) (float64, error) {
	uid := k.ip[key+"/uid"]
	if uid == "" || k.ip["agent"] == "" {
		return 0, fmt.Errorf("no uid of %s or no agent IP recorded", key)
	}
	return metric(k.ip["agent"], agentPort, name, append([]string{`pod_uid="` + uid + `"`}, want...)...)
}

// metric sums the samples of name whose labels include every one of want,
// scraped from http://ip:port/metrics on the node.
func metric(ip string, port int, name string, want ...string) (float64, error) {
	body, err := get(ip, port, "/metrics")
	if err != nil {
		return 0, err
	}
	var sum float64
	sc := bufio.NewScanner(bytes.NewReader(body))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
next:
	for sc.Scan() {
		l := sc.Text()
		if !strings.HasPrefix(l, name+"{") && !strings.HasPrefix(l, name+" ") {
			continue
		}
		for _, w := range want {
			if !strings.Contains(l, w) {
				continue next
			}
		}
		f := strings.Fields(l)
		v, err := strconv.ParseFloat(f[len(f)-1], 64)
		if err != nil {
			return 0, fmt.Errorf("metrics line %q: %w", l, err)
		}
		sum += v
	}
	return sum, sc.Err()
}

const opened = "sluice_tcp_connections_opened_total"

// dropInNote says, for a drop-in pod, that its flow series are new: the
// mesh's proxy stands in for Sluice's sidecar, and before the agent read
// the node's flow ring nothing exported a drop-in pod's flows.
func dropInNote(key string) string {
	if strings.HasPrefix(key, "app-istio") || strings.HasPrefix(key, "app-linkerd") {
		return " (new: a drop-in pod's flows, which no sidecar of ours exported, now come from the agent)"
	}
	return ""
}

// outbound: the pod's app fetches server1's file intact; server1 sees the
// pod's IP; the agent counts a new connection to server1:8080 for the pod
// (pod_uid), with the workload its init container recorded.
func (k *checker) outbound(key string) (string, error) {
	pod, ip := k.ip[key+"/pod"], k.ip[key]
	want := []string{`reporter="source"`, fmt.Sprintf(`destination_service="%s:8080"`, k.ip["server1"]), fmt.Sprintf(`source_workload="%s"`, k.workload(key))}
	before, err := k.flowMetric(key, opened, want...)
	if err != nil {
		return "", err
	}
	sum, n, err := k.fetch(pod, "app", "http://"+k.ip["server1"]+":8080/file")
	if err != nil {
		return "", err
	}
	if sum != k.sum["server1"] || n != 262144 {
		return "", fmt.Errorf("%s got %d bytes sha256 %s, want 262144 bytes %s", pod, n, sum, k.sum["server1"])
	}
	if err := k.logged("default", "server1", "httpd", peer(ip)); err != nil {
		return "", err
	}
	var after float64
	err = k.c.poll(k.ctx, 5*time.Second, "the agent's count", func() error {
		after, err = k.flowMetric(key, opened, want...)
		if err == nil && after <= before {
			err = fmt.Errorf("agent %s: %s{pod_uid=%q,%s} %v, was %v: the connection was not captured (or not counted)",
				k.ip["agent/pod"], opened, k.ip[key+"/uid"], strings.Join(want, ","), after, before)
		}
		return err
	})
	if err != nil {
		return "", err
	}
	return fmt.Sprintf("256 KiB intact; server1 saw %s; agent's %s{pod_uid=<uid of %s>,%s} %v -> %v%s",
		ip, opened, pod, strings.Join(want, ","), before, after, dropInNote(key)), nil
}

// inbound: server1 fetches the app's file intact; the app sees the
// connection from 127.0.0.6 (the sidecar's inbound source); the agent counts
// it for the pod with reporter="destination" and its workload.
func (k *checker) inbound(key string) (string, error) {
	pod, ip := k.ip[key+"/pod"], k.ip[key]
	want := []string{`reporter="destination"`, fmt.Sprintf(`destination_workload="%s"`, k.workload(key))}
	before, err := k.flowMetric(key, opened, want...)
	if err != nil {
		return "", err
	}
	sum, n, err := k.fetch("server1", "httpd", "http://"+ip+":8080/file")
	if err != nil {
		return "", err
	}
	if sum != k.sum[key] || n != 262144 {
		return "", fmt.Errorf("server1 got %d bytes sha256 %s from %s, want 262144 bytes %s", n, sum, pod, k.sum[key])
	}
	ns, name := splitPod(pod)
	if err := k.logged(ns, name, "app", peer("127.0.0.6")); err != nil {
		return "", err
	}
	var after float64
	err = k.c.poll(k.ctx, 5*time.Second, "the agent's count", func() error {
		after, err = k.flowMetric(key, opened, want...)
		if err == nil && after <= before {
			err = fmt.Errorf("agent %s: %s{pod_uid=%q,%s} %v, was %v: the connection was not captured (or not counted)",
				k.ip["agent/pod"], opened, k.ip[key+"/uid"], strings.Join(want, ","), after, before)
		}
		return err
	})
	if err != nil {
		return "", err
	}
	return fmt.Sprintf("256 KiB intact; the app saw 127.0.0.6; agent's %s{pod_uid=<uid of %s>,%s} %v -> %v%s",
		opened, pod, strings.Join(want, ","), before, after, dropInNote(key)), nil
}

// sidecarMetrics: the sidecar's own /metrics (:15090, what the pod's
// prometheus.io annotations name) still answers, with the proxy's figures
// and none of the pod's flow series or kernel counters: those are the
// agent's alone, so a Prometheus scraping both counts each flow once.
func (k *checker) sidecarMetrics(key string) (string, error) {
	body, err := get(k.ip[key], 15090, "/metrics")
	if err != nil {
		return "", err
	}
	var names []string
	for _, l := range strings.Split(string(body), "\n") {
		if strings.HasPrefix(l, "# TYPE ") {
			names = append(names, strings.Fields(l)[2])
		}
		if strings.HasPrefix(l, "sluice_tcp_") || strings.HasPrefix(l, "istio_tcp_") || strings.HasPrefix(l, "sluice_kernel_events_total") {
			return "", fmt.Errorf("the sidecar of %s exports a flow series or kernel counter, which is the agent's: %s", k.ip[key+"/pod"], l)
		}
	}
	if !slices.Contains(names, "sluice_metrics_listen_failures_total") {
		return "", fmt.Errorf("the sidecar of %s serves no sluice_metrics_listen_failures_total; its families: %v", k.ip[key+"/pod"], names)
	}
	return fmt.Sprintf("%s:15090 serves %d Sluice families, none of them flows: %v", k.ip[key], len(names), sluiceOnly(names)), nil
}

func sluiceOnly(names []string) []string {
	var out []string
	for _, n := range names {
		if strings.HasPrefix(n, "sluice_") {
			out = append(out, n)
		}
	}
	return out
}

// liveFlow holds a connection from the template pod's app to server1 open
// (a partial HTTP request, then nothing for 6 s) and reads the pod's open
// flows from the agent's /flows?pod=<uid>: the flow is there with the
// bytes the pod sent and its smoothed RTT, which only the pod's socket has
// (the open event carries neither). So the agent found a process of the
// pod's cgroup (hostPID), opened its network namespace (SYS_PTRACE) and
// entered it (SYS_ADMIN) to read the socket with sock_diag.
func (k *checker) liveFlow() (string, error) {
	const key = "app"
	pod, dest := k.ip[key+"/pod"], k.ip["server1"]+":8080"
	script := fmt.Sprintf(`{ printf 'GET /file HTTP/1.1\r\nHost: server1\r\n'; sleep 6; } | timeout 7 nc %s 8080 >/dev/null`, k.ip["server1"])
	held := make(chan error, 1)
	go func() {
		_, err := k.exec(pod, "app", script)
		held <- err
	}()
	// The connection ends by itself (timeout kills nc): wait for it, so
	// no check after this one sees it.
	defer func() { <-held }()
	type flow struct {
		Direction   string  `json:"direction"`
		Destination string  `json:"destination"`
		State       string  `json:"state"`
		SRTT        float64 `json:"srtt_seconds"`
		BytesSent   uint64  `json:"bytes_sent"`
		ViaSidecar  bool    `json:"via_sidecar"`
	}
	var got flow
	err := k.c.poll(k.ctx, 5*time.Second, "the open flow in the agent's /flows", func() error {
		select {
		case err := <-held:
			held <- err
			return fmt.Errorf("the held connection ended early (%v)", err)
		default:
		}
		body, err := get(k.ip["agent"], agentPort, "/flows?pod="+k.ip[key+"/uid"])
		if err != nil {
			return err
		}
		var flows []flow
		if err := json.Unmarshal(body, &flows); err != nil {
			return fmt.Errorf("/flows: %w: %s", err, body)
		}
		for _, f := range flows {
			if f.Direction == "outbound" && f.Destination == dest && f.State == "open" {
				got = f
				if f.SRTT > 0 && f.BytesSent > 0 {
					return nil
				}
				return fmt.Errorf("the open flow to %s has srtt %v s and %d bytes sent: not read from the pod's socket (the agent could not enter the pod's network namespace?): %s",
					dest, f.SRTT, f.BytesSent, body)
			}
		}
		return fmt.Errorf("no open outbound flow to %s among %d: %s", dest, len(flows), body)
	})
	if err != nil {
		logs, _ := k.c.kubectl(k.ctx, "logs", "-n", "sluice-system", k.ip["agent/pod"], "--tail", "20")
		return "", fmt.Errorf("%w\nthe agent's log ends:\n%s", err, logs)
	}
	return fmt.Sprintf("open flow %s -> %s via sidecar %t: %d bytes sent, srtt %.0fµs, read in the pod's netns",
		pod, dest, got.ViaSidecar, got.BytesSent, got.SRTT*1e6), nil
}

// dropIn applies deploy/pod/<mesh>-drop-in.yaml. The drop-ins replace only
// the mesh's init container (the mesh injects its own proxy), so the test's
// copy adds the sidecar the mesh's proxy stands for: `sluice run` on the
// mesh's ports as the mesh's proxy uid, with no volume and no capability,
// as pod-template.yaml's sluice-proxy (it asks the pod's hooks, and the
// pod's flows are the agent's).
func (k *checker) dropIn(t *timings, mesh string) (string, error) {
	args, uid, port := `"-p", "15001", "-z", "15006", "-u", "1337", "-g", "1337"`, 1337, 15090
	if mesh == "linkerd" {
		args, uid, port = `"-p", "4140", "-z", "4143", "-u", "2102", "-g", "2102"`, 2102, 4191
	}
	data, err := os.ReadFile(filepath.Join(k.c.repo, "deploy", "pod", mesh+"-drop-in.yaml"))
	if err != nil {
		return "", err
	}
	manifest, err := k.appCommand(string(data), "app-"+mesh)
	if err != nil {
		return "", err
	}
	const containers = "      containers:\n"
	if strings.Count(manifest, containers) != 1 {
		return "", fmt.Errorf("%s-drop-in.yaml: want one %q", mesh, containers)
	}
	sidecar := fmt.Sprintf(`        - name: test-proxy
          image: sluice:dev
          imagePullPolicy: IfNotPresent
          restartPolicy: Always
          command: ["/sluice"]
          args: ["run", %s, "--metrics-addr", ":%d", "--log-format", "json"]
          startupProbe:
            httpGet: {path: /ready, port: %d}
            periodSeconds: 1
            failureThreshold: 30
          securityContext:
            runAsUser: %d
            runAsGroup: %d
            runAsNonRoot: true
            allowPrivilegeEscalation: false
            readOnlyRootFilesystem: true
            capabilities: {drop: ["ALL"]}
`, args, port, port, uid, uid)
	manifest = strings.Replace(manifest, containers, sidecar+containers, 1)
	start := time.Now()
	if err := k.apply("sluice-"+mesh, manifest); err != nil {
		return "", err
	}
	key := "app-" + mesh
	pod, err := k.podOf("default", "app="+key)
	if err != nil {
		k.c.sluiceReport(k.ctx, key, []string{mesh + "-init", "test-proxy", "app"})
		return "", err
	}
	took := time.Since(start)
	t.dropIns = append(t.dropIns, [2]string{mesh, fmt.Sprintf("%.1fs", took.Seconds())})
	return k.describeSluicePod(pod, key, took)
}

// agent installs Sluice as `kubectl apply -k deploy/cni/` does, before
// any Sluice pod, with the node's CNI directories the run's: the agent
// DaemonSet, which is the only reader of the node's flow ring (so every
// pod's flow series the later checks read are its) and installs the
// sluice-cni plugin, and the injector with the Secret and
// MutatingWebhookConfiguration `sluice webhook certs` prints. The agent's
// /metrics answers, the plugin is chained into the node's network
// configuration, and the injector is Ready. Pods of the init-container path
// (every check before 9) run beside the plugin, which leaves them alone.
func (k *checker) agent(t *timings) (string, error) {
	start := time.Now()
	built, err := k.c.kubectl(k.ctx, "kustomize", filepath.Join(k.c.repo, "deploy", "cni"))
	if err != nil {
		return "", err
	}
	// No kube-proxy here: the agent reaches the API server at the node's
	// address, not the kubernetes Service's cluster IP.
	const nodeEnv = "        - name: NODE_NAME\n"
	if strings.Count(string(built), nodeEnv) != 1 {
		return "", fmt.Errorf("deploy/cni/ builds no single agent env NODE_NAME to put the API server's address beside")
	}
	manifest := strings.Replace(string(built), nodeEnv, fmt.Sprintf("        - {name: KUBERNETES_SERVICE_HOST, value: %q}\n        - {name: KUBERNETES_SERVICE_PORT, value: \"%d\"}\n", k.c.nodeIP, k.c.apiPort)+nodeEnv, 1)
	for host, run := range map[string]string{"/opt/cni/bin": k.c.path("cni", "bin"), "/etc/cni/net.d": k.c.path("cni", "net.d")} {
		if strings.Count(manifest, "path: "+host+"\n") != 1 {
			return "", fmt.Errorf("deploy/cni/ builds no single hostPath %s to point at the run's %s", host, run)
		}
		manifest = strings.Replace(manifest, "path: "+host+"\n", "path: "+run+"\n", 1)
	}
	if err := k.apply("sluice-cni", manifest); err != nil {
		return "", err
	}
	certs, err := exec.Command(k.sluiceBin(), "webhook", "certs").Output()
	if err != nil {
		return "", fmt.Errorf("sluice webhook certs: %w", err)
	}
	if err := k.apply("sluice-webhook-certs", string(certs)); err != nil {
		return "", err
	}
	pod, err := k.agentPod()
	if err != nil {
		return "", err
	}
	t.agent = time.Since(start)
	conf := filepath.Join(k.c.path("cni", "net.d"), "10-e2e.conflist")
	err = k.c.poll(k.ctx, 10*time.Second, "sluice-cni chained and copied", func() error {
		data, err := os.ReadFile(conf)
		if err == nil && !strings.Contains(string(data), `"sluice-cni"`) {
			err = fmt.Errorf("%s has no sluice-cni entry:\n%s", conf, data)
		}
		if err == nil {
			_, err = os.Stat(k.c.path("cni", "bin", "sluice-cni"))
		}
		return err
	})
	if err != nil {
		return "", err
	}
	webhook, err := k.podOf("sluice-system", "app.kubernetes.io/name=sluice-webhook")
	if err != nil {
		return "", err
	}
	return fmt.Sprintf("%s %s Ready in %.1fs, /metrics on :%d answers; sluice-cni in the run's CNI bin dir and chained last in %s; injector %s Ready",
		pod, k.ip["agent"], t.agent.Seconds(), agentPort, filepath.Base(conf), webhook), nil
}

// agentPod waits for the agent's Ready pod, records its name and IP (a new
// pod, after a restart, counts from zero: flow counts are compared within
// one agent pod) and waits for its /metrics to answer.
func (k *checker) agentPod() (string, error) {
	pod, err := k.podOf("sluice-system", "app.kubernetes.io/name=sluice-agent")
	if err != nil {
		return "", err
	}
	ip, err := k.field("sluice-system", pod, "{.status.podIP}")
	if err != nil {
		return "", err
	}
	k.ip["agent/pod"], k.ip["agent"] = pod, ip
	err = k.c.poll(k.ctx, 10*time.Second, "the agent's /metrics", func() error {
		_, err := metric(ip, agentPort, "sluice_agent_pods")
		return err
	})
	return pod, err
}

// collect deletes the template's Sluice pod and waits 30 s for its pins to
// be gone, then finds the agent's log line. The Deployment makes a new pod,
// used by the canary check.
func (k *checker) collect(t *timings) (string, error) {
	pod := k.ip["app/pod"]
	_, id, err := k.cgroupOf("default", pod)
	if err != nil {
		return "", err
	}
	pins := filepath.Join(bpffs, "sluice", strconv.FormatUint(id, 10))
	if _, err := k.c.kubectl(k.ctx, "delete", "pod", pod, "--wait", "--timeout", "60s", "--grace-period", "1"); err != nil {
		return "", err
	}
	start := time.Now()
	// The DaemonSet collects every 30 s, counted from its start: within
	// two ticks, whatever the steps before took.
	err = k.c.poll(k.ctx, 70*time.Second, "the agent to collect "+pins, func() error {
		if _, err := os.Stat(pins); err == nil {
			return fmt.Errorf("%s still there", pins)
		}
		return nil
	})
	if err != nil {
		return "", err
	}
	t.collect = time.Since(start)
	// The line may reach the container's log a moment after the pins went.
	err = k.c.poll(k.ctx, 5*time.Second, "the agent's log line", func() error {
		return k.logged("sluice-system", k.ip["agent/pod"], "agent", "pin_dir="+pins)
	})
	if err != nil {
		return "", err
	}
	if _, err := k.templateAgain(); err != nil {
		return "", err
	}
	return fmt.Sprintf("%s gone %.1fs after the pod was deleted; the agent logged it", pins, t.collect.Seconds()), nil
}

// templateAgain waits for the Deployment's new pod and records it.
func (k *checker) templateAgain() (string, error) {
	start := time.Now()
	pod, err := k.podOf("default", "app=app")
	if err != nil {
		return "", err
	}
	return k.describeSluicePod(pod, "app", time.Since(start))
}

// canary sets a 50/50 route for 198.19.0.10:80 on the Sluice pod through
// the agent and checks 20 connections from its app reach both servers.
func (k *checker) canary() (string, error) {
	pod := k.ip["app/pod"]
	uid, err := k.field("default", pod, "{.metadata.uid}")
	if err != nil {
		return "", err
	}
	out, err := k.c.kubectl(k.ctx, "exec", "-n", "sluice-system", k.ip["agent/pod"], "--", "/sluice", "route", "set",
		"--pods", "*pod"+uid+"*", "198.19.0.10:80", k.ip["server1"]+":8080=50", k.ip["server2"]+":8080=50")
	if err != nil {
		return "", err
	}
	slog.Info("route set through the agent", "out", strings.TrimSpace(string(out)))
	got, err := k.exec(pod, "app", "for i in $(seq 20); do wget -qO- http://198.19.0.10:80/id || echo failed; done")
	if err != nil {
		return "", err
	}
	count := map[string]int{}
	for _, l := range strings.Fields(got) {
		count[l]++
	}
	if count["server1"]+count["server2"] != 20 || count["server1"] == 0 || count["server2"] == 0 {
		return "", fmt.Errorf("20 connections to 198.19.0.10:80 answered %v, want both servers and no failure", count)
	}
	return fmt.Sprintf("server1 %d, server2 %d of 20", count["server1"], count["server2"]), nil
}

// offloadPod applies deploy/pod/pod-template.yaml as a second workload,
// app-offload, whose annotations turn on splice and offload of port 8080
// both ways: the init container reads them from the downwardAPI file.
func (k *checker) offloadPod(t *timings) (string, error) {
	data, err := os.ReadFile(k.c.template)
	if err != nil {
		return "", err
	}
	manifest, err := k.appCommand(string(data), "app-offload")
	if err != nil {
		return "", err
	}
	const name, label, scrape, workload = "  name: app\n", "app: app\n", "        prometheus.io/path: /metrics\n", "              value: app\n"
	if strings.Count(manifest, name) != 1 || strings.Count(manifest, label) != 3 || strings.Count(manifest, scrape) != 1 || strings.Count(manifest, workload) != 1 {
		return "", fmt.Errorf("%s: want one %q, three %q, one %q and one %q (SLUICE_WORKLOAD)", k.c.template, name, label, scrape, workload)
	}
	manifest = strings.Replace(manifest, name, "  name: app-offload\n", 1)
	manifest = strings.Replace(manifest, workload, "              value: app-offload\n", 1)
	manifest = strings.ReplaceAll(manifest, label, "app: app-offload\n")
	manifest = strings.Replace(manifest, scrape, scrape+`        sluice.dev/splice: "true"
        sluice.dev/offload-ports: "8080"
        sluice.dev/offload-inbound-ports: "8080"
`, 1)
	start := time.Now()
	if err := k.apply("sluice-offload", manifest); err != nil {
		return "", err
	}
	pod, err := k.podOf("default", "app=app-offload")
	if err != nil {
		k.c.sluiceReport(k.ctx, "app-offload", []string{"sluice-init", "sluice-proxy", "app"})
		return "", err
	}
	t.offloadPod = time.Since(start)
	return k.describeSluicePod(pod, "app-offload", t.offloadPod)
}

// offloadedInbound: server1 fetches the offloaded pod's file intact through
// the sidecar, and the kernel counts the app's reply bytes as sent straight
// out on the sidecar's socket to server1 (offload_bytes, on the agent's
// /metrics for the pod), handed over by the sidecar, which runs with no
// capability and no volume, and counts the handoff on its own /metrics.
func (k *checker) offloadedInbound() (string, error) {
	const key = "app-offload"
	const offloaded, handed = "sluice_kernel_events_total", "sluice_sidecar_offloaded_connections_total"
	before, err := k.flowMetric(key, offloaded, `event="offload_bytes"`)
	if err != nil {
		return "", err
	}
	handedBefore, err := metric(k.ip[key], 15090, handed)
	if err != nil {
		return "", err
	}
	res, err := k.inbound(key)
	if err != nil {
		return "", err
	}
	var after, handedAfter float64
	err = k.c.poll(k.ctx, 5*time.Second, "the offload counts", func() error {
		if after, err = k.flowMetric(key, offloaded, `event="offload_bytes"`); err != nil {
			return err
		}
		if after <= before {
			return fmt.Errorf("agent's %s{pod_uid=%q,event=\"offload_bytes\"} %v, was %v: the app's bytes were not offloaded", offloaded, k.ip[key+"/uid"], after, before)
		}
		if handedAfter, err = metric(k.ip[key], 15090, handed); err != nil {
			return err
		}
		if handedAfter <= handedBefore {
			return fmt.Errorf("the sidecar's %s %v, was %v", handed, handedAfter, handedBefore)
		}
		return nil
	})
	if err != nil {
		return "", err
	}
	return fmt.Sprintf("%s; agent's offload_bytes %v -> %v; sidecar's %s %v -> %v", res, before, after, handed, handedBefore, handedAfter), nil
}
