// Command sluice installs eBPF traffic capture into a pod's cgroup, runs the
// sidecar proxy that serves it, and shows what is installed.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
	"unicode"

	"github.com/sluicemesh/sluice/cni"
	"github.com/sluicemesh/sluice/loader"
)

// command is one subcommand: its help text and what it runs.
type command struct {
	name    string
	summary string
	help    string // usage line and examples; the flags are appended
	run     func(ctx context.Context, args []string, stdout io.Writer) error
}

func commands() []command {
	return []command{
		installCommand(),
		istioCommand(),
		linkerdCommand(),
		uninstallCommand(),
		runCommand(),
		statusCommand(),
		flowsCommand(),
		routeCommand(),
		agentCommand(),
		checkCommand(),
		injectCommand(),
		webhookCommand(),
		versionCommand(),
		demoCommand(),
	}
}

// usageError marks bad input (exit 2) as opposed to a failure (exit 1).
type usageError struct{ msg string }

func (e usageError) Error() string { return e.msg }

func main() {
	runDemoHelper()
	// The agent copies this binary into the node's CNI bin directory
	// under the plugin's name, for the container runtime to run.
	if filepath.Base(os.Args[0]) == cni.PluginType {
		os.Exit(runCNI(os.Getenv, os.Stdin, os.Stdout, os.Stderr))
	}
	os.Exit(run(personality(os.Args[0], os.Args[1:]), os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	cmds := commands()
	if len(args) > 0 && wantsVersion(args[:1]) {
		fmt.Fprintln(stdout, thisBuild())
		return 0
	}
	if len(args) == 0 || args[0] == "help" || args[0] == "-h" || args[0] == "--help" {
		printOverview(stdout, cmds)
		if len(args) == 0 {
			return 2
		}
		return 0
	}
	for _, c := range cmds {
		if c.name != args[0] {
			continue
		}
		if wantsVersion(args[1:]) {
			fmt.Fprintln(stdout, thisBuild())
			return 0
		}
		ctx, stop := signalContext()
		defer stop()
		err := c.run(ctx, args[1:], stdout)
		if err == nil || errors.Is(err, flag.ErrHelp) {
			return 0
		}
		fmt.Fprintf(stderr, "sluice %s: %s\n", c.name, oneLine(err))
		if errors.As(err, new(usageError)) {
			return 2
		}
		return 1
	}
	fmt.Fprintf(stderr, "sluice: unknown command %q: run 'sluice help' for the list\n", args[0])
	return 2
}

// signalContext is canceled by the first SIGINT or SIGTERM, which asks the
// command to wind down; a second signal ends the process at once, by the
// signal's default action, as Kubernetes expects after its grace period.
func signalContext() (context.Context, func()) {
	ctx, cancel := context.WithCancel(context.Background())
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM)
	go func() {
		if _, ok := <-sigs; !ok {
			return
		}
		cancel()
		s, ok := <-sigs
		if !ok {
			return
		}
		signal.Reset(s)
		syscall.Kill(os.Getpid(), s.(syscall.Signal))
	}()
	return ctx, func() {
		signal.Stop(sigs)
		close(sigs)
		cancel()
	}
}

// oneLine keeps a failure to one line on the terminal; joined errors (an
// install failure plus its undo) are separated with "; ".
func oneLine(err error) string {
	return strings.ReplaceAll(strings.TrimSpace(err.Error()), "\n", "; ")
}

func printOverview(w io.Writer, cmds []command) {
	fmt.Fprintln(w, "sluice: transparent traffic capture for Kubernetes pods with eBPF, no iptables.")
	fmt.Fprintln(w, "\nUsage: sluice COMMAND [flags]   (sluice COMMAND --help for its flags and examples)\n\nCommands:")
	for _, c := range cmds {
		fmt.Fprintf(w, "  %-14s %s\n", c.name, c.summary)
	}
	fmt.Fprintf(w, "\nKernel: Linux %s or later (tested on Debian's 6.1 and 6.12, and 6.18), with BTF and\n"+
		"cgroup v2. Splice and offload also need sk_psock.msg_tot_len (2026): install refuses\n"+
		"them by name where the kernel lacks it. 'sluice check' prints what this kernel can do.\n", loader.MinimumKernel)
}

// parseFlags parses args into fs, printing help on -h and turning every
// parse problem into a one-line usage error.
func parseFlags(fs *flag.FlagSet, c command, args []string, stdout io.Writer) error {
	fs.SetOutput(io.Discard)
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			printHelp(stdout, fs, c)
			return err
		}
		msg := err.Error()
		if strings.ContainsFunc(msg, unicode.IsControl) {
			// The flag package prints a bad argument as given: a newline in
			// it would split the one-line error.
			msg = strings.Trim(strconv.QuoteToGraphic(msg), `"`)
		}
		if want := wantFor(fs, msg); want != "" {
			msg = strings.TrimSuffix(msg, "parse error") + want
		}
		if name, ok := strings.CutPrefix(msg, "flag provided but not defined: "); ok {
			return usageError{fmt.Sprintf("unknown flag %s: run 'sluice %s --help' for the flags", name, c.name)}
		}
		return usageError{msg + fmt.Sprintf(" (run 'sluice %s --help')", c.name)}
	}
	if fs.NArg() > 0 {
		return usageError{fmt.Sprintf("unexpected argument %q: every option is a flag (run 'sluice %s --help')", fs.Arg(0), c.name)}
	}
	return nil
}

// wantFor says what a flag of a standard type takes, for the flag
// package's bare "invalid value "5" for flag -drain: parse error".
func wantFor(fs *flag.FlagSet, msg string) string {
	_, name, ok := strings.Cut(msg, " for ")
	name, _, _ = strings.Cut(strings.TrimPrefix(strings.TrimPrefix(name, "flag "), "-"), ":")
	f := fs.Lookup(name)
	if !ok || f == nil || !strings.HasSuffix(msg, "parse error") {
		return ""
	}
	getter, ok := f.Value.(flag.Getter)
	if !ok {
		return ""
	}
	switch getter.Get().(type) {
	case bool:
		return "want true or false"
	case time.Duration:
		return "want a duration such as 30s or 1m"
	case int, int64, uint, uint64:
		return "want a whole number"
	case float64:
		return "want a number"
	}
	return ""
}

func printHelp(w io.Writer, fs *flag.FlagSet, c command) {
	fmt.Fprintf(w, "%s\n\nFlags:\n", strings.TrimSpace(c.help))
	fs.SetOutput(w)
	fs.PrintDefaults()
	fs.SetOutput(io.Discard)
}

func requireRoot() error {
	if os.Geteuid() != 0 {
		return errors.New("needs root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN): run it as root, or in a privileged init container")
	}
	return nil
}

func newLogger(w io.Writer, format, level string) (*slog.Logger, error) {
	var lvl slog.Level
	if err := lvl.UnmarshalText([]byte(level)); err != nil {
		return nil, usageError{fmt.Sprintf("log level %q: want debug, info, warn or error", level)}
	}
	opts := &slog.HandlerOptions{Level: lvl}
	switch format {
	case "text":
		return slog.New(slog.NewTextHandler(w, opts)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(w, opts)), nil
	}
	return nil, usageError{fmt.Sprintf("log format %q: want text or json", format)}
}

// writeJSON is every command's --json output: v indented, one document.
func writeJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}
