package testbed

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"time"
)

// The bench helper is a second helper role (SLUICE_TESTBED_ROLE=bench): a
// client that runs inside a pod, so its connections are captured like an
// app's, and measures one of the modes below against an echo server.
const (
	benchModeEnv    = "SLUICE_TESTBED_BENCH_MODE"
	benchConnsEnv   = "SLUICE_TESTBED_BENCH_CONNS"
	benchSecondsEnv = "SLUICE_TESTBED_BENCH_SECONDS"

	// Each mode runs for its time budget (BenchOptions.Seconds, default 3
	// s) and reports how many operations that was (BenchResult.Count);
	// only bulk without Seconds stops earlier, at 64 MiB.
	BenchConnRate = "connrate" // sequential connect, read the peer line, close
	BenchRR       = "rr"       // 64-byte request/response, on BenchOptions.Conns connections at once
	BenchBulk     = "bulk"     // 64 MiB (or BenchOptions.Seconds of bytes) sent while the echo is read back

	benchBudget     = 3 * time.Second
	benchRRSize     = 64
	benchBulkSize   = 64 << 20
	benchBulkBuffer = 32 << 10
)

// BenchModes lists the modes of the bench helper.
var BenchModes = []string{BenchConnRate, BenchRR, BenchBulk}

// BenchResult is what the bench helper reports, as one line of JSON. Local,
// Peer and ServerSaw describe the first connection, so a caller can check
// which path the traffic took.
type BenchResult struct {
	Mode       string  `json:"mode"`
	Local      string  `json:"local"`      // conn.LocalAddr() of the helper's socket
	Peer       string  `json:"peer"`       // what getpeername returned
	ServerSaw  string  `json:"server_saw"` // the peer= line the server sent
	Count      int64   `json:"count"`      // connections, round trips or bytes echoed back
	Seconds    float64 `json:"seconds"`    // time the counted work took
	ConnPerS   float64 `json:"conn_per_s,omitempty"`
	P50us      float64 `json:"p50_us,omitempty"` // round-trip latency percentiles
	P90us      float64 `json:"p90_us,omitempty"`
	P99us      float64 `json:"p99_us,omitempty"`
	RoundsPerS float64 `json:"rounds_per_s,omitempty"` // request/response throughput, all connections
	MBps       float64 `json:"mb_per_s,omitempty"`     // echoed bytes per second, 1 MB = 10^6 bytes
	Err        string  `json:"error,omitempty"`
}

// BenchCommand returns a command that runs self as the bench helper in mode
// against the echo server at addr.
func BenchCommand(self, addr, mode string) *exec.Cmd {
	cmd := exec.Command(self)
	cmd.Env = append(os.Environ(),
		roleEnv+"=bench",
		addrEnv+"="+addr,
		benchModeEnv+"="+mode,
	)
	return cmd
}

// BenchOptions change a bench mode's defaults.
type BenchOptions struct {
	Conns   int     // rr: connections at once (default 1)
	Seconds float64 // how long the mode runs (default 3; bulk then has no size cap)
}

// RunBench runs the bench helper (BenchCommand) inside the pod as root, so
// its connections are captured, waits for it and returns its result.
func (p *Pod) RunBench(self, addr, mode string) (BenchResult, error) {
	return p.RunBenchWith(self, addr, mode, BenchOptions{})
}

// RunBenchWith is RunBench with options.
func (p *Pod) RunBenchWith(self, addr, mode string, o BenchOptions) (BenchResult, error) {
	return runBenchHelper("pod "+p.Name, p.Start, self, addr, mode, o)
}

// RunBenchWith runs the bench helper in the host's netns: a client from
// outside the pod, for the pod's inbound path.
func (h *Host) RunBenchWith(self, addr, mode string, o BenchOptions) (BenchResult, error) {
	return runBenchHelper("host "+h.Name, h.Start, self, addr, mode, o)
}

func runBenchHelper(where string, start func(*exec.Cmd) error, self, addr, mode string, o BenchOptions) (BenchResult, error) {
	var res BenchResult
	cmd := BenchCommand(self, addr, mode)
	if o.Conns > 0 {
		cmd.Env = append(cmd.Env, fmt.Sprintf("%s=%d", benchConnsEnv, o.Conns))
	}
	if o.Seconds > 0 {
		cmd.Env = append(cmd.Env, fmt.Sprintf("%s=%g", benchSecondsEnv, o.Seconds))
	}
	// The helper stops by itself after its budget and clientTimeout.
	budget := benchBudget
	if o.Seconds > 0 {
		budget = time.Duration(o.Seconds * float64(time.Second))
	}
	err := runHelper(where, start, cmd, budget+clientKillAfter, &res, &res.Err)
	return res, err
}

