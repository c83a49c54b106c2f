package loader

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/sluicemesh/sluice/bpf"
	"github.com/sluicemesh/sluice/redirect"
)

// The pins of one install: every map (so a rerun, an upgrade and the sidecar
// find the same state) and one link per hook. The record ("meta") is pinned
// first and removed last: a directory holding it is Sluice's, and a
// directory without it holds nothing an install or uninstall finished.
var pinnedMaps = []string{
	bpf.SluiceMapMeta,
	bpf.SluiceMapSockStates,
	bpf.SluiceMapHandshakes,
	bpf.SluiceMapCounters,
	bpf.SluiceMapSpliceSocks,
	bpf.SluiceMapOffloadSocks,
	bpf.SluiceMapOffloadPeers,
	bpf.SluiceMapInboundListeners,
	bpf.SluiceMapPodAddrs,
}

// routeMapNames are the pod's maps made by its first route change, not by
// install (makeRouteMaps): a pod with no route holds neither. routes first:
// pinned routes_active says routes is pinned too.
var routeMapNames = []string{bpf.SluiceMapRoutes, bpf.SluiceMapRoutesActive}

// podMapNames are the names of every map a pod's pins may hold.
var podMapNames = append(slices.Clone(pinnedMaps), routeMapNames...)

// Every pin is root's alone: the sidecar asks the pod's hooks for what it
// needs (AskPlan, HandOffload), and the node's agent reads the flows.
const (
	pinRootMode = 0o711 // anyone may pass through, nobody but root may list pods
	pinDirMode  = 0o700
	ownerMode   = 0o600
)

// recordFormat marks a record written by this layout of pins.
const recordFormat = 1

// record is an install's description of itself, kept in the "meta" map as
// JSON so `bpftool map dump pinned DIR/meta` shows it to a human.
type record struct {
	Format   int    `json:"sluice_pins"`
	Cgroup   string `json:"cgroup"`
	CgroupID uint64 `json:"cgroup_id"`
	// Where inbound capture was asked for; empty for outbound only.
	Netns      string `json:"netns,omitempty"`
	NetnsInode uint64 `json:"netns_inode,omitempty"`
	Interface  string `json:"interface,omitempty"`
	Ifindex    int    `json:"ifindex,omitempty"`
	// Args are the install's flags, or for an install made by a mesh
	// personality its whole command line, for the command that repairs it
	// and for a rerun to tell whether it asks for the same install. Flags
	// too long for the record (thousands of CIDRs) are kept as ArgsSHA256
	// alone: the plan itself is in the policy maps, and a rerun needs only
	// to tell the same flags from others.
	Args       []string `json:"args,omitempty"`
	ArgsSHA256 string   `json:"args_sha256,omitempty"`
	// Object is the BPF object a finished install runs; empty while an
	// install is under way (or was killed). Its programs and node maps
	// are under <pin root>/node/<Object>.
	Object string `json:"object,omitempty"`
	// Index is the pod's place in the node maps of its build, and
	// NetnsCookie the network namespace the hooks find it by; 0 in the
	// record of an install from before programs were the node's.
	Index       uint32 `json:"index,omitempty"`
	NetnsCookie uint64 `json:"netns_cookie,omitempty"`
	// Sidecar is what the sidecar needs of the plan, for a sidecar that
	// reads it here (one of an earlier build than the install's: this
	// build's asks the pod's hooks, AskPlan), not in the node's policy
	// maps (root's alone).
	Sidecar *sidecarRecord `json:"sidecar,omitempty"`
	// Identity is who the pod is, for the metrics the node's agent
	// exports of its flows: what install was given (Target.Identity).
	Identity map[string]string `json:"identity,omitempty"`
	// Plan is the whole plan, for Upgrade to install it again with
	// another build, whose node maps this build cannot read. Left out
	// when the record would not fit (thousands of CIDRs): such a pod
	// moves to a new build only when its install reruns.
	Plan *redirect.Plan `json:"plan,omitempty"`
}

// sidecarRecord is the sidecar's part of a plan.
type sidecarRecord struct {
	OutboundPort uint16   `json:"outbound_port"`
	InboundPort  uint16   `json:"inbound_port"`
	ProxyUID     uint32   `json:"proxy_uid"`
	ProxyGID     uint32   `json:"proxy_gid"`
	Ports        []uint16 `json:"ports,omitempty"`
}

