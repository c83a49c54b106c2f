// Package mountinfo finds mounts of a file system type in
// /proc/self/mountinfo, the one place both the loader and the test bed look
// up where cgroup v2 is mounted.
package mountinfo

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
)

// Cgroup2 lists every cgroup2 mount point, in mount order: /sys/fs/cgroup on
// unified hosts, /sys/fs/cgroup/unified on hybrid ones, and possibly more (a
// privileged container may see its own and the host's through a hostPath).
func Cgroup2() ([]string, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil, fmt.Errorf("read mountinfo: %w", err)
	}
	defer f.Close()
	mounts, err := parse(f, "cgroup2")
	if err != nil {
		return nil, fmt.Errorf("read mountinfo: %w", err)
	}
	if len(mounts) == 0 {
		return nil, fmt.Errorf("no cgroup2 file system is mounted here: on a node, mount one ('mount -t cgroup2 none /sys/fs/cgroup/unified'); in a container, mount the host's /sys/fs/cgroup in (a hostPath)")
	}
	return mounts, nil
}

// parse returns the mount points of fstype, unescaped.
func parse(r io.Reader, fstype string) ([]string, error) {
	var mounts []string
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		// Fields: id parent major:minor root mountpoint options [optional...] - fstype source superoptions
		pre, post, ok := strings.Cut(sc.Text(), " - ")
		if !ok || strings.Fields(post)[0] != fstype {
			continue
		}
		if fields := strings.Fields(pre); len(fields) >= 5 {
			mounts = append(mounts, unescape(fields[4]))
		}
	}
	return mounts, sc.Err()
}

// unescape undoes the octal escapes (\040 for a space) that mountinfo uses
// for white space and backslashes in paths.
func unescape(s string) string {
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
