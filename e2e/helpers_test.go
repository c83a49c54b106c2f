package e2e

import (
	"bufio"
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
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	"github.com/sluicemesh/sluice/internal/testbed"
	"github.com/sluicemesh/sluice/proxy"
)

// helperEnv makes the test binary play one of the roles below inside a pod
// (in its cgroup, so capture sees it), taking its arguments from the command
// line and printing one JSON line.
const helperEnv = "SLUICE_TEST_HELPER"

var helperRoles = map[string]func(args []string) (any, error){
	"churn":          churn,
	"load":           load,
	"load-captured":  loadCaptured,
	"paced":          paced,
	"hold":           hold,
	"bind":           tryBind,
	"openpin":        openPin,
	"origdst-server": origDstServer,
	"bulk":           bulk,
	"many":           many,
	"serverfirst":    serverFirst,
	"reconnect":      reconnect,
	"abort":          abort,
	"autolisten":     autoListen,
	"resolve":        resolve,
}

// runTestHelper runs the role named in the environment, if any, and exits.
func runTestHelper() {
	role := os.Getenv(helperEnv)
	if role == "" {
		return
	}
	fn := helperRoles[role]
	if fn == nil {
		fmt.Fprintf(os.Stderr, "unknown helper %q\n", role)
		os.Exit(2)
	}
	res, err := fn(os.Args[1:])
	out := map[string]any{"result": res}
	if err != nil {
		out["error"] = err.Error()
	}
	json.NewEncoder(os.Stdout).Encode(out)
	if err != nil {
		os.Exit(1)
	}
	os.Exit(0)
}

// helper returns a command that runs role with args.
func helper(t testing.TB, role string, args ...string) *exec.Cmd {
	cmd := exec.Command(self(t), args...)
	cmd.Env = append(os.Environ(), helperEnv+"="+role)
	return cmd
}

// runHelper runs a helper command in the pod, as uid:gid unless uid is
// negative, and decodes its result into v.
func runHelper(t testing.TB, pod *testbed.Pod, cmd *exec.Cmd, uid int, v any) error {
	t.Helper()
	if uid >= 0 {
		cmd.Path = testbed.WorldExecutable(t)
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(uid), Gid: uint32(uid)}}
	}
	var stdout, stderr strings.Builder
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := pod.Start(cmd); err != nil {
		t.Fatal(err)
	}
	werr := cmd.Wait()
	var out struct {
		Result json.RawMessage `json:"result"`
		Error  string          `json:"error"`
	}
	if err := json.Unmarshal([]byte(stdout.String()), &out); err != nil {
		t.Fatalf("helper %v: %v; stdout %q stderr %q", cmd.Args, werr, stdout.String(), stderr.String())
	}
	if v != nil && len(out.Result) > 0 {
		if err := json.Unmarshal(out.Result, v); err != nil {
			t.Fatal(err)
		}
	}
	if out.Error != "" {
		return errors.New(out.Error)
	}
	return werr
}

// churnResult is what churn reports.
type churnResult struct {
	OK, Failed int64
	// Timeouts are the failures that hung until a deadline.
	Timeouts int64
	FirstErr string
}

// churn makes COUNT short connections to the ADDRs (in turn) with
// CONCURRENCY at a time: connect, read the echo server's peer line, send one
// byte, half-close, read the echo to EOF. args: count concurrency addr...
func churn(args []string) (any, error) {
	if len(args) < 3 {
		return nil, errors.New("usage: churn COUNT CONCURRENCY ADDR...")
	}
	count, _ := strconv.Atoi(args[0])
	workers, _ := strconv.Atoi(args[1])
	addrs := args[2:]
	var next atomic.Int64
	deadline := time.Now().Add(5 * time.Minute)
	return shortConnections(workers, func() (string, bool) {
		i := next.Add(1) - 1
		return addrs[int(i)%len(addrs)], i < int64(count) && time.Now().Before(deadline)
	}), nil
}

