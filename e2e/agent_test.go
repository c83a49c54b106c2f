package e2e

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/sluicemesh/sluice/agent"
	"github.com/sluicemesh/sluice/internal/testbed"
	"github.com/sluicemesh/sluice/loader"
)

// startAgent runs `sluice agent` on the test's side (root network
// namespace, loopback only) and returns its base URL.
func startAgent(t *testing.T, args ...string) string {
	t.Helper()
	return startAgentWith(t, func(cmd *exec.Cmd) error { return cmd.Start() }, args...)
}

// startAgentWith is startAgent with the agent started by start (in another
// network namespace, say).
func startAgentWith(t *testing.T, start func(*exec.Cmd) error, args ...string) string {
	t.Helper()
	url, _ := startAgentCmdWith(t, start, args...)
	return url
}

// startAgentCmd is startAgent that also gives the agent's process.
func startAgentCmd(t *testing.T, args ...string) (string, *exec.Cmd) {
	t.Helper()
	return startAgentCmdWith(t, func(cmd *exec.Cmd) error { return cmd.Start() }, args...)
}

func startAgentCmdWith(t *testing.T, start func(*exec.Cmd) error, args ...string) (string, *exec.Cmd) {
	t.Helper()
	cmd := sluice(t, append([]string{"agent", "--metrics-addr", "127.0.0.1:0", "--log-format", "json", "--gc-interval", "100ms"}, args...)...)
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := start(cmd); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGTERM)
		cmd.Wait()
	})
	sc := bufio.NewScanner(stderr)
	for sc.Scan() {
		var e struct {
			Msg  string `json:"msg"`
			Addr string `json:"metrics_addr"`
		}
		if json.Unmarshal(sc.Bytes(), &e) == nil && e.Msg == "agent running" {
			go io.Copy(io.Discard, stderr)
			return "http://" + e.Addr, cmd
		}
	}
	t.Fatalf("agent exited before it ran: %v", sc.Err())
	return "", nil
}

func getJSON(t *testing.T, url string, v any) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if err := json.NewDecoder(resp.Body).Decode(v); err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
}

