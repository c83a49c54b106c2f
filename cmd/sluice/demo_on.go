//go:build demo

package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"os/exec"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/sluicemesh/sluice/agent"
	"github.com/sluicemesh/sluice/internal/testbed"
	"github.com/sluicemesh/sluice/loader"
	"github.com/sluicemesh/sluice/redirect"
	"github.com/sluicemesh/sluice/sidecar"
	"github.com/sluicemesh/sluice/telemetry"
)

// runDemoHelper runs the demo's helper roles (the app the demo starts in the
// pod is this binary again) and exits when asked to; the helpers exist only
// in a binary built with the demo tag.
func runDemoHelper() { testbed.RunHelperIfRequested() }

func demoCommand() command {
	c := command{
		name:    "demo",
		summary: "build a throwaway pod, capture its traffic, show what the sidecar saw, clean up",
		help: `Usage: sluice demo

Creates a pod (network namespace + veth + cgroup v2) and a remote host in its
own namespace (addresses from 198.18.0.0/15 and 2001:2::/48), installs
capture on the pod's cgroup (outbound, port 9090 excluded) and on its network
namespace (inbound), starts the sidecar in the pod and the node's agent, sends 1 MiB
from the app to the host and from the host to the app over IPv4 and IPv6, and
prints the original destination the sidecar saw for each connection, then the
flows the kernel measured and the metrics the agent exports, then shifts a canary route
from 100/0 to 90/10 to 0/100 while the app connects and shows where its
connections landed. Removes everything at the end, also on failure. Exits 1
if any check fails.

Example:
  sluice demo`,
	}
	c.run = func(ctx context.Context, args []string, stdout io.Writer) error {
		fs := flag.NewFlagSet("demo", flag.ContinueOnError)
		if err := parseFlags(fs, c, args, stdout); err != nil {
			return err
		}
		if err := requireRoot(); err != nil {
			return err
		}
		return demo(stdout)
	}
	return c
}

// demoCase is one connection: from the pod's app out to the host, or from
// the host into the pod's app.
type demoCase struct {
	inbound  bool
	addr     netip.AddrPort
	captured bool
	note     string
}

func demo(w io.Writer) (err error) {
	exe, err := os.Executable()
	if err != nil {
		return err
	}
	bed, err := testbed.New("sluice-demo")
	if err != nil {
		return fmt.Errorf("build test bed: %w", err)
	}
	defer func() { err = errors.Join(err, bed.Close()) }()
	pod, host, cases, err := demoBed(w, bed)
	if err != nil {
		return err
	}
	in, err := demoInstall(w, pod)
	if err != nil {
		return err
	}
	defer func() { err = errors.Join(err, loader.Uninstall(in.target, in.log)) }()
	sidecar, err := pod.StartLogged(exec.Command(exe, "run", "--cgroup", pod.Cgroup, "--log-format", "json", "--log-level", "debug"))
	if err != nil {
		return err
	}
	ready, err := sidecar.WaitFor("listening", nil, 10*time.Second)
	if err != nil {
		return err
	}
	fmt.Fprintf(w, "3. sidecar `sluice run` in the pod: pid %d, listening on %s as uid %d\n", sidecar.Cmd.Process.Pid, ready.Str("addrs"), ready.Num("uid"))
	agentAddr, stopAgent, err := demoAgent(in.log)
	if err != nil {
		return err
	}
	defer stopAgent()
	fmt.Fprintf(w, "   node agent (`sluice agent`, here in this process): every pod's flows on http://%s\n", agentAddr)
	follow, err := followAgent(agentAddr, pod.Cgroup)
	if err != nil {
		return err
	}
	defer follow.Close()
	if err := demoConnections(w, pod, host, sidecar, exe, cases); err != nil {
		return err
	}
	if err := demoFlows(w, follow, len(cases)); err != nil {
		return err
	}
	if err := demoMetrics(w, agentAddr); err != nil {
		return err
	}
	if err := demoCanary(w, bed, pod, in.target, exe); err != nil {
		return err
	}
	if err := demoRerunSteps(w, pod, netip.AddrPortFrom(host.Addr4, 8080), in, exe); err != nil {
		return err
	}
	fmt.Fprintf(w, "\n11. removing the capture, the sidecar, the pod and the hosts\n")
	return nil
}