// load is churn for a time instead of a count: connections to ADDR with
// CONCURRENCY at a time for DURATION. args: duration concurrency addr
func load(args []string) (any, error) {
	if len(args) != 3 {
		return nil, errors.New("usage: load DURATION CONCURRENCY ADDR")
	}
	d, err := time.ParseDuration(args[0])
	if err != nil {
		return nil, err
	}
	workers, _ := strconv.Atoi(args[1])
	end := time.Now().Add(d)
	return shortConnections(workers, func() (string, bool) { return args[2], time.Now().Before(end) }), nil
}

// loadCaptured is load where a connection the server saw come straight
// from the app (not through a sidecar) fails as "escaped capture".
func loadCaptured(args []string) (any, error) {
	if len(args) != 3 {
		return nil, errors.New("usage: load-captured DURATION CONCURRENCY ADDR")
	}
	d, err := time.ParseDuration(args[0])
	if err != nil {
		return nil, err
	}
	workers, _ := strconv.Atoi(args[1])
	end := time.Now().Add(d)
	return shortConnectionsWith(workers, func() (string, bool) { return args[2], time.Now().Before(end) }, func(addr string) error {
		return oneShortVia(addr, true)
	}), nil
}

// paced makes captured short connections to ADDR at RATE a second for
// DURATION (each started on schedule, as many at once as that takes, up to
// 64), as a client population would, not as fast as it can: args: rate
// duration addr.
func paced(args []string) (any, error) {
	if len(args) != 3 {
		return nil, errors.New("usage: paced RATE DURATION ADDR")
	}
	rate, err := strconv.Atoi(args[0])
	if err != nil || rate <= 0 {
		return nil, fmt.Errorf("rate %q: want connections a second", args[0])
	}
	d, err := time.ParseDuration(args[1])
	if err != nil {
		return nil, err
	}
	every := time.Second / time.Duration(rate)
	total := int64(d / every)
	start := time.Now()
	var next atomic.Int64
	return shortConnectionsWith(64, func() (string, bool) {
		i := next.Add(1) - 1
		if i >= total {
			return "", false
		}
		time.Sleep(time.Until(start.Add(time.Duration(i) * every)))
		return args[2], true
	}, func(addr string) error { return oneShortVia(addr, true) }), nil
}

// shortConnections runs oneShort with workers at a time to the addresses
// next gives, until it says stop.
func shortConnections(workers int, next func() (string, bool)) churnResult {
	return shortConnectionsWith(workers, next, oneShort)
}

func shortConnectionsWith(workers int, next func() (string, bool), oneShort func(string) error) churnResult {
	var ok, failed, timeouts atomic.Int64
	var mu sync.Mutex
	var res churnResult
	var wg sync.WaitGroup
	for range workers {
		wg.Go(func() {
			for {
				addr, more := next()
				if !more {
					return
				}
				if err := oneShort(addr); err != nil {
					failed.Add(1)
					if ne := net.Error(nil); errors.As(err, &ne) && ne.Timeout() {
						timeouts.Add(1)
					}
					mu.Lock()
					if res.FirstErr == "" {
						res.FirstErr = err.Error()
					}
					mu.Unlock()
					continue
				}
				ok.Add(1)
			}
		})
	}
	wg.Wait()
	res.OK, res.Failed, res.Timeouts = ok.Load(), failed.Load(), timeouts.Load()
	return res
}

func oneShort(addr string) error { return oneShortVia(addr, false) }

