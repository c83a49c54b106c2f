package e2e

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/sluicemesh/sluice/internal/testbed"
)

// reconnect connects one socket twice: first to FIRST (expected to fail
// with "refused", or to succeed and be undone with an AF_UNSPEC connect for
// "disconnect"), then to SECOND, and reports the peer getpeername gives.
// args: refused|disconnect FIRST SECOND
func reconnect(args []string) (any, error) {
	if len(args) != 3 {
		return nil, errors.New("usage: reconnect refused|disconnect FIRST SECOND")
	}
	first, err := netip.ParseAddrPort(args[1])
	if err != nil {
		return nil, err
	}
	second, err := netip.ParseAddrPort(args[2])
	if err != nil {
		return nil, err
	}
	family := unix.AF_INET
	if first.Addr().Is6() {
		family = unix.AF_INET6
	}
	fd, err := unix.Socket(family, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	defer unix.Close(fd)
	err = unix.Connect(fd, sockaddrOf(first))
	switch args[0] {
	case "refused":
		if !errors.Is(err, unix.ECONNREFUSED) {
			return nil, fmt.Errorf("first connect to %s: %v, want refused", first, err)
		}
	case "disconnect":
		if err != nil {
			return nil, fmt.Errorf("first connect to %s: %w", first, err)
		}
		unspec := unix.RawSockaddr{Family: unix.AF_UNSPEC}
		if _, _, e := unix.Syscall(unix.SYS_CONNECT, uintptr(fd), uintptr(unsafe.Pointer(&unspec)), unsafe.Sizeof(unspec)); e != 0 {
			return nil, fmt.Errorf("connect AF_UNSPEC: %w", e)
		}
	default:
		return nil, fmt.Errorf("unknown mode %q", args[0])
	}
	if err := unix.Connect(fd, sockaddrOf(second)); err != nil {
		return nil, fmt.Errorf("second connect to %s: %w", second, err)
	}
	sa, err := unix.Getpeername(fd)
	if err != nil {
		return nil, err
	}
	return addrPortOf(sa).String(), nil
}

func sockaddrOf(a netip.AddrPort) unix.Sockaddr {
	if a.Addr().Is4() {
		return &unix.SockaddrInet4{Port: int(a.Port()), Addr: a.Addr().As4()}
	}
	return &unix.SockaddrInet6{Port: int(a.Port()), Addr: a.Addr().As16()}
}

func addrPortOf(sa unix.Sockaddr) netip.AddrPort {
	switch sa := sa.(type) {
	case *unix.SockaddrInet4:
		return netip.AddrPortFrom(netip.AddrFrom4(sa.Addr), uint16(sa.Port))
	case *unix.SockaddrInet6:
		return netip.AddrPortFrom(netip.AddrFrom16(sa.Addr), uint16(sa.Port))
	}
	return netip.AddrPort{}
}

// abort connects to ADDR, reads SIZE bytes and closes with a reset
// (SO_LINGER 0), so the socket closes having received no FIN.
// args: ADDR SIZE
func abort(args []string) (any, error) {
	if len(args) != 2 {
		return nil, errors.New("usage: abort ADDR SIZE")
	}
	size, _ := strconv.Atoi(args[1])
	c, err := net.DialTimeout("tcp", args[0], 5*time.Second)
	if err != nil {
		return nil, err
	}
	c.SetDeadline(time.Now().Add(30 * time.Second))
	if _, err := io.ReadFull(c, make([]byte, size)); err != nil {
		c.Close()
		return nil, fmt.Errorf("read %d bytes: %w", size, err)
	}
	c.(*net.TCPConn).SetLinger(0)
	return nil, c.Close()
}

// A socket whose first connect was captured and then failed, or was undone
// with AF_UNSPEC, and that connects again to an uncaptured destination (one
// in the pod, which is no flow either), reports that destination as its
// peer, not the first one.
func TestReconnectedSocketForgetsTheFirstConnect(t *testing.T) {
	c := newCapturedPod(t)
	if _, err := c.pod.ListenEcho("127.0.0.1:7777"); err != nil {
		t.Fatal(err)
	}
	captured := netip.AddrPortFrom(c.host.Addr4, 8080).String()
	direct := "127.0.0.1:7777"
	var peer string
	// No sidecar yet: the captured connect is refused (fail-closed).
	if err := runHelper(t, c.pod, helper(t, "reconnect", "refused", captured, direct), -1, &peer); err != nil {
		t.Fatal(err)
	}
	if peer != direct {
		t.Errorf("after a refused captured connect, the reconnected socket's peer is %s, want %s", peer, direct)
	}
	c.startSidecar(t)
	if err := runHelper(t, c.pod, helper(t, "reconnect", "disconnect", captured, direct), -1, &peer); err != nil {
		t.Fatal(err)
	}
	if peer != direct {
		t.Errorf("after a captured connect undone by AF_UNSPEC, the reconnected socket's peer is %s, want %s", peer, direct)
	}
}

// With splice on, a socket reconnected from a captured destination to one
// inside the pod (uncaptured: loopback) does not join the splice table.
func TestReconnectedSocketIsNotSpliced(t *testing.T) {
	c := newCapturedPod(t, "--splice")
	if _, err := c.pod.ListenEcho("127.0.0.1:7777"); err != nil {
		t.Fatal(err)
	}
	captured := netip.AddrPortFrom(c.host.Addr4, 8080).String()
	var peer string
	if err := runHelper(t, c.pod, helper(t, "reconnect", "refused", captured, "127.0.0.1:7777"), -1, &peer); err != nil {
		t.Fatal(err)
	}
	s := statusJSON(t, c.cgroup)
	if n := s.Counters["splice_sockets_joined"]; n != 0 || s.Handshakes != 0 {
		t.Errorf("splice_sockets_joined %d, handshakes pending %d after a reconnect to loopback: want 0 and 0", n, s.Handshakes)
	}
}

// A flow that ends without a FIN having arrived (the app aborts with a
// reset after reading) counts exactly the bytes it received; one that
// received nothing counts 0, never a wrapped-around 2^64-1.
func TestReceivedBytesCountOnlyWhatArrived(t *testing.T) {
	c := newCapturedPod(t, "-o", "9191")
	c.startSidecar(t)
	const size = 1000
	for _, port := range []int{9191, 9192} {
		var ln net.Listener
		if err := c.host.Do(func() (err error) {
			ln, err = net.Listen("tcp", netip.AddrPortFrom(c.host.Addr4, uint16(port)).String())
			return err
		}); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { ln.Close() })
		go func() {
			for n := 0; ; n++ {
				conn, err := ln.Accept()
				if err != nil {
					return
				}
				// The first connection gets size bytes, the second none;
				// neither gets a FIN: the server waits for the app's reset.
				if n == 0 {
					conn.Write(make([]byte, size))
				}
				go func() { io.Copy(io.Discard, conn); conn.Close() }()
			}
		}()
	}
	for _, port := range []int{9191, 9192} {
		addr := netip.AddrPortFrom(c.host.Addr4, uint16(port)).String()
		for _, n := range []string{strconv.Itoa(size), "0"} {
			if err := runHelper(t, c.pod, helper(t, "abort", addr, n), -1, nil); err != nil {
				t.Fatal(err)
			}
		}
	}
	for _, port := range []int{9191, 9192} {
		labels := map[string]string{"reporter": "source", "destination_service": netip.AddrPortFrom(c.host.Addr4, uint16(port)).String()}
		deadline := time.Now().Add(10 * time.Second)
		for {
			fams := c.scrape(t)
			closed := sample(fams, "sluice_tcp_connections_closed_total", labels)
			if closed >= 2 || time.Now().After(deadline) {
				if got := sample(fams, "sluice_tcp_received_bytes_total", labels); closed != 2 || got != size {
					t.Errorf("port %d: %v flows closed, %v bytes received; want 2 and %d", port, closed, got, size)
				}
				break
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
}

// autoListen listens with no bind (the kernel picks the port) until it gets
// PORT, says "listening" on stderr, then counts the connections it accepts
// for DURATION. args: PORT DURATION
func autoListen(args []string) (any, error) {
	if len(args) != 2 {
		return nil, errors.New("usage: autolisten PORT DURATION")
	}
	want, _ := strconv.Atoi(args[0])
	d, err := time.ParseDuration(args[1])
	if err != nil {
		return nil, err
	}
	ln := -1
	for range 16 {
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return nil, err
		}
		if err := unix.Listen(fd, 16); err != nil {
			return nil, fmt.Errorf("listen with no bind: %w", err)
		}
		if sa, err := unix.Getsockname(fd); err == nil && addrPortOf(sa).Port() == uint16(want) {
			ln = fd
			break
		}
		// Kept open, so the next listen gets another port.
	}
	if ln < 0 {
		return nil, fmt.Errorf("the kernel never picked port %d", want)
	}
	fmt.Fprintln(os.Stderr, `{"msg":"listening"}`)
	accepted := 0
	for end := time.Now().Add(d); time.Now().Before(end); {
		fds := []unix.PollFd{{Fd: int32(ln), Events: unix.POLLIN}}
		if n, _ := unix.Poll(fds, 100); n > 0 {
			if c, _, err := unix.Accept(ln); err == nil {
				unix.Close(c)
				accepted++
			}
		}
	}
	return accepted, nil
}

// A process of the pod that is not the proxy, handed the inbound port by
// the kernel (listen() with no bind meets no bind hook, and the pod's port
// range holds 15006), is not taken for the sidecar: inbound connections are
// refused, as with no sidecar, and never reach it.
func TestAutoboundListenerIsNotTheSidecars(t *testing.T) {
	c := newCapturedPod(t)
	setLocalPortRange(t, c.pod, 15006, 15007)
	if _, err := c.pod.ListenEcho("0.0.0.0:8080"); err != nil {
		t.Fatal(err)
	}
	cmd := helper(t, "autolisten", "15006", "3s")
	cmd.Path = testbed.WorldExecutable(t)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 1000, Gid: 1000}}
	var out strings.Builder
	cmd.Stdout = &out
	l, err := c.pod.StartLogged(cmd)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := l.WaitFor("listening", nil, 10*time.Second); err != nil {
		t.Fatalf("%v\n%s%s", err, out.String(), l.Output())
	}
	if res, err := c.host.RunClient(self(t), netip.AddrPortFrom(c.pod.Addr4, 8080).String(), payload); err == nil {
		t.Errorf("an inbound connection with no sidecar went through: %+v", res)
	}
	l.Cmd.Wait()
	var res struct {
		Result int `json:"result"`
	}
	if err := json.Unmarshal([]byte(out.String()), &res); err != nil || res.Result != 0 {
		t.Errorf("the uid-1000 listener on 15006 accepted %d inbound connections (%v, %q)", res.Result, err, out.String())
	}
	if n := statusJSON(t, c.cgroup).Counters["inbound_listener_unregistered"]; n == 0 {
		t.Error("inbound_listener_unregistered did not count the listener refused")
	}
}

