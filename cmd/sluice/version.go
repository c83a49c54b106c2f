package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"runtime"
	"runtime/debug"

	"github.com/sluicemesh/sluice/bpf"
)

// version is the release and commit the commit, set at link time
// (-ldflags '-X main.version=v1.2.3 -X main.commit=...': make build sets
// the commit, with -modified for a tree with changes); without them, what
// Go stamped in the binary (the module's version, "(devel)" in a checkout,
// and its VCS revision unless built with -buildvcs=false).
var version, commit string

// buildInfo is what identifies this build: what a bug report needs, and
// what tells two nodes' agents apart.
type buildInfo struct {
	Version string `json:"version"`
	Commit  string `json:"commit,omitempty"` // with -modified: built from a tree with changes
	Object  string `json:"bpf_object"`       // bpf.ObjectHash: builds with one share node state
	Go      string `json:"go"`
}

func thisBuild() buildInfo {
	b := buildInfo{Version: version, Commit: commit, Object: bpf.ObjectHash(), Go: runtime.Version()}
	if info, ok := debug.ReadBuildInfo(); ok {
		if b.Version == "" {
			b.Version = info.Main.Version
		}
		var modified bool
		for _, s := range info.Settings {
			switch s.Key {
			case "vcs.revision":
				if b.Commit == "" {
					b.Commit = s.Value
				}
			case "vcs.modified":
				modified = s.Value == "true"
			}
		}
		if modified && commit == "" {
			b.Commit += "-modified"
		}
	}
	if b.Version == "" {
		b.Version = "(unknown)"
	}
	return b
}

func (b buildInfo) String() string {
	s := "sluice " + b.Version
	if b.Commit != "" {
		s += ", commit " + b.Commit
	}
	return s + ", bpf object " + b.Object + ", " + b.Go
}

// wantsVersion is a command given --version alone: it prints the build
// instead of running. Alone, since install's --version takes a value (the
// pod's version label).
func wantsVersion(args []string) bool {
	return len(args) == 1 && (args[0] == "--version" || args[0] == "-version")
}

func versionCommand() command {
	c := command{
		name:    "version",
		summary: "print this build: version, commit, BPF object, Go (also: sluice COMMAND --version)",
		help: `Usage: sluice version [--json]

Prints the build: its version, the commit it was built from (and whether
the tree had changes), the hash of the BPF object it loads (builds with the
same hash share a node's programs; another makes the agent upgrade pods)
and the Go release. Every command prints the same given --version alone.

Example:
  sluice version`,
	}
	c.run = func(ctx context.Context, args []string, stdout io.Writer) error {
		fs := flag.NewFlagSet("version", flag.ContinueOnError)
		asJSON := fs.Bool("json", false, "print JSON")
		if err := parseFlags(fs, c, args, stdout); err != nil {
			return err
		}
		if *asJSON {
			return writeJSON(stdout, thisBuild())
		}
		_, err := fmt.Fprintln(stdout, thisBuild())
		return err
	}
	return c
}
