// Command gen writes Sluice's Grafana dashboard to the file it is given.
package main

import (
	"fmt"
	"os"

	"github.com/sluicemesh/sluice/telemetry/dashboard"
)

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: gen FILE")
		os.Exit(2)
	}
	data, err := dashboard.JSON()
	if err == nil {
		err = os.WriteFile(os.Args[1], data, 0o644)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "gen: %v\n", err)
		os.Exit(1)
	}
}
