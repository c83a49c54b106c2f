package testbed

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"time"

	"github.com/vishvananda/netns"

	"github.com/sluicemesh/sluice/internal/nsenter"
	"golang.org/x/sys/unix"
)

// netnsDir is where named network namespaces are bind-mounted, the same
// place iproute2 uses, so `ip netns list` shows them while debugging.
const netnsDir = "/run/netns"

func netnsPath(name string) string { return filepath.Join(netnsDir, name) }

// createNetns creates the named network namespace /run/netns/<name>.
// netns.NewNamed moves the calling thread into the new namespace, which is
// why it runs under nsenter.Locked.
//
// It also turns off IPv6 duplicate address detection for interfaces created
// in the namespace later on. IFA_F_NODAD covers the addresses we add, but
// not the link-local ones the kernel adds itself, and while those are
// tentative a router cannot send neighbour solicitations for packets it
// forwards: the first forwarded IPv6 packet would stall for about 2 s.
func createNetns(name string) error {
	return nsenter.Locked(func() error {
		h, err := netns.NewNamed(name)
		if err != nil {
			return fmt.Errorf("create netns %s: %w", name, err)
		}
		defer h.Close()
		// The thread is inside the new namespace now, and /proc/sys/net
		// resolves to the netns of the thread that opens it.
		const dad = "/proc/sys/net/ipv6/conf/default/accept_dad"
		if err := os.WriteFile(dad, []byte("0\n"), 0o644); err != nil {
			return fmt.Errorf("netns %s: disable dad: %w", name, err)
		}
		return nil
	})
}

// deleteNetns removes the named network namespace. A missing namespace is
// not an error, and neither is a file that was created but never
// bind-mounted (a crash half-way through createNetns leaves one).
func deleteNetns(name string) error {
	p := netnsPath(name)
	err := unix.Unmount(p, unix.MNT_DETACH)
	if err != nil && !errors.Is(err, unix.ENOENT) && !errors.Is(err, unix.EINVAL) {
		return fmt.Errorf("unmount netns %s: %w", name, err)
	}
	// EBUSY: a mount namespace created meanwhile (a test's private one)
	// still holds a copy of the mount; it goes when that namespace's
	// processes exit.
	deadline := time.Now().Add(5 * time.Second)
	for {
		err := os.Remove(p)
		if err == nil || errors.Is(err, fs.ErrNotExist) {
			return nil
		}
		if !errors.Is(err, unix.EBUSY) || time.Now().After(deadline) {
			return fmt.Errorf("remove netns %s: %w", name, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
