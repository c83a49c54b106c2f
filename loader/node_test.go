package loader

import (
	"errors"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"github.com/sluicemesh/sluice/bpf"
	"github.com/sluicemesh/sluice/internal/testbed"
	"github.com/sluicemesh/sluice/redirect"
)

// linkPrograms returns the program each pinned link of t runs, by pin.
func linkPrograms(t *testing.T, target Target) map[string]ebpf.ProgramID {
	t.Helper()
	out := map[string]ebpf.ProgramID{}
	for _, h := range allHooks {
		l, err := link.LoadPinnedLink(filepath.Join(target.PinDir, h.pin), nil)
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			t.Fatal(err)
		}
		info, err := l.Info()
		l.Close()
		if err != nil {
			t.Fatal(err)
		}
		out[h.pin] = info.Program
	}
	return out
}

// The first install on a node loads the programs; the next pod's install
// attaches the same ones and loads none. Each pod has its own maps and
// index. The node's programs stay while a pod runs them and go with the
// last.
func TestPodsShareTheNodesPrograms(t *testing.T) {
	privileged(t)
	// A pin root of its own: other tests' pods (the e2e package runs at
	// the same time) share the default root's node state.
	root, err := os.MkdirTemp("/sys/fs/bpf", "sluice-node-test-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(root) })
	var targets []Target
	var said []string
	bed := testbed.Must(t) // one bed: the pods' addresses differ
	for _, name := range []string{"one", "two"} {
		target := podIn(t, bed, root, name)
		res, err := Install(target, testPlan(), nil, quiet)
		if err != nil {
			t.Fatal(err)
		}
		said = append(said, strings.Join(res.Changes, "; "))
		targets = append(targets, target)
	}
	if !strings.Contains(said[0], "programs loaded on the node") {
		t.Errorf("the first install loaded no programs: %q", said[0])
	}
	if strings.Contains(said[1], "programs loaded on the node") {
		t.Errorf("the second pod's install loaded programs again: %q", said[1])
	}
	one, two := linkPrograms(t, targets[0]), linkPrograms(t, targets[1])
	if len(one) != len(hooksFor(false, true)) {
		t.Fatalf("first pod's links: %v, want one per hook", one)
	}
	for pin, id := range one {
		if two[pin] != id {
			t.Errorf("%s: the pods run programs %d and %d, want the node's one", pin, id, two[pin])
		}
	}
	var recs []record
	for _, tg := range targets {
		rec, err := readRecord(tg.PinDir)
		if err != nil {
			t.Fatal(err)
		}
		if rec.Index == 0 || rec.NetnsCookie == 0 {
			t.Errorf("record %+v: no index or network namespace", rec)
		}
		recs = append(recs, rec)
	}
	if recs[0].Index == recs[1].Index {
		t.Errorf("both pods have index %d", recs[0].Index)
	}

	dir := nodeDir(filepath.Dir(targets[0].PinDir), bpf.ObjectHash())
	if err := UninstallNode(root); err == nil || !strings.Contains(err.Error(), "still runs on the node's programs") {
		t.Errorf("uninstall --node with pods on the node: %v, want it refused", err)
	}
	if err := Uninstall(targets[0], quiet); err != nil {
		t.Fatal(err)
	}
	if s, err := Status(targets[1]); err != nil || !s.Complete {
		t.Errorf("the other pod after one uninstall: complete %v, missing %v, err %v", s.Complete, s.Missing, err)
	}
	if _, err := os.Stat(dir); err != nil {
		t.Errorf("the node's programs went with the first pod: %v", err)
	}
	// A third pod whose pins are removed behind Sluice's back stays
	// registered in the node's maps, and keeps nothing alive.
	third := targets[0]
	if _, err := Install(third, testPlan(), nil, quiet); err != nil {
		t.Fatal(err)
	}
	if err := os.RemoveAll(third.PinDir); err != nil {
		t.Fatal(err)
	}
	if err := Uninstall(targets[1], quiet); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("node state %s is still there after the last pod: %v", dir, err)
	}
	// What a first install killed while loading leaves: uninstall --node
	// removes it.
	if err := os.MkdirAll(nodeDir(root, "0123456789abcdef"), nodeDirMode); err != nil {
		t.Fatal(err)
	}
	if err := UninstallNode(root); err != nil {
		t.Errorf("uninstall --node: %v", err)
	}
	if _, err := os.Stat(filepath.Join(root, "node")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("uninstall --node left %s: %v", filepath.Join(root, "node"), err)
	}
	if err := UninstallNode(root); !errors.Is(err, ErrNotInstalled) {
		t.Errorf("uninstall --node again: %v, want ErrNotInstalled", err)
	}
}

