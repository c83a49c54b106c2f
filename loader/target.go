// Package loader is the only code that changes kernel state: it probes the
// kernel, loads Sluice's BPF programs, writes a capture plan into their maps,
// attaches them to one pod's cgroup and interface, pins them, and removes
// them again.
package loader

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/sluicemesh/sluice/internal/mountinfo"
)

// DefaultPinRoot holds every pod's pins, one directory per pod named by its
// cgroup id.
const DefaultPinRoot = "/sys/fs/bpf/sluice"

// Target is one pod: its cgroup, the bpffs directory holding its pins and,
// for inbound capture, its network namespace and interface.
type Target struct {
	Cgroup string `json:"cgroup"`
	// CgroupID is the pod's identity: unique and stable for the cgroup's
	// life, and free of the dots bpffs refuses in names (every systemd-driver
	// pod cgroup has them).
	CgroupID uint64 `json:"cgroup_id"`
	PinDir   string `json:"pin_dir"`
	// Interface is where inbound capture attaches (empty: no inbound
	// capture), inside Netns (empty: the caller's network namespace).
	Interface string `json:"interface,omitempty"`
	Netns     string `json:"netns,omitempty"`
	// Identity is who the pod is (its workload, namespace, app...: the
	// names are telemetry's), which install records for the node's agent
	// to label the pod's flows with.
	Identity map[string]string `json:"identity,omitempty"`
}

// ResolveTarget identifies the pod whose cgroup v2 directory is cgroup, which
// must exist, and its pin directory (pinDir, or DefaultPinRoot/<cgroup id>).
func ResolveTarget(cgroup, pinDir string) (Target, error) {
	path, err := cgroupPath(cgroup)
	if err != nil {
		return Target{}, err
	}
	id, err := cgroupID(path)
	if err != nil {
		return Target{}, err
	}
	if pinDir == "" {
		pinDir = filepath.Join(DefaultPinRoot, strconv.FormatUint(id, 10))
	}
	return Target{Cgroup: path, CgroupID: id, PinDir: pinDir}, nil
}

// FindTarget is ResolveTarget for a pod that may be gone: when its cgroup no
// longer exists, its pins are found by the cgroup path they record, so a dead
// pod can still be uninstalled and shown.
func FindTarget(cgroup, pinDir string) (Target, error) {
	t, err := ResolveTarget(cgroup, pinDir)
	if err == nil || !errors.As(err, new(noCgroupError)) {
		return t, err
	}
	path, _ := cgroupPath(cgroup)
	if pinDir != "" {
		return Target{Cgroup: path, PinDir: pinDir}, nil
	}
	installs, lerr := List(DefaultPinRoot)
	if lerr != nil {
		return Target{}, errors.Join(err, lerr)
	}
	for _, in := range installs {
		if in.Cgroup == path {
			return Target{Cgroup: path, CgroupID: in.CgroupID, PinDir: in.PinDir}, nil
		}
	}
	return Target{Cgroup: path}, fmt.Errorf("%w on %s: the cgroup is gone and no pins under %s record it", ErrNotInstalled, path, DefaultPinRoot)
}

// noCgroupError is ResolveTarget's error for a cgroup that does not exist.
type noCgroupError string

func (e noCgroupError) Error() string {
	return fmt.Sprintf("cgroup %s does not exist: pass the pod's cgroup v2 directory (create it first, e.g. mkdir %s)", string(e), string(e))
}

