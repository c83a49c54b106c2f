package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"

	"github.com/sluicemesh/sluice/loader"
	"github.com/sluicemesh/sluice/telemetry"
)

func checkCommand() command {
	c := command{
		name:    "check",
		summary: "probe the kernel for everything Sluice needs",
		help: `Usage: sluice check [--json]

Prints what this kernel can do, a line a capability: outbound capture with
SO_ORIGINAL_DST, inbound capture (sk_lookup), fail-closed inbound, IPv6,
flows, routes, kernel-only, splice, offload, MPTCP; each available or not,
the Linux version that brought what it needs, and what it needs or why it
is not available. Under them, how many of the probes passed: program types,
map types and helpers, cgroup v2, a real load of the programs through the
verifier, a real attach to a throwaway cgroup and network namespace, and
sockets of each kind; --json lists every probe. Exits 1 only when the core
(outbound, SO_ORIGINAL_DST, inbound) cannot work; install refuses a flag
asking for an optional capability the kernel lacks, naming it. Sluice
needs Linux 6.1 or later.

Example:
  sluice check`,
	}
	c.run = func(ctx context.Context, args []string, stdout io.Writer) error {
		fs := flag.NewFlagSet("check", flag.ContinueOnError)
		asJSON := fs.Bool("json", false, "print JSON")
		if err := parseFlags(fs, c, args, stdout); err != nil {
			return err
		}
		if err := requireRoot(); err != nil {
			return err
		}
		report := loader.Check(loader.NewProbe(loader.ProbeSockDiag, telemetry.CheckSockDiag()))
		if *asJSON {
			if err := writeJSON(stdout, report); err != nil {
				return err
			}
		} else {
			printReport(stdout, report)
		}
		if missing := report.CoreMissing(); len(missing) > 0 {
			return fmt.Errorf("this kernel (%s) cannot run Sluice: it lacks %s; Sluice needs Linux %s or later", report.Kernel, strings.Join(missing, ", "), loader.MinimumKernel)
		}
		return nil
	}
	return c
}

// printReport writes the capability table, then the probes behind it.
func printReport(w io.Writer, r loader.Report) {
	fmt.Fprintf(w, "Linux %s (Sluice needs %s or later)\n\n", r.Kernel, loader.MinimumKernel)
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "CAPABILITY\tAVAILABLE\tLINUX\tWHAT IT NEEDS, OR WHY NOT")
	for _, c := range r.Capabilities {
		avail, detail := "yes", c.Needs
		switch {
		case !c.Available && c.Core:
			avail, detail = "NO (core)", c.Why
		case !c.Available:
			avail, detail = "no", c.Why
			if c.Flag != "" {
				detail += "; install refuses " + c.Flag + ", the rest works"
			}
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", c.Name, avail, c.Since, detail)
	}
	tw.Flush()
	var failed []loader.Probe
	for _, p := range r.Probes {
		if p.Err != nil {
			failed = append(failed, p)
		}
	}
	fmt.Fprintf(w, "\n%d of %d probes passed (--json lists each)\n", len(r.Probes)-len(failed), len(r.Probes))
	for _, p := range failed {
		fmt.Fprintf(w, "  failed: %s: %s\n", p.Name, p.Error)
	}
}
