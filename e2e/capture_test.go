package e2e

import (
	"bytes"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sluicemesh/sluice/internal/testbed"
)

const payload = 16 << 20

// capturedPod is a pod with capture installed through the CLI, a remote host
// with echo servers, and (optionally) the built-in sidecar running in the pod.
type capturedPod struct {
	bed     *testbed.Bed
	pod     *testbed.Pod
	host    *testbed.Host
	sidecar *testbed.Logged
	// cgroup is where capture is installed: the pod's cgroup, or a parent
	// of it, as a Kubernetes pod's cgroup is the parent of its
	// containers'.
	cgroup string
	// echoes are the host's echo servers, by address.
	echoes map[string]*testbed.EchoListener
	// agentURL is the node agent's, once a test asked for the pod's flows,
	// and agentFrom runs what reaches it (nil: the test's own namespace).
	agentURL  string
	agentFrom func(func() error) error
}

// agent is the URL of the node's agent, which the first call starts: the
// node's flow ring keeps the pod's events until it reads them.
func (c *capturedPod) agent(t *testing.T) string {
	t.Helper()
	if c.agentURL == "" {
		c.agentURL = startAgent(t)
	}
	return c.agentURL
}

func newCapturedPod(t *testing.T, installArgs ...string) *capturedPod {
	t.Helper()
	return newCapturedPodIn(t, nil, installArgs...)
}

// newCapturedPodIn is newCapturedPod for a pod whose processes run in the
// nested cgroup path containerPath (see testbed.Bed.AddPod), with capture
// installed on the parent of the innermost cgroup: the pod's, when the path
// ends in a container's.
func newCapturedPodIn(t *testing.T, containerPath []string, installArgs ...string) *capturedPod {
	t.Helper()
	c := newUncapturedPod(t, containerPath)
	// Inbound capture too: outbound tests then also show it leaves replies alone.
	mustCLI(t, append([]string{"install", "--cgroup", c.cgroup, "--netns", c.pod.Netns}, installArgs...)...)
	// Registered after the bed, so it runs before the bed removes the cgroup.
	t.Cleanup(func() { mustCLI(t, "uninstall", "--cgroup", c.cgroup) })
	return c
}

// newUncapturedPod is a pod and a server host with its echo servers, where
// capture is yet to be installed on cgroup.
func newUncapturedPod(t testing.TB, containerPath []string) *capturedPod {
	t.Helper()
	privileged(t)
	bed := testbed.Must(t)
	pod, err := bed.AddPod("app", containerPath...)
	if err != nil {
		t.Fatal(err)
	}
	cgroup := pod.Cgroup
	if len(containerPath) > 1 {
		cgroup = filepath.Dir(pod.Cgroup)
	}
	host, err := bed.AddHost("web")
	if err != nil {
		t.Fatal(err)
	}
	echoes := map[string]*testbed.EchoListener{}
	for _, addr := range []netip.Addr{host.Addr4, host.Addr6, host.Extra4} {
		for _, port := range []uint16{8080, 9090} {
			ap := netip.AddrPortFrom(addr, port).String()
			if echoes[ap], err = host.ListenEcho(ap); err != nil {
				t.Fatal(err)
			}
		}
	}
	return &capturedPod{bed: bed, pod: pod, host: host, cgroup: cgroup, echoes: echoes}
}

// startSidecar runs `sluice run` in the pod as root; it switches to uid
// 1337 before it listens.
func (c *capturedPod) startSidecar(t testing.TB, args ...string) {
	t.Helper()
	l, err := c.pod.StartLogged(sluice(t, append([]string{"run", "--cgroup", c.cgroup, "--log-format", "json", "--log-level", "debug"}, args...)...))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := l.WaitFor("listening", nil, 10*time.Second); err != nil {
		t.Fatal(err)
	}
	c.sidecar = l
}

func (c *capturedPod) client(t *testing.T, addr string) testbed.ClientResult {
	t.Helper()
	res, err := c.pod.RunClient(self(t), addr, payload)
	if err != nil {
		t.Fatalf("client to %s: %v", addr, err)
	}
	checkIntact(t, res, addr)
	return res
}

