package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/netip"
	"os"
	"strings"
	"text/tabwriter"

	"github.com/sluicemesh/sluice/loader"
	"github.com/sluicemesh/sluice/redirect"
)

const routeHelp = `Usage: sluice route set     --cgroup PATH [--mode random|round-robin] [--allow-zero] VIP:PORT BACKEND=WEIGHT ...
       sluice route list    --cgroup PATH [--json]
       sluice route delete  --cgroup PATH VIP:PORT
       sluice route apply   --cgroup PATH -f FILE [--allow-zero]
       sluice route rollout --cgroup PATH VIP:PORT --to BACKEND [--step 10] [--interval 30s]
                            [--max-connect-failure-ratio 0.05] [--max-connect-latency 50ms]
                            [--min-connects 1] [--max-wait 5×interval]
       sluice route rollout --httproute|--tcproute NAMESPACE/NAME --to SERVICE --prometheus URL
                            [--kubeconfig FILE] [the same --step ... --max-wait]
       (set, delete, apply: --pods PATTERN instead of --cgroup changes every installed pod
        whose cgroup path matches, * for any text, e.g. --pods '*pod3f2a8c1e*')

A route sends the pod's new connections to a service (a virtual IP and port)
to one of its backends, picked in the kernel at connect time by weight: the
sidecar (or any SO_ORIGINAL_DST proxy) is handed the backend as the
original destination, while the app still sees the service as its peer.
Weights need not sum to 100; weight 0 takes no new connections (open ones
stay); a service whose every weight is 0 refuses new connections at once
(--allow-zero). --mode round-robin makes the split exact even over a few
connections (smooth weighted round-robin) instead of random.

Every change is one step for the kernel, and changes from several processes
never mix. apply reads a YAML or JSON file shaped like Gateway API
backendRefs and sets every route in it at once:

  routes:
    - service: 198.19.0.10:80
      mode: random
      backendRefs:
        - {address: 198.18.2.2, port: 8080, weight: 90}
        - {address: 198.18.3.2, port: 8080, weight: 10}

rollout moves a service from its current backend to --to step by step,
checking after each --interval the canary's connect failures and connect
latency (from the pod's flows the node agent exports, see --metrics) against the
stable backend's; it rolls back by itself when the canary is worse by more
than the bounds, and exits 1. A step in which fewer than --min-connects
connects to the canary were measured is never passed: it runs on, judged
every --interval, and after --max-wait the rollout rolls back ("no traffic
to the canary"): a canary nobody reached has proved nothing.

With --httproute or --tcproute, rollout moves a Gateway API route in the
cluster instead (a team without Argo Rollouts gets the same gated canary):
it patches the weights of the route's backend Services (the stable one and
--to, both in its one rule's backendRefs), which every node's agent
(--kubernetes) carries into its captured pods' kernels, and judges each
step by the connects of every captured pod to the Services' endpoints, as
the agents export them, summed by the Prometheus at --prometheus. Each
patch is made on the route as read (a concurrent change is read again, not
overwritten) and leaves the annotations rollout.sluice.dev/step and, on a
rollback, rollout.sluice.dev/rollback. It reads with --kubeconfig (default
$KUBECONFIG), else the pod's service account: it needs get and patch on the
route, and list on EndpointSlices in its namespace.

Examples:
  sluice route set --cgroup /sys/fs/cgroup/unified/mypod 198.19.0.10:80 198.18.2.2:8080=90 198.18.3.2:8080=10
  sluice route list --cgroup /sys/fs/cgroup/unified/mypod
  sluice route apply --cgroup /sys/fs/cgroup/unified/mypod -f routes.yaml
  sluice route apply --pods '*kubepods*' -f routes.yaml       # every pod on the node
  sluice route rollout --cgroup /sys/fs/cgroup/unified/mypod 198.19.0.10:80 --to 198.18.3.2:8080 --step 10 --interval 30s
  sluice route rollout --httproute shop/web --to web-v2 --prometheus http://prometheus:9090 --step 25 --interval 1m`

func routeCommand() command {
	c := command{
		name:    "route",
		summary: "canary routes: split a service's new connections over weighted backends",
		help:    routeHelp,
	}
	c.run = func(ctx context.Context, args []string, stdout io.Writer) error {
		subs := routeSubcommands()
		if len(args) == 0 || strings.HasPrefix(args[0], "-") {
			if len(args) > 0 && (args[0] == "-h" || args[0] == "--help") {
				fmt.Fprintln(stdout, strings.TrimSpace(c.help))
				return flag.ErrHelp
			}
			return usageError{fmt.Sprintf("want a subcommand: %s (run 'sluice route --help')", subs)}
		}
		r := newRouteCall(c, args[0], stdout)
		for _, sub := range subs {
			if sub.name == r.sub {
				return sub.run(ctx, r, args[1:])
			}
		}
		return usageError{fmt.Sprintf("unknown route subcommand %q: want %s", r.sub, subs)}
	}
	return c
}

