// Package testbed builds throwaway pods (netns + veth + cgroup v2) and remote hosts for tests and the demo, and removes them again.
//
// Every Bed has its own "node" network namespace that routes between its
// pods and hosts, so nothing is ever configured in the root network
// namespace. Pods and hosts each get a /24 out of 198.18.0.0/15 and a /64
// out of 2001:2::/48 (both reserved for benchmarking), subnet n being
// 198.18.n.0/24 and 2001:2:0:n::/64 with the node at .1 / ::1.
package testbed

import (
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"time"

	"github.com/sluicemesh/sluice/internal/nsenter"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Bed is one set of pods and hosts behind a node namespace. Its methods are
// safe for concurrent use.
type Bed struct {
	prefix     string
	nodeNetns  string // name of the node netns
	cgroupRoot string // <cgroup2 mount>/<prefix>, parent of the pod cgroups

	mu       sync.Mutex
	closed   bool
	node     *netlink.Handle // netlink inside the node netns
	nextNet  int             // next subnet number to hand out
	names    map[string]bool // pod and host names in use
	netnses  []string        // named netns to delete, in creation order
	cgroups  []string        // cgroup dirs to remove, in creation order
	procs    []*exec.Cmd     // processes started by Start
	echoes   []echoServer    // listeners served by ListenEcho
	links    []*os.File      // TUN queues of delayed hosts' links
	closeErr error
}

// echoServer is a listener served by Echo and the signal that Echo returned.
type echoServer struct {
	ln   net.Listener
	done <-chan struct{}
}

// New builds an empty Bed: the node netns "<prefix>-node" with forwarding
// enabled and the cgroup parent "<cgroup2 mount>/<prefix>". prefix must be
// unique among the Beds alive on the machine; leftovers with the same names
// from a crashed earlier run are removed first.
func New(prefix string) (*Bed, error) {
	if err := validName(prefix); err != nil {
		return nil, fmt.Errorf("bed prefix: %w", err)
	}
	mnt, err := cgroup2Mount()
	if err != nil {
		return nil, err
	}
	b := &Bed{
		prefix:    prefix,
		nodeNetns: prefix + "-node",
		nextNet:   1,
		names:     map[string]bool{},
	}
	if err := b.setup(filepath.Join(mnt, prefix)); err != nil {
		return nil, errors.Join(fmt.Errorf("new bed %s: %w", prefix, err), b.Close())
	}
	return b, nil
}

// setup creates the node netns and the cgroup parent. Everything is
// registered before it is created, so Close removes half-made things too.
func (b *Bed) setup(cgroupRoot string) error {
	if err := deleteNetns(b.nodeNetns); err != nil {
		return fmt.Errorf("remove leftover: %w", err)
	}
	if err := removeCgroupTree(cgroupRoot, time.Now().Add(cgroupDrainTimeout)); err != nil {
		return fmt.Errorf("remove leftover: %w", err)
	}

	b.netnses = append(b.netnses, b.nodeNetns)
	if err := createNetns(b.nodeNetns); err != nil {
		return err
	}
	if err := os.Mkdir(cgroupRoot, 0o755); err != nil {
		return fmt.Errorf("create cgroup %s: %w", cgroupRoot, err)
	}
	b.cgroupRoot = cgroupRoot

	ns, err := netns.GetFromName(b.nodeNetns)
	if err != nil {
		return fmt.Errorf("open netns %s: %w", b.nodeNetns, err)
	}
	defer ns.Close()
	// Route netlink only (here and for pods and hosts): by default a
	// handle opens XFRM and netfilter sockets too, whose modules a small
	// kernel lacks (Debian's 6.1 cloud kernel, make test-kernel).
	if b.node, err = netlink.NewHandleAt(ns, unix.NETLINK_ROUTE); err != nil {
		return fmt.Errorf("netlink in netns %s: %w", b.nodeNetns, err)
	}
	if err := linkUp(b.node, "lo"); err != nil {
		return err
	}
	// The node routes between pods and hosts. These writes go to the node
	// namespace only because /proc/sys/net resolves to the netns of the
	// thread that opens the file.
	return b.DoNode(func() error {
		for _, p := range []string{"/proc/sys/net/ipv4/ip_forward", "/proc/sys/net/ipv6/conf/all/forwarding"} {
			if err := os.WriteFile(p, []byte("1\n"), 0o644); err != nil {
				return fmt.Errorf("enable forwarding: %w", err)
			}
		}
		return nil
	})
}

// Close removes everything the Bed made: it closes echo listeners, kills
// and reaps processes started in its pods and hosts, removes their cgroups
// and deletes the network namespaces (which takes the veths with them). It
// keeps going after an error and returns all of them. Calling it again
// returns the first call's result.
//
// A process whose exec.Cmd the caller waits for itself must be waited for
// before Close, since Close waits for processes that are still running.
func (b *Bed) Close() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return b.closeErr
	}
	b.closed = true

	var errs []error
	for _, e := range b.echoes {
		if err := e.ln.Close(); err != nil && !errors.Is(err, net.ErrClosed) {
			errs = append(errs, fmt.Errorf("close echo listener %s: %w", e.ln.Addr(), err))
		}
		<-e.done
	}
	for _, cmd := range b.procs {
		errs = append(errs, stopProcess(cmd))
	}
	for _, f := range b.links {
		f.Close()
	}
	deadline := time.Now().Add(cgroupDrainTimeout)
	for i := len(b.cgroups) - 1; i >= 0; i-- {
		errs = append(errs, removeCgroup(b.cgroups[i], deadline))
	}
	if b.cgroupRoot != "" {
		errs = append(errs, removeCgroup(b.cgroupRoot, deadline))
	}
	if b.node != nil {
		b.node.Close()
	}
	for i := len(b.netnses) - 1; i >= 0; i-- {
		errs = append(errs, deleteNetns(b.netnses[i]))
	}
	if err := errors.Join(errs...); err != nil {
		b.closeErr = fmt.Errorf("close bed %s: %w", b.prefix, err)
	}
	return b.closeErr
}

