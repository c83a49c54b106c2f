package testbed

import (
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
)

// StartRelay starts an application in the pod that accepts on listen and, for
// each connection, dials target and copies both ways: an app that serves a
// request by making a call of its own. Its outbound call leaves from inside
// the pod's cgroup, so outbound capture sees it. The Bed stops it at Close.
func (p *Pod) StartRelay(self, listen, target string) error {
	cmd := exec.Command(self)
	cmd.Env = append(os.Environ(), roleEnv+"=relay", addrEnv+"="+listen, targetEnv+"="+target)
	cmd.Stderr = os.Stderr
	return p.Start(cmd)
}

// runRelay is the relay helper; it runs until killed.
func runRelay(listen, target string) {
	ln, err := net.Listen("tcp", listen)
	if err != nil {
		fmt.Fprintf(os.Stderr, "testbed relay: %v\n", err)
		os.Exit(1)
	}
	for {
		c, err := ln.Accept()
		if err != nil {
			fmt.Fprintf(os.Stderr, "testbed relay: %v\n", err)
			os.Exit(1)
		}
		go relay(c.(*net.TCPConn), target)
	}
}

func relay(down *net.TCPConn, target string) {
	defer down.Close()
	c, err := net.Dial("tcp", target)
	if err != nil {
		fmt.Fprintf(os.Stderr, "testbed relay: dial %s: %v\n", target, err)
		return
	}
	up := c.(*net.TCPConn)
	defer up.Close()
	done := make(chan struct{})
	go func() {
		io.Copy(up, down)
		up.CloseWrite()
		close(done)
	}()
	io.Copy(down, up)
	down.CloseWrite()
	<-done
}
