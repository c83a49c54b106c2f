package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/sluicemesh/sluice/loader"
	"github.com/sluicemesh/sluice/redirect"
)

func runCommand() command {
	c := command{
		name:    "run",
		summary: "run the sidecar: the transparent proxy for captured connections",
		help: `Usage: sluice run [--cgroup PATH] [-p PORT] [-u UID -g GID] [--log-format json]

Serves captured outbound connections on 127.0.0.1:PORT and [::1]:PORT and
captured inbound ones on port -z (all addresses): asks the kernel for each
one's original destination (SO_ORIGINAL_DST), dials it (inbound: from
127.0.0.6, like Istio) and copies bytes both ways. With --cgroup it takes the ports and proxy
uid/gid from the pod's install. Started as root, it drops to the proxy
uid/gid once it listens, so its own connections are never captured.
It needs no Sluice programs: behind iptables REDIRECT it works the same.

Examples:
  sluice run --cgroup /sys/fs/cgroup/unified/mypod
  sluice run -p 15001 -u 1337 -g 1337 --log-format json`,
	}
	c.run = func(ctx context.Context, args []string, stdout io.Writer) error {
		fs := flag.NewFlagSet("run", flag.ContinueOnError)
		cgroup := fs.String("cgroup", "", "the pod's cgroup v2 directory: read ports and proxy uid/gid from its install")
		pinDir := fs.String("pin-dir", "", "where the pins are (default /sys/fs/bpf/sluice/<pod id>)")
		policy := redirect.DefaultPolicy()
		fs.Var(redirect.PortFlag(&policy.OutboundPort), "p", "outbound listener port")
		fs.Var(redirect.PortFlag(&policy.InboundPort), "z", "inbound listener port")
		fs.Var(redirect.IDFlag(&policy.ProxyUID, "uid"), "u", "uid to run as when started as root")
		fs.Var(redirect.IDFlag(&policy.ProxyGID, "gid"), "g", "gid to run as when started as root")
		logFormat := fs.String("log-format", "text", "text or json")
		logLevel := fs.String("log-level", "info", "debug, info, warn or error")
		idle := fs.Duration("idle-timeout", time.Hour, "close a connection after this long without bytes in a direction")
		if err := parseFlags(fs, c, args, stdout); err != nil {
			return err
		}
		set := map[string]bool{}
		fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
		log, err := newLogger(os.Stderr, *logFormat, *logLevel)
		if err != nil {
			return err
		}

		if *cgroup != "" {
			target, err := loader.TargetOf(*cgroup, *pinDir)
			if err != nil {
				return err
			}
			installed, err := loader.ReadCapture(target.PinDir)
			if err != nil {
				return fmt.Errorf("read the pod's install (run 'sluice install --cgroup %s' first): %w", target.Cgroup, err)
			}
			if !set["p"] {
				policy.OutboundPort = installed.OutboundPort
			}
			if !set["z"] {
				policy.InboundPort = installed.InboundPort
			}
			if !set["u"] {
				policy.ProxyUID = installed.ProxyUID
			}
			if !set["g"] {
				policy.ProxyGID = installed.ProxyGID
			}
			warnIfOutside(log, target.Cgroup)
		}

		listeners, err := listen(policy.OutboundPort, policy.InboundPort, log)
		if err != nil {
			return err
		}
		if err := dropPrivileges(policy.ProxyUID, policy.ProxyGID, log); err != nil {
			for _, ln := range listeners {
				ln.Close()
			}
			return err
		}

		proxy := redirect.NewProxy(redirect.ProxyOptions{IdleTimeout: *idle, Logger: log})
		var wg sync.WaitGroup
		errs := make([]error, len(listeners))
		for i, ln := range listeners {
			wg.Add(1)
			go func() {
				defer wg.Done()
				errs[i] = proxy.Serve(ctx, ln.Listener, ln.dir)
			}()
		}
		log.Info("listening", "addrs", addrs(listeners), "uid", os.Getuid(), "gid", os.Getgid())
		wg.Wait()
		return errors.Join(errs...)
	}
	return c
}

type listener struct {
	net.Listener
	dir redirect.Direction
}

// listen opens the outbound listener on loopback and the inbound one on every
// address, each for IPv4 and IPv6 separately: one dual-stack socket would
// hand IPv4 connections over as v4-mapped AF_INET6. IPv6 may be disabled in
// the pod; then IPv4 alone is served.
func listen(outPort, inPort uint16, log *slog.Logger) ([]listener, error) {
	var lns []listener
	for _, l := range []struct {
		network, addr string
		port          uint16
		dir           redirect.Direction
	}{
		{"tcp4", "127.0.0.1", outPort, redirect.Outbound},
		{"tcp6", "::1", outPort, redirect.Outbound},
		{"tcp4", "0.0.0.0", inPort, redirect.Inbound},
		{"tcp6", "::", inPort, redirect.Inbound},
	} {
		addr := net.JoinHostPort(l.addr, strconv.Itoa(int(l.port)))
		ln, err := net.Listen(l.network, addr)
		if err != nil && l.network == "tcp6" {
			log.Warn("no IPv6 listener; IPv6 connections will not be served", "addr", addr, "err", err)
			continue
		}
		if err != nil {
			for _, open := range lns {
				open.Close()
			}
			return nil, fmt.Errorf("listen on %s (is another proxy running?): %w", addr, err)
		}
		lns = append(lns, listener{ln, l.dir})
	}
	return lns, nil
}

// dropPrivileges switches to the proxy identity when running as root. If it
// stayed root its own dials would be captured and loop back into itself.
func dropPrivileges(uid, gid uint32, log *slog.Logger) error {
	if os.Geteuid() != 0 {
		if uint32(os.Getuid()) != uid && uint32(os.Getgid()) != gid {
			log.Warn("not running as the proxy uid/gid: this proxy's own connections will be captured", "uid", os.Getuid(), "proxy_uid", uid)
		}
		return nil
	}
	if err := syscall.Setgroups(nil); err != nil {
		return fmt.Errorf("drop supplementary groups: %w", err)
	}
	if err := syscall.Setgid(int(gid)); err != nil {
		return fmt.Errorf("switch to proxy gid %d: %w", gid, err)
	}
	if err := syscall.Setuid(int(uid)); err != nil {
		return fmt.Errorf("switch to proxy uid %d: %w", uid, err)
	}
	return nil
}

// warnIfOutside warns when this process is not in the pod's cgroup subtree:
// the getsockopt hook only answers for sockets created inside it.
func warnIfOutside(log *slog.Logger, cgroup string) {
	data, err := os.ReadFile("/proc/self/cgroup")
	if err != nil {
		return
	}
	mount, err := loader.Cgroup2Mount()
	if err != nil {
		return
	}
	for _, line := range strings.Split(string(data), "\n") {
		if rel, ok := strings.CutPrefix(line, "0::"); ok {
			own := filepath.Join(mount, rel)
			if own != cgroup && !strings.HasPrefix(own, cgroup+"/") {
				log.Warn("sidecar runs outside the pod's cgroup: SO_ORIGINAL_DST will not be answered", "own_cgroup", own, "pod_cgroup", cgroup)
			}
			return
		}
	}
}

func addrs(lns []listener) string {
	parts := make([]string, len(lns))
	for i, ln := range lns {
		parts[i] = ln.Addr().String()
	}
	return strings.Join(parts, ",")
}
