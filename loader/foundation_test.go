package loader

// Regression tests for the loader's share of issue 14's defects.

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/sluicemesh/sluice/bpf"
	"github.com/sluicemesh/sluice/internal/testbed"
)

// podCgroups makes a test pod and the cgroups rel... below its own, and
// removes them when the test ends (before the bed removes the pod).
func podCgroups(t testing.TB, rel ...string) []string {
	t.Helper()
	privileged(t)
	pod, err := testbed.Must(t).AddPod("app")
	if err != nil {
		t.Fatal(err)
	}
	var made, paths []string // made: shallowest first
	t.Cleanup(func() {
		for i := len(made) - 1; i >= 0; i-- {
			os.Remove(made[i])
		}
	})
	for _, r := range rel {
		p := filepath.Join(pod.Cgroup, r)
		var missing []string
		for d := p; d != pod.Cgroup; d = filepath.Dir(d) {
			if _, err := os.Stat(d); err != nil {
				missing = append([]string{d}, missing...)
			}
		}
		for _, d := range missing {
			if err := os.Mkdir(d, 0o755); err != nil {
				t.Fatal(err)
			}
			made = append(made, d)
		}
		paths = append(paths, p)
	}
	return paths
}

var nsCount atomic.Int32

// install installs on cgroup, in a network namespace of its own: Sluice
// captures one pod per namespace.
func install(t testing.TB, cgroup, pinDir string) Target {
	t.Helper()
	target, err := ResolveTarget(cgroup, pinDir)
	if err != nil {
		t.Fatal(err)
	}
	ns, err := testbed.Must(t).AddHost(fmt.Sprintf("ns%d", nsCount.Add(1)))
	if err != nil {
		t.Fatal(err)
	}
	target.Netns = ns.Netns
	if _, err := Install(target, testPlan(), nil, quiet); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { Uninstall(target, quiet) })
	return target
}

// Pins are keyed by cgroup id: cgroups a/b and a_b, and a systemd-style path
// full of dots, each get their own pins, and every command acts on its own
// pod's only.
func TestPinsBelongToOneCgroup(t *testing.T) {
	cgs := podCgroups(t, "a/b", "a_b", "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1.slice")
	var targets []Target
	for _, cg := range cgs {
		targets = append(targets, install(t, cg, ""))
	}
	seen := map[string]bool{}
	for _, tg := range targets {
		if seen[tg.PinDir] || strings.Contains(filepath.Base(tg.PinDir), ".") {
			t.Errorf("pin dir %s is shared or has a dot", tg.PinDir)
		}
		seen[tg.PinDir] = true
		s, err := Status(tg)
		if err != nil || !s.Complete || s.Target.Cgroup != tg.Cgroup {
			t.Errorf("status of %s: %v, complete %v, reports cgroup %s", tg.Cgroup, err, s.Complete, s.Target.Cgroup)
		}
	}
	// One pod's pins named for another: refused, nothing removed.
	wrong := targets[1]
	wrong.PinDir = targets[0].PinDir
	if _, err := Status(wrong); err == nil || !strings.Contains(err.Error(), "belong to cgroup "+targets[0].Cgroup) {
		t.Errorf("status through another pod's pins: %v", err)
	}
	if err := Uninstall(wrong, quiet); err == nil {
		t.Errorf("uninstall through another pod's pins succeeded")
	}
	if _, err := Install(wrong, testPlan(), nil, quiet); err == nil {
		t.Errorf("install into another pod's pins succeeded")
	}
	if err := Uninstall(targets[1], quiet); err != nil {
		t.Fatal(err)
	}
	for _, tg := range []Target{targets[0], targets[2]} {
		if s, err := Status(tg); err != nil || !s.Complete {
			t.Errorf("uninstalling a_b touched %s: %v %v", tg.Cgroup, err, s.Missing)
		}
	}
	// A gone cgroup is found by the path its pins record.
	if err := os.Remove(cgs[2]); err != nil {
		t.Fatal(err)
	}
	found, err := FindTarget(cgs[2], "")
	if err != nil || found.PinDir != targets[2].PinDir {
		t.Errorf("FindTarget of a removed cgroup: %+v, %v; want pins %s", found, err, targets[2].PinDir)
	}
	if err := Uninstall(found, quiet); err != nil {
		t.Errorf("uninstall after the cgroup is gone: %v", err)
	}
}