func runBench(addr, mode string) (BenchResult, error) {
	res := BenchResult{Mode: mode}
	if addr == "" {
		return res, fmt.Errorf("no %s", addrEnv)
	}
	budget, size, conns := benchBudget, benchBulkSize, 1
	if s, err := strconv.ParseFloat(os.Getenv(benchSecondsEnv), 64); err == nil && s > 0 {
		budget, size = time.Duration(s*float64(time.Second)), math.MaxInt64
	}
	if n, err := strconv.Atoi(os.Getenv(benchConnsEnv)); err == nil && n > 0 {
		conns = n
	}
	// Nothing may outlast this, whatever the budget lets a mode start.
	deadline := time.Now().Add(budget + clientTimeout)
	var err error
	switch mode {
	case BenchConnRate:
		err = benchConnRate(&res, addr, deadline, budget)
	case BenchRR:
		err = benchRR(&res, addr, deadline, budget, conns)
	case BenchBulk:
		err = benchBulk(&res, addr, deadline, budget, size)
	default:
		err = fmt.Errorf("unknown bench mode %q (want one of %s)", mode, strings.Join(BenchModes, ", "))
	}
	return res, err
}

// benchDial connects and reads the server's "peer=" line; the first call
// records the connection's addresses in res.
func benchDial(res *BenchResult, addr string, deadline time.Time) (net.Conn, *bufio.Reader, error) {
	d := net.Dialer{Deadline: deadline}
	conn, err := d.Dial("tcp", addr)
	if err != nil {
		return nil, nil, fmt.Errorf("connect %s: %w", addr, err)
	}
	if err := conn.SetDeadline(deadline); err != nil {
		conn.Close()
		return nil, nil, fmt.Errorf("set deadline: %w", err)
	}
	r := bufio.NewReader(conn)
	line, err := r.ReadString('\n')
	if err != nil {
		conn.Close()
		return nil, nil, fmt.Errorf("read peer line: %w", err)
	}
	saw, ok := strings.CutPrefix(strings.TrimSuffix(line, "\n"), "peer=")
	if !ok {
		conn.Close()
		return nil, nil, fmt.Errorf("read peer line: unexpected %q", line)
	}
	if res.Local == "" {
		res.Local, res.Peer, res.ServerSaw = conn.LocalAddr().String(), conn.RemoteAddr().String(), saw
	}
	return conn, r, nil
}

func benchConnRate(res *BenchResult, addr string, deadline time.Time, budget time.Duration) error {
	start := time.Now()
	for time.Since(start) < budget {
		conn, _, err := benchDial(res, addr, deadline)
		if err != nil {
			return fmt.Errorf("connection %d: %w", res.Count+1, err)
		}
		conn.Close()
		res.Count++
	}
	res.Seconds = time.Since(start).Seconds()
	res.ConnPerS = float64(res.Count) / res.Seconds
	return nil
}

// benchRR runs 64-byte round trips on conns connections at once, each its
// own goroutine, for budget.
func benchRR(res *BenchResult, addr string, deadline time.Time, budget time.Duration, conns int) error {
	type connResult struct {
		rtts []time.Duration
		err  error
	}
	results := make(chan connResult, conns)
	start := time.Now()
	for c := range conns {
		conn, r, err := benchDial(res, addr, deadline)
		if err != nil {
			return fmt.Errorf("connection %d: %w", c+1, err)
		}
		go func() {
			defer conn.Close()
			req, resp := make([]byte, benchRRSize), make([]byte, benchRRSize)
			rtts := make([]time.Duration, 0, 4096)
			for time.Since(start) < budget {
				// A fresh request each time, so a stale echo cannot pass for the answer.
				req[0], req[1], req[2] = byte(len(rtts)), byte(len(rtts)>>8), byte(c)
				t := time.Now()
				if _, err := conn.Write(req); err != nil {
					results <- connResult{rtts, fmt.Errorf("round trip %d: send: %w", len(rtts)+1, err)}
					return
				}
				if _, err := io.ReadFull(r, resp); err != nil {
					results <- connResult{rtts, fmt.Errorf("round trip %d: receive: %w", len(rtts)+1, err)}
					return
				}
				rtts = append(rtts, time.Since(t))
				if !bytes.Equal(req, resp) {
					results <- connResult{rtts, fmt.Errorf("round trip %d: echo differs from the request", len(rtts))}
					return
				}
			}
			results <- connResult{rtts, nil}
		}()
	}
	var all []time.Duration
	var errs []error
	for range conns {
		r := <-results
		all = append(all, r.rtts...)
		errs = append(errs, r.err)
	}
	res.Seconds = time.Since(start).Seconds()
	if err := errors.Join(errs...); err != nil {
		return err
	}
	res.Count = int64(len(all))
	slices.Sort(all)
	res.P50us = percentile(all, 0.50).Seconds() * 1e6
	res.P90us = percentile(all, 0.90).Seconds() * 1e6
	res.P99us = percentile(all, 0.99).Seconds() * 1e6
	res.RoundsPerS = float64(res.Count) / res.Seconds
	return nil
}