// way is one direction and family a connection of the pod may take.
type way struct {
	name    string
	addr    netip.Addr // the server's: the host's outbound, the pod's inbound
	inbound bool
}

// everyWay is outbound and inbound, each over IPv4 and IPv6.
func (c *capturedPod) everyWay() []way {
	return []way{
		{"outbound IPv4", c.host.Addr4, false},
		{"outbound IPv6", c.host.Addr6, false},
		{"inbound IPv4", c.pod.Addr4, true},
		{"inbound IPv6", c.pod.Addr6, true},
	}
}

func checkIntact(t *testing.T, res testbed.ClientResult, addr string) {
	t.Helper()
	if res.Sent != payload || res.Received != payload || res.SentSHA != res.RecvSHA {
		t.Fatalf("payload to %s not intact: sent %d (%s) received %d (%s)", addr, res.Sent, res.SentSHA, res.Received, res.RecvSHA)
	}
	if res.Peer != addr {
		t.Errorf("app's getpeername = %s, want the original destination %s", res.Peer, addr)
	}
}

// expectProxied checks that the sidecar served the client's connection: it
// saw the original destination, moved every byte, and the server's peer was
// the sidecar's upstream socket.
func (c *capturedPod) expectProxied(t *testing.T, res testbed.ClientResult, addr string) {
	t.Helper()
	c.expectProxiedDir(t, res, addr, "outbound")
}

func (c *capturedPod) expectProxiedDir(t *testing.T, res testbed.ClientResult, addr, dir string) {
	t.Helper()
	e := c.proxiedEntry(t, res, addr, dir)
	if e.Num("sent") != payload || e.Num("received") != echoed(res) {
		t.Errorf("sidecar moved %d up, %d down; want %d and %d", e.Num("sent"), e.Num("received"), payload, echoed(res))
	}
}

// echoed is how many bytes the server sent back to res's client: the
// payload, after its "peer=ADDR\n" line.
func echoed(res testbed.ClientResult) int64 {
	return int64(payload + len("peer=\n") + len(res.ServerSaw))
}

// proxiedEntry waits for the sidecar's record of res's connection and
// checks that it saw the original destination and that the server's peer
// was its upstream socket.
func (c *capturedPod) proxiedEntry(t *testing.T, res testbed.ClientResult, addr, dir string) testbed.LogEntry {
	t.Helper()
	e, err := c.sidecar.WaitFor("proxied", func(e testbed.LogEntry) bool { return e.Str("client") == res.Local }, 10*time.Second)
	if err != nil {
		t.Fatalf("connection to %s from %s: %v", addr, res.Local, err)
	}
	if got := e.Str("orig_dst"); got != addr || e.Str("direction") != dir {
		t.Errorf("sidecar saw original destination %s (%s), want %s (%s)", got, e.Str("direction"), addr, dir)
	}
	if res.ServerSaw != e.Str("upstream") {
		t.Errorf("server's peer %s is not the sidecar's upstream socket %s", res.ServerSaw, e.Str("upstream"))
	}
	return e
}

// expectDirect checks that a connection bypassed the sidecar: the server's
// peer is the app's own socket.
func expectDirect(t *testing.T, res testbed.ClientResult, addr string) {
	t.Helper()
	if res.ServerSaw != res.Local {
		t.Errorf("connection to %s was not direct: app socket %s, server saw %s", addr, res.Local, res.ServerSaw)
	}
}

func TestOutboundCaptureIPv4(t *testing.T) {
	c := newCapturedPod(t)
	c.startSidecar(t)
	addr := netip.AddrPortFrom(c.host.Addr4, 8080).String()
	res := c.client(t, addr)
	// Redirected to the sidecar on 127.0.0.1, but from the pod's own
	// address, as under iptables REDIRECT.
	if !strings.HasPrefix(res.Local, c.pod.Addr4.String()+":") {
		t.Errorf("app socket %s: want the pod's address %s", res.Local, c.pod.Addr4)
	}
	c.expectProxied(t, res, addr)
	expectNoFirewallRules(t, c.pod)
}

