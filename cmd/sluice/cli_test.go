package main

import (
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/sluicemesh/sluice/internal/testbed"
	"github.com/sluicemesh/sluice/loader"
)

// Every bad input gets one line on stderr naming the problem and the fix, a
// non-zero exit, and leaves nothing installed.
func TestInstallBadInput(t *testing.T) {
	privileged(t)
	pod, err := testbed.Must(t).AddPod("app")
	if err != nil {
		t.Fatal(err)
	}
	mount, err := loader.Cgroup2Mount()
	if err != nil {
		t.Fatal(err)
	}
	target, err := loader.ResolveTarget(pod.Cgroup, "")
	if err != nil {
		t.Fatal(err)
	}
	cg := []string{"install", "--cgroup", pod.Cgroup}
	tests := []struct {
		name string
		args []string
		code int
		want []string // the problem, then the fix
	}{
		{"unknown flag", append(cg, "--bogus"), 2, []string{"unknown flag -bogus", "sluice install --help"}},
		{"invalid CIDR", append(cg, "-x", "198.18.0.0/33"), 2, []string{`"198.18.0.0/33" is not a CIDR`, "want a.b.c.d/n"}},
		{"port 0", append(cg, "-p", "0"), 2, []string{"port 0 is out of range", "want 1-65535"}},
		{"port 70000", append(cg, "-z", "70000"), 2, []string{"port 70000 is out of range", "want 1-65535"}},
		{"uid not a number", append(cg, "-u", "istio-proxy"), 2, []string{`"istio-proxy" is not a numeric uid`, "give the number"}},
		{"no cgroup, not in a pod", []string{"install"}, 2, []string{"no --cgroup given", "use 'sluice install --cgroup' with the pod's cgroup v2 directory"}},
		{"cgroup does not exist", []string{"install", "--cgroup", filepath.Join(mount, "sluice-no-such-pod")}, 1, []string{"does not exist", "create it first"}},
		{"not cgroup v2", []string{"install", "--cgroup", t.TempDir()}, 1, []string{"is not a cgroup v2 directory", "pass a directory below the cgroup2 mount"}},
		{"root cgroup", []string{"install", "--cgroup", mount}, 1, []string{"is the root of the cgroup v2 hierarchy", "pass the pod's own cgroup"}},
		{"root as the proxy", append(cg, "-u", "0"), 2, []string{"would exempt every root process", "--allow-root-proxy"}},
		{"no such netns", append(cg, "--netns", "/run/netns/sluice-no-such-netns"), 1, []string{"does not exist", "pass the pod's network namespace"}},
		{"no such interface", append(cg, "--interface", "sluice-nope0"), 1, []string{"no interface sluice-nope0", "pass --interface"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			res := runCLI(t, sluice(t, tt.args...))
			expectOneLineError(t, res, tt.code, tt.want...)
			expectNothingInstalled(t, target)
		})
	}

	t.Run("no root", func(t *testing.T) {
		cmd := sluice(t, cg...)
		cmd.Path = testbed.WorldExecutable(t)
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
		res := runCLI(t, cmd)
		expectOneLineError(t, res, 1, "needs root", "run it as root")
		expectNothingInstalled(t, target)
	})
}

func expectOneLineError(t *testing.T, res cliResult, code int, want ...string) {
	t.Helper()
	if res.code != code {
		t.Errorf("exit code %d, want %d (stderr %q)", res.code, code, res.stderr)
	}
	if strings.Count(res.stderr, "\n") != 1 || !strings.HasPrefix(res.stderr, "sluice install: ") {
		t.Errorf("want one line 'sluice install: ...' on stderr, got %q", res.stderr)
	}
	for _, w := range want {
		if !strings.Contains(res.stderr, w) {
			t.Errorf("stderr %q does not say %q", res.stderr, w)
		}
	}
	if res.stdout != "" {
		t.Errorf("unexpected stdout %q", res.stdout)
	}
}

func expectNothingInstalled(t *testing.T, target loader.Target) {
	t.Helper()
	if _, err := os.Stat(target.PinDir); err == nil {
		t.Errorf("pins left at %s", target.PinDir)
	}
	if _, err := loader.Status(target); err == nil {
		t.Errorf("status reports an install on %s", target.Cgroup)
	}
}
