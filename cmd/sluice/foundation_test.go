package main

// Regression tests for the defects found by trying the first build as a
// platform engineer would (issue 14), each through the real CLI, in real
// pods, with real traffic.

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"

	"github.com/sluicemesh/sluice/internal/testbed"
	"github.com/sluicemesh/sluice/loader"
)

// A Kubernetes pod under the systemd cgroup driver: every name has dots and
// the processes run in a container's scope below the pod's slice, where
// capture is installed.
var systemdPodPath = []string{
	"kubepods.slice", "kubepods-burstable.slice",
	"kubepods-burstable-pod3f2a8c1e_5b7d_4e0a_9c6f_1d2e3f4a5b6c.slice",
	"cri-containerd-8d9e0f1a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d.scope",
}

func TestSystemdStylePodIsCaptured(t *testing.T) {
	c := newCapturedPodIn(t, systemdPodPath)
	c.startSidecar(t)
	for _, a := range []netip.Addr{c.host.Addr4, c.host.Addr6} {
		addr := netip.AddrPortFrom(a, 8080).String()
		c.expectProxied(t, c.client(t, addr), addr)
	}
	state := statusJSON(t, c.cgroup)
	if !state.Complete || state.Target.Cgroup != c.cgroup {
		t.Errorf("status of %s: complete %v, cgroup %s, missing %v", c.cgroup, state.Complete, state.Target.Cgroup, state.Missing)
	}
	if want := filepath.Join(loader.DefaultPinRoot, fmt.Sprint(state.Target.CgroupID)); state.Target.PinDir != want {
		t.Errorf("pins at %s, want %s (the cgroup id)", state.Target.PinDir, want)
	}
}

func statusJSON(t *testing.T, cgroup string) loader.State {
	t.Helper()
	res := runCLI(t, sluice(t, "status", "--cgroup", cgroup, "--json"))
	var s loader.State
	if err := json.Unmarshal([]byte(res.stdout), &s); err != nil {
		t.Fatalf("status --json: %v (exit %d, %s%s)", err, res.code, res.stdout, res.stderr)
	}
	if (res.code == 0) != s.Complete {
		t.Errorf("status exits %d but says complete=%v", res.code, s.Complete)
	}
	return s
}

// attachedCount is how many programs run for the pod: attached to its
// cgroup, and on its network namespace (sk_lookup).
func attachedCount(t *testing.T, pod *testbed.Pod) (cgroup, netns int) {
	t.Helper()
	out, err := exec.Command("bpftool", "-j", "cgroup", "show", pod.Cgroup).Output()
	if err != nil {
		t.Fatalf("bpftool cgroup show: %v", err)
	}
	var progs []json.RawMessage
	if len(bytes.TrimSpace(out)) > 0 {
		if err := json.Unmarshal(out, &progs); err != nil {
			t.Fatalf("bpftool cgroup show: %v (%s)", err, out)
		}
	}
	return len(progs), inboundPrograms(t, pod)
}

// inboundPrograms counts the sk_lookup programs on the pod's network
// namespace.
func inboundPrograms(t *testing.T, pod *testbed.Pod) int {
	t.Helper()
	ns, err := os.Open(pod.Netns)
	if err != nil {
		t.Fatal(err)
	}
	defer ns.Close()
	res, err := link.QueryPrograms(link.QueryOptions{Target: int(ns.Fd()), Attach: ebpf.AttachSkLookup})
	if err != nil {
		t.Fatal(err)
	}
	return len(res.Programs)
}

