package e2e

import (
	"bytes"
	"encoding/json"
	"fmt"
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
	t.Cleanup(func() { testbed.Run(t, sluice(t, uninstall...)) })

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
		if cg, ns := attachedCount(t, pod); cg != 9 || ns != 1 {
			t.Fatalf("%s: %d programs on the cgroup and %d on the netns, want 9 and 1 (one install)", when, cg, ns)
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
		res := testbed.Run(t, sluice(t, "status", "--cgroup", pod.Cgroup, "--json"))
		switch {
		case res.Code == 0:
			seen["complete"]++
		case strings.Contains(res.Stderr, "repair it with: sluice install"):
			seen["half, with the repair command"]++
		case strings.Contains(res.Stderr, "not installed"):
			seen["nothing"]++
		default:
			t.Fatalf("status after a killed install: exit %d\n%s%s", res.Code, res.Stdout, res.Stderr)
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
	mustCLI(t, "install", "--cgroup", pod.Cgroup, "--netns", pod.Netns, "-o", "9090")
	t.Cleanup(func() { mustCLI(t, "uninstall", "--cgroup", pod.Cgroup) })
	s := statusJSON(t, pod.Cgroup)
	if err := os.Remove(filepath.Join(s.Target.PinDir, "link_connect6")); err != nil {
		t.Fatal(err)
	}
	res := testbed.Run(t, sluice(t, "status", "--cgroup", pod.Cgroup))
	wantRepair := "sluice install --cgroup " + pod.Cgroup + " --netns " + pod.Netns + " -o 9090"
	if res.Code != 1 || !strings.Contains(res.Stdout, "INCOMPLETE: link_connect6") || !strings.Contains(res.Stderr, "repair it with: "+wantRepair) {
		t.Fatalf("status of a half install: exit %d\n%s%s", res.Code, res.Stdout, res.Stderr)
	}
	out := mustCLI(t, strings.Fields(wantRepair)[1:]...)
	if !strings.Contains(out, "link_connect6 attached") || strings.Contains(out, "link_connect4") {
		t.Errorf("repair did more or less than attach connect6: %s", out)
	}
	if s := statusJSON(t, pod.Cgroup); !s.Complete {
		t.Errorf("still incomplete after the repair: %v", s.Missing)
	}
}

// Every bad input gets one line on stderr naming the problem and the fix, a
// non-zero exit, and leaves nothing installed.
func TestInstallBadInput(t *testing.T) {
	privileged(t)
	pod, err := testbed.Must(t).AddPod("app")
	if err != nil {
		t.Fatal(err)
	}
	mount, err := loader.Cgroup2Mount()
	if err != nil {
		t.Fatal(err)
	}
	target, err := loader.ResolveTarget(pod.Cgroup, "")
	if err != nil {
		t.Fatal(err)
	}
	cg := []string{"install", "--cgroup", pod.Cgroup, "--netns", pod.Netns}
	tests := []struct {
		name string
		args []string
		code int
		want []string // the problem, then the fix
	}{
		{"unknown flag", append(cg, "--bogus"), 2, []string{"unknown flag -bogus", "sluice install --help"}},
		{"invalid CIDR", append(cg, "-x", "198.18.0.0/33"), 2, []string{`"198.18.0.0/33" is not a CIDR`, "want a.b.c.d/n"}},
		{"port 0", append(cg, "-p", "0"), 2, []string{"port 0 is out of range", "want 1-65535"}},
		{"port 70000", append(cg, "-z", "70000"), 2, []string{"port 70000 is out of range", "want 1-65535"}},
		{"uid not a number", append(cg, "-u", "istio-proxy"), 2, []string{`"istio-proxy" is not a numeric uid`, "give the number"}},
		{"no cgroup, not in a pod", []string{"install"}, 2, []string{"no --cgroup given", "use 'sluice install --cgroup' with the pod's cgroup v2 directory"}},
		{"cgroup does not exist", []string{"install", "--cgroup", filepath.Join(mount, "sluice-no-such-pod")}, 1, []string{"does not exist", "create it first"}},
		{"not cgroup v2", []string{"install", "--cgroup", t.TempDir()}, 1, []string{"is not a cgroup v2 directory", "pass a directory below the cgroup2 mount"}},
		{"root cgroup", []string{"install", "--cgroup", mount}, 1, []string{"is the root of the cgroup v2 hierarchy", "pass the pod's own cgroup"}},
		{"root as the proxy", append(cg, "-u", "0"), 2, []string{"would exempt every root process", "--allow-root-proxy"}},
		{"no such netns", append(cg, "--netns", "/run/netns/sluice-no-such-netns"), 1, []string{"does not exist", "pass the pod's network namespace"}},
		{"no such interface", append(cg, "--interface", "sluice-nope0"), 1, []string{"no interface sluice-nope0", "pass --interface"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			res := testbed.Run(t, sluice(t, tt.args...))
			expectOneLineError(t, res, tt.code, tt.want...)
			expectNothingInstalled(t, target)
		})
	}

	t.Run("no root", func(t *testing.T) {
		cmd := sluice(t, cg...)
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
		res := testbed.Run(t, cmd)
		expectOneLineError(t, res, 1, "needs root", "run it as root")
		expectNothingInstalled(t, target)
	})
}

func expectOneLineError(t *testing.T, res testbed.Result, code int, want ...string) {
	t.Helper()
	if res.Code != code {
		t.Errorf("exit code %d, want %d (stderr %q)", res.Code, code, res.Stderr)
	}
	if strings.Count(res.Stderr, "\n") != 1 || !strings.HasPrefix(res.Stderr, "sluice install: ") {
		t.Errorf("want one line 'sluice install: ...' on stderr, got %q", res.Stderr)
	}
	for _, w := range want {
		if !strings.Contains(res.Stderr, w) {
			t.Errorf("stderr %q does not say %q", res.Stderr, w)
		}
	}
	if res.Stdout != "" {
		t.Errorf("unexpected stdout %q", res.Stdout)
	}
}

func expectNothingInstalled(t *testing.T, target loader.Target) {
	t.Helper()
	if _, err := os.Stat(target.PinDir); err == nil {
		t.Errorf("pins left at %s", target.PinDir)
	}
	if _, err := loader.Status(target); err == nil {
		t.Errorf("status reports an install on %s", target.Cgroup)
	}
}
