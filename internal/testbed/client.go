package testbed

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// The client helper gets its role and parameters through the environment,
// so it works the same for a test binary and for the sluice binary whatever
// flags they parse.
const (
	roleEnv = "SLUICE_TESTBED_ROLE"
	addrEnv = "SLUICE_TESTBED_ADDR"
	sizeEnv = "SLUICE_TESTBED_SIZE"
	// targetEnv is where the relay helper forwards to.
	targetEnv = "SLUICE_TESTBED_TARGET"
	// MPTCPEnv=1 makes the client helper connect with IPPROTO_MPTCP.
	MPTCPEnv = "SLUICE_TESTBED_MPTCP"
)

const (
	// clientTimeout bounds the whole exchange inside the client.
	clientTimeout = 30 * time.Second
	// clientKillAfter is when RunClient gives up on a client that ignores
	// its own timeout.
	clientKillAfter = clientTimeout + 10*time.Second
	clientBufSize   = 32 << 10
	// clientSeed seeds the payload, so every run sends the same bytes.
	clientSeed = "sluice testbed client payload 01"
)

// ClientResult is what the client helper reports, as one line of JSON.
type ClientResult struct {
	Local     string `json:"local"`      // conn.LocalAddr() of the app's socket
	Peer      string `json:"peer"`       // what getpeername returned (conn.RemoteAddr())
	ServerSaw string `json:"server_saw"` // the peer= line the server sent
	Sent      int64  `json:"sent"`
	Received  int64  `json:"received"`
	SentSHA   string `json:"sent_sha256"`
	RecvSHA   string `json:"recv_sha256"`
	MPTCP     bool   `json:"mptcp,omitempty"` // the connection really used MPTCP`
	Err       string `json:"error,omitempty"`
}

