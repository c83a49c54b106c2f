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
	dir := pinDir
	for {
		if _, err := os.Stat(dir); err == nil || dir == filepath.Dir(dir) {
			break
		}
		dir = filepath.Dir(dir)
	}
	var fs unix.Statfs_t
	if err := unix.Statfs(dir, &fs); err != nil {
		return nil, fmt.Errorf("statfs %s: %w", dir, err)
	}
	if fs.Type == unix.BPF_FS_MAGIC {
		return nil, nil
	}
	if dir != DefaultBPFFS {
		return nil, fmt.Errorf("pin dir %s is not on a bpf filesystem: pick a --pin-dir under %s, or mount one first (mount -t bpf bpf DIR)", pinDir, DefaultBPFFS)
	}
	if err := unix.Mount("bpf", DefaultBPFFS, "bpf", 0, "mode=0700"); err != nil {
		return nil, fmt.Errorf("mount bpffs at %s: %w", DefaultBPFFS, err)
	}
	return func() error { return unix.Unmount(DefaultBPFFS, 0) }, nil
}