// The hooks find their pod by network namespace: a second pod (another
// cgroup) in a namespace that already has one is refused, and nothing of
// it is left.
func TestOnePodPerNetworkNamespace(t *testing.T) {
	first := podTarget(t)
	if _, err := Install(first, testPlan(), nil, quiet); err != nil {
		t.Fatal(err)
	}
	cgs := podCgroups(t, "other")
	second, err := ResolveTarget(cgs[0], "")
	if err != nil {
		t.Fatal(err)
	}
	second.Netns = first.Netns
	_, err = Install(second, testPlan(), nil, quiet)
	if err == nil || !strings.Contains(err.Error(), "one pod per network namespace") {
		t.Fatalf("a second pod in the same network namespace: %v, want it refused", err)
	}
	if _, err := os.Stat(second.PinDir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the refused install left %s: %v", second.PinDir, err)
	}
	if s, err := Status(first); err != nil || !s.Complete {
		t.Errorf("the first pod after the refusal: complete %v, missing %v, err %v", s.Complete, s.Missing, err)
	}
}

// Install from outside a pod whose cgroup holds no process cannot tell the
// pod's network namespace: it is refused, saying to pass it, and nothing
// is left.
func TestInstallNeedsTheNetworkNamespace(t *testing.T) {
	cgs := podCgroups(t, "empty")
	target, err := ResolveTarget(cgs[0], "")
	if err != nil {
		t.Fatal(err)
	}
	_, err = Install(target, testPlan(), nil, quiet)
	if err == nil || !strings.Contains(err.Error(), "pass --netns") {
		t.Fatalf("install on an empty cgroup with no network namespace: %v, want it refused", err)
	}
	if _, err := os.Stat(target.PinDir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the refused install left %s: %v", target.PinDir, err)
	}
}

