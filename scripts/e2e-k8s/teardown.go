package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/sluicemesh/sluice/loader"
)

// hostPaths are written by the kubelet, containerd, runc or the CNI plugins
// whatever their configuration says; teardown removes those that were not
// there before.
var hostPaths = []string{
	"/run/containerd", "/var/lib/kubelet", "/var/log/pods", "/var/log/containers",
	"/var/lib/cni", "/opt/containerd", "/run/runc", "/var/run/kubernetes", "/etc/cni",
	"/sys/fs/bpf/sluice",
}

// sysctls the kubelet (setupKernelTunables), the CNI bridge or containerd may set.
var sysctls = []string{
	"vm/overcommit_memory", "vm/panic_on_oom", "kernel/panic", "kernel/panic_on_oops",
	"kernel/keys/root_maxkeys", "kernel/keys/root_maxbytes",
	"net/ipv4/ip_forward", "net/ipv6/conf/all/forwarding", "net/ipv4/conf/all/route_localnet",
	"net/bridge/bridge-nf-call-iptables", "net/bridge/bridge-nf-call-ip6tables",
}

// hostState is what teardown must leave as it found.
type hostState struct {
	links, netns, mounts []string
	cgroups              []string // top-level directories of every hierarchy
	iptables             []string // iptables-save and ip6tables-save, counters dropped
	sysctls              map[string]string
	paths                map[string]bool
	bpffsPropagation     string // of /sys/fs/bpf: "shared:N", "master:N" or "" (private)
}

var counters = regexp.MustCompile(`\[\d+:\d+\]`)

func snapshot() (hostState, error) {
	s := hostState{sysctls: map[string]string{}, paths: map[string]bool{}}
	var err error
	if s.links, err = dirNames("/sys/class/net"); err != nil {
		return s, err
	}
	if s.netns, err = dirNames("/run/netns"); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return s, err
	}
	if s.mounts, err = mountPoints(); err != nil {
		return s, err
	}
	if s.bpffsPropagation, err = propagation(bpffs); err != nil {
		return s, err
	}
	hier, err := dirNames("/sys/fs/cgroup")
	if err != nil {
		return s, err
	}
	for _, h := range hier {
		ents, _ := os.ReadDir(filepath.Join("/sys/fs/cgroup", h))
		for _, e := range ents {
			if e.IsDir() {
				s.cgroups = append(s.cgroups, filepath.Join("/sys/fs/cgroup", h, e.Name()))
			}
		}
	}
	for _, cmd := range []string{"iptables-save", "ip6tables-save"} {
		out, err := exec.Command(cmd).Output()
		if err != nil {
			return s, fmt.Errorf("%s: %w", cmd, err)
		}
		for _, l := range strings.Split(string(out), "\n") {
			if l != "" && !strings.HasPrefix(l, "#") {
				s.iptables = append(s.iptables, cmd+": "+counters.ReplaceAllString(l, ""))
			}
		}
	}
	for _, k := range sysctls {
		if v, err := os.ReadFile(filepath.Join("/proc/sys", k)); err == nil {
			s.sysctls[k] = strings.TrimSpace(string(v))
		}
	}
	for _, p := range hostPaths {
		_, err := os.Lstat(p)
		s.paths[p] = err == nil
	}
	return s, nil
}

func dirNames(dir string) ([]string, error) {
	ents, err := os.ReadDir(dir)
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	return names, err
}

func mountPoints() ([]string, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var mps []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if fields := strings.Fields(sc.Text()); len(fields) > 4 {
			mps = append(mps, unescapeMount(fields[4]))
		}
	}
	return mps, sc.Err()
}

const bpffs = "/sys/fs/bpf"

// propagation is the optional fields of the mount at mp in mountinfo:
// "shared:N", "master:N", both, or "" for a private mount.
func propagation(mp string) (string, error) {
	data, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return "", err
	}
	found, prop := false, ""
	for _, l := range strings.Split(string(data), "\n") {
		f := strings.Fields(l)
		if len(f) < 7 || unescapeMount(f[4]) != mp {
			continue
		}
		found = true // the last mount on mp is the one seen
		end := slices.Index(f, "-")
		if end < 6 {
			end = 6
		}
		prop = strings.Join(f[6:end], " ")
	}
	if !found {
		return "", fmt.Errorf("%s is not a mount point", mp)
	}
	return prop, nil
}

