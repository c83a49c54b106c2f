package testbed

import (
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// sockoptEnv is the option the sockopt helper sets: "level:name:hex value".
const sockoptEnv = "SLUICE_TESTBED_SOCKOPT"

// SockoptResult is what the sockopt helper reports: the error of its
// setsockopt ("" when it was taken) and the socket's local address.
type SockoptResult struct {
	Errno string `json:"errno"`
	Local string `json:"local"`
	Err   string `json:"error,omitempty"`
}

// SetsockoptAs connects to addr from inside the pod, as uid:gid, and sets
// one socket option on that connection, as a sidecar would on its socket:
// it reports how the kernel answered. self must be executable by uid.
func (p *Pod) SetsockoptAs(self, addr string, uid, gid uint32, level, name int, value []byte) (SockoptResult, error) {
	cmd := exec.Command(self)
	cmd.Env = append(os.Environ(), roleEnv+"=sockopt", addrEnv+"="+addr,
		fmt.Sprintf("%s=%d:%d:%s", sockoptEnv, level, name, hex.EncodeToString(value)))
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uid, Gid: gid}}
	var res SockoptResult
	err := runHelper("pod "+p.Name, p.Start, cmd, clientKillAfter, &res, &res.Err)
	return res, err
}

func runSockopt(addr, opt string) (SockoptResult, error) {
	var res SockoptResult
	parts := strings.SplitN(opt, ":", 3)
	if len(parts) != 3 {
		return res, fmt.Errorf("bad %s %q", sockoptEnv, opt)
	}
	level, err1 := strconv.Atoi(parts[0])
	name, err2 := strconv.Atoi(parts[1])
	value, err3 := hex.DecodeString(parts[2])
	if err := errors.Join(err1, err2, err3); err != nil {
		return res, fmt.Errorf("bad %s %q: %w", sockoptEnv, opt, err)
	}
	conn, err := net.DialTimeout("tcp", addr, clientTimeout)
	if err != nil {
		return res, err
	}
	defer conn.Close()
	res.Local = conn.LocalAddr().String()
	raw, err := conn.(*net.TCPConn).SyscallConn()
	if err != nil {
		return res, err
	}
	// Established on this side; sockops has run by the time connect
	// returned.
	time.Sleep(10 * time.Millisecond)
	var serr error
	if err := raw.Control(func(fd uintptr) {
		serr = unix.SetsockoptString(int(fd), level, name, string(value))
	}); err != nil {
		return res, err
	}
	if serr != nil {
		var errno syscall.Errno
		if !errors.As(serr, &errno) {
			return res, serr
		}
		res.Errno = unix.ErrnoName(errno)
	}
	return res, nil
}