// Uninstall removes only what Sluice created and can prove is its own: a
// directory without a Sluice record is left whole, and a file someone adds
// to a Sluice directory stays (with the directory) and is named.
func TestUninstallRemovesOnlyItsOwn(t *testing.T) {
	cg := podCgroups(t, "pod")[0]
	user := filepath.Join(DefaultBPFFS, "sluice-test-user-"+filepath.Base(t.TempDir()))
	if err := os.MkdirAll(filepath.Join(user, "keep"), 0o700); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(user) })
	m, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.Array, KeySize: 4, ValueSize: 4, MaxEntries: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	if err := m.Pin(filepath.Join(user, "users_map")); err != nil {
		t.Fatal(err)
	}
	target, err := ResolveTarget(cg, user)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := Install(target, testPlan(), nil, quiet); err == nil || !strings.Contains(err.Error(), "holds files Sluice did not create") {
		t.Errorf("install into a user's directory: %v", err)
	}
	if err := Uninstall(target, quiet); err == nil || !strings.Contains(err.Error(), "not a Sluice pin directory") {
		t.Errorf("uninstall of a user's directory: %v", err)
	}
	for _, p := range []string{user, filepath.Join(user, "keep"), filepath.Join(user, "users_map")} {
		if _, err := os.Stat(p); err != nil {
			t.Errorf("%s is gone: %v", p, err)
		}
	}

	own := install(t, cg, "")
	extra := filepath.Join(own.PinDir, "users_map")
	if err := m.Pin(extra); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.Remove(extra); os.Remove(own.PinDir) })
	err = Uninstall(own, quiet)
	if err == nil || !strings.Contains(err.Error(), "users_map") {
		t.Errorf("uninstall with a foreign pin among Sluice's: %v", err)
	}
	entries, _ := os.ReadDir(own.PinDir)
	if len(entries) != 1 || entries[0].Name() != "users_map" {
		t.Errorf("left in %s: %v, want only users_map", own.PinDir, entries)
	}
	if progs := cgroupProgs(t, cg); len(progs) != 0 {
		t.Errorf("programs still attached: %v", progs)
	}
}

// A second Sluice through other pins is refused, on the same cgroup and
// below one that is already captured; the first stays as it was.
func TestNoSecondSluice(t *testing.T) {
	cgs := podCgroups(t, "pod", "pod/container")
	first := install(t, cgs[0], "")
	for _, tc := range []struct{ cgroup, pinDir string }{
		{cgs[0], filepath.Join(DefaultPinRoot, "second-"+filepath.Base(t.TempDir()))},
		{cgs[1], ""},
	} {
		target, err := ResolveTarget(tc.cgroup, tc.pinDir)
		if err != nil {
			t.Fatal(err)
		}
		_, err = Install(target, testPlan(), nil, quiet)
		if err == nil || !strings.Contains(err.Error(), "another Sluice install already captures") {
			t.Errorf("second install on %s: %v", tc.cgroup, err)
			Uninstall(target, quiet)
		}
		if _, err := os.Stat(target.PinDir); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("refused install left %s", target.PinDir)
		}
	}
	if progs := cgroupProgs(t, cgs[0]); len(progs) != len(cgroupHooks) {
		t.Errorf("%d programs on the pod's cgroup, want %d", len(progs), len(cgroupHooks))
	}
	if s, err := Status(first); err != nil || !s.Complete {
		t.Errorf("first install after the refusals: %v %v", err, s.Missing)
	}
}

// A rerun with the same plan changes nothing; with a new plan it switches
// the policy slot and keeps every link (no moment without capture); memory
// stays within the idle budget.
func TestRerunUpdatesInPlace(t *testing.T) {
	cg := podCgroups(t, "pod")[0]
	target := install(t, cg, "")
	before, err := Status(target)
	if err != nil {
		t.Fatal(err)
	}
	if res, err := Install(target, testPlan(), nil, quiet); err != nil || len(res.Changes) != 0 {
		t.Errorf("rerun with the same plan: %v, changes %v", err, res.Changes)
	}
	plan := testPlan()
	plan.ExcludeOutboundPorts = []uint16{22, 9090}
	res, err := Install(target, plan, []string{"-o", "22,9090"}, quiet)
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Changes) != 1 || res.Changes[0] != "policy written" {
		t.Errorf("rerun with a new plan changed %v, want the policy only", res.Changes)
	}
	after, err := Status(target)
	if err != nil {
		t.Fatal(err)
	}
	for i, l := range after.Links {
		if l.LinkID != before.Links[i].LinkID || l.ProgramID != before.Links[i].ProgramID {
			t.Errorf("%s: link %d program %d became link %d program %d", l.Pin, before.Links[i].LinkID, before.Links[i].ProgramID, l.LinkID, l.ProgramID)
		}
	}
	if !after.Plan.Equal(plan) {
		t.Errorf("plan in force %+v, want %+v", after.Plan, plan)
	}
	// The pod's own maps, the handshake table's buckets (32 KiB) the most
	// of them since the flow ring is the node's (124 KiB with it, 220
	// before the policy moved into the node's maps, 284 while each pod
	// loaded its own programs).
	if after.Memory.Total() > 64<<10 {
		t.Errorf("an idle pod holds %d KiB of kernel memory, budget 64 KiB (%+v)", after.Memory.Total()>>10, after.Memory)
	}
	t.Logf("idle pod: %d KiB (maps %d, programs %d)", after.Memory.Total()>>10, after.Memory.Maps>>10, after.Memory.Programs>>10)
}

