// Package loader probes the kernel, loads Sluice's BPF programs with a capture
// plan, attaches them to one pod's cgroup, pins them, and removes them again.
// It is the only package that changes kernel state.
package loader

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// DefaultPinRoot is where every pod's pins live, one directory per pod.
const DefaultPinRoot = "/sys/fs/bpf/sluice"

// Target is one pod's cgroup, the bpffs directory holding its pins and, for
// inbound capture, the pod's network namespace and interface.
type Target struct {
	Cgroup string `json:"cgroup"`
	PodID  string `json:"pod_id"`
	PinDir string `json:"pin_dir"`
	// Interface is where inbound capture attaches (empty: no inbound
	// capture), inside Netns (empty: the caller's network namespace).
	Interface string `json:"interface,omitempty"`
	Netns     string `json:"netns,omitempty"`
}

// ResolveTarget is TargetOf for a cgroup that must exist and be cgroup v2,
// as install requires.
func ResolveTarget(cgroup, pinDir string) (Target, error) {
	t, err := TargetOf(cgroup, pinDir)
	if err != nil {
		return t, err
	}
	var fs unix.Statfs_t
	if err := unix.Statfs(t.Cgroup, &fs); err != nil {
		if errors.Is(err, unix.ENOENT) {
			return t, fmt.Errorf("cgroup %s does not exist: pass the pod's cgroup v2 directory (create it first, e.g. mkdir %s)", t.Cgroup, t.Cgroup)
		}
		return t, fmt.Errorf("cgroup %s: %w", t.Cgroup, err)
	}
	if fs.Type != unix.CGROUP2_SUPER_MAGIC {
		return t, fmt.Errorf("%s is not a cgroup v2 directory: pass a directory on the cgroup2 mount (see 'findmnt -t cgroup2')", t.Cgroup)
	}
	return t, nil
}

// TargetOf derives the pod id from the cgroup's path within the cgroup v2
// hierarchy and, unless pinDir overrides it, the pin directory. It does not
// need the cgroup to exist any more, so a dead pod can still be uninstalled.
func TargetOf(cgroup, pinDir string) (Target, error) {
	if cgroup == "" {
		return Target{}, errors.New("no cgroup given: pass --cgroup with the pod's cgroup v2 directory, e.g. /sys/fs/cgroup/unified/mypod")
	}
	path, err := filepath.Abs(cgroup)
	if err != nil {
		return Target{}, fmt.Errorf("cgroup path %s: %w", cgroup, err)
	}
	mounts, err := cgroup2Mounts()
	if err != nil {
		return Target{}, err
	}
	rel, ok := "", false
	for _, m := range mounts {
		if r, err := filepath.Rel(m, path); err == nil && !strings.HasPrefix(r, "..") && (!ok || len(r) < len(rel)) {
			rel, ok = r, true
		}
	}
	switch {
	case !ok:
		return Target{}, fmt.Errorf("%s is not a cgroup v2 directory: pass a directory below the cgroup2 mount %s", path, mounts[0])
	case rel == ".":
		// Attaching here would capture every process on the machine.
		return Target{}, fmt.Errorf("%s is the root of the cgroup v2 hierarchy: pass the pod's own cgroup below it", path)
	}
	id := strings.ReplaceAll(rel, "/", "_")
	if pinDir == "" {
		pinDir = filepath.Join(DefaultPinRoot, id)
	}
	return Target{Cgroup: path, PodID: id, PinDir: pinDir}, nil
}

// Cgroup2Mount returns where the cgroup v2 hierarchy is mounted
// (/sys/fs/cgroup on unified hosts, /sys/fs/cgroup/unified on hybrid ones).
func Cgroup2Mount() (string, error) {
	mounts, err := cgroup2Mounts()
	if err != nil {
		return "", err
	}
	return mounts[0], nil
}

// cgroup2Mounts lists every cgroup2 mount point; a privileged container may
// see its own and the host's (a hostPath) at once.
func cgroup2Mounts() ([]string, error) {
	data, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return nil, fmt.Errorf("read mountinfo: %w", err)
	}
	var mounts []string
	for _, line := range strings.Split(string(data), "\n") {
		// Fields: id parent major:minor root mountpoint options ... - fstype source superoptions
		pre, post, ok := strings.Cut(line, " - ")
		if !ok || !strings.HasPrefix(post, "cgroup2 ") {
			continue
		}
		if fields := strings.Fields(pre); len(fields) >= 5 {
			mounts = append(mounts, fields[4])
		}
	}
	if len(mounts) == 0 {
		return nil, errors.New("no cgroup2 filesystem is mounted: mount one with 'mount -t cgroup2 none /sys/fs/cgroup/unified'")
	}
	return mounts, nil
}
