//go:build !demo

package main

import (
	"context"
	"flag"
	"io"
)

// The shipped binary holds no test bed: no throwaway pods, no helper roles an
// environment variable could switch on. `make demo` builds one that does.
func runDemoHelper() {}

func demoCommand() command {
	c := command{
		name:    "demo",
		summary: "not in this build: 'make demo' builds and runs it",
		help: `Usage: sluice demo

This binary was built without the demo and its test bed. Run 'make demo':
it builds bin/sluice-demo (go build -tags demo ./cmd/sluice) and runs
'sluice-demo demo'.`,
	}
	c.run = func(ctx context.Context, args []string, stdout io.Writer) error {
		if err := parseFlags(flag.NewFlagSet("demo", flag.ContinueOnError), c, args, stdout); err != nil {
			return err
		}
		return usageError{"this sluice was built without the demo: run 'make demo' (it builds bin/sluice-demo with -tags demo)"}
	}
	return c
}
