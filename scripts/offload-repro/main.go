// Command offload-repro shows why offload hands only the app's sending
// direction to the kernel, and keeps the other one (the upstream's bytes
// back to the app) in the sidecar: the kernel's only way to move a
// receiving socket's bytes to another socket, an sk_skb stream verdict
// redirect, does not do that job safely or fast on this kernel.
//
//	go run ./scripts/offload-repro
//
// It builds, on loopback only, the sidecar's two connections (app to
// sidecar, sidecar to upstream) with plain Go sockets, and lets an sk_skb
// program redirect every byte the sidecar's upstream socket receives to
// its socket on the app's hop (egress), as a full offload would, then
// measures four things:
//
//  1. latency: 64-byte request/response, responses through the redirect,
//     against a user-space copy and a direct connection;
//  2. the end of the stream: the upstream sends 4 MiB and its FIN; the
//     sidecar passes the FIN on as soon as it reads it, as it must (nothing
//     else tells it the redirect has finished); how often the app then
//     gets fewer bytes than were sent;
//  3. bytes that arrived before the handoff wait until more arrive;
//  4. memory: the app stops reading while the upstream keeps sending: the
//     kernel's TCP memory above the start, and the machine's available
//     memory (a proxy would be held at about two socket buffers by TCP's
//     window). It sends at most 2 GiB; run it on a machine with more free.
//
// It needs root (CAP_BPF, CAP_NET_ADMIN) and attaches nothing to any cgroup.
package main

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sort"
	"strings"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"

	"github.com/sluicemesh/sluice/internal/testbed"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "offload-repro:", err)
		os.Exit(1)
	}
}

// redirector is the sk_skb program and its maps: socks holds the sockets
// whose received bytes are redirected, peers says to which.
type redirector struct {
	socks, peers *ebpf.Map
	prog         *ebpf.Program
}

func newRedirector() (*redirector, error) {
	socks, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.SockHash, KeySize: 8, ValueSize: 8, MaxEntries: 64})
	if err != nil {
		return nil, fmt.Errorf("sockhash: %w", err)
	}
	peers, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.Hash, KeySize: 8, ValueSize: 8, MaxEntries: 64})
	if err != nil {
		return nil, fmt.Errorf("hash: %w", err)
	}
	// verdict(skb): peer = peers[cookie(skb)]; none: SK_PASS; else
	// bpf_sk_redirect_hash(skb, socks, &peer, 0): out on the peer.
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Type:       ebpf.SkSKB,
		AttachType: ebpf.AttachSkSKBStreamVerdict,
		License:    "GPL",
		Instructions: asm.Instructions{
			asm.Mov.Reg(asm.R6, asm.R1),
			asm.FnGetSocketCookie.Call(),
			asm.StoreMem(asm.RFP, -8, asm.R0, asm.DWord),
			asm.LoadMapPtr(asm.R1, peers.FD()),
			asm.Mov.Reg(asm.R2, asm.RFP),
			asm.Add.Imm(asm.R2, -8),
			asm.FnMapLookupElem.Call(),
			asm.JNE.Imm(asm.R0, 0, "found"),
			asm.Mov.Imm(asm.R0, 1), // SK_PASS
			asm.Return(),
			asm.LoadMem(asm.R1, asm.R0, 0, asm.DWord).WithSymbol("found"),
			asm.StoreMem(asm.RFP, -16, asm.R1, asm.DWord),
			asm.Mov.Reg(asm.R1, asm.R6),
			asm.LoadMapPtr(asm.R2, socks.FD()),
			asm.Mov.Reg(asm.R3, asm.RFP),
			asm.Add.Imm(asm.R3, -16),
			asm.Mov.Imm(asm.R4, 0),
			asm.FnSkRedirectHash.Call(),
			asm.Return(),
		},
	})
	if err != nil {
		return nil, fmt.Errorf("load the sk_skb program: %w", err)
	}
	err = link.RawAttachProgram(link.RawAttachProgramOptions{Target: socks.FD(), Program: prog, Attach: ebpf.AttachSkSKBStreamVerdict})
	if err != nil {
		return nil, fmt.Errorf("attach it to the sockhash: %w", err)
	}
	return &redirector{socks: socks, peers: peers, prog: prog}, nil
}

