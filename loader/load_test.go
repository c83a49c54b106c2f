package loader

import "testing"

// The node's flow ring grows with its CPUs, a power of two from 1 MiB to
// 64 MiB.
func TestFlowRingSize(t *testing.T) {
	for cpus, want := range map[int]uint32{1: 1 << 20, 2: 1 << 20, 4: 1 << 20, 5: 2 << 20, 8: 2 << 20, 64: 16 << 20, 96: 32 << 20, 1024: 64 << 20} {
		if got := flowRingSize(cpus); got != want {
			t.Errorf("flowRingSize(%d) = %d, want %d", cpus, got, want)
		}
	}
}
