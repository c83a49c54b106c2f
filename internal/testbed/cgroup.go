package testbed

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// cgroupDrainTimeout bounds how long Close waits for killed processes to
// leave a cgroup before giving up on removing it.
const cgroupDrainTimeout = 10 * time.Second

// cgroup2Mount returns the mount point of the cgroup v2 hierarchy. It is
// /sys/fs/cgroup on unified hosts but /sys/fs/cgroup/unified on hybrid
// ones, so it is looked up rather than assumed.
func cgroup2Mount() (string, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return "", fmt.Errorf("find cgroup2 mount: %w", err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		// Fields: id parent major:minor root mountpoint options [optional...] - fstype source superoptions
		fields := strings.Fields(sc.Text())
		sep := -1
		for i, f := range fields {
			if f == "-" {
				sep = i
				break
			}
		}
		if sep < 5 || sep+1 >= len(fields) || fields[sep+1] != "cgroup2" {
			continue
		}
		return unescapeMountPath(fields[4]), nil
	}
	if err := sc.Err(); err != nil {
		return "", fmt.Errorf("find cgroup2 mount: %w", err)
	}
	return "", errors.New("find cgroup2 mount: no cgroup2 file system mounted")
}

// unescapeMountPath undoes the octal escapes (\040 for a space) that
// mountinfo uses for white space and backslashes in paths.
func unescapeMountPath(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if v, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
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