// Kubernetes reruns an init container after a crash: an install killed with
// SIGKILL at any point, then run again with the same flags, always ends as
// one complete install; an uninstall killed and rerun leaves nothing.
func TestKilledInstallIsFinishedByRerun(t *testing.T) {
	privileged(t)
	pod, err := testbed.Must(t).AddPod("app")
	if err != nil {
		t.Fatal(err)
	}
	install := []string{"install", "--cgroup", pod.Cgroup, "--netns", pod.Netns, "-o", "9090"}
	uninstall := []string{"uninstall", "--cgroup", pod.Cgroup}
	t.Cleanup(func() { runCLI(t, sluice(t, uninstall...)) })

	// How long each command takes from exec to exit, so the kill points
	// spread over its whole run.
	timed := func(args []string) time.Duration {
		start := time.Now()
		mustCLI(t, args...)
		return time.Since(start)
	}
	var installTook, uninstallTook time.Duration
	for range 3 {
		installTook += timed(install) / 3
		uninstallTook += timed(uninstall) / 3
	}
	t.Logf("install takes %v, uninstall %v", installTook, uninstallTook)

	const points = 20
	killAt := func(args []string, after time.Duration) {
		t.Helper()
		cmd := sluice(t, args...)
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		time.Sleep(after)
		cmd.Process.Kill()
		cmd.Wait()
	}
	expectComplete := func(when string) {
		t.Helper()
		if s := statusJSON(t, pod.Cgroup); !s.Complete {
			t.Fatalf("%s: status says incomplete: %v", when, s.Missing)
		}
		if cg, ns := attachedCount(t, pod); cg != 8 || ns != 1 {
			t.Fatalf("%s: %d programs on the cgroup and %d on the netns, want 8 and 1 (one install)", when, cg, ns)
		}
	}
	target, err := loader.ResolveTarget(pod.Cgroup, "")
	if err != nil {
		t.Fatal(err)
	}
	expectNothing := func(when string) {
		t.Helper()
		if cg, ns := attachedCount(t, pod); cg != 0 || ns != 0 {
			t.Fatalf("%s: %d programs still on the cgroup and %d on the netns", when, cg, ns)
		}
		if _, err := os.Stat(target.PinDir); !os.IsNotExist(err) {
			t.Fatalf("%s: pin dir %s still there (%v)", when, target.PinDir, err)
		}
	}

	seen := map[string]int{}
	for i := range points {
		killAt(install, installTook*time.Duration(i)/points)
		res := runCLI(t, sluice(t, "status", "--cgroup", pod.Cgroup, "--json"))
		switch {
		case res.code == 0:
			seen["complete"]++
		case strings.Contains(res.stderr, "repair it with: sluice install"):
			seen["half, with the repair command"]++
		case strings.Contains(res.stderr, "not installed"):
			seen["nothing"]++
		default:
			t.Fatalf("status after a killed install: exit %d\n%s%s", res.code, res.stdout, res.stderr)
		}
		mustCLI(t, install...)
		expectComplete(fmt.Sprintf("install killed after %v, then rerun", installTook*time.Duration(i)/points))
		mustCLI(t, uninstall...)
		expectNothing("uninstall after a rerun install")
	}
	t.Logf("states a killed install left: %v", seen)

	for i := range points {
		mustCLI(t, install...)
		killAt(uninstall, uninstallTook*time.Duration(i)/points)
		mustCLI(t, uninstall...)
		expectNothing(fmt.Sprintf("uninstall killed after %v, then rerun", uninstallTook*time.Duration(i)/points))
	}
}

// A half install (here a link someone removed) makes status exit 1 naming
// what is missing and the command that repairs it; that command does.
func TestStatusNamesTheRepair(t *testing.T) {
	privileged(t)
	pod, err := testbed.Must(t).AddPod("app")
	if err != nil {
		t.Fatal(err)
	}
	mustCLI(t, "install", "--cgroup", pod.Cgroup, "-o", "9090")
	t.Cleanup(func() { mustCLI(t, "uninstall", "--cgroup", pod.Cgroup) })
	s := statusJSON(t, pod.Cgroup)
	if err := os.Remove(filepath.Join(s.Target.PinDir, "link_connect6")); err != nil {
		t.Fatal(err)
	}
	res := runCLI(t, sluice(t, "status", "--cgroup", pod.Cgroup))
	wantRepair := "sluice install --cgroup " + pod.Cgroup + " -o 9090"
	if res.code != 1 || !strings.Contains(res.stdout, "INCOMPLETE: link_connect6") || !strings.Contains(res.stderr, "repair it with: "+wantRepair) {
		t.Fatalf("status of a half install: exit %d\n%s%s", res.code, res.stdout, res.stderr)
	}
	out := mustCLI(t, strings.Fields(wantRepair)[1:]...)
	if !strings.Contains(out, "link_connect6 attached") || strings.Contains(out, "link_connect4") {
		t.Errorf("repair did more or less than attach connect6: %s", out)
	}
	if s := statusJSON(t, pod.Cgroup); !s.Complete {
		t.Errorf("still incomplete after the repair: %v", s.Missing)
	}
}

// holder is the "hold" helper running in a pod: connections kept open, each
// exchange proving they still carry bytes.
type holder struct {
	cmd   *exec.Cmd
	in    io.WriteCloser
	out   *bufio.Scanner
	state holdState
}

