package loader

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/btf"

	"github.com/sluicemesh/sluice/bpf"
	"github.com/sluicemesh/sluice/redirect"
)

func TestPodUID(t *testing.T) {
	for name, want := range map[string]string{
		"pod3f2a8c1e-5b7d-4e0a-9c6f-1d2e3f4a5b6c":                          "3f2a8c1e-5b7d-4e0a-9c6f-1d2e3f4a5b6c", // cgroupfs driver
		"kubepods-burstable-pod3f2a8c1e_5b7d_4e0a_9c6f_1d2e3f4a5b6c.slice": "3f2a8c1e-5b7d-4e0a-9c6f-1d2e3f4a5b6c", // systemd driver
		"/x/kubepods-pod3f2a8c1e_5b7d_4e0a_9c6f_1d2e3f4a5b6c.slice":        "3f2a8c1e-5b7d-4e0a-9c6f-1d2e3f4a5b6c", // guaranteed QoS
		"user-0.slice":      "",
		"system.slice":      "",
		"session-3.scope":   "",
		"podman-1234.scope": "",
		"kubepods-burstable-pod3f2a8c1e_5b7d_4e0a_9c6f_1d2e3f4a5b6c.slice/cri-containerd-1.scope": "",
	} {
		if got := PodUID(name); got != want {
			t.Errorf("PodUID(%s) = %q, want %q", name, got, want)
		}
	}
}

func TestRepairCommand(t *testing.T) {
	if got := repairCommand(record{ArgsSHA256: "0123456789abcdef"}); !strings.Contains(got, "same flags") || !strings.Contains(got, "0123456789ab") {
		t.Errorf("repairCommand of flags too long to record = %q", got)
	}
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--cgroup", "/sys/fs/cgroup/p", "-o", "9090"}, "sluice install --cgroup /sys/fs/cgroup/p -o 9090"},
		{nil, "sluice install (in the pod, as its init container ran it)"},
		{[]string{"istio-iptables", "-i", "*", "-x", ""}, "sluice istio-iptables -i '*' -x '' (in the pod, as its init container ran it)"},
	} {
		if got := repairCommand(record{Args: tc.args}); got != tc.want {
			t.Errorf("repairCommand(%q) = %q, want %q", tc.args, got, tc.want)
		}
	}
}

