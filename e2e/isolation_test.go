package e2e

import (
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/sluicemesh/sluice/bpf"
	"github.com/sluicemesh/sluice/internal/testbed"
	"github.com/sluicemesh/sluice/loader"
)

// A process of another pod with the sidecar's identity (uid and gid 1337,
// no capability) and the mount view deploy/ gives a sidecar (the node's
// whole pin root) opens nothing of a pod's but what that pod's own sidecar
// still reads: its install record, counters and routes, and its flow ring,
// which a consumer must open for writing. No node pin (programs, links,
// policy, the pods' index), and none of the maps that steer bytes (splice,
// offload, listeners, handshakes, socket state) opens for it at all.
//
// The flow ring and the record stay open to the group until the node's
// agent exports flows and the sidecar gets its ports from its flags (issue
// 28): this list is then to be empty.
func TestForeignProxyIdentityOpensOnlyTheSidecarsPins(t *testing.T) {
	c := newCapturedPod(t, offloadArgs...)
	intruder, err := c.bed.AddPod("intruder")
	if err != nil {
		t.Fatal(err)
	}
	target, err := loader.ResolveTarget(c.cgroup, "")
	if err != nil {
		t.Fatal(err)
	}
	// deploy/ mounts the pin root into the sidecar; the host's /sys/fs/bpf
	// above it is root's alone. A bind mount gives the same view here.
	view := filepath.Join(t.TempDir(), "sluice")
	if err := os.Mkdir(view, 0o755); err != nil {
		t.Fatal(err)
	}
	for dir := view; dir != "/"; dir = filepath.Dir(dir) {
		if strings.HasPrefix(dir, os.TempDir()+"/") {
			os.Chmod(dir, 0o755) // t.TempDir's are 0700
		}
	}
	if err := unix.Mount(loader.DefaultPinRoot, view, "", unix.MS_BIND, ""); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Unmount(view, unix.MNT_DETACH) })
	podDir := filepath.Join(view, strings.TrimPrefix(target.PinDir, loader.DefaultPinRoot))
	node := filepath.Join(view, "node", bpf.ObjectHash())
	got, err := intruder.OpenPinsAs(testbed.WorldExecutable(t), []string{view, podDir, node}, 1337, 1337)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("opened %v; %d pins and directories refused", got.Opened, got.Denied)
	want := map[string]string{
		bpf.SluiceMapMeta:         "r",
		bpf.SluiceMapCounters:     "r",
		bpf.SluiceMapRoutes:       "r",
		bpf.SluiceMapRoutesActive: "r",
		bpf.SluiceMapFlowEvents:   "rw",
	}
	for pin, how := range got.Opened {
		dir, name := filepath.Split(pin)
		if filepath.Clean(dir) != podDir || want[name] != how {
			t.Errorf("%s opened for %q; the sidecar's identity may open only its pod's %v", pin, how, want)
		}
	}
	if len(got.Opened) != len(want) {
		t.Errorf("opened %d pins, want the pod's %d: %v", len(got.Opened), len(want), slices.Sorted(maps.Keys(got.Opened)))
	}
	if got.Denied == 0 {
		t.Error("nothing refused: the walk saw no pin it may not open")
	}
}
