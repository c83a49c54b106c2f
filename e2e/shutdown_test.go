package e2e

import (
	"fmt"
	"net/netip"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

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
	pidfd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(pidfd)
	sock := listenerCopy(t, pidfd, pid, 15006)
	defer unix.Close(sock)
	if err := unix.Shutdown(sock, unix.SHUT_RDWR); err != nil {
		t.Fatal(err)
	}
	expectExit(t, c.sidecar.Cmd, 1, 10*time.Second, c.sidecar.Output, "accept on 0.0.0.0:15006")
}

// listenerCopy returns a copy of the sidecar's IPv4 listener on port. The
// sidecar logs "listening" before its loops take the listeners over, which
// closes each one's first descriptor for a copy: a number read meanwhile
// may already be another socket's, so the copy is checked and taken again.
func listenerCopy(t *testing.T, pidfd, pid int, port uint16) int {
	t.Helper()
	for range 50 {
		sock, err := unix.PidfdGetfd(pidfd, listenerFD(t, pid, port), 0)
		if err == nil {
			if sa, err := unix.Getsockname(sock); err == nil {
				if in4, ok := sa.(*unix.SockaddrInet4); ok && in4.Port == int(port) {
					return sock
				}
			}
			unix.Close(sock)
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("no stable descriptor of pid %d listens on port %d", pid, port)
	return -1
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
