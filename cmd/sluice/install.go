package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/sluicemesh/sluice/loader"
	"github.com/sluicemesh/sluice/redirect"
)

func installCommand() command {
	c := command{
		name:    "install",
		summary: "attach capture to a pod's cgroup and pin it (init container)",
		help: `Usage: sluice install --cgroup PATH [--netns PATH | --interface NAME] [--pin-dir DIR] [--dry-run] [capture flags]

Loads the capture programs, attaches them to the pod's cgroup v2 directory
(outbound capture) and, with --netns or --interface, to the ingress of the
pod's interface (inbound capture), pins them under
/sys/fs/bpf/sluice/<cgroup id>/, then exits. Flags follow istio-iptables
(-p -z -u -g -m -i -x -b -d -q -o) and Linkerd proxy-init
(--outgoing-proxy-port, ...).

Safe to rerun, as Kubernetes reruns init containers: on a complete install
with the same flags it changes nothing; after a killed run it finishes the
install; with new flags it switches the policy in place, with no moment in
which traffic escapes capture. A first install is all or nothing.

Examples:
  sluice install --cgroup /sys/fs/cgroup/unified/mypod --netns /run/netns/mypod
  sluice install --cgroup /sys/fs/cgroup/unified/mypod --interface eth0 -b 8080 -d 15020
  sluice install --cgroup /sys/fs/cgroup/unified/mypod -u 1337 -x 198.18.0.0/24 -o 22,3306
  sluice install --cgroup /sys/fs/cgroup/unified/kubepods.slice/kubepods-pod1.slice --dry-run`,
	}
	c.run = func(ctx context.Context, args []string, stdout io.Writer) error {
		fs := flag.NewFlagSet("install", flag.ContinueOnError)
		cgroup := fs.String("cgroup", "", "the pod's cgroup v2 directory (required)")
		pinDir := fs.String("pin-dir", "", "where to pin (default /sys/fs/bpf/sluice/<cgroup id>)")
		netnsPath := fs.String("netns", "", "the pod's network namespace, for inbound capture (e.g. /run/netns/NAME)")
		iface := fs.String("interface", "", "the pod's interface for inbound capture (default eth0 when --netns is given)")
		dryRun := fs.Bool("dry-run", false, "print the plan as JSON and change nothing")
		fs.BoolVar(dryRun, "n", false, "same as --dry-run (istio-iptables)")
		logLevel := fs.String("log-level", "info", "debug, info, warn or error")
		policy := redirect.DefaultPolicy()
		policy.RegisterFlags(fs)
		if err := parseFlags(fs, c, args, stdout); err != nil {
			return err
		}
		log, err := newLogger(os.Stderr, "text", *logLevel)
		if err != nil {
			return err
		}
		plan, err := policy.Plan()
		if err != nil {
			return usageError{err.Error()}
		}
		if *cgroup == "" {
			return usageError{"--cgroup is required: pass the pod's cgroup v2 directory, e.g. --cgroup /sys/fs/cgroup/unified/mypod"}
		}
		target, err := loader.ResolveTarget(*cgroup, *pinDir)
		if err != nil {
			return err
		}
		// Inbound capture is asked for explicitly: defaulting to eth0 of
		// whatever namespace install runs in could capture a node's traffic.
		target.Netns, target.Interface = *netnsPath, *iface
		if target.Netns != "" && target.Interface == "" {
			target.Interface = "eth0"
		}
		if *dryRun {
			enc := json.NewEncoder(stdout)
			enc.SetIndent("", "  ")
			return enc.Encode(struct {
				Target loader.Target `json:"target"`
				Plan   redirect.Plan `json:"plan"`
			}{target, plan})
		}
		if err := requireRoot(); err != nil {
			return err
		}
		res, err := loader.Install(target, plan, args, log)
		if err != nil {
			return err
		}
		if len(res.Changes) == 0 {
			fmt.Fprintf(stdout, "already installed on %s (pins at %s): nothing changed\n", target.Cgroup, target.PinDir)
			return nil
		}
		fmt.Fprintf(stdout, "installed on %s (pins at %s): %s\n", target.Cgroup, target.PinDir, strings.Join(res.Changes, ", "))
		return nil
	}
	return c
}

func uninstallCommand() command {
	c := command{
		name:    "uninstall",
		summary: "detach capture from a pod's cgroup and remove its pins",
		help: `Usage: sluice uninstall --cgroup PATH [--pin-dir DIR]

Detaches every program of the pod's install and removes its pins, and
nothing Sluice did not create. Works after the pod's cgroup is gone (the pins
record its path), and when run again after being killed. Exits 0 with a note
when nothing is installed.

Example:
  sluice uninstall --cgroup /sys/fs/cgroup/unified/mypod`,
	}
	c.run = func(ctx context.Context, args []string, stdout io.Writer) error {
		fs := flag.NewFlagSet("uninstall", flag.ContinueOnError)
		cgroup := fs.String("cgroup", "", "the pod's cgroup v2 directory (required)")
		pinDir := fs.String("pin-dir", "", "where the pins are (default /sys/fs/bpf/sluice/<cgroup id>)")
		if err := parseFlags(fs, c, args, stdout); err != nil {
			return err
		}
		if *cgroup == "" {
			return usageError{"--cgroup is required: pass the pod's cgroup v2 directory"}
		}
		if err := requireRoot(); err != nil {
			return err
		}
		target, err := loader.FindTarget(*cgroup, *pinDir)
		if errors.Is(err, loader.ErrNotInstalled) {
			fmt.Fprintf(stdout, "nothing installed on %s\n", target.Cgroup)
			return nil
		}
		if err != nil {
			return err
		}
		log, _ := newLogger(os.Stderr, "text", "warn")
		err = loader.Uninstall(target, log)
		if errors.Is(err, loader.ErrNotInstalled) {
			fmt.Fprintf(stdout, "nothing installed on %s\n", target.Cgroup)
			return nil
		}
		if err != nil {
			return err
		}
		fmt.Fprintf(stdout, "uninstalled from %s\n", target.Cgroup)
		return nil
	}
	return c
}
