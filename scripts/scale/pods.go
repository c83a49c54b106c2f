package main

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"time"

	"github.com/sluicemesh/sluice/loader"
)

// node is a parent cgroup of ours below the cgroup2 mount, holding pod
// cgroups (no process, no traffic) that sluice installs into, as init
// containers would.
type node struct {
	exe, parent string
	pods        []string
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

// netnsName is the network namespace of pod i (with an interface eth0,
// so install attaches inbound capture as in a real pod): Sluice captures
// one pod per namespace, and a pod's exists before its init container
// runs.
func (n *node) netnsName(i int) string {
	return fmt.Sprintf("%s-%05d", filepath.Base(n.parent), i)
}

// add makes the next pod's cgroup and network namespace and times sluice
// install into them.
func (n *node) add() (time.Duration, error) {
	i := len(n.pods)
	cg := filepath.Join(n.parent, fmt.Sprintf("kubepods-besteffort-pod%05d.slice", i))
	if err := os.Mkdir(cg, 0o755); err != nil {
		return 0, err
	}
	n.pods = append(n.pods, cg)
	ns := n.netnsName(i)
	for _, args := range [][]string{{"netns", "add", ns}, {"-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", "peer0"}, {"-n", ns, "link", "set", "eth0", "up"}} {
		if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
			return 0, fmt.Errorf("ip %v: %v: %s", args, err, out)
		}
	}
	start := time.Now()
	if out, err := exec.Command(n.exe, "install", "--cgroup", cg, "--netns", "/run/netns/"+n.netnsName(i)).CombinedOutput(); err != nil {
		return 0, fmt.Errorf("install %s: %v: %s", cg, err, out)
	}
	return time.Since(start), nil
}

// memory returns the kernel memory (memlock of maps and programs) of every
// pod, and of the first.
func (n *node) memory() (total, first uint64, err error) {
	for i, cg := range n.pods {
		t, err := loader.ResolveTarget(cg, "")
		if err != nil {
			return 0, 0, err
		}
		s, err := loader.Status(t)
		if err != nil {
			return 0, 0, err
		}
		if !s.Complete {
			return 0, 0, fmt.Errorf("%s: incomplete: %v", cg, s.Missing)
		}
		if i == 0 {
			first = s.Memory.Total()
		}
		total += s.Memory.Total()
	}
	return total, first, nil
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
