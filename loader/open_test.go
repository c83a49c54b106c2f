package loader

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	"github.com/sluicemesh/sluice/bpf"
	"github.com/sluicemesh/sluice/internal/testbed"
	"github.com/sluicemesh/sluice/podstate"
	"github.com/sluicemesh/sluice/redirect"
)

// installedPod is a fresh pod of bed with plan installed, outbound only,
// uninstalled at cleanup.
func installedPod(t *testing.T, bed *testbed.Bed, name string, plan redirect.Plan) Target {
	t.Helper()
	target := podIn(t, bed, "", name)
	target.Interface = ""
	if _, err := Install(target, plan, nil, quiet); err != nil {
		t.Fatal(err)
	}
	return target
}

// Open refuses another pod's pins, a read-only handle cannot write, and a
// map missing from the pins is one error that names it.
func TestOpen(t *testing.T) {
	privileged(t)
	bed := testbed.Must(t)
	target := installedPod(t, bed, "app", testPlan())

	other, err := bed.AddPod("other")
	if err != nil {
		t.Fatal(err)
	}
	stranger, err := ResolveTarget(other.Cgroup, target.PinDir)
	if err != nil {
		t.Fatal(err)
	}
	if p, err := Open(stranger, ReadOnly); err == nil || !strings.Contains(err.Error(), "belong to cgroup") {
		if p != nil {
			p.Close()
		}
		t.Errorf("another pod opened the pins: %v, want a refusal", err)
	}

	ro, err := Open(target, ReadOnly, bpf.SluiceMapPodAddrs)
	if err != nil {
		t.Fatal(err)
	}
	defer ro.Close()
	m, err := ro.Map(bpf.SluiceMapPodAddrs)
	if err != nil {
		t.Fatal(err)
	}
	if err := m.Put(uint32(0), bpf.SluiceAddr6{}); err == nil {
		t.Error("a read-only handle wrote pod_addrs")
	}
	if _, err := ro.Plan(); err != nil {
		t.Errorf("read the plan: %v", err)
	}

	if err := os.Remove(filepath.Join(target.PinDir, bpf.SluiceMapHandshakes)); err != nil {
		t.Fatal(err)
	}
	_, err = Open(target, ReadWrite, bpf.SluiceMapCounters, bpf.SluiceMapHandshakes)
	if !errors.Is(err, ErrMissingMap) || !strings.Contains(err.Error(), bpf.SluiceMapHandshakes) {
		t.Errorf("open with %s unpinned: %v, want ErrMissingMap naming it", bpf.SluiceMapHandshakes, err)
	}
}

