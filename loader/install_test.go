package loader

import (
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"github.com/sluicemesh/sluice/internal/testbed"
	"github.com/sluicemesh/sluice/redirect"
)

func privileged(t testing.TB) { testbed.RequirePrivileged(t) }

var quiet = slog.New(slog.NewTextHandler(io.Discard, nil))

func testPlan() redirect.Plan {
	return redirect.Plan{OutboundPort: 15001, InboundPort: 15006, ProxyUID: 1337, ProxyGID: 1337, IncludeAllCIDRs: true}
}

// alive reports whether a BPF object with this id still exists. It asks for
// the one id: listing every object races with other packages' tests, which
// load and free their own at the same time.
func alive(t *testing.T, kind string, id int) bool {
	t.Helper()
	var err error
	switch kind {
	case "prog":
		var p *ebpf.Program
		if p, err = ebpf.NewProgramFromID(ebpf.ProgramID(id)); err == nil {
			p.Close()
		}
	case "map":
		var m *ebpf.Map
		if m, err = ebpf.NewMapFromID(ebpf.MapID(id)); err == nil {
			m.Close()
		}
	case "link":
		var l link.Link
		if l, err = link.NewFromID(link.ID(id)); err == nil {
			l.Close()
		}
	}
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("look up %s %d: %v", kind, id, err)
	}
	return err == nil
}

// cgroupProgs lists the programs bpftool shows attached to cgroup.
func cgroupProgs(t *testing.T, cgroup string) []int {
	t.Helper()
	out, err := exec.Command("bpftool", "-j", "cgroup", "show", cgroup).Output()
	if err != nil {
		t.Fatalf("bpftool cgroup show %s: %v", cgroup, err)
	}
	var progs []struct {
		ID int `json:"id"`
	}
	if len(bytes.TrimSpace(out)) > 0 {
		if err := json.Unmarshal(out, &progs); err != nil {
			t.Fatalf("parse bpftool cgroup show: %v (%s)", err, out)
		}
	}
	ids := make([]int, len(progs))
	for i, p := range progs {
		ids[i] = p.ID
	}
	return ids
}

func progMaps(t *testing.T, prog int) []int {
	t.Helper()
	out, err := exec.Command("bpftool", "-j", "prog", "show", "id", strconv.Itoa(prog)).Output()
	if err != nil {
		t.Fatalf("bpftool prog show id %d: %v", prog, err)
	}
	var p struct {
		MapIDs []int `json:"map_ids"`
	}
	if err := json.Unmarshal(out, &p); err != nil {
		t.Fatal(err)
	}
	return p.MapIDs
}

// TestInstallUninstall installs on a real pod cgroup, then uninstalls, and
// checks that every program, map and link the install created (ids from
// bpftool and the pins) is gone, along with the pins. Other packages' tests
// load programs at the same time, so the check is by id, not by total count.
func TestInstallUninstall(t *testing.T) {
	privileged(t)
	pod, err := testbed.Must(t).AddPod("app")
	if err != nil {
		t.Fatal(err)
	}
	target, err := ResolveTarget(pod.Cgroup, "")
	if err != nil {
		t.Fatal(err)
	}
	target.Netns = pod.Netns
	if _, err := Install(target, testPlan(), nil, quiet); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if _, err := os.Stat(target.PinDir); err == nil {
			Uninstall(target, quiet)
		}
	})

	state, err := Status(target)
	if err != nil {
		t.Fatal(err)
	}
	if !state.Complete {
		t.Errorf("status says incomplete: %v", state.Missing)
	}
	progs := cgroupProgs(t, pod.Cgroup)
	if len(progs) != len(cgroupHooks) || len(state.Links) != len(cgroupHooks) {
		t.Fatalf("want %d programs attached through %d links, bpftool shows %d, status %d", len(cgroupHooks), len(cgroupHooks), len(progs), len(state.Links))
	}
	var links, maps []int
	for _, l := range state.Links {
		if !l.Attached || !slices.Contains(progs, int(l.ProgramID)) {
			t.Errorf("link %s: attached %v, program %d not among the cgroup's %v", l.Pin, l.Attached, l.ProgramID, progs)
		}
		links = append(links, int(l.LinkID))
	}
	for _, p := range progs {
		maps = append(maps, progMaps(t, p)...)
	}
	if got := state.Plan; got.OutboundPort != 15001 || !got.IncludeAllCIDRs || got.ProxyUID != 1337 {
		t.Errorf("status reads back %+v", got)
	}

	if err := Uninstall(target, quiet); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(target.PinDir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("pin dir %s still there after uninstall (err %v)", target.PinDir, err)
	}
	if left := cgroupProgs(t, pod.Cgroup); len(left) != 0 {
		t.Errorf("programs still attached to the cgroup: %v", left)
	}
	// The kernel frees a detached program after an RCU grace period and a
	// workqueue pass, and only then drops its maps: a map id can outlive the
	// uninstall by seconds (3 s seen here), so wait for it with a deadline.
	deadline := time.Now().Add(15 * time.Second)
	for {
		var leaked []string
		for kind, ids := range map[string][]int{"prog": progs, "map": maps, "link": links} {
			for _, id := range ids {
				if alive(t, kind, id) {
					leaked = append(leaked, kind+" "+strconv.Itoa(id))
				}
			}
		}
		if len(leaked) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("still loaded after uninstall: %v", leaked)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if err := Uninstall(target, quiet); !errors.Is(err, ErrNotInstalled) {
		t.Errorf("second uninstall: %v, want ErrNotInstalled", err)
	}
}

// TestInstallUndoesOnFailure makes the attach step fail (the "cgroup" is a
// plain directory) after the maps were pinned, and checks nothing is left.
func TestInstallUndoesOnFailure(t *testing.T) {
	privileged(t)
	notCgroup := t.TempDir()
	pinDir := filepath.Join(DefaultPinRoot, "test-undo-"+strconv.Itoa(os.Getpid()), "pod")
	_, err := Install(Target{Cgroup: notCgroup, CgroupID: 1, PinDir: pinDir}, testPlan(), nil, quiet)
	if err == nil {
		Uninstall(Target{Cgroup: notCgroup, PinDir: pinDir}, quiet)
		t.Fatal("install on a directory that is not a cgroup succeeded")
	}
	t.Logf("install failed as expected: %v", err)
	if _, err := os.Stat(filepath.Dir(pinDir)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("failed install left %s behind", filepath.Dir(pinDir))
	}
}
