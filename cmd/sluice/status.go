package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"

	"github.com/sluicemesh/sluice/agent"
	"github.com/sluicemesh/sluice/loader"
)

const statusHelp = `Usage: sluice status --cgroup PATH [--pin-dir DIR] [--json]
       sluice status --all [--json]

Reads the pod's pins: each program link (attached or not) and the capture
policy the BPF maps hold, and the kernel memory the install holds. Exits 1
when nothing is installed, or when the install is incomplete (a killed
install, a detached link): then it says what is missing and the command
that repairs it. --all lists every install on the node instead (exit 1 if
any is incomplete, or gone: its cgroup deleted, its pins left for the agent
or 'sluice uninstall' to collect).

Examples:
  sluice status --all
  sluice status --cgroup /sys/fs/cgroup/unified/mypod
  sluice status --cgroup /sys/fs/cgroup/unified/mypod --json | jq .plan`

func statusCommand() command {
	c := command{
		name:    "status",
		summary: "show what is attached and pinned for a pod, and the policy in force",
		help:    statusHelp,
	}
	c.run = func(ctx context.Context, args []string, stdout io.Writer) error {
		fs := flag.NewFlagSet("status", flag.ContinueOnError)
		cgroup := fs.String("cgroup", "", "the pod's cgroup v2 directory (required unless --all)")
		pinDir := fs.String("pin-dir", "", "where the pins are (default /sys/fs/bpf/sluice/<cgroup id>)")
		asJSON := fs.Bool("json", false, "print JSON")
		all := fs.Bool("all", false, "every install on the node, one line each")
		if err := parseFlags(fs, c, args, stdout); err != nil {
			return err
		}
		if *all {
			if *cgroup != "" {
				return usageError{"--all and --cgroup both given: pick one"}
			}
			if err := requireRoot(); err != nil {
				return err
			}
			return statusAll(stdout, *asJSON)
		}
		if *cgroup == "" {
			return usageError{"--cgroup is required: pass the pod's cgroup v2 directory"}
		}
		if err := requireRoot(); err != nil {
			return err
		}
		target, err := loader.FindTarget(*cgroup, *pinDir)
		if err != nil {
			return err
		}
		state, err := loader.Status(target)
		if err != nil {
			return err
		}
		if *asJSON {
			if err := writeJSON(stdout, state); err != nil {
				return err
			}
		} else {
			printStatus(stdout, state)
		}
		if !state.Complete {
			return fmt.Errorf("the install on %s is incomplete (%s): repair it with: %s", state.Target.Cgroup, strings.Join(state.Missing, "; "), state.Repair)
		}
		return nil
	}
	return c
}

func printStatus(w io.Writer, s loader.State) {
	fmt.Fprintf(w, "cgroup   %s (id %d)\npins     %s\n", s.Target.Cgroup, s.Target.CgroupID, s.Target.PinDir)
	switch {
	case !s.Complete:
		fmt.Fprintf(w, "state    INCOMPLETE: %s\n         repair: %s\n", strings.Join(s.Missing, "; "), s.Repair)
	case s.Upgrade:
		fmt.Fprintf(w, "state    complete, built from another Sluice (object %s): rerun install to upgrade in place (a node agent of another build moves it onto its own)\n", s.Object)
	default:
		fmt.Fprintf(w, "state    complete\n")
	}
	fmt.Fprintf(w, "memory   %s locked in the kernel (maps %s, programs %s); %d handshakes pending\n\n", kib(s.Memory.Total()), kib(s.Memory.Maps), kib(s.Memory.Programs), s.Handshakes)
	inbound := printLinks(w, s.Links)
	printPolicy(w, s, inbound)
	if len(s.Counters) > 0 {
		printCounters(w, s.Counters)
	}
}

// printLinks is status's table of links; it says whether one of them
// captures inbound connections.
func printLinks(w io.Writer, links []loader.LinkState) (inbound bool) {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "LINK\tLINK ID\tPROGRAM\tPROG ID\tATTACHED TO")
	for _, l := range links {
		to := fmt.Sprintf("cgroup %d", l.CgroupID)
		if l.NetnsInode != 0 {
			to, inbound = fmt.Sprintf("netns %d (sk_lookup)", l.NetnsInode), true
		}
		if !l.Attached {
			to = "DETACHED"
		}
		fmt.Fprintf(tw, "%s\t%d\t%s\t%d\t%s\n", l.Pin[strings.LastIndex(l.Pin, "/")+1:], l.LinkID, l.Program, l.ProgramID, to)
	}
	tw.Flush()
	return inbound
}

