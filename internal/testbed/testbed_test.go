package testbed

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
)

func TestMain(m *testing.M) {
	RunHelperIfRequested()
	os.Exit(m.Run())
}

func self(t *testing.T) string {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatalf("find test binary: %v", err)
	}
	return exe
}

const payloadSize = 1 << 20

// checkExchange checks a client result against an echo server with no
// proxy in between.
func checkExchange(t *testing.T, res ClientResult, wantLocal netip.Addr, addr string, size int64) {
	t.Helper()
	if res.Sent != size || res.Received != size {
		t.Errorf("sent %d, received %d, want %d each", res.Sent, res.Received, size)
	}
	if res.SentSHA != res.RecvSHA {
		t.Errorf("checksums differ: sent %s, received %s", res.SentSHA, res.RecvSHA)
	}
	if res.ServerSaw != res.Local {
		t.Errorf("server saw %s, client is %s", res.ServerSaw, res.Local)
	}
	if res.Peer != addr {
		t.Errorf("peer %s, want %s", res.Peer, addr)
	}
	local, err := netip.ParseAddrPort(res.Local)
	if err != nil {
		// Errorf, not Fatalf: this also runs on goroutines other than the test's.
		t.Errorf("parse local address %q: %v", res.Local, err)
		return
	}
	if local.Addr() != wantLocal {
		t.Errorf("local address %s, want %s", local.Addr(), wantLocal)
	}
}

// TestEchoInProcess exercises Echo and the client exchange without any
// namespaces, on an ephemeral loopback port.
func TestEchoInProcess(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { defer close(done); Echo(ln) }()
	defer func() { ln.Close(); <-done }()

	const size = 300_000 // not a multiple of the buffer size
	res, err := runClient(ln.Addr().String(), size, false)
	if err != nil {
		t.Fatalf("client: %v (%+v)", err, res)
	}
	checkExchange(t, res, netip.MustParseAddr("127.0.0.1"), ln.Addr().String(), size)

	// The payload is the ChaCha8 stream of the fixed seed.
	var seed [32]byte
	copy(seed[:], clientSeed)
	want := make([]byte, size)
	_, _ = rand.NewChaCha8(seed).Read(want)
	if got := sha256Hex(want); res.SentSHA != got {
		t.Errorf("sent sha256 %s, want %s", res.SentSHA, got)
	}

	// Sending the same seed twice gives the same bytes.
	again, err := runClient(ln.Addr().String(), size, false)
	if err != nil {
		t.Fatal(err)
	}
	if again.SentSHA != res.SentSHA {
		t.Errorf("payload not deterministic: %s then %s", res.SentSHA, again.SentSHA)
	}
}

// TestEchoClosesOpenConns checks that Echo returns once its listener is
// closed even while a client keeps a connection open.
func TestEchoClosesOpenConns(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { defer close(done); Echo(ln) }()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	line := make([]byte, 5)
	if _, err := io.ReadFull(c, line); err != nil || string(line) != "peer=" {
		t.Fatalf("read %q, %v", line, err)
	}
	ln.Close()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("Echo did not return after its listener was closed")
	}
}

func TestParseClientOutput(t *testing.T) {
	var res ClientResult
	if err := parseLastJSONLine([]byte("noise\n{\"sent\":3,\"error\":\"x\"}\n"), &res); err != nil {
		t.Fatal(err)
	}
	if res.Sent != 3 || res.Err != "x" {
		t.Errorf("got %+v", res)
	}
	if err := parseLastJSONLine(nil, &res); err == nil {
		t.Error("empty output parsed without error")
	}
}

func TestSubnets(t *testing.T) {
	s := subnetFor(10)
	for _, c := range []struct {
		got  netip.Addr
		want string
	}{
		{s.node4, "198.18.10.1"}, {s.addr4, "198.18.10.2"}, {s.extra4, "198.18.10.3"},
		{s.node6, "2001:2:0:a::1"}, {s.addr6, "2001:2:0:a::2"},
	} {
		if c.got.String() != c.want {
			t.Errorf("got %s, want %s", c.got, c.want)
		}
	}
	for _, a := range []netip.Addr{s.node4, s.addr4, s.extra4} {
		if !netip.MustParsePrefix("198.18.0.0/15").Contains(a) {
			t.Errorf("%s outside 198.18.0.0/15", a)
		}
	}
	for _, a := range []netip.Addr{s.node6, s.addr6} {
		if !netip.MustParsePrefix("2001:2::/48").Contains(a) {
			t.Errorf("%s outside 2001:2::/48", a)
		}
	}
}

