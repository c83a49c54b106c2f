package main

import (
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"
)

// cpuAccounting and memoryAccounting say, in the JSON, how CPU/req and
// KiB/idle conn were taken.
const (
	cpuAccounting = "CPU/req: the whole machine's CPU time (/proc/stat: user, nice, system, irq, softirq, steal; " +
		"not idle or iowait) over the rr16 run, divided by its requests: client, sidecar, echo server and the " +
		"kernel's softirq work (conntrack for iptables) wherever it ran. Nothing else may run meanwhile. " +
		"pod CPU/req is the pod cgroup's cpu.stat alone (client and sidecar; inbound, server and sidecar)."
	memoryAccounting = "KiB/idle conn: the sidecar's VmRSS settled (runtime.GC and debug.FreeOSMemory on SIGUSR1, " +
		"then five readings 100 ms apart within 64 KiB) before and while holding -idle connections, each dialed " +
		"on to the server, difference divided by -idle. HAProxy is settled by waiting alone."
)

// userHZ is the unit of /proc/stat's times (USER_HZ, 100 on every Linux
// architecture Go runs on).
const userHZ = 100

// procStat is the machine's CPU time so far, in USER_HZ ticks: busy (every
// state but idle and iowait) and all of it.
type procStat struct{ busy, total uint64 }

func readProcStat() (procStat, error) {
	data, err := os.ReadFile("/proc/stat")
	if err != nil {
		return procStat{}, err
	}
	return parseProcStat(string(data))
}

// parseProcStat reads the first line of /proc/stat: "cpu user nice system
// idle iowait irq softirq steal guest guest_nice" (guest time is already in
// user and nice).
func parseProcStat(data string) (procStat, error) {
	line, _, _ := strings.Cut(data, "\n")
	fields := strings.Fields(line)
	if len(fields) < 9 || fields[0] != "cpu" {
		return procStat{}, errors.New("/proc/stat: no cpu line")
	}
	var s procStat
	for i, f := range fields[1:9] {
		v, err := strconv.ParseUint(f, 10, 64)
		if err != nil {
			return procStat{}, fmt.Errorf("/proc/stat: %w", err)
		}
		s.total += v
		if i != 3 && i != 4 { // idle, iowait
			s.busy += v
		}
	}
	return s, nil
}

func (s procStat) sub(o procStat) procStat { return procStat{s.busy - o.busy, s.total - o.total} }

func (s procStat) busyUsec() float64 { return float64(s.busy) * 1e6 / userHZ }

// busyPct is how busy every CPU together was, 100 for all of them.
func (s procStat) busyPct() float64 {
	if s.total == 0 {
		return 0
	}
	return 100 * float64(s.busy) / float64(s.total)
}

// backgroundCPU is how busy the machine is over d, before the bench starts.
func backgroundCPU(d time.Duration) (float64, error) {
	before, err := readProcStat()
	if err != nil {
		return 0, err
	}
	time.Sleep(d)
	after, err := readProcStat()
	if err != nil {
		return 0, err
	}
	return after.sub(before).busyPct(), nil
}