func startHold(t *testing.T, pod *testbed.Pod, addr string, count int) *holder {
	t.Helper()
	cmd := helper(t, "hold", addr, fmt.Sprint(count))
	in, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := pod.Start(cmd); err != nil {
		t.Fatal(err)
	}
	h := &holder{cmd: cmd, in: in, out: bufio.NewScanner(stdout)}
	t.Cleanup(func() { in.Close() })
	h.exchange(t, "hello")
	return h
}

// exchange sends msg on every held connection and checks the echo.
func (h *holder) exchange(t *testing.T, msg string) holdState {
	t.Helper()
	if err := h.try(msg); err != nil {
		t.Fatal(err)
	}
	return h.state
}

func (h *holder) try(msg string) error {
	if _, err := fmt.Fprintln(h.in, msg); err != nil {
		return fmt.Errorf("hold helper: %w", err)
	}
	if !h.out.Scan() {
		return fmt.Errorf("hold helper ended: %v", h.out.Err())
	}
	var line struct {
		Result holdState `json:"result"`
		Error  string    `json:"error"`
	}
	if err := json.Unmarshal(h.out.Bytes(), &line); err != nil || line.Error != "" {
		return fmt.Errorf("hold helper: %s (%v)", h.out.Text(), err)
	}
	h.state = line.Result
	return nil
}

