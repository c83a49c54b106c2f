// Package nsenter runs a function on an OS thread inside another network
// namespace: the one way the loader, the checks and the test bed enter a
// pod's namespace. Only the network namespace is entered (as `nsenter
// --net` does); `ip netns exec` would also remount /sys.
package nsenter

import (
	"errors"
	"fmt"
	"os"
	"runtime"

	"github.com/vishvananda/netns"
)

// Locked runs fn on a fresh goroutine locked to its OS thread and puts the
// thread back into its original network namespace afterwards, so fn may
// switch the thread's namespace freely. If switching back fails the thread
// stays locked and the runtime throws it away when the goroutine exits,
// instead of handing a thread in the wrong namespace to other goroutines.
//
// fn runs on another goroutine, so it must not call t.FailNow; if it calls
// runtime.Goexit anyway, Locked returns an error instead of hanging.
func Locked(fn func() error) error {
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

// Do runs fn on a locked OS thread inside the network namespace at path
// (/run/netns/NAME or /proc/PID/ns/net); an empty path runs fn here.
func Do(path string, fn func() error) error {
	if path == "" {
		return fn()
	}
	target, err := netns.GetFromPath(path)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("netns %s does not exist: pass the pod's network namespace, e.g. /run/netns/NAME or /proc/PID/ns/net", path)
		}
		return fmt.Errorf("open netns %s: %w", path, err)
	}
	defer target.Close()
	return Locked(func() error {
		if err := netns.Set(target); err != nil {
			return fmt.Errorf("enter netns %s: %w", path, err)
		}
		return fn()
	})
}

// DoNew runs fn on a locked OS thread inside a new, empty network namespace
// that disappears once fn returns.
func DoNew(fn func() error) error {
	return Locked(func() error {
		h, err := netns.New() // also moves this thread into it
		if err != nil {
			return fmt.Errorf("create netns: %w", err)
		}
		defer h.Close()
		return fn()
	})
}
