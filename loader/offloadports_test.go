package loader

import (
	"encoding/binary"
	"slices"
	"strings"
	"testing"

	"github.com/cilium/ebpf"

	"github.com/sluicemesh/sluice/bpf"
	"github.com/sluicemesh/sluice/internal/testbed"
	"github.com/sluicemesh/sluice/redirect"
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

// An install whose record predates the offload ports kept them as two more
// port sets at the end of its policy: they still read, with the rest of
// its plan.
func TestOffloadPortsOfOlderInstall(t *testing.T) {
	privileged(t)
	policies, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.Array, KeySize: 4, ValueSize: uint32(legacyPolicySize), MaxEntries: 2})
	if err != nil {
		t.Fatal(err)
	}
	defer policies.Close()
	active, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.Array, KeySize: 4, ValueSize: 4, MaxEntries: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer active.Close()
	want := redirect.Plan{OutboundPort: 15001, InboundPort: 15006, ProxyUID: 1337, ProxyGID: 1337, IncludeAllCIDRs: true,
		ExcludeOutboundPorts: []uint16{22}, OffloadPorts: []uint16{80, 8080}, OffloadInboundPorts: []uint16{443}}
	e := entriesOf(want, 1)
	var offload [2][len(e.policy.Ports[0])]uint64
	offload[0][80>>6] |= 1 << (80 & 63)
	offload[0][8080>>6] |= 1 << (8080 & 63)
	offload[1][443>>6] |= 1 << (443 & 63)
	raw, err := binary.Append(nil, binary.NativeEndian, &e.policy)
	if err == nil {
		raw, err = binary.Append(raw, binary.NativeEndian, &offload)
	}
	if err != nil {
		t.Fatal(err)
	}
	if err := policies.Put(uint32(1), raw); err != nil {
		t.Fatal(err)
	}
	if err := active.Put(uint32(0), uint32(1)); err != nil {
		t.Fatal(err)
	}
	got, err := policyMapsOf(map[string]*ebpf.Map{bpf.SluiceMapPolicies: policies, bpf.SluiceMapPolicyActive: active}).readLegacy()
	if err != nil || !got.Equal(want) {
		t.Errorf("older install's plan:\n%+v (%v), want\n%+v", got, err, want)
	}
	if _, _, err := (policyMaps{policies: policies, active: active}).read(); err == nil || !strings.Contains(err.Error(), "policy") {
		t.Errorf("the current layout's reader read the older layout: %v", err)
	}
}
