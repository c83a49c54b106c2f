package loader

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"slices"
	"strconv"
	"strings"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/sluicemesh/sluice/redirect"
)

// The pod's sysctls that decide which ports the kernel hands out by itself.
const (
	localPortRange    = "/proc/sys/net/ipv4/ip_local_port_range"
	localReservedPort = "/proc/sys/net/ipv4/ip_local_reserved_ports"
)

// reserveHere keeps the kernel from handing the sidecar's ports to
// anyone: the bind hook guards only explicit binds, and a listen() or
// connect() with no bind takes a port from ip_local_port_range with no hook
// to see it. Sidecar ports inside the pod's range are added to its
// ip_local_reserved_ports (both per network namespace, IPv6 included). The
// default range (32768-60999) holds none of them, and then nothing is
// written. It runs in the pod's network namespace (readPodNet) and returns
// the ports it reserved, or the ones it could not (where /proc/sys is
// read-only, as in a container), for the caller to name. rangeProg is the
// node's sluice_port_range, nil before the node has programs.
func reserveHere(plan redirect.Plan, rangeProg *ebpf.Program) (reserved, unreserved []uint16, err error) {
	lo, hi, err := portRangeHere(rangeProg)
	if err != nil {
		return nil, nil, err
	}
	ports := slices.Concat([]uint16{plan.OutboundPort, plan.InboundPort}, plan.SidecarPorts)
	if !slices.ContainsFunc(ports, func(p uint16) bool { return p >= lo && p <= hi }) {
		return nil, nil, nil
	}
	listed, err := os.ReadFile(localReservedPort)
	if err != nil {
		return nil, nil, fmt.Errorf("read the pod's reserved ports: %w", err)
	}
	have := strings.TrimSpace(string(listed))
	var want []uint16
	for _, p := range ports {
		if p >= lo && p <= hi && !portListed(have, p) && !slices.Contains(want, p) {
			want = append(want, p)
		}
	}
	if len(want) == 0 {
		return nil, nil, nil
	}
	list := have
	for _, p := range want {
		list += "," + strconv.Itoa(int(p))
	}
	err = os.WriteFile(localReservedPort, []byte(strings.TrimPrefix(list, ",")), 0o644)
	switch {
	case errors.Is(err, fs.ErrPermission) || errors.Is(err, unix.EROFS):
		return nil, want, nil
	case err != nil:
		return nil, nil, fmt.Errorf("reserve the sidecar's ports in the pod: %w", err)
	}
	return want, nil, nil
}

// portRangeHere is the calling thread's network namespace's local port
// range. The node's program reads it from the kernel's struct net: the
// /proc/sys path costs a dcache walk as long as the node has network
// namespaces (bpf/portrange.c). Without the program, or where it cannot
// run, the file says the same.
func portRangeHere(prog *ebpf.Program) (lo, hi uint16, err error) {
	if prog != nil {
		if r, err := prog.Run(&ebpf.RunOptions{}); err == nil && r != 0 {
			return uint16(r), uint16(r >> 16), nil
		}
	}
	data, err := os.ReadFile(localPortRange)
	if err != nil {
		return 0, 0, fmt.Errorf("read the pod's local port range: %w", err)
	}
	if _, err := fmt.Sscan(string(data), &lo, &hi); err != nil {
		return 0, 0, fmt.Errorf("parse %s %q: %w", localPortRange, data, err)
	}
	return lo, hi, nil
}

// portListed reports whether port is in an ip_local_reserved_ports list
// ("8080,15000-15100").
func portListed(list string, port uint16) bool {
	for _, item := range strings.Split(list, ",") {
		first, last, isRange := strings.Cut(strings.TrimSpace(item), "-")
		lo, err := strconv.ParseUint(first, 10, 16)
		if err != nil {
			continue
		}
		hi := lo
		if isRange {
			if hi, err = strconv.ParseUint(last, 10, 16); err != nil {
				continue
			}
		}
		if uint64(port) >= lo && uint64(port) <= hi {
			return true
		}
	}
	return false
}