// A connection held open through 100,000 others keeps its identity: its
// state lives on its socket, not in a table that evicts. Afterwards the only
// shared table is empty again and nothing was refused.
// reuseTimeWait lets one pod make 100,000 short connections: each leaves a
// TIME_WAIT socket on the sidecar's side of its upstream.
func reuseTimeWait(t *testing.T, pod *testbed.Pod) {
	t.Helper()
	if err := pod.Do(func() error {
		for file, value := range map[string]string{"ipv4/tcp_tw_reuse": "1", "ipv4/ip_local_port_range": "1024 65000"} {
			if err := os.WriteFile("/proc/sys/net/"+file, []byte(value), 0o644); err != nil {
				return err
			}
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
}

func TestLongLivedConnectionKeepsItsIdentity(t *testing.T) {
	c := newCapturedPod(t)
	// Info level: no log line per connection.
	c.startSidecar(t, "--log-level", "info")
	held := netip.AddrPortFrom(c.host.Addr4, 8080).String()
	h := startHold(t, c.pod, held, 1)
	if h.state.Peer != held || h.state.ServerSaw == h.state.Local {
		t.Fatalf("held connection: peer %s, socket %s, server saw %s; want peer %s through the sidecar", h.state.Peer, h.state.Local, h.state.ServerSaw, held)
	}
	reuseTimeWait(t, c.pod)
	rssBefore := vmRSS(t, c.sidecar.Cmd.Process.Pid)
	const n = 100_000
	var res churnResult
	targets := []string{held, netip.AddrPortFrom(c.host.Extra4, 8080).String(), netip.AddrPortFrom(c.host.Addr6, 8080).String()}
	if err := runHelper(t, c.pod, helper(t, "churn", append([]string{fmt.Sprint(n), "16"}, targets...)...), -1, &res); err != nil {
		t.Fatal(err)
	}
	if res.OK != n {
		t.Errorf("%d of %d short connections succeeded (%d failed, first: %s)", res.OK, n, res.Failed, res.FirstErr)
	}
	after := h.exchange(t, "still there?")
	if after.Peer != held || after.Local != h.state.Local {
		t.Errorf("after %d connections the held one sees peer %s (socket %s), want %s", n, after.Peer, after.Local, held)
	}
	// Every short connection is one flow of the sidecar's upstream: each
	// is counted closed, also one whose close event the ring buffer lost
	// (the exporter finds its socket gone), and none stays live.
	var opened, closed, live, lost float64
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(500 * time.Millisecond) {
		fams := c.scrape(t)
		opened = sample(fams, "sluice_tcp_connections_opened_total", map[string]string{"reporter": "source"})
		closed = sample(fams, "sluice_tcp_connections_closed_total", map[string]string{"reporter": "source"})
		live = sample(fams, "sluice_live_flows", nil)
		lost = sample(fams, "sluice_kernel_events_total", map[string]string{"event": "flow_event_lost_ring_full"})
		if closed >= n && live == 1 || time.Now().After(deadline) {
			break
		}
	}
	if opened != n+1 || closed != n || live != 1 {
		t.Errorf("after %d connections: %v flows opened, %v closed, %v live; want %d, %d and 1 (the held one)", n, opened, closed, live, n+1, n)
	}
	rssAfter := vmRSS(t, c.sidecar.Cmd.Process.Pid)
	t.Logf("flow events the ring buffer lost: %v; sidecar RSS %d KiB before, %d KiB after", lost, rssBefore, rssAfter)
	if rssAfter > rssBefore+100<<10 {
		t.Errorf("the sidecar grew from %d KiB to %d KiB over %d connections", rssBefore, rssAfter, n)
	}
	h.in.Close()
	if err := h.cmd.Wait(); err != nil {
		t.Errorf("hold helper: %v", err)
	}

	s := statusJSON(t, c.cgroup)
	if entries := s.Handshakes; entries != 0 {
		t.Errorf("%d handshake entries left after the connections ended, want 0", entries)
	}
	for name, n := range s.Counters {
		if strings.HasPrefix(name, "connect_") || strings.HasPrefix(name, "handshake_") || name == "flow_untracked_no_state" {
			if n != 0 {
				t.Errorf("counter %s = %d, want 0", name, n)
			}
		}
	}
}

// inSidecarContainer wraps a sidecar command the way a Kubernetes container
// runs it: a private mount namespace whose /sys/fs/bpf holds only the host's
// /sys/fs/bpf/sluice (a hostPath), uid and gid uid, and no capability at
// all (Kubernetes gives a non-root container none it could use). It uses
// util-linux's mount and setpriv, as a container runtime would do the same
// steps. The copies of other pods' network namespace mounts the
// new mount namespace starts with are dropped at once, or they would keep
// those pods' /run/netns files busy.
func inSidecarContainer(t *testing.T, uid int, argv ...string) *exec.Cmd {
	t.Helper()
	exe := testbed.WorldExecutable(t)
	stage := worldReadableDir(t)
	script := `set -e
mount --make-rprivate /
for ns in /run/netns/*; do umount -l "$ns" 2>/dev/null || true; done
mount --bind /sys/fs/bpf/sluice "$STAGE"
mount -t tmpfs -o mode=0755 sidecar-bpf /sys/fs/bpf
mkdir /sys/fs/bpf/sluice
mount --move "$STAGE" /sys/fs/bpf/sluice
exec setpriv --reuid $ID --regid $ID --clear-groups --inh-caps=-all --ambient-caps=-all --bounding-set=-all -- "$@"`
	cmd := exec.Command("sh", append([]string{"-c", script, "sidecar", exe}, argv...)...)
	cmd.Env = append(os.Environ(), mainEnv+"=1", "STAGE="+stage, fmt.Sprintf("ID=%d", uid))
	cmd.SysProcAttr = &syscall.SysProcAttr{Unshareflags: syscall.CLONE_NEWNS}
	return cmd
}

// The sidecar runs as uid 1337 with no capability, seeing the pins through a
// bind mount, and serves, splice on: since Linux 6.5 only creating BPF
// objects needs CAP_BPF, and the pins' modes admit the proxy's group. A
// uid-1000 process in the pod can neither read the pins nor bind the
// capture ports.
func TestSidecarAsProxyUserWithNoCapabilities(t *testing.T) {
	c := newCapturedPodIn(t, systemdPodPath, "--splice")
	l, err := c.pod.StartLogged(inSidecarContainer(t, 1337, "run", "--cgroup", c.cgroup, "--log-format", "json", "--log-level", "debug"))
	if err != nil {
		t.Fatal(err)
	}
	ready, err := l.WaitFor("listening", nil, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if ready.Num("uid") != 1337 || ready.Num("gid") != 1337 {
		t.Errorf("sidecar listens as %d/%d, want 1337/1337", ready.Num("uid"), ready.Num("gid"))
	}
	c.sidecar = l
	for _, a := range []netip.Addr{c.host.Addr4, c.host.Addr6} {
		addr := netip.AddrPortFrom(a, 8080).String()
		c.expectProxied(t, c.client(t, addr), addr)
	}
	if n := statusJSON(t, c.cgroup).Counters["splice_sockets_joined"]; n != 4 {
		t.Errorf("%d sockets joined the splice table, want both ends of both connections", n)
	}
	if _, err := c.pod.ListenEcho("[::]:8080"); err != nil {
		t.Fatal(err)
	}
	in := netip.AddrPortFrom(c.pod.Addr4, 8080).String()
	c.expectProxiedDir(t, c.inbound(t, in), in, "inbound")

	// Offload, turned on by a rerun of install, works for this sidecar
	// too: it opens offload's maps and rereads the policy as uid 1337.
	mustCLI(t, "install", "--cgroup", c.cgroup, "--netns", c.pod.Netns, "--splice", "--offload-ports", "8080")
	out := netip.AddrPortFrom(c.host.Addr4, 8080).String()
	for deadline := time.Now().Add(10 * time.Second); ; {
		before := statusJSON(t, c.cgroup).Counters
		c.client(t, out)
		if d := diff(before, statusJSON(t, c.cgroup).Counters); d["offload_messages"] > 0 {
			break
		} else if time.Now().After(deadline) {
			t.Fatalf("no message offloaded 10 s after install turned offload on: %v\n%s", d, l.Output())
		}
		time.Sleep(200 * time.Millisecond)
	}

	pins := statusJSON(t, c.cgroup).Target.PinDir
	var opened map[string]string
	if err := runHelper(t, c.pod, helper(t, "openpin", filepath.Join(pins, "meta"), filepath.Join(pins, "policies")), 1000, &opened); err != nil {
		t.Fatal(err)
	}
	for pin, err := range opened {
		if !strings.Contains(err, "permission denied") {
			t.Errorf("uid 1000 opening %s: %q, want permission denied", pin, err)
		}
	}
	var bound map[string]string
	if err := runHelper(t, c.pod, helper(t, "bind", "127.0.0.1:15001", "[::1]:15001", "0.0.0.0:15006", "[::]:15006", "[::1]:15002"), 1000, &bound); err != nil {
		t.Fatal(err)
	}
	for addr, err := range bound {
		if addr == "[::1]:15002" {
			if err != "" {
				t.Errorf("uid 1000 binding an ordinary port %s: %s", addr, err)
			}
			continue
		}
		if !strings.Contains(err, "operation not permitted") {
			t.Errorf("uid 1000 binding %s: %q, want operation not permitted", addr, err)
		}
	}
}

// Run without the proxy's group, the sidecar names the real cause.
func TestSidecarWithoutProxyGroupSaysWhy(t *testing.T) {
	c := newCapturedPod(t)
	cmd := inSidecarContainer(t, 1000, "run", "--cgroup", c.cgroup)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := c.pod.Start(cmd); err != nil {
		t.Fatal(err)
	}
	expectExit(t, cmd, 1, 10*time.Second, stderr.String, "readable by root and group 1337 only", "-g 1337")
	if strings.Count(stderr.String(), "\n") != 1 || strings.Contains(stderr.String(), "install' first") {
		t.Errorf("want one line naming the cause, got %q", stderr.String())
	}
}

// The sidecar fails (exit 1) when it cannot hold every listener it serves,
// instead of serving the rest: here a process of the proxy's own identity
// holds [::1]:15001 first.
func TestSidecarExitsWithoutEveryListener(t *testing.T) {
	c := newCapturedPod(t)
	squatter, err := listenInPodAs(t, c.pod, "[::1]:15001", 1337)
	if err != nil {
		t.Fatal(err)
	}
	defer squatter.Process.Kill()
	cmd := sluice(t, "run", "--cgroup", c.cgroup)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := c.pod.Start(cmd); err != nil {
		t.Fatal(err)
	}
	expectExit(t, cmd, 1, 10*time.Second, func() string { return stderr.String() }, "listen on [::1]:15001")
}

// expectExit waits up to timeout for cmd to exit with code (-1: killed by a
// signal) and output() to contain every want.
func expectExit(t *testing.T, cmd *exec.Cmd, code int, timeout time.Duration, output func() string, want ...string) {
	t.Helper()
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		got := 0
		if ee, ok := err.(*exec.ExitError); ok {
			got = ee.ExitCode()
		} else if err != nil {
			t.Fatalf("wait: %v", err)
		}
		if got != code {
			t.Errorf("exit code %d, want %d; output:\n%s", got, code, output())
		}
		for _, w := range want {
			if !strings.Contains(output(), w) {
				t.Errorf("output lacks %q:\n%s", w, output())
			}
		}
	case <-time.After(timeout):
		cmd.Process.Kill()
		<-done
		t.Fatalf("still running after %v; output:\n%s", timeout, output())
	}
}

// listenInPodAs runs a process in the pod, as uid:gid id, that listens on
// addr until killed, and waits until it does.
func listenInPodAs(t *testing.T, pod *testbed.Pod, addr string, id uint32) (*exec.Cmd, error) {
	t.Helper()
	cmd := exec.Command(testbed.WorldExecutable(t), addr)
	cmd.Env = append(os.Environ(), helperEnv+"=origdst-server")
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: id, Gid: id}}
	if err := pod.Start(cmd); err != nil {
		return nil, err
	}
	port := netip.MustParseAddrPort(addr).Port()
	return cmd, pod.WaitListening(port, 10*time.Second)
}

// Only the proxy identity gets SO_ORIGINAL_DST answered. Failing open with
// no sidecar listening, an inbound SYN reaches the app itself (the inbound
// hook counts it): the app asking gets no answer, as it would from
// conntrack, while a process of the proxy's identity in the same place gets
// the destination.
func TestOriginalDstOnlyForTheProxy(t *testing.T) {
	c := newCapturedPod(t, "--fail-open")
	addr := netip.AddrPortFrom(c.pod.Addr4, 8080).String()
	for _, tt := range []struct {
		uid      int
		answered bool
	}{{1000, false}, {1337, true}} {
		t.Run(fmt.Sprintf("uid %d", tt.uid), func(t *testing.T) {
			server := helper(t, "origdst-server", ":8080")
			server.Path = testbed.WorldExecutable(t)
			server.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(tt.uid), Gid: uint32(tt.uid)}}
			var out bytes.Buffer
			server.Stdout, server.Stderr = &out, &out
			if err := c.pod.Start(server); err != nil {
				t.Fatal(err)
			}
			if err := c.pod.WaitListening(8080, 10*time.Second); err != nil {
				t.Fatal(err)
			}
			if _, err := c.host.RunClient(self(t), addr, 0); err != nil {
				t.Fatal(err)
			}
			if err := server.Wait(); err != nil {
				t.Fatalf("server: %v: %s", err, out.String())
			}
			var res struct{ Result string }
			if err := json.Unmarshal(out.Bytes(), &res); err != nil {
				t.Fatalf("server output %q: %v", out.String(), err)
			}
			// Unanswered, the kernel's own reply stands: ENOPROTOOPT
			// without conntrack loaded, ENOENT with it.
			if got := res.Result == addr; got != tt.answered || !got && !strings.HasPrefix(res.Result, "getsockopt SO_ORIGINAL_DST: ") {
				t.Errorf("SO_ORIGINAL_DST as uid %d: %q, want answered=%v", tt.uid, res.Result, tt.answered)
			}
		})
	}
	if s := statusJSON(t, c.cgroup); s.Counters["inbound_no_listener"] < 2 {
		t.Errorf("inbound hook counted %d SYNs with no sidecar listening, want at least 2", s.Counters["inbound_no_listener"])
	}
}

