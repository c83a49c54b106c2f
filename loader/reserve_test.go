package loader

import (
	"fmt"
	"os"
	"testing"

	"github.com/cilium/ebpf"

	"github.com/sluicemesh/sluice/bpf"
	"github.com/sluicemesh/sluice/internal/testbed"
)

// The node's sluice_port_range reads the pod's local port range from the
// kernel, in the namespace install visits, as /proc/sys would give it:
// install trusts it to decide whether to reserve the sidecar's ports.
func TestPortRangeFromTheKernel(t *testing.T) {
	privileged(t)
	coll, err := loadFresh()
	if err != nil {
		t.Fatal(err)
	}
	defer coll.Close()
	prog := coll.Programs[bpf.SluiceProgSluicePortRange]
	pod, err := testbed.Must(t).AddPod("range")
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range [][2]uint16{{32768, 60999}, {15005, 15007}, {1024, 65535}, {40000, 40000}} {
		err := pod.Do(func() error {
			if err := os.WriteFile(localPortRange, fmt.Appendf(nil, "%d %d", r[0], r[1]), 0o644); err != nil {
				return err
			}
			ret, err := prog.Run(&ebpf.RunOptions{})
			if err != nil {
				return fmt.Errorf("run %s: %w", bpf.SluiceProgSluicePortRange, err)
			}
			if lo, hi := uint16(ret), uint16(ret>>16); lo != r[0] || hi != r[1] {
				return fmt.Errorf("the program read %d-%d, the pod's range is %d-%d", lo, hi, r[0], r[1])
			}
			return nil
		})
		if err != nil {
			t.Error(err)
		}
	}
	// The host's range is the host's, not the last pod's.
	data, err := os.ReadFile(localPortRange)
	if err != nil {
		t.Fatal(err)
	}
	lo, hi, err := portRangeHere(prog)
	if err != nil {
		t.Fatal(err)
	}
	if got := fmt.Sprintf("%d\t%d\n", lo, hi); got != string(data) {
		t.Errorf("in the host's namespace the range read is %q, /proc/sys says %q", got, data)
	}
}