// oneShortVia is oneShort; with captured, the server must have seen another
// peer than the app's own socket (the sidecar's).
func oneShortVia(addr string, captured bool) error {
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	r := bufio.NewReader(c)
	line, err := r.ReadString('\n')
	if err != nil {
		return fmt.Errorf("peer line: %w", err)
	}
	if captured && strings.TrimSpace(line) == "peer="+c.LocalAddr().String() {
		// The sidecar's dial may get the app's port: both sockets are
		// bound to the pod's address with the port chosen at connect, and
		// their destinations differ. Only the kernel's own tuple of the
		// app's socket tells an escape from that.
		escaped, err := connectedTo(c.(*net.TCPConn), addr)
		if err != nil {
			return err
		}
		if escaped {
			return fmt.Errorf("escaped capture: the server saw the app's own socket %s", c.LocalAddr())
		}
	}
	if _, err := c.Write([]byte{'x'}); err != nil {
		return err
	}
	c.(*net.TCPConn).CloseWrite()
	echo, err := io.ReadAll(r)
	if err != nil {
		return err
	}
	if string(echo) != "x" {
		return fmt.Errorf("echo %q, want \"x\"", echo)
	}
	return nil
}

// connectedTo says whether the kernel connected c to addr's port (an
// escape) rather than to the sidecar: getpeername is answered with the
// original destination for captured sockets, /proc/net/tcp is not.
func connectedTo(c *net.TCPConn, addr string) (bool, error) {
	_, port, err := net.SplitHostPort(addr)
	if err != nil {
		return false, err
	}
	raw, err := c.SyscallConn()
	if err != nil {
		return false, err
	}
	var st syscall.Stat_t
	var statErr error
	raw.Control(func(fd uintptr) { statErr = syscall.Fstat(int(fd), &st) })
	if statErr != nil {
		return false, statErr
	}
	for _, table := range []string{"/proc/net/tcp", "/proc/net/tcp6"} {
		data, err := os.ReadFile(table)
		if err != nil {
			return false, err
		}
		// sl local_address rem_address st ... uid timeout inode
		for _, line := range strings.Split(string(data), "\n")[1:] {
			f := strings.Fields(line)
			if len(f) < 10 || f[9] != strconv.FormatUint(st.Ino, 10) {
				continue
			}
			_, hexPort, _ := strings.Cut(f[2], ":")
			p, err := strconv.ParseUint(hexPort, 16, 16)
			return err == nil && strconv.FormatUint(p, 10) == port, err
		}
	}
	return false, fmt.Errorf("socket %s (inode %d) is in no /proc/net/tcp table", c.LocalAddr(), st.Ino)
}

// holdState is what hold reports after each exchange.
type holdState struct {
	Local, Peer, ServerSaw string
}

// hold opens COUNT connections to ADDR and keeps them open. For every line
// it reads on stdin it sends the line on each connection, reads the echo and
// prints one JSON holdState line (of the first connection, with getpeername
// asked anew); at EOF it closes them and exits. args: addr [count]
func hold(args []string) (any, error) {
	count := 1
	if len(args) > 1 {
		count, _ = strconv.Atoi(args[1])
	}
	var conns []*net.TCPConn
	var readers []*bufio.Reader
	var first holdState
	for i := range count {
		c, err := net.DialTimeout("tcp", args[0], 5*time.Second)
		if err != nil {
			return nil, fmt.Errorf("connection %d: %w", i, err)
		}
		r := bufio.NewReader(c)
		line, err := r.ReadString('\n')
		if err != nil {
			return nil, fmt.Errorf("connection %d: peer line: %w", i, err)
		}
		if i == 0 {
			first = holdState{Local: c.LocalAddr().String(), ServerSaw: strings.TrimSuffix(strings.TrimPrefix(line, "peer="), "\n")}
		}
		conns, readers = append(conns, c.(*net.TCPConn)), append(readers, r)
	}
	enc := json.NewEncoder(os.Stdout)
	in := bufio.NewScanner(os.Stdin)
	in.Buffer(make([]byte, 64<<10), 4<<20)
	for in.Scan() {
		for i, c := range conns {
			msg := in.Text() + "\n"
			c.SetDeadline(time.Now().Add(10 * time.Second))
			if _, err := c.Write([]byte(msg)); err != nil {
				return nil, fmt.Errorf("connection %d: send: %w", i, err)
			}
			got, err := readers[i].ReadString('\n')
			if err != nil || got != msg {
				return nil, fmt.Errorf("connection %d: echo %q, %v", i, got, err)
			}
		}
		peer, err := getpeername(conns[0])
		if err != nil {
			return nil, err
		}
		first.Peer = peer
		enc.Encode(map[string]any{"result": first})
	}
	for _, c := range conns {
		c.Close()
	}
	return first, in.Err()
}

