package testbed

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"sync"
	"sync/atomic"
	"time"

	"github.com/sluicemesh/sluice/internal/nsenter"
)

// echoBufSize bounds the memory each echo connection uses.
const echoBufSize = 32 << 10

// Echo serves on ln: for each connection it first writes one line
// "peer=<remote addr as seen by the server>\n", then echoes every byte back
// until the client half-closes, then closes. It returns when ln is closed,
// after closing the connections still open and waiting for their
// goroutines, so nothing outlives it.
func Echo(ln net.Listener) {
	var (
		mu    sync.Mutex
		conns = map[net.Conn]struct{}{}
		wg    sync.WaitGroup
	)
	for {
		c, err := ln.Accept()
		if err != nil {
			break
		}
		mu.Lock()
		conns[c] = struct{}{}
		mu.Unlock()
		wg.Go(func() {
			serveEcho(c)
			mu.Lock()
			delete(conns, c)
			mu.Unlock()
		})
	}
	mu.Lock()
	for c := range conns {
		c.Close()
	}
	mu.Unlock()
	wg.Wait()
}

func serveEcho(c net.Conn) {
	defer c.Close()
	if _, err := fmt.Fprintf(c, "peer=%s\n", c.RemoteAddr()); err != nil {
		return
	}
	// A plain loop rather than io.Copy: TCPConn.ReadFrom would splice
	// through a pipe and ignore the bounded buffer.
	buf := make([]byte, echoBufSize)
	for {
		n, err := c.Read(buf)
		if n > 0 {
			if _, err := c.Write(buf[:n]); err != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

// EchoListener is a listener served by Echo that counts its connections.
type EchoListener struct {
	net.Listener
	accepted atomic.Int64
}

// Accept counts every connection it returns.
func (l *EchoListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err == nil {
		l.accepted.Add(1)
	}
	return c, err
}

// Accepted is how many connections the listener has accepted.
func (l *EchoListener) Accepted() int64 { return l.accepted.Load() }

// ListenEcho creates a TCP listener inside the host's netns on addr (such
// as "198.18.2.2:8080" or "[2001:2:0:2::2]:8080") and serves Echo on it
// until Bed.Close.
func (h *Host) ListenEcho(addr string) (*EchoListener, error) {
	ln, err := h.bed.listenEcho(h.Netns, addr)
	if err != nil {
		return nil, fmt.Errorf("echo in host %s: %w", h.Name, err)
	}
	return ln, nil
}

// ListenEcho creates a TCP listener inside the pod's netns on addr (such as
// "127.0.0.1:9000" for loopback tests) and serves Echo on it until
// Bed.Close.
func (p *Pod) ListenEcho(addr string) (*EchoListener, error) {
	ln, err := p.bed.listenEcho(p.Netns, addr)
	if err != nil {
		return nil, fmt.Errorf("echo in pod %s: %w", p.Name, err)
	}
	return ln, nil
}

// StartEcho runs an echo server as an application of the pod, in its netns
// and its cgroup (a listener made with ListenEcho belongs to the test's
// process instead, so the pod's cgroup hooks never see its sockets), and
// waits until it listens on addr. The Bed stops it at Close.
func (p *Pod) StartEcho(self, addr string) error {
	ap, err := netip.ParseAddrPort(addr)
	if err != nil {
		return fmt.Errorf("echo in pod %s: %w", p.Name, err)
	}
	cmd := exec.Command(self)
	cmd.Env = append(os.Environ(), roleEnv+"=echo", addrEnv+"="+addr)
	cmd.Stderr = os.Stderr
	if err := p.Start(cmd); err != nil {
		return fmt.Errorf("echo in pod %s: %w", p.Name, err)
	}
	return p.WaitListening(ap.Port(), 10*time.Second)
}

// runEcho is the echo helper; it runs until killed.
func runEcho(addr string) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		fmt.Fprintf(os.Stderr, "testbed echo: %v\n", err)
		os.Exit(1)
	}
	Echo(ln)
}

func (b *Bed) listenEcho(nsPath, addr string) (*EchoListener, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return nil, errors.New("bed is closed")
	}
	var ln net.Listener
	err := nsenter.Do(nsPath, func() error {
		var err error
		ln, err = net.Listen("tcp", addr)
		return err
	})
	if err != nil {
		if ln != nil {
			ln.Close()
		}
		return nil, fmt.Errorf("listen on %s: %w", addr, err)
	}
	counted := &EchoListener{Listener: ln}
	done := make(chan struct{})
	go func() {
		defer close(done)
		Echo(counted)
	}()
	b.echoes = append(b.echoes, echoServer{ln: ln, done: done})
	return counted, nil
}
