package e2e

import (
	"errors"
	"log/slog"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/sluicemesh/sluice/bpf"
	"github.com/sluicemesh/sluice/internal/testbed"
	"github.com/sluicemesh/sluice/loader"
)

// upgradeFrom is the release an install is upgraded from: the last one
// before the counters map grew, so the upgrade also replaces a map.
const upgradeFrom = "e8da838ed90ef70e6910970d765b0f0436148e0d"

// buildAt builds cmd/sluice as it was at commit, from this repository's
// history, into a temporary directory.
func buildAt(t *testing.T, commit string) string {
	t.Helper()
	top, err := exec.Command("git", "rev-parse", "--show-toplevel").Output()
	if err != nil {
		t.Fatalf("git rev-parse: %v: the upgrade test builds an older Sluice from this repository's history", err)
	}
	dir := t.TempDir()
	src := filepath.Join(dir, "src")
	git := func(args ...string) {
		t.Helper()
		cmd := exec.Command("git", append([]string{"-C", strings.TrimSpace(string(top))}, args...)...)
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("git %v: %v\n%s (a shallow clone lacks the commit: fetch the history)", args, err, out)
		}
	}
	git("worktree", "add", "--detach", src, commit)
	t.Cleanup(func() { git("worktree", "remove", "--force", src) })
	bin := filepath.Join(dir, "sluice-old")
	if err := buildSluice(bin, src, ""); err != nil {
		t.Fatalf("build %s: %v", commit, err)
	}
	return bin
}

