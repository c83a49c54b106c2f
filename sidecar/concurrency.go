package sidecar

import (
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// DefaultConcurrency is how many event loops a sidecar runs when neither
// --concurrency nor a CPU limit says: Istio's default for Envoy. A sidecar
// is in every pod, and one loop per node CPU in each (64 on a 64-CPU node)
// would be most of a node's threads for a pod's few connections.
const DefaultConcurrency = 2

// concurrency is how many event loops the proxy runs, and what decided it:
// --concurrency when given (above 0), else the container's CPU limit
// rounded up (a loop is a thread that never sleeps while it has work: more
// than the limit would only be throttled), else DefaultConcurrency.
func concurrency(flag int, cpuLimit float64) (loops int, from string) {
	switch {
	case flag > 0:
		return flag, "--concurrency"
	case cpuLimit > 0:
		return int(math.Ceil(cpuLimit)), fmt.Sprintf("the container's CPU limit, %g (cpu.max)", cpuLimit)
	}
	return DefaultConcurrency, "the default (no --concurrency, no CPU limit)"
}

// cpuLimit is the CPU limit of the cgroup v2 directory dir, in CPUs: the
// lowest quota/period in cpu.max of dir and its ancestors up to mount (the
// kubelet sets the container's; a pod's or a slice's may be lower). 0 when
// none sets one, or the cpu controller is not on in v2 (cgroup v1 nodes).
func cpuLimit(mount, dir string) (float64, error) {
	var limit float64
	for d := filepath.Clean(dir); ; d = filepath.Dir(d) {
		data, err := os.ReadFile(filepath.Join(d, "cpu.max"))
		switch {
		case errors.Is(err, os.ErrNotExist):
		case err != nil:
			return 0, err
		default:
			l, err := parseCPUMax(string(data))
			if err != nil {
				return 0, fmt.Errorf("%s/cpu.max: %w", d, err)
			}
			if l > 0 && (limit == 0 || l < limit) {
				limit = l
			}
		}
		if d == filepath.Clean(mount) || d == "/" || !strings.HasPrefix(d, mount) {
			return limit, nil
		}
	}
}

// parseCPUMax reads cpu.max ("QUOTA PERIOD" or "max PERIOD") as CPUs; 0
// for no limit.
func parseCPUMax(s string) (float64, error) {
	quota, period, ok := strings.Cut(strings.TrimSpace(s), " ")
	if !ok {
		return 0, fmt.Errorf("%q: want QUOTA PERIOD", s)
	}
	if quota == "max" {
		return 0, nil
	}
	q, err := strconv.ParseUint(quota, 10, 64)
	if err != nil {
		return 0, fmt.Errorf("%q: quota: %w", s, err)
	}
	p, err := strconv.ParseUint(period, 10, 64)
	if err != nil || p == 0 {
		return 0, fmt.Errorf("%q: period not a positive number", s)
	}
	return float64(q) / float64(p), nil
}
