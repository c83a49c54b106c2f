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
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/sluicemesh/sluice/loader"
	"github.com/sluicemesh/sluice/proxy"
	"github.com/sluicemesh/sluice/redirect"
)

func runCommand() command {
	c := command{
		name:    "run",
		summary: "run the sidecar: the transparent proxy for captured connections",
		help: `Usage: sluice run [--cgroup PATH] [-p PORT] [-z PORT] [-u UID -g GID] [--drain 5s] [--log-format json]

Serves captured outbound connections on 127.0.0.1:PORT and [::1]:PORT and
captured inbound ones on port -z (all addresses): asks the kernel for each
one's original destination (SO_ORIGINAL_DST), dials it (inbound: from
127.0.0.6, like Istio) and copies bytes both ways. With --cgroup it takes the
ports and proxy uid/gid from the pod's install, reading pins that only root
and the proxy group may read. Run it as the proxy uid/gid (1337 by default;
CAP_BPF is the only capability it needs); started as root, it switches to
them before it listens, since only the proxy may bind the capture ports and
its own connections must not be captured.
It needs no Sluice programs: behind iptables REDIRECT it works the same.

On SIGTERM it stops accepting at once, lets open connections finish for
--drain, then closes them and exits 0; a second signal ends it at once. If
any listener fails, it exits 1 so the pod restarts it.

Examples:
  sluice run --cgroup /sys/fs/cgroup/unified/mypod
  sluice run -p 15001 -z 15006 -u 1337 -g 1337 --log-format json`,
	}
	c.run = func(ctx context.Context, args []string, stdout io.Writer) error {
		fs := flag.NewFlagSet("run", flag.ContinueOnError)
		cgroup := fs.String("cgroup", "", "the pod's cgroup v2 directory: read ports and proxy uid/gid from its install")
		pinDir := fs.String("pin-dir", "", "where the pins are (default /sys/fs/bpf/sluice/<cgroup id>)")
		policy := redirect.DefaultPolicy()
		fs.Var(redirect.PortFlag(&policy.OutboundPort), "p", "outbound listener port")
		fs.Var(redirect.PortFlag(&policy.InboundPort), "z", "inbound listener port")
		fs.Var(redirect.IDFlag(&policy.ProxyUID, "uid"), "u", "uid to run as when started as root")
		fs.Var(redirect.IDFlag(&policy.ProxyGID, "gid"), "g", "gid to run as when started as root")
		logFormat := fs.String("log-format", "text", "text or json")
		logLevel := fs.String("log-level", "info", "debug, info, warn or error")
		idle := fs.Duration("idle-timeout", time.Hour, "close a connection after this long without bytes in a direction")
		drain := fs.Duration("drain", 5*time.Second, "on SIGTERM, how long open connections may take to finish")
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
			target, err := loader.ResolveTarget(*cgroup, *pinDir)
			if err != nil {
				return err
			}
			installed, err := loader.ReadPlan(target)
			if err != nil {
				return err
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

		if err := becomeProxy(policy.ProxyUID, policy.ProxyGID, log); err != nil {
			return err
		}
		listeners, err := listen(policy.OutboundPort, policy.InboundPort, log)
		if err != nil {
			return err
		}
		return serve(ctx, listeners, proxy.New(proxy.Options{IdleTimeout: *idle, Logger: log}), *drain, log)
	}
	return c
}

// serve runs the proxy on every listener until ctx ends (a signal: drain,
// then exit 0) or one listener fails (the others stop too, and the error
// makes the process exit non-zero, so the pod restarts the sidecar).
func serve(ctx context.Context, listeners []listener, p *proxy.Proxy, drain time.Duration, log *slog.Logger) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var wg sync.WaitGroup
	errs := make([]error, len(listeners))
	for i, ln := range listeners {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if errs[i] = p.Serve(ctx, ln.Listener, ln.dir); errs[i] != nil {
				cancel()
			}
		}()
	}
	log.Info("listening", "addrs", addrs(listeners), "uid", os.Getuid(), "gid", os.Getgid())
	<-ctx.Done()
	wg.Wait()
	err := errors.Join(errs...)
	if err == nil {
		log.Info("stopping: no new connections; draining open ones", "drain", drain)
	}
	p.Shutdown(drain)
	return err
}

type listener struct {
	net.Listener
	dir proxy.Direction
}

// listen opens the outbound listener on loopback and the inbound one on every
// address, each for IPv4 and IPv6 separately: one dual-stack socket would
// hand IPv4 connections over as v4-mapped AF_INET6. It fails unless it holds
// every listener, except that a pod without IPv6 is served over IPv4 alone:
// there no IPv6 connection can be captured either.
func listen(outPort, inPort uint16, log *slog.Logger) ([]listener, error) {
	var lns []listener
	for _, l := range []struct {
		network, addr string
		port          uint16
		dir           proxy.Direction
	}{
		{"tcp4", "127.0.0.1", outPort, proxy.Outbound},
		{"tcp6", "::1", outPort, proxy.Outbound},
		{"tcp4", "0.0.0.0", inPort, proxy.Inbound},
		{"tcp6", "::", inPort, proxy.Inbound},
	} {
		addr := net.JoinHostPort(l.addr, strconv.Itoa(int(l.port)))
		ln, err := net.Listen(l.network, addr)
		if err != nil && l.network == "tcp6" && (errors.Is(err, syscall.EADDRNOTAVAIL) || errors.Is(err, syscall.EAFNOSUPPORT)) {
			log.Info("IPv6 is off in this pod; serving IPv4 only", "addr", addr)
			continue
		}
		if err != nil {
			for _, open := range lns {
				open.Close()
			}
			hint := "is another proxy running?"
			if errors.Is(err, syscall.EPERM) || errors.Is(err, syscall.EACCES) {
				hint = "only the proxy uid/gid the pod was installed with may bind the capture ports"
			}
			return nil, fmt.Errorf("listen on %s (%s): %w", addr, hint, err)
		}
		lns = append(lns, listener{ln, l.dir})
	}
	return lns, nil
}

// becomeProxy switches to the proxy identity when running as root: the
// capture ports may only be bound by it, and as root the proxy's own dials
// would be captured and loop back into itself.
func becomeProxy(uid, gid uint32, log *slog.Logger) error {
	if os.Geteuid() != 0 {
		if uint32(os.Getuid()) != uid && uint32(os.Getgid()) != gid {
			log.Warn("not running as the proxy uid/gid: the capture ports cannot be bound and this proxy's own connections would be captured", "uid", os.Getuid(), "gid", os.Getgid(), "proxy_uid", uid, "proxy_gid", gid)
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
	own, err := loader.OwnCgroup()
	if err != nil {
		return
	}
	if own != cgroup && !strings.HasPrefix(own, cgroup+"/") {
		log.Warn("sidecar runs outside the pod's cgroup: SO_ORIGINAL_DST will not be answered", "own_cgroup", own, "pod_cgroup", cgroup)
	}
}

func addrs(lns []listener) string {
	parts := make([]string, len(lns))
	for i, ln := range lns {
		parts[i] = ln.Addr().String()
	}
	return strings.Join(parts, ",")
}
