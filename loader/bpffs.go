package loader

import (
	"fmt"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"
)

// DefaultBPFFS is where pins must live so they outlive the installing process
// (in Kubernetes: the host's /sys/fs/bpf, mounted into the init container).
const DefaultBPFFS = "/sys/fs/bpf"

// ensureBPFFS makes sure pinDir will land on a bpf filesystem. It mounts one at
// /sys/fs/bpf when nothing is mounted there (as on a fresh VM) and returns
// how to unmount it again, for an install that fails; anywhere else it only
// checks, because mounting over a caller's directory would hide it.
func ensureBPFFS(pinDir string) (unmount func() error, err error) {
	dir, onBPFFS, err := bpffsBelow(pinDir)
	if err != nil || onBPFFS {
		return nil, err
	}
	if dir != DefaultBPFFS {
		return nil, fmt.Errorf("pin dir %s is not on a bpf filesystem: pick a --pin-dir under %s, or mount one first (mount -t bpf bpf DIR)", pinDir, DefaultBPFFS)
	}
	if err := unix.Mount("bpf", DefaultBPFFS, "bpf", 0, "mode=0700"); err != nil {
		return nil, fmt.Errorf("mount bpffs at %s: %w", DefaultBPFFS, err)
	}
	return func() error { return unix.Unmount(DefaultBPFFS, 0) }, nil
}

// bpffsBelow finds the deepest existing directory on pinDir's path and
// whether it is on a bpf filesystem.
func bpffsBelow(pinDir string) (string, bool, error) {
	dir := pinDir
	for {
		if _, err := os.Stat(dir); err == nil || dir == filepath.Dir(dir) {
			break
		}
		dir = filepath.Dir(dir)
	}
	var fs unix.Statfs_t
	if err := unix.Statfs(dir, &fs); err != nil {
		return dir, false, fmt.Errorf("statfs %s: %w", dir, err)
	}
	return dir, fs.Type == unix.BPF_FS_MAGIC, nil
}

// HostBPFFS refuses a pin directory that is not on a bpf filesystem already,
// for installs run inside a container: a bpffs mounted there would die with
// the container, and every pin and link with it.
func HostBPFFS(pinDir string) error {
	dir, ok, err := bpffsBelow(pinDir)
	if err != nil {
		return err
	}
	if !ok {
		return fmt.Errorf("%s is not on a bpf filesystem in this container: mount the host's /sys/fs/bpf in (a hostPath), on a node that has bpffs mounted there (mount -t bpf bpf /sys/fs/bpf)", dir)
	}
	return nil
}