// A pod's index, freed by its uninstall, goes to the next pod with nothing
// of the first's policy left in it (install looks for a new index's entries
// in the node's maps only when its policy slots are not empty), and reruns
// with other plans replace the ports and CIDRs whole.
func TestPolicyOfAReusedIndex(t *testing.T) {
	privileged(t)
	root, err := os.MkdirTemp("/sys/fs/bpf", "sluice-node-test-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(root) })
	bed := testbed.Must(t)
	holder, first, second := podIn(t, bed, root, "holder"), podIn(t, bed, root, "first"), podIn(t, bed, root, "second")
	wide := testPlan()
	wide.ExcludeOutboundPorts = []uint16{22, 3306, 9090}
	wide.ExcludeCIDRs = []netip.Prefix{netip.MustParsePrefix("198.18.9.0/24")}
	// The holder keeps the node's state, and so the index, between pods.
	for _, in := range []struct {
		t    Target
		plan redirect.Plan
	}{{holder, testPlan()}, {first, wide}} {
		if _, err := Install(in.t, in.plan, nil, quiet); err != nil {
			t.Fatal(err)
		}
	}
	index := func(tg Target) uint32 {
		rec, err := readRecord(tg.PinDir)
		if err != nil {
			t.Fatal(err)
		}
		return rec.Index
	}
	freed := index(first)
	if err := Uninstall(first, quiet); err != nil {
		t.Fatal(err)
	}
	for i, plan := range []redirect.Plan{testPlan(), wide, testPlan()} {
		if _, err := Install(second, plan, nil, quiet); err != nil {
			t.Fatal(err)
		}
		if got := index(second); got != freed {
			t.Fatalf("the second pod has index %d, want the freed %d", got, freed)
		}
		p, err := Open(second, ReadOnly)
		if err != nil {
			t.Fatal(err)
		}
		got, err := p.Plan()
		p.Close()
		if err != nil || !got.Equal(plan.Normalize()) {
			t.Fatalf("install %d: plan in force %+v (%v), want %+v", i, got, err, plan.Normalize())
		}
	}
}

// podIn is a new pod of bed with inbound capture on its eth0, not
// installed, its pins under root ("": the default root); it is uninstalled
// at cleanup (registered after the bed: before the bed removes the pod).
func podIn(t *testing.T, bed *testbed.Bed, root, name string) Target {
	t.Helper()
	pod, err := bed.AddPod(name)
	if err != nil {
		t.Fatal(err)
	}
	target, err := ResolveTarget(pod.Cgroup, "")
	if err != nil {
		t.Fatal(err)
	}
	target.Netns, target.Interface = pod.Netns, "eth0"
	if root != "" {
		target.PinDir = filepath.Join(root, filepath.Base(target.PinDir))
	}
	t.Cleanup(func() {
		if err := Uninstall(target, quiet); err != nil && !errors.Is(err, ErrNotInstalled) {
			t.Error(err)
		}
	})
	return target
}

// DNS capture's hooks are attached with it and only with it: a rerun that
// turns it on attaches them (before connect, so a query is never sent to
// the DNS port with its answer's source left as loopback), one that turns
// it off removes them, and status finds nothing missing either way.
func TestDNSHooksFollowThePlan(t *testing.T) {
	privileged(t)
	target := podIn(t, testbed.Must(t), "", "dns")
	dns := testPlan()
	dns.RedirectDNS, dns.CaptureAllDNS, dns.DNSPort = true, true, 15053
	for _, step := range []struct {
		plan redirect.Plan
		want int
	}{{testPlan(), 0}, {dns, len(dnsHooks)}, {testPlan(), 0}} {
		if _, err := Install(target, step.plan, nil, quiet); err != nil {
			t.Fatal(err)
		}
		links := linkPrograms(t, target)
		got := 0
		for _, h := range dnsHooks {
			if _, ok := links[h.pin]; ok {
				got++
			}
		}
		if got != step.want || len(links) != len(hooksFor(false, true))+step.want {
			t.Errorf("redirect DNS %v: links %v, want %d of DNS capture's", step.plan.RedirectDNS, links, step.want)
		}
		st, err := Status(target)
		if err != nil {
			t.Fatal(err)
		}
		if len(st.Missing) != 0 || st.Plan.RedirectDNS != step.plan.RedirectDNS || st.Plan.DNSPort != step.plan.DNSPort {
			t.Errorf("redirect DNS %v: status missing %v, plan DNS %v port %d", step.plan.RedirectDNS, st.Missing, st.Plan.RedirectDNS, st.Plan.DNSPort)
		}
	}
}

// raiseProcs raises GOMAXPROCS for as long as any caller needs it, to the
// most any of them asked, and puts it back when the last is done.
func TestRaiseProcs(t *testing.T) {
	prev := runtime.GOMAXPROCS(0)
	t.Cleanup(func() { runtime.GOMAXPROCS(prev) })
	done1 := raiseProcs(prev + 3)
	if got := runtime.GOMAXPROCS(0); got != prev+3 {
		t.Fatalf("raised to %d, want %d", got, prev+3)
	}
	done2 := raiseProcs(prev + 5)
	done3 := raiseProcs(1)
	if got := runtime.GOMAXPROCS(0); got != prev+5 {
		t.Fatalf("raised to %d, want %d", got, prev+5)
	}
	done1()
	done3()
	if got := runtime.GOMAXPROCS(0); got != prev+5 {
		t.Fatalf("%d while a caller still needs %d", got, prev+5)
	}
	done2()
	if got := runtime.GOMAXPROCS(0); got != prev {
		t.Fatalf("%d after the last caller, want %d back", got, prev)
	}
	raiseProcs(1)()
	if got := runtime.GOMAXPROCS(0); got != prev {
		t.Fatalf("%d after a caller that needed no more, want %d", got, prev)
	}
}
