package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"text/tabwriter"

	"github.com/sluicemesh/sluice/loader"
)

func checkCommand() command {
	c := command{
		name:    "check",
		summary: "probe the kernel for everything Sluice needs",
		help: `Usage: sluice check [--json]

Probes program types, map types, helpers, cgroup v2, a real load of the
programs through the verifier and a real attach to a throwaway cgroup,
then what optional features need (splice and offload: a kernel that counts
spliced bytes). Exits 1 and names what is missing when anything the core
needs is; an optional feature missing is said, and install refuses it.

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
		probes := loader.Check()
		var missing []string
		for _, p := range probes {
			if p.Err != nil && !p.Optional {
				missing = append(missing, p.Name)
			}
		}
		if *asJSON {
			if err := writeJSON(stdout, probes); err != nil {
				return err
			}
		} else {
			tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "CAPABILITY\tRESULT")
			for _, p := range probes {
				result := "ok"
				switch {
				case p.Err != nil && p.Optional:
					result = "not available (the rest works): " + p.Error
				case p.Err != nil:
					result = "MISSING: " + p.Error
				}
				fmt.Fprintf(tw, "%s\t%s\n", p.Name, result)
			}
			tw.Flush()
		}
		if len(missing) > 0 {
			return fmt.Errorf("this kernel lacks %d of %d capabilities: %v", len(missing), len(probes), missing)
		}
		return nil
	}
	return c
}