// ChangeRoutes sets, records rollouts on and deletes routes as Routes and
// a read-only handle reads them; a delete of a service without a route changes
// nothing.
func TestChangeRoutes(t *testing.T) {
	privileged(t)
	target := installedPod(t, testbed.Must(t), "app", testPlan())
	svc := netip.MustParseAddrPort("198.19.0.10:80")
	route := redirect.Route{Service: svc, Backends: []redirect.Backend{
		{Address: netip.MustParseAddr("198.18.2.2"), Port: 8080, Weight: 90},
		{Address: netip.MustParseAddr("198.18.3.2"), Port: 8080, Weight: 10}}}
	// A pod with no route holds no route map: reads find no route, a
	// delete names none and makes none.
	routeMapsPinned := func() (n int) {
		for _, name := range routeMapNames {
			if fi, err := os.Stat(filepath.Join(target.PinDir, name)); err == nil && fi.Mode().Perm() == ownerMode {
				n++
			}
		}
		return n
	}
	if routes, err := Routes(target); err != nil || len(routes) != 0 {
		t.Fatalf("routes of a pod with none: %v, %v", routes, err)
	}
	if err := ChangeRoutes(target, RouteChange{Delete: []netip.AddrPort{svc}}); !errors.Is(err, ErrNoRoute) || routeMapsPinned() != 0 {
		t.Fatalf("delete on a pod with no route: %v, %d route maps pinned", err, routeMapsPinned())
	}
	// A crash between the first route's two pins leaves routes alone:
	// the next change makes both anew.
	half, err := makePodMaps(routeMapNames[:1], false)
	if err != nil {
		t.Fatal(err)
	}
	if err := half[routeMapNames[0]].Pin(filepath.Join(target.PinDir, routeMapNames[0])); err != nil {
		t.Fatal(err)
	}
	half[routeMapNames[0]].Close()
	if err := ChangeRoutes(target, RouteChange{Set: []redirect.Route{route}}); err != nil {
		t.Fatal(err)
	}
	if n := routeMapsPinned(); n != 2 {
		t.Fatalf("%d route maps pinned, root's alone, after the first route, want 2", n)
	}
	if s, err := Status(target); err != nil || !s.Complete {
		t.Fatalf("status with routes: %v, missing %v", err, s.Missing)
	}
	reader, err := Open(target, ReadOnly)
	if err != nil {
		t.Fatal(err)
	}
	defer reader.Close()
	routes, err := reader.Routes()
	if err != nil || len(routes) != 1 || routes[0].Service != svc || len(routes[0].Backends) != 2 || routes[0].Backends[0].Weight != 90 {
		t.Fatalf("routes after set: %+v, %v", routes, err)
	}
	before, err := reader.RoutesVersion()
	if err != nil {
		t.Fatal(err)
	}

	err = ChangeRoutes(target, RouteChange{Rollout: &RolloutRecord{Service: svc, Step: 10, Rollback: RollbackLatency}})
	if err != nil {
		t.Fatal(err)
	}
	routes, err = Routes(target)
	if err != nil || len(routes) != 1 || routes[0].RolloutStep != 10 || routes[0].Rollbacks != 1 || routes[0].LastRollback != RollbackLatency {
		t.Fatalf("routes after a rollback: %+v, %v", routes, err)
	}
	after, err := reader.RoutesVersion()
	if err != nil || after == before {
		t.Errorf("version %d after a change, %d before (%v): want another", after, before, err)
	}

	err = ChangeRoutes(target, RouteChange{Set: []redirect.Route{route}, Delete: []netip.AddrPort{netip.MustParseAddrPort("198.19.0.11:80")}})
	if !errors.Is(err, ErrNoRoute) {
		t.Errorf("delete of a service without a route: %v, want ErrNoRoute", err)
	}
	if v, _ := reader.RoutesVersion(); v != after {
		t.Errorf("a failed change changed the routes (version %d, was %d)", v, after)
	}
	if err := ChangeRoutes(target, RouteChange{Delete: []netip.AddrPort{svc}}); err != nil {
		t.Fatal(err)
	}
	if routes, err := reader.Routes(); err != nil || len(routes) != 0 {
		t.Errorf("routes after delete: %+v, %v", routes, err)
	}
}