// getpeername asks the kernel again: net.Conn caches the peer it saw at
// connect.
func getpeername(c *net.TCPConn) (string, error) {
	raw, err := c.SyscallConn()
	if err != nil {
		return "", err
	}
	var sa syscall.Sockaddr
	var serr error
	raw.Control(func(fd uintptr) { sa, serr = syscall.Getpeername(int(fd)) })
	switch a := sa.(type) {
	case *syscall.SockaddrInet4:
		return net.JoinHostPort(net.IP(a.Addr[:]).String(), strconv.Itoa(a.Port)), serr
	case *syscall.SockaddrInet6:
		return net.JoinHostPort(net.IP(a.Addr[:]).String(), strconv.Itoa(a.Port)), serr
	}
	return "", fmt.Errorf("getpeername: %v", serr)
}

// tryBind binds and listens on each ADDR (TCP; UDP with "udp:" in front)
// and reports the error of each ("" for success). args: addr...
func tryBind(args []string) (any, error) {
	out := map[string]string{}
	for _, arg := range args {
		var c io.Closer
		var err error
		if addr, udp := strings.CutPrefix(arg, "udp:"); udp {
			c, err = net.ListenPacket("udp", addr)
		} else {
			c, err = net.Listen("tcp", arg)
		}
		if err != nil {
			out[arg] = err.Error()
			continue
		}
		c.Close()
		out[arg] = ""
	}
	return out, nil
}

// openPin opens each pinned map PATH read-only and reports the error of each.
func openPin(args []string) (any, error) {
	out := map[string]string{}
	for _, p := range args {
		m, err := ebpf.LoadPinnedMap(p, &ebpf.LoadPinOptions{ReadOnly: true})
		if err != nil {
			out[p] = err.Error()
			continue
		}
		m.Close()
		out[p] = ""
	}
	return out, nil
}

// origDstServer accepts one connection on ADDR, prints "listening" on
// stderr first, and reports what SO_ORIGINAL_DST answers for it.
func origDstServer(args []string) (any, error) {
	ln, err := net.Listen("tcp", args[0])
	if err != nil {
		return nil, err
	}
	defer ln.Close()
	ln.(*net.TCPListener).SetDeadline(time.Now().Add(20 * time.Second))
	c, err := ln.Accept()
	if err != nil {
		return nil, err
	}
	defer c.Close()
	fmt.Fprintf(c, "peer=%s\n", c.RemoteAddr())
	dst, err := proxy.OriginalDst(c.(*net.TCPConn))
	if err != nil {
		return err.Error(), nil
	}
	return dst.String(), nil
}

// bulkResult is what bulk reports.
type bulkResult struct {
	Sent, Received int64
	// Mismatch is the offset of the first echoed byte that differs from
	// what was sent; -1 when none does.
	Mismatch int64
	Rounds   int // request/response rounds done after the bulk
}

// bulk sends SIZE bytes of a counting pattern to an echo server at ADDR as
// fast as the connection takes them while it reads the echo, pausing PAUSE
// after every 64 KiB read: a reader slower than its writer. Then it makes
// ROUNDS 64-byte request/response exchanges on the same connection (each
// must come back within 2s), half-closes and reads to EOF.
// args: addr size pause [rounds]
func bulk(args []string) (any, error) {
	if len(args) != 3 && len(args) != 4 {
		return nil, errors.New("usage: bulk ADDR SIZE PAUSE [ROUNDS]")
	}
	size, _ := strconv.ParseInt(args[1], 10, 64)
	pause, err := time.ParseDuration(args[2])
	if err != nil {
		return nil, err
	}
	rounds := 0
	if len(args) == 4 {
		rounds, _ = strconv.Atoi(args[3])
	}
	return bulkOnce(args[0], size, pause, rounds)
}

