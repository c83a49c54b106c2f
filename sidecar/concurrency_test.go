package sidecar

import (
	"os"
	"path/filepath"
	"testing"
)

func TestConcurrency(t *testing.T) {
	for _, c := range []struct {
		flag  int
		limit float64
		want  int
	}{
		{0, 0, DefaultConcurrency}, // no limit: never the node's CPUs
		{0, 0.5, 1},
		{0, 1, 1},
		{0, 1.5, 2},
		{0, 4, 4},
		{3, 0, 3},
		{8, 1, 8}, // the flag wins over the limit
	} {
		if got, from := concurrency(c.flag, c.limit); got != c.want || from == "" {
			t.Errorf("concurrency(%d, %g) = %d (%q), want %d", c.flag, c.limit, got, from, c.want)
		}
	}
}

func TestCPULimit(t *testing.T) {
	mount := t.TempDir()
	pod := filepath.Join(mount, "kubepods.slice", "pod1.slice")
	container := filepath.Join(pod, "cri-containerd-abc.scope")
	if err := os.MkdirAll(container, 0o755); err != nil {
		t.Fatal(err)
	}
	write := func(dir, s string) {
		t.Helper()
		if err := os.WriteFile(filepath.Join(dir, "cpu.max"), []byte(s), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	limit := func() float64 {
		t.Helper()
		l, err := cpuLimit(mount, container)
		if err != nil {
			t.Fatal(err)
		}
		return l
	}
	if l := limit(); l != 0 {
		t.Errorf("no cpu.max anywhere: %g, want 0", l)
	}
	write(container, "max 100000\n")
	write(pod, "max 100000\n")
	if l := limit(); l != 0 {
		t.Errorf("cpu.max max: %g, want 0", l)
	}
	write(container, "150000 100000\n")
	if l := limit(); l != 1.5 {
		t.Errorf("container at 1.5 CPUs: %g", l)
	}
	write(pod, "50000 100000\n")
	if l := limit(); l != 0.5 {
		t.Errorf("pod at 0.5 CPUs under a container at 1.5: %g, want the lower", l)
	}
	write(container, "garbage")
	if _, err := cpuLimit(mount, container); err == nil {
		t.Error("a cpu.max that does not parse: no error")
	}
}
