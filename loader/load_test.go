package loader

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cilium/ebpf"

	"github.com/sluicemesh/sluice/bpf"
	"github.com/sluicemesh/sluice/internal/testbed"
	"github.com/sluicemesh/sluice/redirect"
)

// The node's flow ring grows with its CPUs, a power of two from 1 MiB to
// 64 MiB.
func TestFlowRingSize(t *testing.T) {
	for cpus, want := range map[int]uint32{1: 1 << 20, 2: 1 << 20, 4: 1 << 20, 5: 2 << 20, 8: 2 << 20, 64: 16 << 20, 96: 32 << 20, 1024: 64 << 20} {
		if got := flowRingSize(cpus); got != want {
			t.Errorf("flowRingSize(%d) = %d, want %d", cpus, got, want)
		}
	}
}

// On a kernel that does not count spliced bytes (Debian's 6.1), install
// refuses splice and offload by name, before it changes anything; the
// rest installs.
func TestSpliceRefusedWhereTheKernelCannotCountIt(t *testing.T) {
	privileged(t)
	real := spliceBacklog
	spliceBacklog = func(string) error { return errors.New("this kernel's struct sk_psock has no msg_tot_len") }
	t.Cleanup(func() { spliceBacklog = real })
	target := podIn(t, testbed.Must(t), "", "old-kernel")
	for _, plan := range []redirect.Plan{
		func() redirect.Plan { p := testPlan(); p.Splice = true; return p }(),
		func() redirect.Plan { p := testPlan(); p.OffloadPorts = []uint16{8080}; return p }(),
	} {
		_, err := Install(target, plan, nil, quiet)
		if err == nil || !strings.Contains(err.Error(), "--splice and --offload-ports need the kernel to count a socket's spliced bytes") || !strings.Contains(err.Error(), "msg_tot_len") {
			t.Errorf("install with splice %v, offload %v: %v; want it refused, naming the kernel feature", plan.Splice, plan.OffloadPorts, err)
		}
		if _, err := os.Stat(target.PinDir); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("a refused install left %s (%v)", target.PinDir, err)
		}
	}
	if _, err := Install(target, testPlan(), nil, quiet); err != nil {
		t.Errorf("install without splice on that kernel: %v", err)
	}
}

// The node's sluice_features answers as the kernel's BTF does, so install
// can ask it instead of parsing the BTF (38 ms a process).
func TestFeaturesFromTheNode(t *testing.T) {
	privileged(t)
	target := podIn(t, testbed.Must(t), "", "features")
	if _, err := Install(target, testPlan(), nil, quiet); err != nil {
		t.Fatal(err)
	}
	root := filepath.Dir(target.PinDir)
	prog, err := openNodeProgram(root, bpf.SluiceProgSluiceFeatures)
	if err != nil || prog == nil {
		t.Fatalf("the node's %s: %v, %v", bpf.SluiceProgSluiceFeatures, prog, err)
	}
	defer prog.Close()
	features, err := prog.Run(&ebpf.RunOptions{})
	if err != nil {
		t.Fatal(err)
	}
	fromBTF := spliceBacklogBTF()
	if has := features&featureSpliceBacklog != 0; has != (fromBTF == nil) {
		t.Errorf("the node's program says msg_tot_len %v, the kernel's BTF %v", has, fromBTF)
	}
	if got := spliceBacklog(root); (got == nil) != (fromBTF == nil) {
		t.Errorf("spliceBacklog = %v, the kernel's BTF %v", got, fromBTF)
	}
}