// routeSubcommand is one of route's subcommands: it defines its own flags
// on r.fs, parses args and runs.
type routeSubcommand struct {
	name string
	run  func(ctx context.Context, r *routeCall, args []string) error
}

type routeTable []routeSubcommand

func routeSubcommands() routeTable {
	return []routeSubcommand{
		{"set", routeSet},
		{"list", routeList},
		{"delete", routeDelete},
		{"apply", routeApply},
		{"rollout", routeRollout},
	}
}

// String is the names as a list: "set, list, ... or rollout".
func (subs routeTable) String() string {
	names := make([]string, len(subs))
	for i, sub := range subs {
		names[i] = sub.name
	}
	return strings.Join(names[:len(names)-1], ", ") + " or " + names[len(names)-1]
}

// routeCall is one run of a route subcommand, with the flags every
// subcommand shares: which pod or pods it is for.
type routeCall struct {
	c      command
	sub    string
	fs     *flag.FlagSet
	stdout io.Writer

	cgroup, pinDir, pods *string
}

func newRouteCall(c command, sub string, stdout io.Writer) *routeCall {
	fs := flag.NewFlagSet("route "+sub, flag.ContinueOnError)
	return &routeCall{c: c, sub: sub, fs: fs, stdout: stdout,
		cgroup: fs.String("cgroup", "", "the pod's cgroup v2 directory (required unless --pods)"),
		pinDir: fs.String("pin-dir", "", "where the pins are (default /sys/fs/bpf/sluice/<cgroup id>)"),
		pods:   fs.String("pods", "", "set, delete, apply: every installed pod whose cgroup path matches this pattern (* for any text), instead of --cgroup"),
	}
}

// target is the one pod --cgroup names.
func (r *routeCall) target() (loader.Target, error) {
	if *r.pods != "" {
		return loader.Target{}, usageError{"--pods is for set, delete and apply: " + r.sub + " takes one pod, with --cgroup"}
	}
	if *r.cgroup == "" {
		return loader.Target{}, usageError{"--cgroup is required: pass the pod's cgroup v2 directory"}
	}
	return loader.ResolveTarget(*r.cgroup, *r.pinDir)
}

// change applies one change to the pod, or to every pod --pods matches
// (the node agent's way to route many pods), and says so.
func (r *routeCall) change(ch loader.RouteChange, done string) error {
	if *r.pods == "" {
		t, err := r.target()
		if err != nil {
			return err
		}
		if err := loader.ChangeRoutes(t, ch); err != nil {
			return err
		}
		fmt.Fprintln(r.stdout, done)
		return nil
	}
	if *r.cgroup != "" {
		return usageError{"--cgroup and --pods both given: pick one pod, or every pod the pattern matches"}
	}
	installs, err := loader.Match(loader.DefaultPinRoot, *r.pods)
	if err != nil {
		return err
	}
	for _, in := range installs {
		if err := loader.ChangeRoutes(in.Target(), ch); err != nil {
			return fmt.Errorf("%s: %w", in.Cgroup, err)
		}
		fmt.Fprintf(r.stdout, "%s: %s\n", in.Cgroup, done)
	}
	return nil
}

func routeSet(_ context.Context, r *routeCall, args []string) error {
	mode := r.fs.String("mode", redirect.ModeRandom, "random or round-robin")
	allowZero := r.fs.Bool("allow-zero", false, "accept every weight 0 (the service then refuses new connections)")
	if err := parseInterspersed(r.fs, r.c, args, r.stdout); err != nil {
		return err
	}
	if r.fs.NArg() < 2 {
		return usageError{"want VIP:PORT and at least one BACKEND=WEIGHT (run 'sluice route --help')"}
	}
	svc, err := redirect.ParseService(r.fs.Arg(0))
	if err != nil {
		return usageError{err.Error()}
	}
	backends, err := redirect.ParseBackends(r.fs.Args()[1:])
	if err != nil {
		return usageError{err.Error()}
	}
	route := redirect.Route{Service: svc, Mode: *mode, Backends: backends}
	if err := route.Validate(*allowZero); err != nil {
		return usageError{err.Error()}
	}
	return r.change(loader.RouteChange{Set: []redirect.Route{route}}, fmt.Sprintf("route %s set: %s", route.Service, describe(route)))
}

func routeDelete(_ context.Context, r *routeCall, args []string) error {
	if err := parseInterspersed(r.fs, r.c, args, r.stdout); err != nil {
		return err
	}
	svc, err := serviceArg(r.fs)
	if err != nil {
		return err
	}
	return r.change(loader.RouteChange{Delete: []netip.AddrPort{svc}}, fmt.Sprintf("route %s deleted", svc))
}