// istio-iptables applies IPv6 ranges to ip6tables only: -x ::/0 leaves IPv4
// captured, and -i with only an IPv6 range captures no IPv4.
func TestIPv6RangesLeaveIPv4Alone(t *testing.T) {
	t.Run("exclude ::/0", func(t *testing.T) {
		c := newCapturedPod(t, "-x", "::/0")
		c.startSidecar(t)
		v4, v6 := netip.AddrPortFrom(c.host.Addr4, 8080).String(), netip.AddrPortFrom(c.host.Addr6, 8080).String()
		expectDirect(t, c.client(t, v6), v6)
		c.expectProxied(t, c.client(t, v4), v4)
	})
	t.Run("include an IPv6 range only", func(t *testing.T) {
		c := newCapturedPod(t, "-i", "2001:2::/48")
		c.startSidecar(t)
		v4, v6 := netip.AddrPortFrom(c.host.Addr4, 8080).String(), netip.AddrPortFrom(c.host.Addr6, 8080).String()
		expectDirect(t, c.client(t, v4), v4)
		c.expectProxied(t, c.client(t, v6), v6)
	})
}

// An app using MPTCP is captured like any other: bytes intact, its peer the
// original destination, which the sidecar saw.
func TestMPTCPIsCaptured(t *testing.T) {
	c := newCapturedPod(t)
	c.startSidecar(t)
	for _, a := range []netip.Addr{c.host.Addr4, c.host.Addr6} {
		addr := netip.AddrPortFrom(a, 8080).String()
		cmd := testbed.ClientCommand(self(t), addr, payload)
		cmd.Env = append(cmd.Env, testbed.MPTCPEnv+"=1")
		res, err := c.pod.RunClientCommand(cmd)
		if err != nil {
			t.Fatalf("MPTCP client to %s: %v", addr, err)
		}
		if !res.MPTCP {
			t.Fatalf("the app's connection to %s fell back to plain TCP", addr)
		}
		checkIntact(t, res, addr)
		c.expectProxied(t, res, addr)
	}
}