// RunHelperIfRequested runs the client helper and exits if the environment
// asks for it (SLUICE_TESTBED_ROLE=client), and returns at once otherwise.
// Call it first thing in TestMain and main. The client and bench helpers
// print one line of JSON (ClientResult, BenchResult) and exit 0, or 1 with
// Err set; the relay runs until killed.
func RunHelperIfRequested() {
	switch os.Getenv(roleEnv) {
	case "client":
		res, err := clientFromEnv()
		exitWithResult(&res, &res.Err, err)
	case "bench":
		res, err := runBench(os.Getenv(addrEnv), os.Getenv(benchModeEnv))
		exitWithResult(&res, &res.Err, err)
	case "relay":
		runRelay(os.Getenv(addrEnv), os.Getenv(targetEnv))
	case "echo":
		runEcho(os.Getenv(addrEnv))
	case "pins":
		res := runPins(os.Getenv(addrEnv))
		exitWithResult(&res, &res.Err, nil)
	case "sockopt":
		res, err := runSockopt(os.Getenv(addrEnv), os.Getenv(sockoptEnv))
		exitWithResult(&res, &res.Err, err)
	case "hold":
		if err := runHold(); err != nil {
			fmt.Fprintf(os.Stderr, "testbed hold: %v\n", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
}

// exitWithResult prints a helper's result, with err in its Err field, and
// exits.
func exitWithResult(res any, errField *string, err error) {
	code := 0
	if err != nil {
		*errField = err.Error()
		code = 1
	}
	if err := json.NewEncoder(os.Stdout).Encode(res); err != nil {
		fmt.Fprintf(os.Stderr, "testbed helper: write result: %v\n", err)
		code = 1
	}
	os.Exit(code)
}

func clientFromEnv() (ClientResult, error) {
	size, err := strconv.Atoi(os.Getenv(sizeEnv))
	if err != nil || size < 0 {
		return ClientResult{}, fmt.Errorf("bad %s %q", sizeEnv, os.Getenv(sizeEnv))
	}
	return runClient(os.Getenv(addrEnv), size, os.Getenv(MPTCPEnv) == "1")
}

// ClientCommand returns a command that runs self (usually os.Executable())
// as the client helper: it connects to addr, reads the server's "peer="
// line, sends size pseudo-random bytes while reading the echo, half-closes,
// reads to EOF and reports a ClientResult.
func ClientCommand(self, addr string, size int) *exec.Cmd {
	cmd := exec.Command(self)
	cmd.Env = append(os.Environ(),
		roleEnv+"=client",
		addrEnv+"="+addr,
		sizeEnv+"="+strconv.Itoa(size),
	)
	return cmd
}

// runClient is the client helper's exchange with an echo server.
func runClient(addr string, size int, mptcp bool) (ClientResult, error) {
	var res ClientResult
	deadline := time.Now().Add(clientTimeout)
	d := net.Dialer{Deadline: deadline}
	d.SetMultipathTCP(mptcp)
	conn, err := d.Dial("tcp", addr)
	if err != nil {
		return res, fmt.Errorf("connect %s: %w", addr, err)
	}
	defer conn.Close()
	if err := conn.SetDeadline(deadline); err != nil {
		return res, fmt.Errorf("set deadline: %w", err)
	}
	res.Local = conn.LocalAddr().String()
	if mptcp {
		// Go falls back to TCP without a word when MPTCP is refused.
		res.MPTCP, _ = conn.(*net.TCPConn).MultipathTCP()
	}
	// Go fills RemoteAddr from getpeername after connect, so this is what
	// the kernel (and any BPF getpeername hook) reports.
	res.Peer = conn.RemoteAddr().String()

	r := bufio.NewReaderSize(conn, clientBufSize)
	line, err := r.ReadString('\n')
	if err != nil {
		return res, fmt.Errorf("read peer line: %w", err)
	}
	saw, ok := strings.CutPrefix(strings.TrimSuffix(line, "\n"), "peer=")
	if !ok {
		return res, fmt.Errorf("read peer line: unexpected %q", line)
	}
	res.ServerSaw = saw

	type sendResult struct {
		n   int64
		sum string
		err error
	}
	sent := make(chan sendResult, 1)
	go func() {
		n, sum, err := sendPayload(conn, size)
		sent <- sendResult{n, sum, err}
	}()

	recvHash := sha256.New()
	received, recvErr := io.Copy(recvHash, r)
	if recvErr != nil {
		// Unblock the sender, which may be stuck on a full send buffer.
		conn.Close()
	}
	s := <-sent
	res.Sent, res.SentSHA = s.n, s.sum
	res.Received, res.RecvSHA = received, hex.EncodeToString(recvHash.Sum(nil))
	if s.err != nil {
		return res, s.err
	}
	if recvErr != nil {
		return res, fmt.Errorf("read echo: %w", recvErr)
	}
	return res, nil
}

// sendPayload writes size bytes from a fixed-seed ChaCha8 stream to conn,
// then half-closes it so the server sees EOF.
func sendPayload(conn net.Conn, size int) (int64, string, error) {
	var seed [32]byte
	copy(seed[:], clientSeed)
	rng := rand.NewChaCha8(seed)
	h := sha256.New()
	buf := make([]byte, clientBufSize)
	var sent int64
	for remaining := size; remaining > 0; {
		chunk := buf[:min(len(buf), remaining)]
		_, _ = rng.Read(chunk) // ChaCha8.Read never fails
		n, err := conn.Write(chunk)
		h.Write(chunk[:n])
		sent += int64(n)
		remaining -= n
		if err != nil {
			return sent, hex.EncodeToString(h.Sum(nil)), fmt.Errorf("send: %w", err)
		}
	}
	sum := hex.EncodeToString(h.Sum(nil))
	cw, ok := conn.(interface{ CloseWrite() error })
	if !ok {
		return sent, sum, fmt.Errorf("half-close: %T cannot", conn)
	}
	if err := cw.CloseWrite(); err != nil {
		return sent, sum, fmt.Errorf("half-close: %w", err)
	}
	return sent, sum, nil
}

// RunClient runs the client helper (ClientCommand) inside the pod, waits for
// it and returns its result. self must be executable from inside the pod.
func (p *Pod) RunClient(self, addr string, size int) (ClientResult, error) {
	return p.runClient(ClientCommand(self, addr, size))
}

// RunClientAs is RunClient with the helper running as uid:gid. self must
// then be executable by that user.
func (p *Pod) RunClientAs(self, addr string, size int, uid, gid uint32) (ClientResult, error) {
	cmd := ClientCommand(self, addr, size)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uid, Gid: gid}}
	return p.runClient(cmd)
}

func (p *Pod) runClient(cmd *exec.Cmd) (ClientResult, error) {
	return runClientIn("pod "+p.Name, p.Start, cmd)
}

// RunClientCommand runs a ClientCommand the caller adjusted (its
// environment, its credentials) inside the pod and returns its result.
func (p *Pod) RunClientCommand(cmd *exec.Cmd) (ClientResult, error) {
	return p.runClient(cmd)
}

// RunClient runs the client helper inside the host's netns, e.g. to connect
// into a pod.
func (h *Host) RunClient(self, addr string, size int) (ClientResult, error) {
	return runClientIn("host "+h.Name, h.Start, ClientCommand(self, addr, size))
}

func runClientIn(where string, start func(*exec.Cmd) error, cmd *exec.Cmd) (ClientResult, error) {
	var res ClientResult
	err := runHelper(where, start, cmd, clientKillAfter, &res, &res.Err)
	return res, err
}

// runHelper starts a helper command with start, waits for it and decodes the
// JSON line it prints into v; errText is v's error field, for the message.
func runHelper(where string, start func(*exec.Cmd) error, cmd *exec.Cmd, killAfter time.Duration, v any, errText *string) error {
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := start(cmd); err != nil {
		return fmt.Errorf("helper in %s: %w", where, err)
	}
	// The helper has its own timeout; this only catches a helper that hangs anyway.
	watchdog := time.AfterFunc(killAfter, func() { _ = cmd.Process.Kill() })
	waitErr := cmd.Wait()
	watchdog.Stop()

	parseErr := parseLastJSONLine(stdout.Bytes(), v)
	if waitErr != nil {
		return fmt.Errorf("helper in %s: %w (error %q, stderr: %s)", where, waitErr, *errText, strings.TrimSpace(stderr.String()))
	}
	if parseErr != nil {
		return fmt.Errorf("helper in %s: %w (stderr: %s)", where, parseErr, strings.TrimSpace(stderr.String()))
	}
	return nil
}

// parseLastJSONLine decodes the last line of out, so stray output printed
// before it does not matter.
func parseLastJSONLine(out []byte, v any) error {
	out = bytes.TrimSpace(out)
	if len(out) == 0 {
		return errors.New("no output")
	}
	if i := bytes.LastIndexByte(out, '\n'); i >= 0 {
		out = out[i+1:]
	}
	if err := json.Unmarshal(out, v); err != nil {
		return fmt.Errorf("parse result %q: %w", out, err)
	}
	return nil
}