func unescapeMount(s string) string {
	return strings.NewReplacer(`\040`, " ", `\011`, "\t", `\012`, "\n", `\134`, `\`).Replace(s)
}

// teardown stops everything the run started and removes what it and its
// processes left on the host, then compares the host with its baseline. It
// goes on after errors, so one failure leaves as little as it can.
func (c *cluster) teardown() error {
	slog.Info("tearing down")
	var errs []error
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	// Read before the kubelet removes the pods' cgroups.
	ids := append(podCgroupIDs(), c.seenIDs...)
	if c.apiUp() {
		// The kubelet stops the pods' sandboxes: CNI DEL, netns removed.
		// Every namespace's: the agent DaemonSet runs in sluice-system. The
		// controllers are deleted orphaning their pods, then the pods with a
		// 1 s grace period: pods deleted by cascade would get their own (30 s
		// by default), which busybox httpd, ignoring SIGTERM, uses up.
		if _, err := c.kubectl(ctx, "delete", "daemonsets,deployments,replicasets", "--all", "--all-namespaces", "--cascade=orphan"); err != nil {
			errs = append(errs, err)
		}
		if _, err := c.kubectl(ctx, "delete", "pods", "--all", "--all-namespaces", "--wait", "--timeout", "60s", "--grace-period", "1"); err != nil {
			errs = append(errs, err)
		}
		slog.Info("pods deleted")
		err := c.poll(ctx, 30*time.Second, "sandboxes stopped", func() error {
			out, err := c.ctr("tasks", "ls", "-q")
			if err == nil && len(strings.TrimSpace(string(out))) > 0 {
				err = fmt.Errorf("tasks running: %s", strings.Fields(string(out)))
			}
			return err
		})
		if err != nil {
			slog.Warn("tasks still running: killed below", "err", err)
		}
	}
	stop := func(name string) {
		for _, pr := range c.procs {
			if pr.name == name {
				start := time.Now()
				pr.stop(15 * time.Second)
				slog.Info("stopped", "process", name, "took", time.Since(start).Round(time.Millisecond))
			}
		}
	}
	stop("kubelet")
	if out, err := c.ctr("tasks", "ls", "-q"); err == nil {
		for _, id := range strings.Fields(string(out)) {
			_, _ = c.ctr("tasks", "kill", "-s", "SIGKILL", id)
			_, _ = c.ctr("tasks", "rm", "-f", id)
		}
	}
	stop("containerd")
	errs = append(errs, c.killShims())
	for _, name := range []string{"kube-scheduler", "kube-controller-manager", "kube-apiserver", "etcd"} {
		stop(name)
	}
	errs = append(errs, c.removeBPFPins(ids), c.unmountNew(), c.removeNetns(), c.removeCgroups())
	if c.bridgeMade {
		errs = append(errs, run1("ip", "link", "del", c.bridge))
	}
	errs = append(errs, c.restoreSysctls())
	for _, p := range hostPaths {
		if !c.base.paths[p] && p != "/sys/fs/bpf/sluice" {
			if err := os.RemoveAll(p); err != nil {
				errs = append(errs, err)
			}
		}
	}
	if err := os.RemoveAll(c.run); err != nil {
		errs = append(errs, fmt.Errorf("remove %s: %w", c.run, err))
	}
	if c.parentMade {
		_ = os.Remove(filepath.Dir(c.run)) // only if empty
	}
	errs = append(errs, c.compare())
	return errors.Join(errs...)
}

func (c *cluster) apiUp() bool {
	for _, pr := range c.procs {
		if pr.name == "kube-apiserver" {
			return c.alive(pr) == nil
		}
	}
	return false
}

// killShims ends the containerd shims this run's containerd started (they
// outlive it by design): those whose command line names its socket.
func (c *cluster) killShims() error {
	sock := c.path("containerd", "containerd.sock")
	procs, err := dirNames("/proc")
	if err != nil {
		return err
	}
	for _, p := range procs {
		pid, err := strconv.Atoi(p)
		if err != nil {
			continue
		}
		cmdline, err := os.ReadFile(filepath.Join("/proc", p, "cmdline"))
		if err != nil {
			continue
		}
		args := strings.Split(string(cmdline), "\x00")
		if strings.HasPrefix(filepath.Base(args[0]), "containerd-shim") && slices.Contains(args, sock) {
			slog.Warn("killing a leftover containerd shim", "pid", pid)
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
	}
	return nil
}

// podCgroupIDs are the ids (cgroup2 directory inodes) of the kubelet's
// cgroups, pods' included, while they exist.
func podCgroupIDs() []uint64 {
	var ids []uint64
	_ = filepath.WalkDir("/sys/fs/cgroup/unified/kubepods", func(path string, d fs.DirEntry, err error) error {
		var st syscall.Stat_t
		if err == nil && d.IsDir() && syscall.Stat(path, &st) == nil {
			ids = append(ids, st.Ino)
		}
		return nil
	})
	return ids
}

// removeBPFPins uninstalls what Sluice still holds for this run's pods
// (/sys/fs/bpf/sluice/<cgroup id>: their pins, and their places in the
// node's maps), then the node's programs once no pod runs them, and fails
// if a pod's pins stay. Other runs' pods (other cgroup ids) stay.
func (c *cluster) removeBPFPins(ids []uint64) error {
	root := filepath.Join(bpffs, "sluice")
	installed, _ := loader.List(root)
	var errs []error
	for _, in := range installed {
		if !slices.Contains(ids, in.CgroupID) {
			continue
		}
		slog.Info("uninstalling what sluice left for a pod of this run", "dir", in.PinDir)
		if err := loader.Uninstall(in.Target(), slog.Default()); err != nil && !errors.Is(err, loader.ErrNotInstalled) {
			errs = append(errs, fmt.Errorf("uninstall %s: %w", in.PinDir, err))
		}
	}
	for _, id := range ids {
		pin := filepath.Join(root, strconv.FormatUint(id, 10))
		if _, err := os.Stat(pin); err == nil {
			errs = append(errs, fmt.Errorf("sluice pins %s stayed after uninstall", pin))
			os.RemoveAll(pin)
		}
	}
	// Refused while another run's pod runs on them, which is right.
	if err := loader.UninstallNode(root); err == nil {
		slog.Info("removed the node's programs, which no pod runs any more", "dir", filepath.Join(root, "node"))
	}
	if !c.base.paths[bpffs+"/sluice"] {
		_ = os.Remove(bpffs + "/sluice") // only if empty: another run may use it
	}
	return errors.Join(errs...)
}

// unmountNew unmounts, deepest first, every mount point that was not in the
// baseline and lies under the run directory or a path the tools write.
func (c *cluster) unmountNew() error {
	now, err := mountPoints()
	if err != nil {
		return err
	}
	// Network namespaces: only CNI's (cni-*). Others that appeared
	// meanwhile belong to whatever else runs on the host, such as tests.
	roots := append([]string{c.run}, hostPaths...)
	var errs []error
	for i := len(now) - 1; i >= 0; i-- {
		mp := now[i]
		cniNetns := (strings.HasPrefix(mp, "/run/netns/cni-") || strings.HasPrefix(mp, "/var/run/netns/cni-"))
		if slices.Contains(c.base.mounts, mp) || !(underAny(mp, roots) || cniNetns) {
			continue
		}
		if err := syscall.Unmount(mp, 0); err != nil {
			if err := syscall.Unmount(mp, syscall.MNT_DETACH); err != nil {
				errs = append(errs, fmt.Errorf("unmount %s: %w", mp, err))
			}
		}
	}
	return errors.Join(errs...)
}

func underAny(path string, roots []string) bool {
	for _, r := range roots {
		if path == r || strings.HasPrefix(path, r+"/") {
			return true
		}
	}
	return false
}

// removeNetns removes the CNI network namespaces (cni-*) this run left.
func (c *cluster) removeNetns() error {
	now, _ := dirNames("/run/netns")
	var errs []error
	for _, ns := range now {
		if strings.HasPrefix(ns, "cni-") && !slices.Contains(c.base.netns, ns) {
			slog.Warn("removing a leftover network namespace", "netns", ns)
			p := filepath.Join("/run/netns", ns)
			_ = syscall.Unmount(p, syscall.MNT_DETACH)
			errs = append(errs, os.Remove(p))
		}
	}
	return errors.Join(errs...)
}

// removeCgroups removes, bottom up, the new top-level cgroups the kubelet
// made in every hierarchy (kubepods and its QoS and pod children).
func (c *cluster) removeCgroups() error {
	hier, err := dirNames("/sys/fs/cgroup")
	if err != nil {
		return err
	}
	var errs []error
	for _, h := range hier {
		ents, _ := os.ReadDir(filepath.Join("/sys/fs/cgroup", h))
		for _, e := range ents {
			top := filepath.Join("/sys/fs/cgroup", h, e.Name())
			if !e.IsDir() || slices.Contains(c.base.cgroups, top) || e.Name() != "kubepods" {
				continue
			}
			errs = append(errs, rmdirTree(top))
		}
	}
	return errors.Join(errs...)
}

// rmdirTree removes a cgroup and its children, retrying while their last
// processes exit.
func rmdirTree(top string) error {
	var err error
	for range 50 {
		var dirs []string
		_ = filepath.WalkDir(top, func(path string, d fs.DirEntry, err error) error {
			if err == nil && d.IsDir() {
				dirs = append(dirs, path)
			}
			return nil
		})
		err = nil
		for i := len(dirs) - 1; i >= 0; i-- {
			if e := syscall.Rmdir(dirs[i]); e != nil && !errors.Is(e, syscall.ENOENT) {
				err = fmt.Errorf("rmdir %s: %w", dirs[i], e)
			}
		}
		if err == nil {
			return nil
		}
		time.Sleep(100 * time.Millisecond)
	}
	return err
}

func (c *cluster) restoreSysctls() error {
	var errs []error
	for k, v := range c.base.sysctls {
		p := filepath.Join("/proc/sys", k)
		now, err := os.ReadFile(p)
		if err == nil && strings.TrimSpace(string(now)) != v {
			slog.Info("restoring sysctl", "key", k, "from", strings.TrimSpace(string(now)), "to", v)
			errs = append(errs, os.WriteFile(p, []byte(v), 0o644))
		}
	}
	return errors.Join(errs...)
}

// compare fails on every difference from the baseline this run may have
// caused; others (another process's network namespace) are only logged.
func (c *cluster) compare() error {
	now, err := snapshot()
	if err != nil {
		return err
	}
	ours := []string{c.run, c.bridge, "cni-", "veth", "kubepods", "/run/netns/cni-", "/run/containerd", "/var/lib/kubelet"}
	var diffs []string
	for _, l := range []struct {
		kind          string
		before, after []string
	}{
		{"link", c.base.links, now.links}, {"netns", c.base.netns, now.netns},
		{"mount", c.base.mounts, now.mounts}, {"cgroup", c.base.cgroups, now.cgroups},
		{"iptables", c.base.iptables, now.iptables},
	} {
		for _, a := range l.after {
			if !slices.Contains(l.before, a) {
				diffs = append(diffs, l.kind+" added: "+a)
			}
		}
		for _, b := range l.before {
			if !slices.Contains(l.after, b) {
				diffs = append(diffs, l.kind+" removed: "+b)
			}
		}
	}
	var bad []string
	for _, d := range diffs {
		// iptables, sysctls and the host paths are no one else's business here.
		if strings.HasPrefix(d, "iptables") || slices.ContainsFunc(ours, func(s string) bool { return strings.Contains(d, s) }) {
			bad = append(bad, d)
		} else {
			slog.Warn("the host changed during the run, not by it", "change", d)
		}
	}
	for k, v := range c.base.sysctls {
		if now.sysctls[k] != v {
			bad = append(bad, fmt.Sprintf("sysctl %s: %s, was %s", k, now.sysctls[k], v))
		}
	}
	for p, was := range c.base.paths {
		if now.paths[p] != was {
			bad = append(bad, fmt.Sprintf("path %s: exists %v, was %v", p, now.paths[p], was))
		}
	}
	if now.bpffsPropagation != c.base.bpffsPropagation {
		bad = append(bad, fmt.Sprintf("%s propagation %q, was %q", bpffs, now.bpffsPropagation, c.base.bpffsPropagation))
	}
	if len(bad) > 0 {
		return fmt.Errorf("the host is not back to its baseline:\n  %s", strings.Join(bad, "\n  "))
	}
	slog.Info("host back to its baseline: links, netns, mounts, cgroups, iptables, sysctls, paths")
	return nil
}
