#!/usr/bin/env bash
# Runs BenchmarkOutbound (cmd/sluice/bench_test.go) and prints its ratios:
# an app's outbound TCP captured by Sluice, behind iptables REDIRECT with the
# same sidecar, and direct, all measured in one run.
#
# Needs root: the benchmark builds its own test bed (network namespaces, veths,
# cgroups under the cgroup2 mount) and removes it again. All traffic stays in
# those namespaces, on 198.18.0.0/15 and 2001:2::/48; the iptables rules are
# written in the benchmark pod's namespace only, never the root one.
#
# Usage: scripts/bench.sh [extra go test flags, e.g. -v]
#   BENCH_CPUS=0 scripts/bench.sh   runs everything on the listed CPUs (taskset -c):
#   with app, sidecar and echo server on one CPU the latencies stop depending
#   on cross-CPU wake-ups, which on a small VM makes p50 and p99 bimodal.
set -euo pipefail

cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then
  echo "bench.sh: run as root (the benchmark builds network namespaces and cgroups)" >&2
  exit 1
fi

out=$(mktemp)
trap 'rm -f "$out"' EXIT

run=(go test ./cmd/sluice -run '^$' -bench BenchmarkOutbound -benchtime 1x -count 1 "$@")
if [ -n "${BENCH_CPUS:-}" ]; then
  run=(taskset -c "$BENCH_CPUS" "${run[@]}")
fi
"${run[@]}" 2>&1 | tee "$out"

# A result line: BenchmarkOutbound/<setup>[-GOMAXPROCS] N (value unit)...
awk '
  /^BenchmarkOutbound\// {
    setup = $1
    sub(/^BenchmarkOutbound\//, "", setup)
    sub(/-[0-9]+$/, "", setup)
    for (i = 3; i < NF; i += 2) v[setup, $(i + 1)] = $i
    n++
  }
  function cell(setup, unit) {
    return ((setup, unit) in v) ? sprintf("%.2f", v[setup, unit]) : "-"
  }
  END {
    if (n == 0) { print "bench.sh: no BenchmarkOutbound results in the output" > "/dev/stderr"; exit 1 }
    split("conn/s p50 p99 MB/s", m, " ")
    better["conn/s"] = "higher"; better["p50"] = "lower"; better["p99"] = "lower"; better["MB/s"] = "higher"
    label["conn/s"] = "conn/s"; label["p50"] = "p50 RTT"; label["p99"] = "p99 RTT"; label["MB/s"] = "bulk MB/s"
    print ""
    print "Ratios (same run; 1.00 = equal)"
    printf "%-10s %14s %16s %16s %19s  %s\n", "metric", "sluice/direct", "iptables/direct", "sluice/iptables", "telemetry on/off", "better"
    for (k = 1; k <= 4; k++) {
      u = m[k]
      printf "%-10s %14s %16s %16s %19s  %s\n", label[u], cell("sluice", u "_vs_direct"),
        cell("iptables", u "_vs_direct"), cell("sluice", u "_vs_iptables"), cell("sluice", u "_vs_noflows"), better[u]
    }
    abs["conn/s"] = "conn/s_absolute"; abs["p50"] = "p50_us_absolute"; abs["p99"] = "p99_us_absolute"; abs["MB/s"] = "MB/s_absolute"
    unit["conn/s"] = "conn/s"; unit["p50"] = "us"; unit["p99"] = "us"; unit["MB/s"] = "MB/s"
    print ""
    print "Absolute figures behind them (this machine only)"
    printf "%-10s %12s %12s %15s %12s  %s\n", "metric", "direct", "iptables", "sluice-noflows", "sluice", "unit"
    for (k = 1; k <= 4; k++) {
      u = m[k]
      printf "%-10s %12s %12s %15s %12s  %s\n", label[u], cell("direct", abs[u]), cell("iptables", abs[u]), cell("sluice-noflows", abs[u]), cell("sluice", abs[u]), unit[u]
    }
  }
' "$out"