// printPolicy is status's policy: what the install captures and how.
func printPolicy(w io.Writer, s loader.State, inbound bool) {
	c := s.Plan
	fmt.Fprintf(w, "\npolicy\n")
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintf(tw, "  outbound listener\t127.0.0.1:%d, [::1]:%d\n", c.OutboundPort, c.OutboundPort)
	fmt.Fprintf(tw, "  inbound listener\t%d\n", c.InboundPort)
	fmt.Fprintf(tw, "  proxy uid/gid (never captured)\t%d/%d\n", c.ProxyUID, c.ProxyGID)
	fmt.Fprintf(tw, "  flows measured in the kernel\t%s\n", map[bool]string{false: "yes", true: "no (--flows=false)"}[c.NoFlows])
	if !c.NoFlows {
		fmt.Fprintf(tw, "  flow events lost\t%d (the node's ring was full), %d flows untracked (no socket storage)\n",
			s.Counters["flow_event_lost_ring_full"], s.Counters["flow_untracked_no_state"])
	}
	if c.Splice {
		fmt.Fprintf(tw, "  splice app<->sidecar\ton: %d sockets spliced now, room for %d\n", s.SpliceSockets, s.SpliceCapacity)
	} else if s.SpliceSockets > 0 {
		fmt.Fprintf(tw, "  splice app<->sidecar\toff; %d sockets still spliced until they close\n", s.SpliceSockets)
	} else {
		fmt.Fprintf(tw, "  splice app<->sidecar\toff (--splice turns it on)\n")
	}
	fmt.Fprintf(tw, "  outbound CIDRs captured\t%s\n", cidrs(c.IncludeAllCIDRs, c.IncludeCIDRs))
	fmt.Fprintf(tw, "  outbound CIDRs excluded\t%s\n", cidrs(false, c.ExcludeCIDRs))
	fmt.Fprintf(tw, "  outbound ports always captured\t%s\n", ports(false, c.IncludeOutboundPorts))
	fmt.Fprintf(tw, "  outbound ports excluded\t%s\n", ports(false, c.ExcludeOutboundPorts))
	if !inbound {
		fmt.Fprintf(tw, "  inbound capture\tnot installed (install with --netns or --interface)\n")
	}
	fmt.Fprintf(tw, "  inbound ports captured\t%s\n", ports(c.InboundAllPorts, c.InboundPorts))
	fmt.Fprintf(tw, "  inbound ports excluded\t%s\n", ports(false, c.ExcludeInboundPorts))
	fmt.Fprintf(tw, "  kernel-only (no sidecar)\toutbound ports %s; outbound CIDRs %s; inbound ports %s\n",
		ports(false, c.KernelOnlyPorts), cidrs(false, c.KernelOnlyCIDRs), ports(false, c.KernelOnlyInboundPorts))
	fmt.Fprintf(tw, "  offload (sidecar decides, kernel sends)\toutbound ports %s; inbound ports %s; %d connections offloaded now\n",
		ports(false, c.OffloadPorts), ports(false, c.OffloadInboundPorts), s.OffloadConnections)
	tw.Flush()
}

func printCounters(w io.Writer, counters map[string]uint64) {
	fmt.Fprintf(w, "\ncounters (since install)\n")
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	for _, name := range slices.Sorted(maps.Keys(counters)) {
		fmt.Fprintf(tw, "  %s\t%d\n", name, counters[name])
	}
	tw.Flush()
}

func kib(n uint64) string { return fmt.Sprintf("%d KiB", (n+1023)/1024) }

func cidrs(all bool, list []netip.Prefix) string {
	if all {
		return "* (all but loopback)"
	}
	if len(list) == 0 {
		return "none"
	}
	parts := make([]string, len(list))
	for i, p := range list {
		parts[i] = p.String()
	}
	return strings.Join(parts, ", ")
}

// ports prints a port list with runs folded into ranges.
func ports(all bool, list []uint16) string {
	if all {
		return "*"
	}
	if len(list) == 0 {
		return "none"
	}
	var parts []string
	for i := 0; i < len(list); {
		j := i
		for j+1 < len(list) && list[j+1] == list[j]+1 {
			j++
		}
		part := strconv.Itoa(int(list[i]))
		if j > i {
			part += "-" + strconv.Itoa(int(list[j]))
		}
		parts = append(parts, part)
		i = j + 1
	}
	return strings.Join(parts, ", ")
}

// statusAll lists every install on the node.
func statusAll(w io.Writer, asJSON bool) error {
	pods, err := agent.New(agent.Options{PinRoot: loader.DefaultPinRoot, Logger: slog.New(slog.DiscardHandler)}).Pods()
	if err != nil {
		return err
	}
	if asJSON {
		if err := writeJSON(w, pods); err != nil {
			return err
		}
	} else {
		tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "STATE\tPOD UID\tPINS\tCGROUP")
		for _, p := range pods {
			uid := p.UID
			if uid == "" {
				uid = "-"
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", p.State(), uid, p.PinDir, p.Cgroup)
		}
		tw.Flush()
	}
	bad := 0
	for _, p := range pods {
		if p.Gone || !p.Complete {
			bad++
		}
	}
	if bad > 0 {
		return fmt.Errorf("%d of %d installs are incomplete or gone: 'sluice status --cgroup PATH' says what is missing; 'sluice agent --once' collects the gone ones", bad, len(pods))
	}
	return nil
}
