package main

import (
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"time"

	"github.com/sluicemesh/sluice/internal/dnstest"
)

// dnsName is the Service name the e2e's nameserver answers, with web's
// cluster IP.
const dnsName = "web.shop.svc.cluster.local"

// nameserver answers A queries for dnsName on the node's address, port 53
// (UDP): the pods of the DNS check name it in their resolv.conf. It counts
// the queries and remembers where the last came from.
type nameserver struct {
	conn    *net.UDPConn
	answer  netip.Addr
	queries atomic.Int64
	last    atomic.Value // netip.Addr
}

func startNameserver(addr string, answer netip.Addr) (*nameserver, error) {
	conn, err := net.ListenUDP("udp4", net.UDPAddrFromAddrPort(netip.AddrPortFrom(netip.MustParseAddr(addr), 53)))
	if err != nil {
		return nil, fmt.Errorf("the e2e's nameserver on %s:53: %w", addr, err)
	}
	ns := &nameserver{conn: conn, answer: answer}
	go ns.serve()
	return ns, nil
}

func (ns *nameserver) serve() {
	buf := make([]byte, 4096)
	for {
		n, from, err := ns.conn.ReadFromUDPAddrPort(buf)
		if err != nil {
			return
		}
		ns.queries.Add(1)
		ns.last.Store(from.Addr().Unmap())
		if a := ns.reply(buf[:n]); a != nil {
			ns.conn.WriteToUDPAddrPort(a, from)
		}
	}
}

// reply answers one query: dnsName's A record, NXDOMAIN for other names,
// no record for other types.
func (ns *nameserver) reply(q []byte) []byte {
	name, qtype, _, ok := dnstest.Question(q)
	switch {
	case !ok:
		return nil
	case name != dnsName:
		return dnstest.Answer(q, dnstest.RcodeNXDomain, false)
	case qtype == dnstest.TypeA:
		return dnstest.Answer(q, dnstest.RcodeNoError, false, ns.answer.AsSlice())
	}
	return dnstest.Answer(q, dnstest.RcodeNoError, false)
}

func (ns *nameserver) close() { ns.conn.Close() }

// lookupThroughSidecar runs nslookup of dnsName in the pod's app container
// and checks that the sidecar's forwarder answered it (vip) and that ns saw
// the query come from the pod; it says what it saw.
func (k *checker) lookupThroughSidecar(ns *nameserver, namespace, pod, sidecar string, vip netip.Addr) (string, error) {
	ip, err := k.field(namespace, pod, "{.status.podIP}")
	if err != nil {
		return "", err
	}
	before := ns.queries.Load()
	start := time.Now()
	out, err := k.exec(namespace+"/"+pod, "app", "nslookup "+dnsName)
	took := time.Since(start)
	if err != nil || !strings.Contains(out, vip.String()) {
		logs, _ := k.c.kubectl(k.ctx, "logs", "-n", namespace, pod, "-c", sidecar, "--tail", "20")
		return "", fmt.Errorf("nslookup %s in %s/%s: %v:\n%s\nthe sidecar's log ends:\n%s", dnsName, namespace, pod, err, out, logs)
	}
	forwarded, err := metric(ip, 15090, "sluice_dns_queries_total")
	if err != nil || forwarded == 0 {
		return "", fmt.Errorf("the sidecar's forwarder counted %v queries (%v): the lookup did not go through it", forwarded, err)
	}
	last, _ := ns.last.Load().(netip.Addr)
	if ns.queries.Load() == before || last.String() != ip {
		return "", fmt.Errorf("the nameserver saw %d queries, the last from %v: want the pod's %s", ns.queries.Load()-before, last, ip)
	}
	return fmt.Sprintf("nslookup %s = %s in %v through the sidecar's forwarder (sluice_dns_queries_total %v); the nameserver saw the queries from the pod %s",
		dnsName, vip, took.Round(time.Millisecond), forwarded, ip), nil
}

// dnsNameserver starts the e2e's nameserver, answering dnsName with web's
// cluster IP.
func (k *checker) dnsNameserver() (*nameserver, netip.Addr, error) {
	vip, err := netip.ParseAddr(k.ip["web-vip"])
	if err != nil {
		return nil, vip, fmt.Errorf("web's cluster IP %q (check 10 makes it): %v", k.ip["web-vip"], err)
	}
	ns, err := startNameserver(k.c.nodeIP, vip)
	return ns, vip, err
}