// The counters map keeps room to spare (COUNTER_SLOTS), so a build that adds
// counters reuses an older install's map instead of replacing it.
func TestCounterSlots(t *testing.T) {
	const counterSlots = 64
	spec, err := bpf.LoadSluice()
	if err != nil {
		t.Fatal(err)
	}
	if got := spec.Maps[bpf.SluiceMapCounters].InnerMap.MaxEntries; got != counterSlots {
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

// Each CIDR trie, the node's, holds at least a pod's two policy slots of
// redirect.MaxCIDRs, the limit install checks.
func TestCIDRTriesHoldTwoSlots(t *testing.T) {
	spec, err := bpf.LoadSluice()
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{bpf.SluiceMapIncludeCidrs, bpf.SluiceMapExcludeCidrs, bpf.SluiceMapKernelOnlyCidrs} {
		if got := spec.Maps[name].MaxEntries; got < 2*redirect.MaxCIDRs {
			t.Errorf("%s holds %d entries, want at least 2 slots of %d", name, got, redirect.MaxCIDRs)
		}
	}
}

// The pod maps install makes without parsing the object are laid out as
// the object's programs expect (the kernel checks every inner map against
// the first), and the names it opens on the node are the object's.
// isStruct reports whether a map's value type is a struct.
func isStruct(typ btf.Type) bool {
	_, ok := btf.UnderlyingType(typ).(*btf.Struct)
	return ok
}

func TestPodMapSpecs(t *testing.T) {
	spec, err := bpf.LoadSluice()
	if err != nil {
		t.Fatal(err)
	}
	specs := podMapSpecs()
	for _, name := range podMapNames {
		want := spec.Maps[name].InnerMap
		got := specs[name]
		if want == nil || got == nil {
			t.Errorf("%s: object's inner map %v, loader's %v", name, want, got)
			continue
		}
		if got.Type != want.Type || got.KeySize != want.KeySize || got.ValueSize != want.ValueSize ||
			got.MaxEntries != want.MaxEntries || got.Flags != want.Flags {
			t.Errorf("%s: loader makes %+v, the object declares %+v", name, got, want)
		}
		// Linux 6.1 takes an inner map only with the template's kind of
		// value: a struct, or not (podMapSpecs).
		if (got.Type == ebpf.Array || got.Type == ebpf.Hash) && isStruct(got.Value) != isStruct(want.Value) {
			t.Errorf("%s: the loader's value is %T, the object's %T: one a struct, the other not", name, got.Value, want.Value)
		}
	}
	if len(specs) != len(podMapNames) {
		t.Errorf("the loader knows %d pod maps, pins %d", len(specs), len(podMapNames))
	}
	progs, maps := objectNames()
	for _, name := range progs {
		if spec.Programs[name] == nil {
			t.Errorf("program %s is not in the object", name)
		}
	}
	for _, name := range maps {
		if spec.Maps[name] == nil {
			t.Errorf("map %s is not in the object", name)
		}
	}
	if len(progs) != len(spec.Programs) {
		t.Errorf("%d programs named, the object has %d", len(progs), len(spec.Programs))
	}
}

// From inside a pod, cgroup.procs lists the pod's other containers'
// processes as 0 (outside the reader's PID namespace): install takes the
// network namespace of the first process it can see, never /proc/0.
func TestNetnsOfCgroupSkipsInvisibleProcesses(t *testing.T) {
	root := t.TempDir()
	for dir, procs := range map[string]string{"a-pause": "0\n0\n", "b-init": strconv.Itoa(os.Getpid()) + "\n"} {
		if err := os.Mkdir(filepath.Join(root, dir), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(root, dir, "cgroup.procs"), []byte(procs), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want := filepath.Join("/proc", strconv.Itoa(os.Getpid()), "ns", "net")
	if got := netnsOfCgroup(root); got != want {
		t.Errorf("netnsOfCgroup = %q, want %q", got, want)
	}
	if got := netnsOfCgroup(filepath.Join(root, "a-pause")); got != "" {
		t.Errorf("netnsOfCgroup of a cgroup of invisible processes = %q, want \"\" (the caller's)", got)
	}
	if !othersIn(filepath.Join(root, "a-pause")) || othersIn(filepath.Join(root, "b-init")) {
		t.Error("othersIn: invisible processes are others, this one is not")
	}
}

// The CNI plugin finds a pod's cgroup by its uid, with either of the
// kubelet's drivers, without walking the rest of the tree.
func TestFindPodByUID(t *testing.T) {
	root := t.TempDir()
	const uid = "1b4e28ba-2fa1-11d2-883f-0016d3cca427"
	systemd := filepath.Join(root, "kubepods.slice", "kubepods-burstable.slice", "kubepods-burstable-pod1b4e28ba_2fa1_11d2_883f_0016d3cca427.slice")
	cgroupfs := filepath.Join(root, "kubepods", "besteffort", "pod2b4e28ba-2fa1-11d2-883f-0016d3cca427")
	decoy := filepath.Join(root, "system.slice", "kubepods-burstable-pod3b4e28ba_2fa1_11d2_883f_0016d3cca427.slice")
	for _, d := range []string{systemd, cgroupfs, decoy} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	for want, uid := range map[string]string{
		systemd:  uid,
		cgroupfs: "2b4e28ba-2fa1-11d2-883f-0016d3cca427",
		"":       "3b4e28ba-2fa1-11d2-883f-0016d3cca427", // outside the kubelet's part
	} {
		if got := findPod(root, uid, 4); got != want {
			t.Errorf("findPod(%s) = %q, want %q", uid, got, want)
		}
	}
	// The runtime's cgroupPath, when it names the pod, is taken as it is;
	// one that names another pod is not.
	hint, _ := filepath.Rel(root, decoy)
	if got, err := podCgroupIn([]string{root}, "", "3b4e28ba-2fa1-11d2-883f-0016d3cca427", hint); err != nil || got != decoy {
		t.Errorf("with the runtime's path: %q, %v", got, err)
	}
	if got, err := podCgroupIn([]string{root}, "", uid, hint); err != nil || got != systemd {
		t.Errorf("with another pod's path as the hint: %q, %v; want the search's %q", got, err, systemd)
	}
}
