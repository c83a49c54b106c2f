package testbed

import (
	"bytes"
	"errors"
	"os/exec"
	"strings"
)

// Result is what a finished command printed and how it exited.
type Result struct {
	Stdout, Stderr string
	Code           int
}

// Run runs cmd to its end, capturing its output. A non-zero exit is a
// Result, not a failure: only a command that cannot start fails tb.
func Run(tb TB, cmd *exec.Cmd) Result {
	tb.Helper()
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	res := Result{Stdout: stdout.String(), Stderr: stderr.String()}
	var ee *exec.ExitError
	switch {
	case errors.As(err, &ee):
		res.Code = ee.ExitCode()
	case err != nil:
		tb.Fatalf("run %v: %v", cmd.Args, err)
	}
	return res
}

// MustRun runs cmd, fails tb unless it exits 0, and returns its stdout.
func MustRun(tb TB, cmd *exec.Cmd) string {
	tb.Helper()
	res := Run(tb, cmd)
	if res.Code != 0 {
		tb.Fatalf("%s: exit %d\n%s%s", strings.Join(cmd.Args, " "), res.Code, res.Stdout, res.Stderr)
	}
	return res.Stdout
}
