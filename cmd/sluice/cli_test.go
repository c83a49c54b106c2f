package main

import (
	"encoding/json"
	"strings"
	"testing"

	"github.com/sluicemesh/sluice/bpf"
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

// Every command given --version alone prints the build, the BPF object's
// hash included, and exits 0; sluice version --json says the same.
func TestVersionOfEveryCommand(t *testing.T) {
	want := "bpf object " + bpf.ObjectHash()
	for _, args := range [][]string{{"--version"}, {"-version"}, {"version"}} {
		if res := testbed.Run(t, sluice(t, args...)); res.Code != 0 || !strings.Contains(res.Stdout, want) {
			t.Errorf("sluice %v: exit %d\n%s%s", args, res.Code, res.Stdout, res.Stderr)
		}
	}
	for _, c := range commands() {
		res := testbed.Run(t, sluice(t, c.name, "--version"))
		if res.Code != 0 || !strings.HasPrefix(res.Stdout, "sluice ") || !strings.Contains(res.Stdout, want) {
			t.Errorf("sluice %s --version: exit %d\n%s%s", c.name, res.Code, res.Stdout, res.Stderr)
		}
	}
	res := testbed.Run(t, sluice(t, "version", "--json"))
	var b buildInfo
	if err := json.Unmarshal([]byte(res.Stdout), &b); err != nil || b.Object != bpf.ObjectHash() || b.Version == "" || b.Go == "" {
		t.Errorf("sluice version --json: %+v (%v)\n%s", b, err, res.Stdout)
	}
	if res := testbed.Run(t, sluice(t, "nosuch", "--version")); res.Code != 2 {
		t.Errorf("sluice nosuch --version: exit %d, want 2 (unknown command)", res.Code)
	}
}
