package e2e

// The init container's view: install run inside the pod with no --cgroup,
// and as a drop-in for istio-iptables and Linkerd's proxy-init with their
// injectors' exact argument lists.

import (
	"bytes"
	"net/netip"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/sluicemesh/sluice/internal/testbed"
)

// Istio's and Linkerd's injectors' argument lists, unchanged.
var (
	istioInjected   = []string{"-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-x", "", "-b", "*", "-d", "15090,15021,15020"}
	linkerdInjected = []string{"--incoming-proxy-port", "4143", "--outgoing-proxy-port", "4140", "--proxy-uid", "2102",
		"--inbound-ports-to-ignore", "4190,4191,4567,4568", "--outbound-ports-to-ignore", "4567,4568",
		"--firewall-bin-path", "iptables-nft", "--ipv6=false"}
)

// initPod is a pod whose processes run in a container cgroup named as the
// kubelet's systemd driver names them, with a server host beside it.
type initPod struct {
	pod  *testbed.Pod
	host *testbed.Host
	// cgroup is the pod's cgroup: the container's parent.
	cgroup string
}

func newInitPod(t *testing.T) *initPod {
	t.Helper()
	privileged(t)
	bed := testbed.Must(t)
	pod, err := bed.AddPod("app", systemdPodPath...)
	if err != nil {
		t.Fatal(err)
	}
	host, err := bed.AddHost("web")
	if err != nil {
		t.Fatal(err)
	}
	p := &initPod{pod: pod, host: host, cgroup: filepath.Dir(pod.Cgroup)}
	// Registered after the bed, so it runs before the bed removes the cgroup.
	t.Cleanup(func() { mustCLI(t, "uninstall", "--cgroup", p.cgroup) })
	return p
}

// run runs the CLI as the pod's init container would: in its container's
// cgroup and its network namespace, as root.
func (p *initPod) run(t *testing.T, args ...string) testbed.Result {
	t.Helper()
	return p.runCmd(t, sluice(t, args...))
}

func (p *initPod) runCmd(t *testing.T, cmd *exec.Cmd) testbed.Result {
	t.Helper()
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := p.pod.Start(cmd); err != nil {
		t.Fatal(err)
	}
	err := cmd.Wait()
	res := testbed.Result{Stdout: stdout.String(), Stderr: stderr.String()}
	if err != nil {
		res.Code = cmd.ProcessState.ExitCode()
	}
	return res
}

func (p *initPod) mustRun(t *testing.T, args ...string) string {
	t.Helper()
	res := p.run(t, args...)
	if res.Code != 0 {
		t.Fatalf("in the pod, sluice %s: exit %d\n%s%s", strings.Join(args, " "), res.Code, res.Stdout, res.Stderr)
	}
	return res.Stdout
}

func TestInPodInstallWithNoArguments(t *testing.T) {
	p := newInitPod(t)
	out := p.mustRun(t, "install", "--validate")
	if !strings.Contains(out, "validated: a connection to 198.19.255.254:15002 was captured to port 15001, which saw original destination 198.19.255.254:15002") {
		t.Errorf("install --validate said:\n%s", out)
	}
	s := statusJSON(t, p.cgroup)
	if !s.Complete || s.Target.Cgroup != p.cgroup || s.Target.Interface != "eth0" {
		t.Fatalf("status: complete %v, cgroup %s (want the container's parent %s), interface %q, missing %v",
			s.Complete, s.Target.Cgroup, p.cgroup, s.Target.Interface, s.Missing)
	}

	// The capture is real for the app: outbound through the sidecar, and
	// inbound on the pod's eth0.
	c := &capturedPod{pod: p.pod, host: p.host, cgroup: p.cgroup, echoes: map[string]*testbed.EchoListener{}}
	out4 := netip.AddrPortFrom(p.host.Addr4, 8080).String()
	var err error
	if c.echoes[out4], err = p.host.ListenEcho(out4); err != nil {
		t.Fatal(err)
	}
	// The sidecar container, also given nothing, finds the pod too.
	l, err := p.pod.StartLogged(sluice(t, "run", "--log-format", "json", "--log-level", "debug"))
	if err != nil {
		t.Fatal(err)
	}
	if e, err := l.WaitFor("serving the pod this sidecar runs in", nil, 10*time.Second); err != nil || e.Str("cgroup") != p.cgroup {
		t.Fatalf("sidecar with no --cgroup: %v (%s)", err, l.Output())
	}
	if _, err := l.WaitFor("listening", nil, 10*time.Second); err != nil {
		t.Fatal(err)
	}
	c.sidecar = l
	c.expectProxied(t, c.client(t, out4), out4)
	// Flow events reach the exporter a moment after the connection.
	var names []string
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		m := c.scrape(t)
		if m["sluice_tcp_connections_opened_total"] != nil {
			break
		}
		if time.Now().After(deadline) {
			names = names[:0]
			for n := range m {
				names = append(names, n)
			}
			t.Errorf("the sidecar found with no --cgroup exports no flow metrics: %v", names)
			break
		}
	}
	in4 := netip.AddrPortFrom(p.pod.Addr4, 8080).String()
	if err := p.pod.StartEcho(self(t), in4); err != nil {
		t.Fatal(err)
	}
	c.expectProxiedDir(t, c.inbound(t, in4), in4, "inbound")

	// Rerun, as a restarted pod sandbox reruns its init container, with the
	// sidecar now on the port: it changes nothing and the probe is accepted
	// by the sidecar itself.
	out = p.mustRun(t, "install", "--validate")
	if !strings.Contains(out, "nothing changed") || !strings.Contains(out, "accepted by the sidecar on port 15001") {
		t.Errorf("rerun said:\n%s", out)
	}

	// In a private cgroup namespace, as runtimes start containers on cgroup
	// v2 hosts, /proc/self/cgroup says only "0::/": install finds its
	// cgroup in the host's hierarchy all the same.
	unshared := exec.Command("unshare", "--cgroup", sluiceBin, "install", "--validate")
	if res := p.runCmd(t, unshared); res.Code != 0 || !strings.Contains(res.Stdout, "nothing changed") || !strings.Contains(res.Stdout, "validated") {
		t.Errorf("install --validate in a private cgroup namespace: exit %d\n%s%s", res.Code, res.Stdout, res.Stderr)
	}
}

