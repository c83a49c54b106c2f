package testbed

import (
	"os"
	"path/filepath"
)

// RequirePrivileged skips a test that needs root, except under CI=true where
// a skipped privileged test would hide a failure.
func RequirePrivileged(tb TB) {
	tb.Helper()
	if os.Geteuid() == 0 {
		return
	}
	if os.Getenv("CI") == "true" {
		tb.Fatalf("test needs root (euid %d) and CI=true forbids skipping", os.Geteuid())
	}
	tb.Skip("needs root")
}

// WorldExecutable copies the running binary to a directory every user may
// enter, so it can be run under another uid (go test keeps its binary in a
// 0700 build directory). The copy is removed when the test ends.
func WorldExecutable(tb TB) string {
	tb.Helper()
	self, err := os.Executable()
	if err != nil {
		tb.Fatalf("find own binary: %v", err)
	}
	dir, err := os.MkdirTemp("", "sluice-exe-")
	if err != nil {
		tb.Fatalf("temp dir: %v", err)
	}
	tb.Cleanup(func() { os.RemoveAll(dir) })
	data, err := os.ReadFile(self)
	if err == nil {
		err = os.Chmod(dir, 0o755)
	}
	if err == nil {
		err = os.WriteFile(filepath.Join(dir, filepath.Base(self)), data, 0o755)
	}
	if err != nil {
		tb.Fatalf("copy %s for other users: %v", self, err)
	}
	return filepath.Join(dir, filepath.Base(self))
}