func sidecarOf(p redirect.Plan) *sidecarRecord {
	return &sidecarRecord{OutboundPort: p.OutboundPort, InboundPort: p.InboundPort, ProxyUID: p.ProxyUID, ProxyGID: p.ProxyGID, Ports: p.SidecarPorts}
}

// sameTarget reports whether r and o install on the same namespace and
// interface.
func (r record) sameTarget(o record) bool {
	return r.Netns == o.Netns && r.NetnsInode == o.NetnsInode && r.Interface == o.Interface && r.Ifindex == o.Ifindex
}

func (r record) encode() (bpf.SluiceInstallMeta, error) {
	var m bpf.SluiceInstallMeta
	data, err := json.Marshal(r)
	if err == nil && len(data) >= len(m.Json) && len(r.Args) > 0 {
		r.ArgsSHA256, r.Args = r.argsDigest(), nil
		data, err = json.Marshal(r)
	}
	if err == nil && len(data) >= len(m.Json) && r.Plan != nil {
		r.Plan = nil
		data, err = json.Marshal(r)
	}
	if err != nil {
		return m, fmt.Errorf("encode install record: %w", err)
	}
	if len(data) >= len(m.Json) {
		return m, fmt.Errorf("install record of %d bytes does not fit in %d: shorten the cgroup or netns path", len(data), len(m.Json)-1)
	}
	for i, b := range data {
		m.Json[i] = int8(b)
	}
	return m, nil
}

// argsDigest identifies the install's flags, whether the record holds them
// or only their digest (or was written before digests existed).
func (r record) argsDigest() string {
	if r.ArgsSHA256 != "" {
		return r.ArgsSHA256
	}
	data, _ := json.Marshal(r.Args) // a []string always marshals
	sum := sha256.Sum256(data)
	return hex.EncodeToString(sum[:])
}

func decodeRecord(m bpf.SluiceInstallMeta) (record, error) {
	var data []byte
	for _, c := range m.Json {
		if c == 0 {
			break
		}
		data = append(data, byte(c))
	}
	var r record
	if err := json.Unmarshal(data, &r); err != nil || r.Format == 0 {
		return r, errors.New("its meta map holds no Sluice install record")
	}
	if r.Format != recordFormat {
		return r, fmt.Errorf("its pins are in format %d, this Sluice reads format %d: use the Sluice that installed it", r.Format, recordFormat)
	}
	return r, nil
}

func writeRecord(m *ebpf.Map, r record) error {
	v, err := r.encode()
	if err != nil {
		return err
	}
	if err := m.Put(uint32(0), &v); err != nil {
		return fmt.Errorf("write install record: %w", err)
	}
	return nil
}

// pinState is what a pin directory holds.
type pinState struct {
	exists bool
	rec    *record  // nil without a meta pin
	names  []string // every entry, sorted
}

// readPins looks at dir without changing anything.
func readPins(dir string) (pinState, error) {
	entries, err := os.ReadDir(dir)
	if errors.Is(err, os.ErrNotExist) {
		return pinState{}, nil
	}
	if err != nil {
		return pinState{}, pinsError(dir, err)
	}
	s := pinState{exists: true}
	for _, e := range entries {
		s.names = append(s.names, e.Name())
	}
	if !slices.Contains(s.names, bpf.SluiceMapMeta) {
		return s, nil
	}
	rec, err := readRecord(dir)
	if err != nil {
		return s, err
	}
	s.rec = &rec
	return s, nil
}

func readRecord(dir string) (record, error) {
	m, err := ebpf.LoadPinnedMap(filepath.Join(dir, bpf.SluiceMapMeta), &ebpf.LoadPinOptions{ReadOnly: true})
	if err != nil {
		return record{}, pinsError(dir, err)
	}
	defer m.Close()
	var v bpf.SluiceInstallMeta
	if m.Type() != ebpf.Array || m.ValueSize() != uint32(len(v.Json)) {
		return record{}, fmt.Errorf("%s is not a Sluice pin directory: its meta pin is not Sluice's", dir)
	}
	if err := m.Lookup(uint32(0), &v); err != nil {
		return record{}, fmt.Errorf("read install record in %s: %w", dir, err)
	}
	r, err := decodeRecord(v)
	if err != nil {
		return r, fmt.Errorf("%s is not a usable Sluice pin directory: %w", dir, err)
	}
	return r, nil
}

