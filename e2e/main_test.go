package e2e

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime/debug"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/sluicemesh/sluice/internal/testbed"
	"github.com/sluicemesh/sluice/loader"
)

// sluiceBin is the sluice binary under test, built once by TestMain into a
// directory every user may enter (the sidecar runs as the proxy's uid).
var sluiceBin string

func TestMain(m *testing.M) {
	testbed.RunHelperIfRequested()
	runTestHelper()
	dir, err := os.MkdirTemp("", "sluice-e2e-")
	if err == nil {
		err = os.Chmod(dir, 0o755)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "e2e: temp dir: %v\n", err)
		os.Exit(1)
	}
	sluiceBin = filepath.Join(dir, "sluice")
	if prebuilt := os.Getenv("SLUICE_E2E_BIN"); prebuilt != "" {
		// make test-kernel's VM has no Go: it brings the binaries built.
		sluiceBin = prebuilt
	} else if err := buildSluice(sluiceBin, "", buildTags()); err != nil {
		os.RemoveAll(dir)
		fmt.Fprintf(os.Stderr, "e2e: %v\n", err)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// buildSluice builds cmd/sluice of the module in src (this module if src is
// empty) into out, with the build tags and other go build flags given.
func buildSluice(out, src, tags string, flags ...string) error {
	goBin, err := exec.LookPath("go")
	if err != nil {
		return fmt.Errorf("go not on PATH: the end-to-end tests build cmd/sluice with it: %w", err)
	}
	if src == "" {
		mod, err := exec.Command(goBin, "env", "GOMOD").Output()
		if err != nil || strings.TrimSpace(string(mod)) == "" || strings.TrimSpace(string(mod)) == os.DevNull {
			return fmt.Errorf("find the module root with go env GOMOD: %v", err)
		}
		src = filepath.Dir(strings.TrimSpace(string(mod)))
	}
	args := []string{"build", "-o", out}
	if tags != "" {
		args = append(args, "-tags", tags)
	}
	args = append(args, flags...)
	build := exec.Command(goBin, append(args, "./cmd/sluice")...)
	build.Dir = src
	if msg, err := build.CombinedOutput(); err != nil {
		return fmt.Errorf("build cmd/sluice in %s: %v\n%s", src, err, msg)
	}
	return nil
}

// buildTags are the tags this test binary was built with, so that
// go test -tags demo ./e2e tests the demo build, as it did in cmd/sluice.
func buildTags() string {
	if info, ok := debug.ReadBuildInfo(); ok {
		for _, s := range info.Settings {
			if s.Key == "-tags" {
				return s.Value
			}
		}
	}
	return ""
}

// self is this test binary, which plays the helper roles (helpers_test.go
// and testbed's) in pods.
func self(t testing.TB) string {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	return exe
}

// sluice returns a command running the sluice binary with args.
func sluice(t testing.TB, args ...string) *exec.Cmd {
	return exec.Command(sluiceBin, args...)
}

// mustCLI runs the CLI and fails the test unless it exits 0.
func mustCLI(t testing.TB, args ...string) string {
	t.Helper()
	return testbed.MustRun(t, sluice(t, args...))
}

// scaled is d stretched by SLUICE_E2E_TIME_SCALE (make test-kernel's VM,
// in software emulation, sets it): for traffic that has to last across an
// event the test waits for, where a slower machine needs more of it.
func scaled(d time.Duration) time.Duration {
	if n, err := strconv.Atoi(os.Getenv("SLUICE_E2E_TIME_SCALE")); err == nil && n > 1 {
		return d * time.Duration(n)
	}
	return d
}

func privileged(t testing.TB) { testbed.RequirePrivileged(t) }

// statusJSON is the pod's install as status --json reports it; the exit
// code must agree with what it says.
func statusJSON(t testing.TB, cgroup string) loader.State {
	t.Helper()
	res := testbed.Run(t, sluice(t, "status", "--cgroup", cgroup, "--json"))
	var s loader.State
	if err := json.Unmarshal([]byte(res.Stdout), &s); err != nil {
		t.Fatalf("status --json: %v (exit %d, %s%s)", err, res.Code, res.Stdout, res.Stderr)
	}
	if (res.Code == 0) != s.Complete {
		t.Errorf("status exits %d but says complete=%v", res.Code, s.Complete)
	}
	return s
}