// bulkOnce is one connection of bulk.
func bulkOnce(addr string, size int64, pause time.Duration, rounds int) (bulkResult, error) {
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return bulkResult{Mismatch: -1}, err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(2 * time.Minute))
	r := bufio.NewReader(c)
	res := bulkResult{Mismatch: -1}
	if _, err := r.ReadString('\n'); err != nil {
		return res, fmt.Errorf("peer line: %w", err)
	}
	pattern := func(off int64) byte { return byte(off ^ off>>8 ^ off>>16) }
	// check reads n echoed bytes, which must follow the pattern on.
	check := func(buf []byte) error {
		n, err := io.ReadFull(r, buf)
		for i := range n {
			if res.Mismatch < 0 && buf[i] != pattern(res.Received+int64(i)) {
				res.Mismatch = res.Received + int64(i)
			}
		}
		res.Received += int64(n)
		return err
	}
	sent := make(chan error, 1)
	send := func(n int64) {
		buf := make([]byte, 256<<10)
		for end := res.Sent + n; res.Sent < end; {
			k := int(min(int64(len(buf)), end-res.Sent))
			for i := range k {
				buf[i] = pattern(res.Sent + int64(i))
			}
			w, err := c.Write(buf[:k])
			res.Sent += int64(w)
			if err != nil {
				sent <- fmt.Errorf("send: %w", err)
				return
			}
		}
		sent <- nil
	}
	go send(size)
	buf := make([]byte, 64<<10)
	for res.Received < size {
		if err := check(buf[:min(int64(len(buf)), size-res.Received)]); err != nil {
			c.Close() // unblock the sender
			<-sent
			return res, fmt.Errorf("read echo: %w", err)
		}
		time.Sleep(pause)
	}
	if err := <-sent; err != nil {
		return res, err
	}
	for ; res.Rounds < rounds; res.Rounds++ {
		c.SetDeadline(time.Now().Add(2 * time.Second))
		send(64)
		if err := <-sent; err != nil {
			return res, err
		}
		if err := check(buf[:64]); err != nil {
			return res, fmt.Errorf("round %d: %w", res.Rounds, err)
		}
	}
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if err := c.(*net.TCPConn).CloseWrite(); err != nil {
		return res, err
	}
	if n, err := r.Read(buf[:1]); n != 0 || err != io.EOF {
		return res, fmt.Errorf("after the echo: read %d bytes, %v; want EOF", n, err)
	}
	return res, nil
}

// manyResult is what many reports.
type manyResult struct {
	OK       int
	FirstErr string
}

// many runs N bulk connections of SIZE bytes each to ADDR at once, each
// checked byte by byte both ways. args: n addr size
func many(args []string) (any, error) {
	if len(args) != 3 {
		return nil, errors.New("usage: many N ADDR SIZE")
	}
	n, _ := strconv.Atoi(args[0])
	size, _ := strconv.ParseInt(args[2], 10, 64)
	var mu sync.Mutex
	var res manyResult
	var wg sync.WaitGroup
	for range n {
		wg.Go(func() {
			r, err := bulkOnce(args[1], size, 0, 0)
			if err == nil && (r.Received != size || r.Mismatch >= 0) {
				err = fmt.Errorf("echoed %d of %d bytes, first wrong byte at %d", r.Received, size, r.Mismatch)
			}
			mu.Lock()
			defer mu.Unlock()
			if err == nil {
				res.OK++
			} else if res.FirstErr == "" {
				res.FirstErr = err.Error()
			}
		})
	}
	wg.Wait()
	if res.OK != n {
		return res, fmt.Errorf("%d of %d connections failed, first: %s", n-res.OK, n, res.FirstErr)
	}
	return res, nil
}

