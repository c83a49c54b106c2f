package main

import (
	"cmp"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strings"
	"time"

	"github.com/sluicemesh/sluice/dnsfwd"
	"github.com/sluicemesh/sluice/loader"
	"github.com/sluicemesh/sluice/probe"
	"github.com/sluicemesh/sluice/redirect"
	"github.com/sluicemesh/sluice/telemetry"
)

const installHelp = `Usage: sluice install [--cgroup PATH] [--netns PATH | --interface NAME] [--pin-dir DIR] [--dry-run] [--validate] [capture flags]

Attaches the capture programs (loaded once per node, by the first install,
under /sys/fs/bpf/sluice/node/) to the pod's cgroup v2 directory (outbound
capture) and, with --netns or --interface, to the pod's network namespace
(inbound capture: every connection arriving from outside, on any interface
but loopback; the interface must exist there), pins the pod's maps and
links under /sys/fs/bpf/sluice/<cgroup id>/, then exits. One pod per
network namespace: without --netns, the namespace of a process in the
cgroup (install itself, in an init container); a cgroup with none needs
--netns. Flags follow istio-iptables
(-p -z -u -g -m -i -x -b -d -q -o), and Linkerd proxy-init's long names
(--outgoing-proxy-port, --incoming-proxy-port, --proxy-uid,
--outbound-ports-to-ignore, --inbound-ports-to-ignore) are accepted too;
'sluice istio-iptables' and 'sluice proxy-init' take those tools' own flag
sets unchanged, with their own meanings and defaults.

Run with no --cgroup inside a pod (its init container), it finds the pod's
cgroup (the parent of its container's) and captures inbound in the pod's
network namespace (whose eth0 must exist). It needs the host's cgroup2 hierarchy and /sys/fs/bpf mounted in.
--validate then proves capture: a connection from this process to a captured
address must reach a listener in the sidecar's place, with the original
destination intact; exit 1 says what went wrong.

Safe to rerun, as Kubernetes reruns init containers: on a complete install
with the same flags it changes nothing; after a killed run it finishes the
install; with new flags it switches the policy in place, with no moment in
which traffic escapes capture. A first install is all or nothing.

Examples:
  sluice install --cgroup /sys/fs/cgroup/unified/mypod --netns /run/netns/mypod
  sluice install --cgroup /sys/fs/cgroup/unified/mypod --interface eth0 -b 8080 -d 15020
  sluice install --cgroup /sys/fs/cgroup/unified/mypod -u 1337 -x 198.18.0.0/24 -o 22,3306
  sluice install --cgroup /sys/fs/cgroup/unified/kubepods.slice/kubepods-pod1.slice --dry-run
  sluice install --validate                  # in a pod's init container`

func installCommand() command {
	c := command{
		name:    "install",
		summary: "attach capture to a pod's cgroup and pin it (init container)",
		help:    installHelp,
	}
	c.run = func(ctx context.Context, args []string, stdout io.Writer) error {
		fs := flag.NewFlagSet("install", flag.ContinueOnError)
		var req installRequest
		fs.StringVar(&req.cgroup, "cgroup", "", "the pod's cgroup v2 directory (default: inside a pod, the pod's own)")
		fs.StringVar(&req.pinDir, "pin-dir", "", "where to pin (default /sys/fs/bpf/sluice/<cgroup id>)")
		fs.StringVar(&req.netns, "netns", "", "the pod's network namespace, for inbound capture (e.g. /run/netns/NAME)")
		fs.StringVar(&req.iface, "interface", "", "the pod's interface for inbound capture (default eth0 when --netns is given or when run inside the pod)")
		fs.BoolVar(&req.dryRun, "dry-run", false, "print the plan as JSON and change nothing")
		fs.BoolVar(&req.dryRun, "n", false, "same as --dry-run (istio-iptables)")
		fs.BoolVar(&req.validate, "validate", false, "after installing, prove capture with a probe connection (run inside the pod)")
		req.probePort = redirect.DefaultProbePort
		fs.Var(redirect.PortFlag(&req.probePort), "probe-port", "port of the validation probe's destination")
		fs.DurationVar(&req.probeTimeout, "probe-timeout", redirect.DefaultProbeTimeout, "how long the validation probe may take")
		logLevel := fs.String("log-level", "info", "debug, info, warn or error")
		fs.StringVar(&req.resolvConf, "resolv-conf", "/etc/resolv.conf", "with --redirect-dns and no --dns-servers: the resolv.conf naming the pod's nameservers")
		annotations := fs.String("annotations", "", "a downward API file of the pod's annotations: "+redirect.AnnotationPrefix+"<flag> sets --<flag> for\n"+
			strings.Join(redirect.AnnotatedFlags, ", ")+" (flags given here win)")
		req.policy = redirect.DefaultPolicy()
		req.policy.RegisterFlags(fs)
		req.identity = identityFlags(fs)
		if err := parseFlags(fs, c, args, stdout); err != nil {
			return err
		}
		if *annotations != "" {
			if err := applyAnnotations(fs, *annotations); err != nil {
				return err
			}
		}
		var err error
		if req.log, err = newLogger(os.Stderr, "text", *logLevel); err != nil {
			return err
		}
		req.cmdline = args
		return installPod(ctx, req, stdout)
	}
	return c
}

