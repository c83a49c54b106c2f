package loader

import (
	"slices"
	"testing"

	"github.com/sluicemesh/sluice/internal/testbed"
)

func TestPortRanges(t *testing.T) {
	for _, tt := range []struct {
		ports []uint16
		text  string
	}{
		{nil, ""},
		{[]uint16{8080}, "8080"},
		{[]uint16{0, 1, 2, 80, 8080, 8081, 65535}, "0-2,80,8080-8081,65535"},
		{[]uint16{65534, 65535}, "65534-65535"},
	} {
		if got := portRanges(tt.ports); got != tt.text {
			t.Errorf("portRanges(%v) = %q, want %q", tt.ports, got, tt.text)
		}
		if got, err := parsePortRanges(tt.text); err != nil || !slices.Equal(got, tt.ports) {
			t.Errorf("parsePortRanges(%q) = %v, %v, want %v", tt.text, got, err, tt.ports)
		}
	}
	for _, bad := range []string{"x", "80-", "90-80", "65536", "1-2-3"} {
		if _, err := parsePortRanges(bad); err == nil {
			t.Errorf("parsePortRanges(%q) took it", bad)
		}
	}
}

// The offload ports live in the install record, not in the policy maps:
// install writes them, the sidecar's reader and status read them, and a
// rerun that changes only them says the policy was written.
func TestOffloadPortsInRecord(t *testing.T) {
	privileged(t)
	plan := testPlan()
	plan.OffloadPorts, plan.OffloadInboundPorts = []uint16{8080, 8081, 9000}, []uint16{443}
	target := installedPod(t, testbed.Must(t), "app", plan)
	out, in, err := OffloadPorts(target)
	if err != nil || !slices.Equal(out, plan.OffloadPorts) || !slices.Equal(in, plan.OffloadInboundPorts) {
		t.Errorf("offload ports %v %v (%v), want %v %v", out, in, err, plan.OffloadPorts, plan.OffloadInboundPorts)
	}
	if s, err := Status(target); err != nil || !s.Plan.Equal(plan) {
		t.Errorf("status plan %+v (%v), want %+v", s.Plan, err, plan)
	}
	if res, err := Install(target, plan, nil, quiet); err != nil || len(res.Changes) != 0 {
		t.Errorf("rerun of the same install changed %v (%v)", res.Changes, err)
	}
	plan.OffloadPorts = []uint16{7070}
	res, err := Install(target, plan, nil, quiet)
	if err != nil || !slices.Contains(res.Changes, "policy written") {
		t.Errorf("rerun with other offload ports changed %v (%v), want the policy written", res.Changes, err)
	}
	if out, _, err := OffloadPorts(target); err != nil || !slices.Equal(out, []uint16{7070}) {
		t.Errorf("offload ports after the rerun: %v (%v), want [7070]", out, err)
	}
}