// --help of every command prints its usage and exits 0, with no panic.
func TestHelpOfEveryCommand(t *testing.T) {
	for _, c := range commands() {
		for _, flag := range []string{"--help", "-h"} {
			res := runCLI(t, sluice(t, c.name, flag))
			out := res.stdout + res.stderr
			if res.code != 0 || !strings.Contains(res.stdout, "Usage: sluice "+c.name) || strings.Contains(out, "panic") {
				t.Errorf("sluice %s %s: exit %d\n%s", c.name, flag, res.code, out)
			}
		}
	}
	if res := runCLI(t, sluice(t, "--help")); res.code != 0 || !strings.Contains(res.stdout, "Commands:") {
		t.Errorf("sluice --help: exit %d\n%s%s", res.code, res.stdout, res.stderr)
	}
}

// On SIGTERM the sidecar stops accepting at once (a new connection is
// refused, never hangs), lets the open one finish within --drain, then
// closes it and exits 0.
func TestSidecarDrainsOnSIGTERM(t *testing.T) {
	c := newCapturedPod(t)
	c.startSidecar(t, "--drain", "3s")
	addr := netip.AddrPortFrom(c.host.Addr4, 8080).String()
	h := startHold(t, c.pod, addr, 1)
	start := time.Now()
	if err := c.sidecar.Cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if _, err := c.sidecar.WaitFor("stopping: no new connections; draining open ones", nil, 5*time.Second); err != nil {
		t.Fatal(err)
	}
	if _, err := c.pod.RunClient(self(t), addr, 10); err == nil || !strings.Contains(err.Error(), "connection refused") {
		t.Errorf("new connection while draining: %v, want connection refused", err)
	}
	h.exchange(t, "still served while draining")
	expectExit(t, c.sidecar.Cmd, 0, 10*time.Second, func() string { return "" })
	if took := time.Since(start); took < 3*time.Second || took > 8*time.Second {
		t.Errorf("sidecar exited %v after SIGTERM, want after the 3s drain", took)
	}
	if err := h.try("after the drain"); err == nil {
		t.Errorf("the held connection still works after the sidecar exited")
	}
}

