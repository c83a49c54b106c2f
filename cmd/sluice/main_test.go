package main

// The CLI's contract: usage, help and one-line errors, each through the real
// CLI as a separate process. Behaviour in pods is proved in e2e/.

import (
	"os"
	"os/exec"
	"testing"

	"github.com/sluicemesh/sluice/internal/testbed"
)

// mainEnv makes the test binary act as the sluice binary, so tests run the
// real CLI as separate processes.
const mainEnv = "SLUICE_TEST_RUN_MAIN"

func TestMain(m *testing.M) {
	testbed.RunHelperIfRequested()
	if os.Getenv(mainEnv) == "1" {
		os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
	}
	os.Exit(m.Run())
}

// sluice returns a command running the CLI with args.
func sluice(t testing.TB, args ...string) *exec.Cmd {
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(exe, args...)
	cmd.Env = append(os.Environ(), mainEnv+"=1")
	return cmd
}

func privileged(t *testing.T) { testbed.RequirePrivileged(t) }