// demoBed adds the demo's pod and remote host, each with its echo servers,
// and the connections the demo makes between them.
func demoBed(w io.Writer, bed *testbed.Bed) (*testbed.Pod, *testbed.Host, []demoCase, error) {
	pod, err := bed.AddPod("app")
	if err != nil {
		return nil, nil, nil, err
	}
	host, err := bed.AddHost("web")
	if err != nil {
		return nil, nil, nil, err
	}
	cases := []demoCase{
		{false, netip.AddrPortFrom(host.Addr4, 8080), true, "outbound, captured"},
		{false, netip.AddrPortFrom(host.Addr6, 8080), true, "outbound, captured (IPv6)"},
		{false, netip.AddrPortFrom(host.Addr4, 9090), false, "outbound, direct: port 9090 excluded (-o 9090)"},
		{true, netip.AddrPortFrom(pod.Addr4, 8080), true, "inbound, captured"},
		{true, netip.AddrPortFrom(pod.Addr6, 8080), true, "inbound, captured (IPv6)"},
	}
	for _, c := range cases[:3] {
		if _, err := host.ListenEcho(c.addr.String()); err != nil {
			return nil, nil, nil, err
		}
	}
	if _, err := pod.ListenEcho("[::]:8080"); err != nil {
		return nil, nil, nil, err
	}
	fmt.Fprintf(w, "1. pod %q: netns %s, cgroup %s, address %s / %s, app echo server on port 8080\n", pod.Name, pod.Netns, pod.Cgroup, pod.Addr4, pod.Addr6)
	fmt.Fprintf(w, "   remote host %q: echo servers on %s and %s, ports 8080 and 9090\n", host.Name, host.Addr4, host.Addr6)
	return pod, host, cases, nil
}

// demoInstalled is the demo pod's install: what later steps rerun with
// other flags.
type demoInstalled struct {
	target loader.Target
	plan   redirect.Plan
	args   []string
	log    *slog.Logger
}

// demoInstall installs capture on the pod, port 9090 excluded. The caller
// uninstalls it.
func demoInstall(w io.Writer, pod *testbed.Pod) (demoInstalled, error) {
	policy := redirect.DefaultPolicy()
	if err := policy.ExcludeOutboundPorts.Set("9090"); err != nil {
		return demoInstalled{}, err
	}
	plan, err := policy.Plan()
	if err != nil {
		return demoInstalled{}, err
	}
	target, err := loader.ResolveTarget(pod.Cgroup, "")
	if err != nil {
		return demoInstalled{}, err
	}
	target.Netns, target.Interface = pod.Netns, pod.Iface
	log, _ := newLogger(os.Stderr, "text", "warn")
	args := []string{"--cgroup", pod.Cgroup, "--netns", pod.Netns, "-o", "9090"}
	if _, err := loader.Install(target, plan, args, log); err != nil {
		return demoInstalled{}, err
	}
	fmt.Fprintf(w, "2. installed capture on the pod's cgroup (outbound) and its network namespace (inbound), pinned at %s; no iptables\n", target.PinDir)
	return demoInstalled{target, plan, args, log}, nil
}

// demoConnections makes each case's connection and shows what each end saw.
func demoConnections(w io.Writer, pod *testbed.Pod, host *testbed.Host, sidecar *testbed.Logged, exe string, cases []demoCase) error {
	fmt.Fprintf(w, "4. each client sends 1 MiB and reads the echo:\n\n")
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "FROM\tCONNECTS TO\tCLIENT'S PEER (getpeername)\tSIDECAR SAW ORIGINAL DST\tECHO\tPATH")
	var failures []error
	for _, c := range cases {
		from, run := "app", pod.RunClient
		if c.inbound {
			from, run = "web", host.RunClient
		}
		saw, echo, cerr := demoConnect(run, sidecar, exe, c)
		if cerr != nil {
			failures = append(failures, cerr)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", from, c.addr, saw.peer, saw.origDst, echo, c.note)
	}
	tw.Flush()
	return errors.Join(failures...)
}

// demoFlows shows the n flows closing: one per connection, seen from the
// socket on the wire (the sidecar's upstream or accepted socket, or the
// app's own).
func demoFlows(w io.Writer, follow *flowFollower, n int) error {
	flows, err := follow.closed(n, 10*time.Second)
	if err != nil {
		return err
	}
	fmt.Fprintf(w, "\n5. the flows, measured in the kernel, as 'sluice flows --follow' shows them closing:\n\n")
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "DIRECTION\tSOURCE\tDESTINATION\tVIA SIDECAR\tCONNECT\tSRTT\tSENT\tRECEIVED\tEND")
	for _, f := range flows {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", f.Direction, f.Source, f.Destination, via(f),
			seconds(f.ConnectLatency), seconds(f.SRTT), bytesOf(f.BytesSent), bytesOf(f.BytesReceived), f.End)
	}
	tw.Flush()
	return nil
}