// unknown lists the entries of s that no install creates.
func (s pinState) unknown() []string {
	var out []string
	for _, n := range s.names {
		if !slices.Contains(podMapNames, n) && !slices.Contains(legacyPins, n) && !slices.ContainsFunc(allHooks, func(h hook) bool { return h.pin == n }) {
			out = append(out, n)
		}
	}
	return out
}

// checkOwner refuses pins that record another cgroup than t's: two pods
// must never share pins, and no command may act on another pod's.
// A pod whose cgroup is gone has no id any more; its path must match.
func checkOwner(t Target, rec record) error {
	if t.CgroupID != 0 && rec.CgroupID != t.CgroupID || t.CgroupID == 0 && rec.Cgroup != t.Cgroup {
		return fmt.Errorf("pins at %s belong to cgroup %s (id %d), not to %s (id %d): pass the pod's own --pin-dir, or none", t.PinDir, rec.Cgroup, rec.CgroupID, t.Cgroup, t.CgroupID)
	}
	return nil
}

// pinsError names the usual reason a pin cannot be opened: the caller is
// not root (or, for an install before pins were root's alone, not in the
// pod's proxy group).
func pinsError(dir string, err error) error {
	if !errors.Is(err, os.ErrPermission) {
		return fmt.Errorf("read pins at %s: %w", dir, err)
	}
	who := fmt.Sprintf("uid %d gid %d", os.Getuid(), os.Getgid())
	if os.Geteuid() == 0 {
		// Root is refused only where a pin gives no one write access and
		// root lacks CAP_DAC_OVERRIDE (a container that dropped it).
		return fmt.Errorf("cannot open the pod's pins at %s for writing as %s: they are read-only to everyone, so root needs CAP_DAC_OVERRIDE: add it to the container", dir, who)
	}
	var st unix.Stat_t
	if unix.Stat(dir, &st) == nil && st.Gid != 0 {
		return fmt.Errorf("cannot read the pod's pins at %s as %s: they are readable by root and group %d only: run the sidecar with the proxy gid given to install (-g %d)", dir, who, st.Gid, st.Gid)
	}
	return fmt.Errorf("cannot read the pod's pins at %s as %s: they are root's alone: run as root", dir, who)
}

// setModes makes the pin directory and every pin in it root's alone: an
// install by an earlier build gave some to the proxy's group.
func setModes(dir string) error {
	if err := chownMod(dir, 0, pinDirMode); err != nil {
		return err
	}
	for _, name := range podMapNames {
		err := chownMod(filepath.Join(dir, name), 0, ownerMode)
		if err != nil && !(slices.Contains(routeMapNames, name) && errors.Is(err, os.ErrNotExist)) {
			return err
		}
	}
	return nil
}

func chownMod(path string, gid uint32, mode os.FileMode) error {
	if err := os.Chown(path, 0, int(gid)); err != nil {
		return fmt.Errorf("set owner of %s: %w", path, err)
	}
	if err := os.Chmod(path, mode); err != nil {
		return fmt.Errorf("set mode of %s: %w", path, err)
	}
	return nil
}

// mkdirs creates dir and any missing parents with mode and returns the ones
// it created, shallowest first, also when it fails half-way, so undo
// removes exactly those.
func mkdirs(dir string, mode os.FileMode) ([]string, error) {
	var missing []string
	for d := dir; ; d = filepath.Dir(d) {
		if _, err := os.Stat(d); err == nil || d == filepath.Dir(d) {
			break
		}
		missing = append(missing, d)
	}
	var created []string
	for i := len(missing) - 1; i >= 0; i-- {
		if err := os.Mkdir(missing[i], mode); err != nil && !errors.Is(err, os.ErrExist) {
			return created, fmt.Errorf("create pin dir %s: %w", missing[i], err)
		}
		created = append(created, missing[i])
		// Mkdir applies the umask; the mode is part of the contract.
		if err := os.Chmod(missing[i], mode); err != nil {
			return created, fmt.Errorf("set mode of %s: %w", missing[i], err)
		}
	}
	return created, nil
}

