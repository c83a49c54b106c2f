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

	"github.com/sluicemesh/sluice/internal/testbed"
)

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
	stage := worldReadableDir(t)
	script := `set -e
mount --make-rprivate /
for ns in /run/netns/*; do umount -l "$ns" 2>/dev/null || true; done
mount --bind /sys/fs/bpf/sluice "$STAGE"
mount -t tmpfs -o mode=0755 sidecar-bpf /sys/fs/bpf
if [ -z "$NO_PINS" ]; then
	mkdir /sys/fs/bpf/sluice
	mount --move "$STAGE" /sys/fs/bpf/sluice
fi
exec setpriv --reuid $ID --regid $ID --clear-groups --inh-caps=-all --ambient-caps=-all --bounding-set=-all -- "$@"`
	cmd := exec.Command("sh", append([]string{"-c", script, "sidecar", sluiceBin}, argv...)...)
	cmd.Env = append(os.Environ(), "STAGE="+stage, fmt.Sprintf("ID=%d", uid))
	cmd.SysProcAttr = &syscall.SysProcAttr{Unshareflags: syscall.CLONE_NEWNS}
	return cmd
}

// The sidecar runs as uid 1337 with no capability, with the pins in its
// mount view as deploy/ gave them, and serves, splice on: it opens none of
// them. A uid-1000 process in the pod can neither read the pins nor bind
// the capture ports.
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
	// too: it asks the pod's hooks again and hands connections over as
	// uid 1337, with no map.
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

// Without /metrics, the sidecar needs no BPF at all: as uid 1337 with no
// capability and no pin in its mount view (no bpffs of the host), it asks
// the pod's hooks for its plan (the install's -p and -z here are not the
// defaults), serves on those ports and offloads.
func TestSidecarWithoutPinsServesThePlanTheKernelAnswers(t *testing.T) {
	c := newCapturedPodIn(t, systemdPodPath, "--splice", "-p", "15011", "-z", "15016", "--offload-ports", "8080")
	cmd := inSidecarContainer(t, 1337, "run", "--metrics-addr", "", "--log-format", "json", "--log-level", "debug")
	cmd.Env = append(cmd.Env, "NO_PINS=1")
	l, err := c.pod.StartLogged(cmd)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := l.WaitFor("listening", nil, 10*time.Second); err != nil {
		t.Fatal(err)
	}
	c.sidecar = l
	if plan := l.Entries("plan from the pod's hooks"); len(plan) != 1 || plan[0].Num("outbound_port") != 15011 || plan[0].Num("inbound_port") != 15016 || plan[0]["offload"] != true {
		t.Fatalf("want the sidecar to learn ports 15011/15016 and offload from the kernel:\n%s", l.Output())
	}
	before := statusJSON(t, c.cgroup).Counters
	for _, a := range []netip.Addr{c.host.Addr4, c.host.Addr6} {
		addr := netip.AddrPortFrom(a, 8080).String()
		if e := c.proxiedEntry(t, c.client(t, addr), addr, "outbound"); e["offloaded"] != true {
			t.Errorf("%s: not offloaded: %v", addr, e)
		}
	}
	if d := diff(before, statusJSON(t, c.cgroup).Counters); d["offload_handed"] != 2 {
		t.Errorf("%d connections handed to the kernel, want 2: %v", d["offload_handed"], d)
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