// demoMetrics shows a few of the pod's metrics the agent exports.
func demoMetrics(w io.Writer, agentAddr string) error {
	metrics, err := get(agentAddr, "/metrics")
	if err != nil {
		return err
	}
	fmt.Fprintf(w, "\n6. a few of the pod's metrics Prometheus scrapes from the node's agent (:9102/metrics in a cluster):\n\n")
	for _, line := range strings.Split(string(metrics), "\n") {
		if strings.HasPrefix(line, "sluice_tcp_connections_closed_total{") || strings.HasPrefix(line, "sluice_tcp_sent_bytes_total{") {
			fmt.Fprintln(w, "   "+shortLabels(line))
		}
	}
	return nil
}

// demoRerunSteps reruns install as a user would: splice on, then offload
// of the echo's port, then the port kernel-only.
func demoRerunSteps(w io.Writer, pod *testbed.Pod, addr netip.AddrPort, in demoInstalled, exe string) error {
	plan := in.plan
	plan.Splice = true
	if err := demoSplice(w, pod, addr, in.target, plan, append(in.args, "--splice"), exe, in.log); err != nil {
		return err
	}
	plan.OffloadPorts = []uint16{8080}
	if err := demoOffload(w, pod, addr, in.target, plan, append(in.args, "--splice", "--offload-ports", "8080"), exe, in.log); err != nil {
		return err
	}
	plan.OffloadPorts = nil
	plan.KernelOnlyPorts = []uint16{8080}
	return demoKernelOnly(w, pod, addr, in.target, plan, append(in.args, "--splice", "--kernel-only-ports", "8080"), exe, in.log)
}

// demoRerun reinstalls with plan, as a user reruns install with new flags,
// echoes 1 MiB to addr from the app, and returns the echo and what the
// kernel's counters gained meanwhile.
func demoRerun(pod *testbed.Pod, addr netip.AddrPort, target loader.Target, plan redirect.Plan, args []string, exe string, log *slog.Logger) (testbed.ClientResult, map[string]uint64, error) {
	if _, err := loader.Install(target, plan, args, log); err != nil {
		return testbed.ClientResult{}, nil, err
	}
	before, err := loader.Status(target)
	if err != nil {
		return testbed.ClientResult{}, nil, err
	}
	res, err := pod.RunClient(exe, addr.String(), 1<<20)
	if err != nil {
		return res, nil, err
	}
	if res.Received != res.Sent || res.SentSHA != res.RecvSHA {
		return res, nil, fmt.Errorf("echo to %s not intact: sent %d, received %d", addr, res.Sent, res.Received)
	}
	after, err := loader.Status(target)
	if err != nil {
		return res, nil, err
	}
	gained := map[string]uint64{}
	for name, n := range after.Counters {
		gained[name] = n - before.Counters[name]
	}
	return res, gained, nil
}

// demoKernelOnly makes the echo's port kernel-only with a rerun of install
// and shows a connection going straight to its destination, measured and
// counted in the kernel.
func demoKernelOnly(w io.Writer, pod *testbed.Pod, addr netip.AddrPort, target loader.Target, plan redirect.Plan, args []string, exe string, log *slog.Logger) error {
	res, gained, err := demoRerun(pod, addr, target, plan, args, exe, log)
	if err != nil {
		return err
	}
	if res.ServerSaw != res.Local {
		return fmt.Errorf("kernel-only echo to %s: the server saw %s, not the app's socket %s", addr, res.ServerSaw, res.Local)
	}
	fmt.Fprintf(w, "\n10. kernel-only, turned on for port %d by rerunning install with --kernel-only-ports: no sidecar in the path.\n", addr.Port())
	fmt.Fprintf(w, "    A 1 MiB echo to %s, intact; the server saw the app's own socket %s, the app's peer is %s;\n", addr, res.Local, res.Peer)
	fmt.Fprintf(w, "    the kernel measured the flow and counted it: kernel_only_outbound +%d\n", gained["kernel_only_outbound"])
	return nil
}