func (r *redirector) Close() {
	r.prog.Close()
	r.socks.Close()
	r.peers.Close()
}

// redirect sends every byte from receives from now on out on to.
func (r *redirector) redirect(from, to *net.TCPConn) error {
	fromCookie, toCookie := cookie(from), cookie(to)
	if err := r.peers.Put(fromCookie, toCookie); err != nil {
		return err
	}
	if err := r.socks.Put(toCookie, uint64(fd(to))); err != nil {
		return err
	}
	return r.socks.Put(fromCookie, uint64(fd(from)))
}

// pod is one proxied connection: app -> acc (the sidecar's accepted socket),
// dial (the sidecar's upstream socket) -> up (the upstream server's end).
type pod struct{ app, acc, dial, up *net.TCPConn }

func newPod(ln *net.TCPListener) (pod, error) {
	var p pod
	var err error
	if p.app, p.acc, err = pair(ln); err != nil {
		return p, err
	}
	p.dial, p.up, err = pair(ln)
	return p, err
}

func (p pod) Close() {
	for _, c := range []*net.TCPConn{p.app, p.acc, p.dial, p.up} {
		c.Close()
	}
}

func run() error {
	r, err := newRedirector()
	if err != nil {
		return err
	}
	defer r.Close()
	ln, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		return err
	}
	defer ln.Close()

	fmt.Println("1. request/response, 64 bytes, 20,000 rounds (p50 / p99):")
	for _, mode := range []string{"direct", "user-space copy", "sk_skb redirect"} {
		p50, p99, err := latency(ln, r, mode)
		if err != nil {
			return fmt.Errorf("%s: %w", mode, err)
		}
		fmt.Printf("   %-16s %8v %8v\n", mode, p50, p99)
	}

	const trials, size = 50, 4 << 20
	short := 0
	for range trials {
		got, err := endOfStream(ln, r, size)
		if err != nil {
			return err
		}
		if got < size {
			short++
		}
	}
	fmt.Printf("2. upstream sends %d bytes and its FIN; the sidecar passes the FIN on when it reads it:\n   the app got fewer bytes in %d of %d trials\n", size, short, trials)

	waited, kicked, err := before(ln, r)
	if err != nil {
		return err
	}
	fmt.Printf("3. a byte that arrived before the handoff: after 1 s the app has %q; after the sidecar peeks at its socket, %q\n", waited, kicked)

	peak, used, sent, err := memory(ln, r)
	if err != nil {
		return err
	}
	fmt.Printf("4. app not reading, upstream sending for 5 s: %d MiB sent; kernel TCP memory peaked %.0f MiB above the start,\n   the machine's available memory fell by %d MiB at most\n", sent>>20, peak, used>>20)
	return nil
}

// latency runs request/response rounds from the app to an echo at up,
// through the sidecar in mode.
func latency(ln *net.TCPListener, r *redirector, mode string) (p50, p99 time.Duration, err error) {
	var app, srv *net.TCPConn
	switch mode {
	case "direct":
		if app, srv, err = pair(ln); err != nil {
			return 0, 0, err
		}
		defer app.Close()
		defer srv.Close()
	default:
		p, err := newPod(ln)
		if err != nil {
			return 0, 0, err
		}
		defer p.Close()
		app, srv = p.app, p.up
		go io.Copy(p.dial, readOnly{p.acc})
		if mode == "user-space copy" {
			go io.Copy(p.acc, readOnly{p.dial})
		} else if err := r.redirect(p.dial, p.acc); err != nil {
			return 0, 0, err
		}
	}
	go func() {
		b := make([]byte, 64)
		for {
			if _, err := io.ReadFull(srv, b); err != nil {
				return
			}
			srv.Write(b)
		}
	}()
	const n = 20000
	b := make([]byte, 64)
	ds := make([]time.Duration, n)
	app.SetDeadline(time.Now().Add(time.Minute))
	for i := range ds {
		t := time.Now()
		if _, err := app.Write(b); err != nil {
			return 0, 0, err
		}
		if _, err := io.ReadFull(app, b); err != nil {
			return 0, 0, err
		}
		ds[i] = time.Since(t)
	}
	sort.Slice(ds, func(i, j int) bool { return ds[i] < ds[j] })
	return ds[n/2], ds[n*99/100], nil
}

