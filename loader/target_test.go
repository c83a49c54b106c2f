package loader

import (
	"testing"

	"github.com/sluicemesh/sluice/bpf"
)

func TestPodCgroupName(t *testing.T) {
	for name, want := range map[string]bool{
		"pod3f2a8c1e-5b7d-4e0a-9c6f-1d2e3f4a5b6c":                          true, // cgroupfs driver
		"kubepods-burstable-pod3f2a8c1e_5b7d_4e0a_9c6f_1d2e3f4a5b6c.slice": true, // systemd driver
		"kubepods-pod3f2a8c1e_5b7d_4e0a_9c6f_1d2e3f4a5b6c.slice":           true, // guaranteed QoS
		"user-0.slice":      false,
		"system.slice":      false,
		"session-3.scope":   false,
		"podman-1234.scope": false,
	} {
		if got := podCgroupName.MatchString(name); got != want {
			t.Errorf("%s: pod cgroup %v, want %v", name, got, want)
		}
	}
}

func TestRepairCommand(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--cgroup", "/sys/fs/cgroup/p", "-o", "9090"}, "sluice install --cgroup /sys/fs/cgroup/p -o 9090"},
		{nil, "sluice install (in the pod, as its init container ran it)"},
		{[]string{"istio-iptables", "-i", "*", "-x", ""}, "sluice istio-iptables -i '*' -x '' (in the pod, as its init container ran it)"},
	} {
		if got := repairCommand(tc.args); got != tc.want {
			t.Errorf("repairCommand(%q) = %q, want %q", tc.args, got, tc.want)
		}
	}
}

// The loader's idea of the counters map's size is the object's, so an
// upgrade from an older, smaller map replaces it and one from this build
// reuses it.
func TestCounterSlots(t *testing.T) {
	spec, err := bpf.LoadSluice()
	if err != nil {
		t.Fatal(err)
	}
	if got := spec.Maps[bpf.SluiceMapCounters].MaxEntries; got != counterSlots {
		t.Errorf("counters map has %d entries, loader expects %d", got, counterSlots)
	}
}

func TestMatchStar(t *testing.T) {
	const cg = "/sys/fs/cgroup/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod3f2a_5b7d.slice"
	for pattern, want := range map[string]bool{
		cg:                       true,
		"*pod3f2a*":              true,
		"*pod3f2a":               false,
		"/sys/fs/cgroup/*":       true,
		"*kubepods*burstable*":   true,
		"*besteffort*":           false,
		"/sys/fs/cgroup/unified": false,
		"*":                      true,
		"*.slice":                true,
	} {
		if got := matchStar(pattern, cg); got != want {
			t.Errorf("matchStar(%q) = %v, want %v", pattern, got, want)
		}
	}
}
