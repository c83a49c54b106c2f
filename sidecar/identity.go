package sidecar

import (
	"fmt"
	"log/slog"
	"os"
	"strings"
	"syscall"

	"github.com/sluicemesh/sluice/loader"
)

// becomeProxy switches to the proxy identity when running as root: the
// capture ports may only be bound by it, and as root the proxy's own dials
// would be captured and loop back into itself.
func becomeProxy(uid, gid uint32, log *slog.Logger) error {
	if os.Geteuid() != 0 {
		if uint32(os.Getuid()) != uid && uint32(os.Getgid()) != gid {
			log.Warn("not running as the proxy uid/gid: the capture ports cannot be bound and this proxy's own connections would be captured", "uid", os.Getuid(), "gid", os.Getgid(), "proxy_uid", uid, "proxy_gid", gid)
		}
		return nil
	}
	if err := syscall.Setgroups(nil); err != nil {
		return fmt.Errorf("drop supplementary groups: %w", err)
	}
	if err := syscall.Setgid(int(gid)); err != nil {
		return fmt.Errorf("switch to proxy gid %d: %w", gid, err)
	}
	if err := syscall.Setuid(int(uid)); err != nil {
		return fmt.Errorf("switch to proxy uid %d: %w", uid, err)
	}
	return nil
}

// warnIfOutside warns when this process is not in the pod's cgroup subtree:
// the getsockopt hook only answers for sockets created inside it.
func warnIfOutside(log *slog.Logger, cgroup string) {
	own, err := loader.OwnCgroup()
	if err != nil {
		return
	}
	if own != cgroup && !strings.HasPrefix(own, cgroup+"/") {
		log.Warn("sidecar runs outside the pod's cgroup: SO_ORIGINAL_DST will not be answered", "own_cgroup", own, "pod_cgroup", cgroup)
	}
}