// HandOffload on a socket no Sluice hook watches says so: the sidecar
// then proxies. (The kernel's answers in a pod: e2e's
// TestOffloadHandoffIsTheKernels.)
func TestHandOffloadWithoutInstall(t *testing.T) {
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	conn, err := net.Dial("tcp4", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	far, err := conn.(*net.TCPConn).File()
	if err != nil {
		t.Fatal(err)
	}
	defer far.Close()
	_, err = HandOffload(netip.MustParseAddrPort("127.0.0.1:40000"), netip.MustParseAddrPort("127.0.0.1:15001"), int(far.Fd()))
	if !errors.Is(err, ErrNoHook) {
		t.Errorf("HandOffload outside any install: %v, want ErrNoHook", err)
	}
}

// The node's flow ring names each event's pod: a connection of a pod's
// comes with the pod's network namespace. Next waits with a deadline, and once closed
// says io.EOF.
func TestNodeFlowsNameThePod(t *testing.T) {
	privileged(t)
	bed := testbed.Must(t)
	pod, err := bed.AddPod("app")
	if err != nil {
		t.Fatal(err)
	}
	host, err := bed.AddHost("web")
	if err != nil {
		t.Fatal(err)
	}
	ln, err := host.ListenEcho(netip.AddrPortFrom(host.Addr4, 9090).String())
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	target, err := ResolveTarget(pod.Cgroup, "")
	if err != nil {
		t.Fatal(err)
	}
	target.Netns = pod.Netns
	plan := testPlan()
	plan.ExcludeOutboundPorts = []uint16{9090} // a flow of the pod's own, uncaptured
	if _, err := Install(target, plan, nil, quiet); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { Uninstall(target, quiet) })
	root := filepath.Dir(target.PinDir)
	flows, err := OpenNodeFlows(root)
	if err != nil {
		t.Fatal(err)
	}
	defer flows.Close()
	cpus, err := ebpf.PossibleCPU()
	if err != nil {
		t.Fatal(err)
	}
	if got, want := flows.events.BufferSize(), int(flowRingSize(cpus)); got != want {
		t.Errorf("the node's flow ring is %d bytes, want %d for %d CPUs", got, want, cpus)
	}
	for {
		if _, _, err := flows.Next(time.Millisecond); err != nil {
			break // what earlier tests left
		}
	}
	if _, _, err := flows.Next(10 * time.Millisecond); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Errorf("Next with no event: %v, want os.ErrDeadlineExceeded", err)
	}
	pods, err := List(root)
	if err != nil {
		t.Fatal(err)
	}
	at := slices.IndexFunc(pods, func(in Installed) bool { return in.PinDir == target.PinDir })
	if at < 0 || pods[at].NetnsCookie == 0 || !pods[at].RunsThisBuild() {
		t.Fatalf("List: %+v, want the pod with its namespace, in this build", pods)
	}
	// bash's /dev/tcp: a process of the pod connects, and closes.
	conn := exec.Command("bash", "-c", fmt.Sprintf("exec 3<>/dev/tcp/%s/9090", host.Addr4))
	if err := pod.Start(conn); err != nil {
		t.Fatal(err)
	}
	if err := conn.Wait(); err != nil {
		t.Fatal(err)
	}
	// Events wake no reader (the agent polls): poll as it does.
	var netns uint64
	var ev podstate.FlowEvent
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); {
		if netns, ev, err = flows.Next(100 * time.Millisecond); !errors.Is(err, os.ErrDeadlineExceeded) {
			break
		}
	}
	if err != nil || netns != pods[at].NetnsCookie || ev.Kind != podstate.FlowOpened || ev.Remote.Port() != 9090 {
		t.Errorf("first event: netns %d %+v (%v), want the pod's (%d) flow to :9090 opened", netns, ev, err, pods[at].NetnsCookie)
	}
	if err := flows.Close(); err != nil {
		t.Fatal(err)
	}
	if _, _, err := flows.Next(time.Second); !errors.Is(err, io.EOF) {
		t.Errorf("Next after Close: %v, want io.EOF", err)
	}
}

// The kernel's struct flow_event decodes into podstate's Go value.
func TestDecodeFlowEvent(t *testing.T) {
	local, remote := netip.MustParseAddrPort("198.18.1.2:40000"), netip.MustParseAddrPort("[2001:db8::2]:8080")
	raw := bpf.SluiceFlowEvent{Cookie: 7, Kind: uint8(bpf.SluiceFlowKindFLOW_CLOSE),
		Flow:  uint32(bpf.SluiceFlowFlagFLOW_INBOUND | bpf.SluiceFlowFlagFLOW_VIA_SIDECAR),
		Local: Addr6(local.Addr()), LocalPort: local.Port(), Remote: Addr6(remote.Addr()), RemotePort: remote.Port(),
		Orig:    bpf.SluiceOrigDst{Addr: Addr6(local.Addr()), Port: local.Port(), Family: afInet},
		StartNs: 10, EndNs: 20, ConnectUs: 1500, SrttUs: 250, MinRttUs: 100,
		BytesSent: 3, BytesReceived: 4, Retrans: 5, End: uint8(bpf.SluiceFlowEndEND_RST), NetnsCookie: 9}
	var buf bytes.Buffer
	if err := binary.Write(&buf, binary.NativeEndian, &raw); err != nil {
		t.Fatal(err)
	}
	netns, got, err := decodeFlowEvent(buf.Bytes())
	if err != nil || netns != 9 {
		t.Fatalf("netns %d (%v), want 9", netns, err)
	}
	want := podstate.FlowEvent{Cookie: 7, Kind: podstate.FlowClosed, Inbound: true, ViaSidecar: true,
		Local: local, Remote: remote, OriginalDst: local, StartNs: 10, EndNs: 20,
		ConnectLatency: 1500 * time.Microsecond, SRTT: 250 * time.Microsecond, MinRTT: 100 * time.Microsecond,
		BytesSent: 3, BytesReceived: 4, Retransmits: 5, End: podstate.EndRst}
	if got != want {
		t.Errorf("decoded\n%+v, want\n%+v", got, want)
	}
	if _, _, err := decodeFlowEvent(buf.Bytes()[:8]); err == nil {
		t.Error("a short event decoded")
	}
}