// A second signal ends the sidecar at once, however long the drain.
func TestSecondSignalEndsTheSidecar(t *testing.T) {
	c := newCapturedPod(t)
	c.startSidecar(t, "--drain", "1m")
	startHold(t, c.pod, netip.AddrPortFrom(c.host.Addr4, 8080).String(), 1)
	c.sidecar.Cmd.Process.Signal(syscall.SIGTERM)
	if _, err := c.sidecar.WaitFor("stopping: no new connections; draining open ones", nil, 5*time.Second); err != nil {
		t.Fatal(err)
	}
	c.sidecar.Cmd.Process.Signal(syscall.SIGTERM)
	expectExit(t, c.sidecar.Cmd, -1, 5*time.Second, c.sidecar.Output)
}

// When a listener fails the sidecar exits non-zero, so Kubernetes restarts
// it, instead of living on half alive. The test breaks the inbound IPv4
// listener from outside: it takes a copy of the socket with pidfd_getfd and
// shuts it down, so the sidecar's accept fails.
func TestSidecarExitsWhenAListenerFails(t *testing.T) {
	c := newCapturedPod(t)
	c.startSidecar(t)
	pid := c.sidecar.Cmd.Process.Pid
	fd := listenerFD(t, pid, 15006)
	pidfd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(pidfd)
	sock, err := unix.PidfdGetfd(pidfd, fd, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(sock)
	if err := unix.Shutdown(sock, unix.SHUT_RDWR); err != nil {
		t.Fatal(err)
	}
	expectExit(t, c.sidecar.Cmd, 1, 10*time.Second, c.sidecar.Output, "accept on 0.0.0.0:15006")
}

// listenerFD finds the descriptor of process pid that listens on port over
// IPv4, by socket inode.
func listenerFD(t *testing.T, pid int, port uint16) int {
	t.Helper()
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/net/tcp", pid))
	if err != nil {
		t.Fatal(err)
	}
	inode := ""
	for _, line := range strings.Split(string(data), "\n")[1:] {
		// sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
		f := strings.Fields(line)
		if len(f) > 9 && strings.HasSuffix(f[1], fmt.Sprintf(":%04X", port)) && f[3] == "0A" {
			inode = f[9]
		}
	}
	fds, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range fds {
		if target, _ := os.Readlink(fmt.Sprintf("/proc/%d/fd/%s", pid, e.Name())); inode != "" && target == "socket:["+inode+"]" {
			var fd int
			fmt.Sscan(e.Name(), &fd)
			return fd
		}
	}
	t.Fatalf("no descriptor of pid %d listens on port %d", pid, port)
	return -1
}

// The loop guard compares the address too: a captured connection to a
// remote server that listens on the sidecar's port goes through.
func TestCapturedConnectionToRemotePort15001(t *testing.T) {
	c := newCapturedPod(t)
	c.startSidecar(t)
	addr := netip.AddrPortFrom(c.host.Addr4, 15001).String()
	if _, err := c.host.ListenEcho(addr); err != nil {
		t.Fatal(err)
	}
	c.expectProxied(t, c.client(t, addr), addr)
}

// The shipped binary has no test bed in it, and the environment variables
// that switch the demo's helpers on do nothing to it.
func TestShippedBinaryHasNoTestBed(t *testing.T) {
	goBin, err := exec.LookPath("go")
	if err != nil {
		t.Fatalf("go not on PATH: %v", err)
	}
	out, err := exec.Command(goBin, "list", "-deps", "github.com/sluicemesh/sluice/cmd/sluice").Output()
	if err != nil {
		t.Fatalf("go list: %v", err)
	}
	if strings.Contains(string(out), "internal/testbed") {
		t.Errorf("cmd/sluice depends on internal/testbed")
	}
	bin := filepath.Join(t.TempDir(), "sluice")
	if out, err := exec.Command(goBin, "build", "-o", bin, "github.com/sluicemesh/sluice/cmd/sluice").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	cmd := exec.Command(bin)
	cmd.Env = append(os.Environ(), "SLUICE_TESTBED_ROLE=relay", "SLUICE_TESTBED_ADDR=127.0.0.1:0", "SLUICE_TESTBED_TARGET=127.0.0.1:1")
	res := runCLI(t, cmd)
	if res.code != 2 || !strings.Contains(res.stdout, "Commands:") {
		t.Errorf("shipped binary with the relay role set: exit %d\n%s%s", res.code, res.stdout, res.stderr)
	}
}

// The handshake table holds a connection only until the proxy's side of it
// is established. When nobody in the pod takes it (here the listener on the
// capture port is outside the pod's cgroup, so no hook sees its side), the
// app's socket removes it as it closes: the table cannot fill up.
func TestHandshakeEntryLeavesWithTheApp(t *testing.T) {
	c := newCapturedPod(t)
	if _, err := c.pod.ListenEcho("127.0.0.1:15001"); err != nil {
		t.Fatal(err)
	}
	entries := func() int { return handshakeEntries(t, c.cgroup) }
	h := startHold(t, c.pod, netip.AddrPortFrom(c.host.Addr4, 8080).String(), 3)
	if n := entries(); n != 3 {
		t.Errorf("%d handshake entries while 3 unclaimed connections are open, want 3", n)
	}
	h.in.Close()
	if err := h.cmd.Wait(); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for entries() != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("%d handshake entries left after the app closed its connections", entries())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// handshakeEntries counts the entries of the pod's handshake table.
func handshakeEntries(t *testing.T, cgroup string) int {
	t.Helper()
	return statusJSON(t, cgroup).Handshakes
}

// vmRSS is a process's resident memory in KiB.
func vmRSS(t *testing.T, pid int) int {
	t.Helper()
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(data), "\n") {
		if rest, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			var kib int
			fmt.Sscan(rest, &kib)
			return kib
		}
	}
	t.Fatalf("no VmRSS for pid %d", pid)
	return 0
}
