package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"net/netip"
	"os"
	"strings"
	"time"

	"github.com/sluicemesh/sluice/loader"
	"github.com/sluicemesh/sluice/rollout"
	"github.com/sluicemesh/sluice/rollout/plant"
)

func rolloutCommand(ctx context.Context, fs *flag.FlagSet, c command, args []string, target func() (loader.Target, error), stdout io.Writer) error {
	to := fs.String("to", "", "the canary backend, ADDRESS:PORT")
	step := fs.Uint("step", 10, "percent of new connections moved to the canary per step")
	interval := fs.Duration("interval", 30*time.Second, "how long each step runs before it is judged")
	maxFail := fs.Float64("max-connect-failure-ratio", 0.05, "how much higher the canary's share of failed connects may be than the stable backend's")
	maxLat := fs.Duration("max-connect-latency", 50*time.Millisecond, "how much slower the canary's mean connect latency may be than the stable backend's")
	minConnects := fs.Uint64("min-connects", 1, "connects to the canary a step needs before it is judged")
	maxWait := fs.Duration("max-wait", 0, "how long a step may run on waiting for --min-connects before the rollout rolls back (default 5 intervals)")
	metrics := fs.String("metrics", "http://127.0.0.1:9102", "the node agent's address (sluice agent --metrics-addr), where the pod's measurements come from")
	if err := parseInterspersed(fs, c, args, stdout); err != nil {
		return err
	}
	svc, err := serviceArg(fs)
	if err != nil {
		return err
	}
	cfg := rollout.Config{Service: svc, Step: uint32(min(*step, math.MaxUint32)), Interval: *interval, MaxFailureRatio: *maxFail, MaxLatency: *maxLat,
		MinConnects: *minConnects, MaxWait: *maxWait}
	if *to != "" {
		if cfg.Canary, err = netip.ParseAddrPort(*to); err != nil {
			return usageError{fmt.Sprintf("--to %q: want the canary's ADDRESS:PORT", *to)}
		}
	}
	if err := cfg.Validate(); err != nil {
		return usageError{err.Error()}
	}
	t, err := target()
	if err != nil {
		return err
	}
	if !strings.Contains(*metrics, "://") {
		*metrics = "http://" + *metrics
	}
	log, _ := newLogger(os.Stderr, "text", "info")
	err = rollout.Run(ctx, cfg, plant.New(t, svc, cfg.Canary, *metrics), log)
	if errors.Is(err, context.Canceled) {
		return fmt.Errorf("rollout of %s interrupted: the weights stay where they were (see 'sluice route list')", svc)
	}
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "rollout of %s to %s done: the canary takes every new connection\n", svc, cfg.Canary)
	return nil
}
