package loader

import (
	"slices"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/sluicemesh/sluice/internal/testbed"
)

// TestCheck loads every program through the verifier and attaches one to a
// throwaway cgroup: a kernel or BPF change that breaks loading fails here.
// An optional capability may be missing (on Debian's 6.1, splice), as long
// as check says why; every probe a capability names is one Check makes.
func TestCheck(t *testing.T) {
	privileged(t)
	r := Check(NewProbe(ProbeSockDiag, nil))
	for _, p := range r.Probes {
		if p.Err != nil {
			t.Logf("probe failed: %s: %v", p.Name, p.Err)
		}
	}
	for _, c := range r.Capabilities {
		switch {
		case c.Available:
		case c.Core:
			t.Errorf("core capability %s: %s", c.Name, c.Why)
		case strings.Contains(c.Why, "not probed"):
			t.Errorf("%s rests on a probe Check does not make: %s", c.Name, c.Why)
		default:
			t.Logf("optional, not on this kernel (%s): %s: %s", r.Kernel, c.Name, c.Why)
		}
	}
	if missing := r.CoreMissing(); len(missing) > 0 {
		t.Errorf("CoreMissing = %v", missing)
	}
}

// A capability is available only when every probe it rests on passed, and
// says which failed first; the core is what check's exit status follows.
func TestCapabilitiesFollowTheirProbes(t *testing.T) {
	var probes []Probe
	for _, c := range capabilities {
		for _, name := range c.probes {
			probes = append(probes, NewProbe(name, nil))
		}
	}
	for i := range probes {
		if probes[i].Name == probeSpliceCount {
			probes[i] = NewProbe(probeSpliceCount, errNoSpliceBacklog)
		}
	}
	r := Report{Capabilities: capabilitiesOf(probes)}
	got := map[string]Capability{}
	for _, c := range r.Capabilities {
		got[c.Name] = c
	}
	for _, name := range []string{"splice", "offload"} {
		if c := got[name]; c.Available || !strings.Contains(c.Why, "msg_tot_len") {
			t.Errorf("%s with msg_tot_len missing: available %v, why %q", name, c.Available, c.Why)
		}
	}
	if missing := r.CoreMissing(); len(missing) != 0 {
		t.Errorf("an optional capability missing took the core: %v", missing)
	}

	withoutSkLookup := slices.DeleteFunc(slices.Clone(probes), func(p Probe) bool { return p.Name == probeNetnsLink })
	r = Report{Capabilities: capabilitiesOf(withoutSkLookup)}
	if missing := r.CoreMissing(); len(missing) != 1 || !strings.Contains(missing[0], "inbound") {
		t.Errorf("without sk_lookup links, CoreMissing = %v, want inbound", missing)
	}
}

func TestOlderThanMinimum(t *testing.T) {
	for release, want := range map[string]bool{
		"5.15.0-91-generic": true, "5.19.17": true, "4.19.0": true,
		"6.1.0-57-cloud-amd64": false, "6.12.118+deb12-cloud-amd64": false, "6.18.44-fc-v1272": false, "7.0.0": false,
		"": false, "unknown": false,
	} {
		if got := olderThanMinimum(release); got != want {
			t.Errorf("olderThanMinimum(%q) = %v, want %v", release, got, want)
		}
	}
}

// The verifier's work is most of the time the first install on a node
// takes (later ones attach the programs it loaded): the instructions it
// walks, summed over every program, stay within a budget, so a change that
// multiplies the paths through a hook fails here instead of slowing every
// node's first pod unnoticed. An inlined helper in connect6 once doubled
// them (40,000 to 76,000) and install time rose from 122 to 147 ms. Finding
// each pod's maps in the node's arrays added 5,000; DNS capture 8,000
// (97,300 to 105,300: its four programs, and connect's UDP and port-53
// paths, global functions so they are walked once), so the budget went
// from 100,000 to 110,000 (6.1's from 200,000 to 215,000).
func TestVerifierBudget(t *testing.T) {
	testbed.RequirePrivileged(t)
	coll, err := loadFresh()
	if err != nil {
		t.Fatal(err)
	}
	defer coll.Close()
	budget := 110_000
	var uts unix.Utsname
	if unix.Uname(&uts) == nil && strings.HasPrefix(unix.ByteSliceToString(uts.Release[:]), "6.1.") {
		// Debian's 6.1 walked 185,000 before DNS capture (make
		// test-kernel): an older verifier prunes fewer paths.
		budget = 215_000
	}
	total := 0
	for name, p := range coll.Programs {
		info, err := p.Info()
		if err != nil {
			t.Fatal(err)
		}
		n, ok := info.VerifiedInstructions()
		if !ok {
			t.Skip("this kernel does not report verified instructions (Linux 5.16+)")
		}
		t.Logf("%s: %d", name, n)
		total += int(n)
	}
	if total > budget {
		t.Errorf("the verifier walked %d instructions, budget %d: a hook got more paths (inline less, or make the helper a global function)", total, budget)
	}
	t.Logf("verified instructions, all programs: %d (budget %d)", total, budget)
}
