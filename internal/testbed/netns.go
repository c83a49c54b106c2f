package testbed

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"runtime"

	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// netnsDir is where named network namespaces are bind-mounted, the same
// place iproute2 uses, so `ip netns list` shows them while debugging.
const netnsDir = "/run/netns"

func netnsPath(name string) string { return filepath.Join(netnsDir, name) }

// runLocked runs fn on a fresh goroutine locked to its OS thread and puts the
// thread back into its original network namespace afterwards. fn may switch
// the thread's netns freely. If switching back fails the thread stays locked,
// so the runtime throws it away when the goroutine exits instead of handing a
// thread in the wrong namespace to other goroutines.
//
// fn runs on another goroutine, so it must not call t.FailNow; if it calls
// runtime.Goexit anyway, runLocked returns an error instead of hanging.
func runLocked(fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("get current netns: %w", err)
			return
		}
		defer orig.Close()
		returned := false
		defer func() {
			// fn called runtime.Goexit: the thread's netns is unknown, so
			// it stays locked and dies with the goroutine.
			if !returned {
				errc <- errors.New("function exited without returning")
			}
		}()
		fnErr := fn()
		returned = true
		if err := netns.Set(orig); err != nil {
			errc <- errors.Join(fnErr, fmt.Errorf("switch back to original netns: %w", err))
			return
		}
		runtime.UnlockOSThread()
		errc <- fnErr
	}()
	return <-errc
}

// runInNetns runs fn on a locked OS thread that has entered the network
// namespace at path.
func runInNetns(path string, fn func() error) error {
	target, err := netns.GetFromPath(path)
	if err != nil {
		return fmt.Errorf("open netns %s: %w", path, err)
	}
	defer target.Close()
	return runLocked(func() error {
		if err := netns.Set(target); err != nil {
			return fmt.Errorf("enter netns %s: %w", path, err)
		}
		return fn()
	})
}

// createNetns creates the named network namespace /run/netns/<name>.
// netns.NewNamed moves the calling thread into the new namespace, which is
// why it runs under runLocked.
//
// It also turns off IPv6 duplicate address detection for interfaces created
// in the namespace later on. IFA_F_NODAD covers the addresses we add, but
// not the link-local ones the kernel adds itself, and while those are
// tentative a router cannot send neighbour solicitations for packets it
// forwards: the first forwarded IPv6 packet would stall for about 2 s.
func createNetns(name string) error {
	return runLocked(func() error {
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
	if err := os.Remove(p); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("remove netns %s: %w", name, err)
	}
	return nil
}