// lock holds an exclusive lock on the pin root for the length of an install
// or uninstall, so two of them (a rerun racing a slow first run) never
// interleave. The kernel drops it when the process dies.
func lock(root string) (func(), error) {
	f, err := os.Open(root)
	if err != nil {
		return nil, fmt.Errorf("lock %s: %w", root, err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX); err != nil {
		f.Close()
		return nil, fmt.Errorf("lock %s: %w", root, err)
	}
	return func() { f.Close() }, nil
}

// Installed is one pod's install as List finds it.
type Installed struct {
	PinDir   string `json:"pin_dir"`
	Cgroup   string `json:"cgroup"`
	CgroupID uint64 `json:"cgroup_id"`
	// Object is the build it runs; empty for an install that did not
	// finish.
	Object string `json:"object,omitempty"`
	// Identity is who the pod is, for its metrics, as install recorded it.
	Identity map[string]string `json:"identity,omitempty"`
	// NetnsCookie is the pod's network namespace, as its hooks know it
	// and its flow events name it; 0 for an install from before
	// programs were the node's.
	NetnsCookie uint64 `json:"netns_cookie,omitempty"`
	// ResolveServices: the install asked the agent to keep its routes of
	// every Service (install --resolve-services).
	ResolveServices bool `json:"resolve_services,omitempty"`
}

// List returns the installs under root, one per directory holding a Sluice
// record; other directories are skipped.
func List(root string) ([]Installed, error) {
	entries, err := os.ReadDir(root)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, pinsError(root, err)
	}
	var out []Installed
	for _, e := range entries {
		if _, err := strconv.ParseUint(e.Name(), 10, 64); err != nil || !e.IsDir() {
			continue
		}
		dir := filepath.Join(root, e.Name())
		rec, err := readRecord(dir)
		if err != nil {
			continue
		}
		in := Installed{PinDir: dir, Cgroup: rec.Cgroup, CgroupID: rec.CgroupID, Object: rec.Object, Identity: rec.Identity, NetnsCookie: rec.NetnsCookie}
		in.ResolveServices = rec.Plan != nil && rec.Plan.ResolveServices
		out = append(out, in)
	}
	return out, nil
}

// shellQuote quotes args for a command line a user can paste.
func shellQuote(args []string) string {
	out := make([]string, len(args))
	for i, a := range args {
		if a != "" && !strings.ContainsAny(a, " \t\n'\"\\$`*?[]{}()<>|&;#~!") {
			out[i] = a
			continue
		}
		out[i] = "'" + strings.ReplaceAll(a, "'", `'\''`) + "'"
	}
	return strings.Join(out, " ")
}

// Target is the install's pod as Status and Uninstall take it.
func (in Installed) Target() Target {
	return Target{Cgroup: in.Cgroup, CgroupID: in.CgroupID, PinDir: in.PinDir}
}

// RunsThisBuild reports whether the install runs this binary's programs.
func (in Installed) RunsThisBuild() bool { return in.Object == bpf.ObjectHash() }

// Gone reports whether the install's pod is gone: its cgroup no longer
// exists, or a new cgroup took its path. Its pins and links then serve
// nothing, and only an uninstall removes them. A cgroup whose parent cannot
// be seen either is not gone but out of view (a caller without the host's
// hierarchy mounted, or another mount of it): collecting it would strip a
// live pod's capture.
func (in Installed) Gone() bool {
	id, err := cgroupID(in.Cgroup)
	if err != nil {
		if !errors.As(err, new(noCgroupError)) {
			return false
		}
		_, perr := os.Stat(filepath.Dir(in.Cgroup))
		return perr == nil
	}
	return id != in.CgroupID
}

// Match returns the live installs under root whose cgroup path matches
// pattern, where * stands for any text, slashes included (so '*pod3f2a*'
// picks a Kubernetes pod by its uid whatever its QoS class and driver).
func Match(root, pattern string) ([]Installed, error) {
	all, err := List(root)
	if err != nil {
		return nil, err
	}
	var out []Installed
	for _, in := range all {
		if !in.Gone() && matchStar(pattern, in.Cgroup) {
			out = append(out, in)
		}
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("no installed pod's cgroup matches %q (%d installs under %s; 'sluice status --all' lists them)", pattern, len(all), root)
	}
	return out, nil
}

// matchStar matches s against pattern, whose only wildcard is *.
func matchStar(pattern, s string) bool {
	parts := strings.Split(pattern, "*")
	if !strings.HasPrefix(s, parts[0]) {
		return false
	}
	s = s[len(parts[0]):]
	for i, p := range parts[1:] {
		if i == len(parts)-2 {
			return strings.HasSuffix(s, p)
		}
		j := strings.Index(s, p)
		if j < 0 {
			return false
		}
		s = s[j+len(p):]
	}
	return s == ""
}
