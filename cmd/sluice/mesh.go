package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	"github.com/sluicemesh/sluice/redirect"
)

// meshCommand is a drop-in for a mesh's init-container tool: the same flags,
// environment, meanings and defaults, installing Sluice's capture instead of
// iptables rules. A mesh's injection template works with the image swapped
// and its arguments kept.
func meshCommand(tool, summary, help string, parse func([]string) (redirect.Invocation, error)) command {
	c := command{name: tool, summary: summary, help: help}
	c.run = func(ctx context.Context, args []string, stdout io.Writer) error {
		inv, err := parse(args)
		var h redirect.HelpError
		if errors.As(err, &h) {
			fmt.Fprintf(stdout, "%s\n\nFlags:\n%s", strings.TrimSpace(c.help), h.Usage)
			return nil
		}
		if err != nil {
			return usageError{err.Error()}
		}
		level := inv.LogLevel
		format := "text"
		if inv.LogJSON {
			format = "json"
		}
		log, err := newLogger(os.Stderr, format, level)
		if err != nil {
			return err
		}
		for _, f := range inv.Ignored {
			log.Info("flag accepted with no effect: Sluice writes no iptables rules and uses no conntrack", "tool", tool, "flag", f)
		}
		return installPod(ctx, installRequest{
			netns:        inv.Netns,
			policy:       inv.Policy,
			dryRun:       inv.DryRun,
			validate:     inv.Validate,
			skipApply:    inv.SkipApply,
			cleanup:      inv.Cleanup,
			probePort:    inv.ProbePort,
			probeTimeout: inv.ProbeTimeout,
			log:          log,
			cmdline:      append([]string{tool}, args...),
		}, stdout)
	}
	return c
}

func istioCommand() command {
	return meshCommand("istio-iptables", "drop-in for Istio's init container: its flags and environment, installing Sluice",
		`Usage: sluice istio-iptables [istio-iptables flags]   (or a link named istio-iptables)

Takes istio-iptables' complete flag set and environment variables with their
meanings and defaults (-p is the outbound port, nothing is captured that -i
and -b do not name, -g defaults to -u), and installs Sluice's capture into
the pod it runs in (or --network-namespace's). --run-validation probes
capture afterwards; --skip-rule-apply with it only probes; --cleanup-only
removes the capture; -n prints the plan. Flags with no meaning without
iptables (--cni-mode, --drop-invalid, --native-nftables, ...) are accepted
and logged; -m TPROXY, --redirect-dns (ISTIO_META_DNS_CAPTURE), -k and -c are
refused.

Example (what Istio's injector runs):
  sluice istio-iptables -p 15001 -z 15006 -u 1337 -m REDIRECT -i '*' -x "" -b '*' -d 15090,15021,15020`,
		func(args []string) (redirect.Invocation, error) { return redirect.ParseIstio(args, os.LookupEnv) })
}

func linkerdCommand() command {
	return meshCommand("proxy-init", "drop-in for Linkerd's init container: its flags, installing Sluice",
		`Usage: sluice proxy-init [proxy-init flags]   (or a link named proxy-init)

Takes Linkerd proxy-init's complete flag set with its meanings and defaults
(-p is the INCOMING port and -o the outgoing one, the opposite of Istio's;
every outbound destination and every inbound port but the ignored ones are
captured) and installs Sluice's capture into the pod it runs in (or --netns's).
--simulate prints the plan. Flags with no meaning without iptables
(--firewall-bin-path, --iptables-mode, -w, --timeout-close-wait-secs) are
accepted and logged; --subnets-to-ignore is refused.

Example (what Linkerd's injector runs):
  sluice proxy-init --incoming-proxy-port 4143 --outgoing-proxy-port 4140 --proxy-uid 2102 \
    --inbound-ports-to-ignore 4190,4191,4567,4568 --outbound-ports-to-ignore 4567,4568 \
    --firewall-bin-path iptables-nft --ipv6=false`,
		redirect.ParseLinkerd)
}

// personality maps a binary invoked as istio-iptables or proxy-init (a link
// to sluice, as a mesh's image would name it) to that subcommand.
func personality(argv0 string, args []string) []string {
	switch name := filepath.Base(argv0); name {
	case "istio-iptables", "proxy-init":
		return append([]string{name}, args...)
	}
	return args
}