func TestPodReachesHost(t *testing.T) {
	RequirePrivileged(t)
	b := Must(t)
	pod, err := b.AddPod("client")
	if err != nil {
		t.Fatal(err)
	}
	host, err := b.AddHost("server")
	if err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name  string
		addr  string
		local netip.Addr
	}{
		{"ipv4", netip.AddrPortFrom(host.Addr4, 8080).String(), pod.Addr4},
		{"ipv6", netip.AddrPortFrom(host.Addr6, 8080).String(), pod.Addr6},
		{"extra4", netip.AddrPortFrom(host.Extra4, 8080).String(), pod.Addr4},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			if _, err := host.ListenEcho(c.addr); err != nil {
				t.Fatal(err)
			}
			res, err := pod.RunClient(self(t), c.addr, payloadSize)
			if err != nil {
				t.Fatalf("%v (%+v)", err, res)
			}
			checkExchange(t, res, c.local, c.addr, payloadSize)
		})
	}
}

func TestPodLoopback(t *testing.T) {
	RequirePrivileged(t)
	b := Must(t)
	pod, err := b.AddPod("app")
	if err != nil {
		t.Fatal(err)
	}
	for _, addr := range []string{"127.0.0.1:9000", "[::1]:9000"} {
		if _, err := pod.ListenEcho(addr); err != nil {
			t.Fatal(err)
		}
		res, err := pod.RunClient(self(t), addr, payloadSize)
		if err != nil {
			t.Fatalf("%v (%+v)", err, res)
		}
		checkExchange(t, res, netip.MustParseAddrPort(addr).Addr(), addr, payloadSize)
	}
}

func TestRunClientAs(t *testing.T) {
	RequirePrivileged(t)
	b := Must(t)
	pod, err := b.AddPod("client")
	if err != nil {
		t.Fatal(err)
	}
	host, err := b.AddHost("server")
	if err != nil {
		t.Fatal(err)
	}
	addr := netip.AddrPortFrom(host.Addr4, 80).String()
	if _, err := host.ListenEcho(addr); err != nil {
		t.Fatal(err)
	}
	res, err := pod.RunClientAs(WorldExecutable(t), addr, payloadSize, 1337, 1337)
	if err != nil {
		t.Fatalf("%v (%+v)", err, res)
	}
	checkExchange(t, res, pod.Addr4, addr, payloadSize)
}

// nsInode returns the inode identifying the network namespace at path.
func nsInode(t *testing.T, path string) uint64 {
	t.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return fi.Sys().(*syscall.Stat_t).Ino
}

// TestPodStart checks that a started process lands in the pod's cgroup and
// netns and keeps the caller's credentials.
func TestPodStart(t *testing.T) {
	RequirePrivileged(t)
	b := Must(t)
	pod, err := b.AddPod("app")
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("/bin/sh", "-c", "id -u; id -g; cat /proc/self/cgroup; readlink /proc/self/ns/net")
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 1337, Gid: 1337}}
	var out strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := pod.Start(cmd); err != nil {
		t.Fatal(err)
	}
	if err := cmd.Wait(); err != nil {
		t.Fatalf("%v: %s", err, out.String())
	}
	mnt, err := cgroup2Mount()
	if err != nil {
		t.Fatal(err)
	}
	got := out.String()
	for _, want := range []string{
		"1337\n1337\n",
		"0::" + strings.TrimPrefix(pod.Cgroup, mnt) + "\n",
		fmt.Sprintf("net:[%d]", nsInode(t, pod.Netns)),
	} {
		if !strings.Contains(got, want) {
			t.Errorf("output %q lacks %q", got, want)
		}
	}
}

