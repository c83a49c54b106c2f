package loader

import (
	"net/netip"
	"strings"
	"testing"
)

// The install record holds the plan for Upgrade when it fits, and leaves it
// out (with the flags, kept as their digest) when it does not: the record
// is still written, and such a pod moves to a new build by its install.
func TestRecordKeepsThePlanThatFits(t *testing.T) {
	plan := testPlan().Normalize()
	small := record{Format: recordFormat, Cgroup: "/sys/fs/cgroup/pod", Args: []string{"-b", "8080"}, Plan: &plan}
	m, err := small.encode()
	if err != nil {
		t.Fatal(err)
	}
	got, err := decodeRecord(m)
	if err != nil {
		t.Fatal(err)
	}
	if got.Plan == nil || !got.Plan.Equal(plan) {
		t.Errorf("the record's plan came back as %+v, want %+v", got.Plan, plan)
	}

	big := plan
	var cidrs []string
	for i := range 400 {
		p := netip.PrefixFrom(netip.AddrFrom4([4]byte{198, 18, byte(i / 256), byte(i)}), 32)
		big.ExcludeCIDRs = append(big.ExcludeCIDRs, p)
		cidrs = append(cidrs, p.String())
	}
	large := record{Format: recordFormat, Cgroup: "/sys/fs/cgroup/pod", Args: []string{"-x", strings.Join(cidrs, ",")}, Plan: &big}
	if m, err = large.encode(); err != nil {
		t.Fatalf("a record whose plan does not fit: %v", err)
	}
	if got, err = decodeRecord(m); err != nil {
		t.Fatal(err)
	}
	if got.Plan != nil || got.Args != nil || got.ArgsSHA256 != large.argsDigest() {
		t.Errorf("a record too large kept plan %v, args %d, digest %q; want neither, and the flags' digest", got.Plan != nil, len(got.Args), got.ArgsSHA256)
	}
}
