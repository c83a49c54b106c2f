package testbed

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/sluicemesh/sluice/internal/mountinfo"
	"golang.org/x/sys/unix"
)

// cgroupDrainTimeout bounds how long Close waits for killed processes to
// leave a cgroup before giving up on removing it.
const cgroupDrainTimeout = 10 * time.Second

// cgroup2Mount returns the first mount point of the cgroup v2 hierarchy.
func cgroup2Mount() (string, error) {
	mounts, err := mountinfo.Cgroup2()
	if err != nil {
		return "", err
	}
	return mounts[0], nil
}

// removeCgroup waits until the cgroup at dir has no processes left and
// removes it. Killed processes leave their cgroup asynchronously, hence the
// polling; a cgroup that is already gone counts as removed.
func removeCgroup(dir string, deadline time.Time) error {
	for {
		procs, err := os.ReadFile(filepath.Join(dir, "cgroup.procs"))
		if errors.Is(err, fs.ErrNotExist) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("read cgroup %s: %w", dir, err)
		}
		procs = bytes.TrimSpace(procs)
		if len(procs) == 0 {
			err := unix.Rmdir(dir)
			if err == nil || errors.Is(err, unix.ENOENT) {
				return nil
			}
			// EBUSY: the last task has left cgroup.procs but the kernel
			// has not finished releasing it yet.
			if !errors.Is(err, unix.EBUSY) {
				return fmt.Errorf("remove cgroup %s: %w", dir, err)
			}
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("remove cgroup %s: still has processes [%s]", dir,
				strings.ReplaceAll(string(procs), "\n", " "))
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// removeCgroupTree removes dir and every cgroup below it, deepest first.
// It is used for leftovers of a crashed earlier run.
func removeCgroupTree(dir string, deadline time.Time) error {
	entries, err := os.ReadDir(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("read cgroup %s: %w", dir, err)
	}
	var errs []error
	for _, e := range entries {
		if e.IsDir() {
			errs = append(errs, removeCgroupTree(filepath.Join(dir, e.Name()), deadline))
		}
	}
	if err := errors.Join(errs...); err != nil {
		return err
	}
	return removeCgroup(dir, deadline)
}