// applyAnnotations sets the flags the pod's sluice.dev/ annotations in file
// ask for, except those set on the command line.
func applyAnnotations(fs *flag.FlagSet, file string) error {
	f, err := os.Open(file)
	if err != nil {
		return usageError{fmt.Sprintf("--annotations: %v (mount the pod's annotations with a downwardAPI volume)", err)}
	}
	defer f.Close()
	ann, err := redirect.ParseAnnotations(f)
	if err != nil {
		return usageError{fmt.Sprintf("--annotations %s: %v", file, err)}
	}
	settings, err := redirect.AnnotationSettings(ann)
	if err != nil {
		return usageError{fmt.Sprintf("--annotations %s: %v: fix the pod's annotation", file, err)}
	}
	given := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { given[f.Name] = true })
	for _, kv := range settings {
		if given[kv[0]] {
			continue
		}
		if err := redirect.SetAnnotated(fs, kv[0], kv[1]); err != nil {
			return usageError{fmt.Sprintf("%v: fix the pod's annotation", err)}
		}
	}
	return nil
}

// installRequest is one install as install, istio-iptables or proxy-init
// state it.
type installRequest struct {
	cgroup, pinDir, netns, iface string
	policy                       redirect.Policy
	// identity is who the pod is, recorded for the agent's metrics of its
	// flows; nil: the environment's (telemetry.IdentityFromEnv).
	identity                    *telemetry.Identity
	dryRun, validate, skipApply bool
	cleanup                     bool
	probePort                   uint16
	probeTimeout                time.Duration
	log                         *slog.Logger
	// cmdline is what the install records for its repair command: install's
	// flags, or a personality's whole command line.
	cmdline []string
	// resolvConf names the pod's nameservers for DNS capture (default
	// /etc/resolv.conf, the pod's own inside it).
	resolvConf string
}

// installPod installs capture as req asks: into the pod's cgroup (found from
// the process's own when none is given) and, with a netns or inside the pod,
// its interface; then validates it if asked.
func installPod(ctx context.Context, req installRequest, stdout io.Writer) error {
	if p := &req.policy; p.RedirectDNS && !p.CaptureAllDNS && len(p.DNSServers) == 0 {
		file := cmp.Or(req.resolvConf, "/etc/resolv.conf")
		servers, err := dnsfwd.Nameservers(file)
		if err != nil {
			return usageError{fmt.Sprintf("--redirect-dns: the pod's nameservers: %v (give --dns-servers, or --capture-all-dns)", err)}
		}
		for _, s := range servers {
			p.DNSServers = append(p.DNSServers, s.Addr())
		}
	}
	plan, err := req.policy.Plan()
	if err != nil {
		return usageError{err.Error()}
	}
	target, err := installTarget(&req)
	if err != nil {
		return err
	}
	if req.dryRun {
		return writeJSON(stdout, struct {
			Target loader.Target `json:"target"`
			Plan   redirect.Plan `json:"plan"`
		}{target, plan})
	}
	if err := requireRoot(); err != nil {
		return err
	}
	if req.validate {
		if err := probesFromPod(req, target); err != nil {
			return err
		}
	}
	switch {
	case req.cleanup:
		if err := loader.Uninstall(target, req.log); err != nil && !errors.Is(err, loader.ErrNotInstalled) {
			return err
		}
		fmt.Fprintf(stdout, "removed capture from %s\n", target.Cgroup)
		return nil
	case req.skipApply:
		req.log.Info("not installing (--skip-rule-apply)", "cgroup", target.Cgroup)
	default:
		if err := applyInstall(req, target, plan, stdout); err != nil {
			return err
		}
	}
	if !req.validate {
		return nil
	}
	return validateInstall(ctx, req, plan, stdout)
}

// installTarget is the pod req names, or the one this process runs in (then
// req.cgroup is set to it), with the interface inbound capture attaches to.
func installTarget(req *installRequest) (loader.Target, error) {
	var err error
	inPod := req.cgroup == ""
	if inPod {
		if req.cgroup, err = loader.OwnPod(os.Getenv); err != nil {
			return loader.Target{}, usageError{err.Error()}
		}
	}
	target, err := loader.ResolveTarget(req.cgroup, req.pinDir)
	if err != nil {
		return loader.Target{}, err
	}
	if inPod && !req.dryRun {
		// A bpffs install mounted itself here would die with the
		// container, and every pin and link with it.
		if err := loader.HostBPFFS(target.PinDir); err != nil {
			return loader.Target{}, err
		}
	}
	// Inbound capture is asked for explicitly, or implied by running inside
	// the pod: defaulting to eth0 of whatever namespace install runs in
	// could capture a node's traffic.
	target.Netns, target.Interface = req.netns, req.iface
	id := telemetry.IdentityFromEnv()
	if req.identity != nil {
		id = *req.identity
	}
	target.Identity = id.WithDefaults().Map()
	if target.Interface == "" && (target.Netns != "" || inPod) {
		target.Interface = "eth0"
	}
	return target, nil
}