// demoOffload offloads the echo's port with a rerun of install: the sidecar
// still accepts and dials (the server sees its socket), and the app's bytes
// then go straight out on the sidecar's upstream socket. The sidecar learns
// from the pod's hooks that the install now has offload ports within
// sidecar.OffloadRefresh.
func demoOffload(w io.Writer, pod *testbed.Pod, addr netip.AddrPort, target loader.Target, plan redirect.Plan, args []string, exe string, log *slog.Logger) error {
	if _, err := loader.Install(target, plan, args, log); err != nil {
		return err
	}
	time.Sleep(2 * sidecar.OffloadRefresh)
	res, gained, err := demoRerun(pod, addr, target, plan, args, exe, log)
	if err != nil {
		return err
	}
	if res.ServerSaw == res.Local || gained["offload_bytes"] == 0 {
		return fmt.Errorf("offloaded echo to %s: the server saw %s (the app is %s), counters gained %v; want the sidecar's socket, and bytes offloaded", addr, res.ServerSaw, res.Local, gained)
	}
	fmt.Fprintf(w, "\n9. offload, turned on for port %d by rerunning install with --offload-ports: the sidecar accepts and dials,\n", addr.Port())
	fmt.Fprintf(w, "   then the app's bytes go straight out on its upstream socket (the replies still come through it).\n")
	fmt.Fprintf(w, "   A 1 MiB echo to %s, intact; the server saw the sidecar's socket %s;\n", addr, res.ServerSaw)
	fmt.Fprintf(w, "   offload_messages +%d, offload_bytes +%d, offload_via_sidecar +%d\n", gained["offload_messages"], gained["offload_bytes"], gained["offload_via_sidecar"])
	return nil
}

// demoSplice turns splice on with a rerun of install, as a user would, and
// shows the splice program's counters over one captured connection.
func demoSplice(w io.Writer, pod *testbed.Pod, addr netip.AddrPort, target loader.Target, plan redirect.Plan, args []string, exe string, log *slog.Logger) error {
	_, gained, err := demoRerun(pod, addr, target, plan, args, exe, log)
	if err != nil {
		return err
	}
	fmt.Fprintf(w, "\n8. splice, turned on by rerunning install with --splice: the app's hop to the sidecar skips loopback TCP.\n")
	fmt.Fprintf(w, "   A 1 MiB echo to %s, intact; 'sluice status' counts the bytes that went socket to socket:\n\n", addr)
	for _, name := range []string{"splice_sockets_joined", "splice_messages", "splice_bytes"} {
		fmt.Fprintf(w, "   %-22s +%d\n", name, gained[name])
	}
	return nil
}

// demoCanary shifts a service from v1 to v2 in three steps, sending the
// app's connections to it at each, and shows where they landed.
func demoCanary(w io.Writer, bed *testbed.Bed, pod *testbed.Pod, target loader.Target, exe string) error {
	const service, perStep = "198.19.0.10:80", 100
	v1, err := bed.AddHost("v1")
	if err != nil {
		return err
	}
	v2, err := bed.AddHost("v2")
	if err != nil {
		return err
	}
	b1, b2 := netip.AddrPortFrom(v1.Addr4, 8080), netip.AddrPortFrom(v2.Addr4, 8080)
	l1, err := v1.ListenEcho(b1.String())
	if err != nil {
		return err
	}
	l2, err := v2.ListenEcho(b2.String())
	if err != nil {
		return err
	}
	fmt.Fprintf(w, "\n7. a canary route: the app connects to the service %s, which no host has; the kernel picks\n", service)
	fmt.Fprintf(w, "   v1 (%s) or v2 (%s) for each connection by weight, and the weights change live:\n\n", b1, b2)
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "WEIGHTS v1/v2\tCONNECTIONS\tREACHED v1\tREACHED v2\tAPP'S PEER")
	svc := netip.MustParseAddrPort(service)
	for _, weights := range [][2]uint32{{100, 0}, {90, 10}, {0, 100}} {
		route := redirect.Route{Service: svc, Backends: []redirect.Backend{
			{Address: b1.Addr(), Port: b1.Port(), Weight: weights[0]},
			{Address: b2.Addr(), Port: b2.Port(), Weight: weights[1]},
		}}
		if err := loader.ChangeRoutes(target, loader.RouteChange{Set: []redirect.Route{route}}); err != nil {
			return err
		}
		before1, before2 := l1.Accepted(), l2.Accepted()
		peer := ""
		for range perStep {
			res, err := pod.RunClient(exe, service, 100)
			if err != nil {
				return fmt.Errorf("app to %s: %w", service, err)
			}
			peer = res.Peer
		}
		fmt.Fprintf(tw, "%d/%d\t%d\t%d\t%d\t%s\n", weights[0], weights[1], perStep, l1.Accepted()-before1, l2.Accepted()-before2, peer)
	}
	tw.Flush()
	return nil
}

