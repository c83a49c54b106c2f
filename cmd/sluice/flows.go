package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/sluicemesh/sluice/telemetry"
)

func flowsCommand() command {
	c := command{
		name:    "flows",
		summary: "show a pod's flows: open ones, or each as it opens and closes",
		help: `Usage: sluice flows [--addr URL] [--pod UID|CGROUP] [--json | --follow | --watch]

Asks the node's agent ('sluice agent', which exports the flows the kernel
measures for every pod of the node) for one pod's flows: by default the
open ones as a table (direction, source, destination, original
destination, whether the sidecar carries it, state, age, smoothed RTT,
bytes each way). Run it where the agent's port is reachable, e.g. in the
agent's pod ('kubectl exec -n sluice-system AGENT -- sluice flows --pod UID').
--pod may be left out on a node with one pod.

Examples:
  sluice flows --pod 3f2a8c1e-5b7d-4e0a-9c6f-1d2e3f4a5b6c
  sluice flows --pod /sys/fs/cgroup/kubepods/pod3f2a8c1e... --json | jq '.[] | select(.direction == "inbound")'
  sluice flows --follow            # every flow as it opens and closes, like 'hubble observe'
  sluice flows --watch             # a top-like view, redrawn every second`,
	}
	c.run = func(ctx context.Context, args []string, stdout io.Writer) error {
		fs := flag.NewFlagSet("flows", flag.ContinueOnError)
		addr := fs.String("addr", "http://127.0.0.1:9102", "the agent's address (sluice agent --metrics-addr)")
		pod := fs.String("pod", "", "the pod: its Kubernetes uid, cgroup path or cgroup id (default: the node's only pod)")
		asJSON := fs.Bool("json", false, "print the open flows as JSON")
		follow := fs.Bool("follow", false, "print each flow as it opens, closes or fails, until interrupted")
		watch := fs.Bool("watch", false, "redraw the open flows every --interval, until interrupted")
		interval := fs.Duration("interval", time.Second, "how often --watch redraws")
		if err := parseFlags(fs, c, args, stdout); err != nil {
			return err
		}
		if *interval <= 0 {
			return usageError{fmt.Sprintf("--interval %s: want a positive duration, e.g. 1s", *interval)}
		}
		if !strings.Contains(*addr, "://") {
			*addr = "http://" + *addr
		}
		switch {
		case *follow:
			return followFlows(ctx, *addr, *pod, *asJSON, stdout)
		case *watch:
			return watchFlows(ctx, *addr, *pod, *interval, stdout)
		}
		flows, err := getFlows(ctx, *addr, *pod)
		if err != nil {
			return err
		}
		if *asJSON {
			return writeJSON(stdout, flows)
		}
		printFlows(stdout, flows)
		return nil
	}
	return c
}

func getFlows(ctx context.Context, addr, pod string) ([]telemetry.Flow, error) {
	flows, err := telemetry.FetchFlows(ctx, addr, pod)
	return flows, badAddr(err)
}

// badAddr makes an --addr no request can be made to a usage error; other
// errors stay as they are.
func badAddr(err error) error {
	if ae := new(telemetry.AddrError); errors.As(err, &ae) {
		return usageError{fmt.Sprintf("--addr %q: %v: want the agent's address, e.g. http://127.0.0.1:9102", ae.Addr, ae.Err)}
	}
	return err
}

func printFlows(w io.Writer, flows []telemetry.Flow) {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "DIRECTION\tSOURCE\tDESTINATION\tORIGINAL DST\tVIA SIDECAR\tSTATE\tAGE\tSRTT\tSENT\tRECEIVED")
	for _, f := range flows {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", f.Direction, f.Source, f.Destination, f.OriginalDst,
			via(f), f.State, seconds(f.Duration), seconds(f.SRTT), bytesOf(f.BytesSent), bytesOf(f.BytesReceived))
	}
	tw.Flush()
}

func followFlows(ctx context.Context, addr, pod string, asJSON bool, w io.Writer) error {
	stream, err := telemetry.FollowFlows(ctx, addr, pod)
	if err != nil {
		return badAddr(err)
	}
	defer stream.Close()
	if !asJSON {
		fmt.Fprintln(w, "TIME          EVENT   DIRECTION  SOURCE -> DESTINATION (ORIGINAL DST)  VIA  DURATION  SRTT  SENT  RECEIVED  END")
	}
	for stream.Next() {
		if asJSON {
			fmt.Fprintln(w, string(stream.Bytes()))
			continue
		}
		f, err := stream.Flow()
		if err != nil {
			return err
		}
		fmt.Fprintf(w, "%s  %-6s  %-9s  %s -> %s (%s)  %s  %s  %s  %s  %s  %s\n", time.Now().Format("15:04:05.000"), f.State, f.Direction,
			f.Source, f.Destination, f.OriginalDst, via(f), seconds(f.Duration), seconds(f.SRTT),
			bytesOf(f.BytesSent), bytesOf(f.BytesReceived), orDash(f.End))
	}
	return stream.Err()
}

func watchFlows(ctx context.Context, addr, pod string, every time.Duration, w io.Writer) error {
	tick := time.NewTicker(every)
	defer tick.Stop()
	for {
		flows, err := getFlows(ctx, addr, pod)
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return err
		}
		// Clear the screen and home the cursor, then draw.
		fmt.Fprintf(w, "\033[H\033[2J%s  %d open flows  (sluice flows --watch, every %s; Ctrl-C ends)\n\n", time.Now().Format("15:04:05"), len(flows), every)
		printFlows(w, flows)
		select {
		case <-ctx.Done():
			return nil
		case <-tick.C:
		}
	}
}

// via says how a flow is carried: through the sidecar, with no sidecar by
// kernel-only policy, or not captured at all.
func via(f telemetry.Flow) string {
	switch {
	case f.ViaSidecar:
		return "yes"
	case f.KernelOnly:
		return "kernel-only"
	}
	return "no"
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func seconds(s float64) string {
	switch {
	case s == 0:
		return "-"
	case s < 1e-3:
		return fmt.Sprintf("%.0fµs", s*1e6)
	case s < 1:
		return fmt.Sprintf("%.1fms", s*1e3)
	}
	return (time.Duration(s * float64(time.Second))).Round(time.Second).String()
}

func bytesOf(n uint64) string {
	switch {
	case n >= 1<<30:
		return fmt.Sprintf("%.1fGiB", float64(n)/(1<<30))
	case n >= 1<<20:
		return fmt.Sprintf("%.1fMiB", float64(n)/(1<<20))
	case n >= 1<<10:
		return fmt.Sprintf("%.1fKiB", float64(n)/(1<<10))
	}
	return fmt.Sprintf("%dB", n)
}