// probesFromPod checks that the validation probe may run here: it
// connects from this process, which must be one of the pod's.
func probesFromPod(req installRequest, target loader.Target) error {
	own, err := loader.OwnCgroup()
	if err != nil {
		return err
	}
	if req.netns != "" || (own != target.Cgroup && !strings.HasPrefix(own, target.Cgroup+"/")) {
		return usageError{"validation probes from this process, which is not in the pod: run install inside the pod (its init container), or leave --validate out"}
	}
	return nil
}

// applyInstall installs plan on target and says what changed.
func applyInstall(req installRequest, target loader.Target, plan redirect.Plan, stdout io.Writer) error {
	res, err := loader.Install(target, plan, req.cmdline, req.log)
	if err != nil {
		return err
	}
	if len(res.Changes) == 0 {
		fmt.Fprintf(stdout, "already installed on %s (pins at %s): nothing changed\n", target.Cgroup, target.PinDir)
	} else {
		fmt.Fprintf(stdout, "installed on %s (pins at %s): %s\n", target.Cgroup, target.PinDir, strings.Join(res.Changes, ", "))
	}
	return nil
}

// validateInstall probes the installed capture with one connection.
func validateInstall(ctx context.Context, req installRequest, plan redirect.Plan, stdout io.Writer) error {
	res, err := probe.Run(ctx, plan, req.probePort, req.probeTimeout)
	if err != nil {
		return fmt.Errorf("validation failed: %w", err)
	}
	if res.Sidecar {
		fmt.Fprintf(stdout, "validated: a connection to %s was captured and accepted by the sidecar on port %d\n", res.Target, plan.OutboundPort)
	} else {
		fmt.Fprintf(stdout, "validated: a connection to %s was captured to port %d, which saw original destination %s\n", res.Target, plan.OutboundPort, res.OriginalDst)
	}
	return nil
}

func uninstallCommand() command {
	c := command{
		name:    "uninstall",
		summary: "detach capture from a pod's cgroup and remove its pins",
		help: `Usage: sluice uninstall --cgroup PATH [--pin-dir DIR]
       sluice uninstall --node [--pin-root DIR]

Detaches every program of the pod's install and removes its pins, and
nothing Sluice did not create. The node's programs stay for the other pods,
and go with the last pod that runs them. Works after the pod's cgroup is
gone (the pins record its path), and when run again after being killed.
Exits 0 with a note when nothing is installed.

With --node, removes the node's programs and maps (what a killed first
install can leave), and refuses while a pod still runs on them.

Examples:
  sluice uninstall --cgroup /sys/fs/cgroup/unified/mypod
  sluice uninstall --node`,
	}
	c.run = func(ctx context.Context, args []string, stdout io.Writer) error {
		fs := flag.NewFlagSet("uninstall", flag.ContinueOnError)
		cgroup := fs.String("cgroup", "", "the pod's cgroup v2 directory (required)")
		pinDir := fs.String("pin-dir", "", "where the pins are (default /sys/fs/bpf/sluice/<cgroup id>)")
		node := fs.Bool("node", false, "remove the node's programs and maps, once no pod runs on them")
		pinRoot := fs.String("pin-root", loader.DefaultPinRoot, "with --node: the root of every pod's pins")
		if err := parseFlags(fs, c, args, stdout); err != nil {
			return err
		}
		if *node && *cgroup != "" {
			return usageError{"--node and --cgroup exclude each other: uninstall the pod, then the node"}
		}
		if *cgroup == "" && !*node {
			return usageError{"--cgroup is required: pass the pod's cgroup v2 directory (or --node for the node's programs)"}
		}
		if err := requireRoot(); err != nil {
			return err
		}
		if *node {
			err := loader.UninstallNode(*pinRoot)
			if errors.Is(err, loader.ErrNotInstalled) {
				fmt.Fprintf(stdout, "nothing of the node's installed under %s\n", *pinRoot)
				return nil
			}
			if err != nil {
				return err
			}
			fmt.Fprintf(stdout, "removed the node's programs and maps under %s\n", *pinRoot)
			return nil
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

// identityFlags defines install's flags for who the pod is, each defaulting
// to what the Kubernetes downward API (or Istio's injector) puts in the
// environment.
func identityFlags(fs *flag.FlagSet) *telemetry.Identity {
	id := telemetry.IdentityFromEnv()
	for _, f := range []struct {
		name, usage string
		p           *string
	}{
		{"workload", "the pod's workload (source_workload outbound, destination_workload inbound)", &id.Workload},
		{"namespace", "the pod's namespace", &id.Namespace},
		{"app", "the pod's app label", &id.App},
		{"version", "the pod's version label", &id.Version},
		{"canonical-service", "the pod's canonical service (default: app, then workload)", &id.CanonicalService},
		{"canonical-revision", "the pod's canonical revision (default: version)", &id.CanonicalRevision},
		{"principal", "the pod's principal", &id.Principal},
		{"cluster", "the pod's cluster", &id.Cluster},
	} {
		fs.StringVar(f.p, f.name, *f.p, f.usage+"; recorded for the agent's metrics of its flows")
	}
	return &id
}
