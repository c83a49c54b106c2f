package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/sluicemesh/sluice/telemetry"
)

func flowsCommand() command {
	c := command{
		name:    "flows",
		summary: "show a pod's flows: open ones, or each as it opens and closes",
		help: `Usage: sluice flows [--addr URL] [--json | --follow | --watch]

Asks the pod's sidecar ('sluice run --cgroup ...', which exports the flows
the kernel measures) for its flows: by default the open ones as a table
(direction, source, destination, original destination, whether the sidecar
carries it, state, age, smoothed RTT, bytes each way). Run it where the
sidecar's metrics port is reachable, e.g. inside the pod
('kubectl exec POD -c sidecar -- sluice flows').

Examples:
  sluice flows
  sluice flows --json | jq '.[] | select(.direction == "inbound")'
  sluice flows --follow            # every flow as it opens and closes, like 'hubble observe'
  sluice flows --watch             # a top-like view, redrawn every second`,
	}
	c.run = func(ctx context.Context, args []string, stdout io.Writer) error {
		fs := flag.NewFlagSet("flows", flag.ContinueOnError)
		addr := fs.String("addr", "http://127.0.0.1:15090", "the sidecar's metrics address (sluice run --metrics-addr)")
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
			return followFlows(ctx, *addr, *asJSON, stdout)
		case *watch:
			return watchFlows(ctx, *addr, *interval, stdout)
		}
		flows, err := getFlows(ctx, *addr)
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

func getFlows(ctx context.Context, addr string) ([]telemetry.Flow, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, addr+"/flows", nil)
	if err != nil {
		return nil, badAddr(addr, err)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, fmt.Errorf("ask the sidecar at %s for its flows (is 'sluice run --cgroup' running there? see --addr): %w", addr, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("the sidecar at %s answered %s: is it a Sluice sidecar started with --cgroup?", addr, resp.Status)
	}
	var flows []telemetry.Flow
	if err := json.NewDecoder(resp.Body).Decode(&flows); err != nil {
		return nil, fmt.Errorf("read flows from %s: %w", addr, err)
	}
	return flows, nil
}

// badAddr names the problem with --addr, without the /flows path that
// net/url's error quotes.
func badAddr(addr string, err error) error {
	if ue := new(url.Error); errors.As(err, &ue) {
		err = ue.Err
	}
	return usageError{fmt.Sprintf("--addr %q: %v: want the sidecar's metrics address, e.g. http://127.0.0.1:15090", addr, err)}
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

func followFlows(ctx context.Context, addr string, asJSON bool, w io.Writer) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, addr+"/flows?follow=true", nil)
	if err != nil {
		return badAddr(addr, err)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return fmt.Errorf("follow the sidecar's flows at %s (is 'sluice run --cgroup' running there? see --addr): %w", addr, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		body, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		return fmt.Errorf("follow the sidecar's flows at %s: %s: %s", addr, resp.Status, strings.TrimSpace(string(body)))
	}
	if !asJSON {
		fmt.Fprintln(w, "TIME          EVENT   DIRECTION  SOURCE -> DESTINATION (ORIGINAL DST)  VIA  DURATION  SRTT  SENT  RECEIVED  END")
	}
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		if asJSON {
			fmt.Fprintln(w, sc.Text())
			continue
		}
		var f telemetry.Flow
		if err := json.Unmarshal(sc.Bytes(), &f); err != nil {
			return fmt.Errorf("read flow from %s: %w", addr, err)
		}
		fmt.Fprintf(w, "%s  %-6s  %-9s  %s -> %s (%s)  %s  %s  %s  %s  %s  %s\n", time.Now().Format("15:04:05.000"), f.State, f.Direction,
			f.Source, f.Destination, f.OriginalDst, via(f), seconds(f.Duration), seconds(f.SRTT),
			bytesOf(f.BytesSent), bytesOf(f.BytesReceived), orDash(f.End))
	}
	if ctx.Err() != nil {
		return nil
	}
	if err := sc.Err(); err != nil {
		return fmt.Errorf("follow the sidecar's flows at %s: %w", addr, err)
	}
	return fmt.Errorf("the sidecar at %s ended the flows stream: it stopped, or dropped this follower for reading too slowly", addr)
}

func watchFlows(ctx context.Context, addr string, every time.Duration, w io.Writer) error {
	tick := time.NewTicker(every)
	defer tick.Stop()
	for {
		flows, err := getFlows(ctx, addr)
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