// Install keeps the kernel from handing the sidecar's ports to anyone: in a
// pod whose local port range holds 15006, it adds 15006 to the pod's
// ip_local_reserved_ports, and a listen() with no bind never gets it.
func TestInstallReservesSidecarPortsInThePortRange(t *testing.T) {
	c := newUncapturedPod(t, nil)
	setLocalPortRange(t, c.pod, 15005, 15007)
	out := mustCLI(t, "install", "--cgroup", c.cgroup, "--netns", c.pod.Netns)
	t.Cleanup(func() { mustCLI(t, "uninstall", "--cgroup", c.cgroup) })
	if !strings.Contains(out, "sidecar ports [15006] reserved") {
		t.Errorf("install said %q, want the reservation of 15006 named", out)
	}
	var reserved []byte
	if err := c.pod.Do(func() (err error) {
		reserved, err = os.ReadFile("/proc/sys/net/ipv4/ip_local_reserved_ports")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	if strings.TrimSpace(string(reserved)) != "15006" {
		t.Errorf("the pod's reserved ports are %q, want 15006", reserved)
	}
	cmd := helper(t, "autolisten", "15006", "1s")
	err := runHelper(t, c.pod, cmd, 1000, nil)
	if err == nil || !strings.Contains(err.Error(), "listen with no bind") {
		t.Errorf("a uid-1000 listen() with no bind: %v; want every free port (15005, 15007) taken and 15006 never given", err)
	}
	if again := mustCLI(t, "install", "--cgroup", c.cgroup, "--netns", c.pod.Netns); strings.Contains(again, "reserved") {
		t.Errorf("a rerun said %q: the reservation is already there", again)
	}
}
