package main

import (
	"strings"
	"testing"

	"github.com/sluicemesh/sluice/internal/testbed"
)

// --help of every command prints its usage and exits 0, with no panic.
func TestHelpOfEveryCommand(t *testing.T) {
	for _, c := range commands() {
		for _, flag := range []string{"--help", "-h"} {
			res := testbed.Run(t, sluice(t, c.name, flag))
			out := res.Stdout + res.Stderr
			if res.Code != 0 || !strings.Contains(res.Stdout, "Usage: sluice "+c.name) || strings.Contains(out, "panic") {
				t.Errorf("sluice %s %s: exit %d\n%s", c.name, flag, res.Code, out)
			}
		}
	}
	if res := testbed.Run(t, sluice(t, "--help")); res.Code != 0 || !strings.Contains(res.Stdout, "Commands:") {
		t.Errorf("sluice --help: exit %d\n%s%s", res.Code, res.Stdout, res.Stderr)
	}
}
