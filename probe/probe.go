// Package probe proves that capture works in the pod it runs in, as
// istio-iptables --run-validation does for its rules: a connection from an
// identity that is not the proxy's, to an address the policy captures, must
// arrive at a listener in the sidecar's place, and the sidecar must learn the
// address the connection was made to.
package probe

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"runtime"
	"slices"
	"time"

	"golang.org/x/sys/unix"

	"github.com/sluicemesh/sluice/proxy"
	"github.com/sluicemesh/sluice/redirect"
)

// Result says what the probe saw.
type Result struct {
	Target netip.AddrPort // where the probe connected
	// OriginalDst is what SO_ORIGINAL_DST answered the probe listener; zero
	// when the sidecar itself was already listening and took the probe.
	OriginalDst netip.AddrPort
	Sidecar     bool // the running sidecar accepted the probe
}

// Run connects from this process (which must not run as the proxy's uid or
// gid) to a captured probe address on port and checks the connection lands
// on the plan's outbound listener. The listener is opened as the proxy
// identity, on a thread of its own that is then discarded, since only the
// proxy may bind the capture ports. When the sidecar already listens there,
// its accepting the probe is the proof.
func Run(ctx context.Context, plan redirect.Plan, port uint16, timeout time.Duration) (Result, error) {
	target, err := Address(plan, port)
	if err != nil {
		return Result{}, err
	}
	res := Result{Target: target}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()

	listenAt := netip.AddrPortFrom(netip.IPv4Unspecified(), plan.OutboundPort)
	if target.Addr().Is6() {
		listenAt = netip.AddrPortFrom(netip.IPv6Unspecified(), plan.OutboundPort)
	}
	var ln *net.TCPListener
	err = asProxy(plan, func() error {
		l, err := net.ListenTCP("tcp", net.TCPAddrFromAddrPort(listenAt))
		ln = l
		return err
	})
	switch {
	case errors.Is(err, unix.EADDRINUSE):
		res.Sidecar = true
	case err != nil:
		return res, fmt.Errorf("probe: listen on %s as the proxy (uid %d gid %d): %w", listenAt, plan.ProxyUID, plan.ProxyGID, err)
	default:
		defer ln.Close()
	}

	var d net.Dialer
	conn, err := d.DialContext(ctx, "tcp", target.String())
	if err != nil {
		return res, fmt.Errorf("probe: connection to %s was not captured: %w (is capture installed in this pod's cgroup?)", target, err)
	}
	defer conn.Close()
	if res.Sidecar {
		return res, nil
	}
	if dl, ok := ctx.Deadline(); ok {
		ln.SetDeadline(dl)
	}
	accepted, err := ln.AcceptTCP()
	if err != nil {
		return res, fmt.Errorf("probe: connected to %s but the probe listener on %s never saw it (it went elsewhere): %w", target, listenAt, err)
	}
	defer accepted.Close()
	err = asProxy(plan, func() error {
		res.OriginalDst, err = proxy.OriginalDst(accepted)
		return err
	})
	if err != nil {
		return res, fmt.Errorf("probe: SO_ORIGINAL_DST on the captured connection: %w", err)
	}
	if res.OriginalDst != target {
		return res, fmt.Errorf("probe: the sidecar would see original destination %s, want %s", res.OriginalDst, target)
	}
	return res, nil
}

// Address picks a destination the plan captures: a benchmarking address
// (198.19.255.254, never routed on the Internet) when every destination is
// captured, otherwise the last address of the first include range that is
// not excluded.
func Address(plan redirect.Plan, port uint16) (netip.AddrPort, error) {
	if slices.Contains(plan.ExcludeOutboundPorts, port) || slices.Contains(plan.KernelOnlyPorts, port) {
		return netip.AddrPort{}, fmt.Errorf("probe port %d is excluded from outbound capture or kernel-only (-o, --kernel-only-ports): pick another with --probe-port", port)
	}
	candidates := []netip.Addr{netip.MustParseAddr("198.19.255.254")}
	if !plan.IncludeAllCIDRs {
		candidates = nil
		for _, p := range plan.IncludeCIDRs {
			candidates = append(candidates, lastAddr(p))
		}
	}
	for _, a := range candidates {
		if !excluded(plan, a) && !a.IsLoopback() {
			return netip.AddrPortFrom(a, port), nil
		}
	}
	return netip.AddrPort{}, errors.New("probe: the policy captures no outbound destination to probe (-i is empty or every range is excluded)")
}

// excluded reports whether connections to a skip capture's sidecar: an
// exclusion (which capture applies first, whatever -i says) or a
// kernel-only range.
func excluded(plan redirect.Plan, a netip.Addr) bool {
	for _, p := range slices.Concat(plan.ExcludeCIDRs, plan.KernelOnlyCIDRs) {
		if p.Contains(a) {
			return true
		}
	}
	return false
}

// lastAddr is the highest address in p, less likely than the first to be a
// gateway.
func lastAddr(p netip.Prefix) netip.Addr {
	b := p.Addr().AsSlice()
	for i := p.Bits(); i < len(b)*8; i++ {
		b[i/8] |= 0x80 >> (i % 8)
	}
	a, _ := netip.AddrFromSlice(b)
	return a
}

// asProxy runs fn on a new OS thread whose real and effective ids are the
// proxy's, which the BPF hooks check. The thread is never returned to the Go
// scheduler: its goroutine exits still locked, and the runtime ends it.
func asProxy(plan redirect.Plan, fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread dies with the goroutine
		// Per-thread: the raw syscalls, not syscall.Setresuid, which
		// changes every thread of the process.
		if _, _, e := unix.RawSyscall(unix.SYS_SETRESGID, uintptr(plan.ProxyGID), uintptr(plan.ProxyGID), ^uintptr(0)); e != 0 {
			errc <- fmt.Errorf("setresgid %d: %w", plan.ProxyGID, e)
			return
		}
		if _, _, e := unix.RawSyscall(unix.SYS_SETRESUID, uintptr(plan.ProxyUID), uintptr(plan.ProxyUID), ^uintptr(0)); e != 0 {
			errc <- fmt.Errorf("setresuid %d: %w", plan.ProxyUID, e)
			return
		}
		errc <- fn()
	}()
	return <-errc
}