// dnsCNI: a pod in the injector's restricted namespace annotated
// sluice.dev/redirect-dns (CNI mode: sluice-cni installs its capture, the
// injector's sidecar serves the forwarder, no privilege in the pod), its
// resolv.conf naming the e2e's nameserver, which the install was not told
// of: the plugin captures every query to port 53, and the forwarder asks
// the nameserver the app asked.
func (k *checker) dnsCNI() (string, error) {
	ns, vip, err := k.dnsNameserver()
	if err != nil {
		return "", err
	}
	defer ns.close()
	manifest := k.sleeperManifest("dns-cni", `{sluice.dev/redirect-dns: "true"}`)
	const spec = "      terminationGracePeriodSeconds: 1\n"
	if strings.Count(manifest, spec) != 1 {
		return "", fmt.Errorf("the sleeper's manifest: want one %q", spec)
	}
	manifest = strings.Replace(manifest, spec, spec+fmt.Sprintf("      dnsPolicy: None\n      dnsConfig: {nameservers: [%q]}\n", k.c.nodeIP), 1)
	if err := k.apply("dns-cni", manifest); err != nil {
		return "", err
	}
	pod, err := k.podOf(cniNS, "app=dns-cni")
	if err != nil {
		return "", err
	}
	names, err := k.containerNames(cniNS, pod)
	if err != nil || names != "sluice-proxy / app" {
		return "", fmt.Errorf("%s/%s has containers %q (%v), want the injector's sidecar and the app", cniNS, pod, names, err)
	}
	saw, err := k.lookupThroughSidecar(ns, cniNS, pod, "sluice-proxy", vip)
	if err != nil {
		return "", err
	}
	return fmt.Sprintf("%s: containers %q; %s", pod, names, saw), nil
}

// dnsDropIn: Istio's drop-in with DNS capture on, as Istio's injector
// turns it on (ISTIO_META_DNS_CAPTURE=true on istio-init), in a pod whose
// resolv.conf names the e2e's nameserver: the app's lookup of a Service
// name is answered through the sidecar's DNS forwarder (its
// sluice_dns_queries_total counts it) and the nameserver sees the query
// come from the pod (the forwarder's, as the proxy, uncaptured).
func (k *checker) dnsDropIn() (string, error) {
	ns, vip, err := k.dnsNameserver()
	if err != nil {
		return "", err
	}
	defer ns.close()
	data, err := os.ReadFile(filepath.Join(k.c.repo, "deploy", "pod", "istio-drop-in.yaml"))
	if err != nil {
		return "", err
	}
	manifest := strings.ReplaceAll(string(data), "app-istio", "app-istio-dns")
	if manifest, err = k.appCommand(manifest, "app-istio-dns"); err != nil {
		return "", err
	}
	for _, edit := range []struct{ old, new string }{
		// What Istio's injector sets for DNS proxying.
		{"          env:\n", "          env:\n            - {name: ISTIO_META_DNS_CAPTURE, value: \"true\"}\n"},
		{"      initContainers:\n", fmt.Sprintf("      dnsPolicy: None\n      dnsConfig: {nameservers: [%q], searches: [shop.svc.cluster.local]}\n      initContainers:\n", k.c.nodeIP)},
		// The sidecar, a native one (an init container that keeps
		// running), after the install, as dropIn adds it.
		{"      containers:\n", `        - name: test-proxy
          image: sluice:dev
          imagePullPolicy: IfNotPresent
          restartPolicy: Always
          command: ["/sluice"]
          args: ["run", "--metrics-addr", ":15090", "--log-format", "json"]
          startupProbe:
            httpGet: {path: /ready, port: 15090}
            periodSeconds: 1
            failureThreshold: 30
          securityContext: {runAsUser: 1337, runAsGroup: 1337, runAsNonRoot: true, allowPrivilegeEscalation: false, readOnlyRootFilesystem: true, capabilities: {drop: ["ALL"]}}
      containers:
`},
	} {
		if strings.Count(manifest, edit.old) != 1 {
			return "", fmt.Errorf("istio-drop-in.yaml: want one %q", edit.old)
		}
		manifest = strings.Replace(manifest, edit.old, edit.new, 1)
	}
	if err := k.apply("istio-dns", manifest); err != nil {
		return "", err
	}
	pod, err := k.podOf("default", "app=app-istio-dns")
	if err != nil {
		k.c.sluiceReport(k.ctx, "app-istio-dns", []string{"istio-init", "test-proxy", "app"})
		return "", err
	}
	return k.lookupThroughSidecar(ns, "default", pod, "test-proxy", vip)
}