// cgroupPath makes cgroup absolute and checks that it is a cgroup v2
// directory that is not the hierarchy's root: attaching at the root would
// capture every process on the machine. For a directory that does not exist
// below a cgroup2 mount it returns the path and a noCgroupError. It asks
// the file system, not the mount table, which on a node has a line per
// pod's network namespace: reading it cost install more with every pod.
func cgroupPath(cgroup string) (string, error) {
	if cgroup == "" {
		return "", errors.New("no cgroup given: pass --cgroup with the pod's cgroup v2 directory, e.g. /sys/fs/cgroup/unified/mypod")
	}
	path, err := filepath.Abs(cgroup)
	if err != nil {
		return "", fmt.Errorf("cgroup path %s: %w", cgroup, err)
	}
	// The nearest directory that exists tells which file system the path
	// is on.
	existing := path
	var fs unix.Statfs_t
	for {
		err := unix.Statfs(existing, &fs)
		if err == nil {
			break
		}
		if !errors.Is(err, unix.ENOENT) || existing == filepath.Dir(existing) {
			return "", fmt.Errorf("cgroup %s: %w", path, err)
		}
		existing = filepath.Dir(existing)
	}
	if fs.Type != unix.CGROUP2_SUPER_MAGIC {
		where := "the cgroup2 mount (see 'findmnt -t cgroup2')"
		if mounts, err := mountinfo.Cgroup2(); err == nil {
			where = "the cgroup2 mount " + mounts[0]
		}
		return "", fmt.Errorf("%s is not a cgroup v2 directory: pass a directory below %s", path, where)
	}
	if existing != path {
		return path, noCgroupError(path)
	}
	// A cgroup2 directory whose parent is not on cgroup2 is the mount's
	// root.
	if err := unix.Statfs(filepath.Dir(path), &fs); err != nil || fs.Type != unix.CGROUP2_SUPER_MAGIC {
		return "", fmt.Errorf("%s is the root of the cgroup v2 hierarchy: pass the pod's own cgroup below it", path)
	}
	return path, nil
}

// cgroupID is the kernel's id of the cgroup at path: on cgroup v2 the inode
// number of its directory, the same id bpf_link info and bpftool report.
func cgroupID(path string) (uint64, error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		if errors.Is(err, unix.ENOENT) {
			return 0, noCgroupError(path)
		}
		return 0, fmt.Errorf("cgroup %s: %w", path, err)
	}
	return st.Ino, nil
}

// Cgroup2Mount returns where the cgroup v2 hierarchy is mounted
// (/sys/fs/cgroup on unified hosts, /sys/fs/cgroup/unified on hybrid ones).
func Cgroup2Mount() (string, error) {
	mounts, err := mountinfo.Cgroup2()
	if err != nil {
		return "", err
	}
	return mounts[0], nil
}

// OwnCgroup is the cgroup v2 directory this process runs in, as the host's
// hierarchy names it, also from inside a private cgroup namespace.
func OwnCgroup() (string, error) { return ownCgroupDir() }

// OwnPod finds the pod this process runs in, for an init container started
// with no --cgroup: the parent of its container's cgroup, never higher. It
// refuses unless that looks like a pod (a kubelet's pod cgroup name, or the
// KUBERNETES_SERVICE_HOST every container of a pod gets), so a `sluice
// install` typed in a node's shell cannot capture the shell's session slice.
func OwnPod(getenv func(string) string) (string, error) {
	container, err := ownCgroupDir()
	if err != nil {
		return "", err
	}
	pod := filepath.Dir(container)
	mounts, err := mountinfo.Cgroup2()
	if err != nil {
		return "", err
	}
	for _, m := range mounts {
		if pod == m || container == m {
			return "", fmt.Errorf("no --cgroup given and this process runs in %s, at the top of the cgroup hierarchy, not in a pod's container: run it in the pod's init container, or use 'sluice install --cgroup' with the pod's cgroup v2 directory", container)
		}
	}
	if PodUID(filepath.Base(pod)) == "" && getenv("KUBERNETES_SERVICE_HOST") == "" {
		return "", fmt.Errorf("no --cgroup given and this process does not run in a Kubernetes pod (its cgroup is %s): run it in the pod's init container, or use 'sluice install --cgroup' with the pod's cgroup v2 directory", container)
	}
	return pod, nil
}

// podCgroup matches the kubelet's pod cgroups: pod<uid> with the cgroupfs
// driver, kubepods-<qos>-pod<uid, dashes as underscores>.slice with the
// systemd one.
var podCgroup = regexp.MustCompile(`^(?:pod|kubepods(?:-[a-z]+)?-pod)([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12})(?:\.slice)?$`)

// PodUID is the Kubernetes pod uid a kubelet pod cgroup directory is named
// by, or "" when path's last element is no pod's: how the agent labels a
// pod, and how install run in a pod knows it is in one.
func PodUID(path string) string {
	m := podCgroup.FindStringSubmatch(filepath.Base(path))
	if m == nil {
		return ""
	}
	return strings.ReplaceAll(m[1], "_", "-")
}

