package redirect

import (
	"errors"
	"flag"
	"fmt"
	"strings"
	"time"

	"github.com/spf13/pflag"
)

// Invocation is what a mesh's init-container command line asks for, in
// Sluice's terms: a capture policy plus what to do with it. ParseIstio and
// ParseLinkerd build one from istio-iptables' and proxy-init's own flag
// sets, so a mesh's injection template works with the image swapped and its
// arguments kept.
type Invocation struct {
	Policy Policy
	// Netns is the pod's network namespace (--network-namespace, --netns);
	// empty: the one the command runs in.
	Netns string
	// DryRun prints the plan and changes nothing (-n, --simulate).
	DryRun bool
	// Validate proves capture end to end after installing
	// (--run-validation); SkipApply validates only (--skip-rule-apply).
	Validate     bool
	SkipApply    bool
	ProbePort    uint16
	ProbeTimeout time.Duration
	// Cleanup removes the pod's capture instead (--cleanup-only).
	Cleanup bool
	// LogLevel is a slog level name; LogJSON selects JSON output.
	LogLevel string
	LogJSON  bool
	// Ignored lists the flags given that have no meaning for eBPF capture
	// (iptables binaries, locks, conntrack), for the caller to log.
	Ignored []string
}

// Validation defaults, as istio-iptables has them.
const (
	DefaultProbePort    = 15002
	DefaultProbeTimeout = 5 * time.Second
)

// unsupported names a flag Sluice cannot honour yet. It is refused
// rather than ignored: the pod would otherwise run with a policy other than
// the one its template states.
func unsupported(flagName, why string) error {
	return fmt.Errorf("%s is not supported by Sluice: %s", flagName, why)
}

// pvalue adapts a standard flag.Value to pflag, which also wants a type name
// for its help text.
type pvalue struct {
	flag.Value
	typ string
}

func (v pvalue) Type() string { return v.typ }

// appendValue accumulates comma-separated items over repeated flags, as
// pflag's StringSlice does: the first use replaces the default, later ones
// append.
type appendValue struct {
	items   []string
	changed bool
	set     func(string) error
}

func (a *appendValue) String() string { return "[" + strings.Join(a.items, ",") + "]" }
func (a *appendValue) Type() string   { return "strings" }
func (a *appendValue) Set(s string) error {
	if !a.changed {
		a.items, a.changed = nil, true
	}
	a.items = append(a.items, s)
	return a.set(strings.Join(a.items, ","))
}

// parseWith parses args with fs, in the way both tools' cobra commands do,
// and returns a one-line error naming the tool on bad input.
func parseWith(tool string, fs *pflag.FlagSet, args []string) error {
	fs.SetOutput(discard{})
	fs.SortFlags = false
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, pflag.ErrHelp) {
			return HelpError{fs.FlagUsages()}
		}
		return fmt.Errorf("%v (run 'sluice %s --help' for its flags)", err, tool)
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected argument %q: %s takes flags only", fs.Arg(0), tool)
	}
	return nil
}

// HelpError is returned for -h and --help; Usage lists the tool's flags.
type HelpError struct{ Usage string }

func (HelpError) Error() string { return "help requested" }

type discard struct{}

func (discard) Write(p []byte) (int, error) { return len(p), nil }

// noted returns the names of the flags in names that were given on the
// command line.
func noted(fs *pflag.FlagSet, names ...string) []string {
	var out []string
	for _, n := range names {
		if f := fs.Lookup(n); f != nil && f.Changed {
			out = append(out, "--"+n+"="+f.Value.String())
		}
	}
	return out
}
