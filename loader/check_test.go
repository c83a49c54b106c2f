package loader

import (
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/sluicemesh/sluice/internal/testbed"
)

// TestCheck loads every program through the verifier and attaches one to a
// throwaway cgroup: a kernel or BPF change that breaks loading fails here.
// An optional capability may be missing (on Debian's 6.1, splice's), as
// long as check says why.
func TestCheck(t *testing.T) {
	privileged(t)
	for _, p := range Check() {
		switch {
		case p.Err != nil && p.Optional:
			t.Logf("optional, not on this kernel: %s: %v", p.Name, p.Err)
		case p.Err != nil:
			t.Errorf("%s: %v", p.Name, p.Err)
		}
	}
}

// The verifier's work is most of the time the first install on a node
// takes (later ones attach the programs it loaded): the instructions it
// walks, summed over every program, stay within a budget, so a change that
// multiplies the paths through a hook fails here instead of slowing every
// node's first pod unnoticed. An inlined helper in connect6 once doubled
// them (40,000 to 76,000) and install time rose from 122 to 147 ms. Finding
// each pod's maps in the node's arrays added 5,000.
func TestVerifierBudget(t *testing.T) {
	testbed.RequirePrivileged(t)
	coll, err := loadFresh()
	if err != nil {
		t.Fatal(err)
	}
	defer coll.Close()
	budget := 100_000
	var uts unix.Utsname
	if unix.Uname(&uts) == nil && strings.HasPrefix(unix.ByteSliceToString(uts.Release[:]), "6.1.") {
		// Debian's 6.1 walks 185,000 (make test-kernel): an older
		// verifier prunes fewer paths.
		budget = 200_000
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