// Every pin, and the pod's directory, is root's alone, also after a rerun
// that changes only the proxy group (the policy fast path): the sidecar
// reads none of them.
func TestPinsAreRootsAlone(t *testing.T) {
	cg := podCgroups(t, "pod")[0]
	target := install(t, cg, "")
	plan := testPlan()
	plan.ProxyGID = 2337
	res, err := Install(target, plan, []string{"-g", "2337"}, quiet)
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Changes) != 1 || res.Changes[0] != "policy written" {
		t.Errorf("rerun with a new group changed %v, want the policy only (the fast path)", res.Changes)
	}
	for _, name := range append([]string{""}, pinnedMaps...) {
		var st unix.Stat_t
		path := filepath.Join(target.PinDir, name)
		if err := unix.Stat(path, &st); err != nil {
			t.Fatal(err)
		}
		want := uint32(ownerMode)
		if name == "" {
			want = pinDirMode
		}
		if st.Uid != 0 || st.Gid != 0 || st.Mode&0o777 != want {
			t.Errorf("%s is %d:%d mode %o, want 0:0 mode %o", path, st.Uid, st.Gid, st.Mode&0o777, want)
		}
	}
}

// A constant set from Go before load is what the kernel holds in .rodata:
// setConstants' own value, and the page size load sets.
func TestConstantsReachTheKernel(t *testing.T) {
	privileged(t)
	rodataValue := func(t *testing.T, coll *ebpf.Collection) uint32 {
		t.Helper()
		spec, err := bpf.LoadSluice()
		if err != nil {
			t.Fatal(err)
		}
		v := spec.Variables[bpf.SluiceVarPageSize]
		var contents []byte
		if err := coll.Maps[v.SectionName].Lookup(uint32(0), &contents); err != nil {
			t.Fatal(err)
		}
		return binary.NativeEndian.Uint32(contents[v.Offset:])
	}

	spec, err := bpf.LoadSluice()
	if err != nil {
		t.Fatal(err)
	}
	const odd = 12345 // not the object's default, not a page size
	if err := setConstants(spec, map[string]any{bpf.SluiceVarPageSize: uint32(odd)}); err != nil {
		t.Fatal(err)
	}
	coll, err := ebpf.NewCollection(spec)
	if err != nil {
		t.Fatal(err)
	}
	defer coll.Close()
	if got := rodataValue(t, coll); got != odd {
		t.Errorf("page_size in the kernel is %d, want the %d set before load", got, odd)
	}

	loaded, err := loadFresh()
	if err != nil {
		t.Fatal(err)
	}
	defer loaded.Close()
	if got := rodataValue(t, loaded); got != uint32(os.Getpagesize()) {
		t.Errorf("page_size after load is %d, want %d", got, os.Getpagesize())
	}
}

// mkdirs reports the directories it made even when it fails half-way, so an
// undo removes exactly those.
func TestMkdirsReportsPartialWork(t *testing.T) {
	root := t.TempDir()
	made, err := mkdirs(filepath.Join(root, "a", "b", strings.Repeat("x", 300)), 0o711)
	if err == nil {
		t.Fatal("a 300-byte name was accepted")
	}
	if len(made) != 2 || made[0] != filepath.Join(root, "a") || made[1] != filepath.Join(root, "a", "b") {
		t.Errorf("mkdirs reported %v, want a and a/b", made)
	}
	if fi, err := os.Stat(made[1]); err != nil || fi.Mode().Perm() != 0o711 {
		t.Errorf("%s: %v, mode %v, want 0711", made[1], err, fi.Mode().Perm())
	}
}
