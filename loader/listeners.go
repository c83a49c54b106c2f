package loader

import (
	"bufio"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/sluicemesh/sluice/bpf"
	"github.com/sluicemesh/sluice/internal/nsenter"
	"github.com/sluicemesh/sluice/redirect"
)

// registerListeners puts the sidecar's inbound listeners that are already
// open into m, where sk_lookup finds them. sockops registers a listener as
// it starts listening; one that started before this install's sockops
// program was attached (an upgrade or a reinstall under a running sidecar)
// is found here: a listening socket on the inbound port, owned by the proxy
// uid, held by a process in the pod's cgroup. A pod with none (the sidecar
// not started yet) costs a read of its cgroup's processes. It
// returns how many such listeners it found but could not register: an
// MPTCP one (a sockmap takes none; sidecars of releases before sk_lookup
// listen so, as Go does by default), or one this process may not take a
// copy of (pidfd_getfd of another uid's descriptor needs CAP_SYS_PTRACE).
func registerListeners(t Target, plan redirect.Plan, m *ebpf.Map) (missed int, err error) {
	// A pod whose cgroup holds no process but this one (the init
	// container's install, a fresh pod) has no sidecar yet: its socket
	// table, which the kernel reads out of the whole node's, is not read.
	if !othersIn(t.Cgroup) {
		return 0, nil
	}
	want, err := listenerInodes(t, plan)
	if err != nil || len(want) == 0 {
		return 0, err
	}
	registered := map[uint64]bool{}
	err = walkCgroupSockets(t.Cgroup, want, func(ino uint64, fd int) error {
		family, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_DOMAIN)
		if err != nil {
			return fmt.Errorf("inbound listener's family: %w", err)
		}
		slot := bpf.SluiceListenerSlotLISTENER_IPV4
		if family == unix.AF_INET6 {
			slot = bpf.SluiceListenerSlotLISTENER_IPV6
		}
		err = m.Update(uint32(slot), uint64(fd), ebpf.UpdateAny)
		if errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.EINVAL) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("register the sidecar's inbound listener: %w", err)
		}
		registered[ino] = true
		return nil
	})
	return len(want) - len(registered), err
}

// listenerInodes returns the socket inodes of the TCP listeners on the
// inbound port owned by the proxy uid in t's network namespace.
func listenerInodes(t Target, plan redirect.Plan) (map[uint64]bool, error) {
	found := map[uint64]bool{}
	err := nsenter.Do(t.Netns, func() error {
		for _, table := range []string{"tcp", "tcp6"} {
			err := listenersIn("/proc/thread-self/net/"+table, plan.InboundPort, plan.ProxyUID, found)
			if err != nil && !errors.Is(err, fs.ErrNotExist) {
				return err
			}
		}
		return nil
	})
	return found, err
}

// tcpListen is TCP_LISTEN as /proc/net/tcp writes a socket's state.
const tcpListen = "0A"

// listenersIn adds to found the inodes of the listeners on port owned by uid
// in a /proc/net/tcp-style table: "sl local_address rem_address st tx:rx
// tr:when retrnsmt uid timeout inode ...", addresses as HEX:PORT.
func listenersIn(table string, port uint16, uid uint32, found map[uint64]bool) error {
	f, err := os.Open(table)
	if err != nil {
		return err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Scan() // the header
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 10 || fields[3] != tcpListen || fields[7] != strconv.FormatUint(uint64(uid), 10) {
			continue
		}
		_, hexPort, ok := strings.Cut(fields[1], ":")
		if p, err := strconv.ParseUint(hexPort, 16, 16); !ok || err != nil || uint16(p) != port {
			continue
		}
		if ino, err := strconv.ParseUint(fields[9], 10, 64); err == nil {
			found[ino] = true
		}
	}
	if err := sc.Err(); err != nil {
		return fmt.Errorf("read %s: %w", table, err)
	}
	return nil
}

// walkCgroupSockets calls fn with a copy of each descriptor, held by a
// process in the cgroup tree at dir, of a socket whose inode is in want.
func walkCgroupSockets(dir string, want map[uint64]bool, fn func(ino uint64, fd int) error) error {
	return filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return nil // a child cgroup removed meanwhile
		}
		if !d.IsDir() {
			return nil
		}
		data, err := os.ReadFile(filepath.Join(path, "cgroup.procs"))
		if err != nil {
			return nil
		}
		for _, field := range strings.Fields(string(data)) {
			pid, err := strconv.Atoi(field)
			if err != nil {
				continue
			}
			if err := processSockets(pid, want, fn); err != nil {
				return err
			}
		}
		return nil
	})
}

// processSockets calls fn with a copy (pidfd_getfd) of each of pid's
// descriptors of a socket in want. A process that exits meanwhile has none;
// one this process may not copy from is passed over.
func processSockets(pid int, want map[uint64]bool, fn func(ino uint64, fd int) error) error {
	fdDir := fmt.Sprintf("/proc/%d/fd", pid)
	entries, err := os.ReadDir(fdDir)
	if err != nil {
		return nil
	}
	var pidfd = -1
	defer func() {
		if pidfd >= 0 {
			unix.Close(pidfd)
		}
	}()
	for _, e := range entries {
		target, err := os.Readlink(filepath.Join(fdDir, e.Name()))
		if err != nil {
			continue
		}
		ino, ok := socketInode(target)
		if !ok || !want[ino] {
			continue
		}
		n, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if pidfd < 0 {
			if pidfd, err = unix.PidfdOpen(pid, 0); err != nil {
				return nil
			}
		}
		fd, err := unix.PidfdGetfd(pidfd, n, 0)
		if err != nil {
			continue // closed meanwhile, or not ours to copy
		}
		err = fn(ino, fd)
		unix.Close(fd)
		if err != nil {
			return err
		}
	}
	return nil
}

// socketInode parses a descriptor's link, "socket:[INODE]".
func socketInode(link string) (uint64, bool) {
	rest, ok := strings.CutPrefix(link, "socket:[")
	if !ok {
		return 0, false
	}
	ino, err := strconv.ParseUint(strings.TrimSuffix(rest, "]"), 10, 64)
	return ino, err == nil
}

// othersIn reports whether cgroup or a cgroup below it holds a process
// other than this one.
func othersIn(cgroup string) bool {
	return firstProcess(cgroup, strconv.Itoa(os.Getpid())) != ""
}

// firstProcess returns the first process found in cgroup or below it but
// skip, or "". A process outside this one's PID namespace (another
// container's, read from inside a pod) is listed as 0, and returned so.
func firstProcess(cgroup, skip string) string {
	var found string
	filepath.WalkDir(cgroup, func(path string, d fs.DirEntry, err error) error {
		if err != nil || !d.IsDir() {
			return nil
		}
		procs, err := os.ReadFile(filepath.Join(path, "cgroup.procs"))
		if err != nil {
			return nil
		}
		for _, pid := range strings.Fields(string(procs)) {
			if pid != skip {
				found = pid
				return filepath.SkipAll
			}
		}
		return nil
	})
	return found
}
