package loader

import (
	"fmt"
	"os"
	"slices"
	"strings"
	"testing"

	"github.com/cilium/ebpf/btf"
)

// TestMain runs the package's tests as on a kernel without the fields
// SLUICE_TEST_KERNEL_WITHOUT names (struct.field, comma-separated): the
// programs load against this kernel's BTF with those members removed, as
// CO-RE sees an older kernel's, and install asks the node's programs what
// they found. make test runs the suite so without sk_psock.msg_tot_len,
// which Debian's 6.1 lacks: the fallback paths run on every change, not
// only in make test-kernel's VM.
func TestMain(m *testing.M) {
	if without := os.Getenv("SLUICE_TEST_KERNEL_WITHOUT"); without != "" {
		spec, err := kernelWithout(strings.Split(without, ","))
		if err != nil {
			fmt.Fprintf(os.Stderr, "SLUICE_TEST_KERNEL_WITHOUT=%s: %v\n", without, err)
			os.Exit(2)
		}
		kernelTypes = spec
	}
	os.Exit(m.Run())
}

// kernelWithout is a copy of the kernel's BTF with the members fields
// (struct.field) removed.
func kernelWithout(fields []string) (*btf.Spec, error) {
	kernel, err := btf.LoadKernelSpec()
	if err != nil {
		return nil, err
	}
	spec := kernel.Copy()
	for _, f := range fields {
		name, member, ok := strings.Cut(f, ".")
		if !ok {
			return nil, fmt.Errorf("%q: want struct.field", f)
		}
		var s *btf.Struct
		if err := spec.TypeByName(name, &s); err != nil {
			return nil, fmt.Errorf("struct %s: %w", name, err)
		}
		n := len(s.Members)
		s.Members = slices.DeleteFunc(s.Members, func(m btf.Member) bool { return m.Name == member })
		if len(s.Members) == n {
			return nil, fmt.Errorf("struct %s has no member %s", name, member)
		}
	}
	return spec, nil
}
