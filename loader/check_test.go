package loader

import "testing"

// TestCheck loads every program through the verifier and attaches one to a
// throwaway cgroup: a kernel or BPF change that breaks loading fails here.
func TestCheck(t *testing.T) {
	privileged(t)
	for _, p := range Check() {
		if p.Err != nil {
			t.Errorf("%s: %v", p.Name, p.Err)
		}
	}
}
