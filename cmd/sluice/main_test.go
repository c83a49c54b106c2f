package main

import (
	"bytes"
	"errors"
	"os"
	"os/exec"
	"strings"
	"testing"

	"github.com/sluicemesh/sluice/internal/testbed"
)

// mainEnv makes the test binary act as the sluice binary, so tests run the
// real CLI as separate processes (the sidecar must live in the pod's cgroup).
const mainEnv = "SLUICE_TEST_RUN_MAIN"

func TestMain(m *testing.M) {
	testbed.RunHelperIfRequested()
	runTestHelper()
	if os.Getenv(mainEnv) == "1" {
		os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
	}
	os.Exit(m.Run())
}

func self(t testing.TB) string {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	return exe
}

// sluice returns a command running the CLI with args.
func sluice(t testing.TB, args ...string) *exec.Cmd {
	cmd := exec.Command(self(t), args...)
	cmd.Env = append(os.Environ(), mainEnv+"=1")
	return cmd
}

type cliResult struct {
	stdout, stderr string
	code           int
}

func runCLI(t testing.TB, cmd *exec.Cmd) cliResult {
	t.Helper()
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	res := cliResult{stdout: stdout.String(), stderr: stderr.String()}
	var ee *exec.ExitError
	switch {
	case errors.As(err, &ee):
		res.code = ee.ExitCode()
	case err != nil:
		t.Fatalf("run %v: %v", cmd.Args, err)
	}
	return res
}

// mustCLI runs the CLI and fails the test unless it exits 0.
func mustCLI(t testing.TB, args ...string) string {
	t.Helper()
	res := runCLI(t, sluice(t, args...))
	if res.code != 0 {
		t.Fatalf("sluice %s: exit %d\n%s%s", strings.Join(args, " "), res.code, res.stdout, res.stderr)
	}
	return res.stdout
}

func privileged(t *testing.T) { testbed.RequirePrivileged(t) }