func routeApply(_ context.Context, r *routeCall, args []string) error {
	file := r.fs.String("f", "", "the route file (YAML or JSON; - for stdin)")
	allowZero := r.fs.Bool("allow-zero", false, "accept routes whose every weight is 0")
	if err := parseFlags(r.fs, r.c, args, r.stdout); err != nil {
		return err
	}
	if *file == "" {
		return usageError{"-f FILE is required: the routes to apply (run 'sluice route --help' for the format)"}
	}
	data, err := readFileOrStdin(*file)
	if err != nil {
		return err
	}
	routes, err := redirect.ParseRouteFile(data, *allowZero)
	if err != nil {
		return usageError{fmt.Sprintf("%s: %v", *file, err)}
	}
	return r.change(loader.RouteChange{Set: routes}, fmt.Sprintf("%d routes applied", len(routes)))
}

func routeList(_ context.Context, r *routeCall, args []string) error {
	asJSON := r.fs.Bool("json", false, "print JSON")
	if err := parseFlags(r.fs, r.c, args, r.stdout); err != nil {
		return err
	}
	t, err := r.target()
	if err != nil {
		return err
	}
	routes, err := loader.Routes(t)
	if err != nil {
		return err
	}
	if *asJSON {
		return writeJSON(r.stdout, routes)
	}
	printRoutes(r.stdout, routes)
	return nil
}

func routeRollout(ctx context.Context, r *routeCall, args []string) error {
	return rolloutCommand(ctx, r.fs, r.c, args, r.target, r.stdout)
}

// parseInterspersed parses flags that may come after the positional
// arguments too (sluice route set VIP:PORT B=W --cgroup X).
func parseInterspersed(fs *flag.FlagSet, c command, args []string, stdout io.Writer) error {
	var positional []string
	for {
		if err := parseFlagsLoose(fs, c, args, stdout); err != nil {
			return err
		}
		if fs.NArg() == 0 {
			break
		}
		positional = append(positional, fs.Arg(0))
		args = fs.Args()[1:]
	}
	return fs.Parse(append([]string{"--"}, positional...))
}

// parseFlagsLoose is parseFlags without the check for leftover arguments.
func parseFlagsLoose(fs *flag.FlagSet, c command, args []string, stdout io.Writer) error {
	err := parseFlags(fs, c, args, stdout)
	var ue usageError
	if errors.As(err, &ue) && strings.HasPrefix(ue.msg, "unexpected argument") {
		return nil
	}
	return err
}

func readFileOrStdin(name string) ([]byte, error) {
	if name == "-" {
		return io.ReadAll(os.Stdin)
	}
	data, err := os.ReadFile(name)
	if err != nil {
		return nil, fmt.Errorf("read route file (pass -f a YAML or JSON file, or - for stdin): %w", err)
	}
	return data, nil
}

func describe(r redirect.Route) string {
	parts := make([]string, len(r.Backends))
	for i, b := range r.Backends {
		parts[i] = fmt.Sprintf("%s=%d", b.AddrPort(), b.Weight)
	}
	return strings.Join(parts, " ") + " (" + r.Normalize().Mode + ")"
}

func printRoutes(w io.Writer, routes []loader.RouteState) {
	if len(routes) == 0 {
		fmt.Fprintln(w, "no routes")
		return
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "SERVICE\tMODE\tBACKEND\tWEIGHT\tSHARE\tPICKED\tEFFECTIVE")
	for _, r := range routes {
		var picks uint64
		for _, p := range r.Picks {
			picks += p
		}
		for i, b := range r.Backends {
			share, eff := "-", "-"
			if t := r.Total(); t > 0 {
				share = fmt.Sprintf("%.1f%%", 100*float64(b.Weight)/float64(t))
			}
			if picks > 0 {
				eff = fmt.Sprintf("%.1f%%", 100*float64(r.Picks[i])/float64(picks))
			}
			svc, mode := r.Service.String(), r.Mode
			if i > 0 {
				svc, mode = "", ""
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%s\t%d\t%s\n", svc, mode, b.AddrPort(), b.Weight, share, r.Picks[i], eff)
		}
	}
	tw.Flush()
}

// serviceArg is the one argument of route delete and route rollout: the
// service's VIP:PORT.
func serviceArg(fs *flag.FlagSet) (netip.AddrPort, error) {
	if fs.NArg() != 1 {
		return netip.AddrPort{}, usageError{"want the service's VIP:PORT (run 'sluice route --help')"}
	}
	svc, err := redirect.ParseService(fs.Arg(0))
	if err != nil {
		return netip.AddrPort{}, usageError{err.Error()}
	}
	return svc, nil
}