// stopProcess kills a process the Bed started unless its owner has already
// waited for it, and reaps it.
func stopProcess(cmd *exec.Cmd) error {
	if cmd.ProcessState != nil {
		return nil
	}
	pid := cmd.Process.Pid
	if err := cmd.Process.Kill(); err != nil {
		if errors.Is(err, os.ErrProcessDone) {
			return nil
		}
		return fmt.Errorf("kill pid %d: %w", pid, err)
	}
	// Being killed makes Wait report an *exec.ExitError; anything else
	// (say, a copying goroutine failing) is worth reporting.
	var exitErr *exec.ExitError
	if err := cmd.Wait(); err != nil && !errors.As(err, &exitErr) {
		return fmt.Errorf("wait pid %d: %w", pid, err)
	}
	return nil
}

// DoNode runs fn on a locked OS thread inside the node netns, see Pod.Do.
func (b *Bed) DoNode(fn func() error) error {
	return nsenter.Do(netnsPath(b.nodeNetns), fn)
}

// TB is the part of testing.TB that Must uses (so the package need not import "testing").
type TB interface {
	Helper()
	Fatalf(format string, args ...any)
	Skip(args ...any)
	Cleanup(func())
	Name() string
}

// Must builds a Bed for the test and closes it when the test ends. The
// prefix is "st-" plus a hash of the test name (to find a test's leftovers)
// and a random part (so parallel runs of the same test do not collide).
func Must(tb TB) *Bed {
	tb.Helper()
	var random [2]byte
	_, _ = rand.Read(random[:]) // crypto/rand.Read never fails
	sum := sha256.Sum256([]byte(tb.Name()))
	prefix := fmt.Sprintf("st-%x%x", sum[:3], random)

	b, err := New(prefix)
	if err != nil {
		tb.Fatalf("testbed for %s: %v", tb.Name(), err)
		return nil
	}
	tb.Cleanup(func() {
		if err := b.Close(); err != nil {
			tb.Fatalf("testbed for %s: %v", tb.Name(), err)
		}
	})
	return b
}

// validName accepts names that are safe as path elements and as parts of
// netns names.
func validName(name string) error { return validNameUpTo(name, 64) }

func validNameUpTo(name string, max int) error {
	if name == "" || len(name) > max || name == "." || name == ".." {
		return fmt.Errorf("invalid name %q", name)
	}
	for _, c := range name {
		ok := c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_' || c == '.'
		if !ok {
			return fmt.Errorf("invalid name %q: only letters, digits, '-', '_' and '.' allowed", name)
		}
	}
	return nil
}

// validCgroupName accepts one element of a cgroup path, which may be longer
// than a netns name: a container's scope is cri-containerd-<64 hex>.scope.
func validCgroupName(name string) error { return validNameUpTo(name, 255) }