// serverFirstResult is what serverFirst reports.
type serverFirstResult struct {
	Received  int64
	ServerSHA string // of what the server sent, read to its FIN
	Sent      int64
	SentSHA   string
}

// serverFirst talks to a server that speaks first and half-closes first
// (the other half-close): it reads the server's bytes to EOF, then sends
// SIZE bytes on the same connection and closes. args: addr size
func serverFirst(args []string) (any, error) {
	if len(args) != 2 {
		return nil, errors.New("usage: serverfirst ADDR SIZE")
	}
	size, _ := strconv.ParseInt(args[1], 10, 64)
	c, err := net.DialTimeout("tcp", args[0], 5*time.Second)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(time.Minute))
	var res serverFirstResult
	h := sha256.New()
	if res.Received, err = io.Copy(h, c); err != nil {
		return res, fmt.Errorf("read the server's bytes: %w", err)
	}
	res.ServerSHA = hex.EncodeToString(h.Sum(nil))
	res.Sent, res.SentSHA, err = sendPattern(c, size)
	if err != nil {
		return res, err
	}
	return res, nil
}

// sendPattern writes size pseudo-random bytes to w and returns their SHA-256.
func sendPattern(w io.Writer, size int64) (int64, string, error) {
	h := sha256.New()
	n, err := io.Copy(io.MultiWriter(w, h), io.LimitReader(rand.NewChaCha8([32]byte{byte(size)}), size))
	return n, hex.EncodeToString(h.Sum(nil)), err
}

// holder is the "hold" helper running in a pod: connections kept open, each
// exchange proving they still carry bytes.
type holder struct {
	cmd   *exec.Cmd
	in    io.WriteCloser
	out   *bufio.Scanner
	state holdState
}

func startHold(t *testing.T, pod *testbed.Pod, addr string, count int) *holder {
	t.Helper()
	cmd := helper(t, "hold", addr, fmt.Sprint(count))
	in, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := pod.Start(cmd); err != nil {
		t.Fatal(err)
	}
	h := &holder{cmd: cmd, in: in, out: bufio.NewScanner(stdout)}
	t.Cleanup(func() { in.Close() })
	h.exchange(t, "hello")
	return h
}

// exchange sends msg on every held connection and checks the echo.
func (h *holder) exchange(t *testing.T, msg string) holdState {
	t.Helper()
	if err := h.try(msg); err != nil {
		t.Fatal(err)
	}
	return h.state
}

func (h *holder) try(msg string) error {
	if _, err := fmt.Fprintln(h.in, msg); err != nil {
		return fmt.Errorf("hold helper: %w", err)
	}
	if !h.out.Scan() {
		return fmt.Errorf("hold helper ended: %v", h.out.Err())
	}
	var line struct {
		Result holdState `json:"result"`
		Error  string    `json:"error"`
	}
	if err := json.Unmarshal(h.out.Bytes(), &line); err != nil || line.Error != "" {
		return fmt.Errorf("hold helper: %s (%v)", h.out.Text(), err)
	}
	h.state = line.Result
	return nil
}

// reuseTimeWait lets one pod make 100,000 short connections: each leaves a
// TIME_WAIT socket on the sidecar's side of its upstream.
func reuseTimeWait(t *testing.T, pod *testbed.Pod) {
	t.Helper()
	if err := pod.Do(func() error {
		for file, value := range map[string]string{"ipv4/tcp_tw_reuse": "1", "ipv4/ip_local_port_range": "1024 65000"} {
			if err := os.WriteFile("/proc/sys/net/"+file, []byte(value), 0o644); err != nil {
				return err
			}
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
}
