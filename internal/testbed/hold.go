package testbed

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"strconv"
	"time"
)

const (
	holdCountEnv = "SLUICE_TESTBED_HOLD_COUNT"
	holdLineEnv  = "SLUICE_TESTBED_HOLD_LINE"
)

// Hold runs the hold helper in the pod: it opens n connections to addr (and,
// with readLine, reads each server's first line, which proves the far end
// is there) and holds them open until release is called. It returns once
// all n are open.
func (p *Pod) Hold(self, addr string, n int, readLine bool) (release func() error, err error) {
	cmd := exec.Command(self)
	cmd.Env = append(os.Environ(), roleEnv+"=hold", addrEnv+"="+addr, holdCountEnv+"="+strconv.Itoa(n), holdLineEnv+"="+strconv.FormatBool(readLine))
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return nil, err
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	cmd.Stderr = os.Stderr
	if err := p.Start(cmd); err != nil {
		return nil, err
	}
	release = func() error { stdin.Close(); return cmd.Wait() }
	line, err := bufio.NewReader(stdout).ReadString('\n')
	if err != nil || line != "open\n" {
		return nil, errors.Join(fmt.Errorf("hold %d connections to %s: %q %v", n, addr, line, err), release())
	}
	return release, nil
}

func runHold() error {
	n, err := strconv.Atoi(os.Getenv(holdCountEnv))
	if err != nil {
		return fmt.Errorf("bad %s: %w", holdCountEnv, err)
	}
	readLine := os.Getenv(holdLineEnv) == "true"
	addr := os.Getenv(addrEnv)
	conns := make([]net.Conn, 0, n)
	for i := range n {
		c, err := net.DialTimeout("tcp", addr, 10*time.Second)
		if err != nil {
			return fmt.Errorf("connection %d: %w", i, err)
		}
		if readLine {
			c.SetReadDeadline(time.Now().Add(10 * time.Second))
			if _, err := bufio.NewReaderSize(c, 64).ReadString('\n'); err != nil {
				return fmt.Errorf("connection %d: %w", i, err)
			}
		}
		conns = append(conns, c)
	}
	fmt.Print("open\n")
	io.Copy(io.Discard, os.Stdin)
	for _, c := range conns {
		c.Close()
	}
	return nil
}