// endOfStream sends size bytes and a FIN from up through the redirect; the
// sidecar half-closes towards the app as soon as it reads the FIN. It
// returns how many bytes the app got before its EOF.
func endOfStream(ln *net.TCPListener, r *redirector, size int) (int64, error) {
	p, err := newPod(ln)
	if err != nil {
		return 0, err
	}
	defer p.Close()
	if err := r.redirect(p.dial, p.acc); err != nil {
		return 0, err
	}
	go func() {
		p.up.Write(make([]byte, size))
		p.up.CloseWrite()
	}()
	go func() {
		p.dial.SetReadDeadline(time.Now().Add(10 * time.Second))
		var b [1]byte
		for {
			if _, err := p.dial.Read(b[:]); err != nil {
				break // EOF: the redirect took every byte, then the FIN came
			}
		}
		p.acc.CloseWrite()
	}()
	p.app.SetReadDeadline(time.Now().Add(10 * time.Second))
	got, err := io.Copy(io.Discard, p.app)
	if errors.Is(err, os.ErrDeadlineExceeded) {
		return got, errors.New("the app's read timed out")
	}
	return got, nil
}

// before writes a byte from up before the handoff, waits, then kicks.
func before(ln *net.TCPListener, r *redirector) (waited, kicked string, err error) {
	p, err := newPod(ln)
	if err != nil {
		return "", "", err
	}
	defer p.Close()
	p.up.Write([]byte("A"))
	time.Sleep(50 * time.Millisecond)
	if err := r.redirect(p.dial, p.acc); err != nil {
		return "", "", err
	}
	read := func() string {
		p.app.SetReadDeadline(time.Now().Add(time.Second))
		b := make([]byte, 8)
		n, _ := p.app.Read(b)
		return string(b[:n])
	}
	waited = read()
	var b [1]byte
	unix.Recvfrom(fd(p.dial), b[:], unix.MSG_PEEK|unix.MSG_DONTWAIT)
	return waited, read(), nil
}

// memory has up send for 5 s, redirected towards an app that never reads,
// and samples the kernel's TCP memory and the machine's available memory.
func memory(ln *net.TCPListener, r *redirector) (peak float64, used, sent int64, err error) {
	p, err := newPod(ln)
	if err != nil {
		return 0, 0, 0, err
	}
	defer p.Close()
	if err := r.redirect(p.dial, p.acc); err != nil {
		return 0, 0, 0, err
	}
	start := available()
	peak, err = testbed.PeakTCPMemory(func() error {
		p.up.SetWriteDeadline(time.Now().Add(5 * time.Second))
		b := make([]byte, 1<<20)
		for sent < 2<<30 {
			n, err := p.up.Write(b)
			sent += int64(n)
			if err != nil {
				break
			}
			used = max(used, start-available())
		}
		return nil
	})
	return peak, used, sent, err
}

// available is MemAvailable from /proc/meminfo, in bytes.
func available() int64 {
	data, _ := os.ReadFile("/proc/meminfo")
	var kib int64
	for _, line := range strings.Split(string(data), "\n") {
		if _, err := fmt.Sscanf(line, "MemAvailable: %d kB", &kib); err == nil {
			break
		}
	}
	return kib << 10
}

// readOnly hides a TCPConn's WriteTo and ReadFrom, so that io.Copy reads
// with read(): splice(2) never sees bytes a sockmap redirected.
type readOnly struct{ io.Reader }

func pair(ln *net.TCPListener) (*net.TCPConn, *net.TCPConn, error) {
	c, err := net.DialTCP("tcp", nil, ln.Addr().(*net.TCPAddr))
	if err != nil {
		return nil, nil, err
	}
	s, err := ln.AcceptTCP()
	if err != nil {
		c.Close()
		return nil, nil, err
	}
	return c, s, nil
}

func cookie(c *net.TCPConn) uint64 {
	var ck uint64
	raw, _ := c.SyscallConn()
	raw.Control(func(fd uintptr) { ck, _ = unix.GetsockoptUint64(int(fd), unix.SOL_SOCKET, unix.SO_COOKIE) })
	return ck
}

func fd(c *net.TCPConn) int {
	var f int
	raw, _ := c.SyscallConn()
	raw.Control(func(x uintptr) { f = int(x) })
	return f
}
