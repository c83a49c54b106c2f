package loader

import (
	"slices"
	"testing"

	"github.com/sluicemesh/sluice/internal/testbed"
)

// The offload ports live in the node's port sets, where sockops reads them:
// status shows them, and a rerun that changes only them writes the policy.
func TestOffloadPortsInPolicy(t *testing.T) {
	privileged(t)
	if err := spliceBacklogBTF(); err != nil {
		t.Skipf("install refuses offload ports on this kernel: %v", err)
	}
	plan := splicePlan(t)
	plan.OffloadPorts, plan.OffloadInboundPorts = []uint16{8080, 8081, 9000}, []uint16{443}
	target := installedPod(t, testbed.Must(t), "app", plan)
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
	if s, err := Status(target); err != nil || !slices.Equal(s.Plan.OffloadPorts, []uint16{7070}) {
		t.Errorf("offload ports after the rerun: %v (%v), want [7070]", s.Plan.OffloadPorts, err)
	}
}
