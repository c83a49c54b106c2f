package testbed

import (
	"errors"
	"os"
	"strconv"
	"strings"
	"time"
)

// PeakTCPMemory runs fn and returns how far the kernel's TCP memory
// (/proc/net/sockstat, all namespaces) rose above where it started while fn
// ran, in MiB, sampled every 5 ms.
func PeakTCPMemory(fn func() error) (float64, error) {
	base, err := tcpMemPages()
	if err != nil {
		return 0, err
	}
	var peak int64
	stop, sampled := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(sampled)
		for {
			select {
			case <-stop:
				return
			case <-time.After(5 * time.Millisecond):
				if n, err := tcpMemPages(); err == nil {
					peak = max(peak, n-base)
				}
			}
		}
	}()
	err = fn()
	close(stop)
	<-sampled
	return float64(peak*int64(os.Getpagesize())) / (1 << 20), err
}

// tcpMemPages is the kernel's TCP memory in pages.
func tcpMemPages() (int64, error) {
	data, err := os.ReadFile("/proc/net/sockstat")
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(data), "\n") {
		if rest, ok := strings.CutPrefix(line, "TCP: "); ok {
			f := strings.Fields(rest)
			for i := 0; i+1 < len(f); i += 2 {
				if f[i] == "mem" {
					return strconv.ParseInt(f[i+1], 10, 64)
				}
			}
		}
	}
	return 0, errors.New("no TCP mem in /proc/net/sockstat")
}