func readSysctl(t *testing.T, path string) string {
	t.Helper()
	v, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(v))
}

// TestDo checks that Do and DoNode run inside the right namespaces and that
// forwarding is on in the node only.
func TestDo(t *testing.T) {
	RequirePrivileged(t)
	const fwd4, fwd6 = "/proc/sys/net/ipv4/ip_forward", "/proc/sys/net/ipv6/conf/all/forwarding"
	const dad = "/proc/sys/net/ipv6/conf/default/accept_dad"
	root4, root6, rootDAD := readSysctl(t, fwd4), readSysctl(t, fwd6), readSysctl(t, dad)
	b := Must(t)
	pod, err := b.AddPod("app")
	if err != nil {
		t.Fatal(err)
	}
	host, err := b.AddHost("remote")
	if err != nil {
		t.Fatal(err)
	}
	if got4, got6 := readSysctl(t, fwd4), readSysctl(t, fwd6); got4 != root4 || got6 != root6 {
		t.Errorf("root netns forwarding changed: %s/%s -> %s/%s", root4, root6, got4, got6)
	}
	if got := readSysctl(t, dad); got != rootDAD {
		t.Errorf("root netns accept_dad changed: %s -> %s", rootDAD, got)
	}

	var node4, node6 []byte
	if err := b.DoNode(func() (err error) {
		// Not readSysctl: t.Fatal must not run on DoNode's goroutine.
		if node4, err = os.ReadFile(fwd4); err != nil {
			return err
		}
		node6, err = os.ReadFile(fwd6)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	if string(node4) != "1\n" || string(node6) != "1\n" {
		t.Errorf("node forwarding %s/%s, want 1/1", node4, node6)
	}

	wantAddrs := func(iface string, want ...netip.Addr) func() error {
		return func() error {
			link, err := netlink.LinkByName(iface)
			if err != nil {
				return err
			}
			addrs, err := netlink.AddrList(link, netlink.FAMILY_ALL)
			if err != nil {
				return err
			}
			have := map[netip.Addr]bool{}
			for _, a := range addrs {
				ip, _ := netip.AddrFromSlice(a.IP)
				have[ip.Unmap()] = true
			}
			for _, w := range want {
				if !have[w] {
					return fmt.Errorf("%s lacks %s (has %v)", iface, w, addrs)
				}
			}
			return nil
		}
	}
	if err := pod.Do(wantAddrs(pod.Iface, pod.Addr4, pod.Addr6)); err != nil {
		t.Error(err)
	}
	if err := host.Do(wantAddrs("eth0", host.Addr4, host.Addr6, host.Extra4)); err != nil {
		t.Error(err)
	}
	if err := b.DoNode(wantAddrs("veth1", netip.MustParseAddr("198.18.1.1"), netip.MustParseAddr("2001:2:0:1::1"))); err != nil {
		t.Error(err)
	}
	// A socket made inside Do stays in the pod's netns afterwards.
	var ln net.Listener
	if err := pod.Do(func() (err error) {
		ln, err = net.Listen("tcp", netip.AddrPortFrom(pod.Addr4, 0).String())
		return err
	}); err != nil {
		t.Fatal(err)
	}
	ln.Close()
	// Errors from fn come back unchanged.
	sentinel := errors.New("sentinel")
	if err := pod.Do(func() error { return sentinel }); !errors.Is(err, sentinel) {
		t.Errorf("Do returned %v, want the sentinel", err)
	}
}

func TestAddErrors(t *testing.T) {
	RequirePrivileged(t)
	b := Must(t)
	if _, err := b.AddPod("a"); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"a", "node", "", "../x", "a/b"} {
		if _, err := b.AddHost(name); err == nil {
			t.Errorf("AddHost(%q) succeeded", name)
		}
	}
}

func exists(path string) bool {
	_, err := os.Lstat(path)
	return !errors.Is(err, os.ErrNotExist)
}

func TestCloseRemovesEverything(t *testing.T) {
	RequirePrivileged(t)
	prefix := fmt.Sprintf("st-close%d", os.Getpid())
	b, err := New(prefix)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close() // in case the test fails before its own Close
	pod, err := b.AddPod("app")
	if err != nil {
		t.Fatal(err)
	}
	host, err := b.AddHost("remote")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := host.ListenEcho(netip.AddrPortFrom(host.Addr4, 7).String()); err != nil {
		t.Fatal(err)
	}
	podCmd, hostCmd := exec.Command("sleep", "600"), exec.Command("sleep", "600")
	if err := pod.Start(podCmd); err != nil {
		t.Fatal(err)
	}
	if err := host.Start(hostCmd); err != nil {
		t.Fatal(err)
	}
	// An exited and reaped process must not trip Close up.
	done := exec.Command("true")
	if err := pod.Start(done); err != nil {
		t.Fatal(err)
	}
	if err := done.Wait(); err != nil {
		t.Fatal(err)
	}
	procs, err := os.ReadFile(filepath.Join(pod.Cgroup, "cgroup.procs"))
	if err != nil || strings.TrimSpace(string(procs)) != strconv.Itoa(podCmd.Process.Pid) {
		t.Errorf("pod cgroup.procs = %q, %v; want the sleep's pid %d", procs, err, podCmd.Process.Pid)
	}
	cgroupRoot := filepath.Dir(pod.Cgroup)
	paths := []string{pod.Netns, host.Netns, netnsPath(prefix + "-node"), pod.Cgroup, cgroupRoot}
	for _, p := range paths {
		if !exists(p) {
			t.Errorf("%s missing before Close", p)
		}
	}

	if err := b.Close(); err != nil {
		t.Fatalf("close: %v", err)
	}
	for _, p := range paths {
		if exists(p) {
			t.Errorf("%s still there after Close", p)
		}
	}
	for _, cmd := range []*exec.Cmd{podCmd, hostCmd} {
		if err := syscall.Kill(cmd.Process.Pid, 0); !errors.Is(err, syscall.ESRCH) {
			t.Errorf("pid %d: kill 0 = %v, want ESRCH", cmd.Process.Pid, err)
		}
	}
	if err := b.Close(); err != nil {
		t.Errorf("second close: %v", err)
	}
	if _, err := b.AddPod("late"); err == nil {
		t.Error("AddPod after Close succeeded")
	}
	if err := pod.Start(exec.Command("true")); err == nil {
		t.Error("Start after Close succeeded")
	}
}

// TestLeftoversRemoved simulates a crashed earlier run that left a node
// netns, a pod netns and cgroups behind under the same prefix.
func TestLeftoversRemoved(t *testing.T) {
	RequirePrivileged(t)
	prefix := fmt.Sprintf("st-left%d", os.Getpid())
	mnt, err := cgroup2Mount()
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{prefix + "-node", prefix + "-app"} {
		if err := createNetns(name); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { deleteNetns(name) })
	}
	leftCgroup := filepath.Join(mnt, prefix, "app", "nested")
	if err := os.MkdirAll(leftCgroup, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { removeCgroupTree(filepath.Join(mnt, prefix), time.Now()) })
	oldPod := nsInode(t, netnsPath(prefix+"-app"))

	b, err := New(prefix)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	if exists(leftCgroup) {
		t.Errorf("leftover cgroup %s not removed", leftCgroup)
	}
	pod, err := b.AddPod("app")
	if err != nil {
		t.Fatal(err)
	}
	if nsInode(t, pod.Netns) == oldPod {
		t.Error("pod reuses the leftover netns")
	}
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{pod.Netns, netnsPath(prefix + "-node"), filepath.Join(mnt, prefix)} {
		if exists(p) {
			t.Errorf("%s still there after Close", p)
		}
	}
}