func TestOutboundCaptureIPv6(t *testing.T) {
	c := newCapturedPod(t)
	c.startSidecar(t)
	addr := netip.AddrPortFrom(c.host.Addr6, 8080).String()
	res := c.client(t, addr)
	if !strings.HasPrefix(res.Local, "["+c.pod.Addr6.String()+"]:") {
		t.Errorf("app socket %s: want the pod's address %s", res.Local, c.pod.Addr6)
	}
	c.expectProxied(t, res, addr)
	expectNoFirewallRules(t, c.pod)
}

// Excluded port, excluded CIDR, loopback and the proxy's own uid go direct;
// a captured connection made last proves capture was active throughout.
func TestOutboundExclusions(t *testing.T) {
	privileged(t)
	// The host's second address is excluded; ports 9090 is excluded.
	c := newCapturedPod(t, "-x", "2001:2:ffff::/48,198.18.0.0/24,"+testbedHostExtra4+"/32", "-o", "9090")
	c.startSidecar(t)
	if c.host.Extra4.String() != testbedHostExtra4 {
		t.Fatalf("test bed gave the host %s as its second address, test expects %s", c.host.Extra4, testbedHostExtra4)
	}
	if _, err := c.pod.ListenEcho("127.0.0.1:9000"); err != nil {
		t.Fatal(err)
	}
	proxyOwn, err := c.pod.RunClientAs(testbed.WorldExecutable(t), netip.AddrPortFrom(c.host.Addr4, 8080).String(), payload, 1337, 1337)
	if err != nil {
		t.Fatal(err)
	}
	direct := map[string]testbed.ClientResult{
		"excluded CIDR":   c.client(t, netip.AddrPortFrom(c.host.Extra4, 8080).String()),
		"excluded port":   c.client(t, netip.AddrPortFrom(c.host.Addr4, 9090).String()),
		"loopback":        c.client(t, "127.0.0.1:9000"),
		"proxy's own uid": proxyOwn,
	}
	checkIntact(t, proxyOwn, netip.AddrPortFrom(c.host.Addr4, 8080).String())

	addr := netip.AddrPortFrom(c.host.Addr4, 8080).String()
	res := c.client(t, addr)
	c.expectProxied(t, res, addr)

	// The sidecar logs each connection when it ends, and the captured one
	// ended last: had it seen any of the others, they would be logged by now.
	for name, r := range direct {
		t.Run(name, func(t *testing.T) {
			expectDirect(t, r, r.Peer)
			for _, e := range c.sidecar.Entries("proxied") {
				if e.Str("client") == r.Local {
					t.Errorf("sidecar saw %s: %v", name, e)
				}
			}
		})
	}
}

// testbedHostExtra4 is the first host's second IPv4 address in a test bed
// (subnet 2, the pod has subnet 1).
const testbedHostExtra4 = "198.18.2.3"

// An include list (-i) captures only its CIDRs; an included port (-q)
// captures whatever the destination.
func TestOutboundIncludeLists(t *testing.T) {
	privileged(t)
	c := newCapturedPod(t, "-i", testbedHostExtra4+"/32", "-q", "9090")
	c.startSidecar(t)

	notListed := netip.AddrPortFrom(c.host.Addr4, 8080).String()
	expectDirect(t, c.client(t, notListed), notListed)
	for _, addr := range []string{
		netip.AddrPortFrom(c.host.Extra4, 8080).String(), // listed CIDR
		netip.AddrPortFrom(c.host.Addr4, 9090).String(),  // listed port
		netip.AddrPortFrom(c.host.Addr6, 9090).String(),
	} {
		c.expectProxied(t, c.client(t, addr), addr)
	}
}