// The injectors' exact argument lists install the same policy as the
// equivalent install flags, compared through status --json.
func TestMeshArgumentListsInstallTheSamePolicy(t *testing.T) {
	for _, tc := range []struct {
		name       string
		args       []string
		equivalent []string
	}{
		{"istio-iptables", append([]string{"istio-iptables"}, istioInjected...),
			[]string{"install", "-p", "15001", "-z", "15006", "-u", "1337", "-g", "1337", "-i", "*", "-b", "*", "-d", "15090,15021,15020,15008"}},
		{"istio-iptables --run-validation", append([]string{"istio-iptables", "--run-validation"}, istioInjected...),
			[]string{"install", "-p", "15001", "-z", "15006", "-u", "1337", "-g", "1337", "-i", "*", "-b", "*", "-d", "15090,15021,15020,15008"}},
		{"proxy-init", append([]string{"proxy-init"}, linkerdInjected...),
			[]string{"install", "--incoming-proxy-port", "4143", "--outgoing-proxy-port", "4140", "-u", "2102", "-g", "2102",
				"-d", "4190,4191,4567,4568", "-o", "4567,4568", "-x", "::/0"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := newInitPod(t)
			out := p.mustRun(t, tc.args...)
			if strings.Contains(tc.name, "validation") && !strings.Contains(out, "validated") {
				t.Errorf("--run-validation did not validate:\n%s", out)
			}
			got := statusJSON(t, p.cgroup)
			if !got.Complete || got.Target.Interface != "eth0" {
				t.Fatalf("%s: complete %v, interface %q, missing %v", tc.name, got.Complete, got.Target.Interface, got.Missing)
			}
			mustCLI(t, "uninstall", "--cgroup", p.cgroup)
			p.mustRun(t, tc.equivalent...)
			want := statusJSON(t, p.cgroup)
			if !got.Plan.Equal(want.Plan) {
				t.Errorf("%s installed\n%+v\nwhere %v installed\n%+v", tc.name, got.Plan, tc.equivalent, want.Plan)
			}
		})
	}
}

// Refusals leave nothing installed, and say why in one line.
func TestMeshRefusalsInstallNothing(t *testing.T) {
	p := newInitPod(t)
	for _, args := range [][]string{
		{"istio-iptables", "-m", "TPROXY", "-i", "*"},
		{"istio-iptables", "-k", "eth1", "-i", "*"},
		{"proxy-init", "-p", "4143", "-o", "4140", "-u", "2102", "--subnets-to-ignore", "198.18.0.0/16"},
	} {
		res := p.run(t, args...)
		if res.Code != 2 || strings.Count(strings.TrimSpace(res.Stderr), "\n") != 0 || !strings.Contains(res.Stderr, "not supported") {
			t.Errorf("%v: exit %d, stderr %q", args, res.Code, res.Stderr)
		}
		if s := testbed.Run(t, sluice(t, "status", "--cgroup", p.cgroup)); !strings.Contains(s.Stdout+s.Stderr, "not installed") {
			t.Errorf("%v left something: %s%s", args, s.Stdout, s.Stderr)
		}
	}
	// A container without the host's bpffs: install refuses rather than
	// mount one that would die with the container.
	nobpffs := exec.Command("unshare", "--mount", "--propagation", "private", "sh", "-c", `mount -t tmpfs none /sys/fs/bpf && exec "$0" install`, sluiceBin)
	if res := p.runCmd(t, nobpffs); res.Code != 1 || !strings.Contains(res.Stderr, "is not on a bpf filesystem in this container") {
		t.Errorf("install with no bpffs: exit %d, %s", res.Code, res.Stderr)
	}
	if s := testbed.Run(t, sluice(t, "status", "--cgroup", p.cgroup)); !strings.Contains(s.Stdout+s.Stderr, "not installed") {
		t.Errorf("install with no bpffs left something: %s%s", s.Stdout, s.Stderr)
	}

	// Outside a pod (the test's own cgroup is no pod's container) install
	// with no --cgroup refuses rather than capture the caller's parent.
	res := testbed.Run(t, sluice(t, "install"))
	if res.Code != 2 || !strings.Contains(res.Stderr, "no --cgroup given") {
		t.Errorf("install outside a pod: exit %d, %s", res.Code, res.Stderr)
	}
}
