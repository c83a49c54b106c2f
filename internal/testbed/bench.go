package testbed

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"slices"
	"strings"
	"time"
)

// The bench helper is a second helper role (SLUICE_TESTBED_ROLE=bench): a
// client that runs inside a pod, so its connections are captured like an
// app's, and measures one of the modes below against an echo server.
const (
	benchModeEnv = "SLUICE_TESTBED_BENCH_MODE"

	// Each mode stops at its count or its time budget, whichever comes first.
	BenchConnRate = "connrate" // sequential connect, read the peer line, close
	BenchRR       = "rr"       // 64-byte request/response on one connection
	BenchBulk     = "bulk"     // 64 MiB sent while the echo is read back

	benchBudget     = 3 * time.Second
	benchMaxConns   = 2000
	benchMaxRounds  = 20000
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
	Mode      string  `json:"mode"`
	Local     string  `json:"local"`      // conn.LocalAddr() of the helper's socket
	Peer      string  `json:"peer"`       // what getpeername returned
	ServerSaw string  `json:"server_saw"` // the peer= line the server sent
	Count     int64   `json:"count"`      // connections, round trips or bytes echoed back
	Seconds   float64 `json:"seconds"`    // time the counted work took
	ConnPerS  float64 `json:"conn_per_s,omitempty"`
	P50us     float64 `json:"p50_us,omitempty"` // round-trip latency percentiles
	P99us     float64 `json:"p99_us,omitempty"`
	MBps      float64 `json:"mb_per_s,omitempty"` // echoed bytes per second, 1 MB = 10^6 bytes
	Err       string  `json:"error,omitempty"`
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

// RunBench runs the bench helper (BenchCommand) inside the pod as root, so
// its connections are captured, waits for it and returns its result.
func (p *Pod) RunBench(self, addr, mode string) (BenchResult, error) {
	var res BenchResult
	err := runHelper("pod "+p.Name, p.Start, BenchCommand(self, addr, mode), &res, &res.Err)
	return res, err
}

func runBench(addr, mode string) (BenchResult, error) {
	res := BenchResult{Mode: mode}
	if addr == "" {
		return res, fmt.Errorf("no %s", addrEnv)
	}
	// Nothing may outlast this, whatever the budget lets a mode start.
	deadline := time.Now().Add(clientTimeout)
	var err error
	switch mode {
	case BenchConnRate:
		err = benchConnRate(&res, addr, deadline)
	case BenchRR:
		err = benchRR(&res, addr, deadline)
	case BenchBulk:
		err = benchBulk(&res, addr, deadline)
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

func benchConnRate(res *BenchResult, addr string, deadline time.Time) error {
	start := time.Now()
	for res.Count < benchMaxConns && time.Since(start) < benchBudget {
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

func benchRR(res *BenchResult, addr string, deadline time.Time) error {
	conn, r, err := benchDial(res, addr, deadline)
	if err != nil {
		return err
	}
	defer conn.Close()
	req, resp := make([]byte, benchRRSize), make([]byte, benchRRSize)
	rtts := make([]time.Duration, 0, benchMaxRounds)
	start := time.Now()
	for len(rtts) < benchMaxRounds && time.Since(start) < benchBudget {
		// A fresh request each time, so a stale echo cannot pass for the answer.
		req[0], req[1] = byte(len(rtts)), byte(len(rtts)>>8)
		t := time.Now()
		if _, err := conn.Write(req); err != nil {
			return fmt.Errorf("round trip %d: send: %w", len(rtts)+1, err)
		}
		if _, err := io.ReadFull(r, resp); err != nil {
			return fmt.Errorf("round trip %d: receive: %w", len(rtts)+1, err)
		}
		rtts = append(rtts, time.Since(t))
		if !bytes.Equal(req, resp) {
			return fmt.Errorf("round trip %d: echo differs from the request", len(rtts))
		}
	}
	res.Seconds = time.Since(start).Seconds()
	res.Count = int64(len(rtts))
	slices.Sort(rtts)
	res.P50us = percentile(rtts, 0.50).Seconds() * 1e6
	res.P99us = percentile(rtts, 0.99).Seconds() * 1e6
	return nil
}

// percentile returns the nearest-rank percentile of sorted, which is not empty.
func percentile(sorted []time.Duration, p float64) time.Duration {
	i := int(float64(len(sorted))*p+0.999999) - 1
	return sorted[max(0, min(i, len(sorted)-1))]
}

func benchBulk(res *BenchResult, addr string, deadline time.Time) error {
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
		for n < benchBulkSize && time.Since(start) < benchBudget {
			w, err := conn.Write(buf[:min(len(buf), benchBulkSize-int(n))])
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