// shortLabels keeps the labels of a metric line that tell its series apart
// in the demo; the rest of Istio's label set is "unknown" or the same.
func shortLabels(line string) string {
	name, rest, _ := strings.Cut(line, "{")
	labels, value, _ := strings.Cut(rest, "} ")
	var keep []string
	for _, l := range strings.Split(labels, ",") {
		if strings.HasPrefix(l, "reporter=") || strings.HasPrefix(l, "destination_service=") {
			keep = append(keep, l)
		}
	}
	return fmt.Sprintf("%s{%s,...} %s", name, strings.Join(keep, ","), value)
}

// get fetches path from the agent at addr.
func get(addr, path string) ([]byte, error) {
	cl := http.Client{Timeout: 10 * time.Second}
	resp, err := cl.Get("http://" + addr + path)
	if err != nil {
		return nil, fmt.Errorf("reach the agent: %w", err)
	}
	defer resp.Body.Close()
	return io.ReadAll(resp.Body)
}

// flowFollower reads the agent's stream of a pod's flow events.
type flowFollower struct {
	conn  net.Conn
	lines *bufio.Scanner
}

// demoAgent runs the node's agent in this process, serving on loopback,
// until stop.
func demoAgent(log *slog.Logger) (addr string, stop func(), err error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", nil, err
	}
	a := agent.New(agent.Options{PinRoot: loader.DefaultPinRoot, MaxDestinations: 100, Logger: log})
	srv := &http.Server{Handler: a.Handler(), ReadHeaderTimeout: 10 * time.Second}
	go srv.Serve(ln)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		a.Run(ctx, time.Minute)
	}()
	return ln.Addr().String(), func() {
		cancel()
		<-done
		srv.Close()
	}, nil
}

// followAgent follows the flows of the pod in cgroup at the agent.
func followAgent(addr, cgroup string) (*flowFollower, error) {
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return nil, fmt.Errorf("reach the agent: %w", err)
	}
	req, _ := http.NewRequest(http.MethodGet, "http://"+addr+"/flows?follow=true&pod="+url.QueryEscape(cgroup), nil)
	if err := req.Write(c); err != nil {
		c.Close()
		return nil, err
	}
	r := bufio.NewReader(c)
	resp, err := http.ReadResponse(r, req)
	if err != nil {
		c.Close()
		return nil, err
	}
	return &flowFollower{conn: c, lines: bufio.NewScanner(resp.Body)}, nil
}

// closed returns the next n flows that close, waiting up to timeout.
func (f *flowFollower) closed(n int, timeout time.Duration) ([]telemetry.Flow, error) {
	f.conn.SetDeadline(time.Now().Add(timeout))
	var out []telemetry.Flow
	for len(out) < n && f.lines.Scan() {
		var fl telemetry.Flow
		if err := json.Unmarshal(f.lines.Bytes(), &fl); err != nil {
			return nil, err
		}
		if fl.State == telemetry.StateClosed {
			out = append(out, fl)
		}
	}
	if len(out) < n {
		return out, fmt.Errorf("the agent reported %d closed flows within %s, want %d: %v", len(out), timeout, n, f.lines.Err())
	}
	return out, nil
}

func (f *flowFollower) Close() error { return f.conn.Close() }

type demoSeen struct{ peer, origDst string }

// demoConnect runs a client once and checks the result against the case.
func demoConnect(run func(self, addr string, size int) (testbed.ClientResult, error), sidecar *testbed.Logged, exe string, c demoCase) (demoSeen, string, error) {
	const size = 1 << 20
	seen := demoSeen{peer: "-", origDst: "-"}
	res, err := run(exe, c.addr.String(), size)
	if err != nil {
		return seen, "failed", fmt.Errorf("app to %s: %w", c.addr, err)
	}
	seen.peer = res.Peer
	echo := "1 MiB intact"
	if res.Received != size || res.RecvSHA != res.SentSHA {
		echo = "CORRUPT"
		err = fmt.Errorf("echo from %s not intact", c.addr)
	}
	if res.ServerSaw != res.Local {
		e, werr := sidecar.WaitFor("proxied", func(e testbed.LogEntry) bool { return e.Str("client") == res.Local }, 5*time.Second)
		if werr != nil {
			return seen, echo, errors.Join(err, werr)
		}
		seen.origDst = e.Str("orig_dst")
	}
	switch {
	case c.captured && seen.origDst != c.addr.String():
		err = errors.Join(err, fmt.Errorf("sidecar saw %s for %s", seen.origDst, c.addr))
	case !c.captured && seen.origDst != "-":
		err = errors.Join(err, fmt.Errorf("connection to %s should have bypassed the sidecar", c.addr))
	case res.Peer != c.addr.String():
		err = errors.Join(err, fmt.Errorf("app's peer is %s, want %s", res.Peer, c.addr))
	}
	return seen, echo, err
}