// TestTwoBeds runs two Beds with the same pod and host names and addresses
// side by side.
func TestTwoBeds(t *testing.T) {
	RequirePrivileged(t)
	type side struct {
		pod  *Pod
		addr string
	}
	var sides []side
	for range 2 {
		b := Must(t)
		pod, err := b.AddPod("client")
		if err != nil {
			t.Fatal(err)
		}
		host, err := b.AddHost("server")
		if err != nil {
			t.Fatal(err)
		}
		addr := netip.AddrPortFrom(host.Addr6, 8080).String()
		if _, err := host.ListenEcho(addr); err != nil {
			t.Fatal(err)
		}
		sides = append(sides, side{pod, addr})
	}
	if sides[0].pod.Netns == sides[1].pod.Netns {
		t.Fatalf("both beds use netns %s", sides[0].pod.Netns)
	}
	exe := self(t)
	var wg sync.WaitGroup
	for _, s := range sides {
		wg.Go(func() {
			res, err := s.pod.RunClient(exe, s.addr, payloadSize)
			if err != nil {
				t.Errorf("%s: %v (%+v)", s.pod.Netns, err, res)
				return
			}
			checkExchange(t, res, s.pod.Addr6, s.addr, payloadSize)
		})
	}
	wg.Wait()
}

// sha256Hex is used to cross-check the client's payload hash.
func sha256Hex(b []byte) string {
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

// TestAddPodFailureCleanedUp makes AddPod fail half-way (its node-side veth
// name is taken) and checks that Close still removes what it made.
func TestAddPodFailureCleanedUp(t *testing.T) {
	RequirePrivileged(t)
	prefix := fmt.Sprintf("st-fail%d", os.Getpid())
	b, err := New(prefix)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	if err := b.DoNode(func() error {
		return netlink.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "veth1"}, PeerName: "squatter"})
	}); err != nil {
		t.Fatal(err)
	}
	if _, err := b.AddPod("app"); err == nil {
		t.Fatal("AddPod succeeded despite the taken veth name")
	}
	half := netnsPath(prefix + "-app")
	if !exists(half) {
		t.Fatalf("expected the half-made netns %s to exist until Close", half)
	}
	// The Bed stays usable: the next pod gets the next subnet.
	pod, err := b.AddPod("other")
	if err != nil {
		t.Fatal(err)
	}
	if want := netip.MustParseAddr("198.18.2.2"); pod.Addr4 != want {
		t.Errorf("pod address %s, want %s", pod.Addr4, want)
	}
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{half, pod.Netns, pod.Cgroup, netnsPath(prefix + "-node")} {
		if exists(p) {
			t.Errorf("%s still there after Close", p)
		}
	}
}

