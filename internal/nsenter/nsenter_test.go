package nsenter_test

import (
	"fmt"
	"os"
	"runtime"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/sluicemesh/sluice/internal/nsenter"
	"github.com/sluicemesh/sluice/internal/testbed"
)

// threadNetns is the inode of the calling thread's network namespace.
func threadNetns() (uint64, error) {
	var st unix.Stat_t
	err := unix.Stat(fmt.Sprintf("/proc/self/task/%d/ns/net", unix.Gettid()), &st)
	return st.Ino, err
}

// TestDoEntersAndLeaves runs a function in a new namespace and in that
// namespace again by path, and checks that the caller's thread never moved.
func TestDoEntersAndLeaves(t *testing.T) {
	testbed.RequirePrivileged(t)
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	own, err := threadNetns()
	if err != nil {
		t.Fatal(err)
	}
	var inside, again uint64
	err = nsenter.DoNew(func() error {
		if inside, err = threadNetns(); err != nil {
			return err
		}
		// The same namespace by path, from a second locked thread.
		path := fmt.Sprintf("/proc/%d/task/%d/ns/net", os.Getpid(), unix.Gettid())
		return nsenter.Do(path, func() (err error) {
			again, err = threadNetns()
			return err
		})
	})
	if err != nil {
		t.Fatal(err)
	}
	if inside == own || again != inside {
		t.Errorf("own netns %d, DoNew ran in %d, Do by its path in %d: want a new one, then the same", own, inside, again)
	}
	if now, _ := threadNetns(); now != own {
		t.Errorf("the caller's thread is in netns %d after, want %d", now, own)
	}
}

func TestDoNamesAMissingNamespace(t *testing.T) {
	err := nsenter.Do("/run/netns/sluice-no-such-pod", func() error { return nil })
	if err == nil || !strings.Contains(err.Error(), "does not exist: pass the pod's network namespace") {
		t.Fatalf("got %v, want the missing namespace named with the fix", err)
	}
}

func TestLockedReportsGoexit(t *testing.T) {
	err := nsenter.Locked(func() error { runtime.Goexit(); return nil })
	if err == nil {
		t.Fatal("a function that called Goexit returned no error")
	}
}
