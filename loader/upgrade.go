package loader

import (
	"errors"
	"fmt"
	"log/slog"

	"github.com/sluicemesh/sluice/bpf"
)

// ErrNoPlan is Upgrade's answer for an install whose record does not hold
// its plan: one by a build before plans were recorded, or whose flags did
// not fit. Its install must run again (a restart of the pod, or the repair
// command status gives).
var ErrNoPlan = errors.New("the install record holds no plan")

// Upgrade moves the pod of in onto this build, as a rerun of its install
// would (every link updated in place, under traffic; the old build's node
// state goes with its last pod), from what its record says: the plan, the
// flags, the identity and where inbound capture is. It does nothing for a
// pod that runs this build already or whose install is not finished (its
// installer holds it).
func Upgrade(in Installed, log *slog.Logger) (Result, error) {
	if in.Object == "" || in.Object == bpf.ObjectHash() {
		return Result{}, nil
	}
	rec, err := readRecord(in.PinDir)
	if err != nil {
		return Result{}, err
	}
	if rec.Plan == nil {
		return Result{}, fmt.Errorf("upgrade %s: %w: rerun its install (%s)", in.Cgroup, ErrNoPlan, repairCommand(rec))
	}
	t, err := ResolveTarget(rec.Cgroup, in.PinDir)
	if err != nil {
		return Result{}, fmt.Errorf("upgrade %s: %w", in.Cgroup, err)
	}
	t.Interface, t.Identity = rec.Interface, rec.Identity
	if t.Interface != "" {
		if t.Netns, err = recordedNetns(rec); err != nil {
			return Result{}, fmt.Errorf("upgrade %s: %w", in.Cgroup, err)
		}
	}
	inst := &installer{t: t, plan: *rec.Plan, log: log, unlock: func() {}}
	if rec.Args == nil {
		inst.argsSHA256 = rec.ArgsSHA256
	}
	return inst.run(rec.Args)
}

// recordedNetns is a path to the network namespace rec's inbound capture is
// attached in: the one its install was given while it still names that
// namespace, otherwise that of a process in the pod. An install made inside
// the pod recorded none (it was its own), and a /proc/PID path may name
// another process by now.
func recordedNetns(rec record) (string, error) {
	for _, path := range []string{rec.Netns, netnsOfCgroup(rec.Cgroup)} {
		if path == "" {
			continue
		}
		if ino, err := netnsInode(Target{Netns: path}); err == nil && ino == rec.NetnsInode {
			return path, nil
		}
	}
	return "", fmt.Errorf("its network namespace (inode %d) is neither at %q nor that of a process in the pod", rec.NetnsInode, rec.Netns)
}