// PodCgroup finds the cgroup v2 directory of the pod with uid, as the
// kubelet names it (PodUID), for the CNI plugin, which the runtime gives the
// pod's uid and network namespace. The kubelet makes the pod's cgroup
// before it asks for the pod's sandbox, so it is there at ADD. hint is the
// pod's cgroup path when the runtime gives it (containerd's cgroupPath
// capability: the sandbox's cgroup parent), taken when it names the pod's
// directory; else root, the kubelet's --cgroup-root ("" or "/": the top),
// is searched: only the kubelet's part of the tree, directories named for
// kubepods or the kubelet, at most four levels below root.
func PodCgroup(root, uid, hint string) (string, error) {
	mounts, err := mountinfo.Cgroup2()
	if err != nil {
		return "", err
	}
	return podCgroupIn(mounts, root, uid, hint)
}

func podCgroupIn(mounts []string, root, uid, hint string) (string, error) {
	for _, m := range mounts {
		if dir := filepath.Join(m, hint); hint != "" && PodUID(dir) == uid {
			if st, err := os.Stat(dir); err == nil && st.IsDir() {
				return dir, nil
			}
		}
	}
	for _, m := range mounts {
		if dir := findPod(filepath.Join(m, root), uid, 4); dir != "" {
			return dir, nil
		}
	}
	return "", fmt.Errorf("no cgroup v2 directory of pod %s under %s (cgroup root %q): is the kubelet on cgroup v2, with this --cgroup-root?", uid, strings.Join(mounts, ", "), root)
}

func findPod(dir, uid string, depth int) string {
	entries, err := os.ReadDir(dir)
	if err != nil || depth == 0 {
		return ""
	}
	for _, e := range entries {
		if !e.IsDir() {
			continue
		}
		name := e.Name()
		if PodUID(name) == uid {
			return filepath.Join(dir, name)
		}
		if strings.Contains(name, "kubepods") || strings.Contains(name, "kubelet") ||
			name == "besteffort" || name == "burstable" || name == "guaranteed" {
			if found := findPod(filepath.Join(dir, name), uid, depth-1); found != "" {
				return found
			}
		}
	}
	return ""
}

// ownCgroupDir is the cgroup v2 directory holding this process, found
// through a cgroup2 mount that shows it: /proc/self/cgroup gives the path
// relative to the cgroup namespace's root, so in a container with its own
// cgroup namespace the hierarchy mounted from the host is searched for the
// directory that lists this process.
func ownCgroupDir() (string, error) {
	data, err := os.ReadFile("/proc/self/cgroup")
	if err != nil {
		return "", fmt.Errorf("read own cgroup: %w", err)
	}
	rel := ""
	for _, line := range strings.Split(string(data), "\n") {
		if r, ok := strings.CutPrefix(line, "0::"); ok {
			rel = r
		}
	}
	if rel == "" {
		return "", errors.New("read own cgroup: no cgroup v2 entry in /proc/self/cgroup")
	}
	mounts, err := mountinfo.Cgroup2()
	if err != nil {
		return "", err
	}
	pid := strconv.Itoa(os.Getpid())
	for _, m := range mounts {
		if dir := filepath.Join(m, rel); listsProcess(dir, pid) {
			return dir, nil
		}
	}
	for _, m := range mounts {
		if dir := findProcess(m, pid, 8); dir != "" {
			return dir, nil
		}
	}
	return "", fmt.Errorf("no cgroup2 mount shows this process's cgroup (%s): mount the host's cgroup2 hierarchy into the container (hostPath /sys/fs/cgroup), or pass --cgroup", rel)
}

func listsProcess(dir, pid string) bool {
	data, err := os.ReadFile(filepath.Join(dir, "cgroup.procs"))
	if err != nil {
		return false
	}
	return slices.Contains(strings.Fields(string(data)), pid)
}

// findProcess searches the cgroup tree at dir, depth first to depth levels,
// for the directory that lists pid.
func findProcess(dir, pid string, depth int) string {
	if listsProcess(dir, pid) {
		return dir
	}
	if depth == 0 {
		return ""
	}
	entries, _ := os.ReadDir(dir)
	for _, e := range entries {
		if e.IsDir() {
			if found := findProcess(filepath.Join(dir, e.Name()), pid, depth-1); found != "" {
				return found
			}
		}
	}
	return ""
}
