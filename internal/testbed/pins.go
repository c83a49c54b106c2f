package testbed

import (
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// PinAccess is what one identity could open under a bpffs directory: each
// pin it opened, with how ("r" or "rw").
type PinAccess struct {
	Opened map[string]string `json:"opened"`
	// Denied counts the pins and directories it could not open.
	Denied int    `json:"denied"`
	Err    string `json:"error,omitempty"`
}

// OpenPinsAs tries, as uid:gid with no capability, to open every pin under
// dirs (their paths are no secret: they follow from cgroup paths and the
// build) for reading and for writing, as a process of another pod with the
// sidecar's identity and mount view would. Opened is keyed by path. self
// must be executable by uid.
func (p *Pod) OpenPinsAs(self string, dirs []string, uid, gid uint32) (PinAccess, error) {
	cmd := exec.Command(self)
	cmd.Env = append(os.Environ(), roleEnv+"=pins", addrEnv+"="+strings.Join(dirs, "\n"))
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uid, Gid: gid}}
	var res PinAccess
	err := runHelper("pod "+p.Name, p.Start, cmd, clientKillAfter, &res, &res.Err)
	return res, err
}

func runPins(dirs string) PinAccess {
	res := PinAccess{Opened: map[string]string{}}
	for _, dir := range strings.Split(dirs, "\n") {
		walkPins(dir, &res)
	}
	return res
}

func walkPins(root string, res *PinAccess) {
	// Walk errors are directories it may not read: denied, and skipped.
	filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			res.Denied++
			return nil
		}
		if d.IsDir() {
			return nil
		}
		switch {
		case objGet(path, 0) == nil:
			res.Opened[path] = "rw"
		case objGet(path, unix.BPF_F_RDONLY) == nil:
			res.Opened[path] = "r"
		default:
			res.Denied++
		}
		return nil
	})
}

// objGet opens the pinned object at path with BPF_OBJ_GET, as any BPF
// library would, and closes it again.
func objGet(path string, flags uint32) error {
	name, err := unix.BytePtrFromString(path)
	if err != nil {
		return err
	}
	attr := struct {
		pathname  uint64
		bpfFd     uint32
		fileFlags uint32
		pathFd    int32
		_         uint32
	}{pathname: uint64(uintptr(unsafe.Pointer(name))), fileFlags: flags}
	fd, _, errno := unix.Syscall(unix.SYS_BPF, unix.BPF_OBJ_GET, uintptr(unsafe.Pointer(&attr)), unsafe.Sizeof(attr))
	if errno != 0 {
		return errno
	}
	return unix.Close(int(fd))
}