func TestDoGoexit(t *testing.T) {
	RequirePrivileged(t)
	b := Must(t)
	if err := b.DoNode(func() error { runtime.Goexit(); return nil }); err == nil {
		t.Error("DoNode returned nil after its function called Goexit")
	}
}

// A delayed host's link holds each packet for the delay each way: a TCP
// connect (one round trip) to it takes at least twice the delay, over IPv4
// and IPv6, and bytes arrive intact.
func TestDelayedHost(t *testing.T) {
	RequirePrivileged(t)
	bed := Must(t)
	pod, err := bed.AddPod("app")
	if err != nil {
		t.Fatal(err)
	}
	const delay = 20 * time.Millisecond
	far, err := bed.AddDelayedHost("far", delay)
	if err != nil {
		t.Fatal(err)
	}
	for i, a := range []netip.Addr{far.Addr4, far.Addr6} {
		local := []netip.Addr{pod.Addr4, pod.Addr6}[i]
		addr := netip.AddrPortFrom(a, 8080).String()
		if _, err := far.ListenEcho(addr); err != nil {
			t.Fatal(err)
		}
		var took time.Duration
		if err := pod.Do(func() error {
			start := time.Now()
			c, err := net.DialTimeout("tcp", addr, 5*time.Second)
			took = time.Since(start)
			if err == nil {
				c.Close()
			}
			return err
		}); err != nil {
			t.Fatalf("connect to %s: %v", addr, err)
		}
		if took < 2*delay || took > time.Second {
			t.Errorf("connect to %s took %v, want about %v", addr, took, 2*delay)
		}
		res, err := pod.RunClient(self(t), addr, 1<<20)
		if err != nil {
			t.Fatal(err)
		}
		checkExchange(t, res, local, addr, 1<<20)
	}
}