// The agent lists and exports every pod installed under its pin root, and
// removes the pins and links of a pod deleted without an uninstall; the
// other pod, and its capture, are untouched.
func TestAgentCollectsGonePods(t *testing.T) {
	privileged(t)
	bed := testbed.Must(t)
	kept, err := bed.AddPod("kept", systemdPodPath...)
	if err != nil {
		t.Fatal(err)
	}
	gone, err := bed.AddPod("gone")
	if err != nil {
		t.Fatal(err)
	}
	// A pin root of the test's own, so the agent collects nothing of other
	// tests running beside it.
	root := filepath.Join("/sys/fs/bpf", fmt.Sprintf("sluice-agent-test-%d", os.Getpid()))
	t.Cleanup(func() { os.RemoveAll(root) })
	pinDir := func(cgroup string) string {
		st, err := os.Stat(cgroup)
		if err != nil {
			t.Fatal(err)
		}
		return filepath.Join(root, fmt.Sprint(st.Sys().(*syscall.Stat_t).Ino))
	}
	keptCgroup := filepath.Dir(kept.Cgroup)
	keptPins, gonePins := pinDir(keptCgroup), pinDir(gone.Cgroup)
	mustCLI(t, "install", "--cgroup", keptCgroup, "--pin-dir", keptPins, "--netns", kept.Netns)
	t.Cleanup(func() { mustCLI(t, "uninstall", "--cgroup", keptCgroup, "--pin-dir", keptPins) })
	mustCLI(t, "install", "--cgroup", gone.Cgroup, "--pin-dir", gonePins, "--netns", gone.Netns)
	t.Cleanup(func() { testbed.Run(t, sluice(t, "uninstall", "--cgroup", gone.Cgroup, "--pin-dir", gonePins)) })

	url := startAgent(t, "--pin-root", root)
	var pods []agent.Pod
	getJSON(t, url+"/pods", &pods)
	if len(pods) != 2 {
		t.Fatalf("/pods lists %d pods, want 2: %+v", len(pods), pods)
	}
	for _, p := range pods {
		if !p.Complete || p.Gone {
			t.Errorf("pod %s: complete %v, gone %v", p.Cgroup, p.Complete, p.Gone)
		}
		if p.Cgroup == keptCgroup && p.UID != "3f2a8c1e-5b7d-4e0a-9c6f-1d2e3f4a5b6c" {
			t.Errorf("pod %s: uid %q, want the kubelet's pod uid", p.Cgroup, p.UID)
		}
	}

	if err := gone.Delete(); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		getJSON(t, url+"/pods", &pods)
		if len(pods) == 1 || time.Now().After(deadline) {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if len(pods) != 1 || pods[0].Cgroup != keptCgroup || !pods[0].Complete {
		t.Fatalf("after the pod was deleted, /pods lists %+v; want only %s, complete", pods, keptCgroup)
	}
	if _, err := os.Stat(gonePins); !os.IsNotExist(err) {
		t.Errorf("the deleted pod's pins %s are still there: %v", gonePins, err)
	}
	body := httpBody(t, url+"/metrics")
	for _, want := range []string{
		"sluice_agent_collected_pods_total 1",
		`sluice_agent_pods{state="complete"} 1`,
		`sluice_agent_pods{state="gone"} 0`,
		fmt.Sprintf(`sluice_kernel_events_total{event="inbound_steered",pod_cgroup=%q,pod_uid="3f2a8c1e-5b7d-4e0a-9c6f-1d2e3f4a5b6c"} 0`, keptCgroup),
	} {
		if !strings.Contains(body, want) {
			t.Errorf("/metrics lacks %s", want)
		}
	}
	target, err := loader.ResolveTarget(keptCgroup, keptPins)
	if err != nil {
		t.Fatal(err)
	}
	s, err := loader.Status(target)
	if err != nil || !s.Complete {
		t.Errorf("the kept pod after the collection: %v, missing %v", err, s.Missing)
	}
}

func httpBody(t *testing.T, url string) string {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// route --pods changes every pod whose cgroup matches, and only those.
func TestRouteForManyPods(t *testing.T) {
	privileged(t)
	bed := testbed.Must(t)
	var cgroups []string
	for _, name := range []string{"a", "b"} {
		pod, err := bed.AddPod(name)
		if err != nil {
			t.Fatal(err)
		}
		mustCLI(t, "install", "--cgroup", pod.Cgroup, "--netns", pod.Netns)
		t.Cleanup(func() { mustCLI(t, "uninstall", "--cgroup", pod.Cgroup) })
		cgroups = append(cgroups, pod.Cgroup)
	}
	// The bed's cgroup root is unique to this test: *<root>/* is its pods.
	pattern := "*" + filepath.Dir(cgroups[0]) + "/*"
	out := mustCLI(t, "route", "set", "--pods", pattern, "198.19.0.10:80", "198.18.2.2:8080=90", "198.18.3.2:8080=10")
	if strings.Count(out, "route 198.19.0.10:80 set") != 2 {
		t.Errorf("route set --pods said:\n%s", out)
	}
	for _, cg := range cgroups {
		if out := mustCLI(t, "route", "list", "--cgroup", cg); !strings.Contains(out, "198.18.3.2:8080") {
			t.Errorf("%s has no route after route set --pods:\n%s", cg, out)
		}
	}
	mustCLI(t, "route", "delete", "--pods", cgroups[1], "198.19.0.10:80")
	if out := mustCLI(t, "route", "list", "--cgroup", cgroups[1]); strings.Contains(out, "198.19.0.10:80") {
		t.Errorf("%s still routes after route delete --pods:\n%s", cgroups[1], out)
	}
	if out := mustCLI(t, "route", "list", "--cgroup", cgroups[0]); !strings.Contains(out, "198.19.0.10:80") {
		t.Errorf("%s lost its route to a delete --pods that did not match it:\n%s", cgroups[0], out)
	}
	res := testbed.Run(t, sluice(t, "route", "set", "--pods", "*no-such-pod*", "198.19.0.10:80", "198.18.2.2:8080=1"))
	if res.Code != 1 || !strings.Contains(res.Stderr, "no installed pod's cgroup matches") {
		t.Errorf("route set --pods matching nothing: exit %d, %s", res.Code, res.Stderr)
	}
}

// Capture runs from the pins, never through the agent: killing the agent
// and starting it again under captured load fails or lets escape nothing.
func TestAgentRestartKeepsCapture(t *testing.T) {
	c := newUncapturedPod(t, nil)
	root := filepath.Join("/sys/fs/bpf", fmt.Sprintf("sluice-agent-restart-%d", os.Getpid()))
	t.Cleanup(func() { os.RemoveAll(root) })
	st, err := os.Stat(c.pod.Cgroup)
	if err != nil {
		t.Fatal(err)
	}
	pins := filepath.Join(root, fmt.Sprint(st.Sys().(*syscall.Stat_t).Ino))
	mustCLI(t, "install", "--cgroup", c.cgroup, "--pin-dir", pins, "--netns", c.pod.Netns)
	t.Cleanup(func() { mustCLI(t, "uninstall", "--cgroup", c.cgroup, "--pin-dir", pins) })
	l, err := c.pod.StartLogged(sluice(t, "run", "--cgroup", c.cgroup, "--pin-dir", pins, "--log-format", "json", "--log-level", "info"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := l.WaitFor("listening", nil, 10*time.Second); err != nil {
		t.Fatal(err)
	}

	agent := sluice(t, "agent", "--pin-root", root, "--metrics-addr", "127.0.0.1:0", "--gc-interval", "100ms")
	if err := agent.Start(); err != nil {
		t.Fatal(err)
	}
	done := c.churn(t, "load-captured", "2s", netip.AddrPortFrom(c.host.Addr4, 8080).String())
	time.Sleep(500 * time.Millisecond)
	agent.Process.Kill()
	agent.Wait()
	startAgent(t, "--pin-root", root)
	res := <-done
	if res.Failed != 0 || res.OK == 0 {
		t.Errorf("connections while the agent was killed and restarted: %+v; want none failed or escaped", res)
	}
	if res := testbed.Run(t, sluice(t, "status", "--cgroup", c.cgroup, "--pin-dir", pins)); res.Code != 0 {
		t.Errorf("install after the agent's restart: %s%s", res.Stdout, res.Stderr)
	}
}
