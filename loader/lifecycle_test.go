package loader

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"github.com/sluicemesh/sluice/bpf"
	"github.com/sluicemesh/sluice/internal/testbed"
	"github.com/sluicemesh/sluice/redirect"
)

// podTarget is a fresh pod's target with inbound capture on its eth0.
func podTarget(t *testing.T) Target {
	t.Helper()
	testbed.RequirePrivileged(t)
	return podIn(t, testbed.Must(t), "", "app")
}

// splicePlan is the default plan with splice, where the kernel counts
// spliced bytes; elsewhere (install refuses splice there:
// TestSpliceRefusedWhereTheKernelCannotCountIt) the plan without it, whose
// install pins and attaches the same maps and programs.
func splicePlan(t *testing.T) redirect.Plan {
	t.Helper()
	p := redirect.DefaultPolicy()
	if err := spliceBacklogBTF(); err != nil {
		t.Logf("without splice, which this kernel cannot count: %v", err)
	} else {
		p.Splice = true
	}
	plan, err := p.Plan()
	if err != nil {
		t.Fatal(err)
	}
	return plan
}

// expectNothingLeft fails unless t has no pins and no Sluice program runs
// on its cgroup or network namespace.
func expectNothingLeft(t *testing.T, target Target, after string) {
	t.Helper()
	if _, err := os.Stat(target.PinDir); !errors.Is(err, os.ErrNotExist) {
		entries, _ := os.ReadDir(target.PinDir)
		t.Errorf("%s: pin dir %s is still there (%d entries)", after, target.PinDir, len(entries))
	}
	if err := otherSluice(target, target.Interface != "", nil); err != nil {
		t.Errorf("%s: %v", after, err)
	}
	// The pod was the node's only one here: its programs went with it.
	if dir := nodeDir(filepath.Dir(target.PinDir), bpf.ObjectHash()); dirExists(dir) {
		entries, _ := os.ReadDir(dir)
		t.Errorf("%s: node state %s is still there (%d entries)", after, dir, len(entries))
	}
}

func dirExists(dir string) bool {
	_, err := os.Stat(dir)
	return err == nil
}

// An injected failure at every step of a fresh install (load, each pin,
// each attach, the record, the policy) leaves nothing behind, and the next
// install then succeeds.
func TestInstallFailureAtEveryStepLeavesNothing(t *testing.T) {
	target := podTarget(t)
	plan := splicePlan(t)
	var steps []string
	testFault = func(step string) error { steps = append(steps, step); return nil }
	t.Cleanup(func() { testFault = nil })
	if _, err := Install(target, plan, nil, quiet); err != nil {
		t.Fatal(err)
	}
	if err := Uninstall(target, quiet); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"load", "pin meta", "pin counters", "attach link_connect4", "pin link_connect4", "attach link_sk_lookup", "pin link_sk_lookup", "write policy", "finish record"} {
		if !slices.Contains(steps, want) {
			t.Fatalf("install went through %v, which lacks %q", steps, want)
		}
	}
	injected := errors.New("injected failure")
	for _, step := range steps {
		testFault = func(s string) error {
			if s == step {
				return injected
			}
			return nil
		}
		_, err := Install(target, plan, nil, quiet)
		if !errors.Is(err, injected) {
			t.Fatalf("failing at %q: install returned %v", step, err)
		}
		expectNothingLeft(t, target, "install failed at "+step)
	}
	testFault = nil
	if _, err := Install(target, plan, nil, quiet); err != nil {
		t.Fatalf("install after the failures: %v", err)
	}
	if s, err := Status(target); err != nil || !s.Complete {
		t.Fatalf("status after the failures: %v, missing %v", err, s.Missing)
	}
	t.Logf("failed at each of %d steps: %s", len(steps), strings.Join(steps, ", "))
}

// 100 install/uninstall cycles leave no pins and no attachments, no map or
// program of any cycle survives it, and the process's file descriptors do
// not grow. Objects are followed by id rather than counted, since other
// tests may load programs at the same time.
func TestInstallUninstallCycles(t *testing.T) {
	target := podTarget(t)
	plan := splicePlan(t)
	var maps []ebpf.MapID
	var progs []ebpf.ProgramID
	cycle := func() {
		t.Helper()
		if _, err := Install(target, plan, nil, quiet); err != nil {
			t.Fatal(err)
		}
		m, p := installedIDs(t, target)
		maps, progs = append(maps, m...), append(progs, p...)
		if err := Uninstall(target, quiet); err != nil {
			t.Fatal(err)
		}
	}
	cycle() // warm up: lazily opened descriptors (netlink, BTF) stay
	fds := openFDs(t)
	for range 100 {
		cycle()
	}
	expectNothingLeft(t, target, "100 cycles")
	if n := openFDs(t); n > fds {
		t.Errorf("open file descriptors grew from %d to %d over 100 cycles", fds, n)
	}
	// A program's maps are released an RCU grace period after the
	// program: give the last cycle's a moment.
	var left []string
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		left = leftOver(maps, progs)
		if len(left) == 0 || time.Now().After(deadline) {
			break
		}
	}
	if len(left) > 0 {
		t.Errorf("%d of the %d maps and %d programs of 101 cycles still exist: %v", len(left), len(maps), len(progs), left)
	}
	if len(maps) < 101*len(pinnedMaps) || len(progs) < 101*9 {
		t.Errorf("followed %d maps and %d programs: fewer than every cycle's", len(maps), len(progs))
	}
}

// leftOver names the maps and programs of ids that still exist.
func leftOver(maps []ebpf.MapID, progs []ebpf.ProgramID) []string {
	var left []string
	for i, id := range maps {
		if m, err := ebpf.NewMapFromID(id); err == nil {
			info, _ := m.Info()
			left = append(left, fmt.Sprintf("map %s (#%d)", info.Name, i))
			m.Close()
		}
	}
	for _, id := range progs {
		if p, err := ebpf.NewProgramFromID(id); err == nil {
			info, _ := p.Info()
			left = append(left, "program "+info.Name)
			p.Close()
		}
	}
	return left
}

// installedIDs lists the ids of the maps pinned for target and of the
// programs its pinned links run.
func installedIDs(t *testing.T, target Target) ([]ebpf.MapID, []ebpf.ProgramID) {
	t.Helper()
	entries, err := os.ReadDir(target.PinDir)
	if err != nil {
		t.Fatal(err)
	}
	var maps []ebpf.MapID
	var progs []ebpf.ProgramID
	for _, e := range entries {
		pin := filepath.Join(target.PinDir, e.Name())
		if l, err := link.LoadPinnedLink(pin, nil); err == nil {
			if info, err := l.Info(); err == nil {
				progs = append(progs, info.Program)
			}
			l.Close()
			continue
		}
		if m, err := ebpf.LoadPinnedMap(pin, nil); err == nil {
			if info, err := m.Info(); err == nil {
				if id, ok := info.ID(); ok {
					maps = append(maps, id)
				}
			}
			m.Close()
		}
	}
	return maps, progs
}

func openFDs(t *testing.T) int {
	t.Helper()
	runtime.GC()
	entries, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(entries)
}