// HAProxy from Debian, as uid 1337 with a "server x 0.0.0.0:0" backend, takes
// the built-in proxy's place: it learns the original destination through
// SO_ORIGINAL_DST exactly as it would behind iptables.
func TestHAProxyAsSidecar(t *testing.T) {
	privileged(t)
	haproxy, err := exec.LookPath("haproxy")
	if err != nil {
		t.Fatalf("haproxy not installed (scripts/deps.sh installs it): %v", err)
	}
	c := newCapturedPod(t)
	dir := worldReadableDir(t)
	cfg := filepath.Join(dir, "haproxy.cfg")
	if err := os.WriteFile(cfg, []byte(`global
  maxconn 256
defaults
  mode tcp
  timeout connect 5s
  timeout client 30s
  timeout server 30s
frontend outbound
  bind 127.0.0.1:15001
  default_backend original_dst
frontend inbound
  bind :15006
  default_backend original_dst
backend original_dst
  server x 0.0.0.0:0
`), 0o644); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(haproxy, "-db", "-f", cfg)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 1337, Gid: 1337}}
	if err := c.pod.Start(cmd); err != nil {
		t.Fatal(err)
	}
	if err := c.pod.WaitListening(15006, 10*time.Second); err != nil {
		t.Fatalf("%v\nhaproxy: %s", err, out.String())
	}
	addr := netip.AddrPortFrom(c.host.Addr4, 8080).String()
	res := c.client(t, addr)
	if res.ServerSaw == res.Local {
		t.Errorf("outbound connection did not go through HAProxy: app socket %s, server saw %s", res.Local, res.ServerSaw)
	}
	if ip := strings.Split(res.ServerSaw, ":")[0]; ip != c.pod.Addr4.String() {
		t.Errorf("server saw %s, want HAProxy dialing from the pod address %s", res.ServerSaw, c.pod.Addr4)
	}

	// Inbound: a client on the host reaches the app through HAProxy.
	if _, err := c.pod.ListenEcho("[::]:8080"); err != nil {
		t.Fatal(err)
	}
	in := netip.AddrPortFrom(c.pod.Addr4, 8080).String()
	res, err = c.host.RunClient(self(t), in, payload)
	if err != nil {
		t.Fatal(err)
	}
	checkIntact(t, res, in)
	if ip := strings.Split(res.ServerSaw, ":")[0]; res.ServerSaw == res.Local || ip != c.pod.Addr4.String() {
		t.Errorf("inbound connection did not go through HAProxy: client socket %s, app saw %s", res.Local, res.ServerSaw)
	}
}

// worldReadableDir is a temp dir a process running as uid 1337 can read.
func worldReadableDir(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "sluice-test-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	return dir
}

// expectNoFirewallRules checks the pod netns has no iptables or nftables rule:
// the capture is BPF only.
func expectNoFirewallRules(t *testing.T, pod *testbed.Pod) {
	t.Helper()
	if !netfilterLoaded() {
		// make test-kernel's VM loads no module it does not need: with
		// neither nfnetlink nor x_tables the kernel holds no rule at all.
		t.Log("no netfilter in this kernel (no nfnetlink, no ip_tables): no firewall rule can exist")
		return
	}
	for _, argv := range [][]string{{"nft", "list", "ruleset"}, {"iptables-save"}, {"ip6tables-save"}} {
		path, err := exec.LookPath(argv[0])
		if err != nil {
			t.Fatalf("%s not installed (scripts/deps.sh installs it): %v", argv[0], err)
		}
		var out bytes.Buffer
		cmd := exec.Command(path, argv[1:]...)
		cmd.Stdout, cmd.Stderr = &out, &out
		if err := pod.Start(cmd); err != nil {
			t.Fatal(err)
		}
		if err := cmd.Wait(); err != nil {
			t.Fatalf("%v: %v\n%s", argv, err, out.String())
		}
		for _, line := range strings.Split(out.String(), "\n") {
			if strings.HasPrefix(line, "-A ") || strings.Contains(line, "rule") || strings.HasPrefix(strings.TrimSpace(line), "chain ") {
				t.Errorf("%v in the pod shows a rule: %q", argv, line)
			}
		}
	}
}

// netfilterLoaded tells whether the kernel has anything that holds firewall
// rules: nf_tables speaks over nfnetlink, legacy iptables lists its tables
// in /proc.
func netfilterLoaded() bool {
	if fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_NETFILTER); err == nil {
		unix.Close(fd)
		return true
	}
	for _, f := range []string{"/proc/net/ip_tables_names", "/proc/net/ip6_tables_names"} {
		if _, err := os.Stat(f); err == nil {
			return true
		}
	}
	return false
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