// percentile returns the nearest-rank percentile of sorted, which is not empty.
func percentile(sorted []time.Duration, p float64) time.Duration {
	i := int(float64(len(sorted))*p+0.999999) - 1
	return sorted[max(0, min(i, len(sorted)-1))]
}

func benchBulk(res *BenchResult, addr string, deadline time.Time, budget time.Duration, size int) error {
	conn, r, err := benchDial(res, addr, deadline)
	if err != nil {
		return err
	}
	defer conn.Close()
	type sendResult struct {
		n   int64
		err error
	}
	sent := make(chan sendResult, 1)
	start := time.Now()
	go func() {
		buf := bytes.Repeat([]byte("sluice bench\n"), benchBulkBuffer/13+1)[:benchBulkBuffer]
		var n int64
		for n < int64(size) && time.Since(start) < budget {
			w, err := conn.Write(buf[:min(int64(len(buf)), int64(size)-n)])
			n += int64(w)
			if err != nil {
				sent <- sendResult{n, fmt.Errorf("send: %w", err)}
				return
			}
		}
		// Half-close: the server echoes what is left, then closes.
		sent <- sendResult{n, conn.(*net.TCPConn).CloseWrite()}
	}()

	buf := make([]byte, benchBulkBuffer)
	var recvErr error
	for {
		n, err := r.Read(buf)
		res.Count += int64(n)
		if err != nil {
			if !errors.Is(err, io.EOF) {
				recvErr = fmt.Errorf("read echo: %w", err)
				conn.Close() // unblock the sender
			}
			break
		}
	}
	res.Seconds = time.Since(start).Seconds()
	s := <-sent
	if s.err != nil {
		return s.err
	}
	if recvErr != nil {
		return recvErr
	}
	if res.Count != s.n {
		return fmt.Errorf("sent %d bytes, %d came back", s.n, res.Count)
	}
	res.MBps = float64(res.Count) / res.Seconds / 1e6
	return nil
}

// RedirectWithIPTables installs the classic sidecar capture in the pod's
// netns (never the root one): nat OUTPUT rules send the app's TCP to
// port, except loopback and the proxy uid's own connections, as
// istio-iptables does. The rules go with the pod's netns.
func (p *Pod) RedirectWithIPTables(port uint16, proxyUID uint32) error {
	var rules [][]string
	for _, rule := range [][]string{
		{"-d", "127.0.0.0/8", "-j", "RETURN"},
		{"-m", "owner", "--uid-owner", strconv.Itoa(int(proxyUID)), "-j", "RETURN"},
		{"-p", "tcp", "-j", "REDIRECT", "--to-ports", strconv.Itoa(int(port))},
	} {
		rules = append(rules, append([]string{"-A", "OUTPUT"}, rule...))
	}
	return p.iptablesNAT(rules)
}

// RedirectInboundWithIPTables installs the classic sidecar's inbound
// capture in the pod's netns as istio-iptables writes it: nat PREROUTING
// jumps to ISTIO_INBOUND, which lets the ignored ports through and sends
// the rest of the TCP arriving at the pod to ISTIO_IN_REDIRECT, a REDIRECT
// to port. The rules go with the pod's netns.
func (p *Pod) RedirectInboundWithIPTables(port uint16, ignore ...uint16) error {
	rules := [][]string{
		{"-N", "ISTIO_INBOUND"},
		{"-N", "ISTIO_IN_REDIRECT"},
		{"-A", "ISTIO_IN_REDIRECT", "-p", "tcp", "-j", "REDIRECT", "--to-ports", strconv.Itoa(int(port))},
	}
	for _, i := range ignore {
		rules = append(rules, []string{"-A", "ISTIO_INBOUND", "-p", "tcp", "--dport", strconv.Itoa(int(i)), "-j", "RETURN"})
	}
	rules = append(rules,
		[]string{"-A", "ISTIO_INBOUND", "-p", "tcp", "-j", "ISTIO_IN_REDIRECT"},
		[]string{"-A", "PREROUTING", "-p", "tcp", "-j", "ISTIO_INBOUND"})
	return p.iptablesNAT(rules)
}

// iptablesNAT runs iptables -t nat with each of rules in the pod's netns.
func (p *Pod) iptablesNAT(rules [][]string) error {
	path, err := exec.LookPath("iptables")
	if err != nil {
		return fmt.Errorf("iptables not installed (scripts/deps.sh installs it): %w", err)
	}
	for _, rule := range rules {
		args := append([]string{"-w", "-t", "nat"}, rule...)
		var out bytes.Buffer
		cmd := exec.Command(path, args...)
		cmd.Stdout, cmd.Stderr = &out, &out
		if err := p.Start(cmd); err != nil {
			return err
		}
		if err := cmd.Wait(); err != nil {
			return fmt.Errorf("iptables %s in the pod: %v: %s (the iptables setup needs the nat table, the owner match and the REDIRECT target in this kernel)",
				strings.Join(args, " "), err, strings.TrimSpace(out.String()))
		}
	}
	return nil
}