// Installing this build over an install by an older release, while the
// app's connections flow, updates every program in place: no connection
// fails and none escapes the sidecar, and the install is then this build's.
func TestUpgradeUnderTraffic(t *testing.T) {
	privileged(t)
	old := buildAt(t, upgradeFrom)
	c := newUncapturedPod(t, nil)
	install := exec.Command(old, "install", "--cgroup", c.cgroup, "--netns", c.pod.Netns)
	if out, err := install.CombinedOutput(); err != nil {
		t.Fatalf("install by %s: %v\n%s", upgradeFrom[:7], err, out)
	}
	t.Cleanup(func() { mustCLI(t, "uninstall", "--cgroup", c.cgroup) })
	// Its record holds no plan: a node agent cannot move it, and says why.
	installs, err := loader.Match(loader.DefaultPinRoot, c.cgroup)
	if err != nil || len(installs) != 1 {
		t.Fatalf("the older release's install: %v, %v", installs, err)
	}
	if _, err := loader.Upgrade(installs[0], slog.New(slog.DiscardHandler)); !errors.Is(err, loader.ErrNoPlan) || !strings.Contains(err.Error(), "rerun its install (sluice install --cgroup") {
		t.Errorf("upgrade by the agent: %v; want loader.ErrNoPlan and the command to rerun", err)
	}
	// The sidecar of the older release keeps running through the upgrade.
	l, err := c.pod.StartLogged(exec.Command(old, "run", "--cgroup", c.cgroup, "--log-format", "json", "--log-level", "debug"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := l.WaitFor("listening", nil, 10*time.Second); err != nil {
		t.Fatal(err)
	}
	out := netip.AddrPortFrom(c.host.Addr4, 8080).String()
	in := netip.AddrPortFrom(c.pod.Addr4, 8080).String()
	if err := c.pod.StartEcho(self(t), in); err != nil {
		t.Fatal(err)
	}
	expectViaSidecar(t, c.inbound(t, in), "inbound, before the upgrade")
	before := statusJSON(t, c.cgroup)
	if !before.Upgrade {
		t.Fatalf("status of the older install does not offer an upgrade: %+v", before)
	}

	done := c.churn(t, "load-captured", "3s", out)
	time.Sleep(time.Second)
	upgraded := mustCLI(t, "install", "--cgroup", c.cgroup, "--netns", c.pod.Netns)
	res := <-done
	if res.Failed != 0 || res.OK == 0 {
		t.Errorf("connections across the upgrade: %+v; want none failed or escaped", res)
	}
	for _, want := range []string{"link_connect4 updated", "link_sk_lookup attached", "link_tc_ingress kept for the running sidecar", "counters replaced", "policies moved to the node", "install finished"} {
		if !strings.Contains(upgraded, want) {
			t.Errorf("upgrade said %q, which lacks %q", upgraded, want)
		}
	}
	after := statusJSON(t, c.cgroup)
	if !after.Complete || after.Upgrade || after.Object != bpf.ObjectHash() {
		t.Errorf("after the upgrade: complete %v, upgrade %v, object %q (want %q), missing %v",
			after.Complete, after.Upgrade, after.Object, bpf.ObjectHash(), after.Missing)
	}
	for name, n := range before.Counters {
		if after.Counters[name] < n {
			t.Errorf("counter %s went from %d to %d across the upgrade", name, n, after.Counters[name])
		}
	}
	expectViaSidecar(t, c.client(t, out), "outbound, after the upgrade")
	expectViaSidecar(t, c.inbound(t, in), "inbound, after the upgrade")

	// The older sidecar listens with MPTCP, which sk_lookup cannot hand
	// connections to: its release's tcx program stayed for it. Once this
	// build's sidecar runs, the next install removes it, and inbound
	// capture is sk_lookup's alone.
	l.Cmd.Process.Kill()
	l.Cmd.Wait()
	c.startSidecar(t)
	if again := mustCLI(t, "install", "--cgroup", c.cgroup, "--netns", c.pod.Netns); !strings.Contains(again, "link_tc_ingress removed") {
		t.Errorf("install after the sidecar's restart said %q, which lacks \"link_tc_ingress removed\"", again)
	}
	expectViaSidecar(t, c.inbound(t, in), "inbound, after the sidecar's restart")
	if counts := statusJSON(t, c.cgroup).Counters; counts["inbound_steered"] == 0 {
		t.Errorf("counters %v: sk_lookup steered nothing", counts)
	}
}

// expectViaSidecar checks an echo exchange went through a sidecar: intact,
// and the server saw another peer than the client's own socket. (The older
// release's sidecar logs in another format than expectProxied reads.)
func expectViaSidecar(t *testing.T, res testbed.ClientResult, what string) {
	t.Helper()
	if res.Err != "" || res.SentSHA != res.RecvSHA || res.Received != res.Sent {
		t.Errorf("%s: %+v", what, res)
	}
	if res.ServerSaw == res.Local {
		t.Errorf("%s: the server saw the client's own socket %s: not captured", what, res.Local)
	}
}

// A node agent of one build moves a pod installed by another onto its own
// while the app's connections flow: every link updated in place, none
// failed and none escaped, the install's plan kept, and the other build's
// node state gone with its last pod. (The other build is this tree labelled
// at link time: a build of its own, with node state of its own.)
func TestAgentMovesPodsOntoItsBuild(t *testing.T) {
	privileged(t)
	other := otherBuild(t)
	c := newUncapturedPod(t, nil)
	install := exec.Command(other, "install", "--cgroup", c.cgroup, "--netns", c.pod.Netns, "-o", "5555", "-b", "8080,8443")
	if out, err := install.CombinedOutput(); err != nil {
		t.Fatalf("install by the other build: %v\n%s", err, out)
	}
	t.Cleanup(func() { mustCLI(t, "uninstall", "--cgroup", c.cgroup) })
	c.startSidecar(t)
	before := statusJSON(t, c.cgroup)
	if !before.Upgrade || before.Object == bpf.ObjectHash() {
		t.Fatalf("status of the other build's install: object %s, upgrade %v; want another build than %s", before.Object, before.Upgrade, bpf.ObjectHash())
	}
	otherNode := filepath.Join(loader.DefaultPinRoot, "node", before.Object)
	if _, err := os.Stat(otherNode); err != nil {
		t.Fatalf("the other build's node state: %v", err)
	}
	out := netip.AddrPortFrom(c.host.Addr4, 8080).String()
	in := netip.AddrPortFrom(c.pod.Addr4, 8080).String()
	if err := c.pod.StartEcho(self(t), in); err != nil {
		t.Fatal(err)
	}

	done := c.churn(t, "load-captured", scaled(3*time.Second).String(), out)
	time.Sleep(scaled(time.Second))
	url := startAgent(t)
	// The agent moves the pod on its first pass, which under emulation
	// (make test-kernel) can come later than on the host: wait for it, and
	// fail rather than pass with no traffic across the move.
	for deadline := time.Now().Add(scaled(10 * time.Second)); !strings.Contains(httpBody(t, url+"/metrics"), "sluice_agent_upgraded_pods_total 1"); {
		if time.Now().After(deadline) {
			t.Fatal("the agent has not moved the pod")
		}
		time.Sleep(50 * time.Millisecond)
	}
	select {
	case <-done:
		t.Fatalf("the agent moved the pod only after the traffic ended, so none crossed the move (a slow machine: raise SLUICE_E2E_TIME_SCALE)")
	default:
	}
	res := <-done
	if res.Failed != 0 || res.OK == 0 {
		t.Errorf("connections across the agent's upgrade: %+v; want none failed or escaped", res)
	}
	after := statusJSON(t, c.cgroup)
	if !after.Complete || after.Upgrade || after.Object != bpf.ObjectHash() {
		t.Fatalf("after the agent ran: complete %v, upgrade %v, object %q (want %q), missing %v",
			after.Complete, after.Upgrade, after.Object, bpf.ObjectHash(), after.Missing)
	}
	if !after.Plan.Equal(before.Plan) {
		t.Errorf("the plan moved from %+v to %+v", before.Plan, after.Plan)
	}
	if _, err := os.Stat(otherNode); !os.IsNotExist(err) {
		t.Errorf("the other build's node state %s outlived its last pod: %v", otherNode, err)
	}
	if body := httpBody(t, url+"/metrics"); !strings.Contains(body, "sluice_agent_upgraded_pods_total 1") {
		t.Errorf("the agent's metrics lack sluice_agent_upgraded_pods_total 1")
	}
	expectViaSidecar(t, c.client(t, out), "outbound, after the upgrade")
	expectViaSidecar(t, c.inbound(t, in), "inbound, after the upgrade")
}

// otherBuild is this tree built as another build: labelled at link time,
// with node state of its own.
func otherBuild(t *testing.T) string {
	t.Helper()
	if prebuilt := os.Getenv("SLUICE_E2E_OTHER_BIN"); prebuilt != "" {
		return prebuilt // built so by make test-kernel, whose VM has no Go
	}
	other := filepath.Join(t.TempDir(), "sluice-other")
	if err := buildSluice(other, "", "", "-ldflags=-X github.com/sluicemesh/sluice/bpf.buildLabel=e2e-other"); err != nil {
		t.Fatal(err)
	}
	return other
}

// A pod whose init container installed capture from inside it (no
// arguments: the record names no network namespace), in a cgroup path of
// the systemd driver's, dots and all, is moved by the agent too: it finds
// the pod's namespace through a process of the pod.
func TestAgentMovesAnInPodInstall(t *testing.T) {
	other := otherBuild(t)
	p := newInitPod(t)
	if res := p.runCmd(t, exec.Command(other, "install")); res.Code != 0 {
		t.Fatalf("in the pod, the other build's install: exit %d\n%s%s", res.Code, res.Stdout, res.Stderr)
	}
	if s := statusJSON(t, p.cgroup); !s.Upgrade || s.Target.Netns != "" {
		t.Fatalf("the in-pod install by the other build: upgrade %v, netns %q; want another build and no namespace recorded", s.Upgrade, s.Target.Netns)
	}
	c := &capturedPod{pod: p.pod, host: p.host, cgroup: p.cgroup, echoes: map[string]*testbed.EchoListener{}}
	out := netip.AddrPortFrom(p.host.Addr4, 8080).String()
	var err error
	if c.echoes[out], err = p.host.ListenEcho(out); err != nil {
		t.Fatal(err)
	}
	c.startSidecar(t) // a process of the pod
	mustCLI(t, "agent", "--once", "--metrics-addr", "127.0.0.1:0")
	s := statusJSON(t, p.cgroup)
	if !s.Complete || s.Upgrade || s.Object != bpf.ObjectHash() {
		t.Fatalf("after the agent ran: complete %v, upgrade %v, object %q (want %q), missing %v", s.Complete, s.Upgrade, s.Object, bpf.ObjectHash(), s.Missing)
	}
	c.expectProxied(t, c.client(t, out), out)
}
