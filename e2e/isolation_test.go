package e2e

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/sluicemesh/sluice/bpf"
	"github.com/sluicemesh/sluice/internal/testbed"
	"github.com/sluicemesh/sluice/loader"
)

// A process of another pod with the sidecar's identity (uid and gid 1337,
// no capability) and the mount view deploy/ gave a sidecar (the node's whole
// pin root) opens nothing: no pod's pin (maps, links, its record), no node
// pin (programs, policy, the pods' index, the flow ring). The sidecar needs
// none: it asks the pod's hooks for its plan and hands connections over by
// socket options, and the node's agent, root, reads the flows.
func TestForeignProxyIdentityOpensNoPin(t *testing.T) {
	args := offloadArgs // every map in use
	if err := loader.SpliceSupported(loader.DefaultPinRoot); err != nil {
		t.Logf("without splice and offload (their maps are pinned all the same): %v", err)
		args = nil
	}
	c := newCapturedPod(t, args...)
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
	// Every pin by its path too: no directory may be listable, but the
	// names are no secret.
	paths := []string{view, podDir, node}
	for _, dir := range []string{podDir, node} {
		entries, err := os.ReadDir(dir)
		if err != nil {
			t.Fatal(err)
		}
		for _, e := range entries {
			paths = append(paths, filepath.Join(dir, e.Name()))
		}
	}
	got, err := intruder.OpenPinsAs(testbed.WorldExecutable(t), paths, 1337, 1337)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("opened %v; %d pins and directories refused", got.Opened, got.Denied)
	if len(got.Opened) != 0 {
		t.Errorf("the proxy identity of another pod opened %v", got.Opened)
	}
	if got.Denied != len(paths) {
		t.Errorf("%d of %d pins and directories refused: the walk did not try them all", got.Denied, len(paths))
	}
}
