package main

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"time"

	"github.com/sluicemesh/sluice/loader"
	"github.com/sluicemesh/sluice/redirect"
)

// node is a parent cgroup of ours below the cgroup2 mount, holding pod
// cgroups (no process, no traffic) that sluice installs into, as init
// containers would.
type node struct {
	exe, parent string
	pods        []string
	firstNode   uint64 // the node state's memory once the first pod was installed
}

func newNode(exe, name string) (*node, error) {
	mount, err := loader.Cgroup2Mount()
	if err != nil {
		return nil, err
	}
	parent := filepath.Join(mount, fmt.Sprintf("%s-%d", name, os.Getpid()))
	if err := os.Mkdir(parent, 0o755); err != nil {
		return nil, err
	}
	return &node{exe: exe, parent: parent}, nil
}

// netnsName is the network namespace of pod i (with an interface eth0
// holding the pod's addresses, one of each family as a dual-stack pod's,
// so install attaches inbound capture and registers them as in a real
// pod): Sluice captures one pod per namespace, and a pod's exists before
// its init container runs.
func (n *node) netnsName(i int) string {
	return fmt.Sprintf("%s-%05d", filepath.Base(n.parent), i)
}

// add makes the next pod's cgroup and network namespace and times sluice
// install into them.
func (n *node) add() (time.Duration, error) {
	cg, ns, err := n.newPod()
	if err != nil {
		return 0, err
	}
	start := time.Now()
	if out, err := exec.Command(n.exe, "install", "--cgroup", cg, "--netns", ns).CombinedOutput(); err != nil {
		return 0, fmt.Errorf("install %s: %v: %s", cg, err, out)
	}
	took := time.Since(start)
	if len(n.pods) == 1 {
		m, err := loader.NodeMemory(loader.DefaultPinRoot)
		if err != nil {
			return 0, err
		}
		n.firstNode = m.Total()
	}
	return took, nil
}

// addResident makes the next pod and times its install by this process,
// already warm, as a resident one (the node's agent, for a CNI plugin)
// would make it: the same loader.Install as sluice install, without the
// process's start (Go's runtime and package initialization, most of an
// exec'd install).
func (n *node) addResident(plan redirect.Plan) (time.Duration, error) {
	cg, ns, err := n.newPod()
	if err != nil {
		return 0, err
	}
	start := time.Now()
	t, err := loader.ResolveTarget(cg, "")
	if err != nil {
		return 0, err
	}
	t.Netns, t.Interface = ns, "eth0"
	if _, err := loader.Install(t, plan, nil, slog.New(slog.DiscardHandler)); err != nil {
		return 0, fmt.Errorf("install %s: %w", cg, err)
	}
	return time.Since(start), nil
}

// newPod makes the next pod's cgroup and network namespace.
func (n *node) newPod() (cgroup, netns string, err error) {
	i := len(n.pods)
	cg := filepath.Join(n.parent, fmt.Sprintf("kubepods-besteffort-pod%05d.slice", i))
	if err := os.Mkdir(cg, 0o755); err != nil {
		return "", "", err
	}
	n.pods = append(n.pods, cg)
	ns := n.netnsName(i)
	v4 := fmt.Sprintf("198.19.%d.%d/16", i/250, i%250+1)
	v6 := fmt.Sprintf("2001:2:5ca1::%x/64", i+1)
	for _, args := range [][]string{{"netns", "add", ns}, {"-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", "peer0"},
		{"-n", ns, "addr", "add", v4, "dev", "eth0"}, {"-n", ns, "addr", "add", v6, "dev", "eth0", "nodad"}, {"-n", ns, "link", "set", "eth0", "up"}} {
		if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
			return "", "", fmt.Errorf("ip %v: %v: %s", args, err, out)
		}
	}
	return cg, "/run/netns/" + ns, nil
}

// kernelMemory is the kernel memory (memlock of maps and programs) Sluice
// holds for a node's pods.
type kernelMemory struct {
	pods, first uint64 // every pod's own maps, and the first pod's
	node        uint64 // the node state all pods share (programs, node maps)
	perPod      uint64 // what one idle pod adds: its own maps and its node map entries
}

// memory returns the kernel memory of the node's pods.
func (n *node) memory() (m kernelMemory, err error) {
	for i, cg := range n.pods {
		t, err := loader.ResolveTarget(cg, "")
		if err != nil {
			return m, err
		}
		s, err := loader.Status(t)
		if err != nil {
			return m, err
		}
		if !s.Complete {
			return m, fmt.Errorf("%s: incomplete: %v", cg, s.Missing)
		}
		if i == 0 {
			m.first = s.Memory.Total()
		}
		m.pods += s.Memory.Total()
	}
	node, err := loader.NodeMemory(loader.DefaultPinRoot)
	if err != nil {
		return m, err
	}
	m.node = node.Total()
	m.perPod = m.pods / uint64(max(len(n.pods), 1))
	if len(n.pods) > 1 && m.node > n.firstNode {
		m.perPod += (m.node - n.firstNode) / uint64(len(n.pods)-1)
	}
	return m, nil
}

// uninstall times sluice uninstall of every pod; the cgroups stay until close.
func (n *node) uninstall() ([]time.Duration, error) {
	var took []time.Duration
	for _, cg := range n.pods {
		start := time.Now()
		if out, err := exec.Command(n.exe, "uninstall", "--cgroup", cg).CombinedOutput(); err != nil {
			return took, fmt.Errorf("uninstall %s: %v: %s", cg, err, out)
		}
		took = append(took, time.Since(start))
	}
	return took, nil
}

// close uninstalls what is still installed (after uninstall, "nothing
// installed") and removes every cgroup.
func (n *node) close() error {
	var errs []error
	for i, cg := range n.pods {
		if out, err := exec.Command(n.exe, "uninstall", "--cgroup", cg).CombinedOutput(); err != nil {
			errs = append(errs, fmt.Errorf("uninstall %s: %v: %s", cg, err, out))
		}
		errs = append(errs, os.Remove(cg))
		if out, err := exec.Command("ip", "netns", "del", n.netnsName(i)).CombinedOutput(); err != nil {
			errs = append(errs, fmt.Errorf("ip netns del: %v: %s", err, out))
		}
	}
	return errors.Join(errors.Join(errs...), os.Remove(n.parent))
}
