package loader

import (
	"errors"
	"fmt"
	"os"
	"slices"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/btf"

	"github.com/sluicemesh/sluice/bpf"
)

// spliceSockets is the splice table's size with splice on: 4,096
// connections, each with both ends in it. Its buckets (16 bytes each) are
// allocated whole, so with splice off it holds one entry.
const spliceSockets = 8192

// spliceMaps are sized by spliceTableSize: the splice table, and offload's
// two, which hold a subset of the connections it holds.
var spliceMaps = []string{bpf.SluiceMapSpliceSocks, bpf.SluiceMapOffloadSocks, bpf.SluiceMapOffloadPeers}

func spliceTableSize(splice bool) uint32 {
	if splice {
		return spliceSockets
	}
	return 1
}

// flowRingPerCPU is the node's flow ring for each of its CPUs: a node's
// rate of short connections grows with its CPUs, and so the ring keeps
// holding the same time of events (about 0.7 s at the highest rate this
// 2-CPU VM makes, docs/ARCHITECTURE.md "Flow events"): 1 MiB on up to 4
// CPUs, 16 MiB on 64. A ring is a power of two.
const (
	flowRingPerCPU = 256 << 10
	flowRingMin    = 1 << 20
	flowRingMax    = 64 << 20
)

// flowRingSize is the node's flow ring for cpus possible CPUs.
func flowRingSize(cpus int) uint32 {
	size := uint32(flowRingMin)
	for size < flowRingMax && size < uint32(cpus)*flowRingPerCPU {
		size *= 2
	}
	return size
}

// kernelTypes, when set, stands in for the kernel's BTF in CO-RE and in
// what Sluice asks of it: loader's tests set one with fields removed to run
// an older kernel's paths on this one (SLUICE_TEST_KERNEL_WITHOUT, in
// loader's TestMain).
var kernelTypes *btf.Spec

// load loads the node's programs and maps from spec (bpf.LoadSluice's,
// which it changes).
func load(spec *ebpf.CollectionSpec) (*ebpf.Collection, error) {
	cpus, err := ebpf.PossibleCPU()
	if err != nil {
		return nil, fmt.Errorf("count the node's CPUs: %w", err)
	}
	ring := flowRingSize(cpus)
	spec.Maps[bpf.SluiceMapFlowEvents].MaxEntries = ring
	if err := setConstants(spec, map[string]any{bpf.SluiceVarPageSize: uint32(os.Getpagesize()), bpf.SluiceVarFlowWakeBytes: uint64(ring / 4)}); err != nil {
		return nil, err
	}
	coll, err := ebpf.NewCollectionWithOptions(spec, ebpf.CollectionOptions{Programs: ebpf.ProgramOptions{KernelTypes: kernelTypes}})
	if err != nil {
		if rel := kernelRelease(); olderThanMinimum(rel) {
			// What fails first on an old kernel is some helper or field
			// deep in the object: say what the user can act on.
			return nil, fmt.Errorf("load BPF programs: this is Linux %s, and Sluice needs %s or later ('sluice check' lists what is missing): %w", rel, MinimumKernel, err)
		}
		var ve *ebpf.VerifierError
		if errors.As(err, &ve) {
			// The full log is what a kernel developer needs to see.
			return nil, fmt.Errorf("load BPF programs: %+v", ve)
		}
		return nil, fmt.Errorf("load BPF programs: %w", err)
	}
	return coll, nil
}

// loadFresh parses the embedded object and loads it, as Check's probe
// does.
func loadFresh() (*ebpf.Collection, error) {
	spec, err := bpf.LoadSluice()
	if err != nil {
		return nil, fmt.Errorf("read embedded BPF object: %w", err)
	}
	return load(spec)
}

// setConstants writes values into the constants' data sections themselves
// and then drops the variables from the spec. Loading with variables would
// make cilium/ebpf mmap .rodata for the Collection, and that mapping keeps
// the map alive until Go's garbage collector unmaps it, long after an
// uninstall; setting a variable and then dropping it instead loses the
// value. Every variable that is not a constant is dropped the same way.
func setConstants(spec *ebpf.CollectionSpec, values map[string]any) error {
	for name, value := range values {
		v := spec.Variables[name]
		if v == nil || !v.Constant() {
			return fmt.Errorf("set %s: no such constant in the BPF object", name)
		}
		if err := v.Set(value); err != nil {
			return fmt.Errorf("set %s: %w", name, err)
		}
		m := spec.Maps[v.SectionName]
		if m == nil || len(m.Contents) != 1 {
			return fmt.Errorf("set %s: section %s has no contents", name, v.SectionName)
		}
		data, ok := m.Contents[0].Value.([]byte)
		end := int(v.Offset) + len(v.Value)
		if !ok || end > len(data) {
			return fmt.Errorf("set %s: section %s is too small", name, v.SectionName)
		}
		// The spec's contents may be shared with other copies: write a
		// copy of its bytes.
		data = slices.Clone(data)
		copy(data[v.Offset:end], v.Value)
		m.Contents[0].Value = data
	}
	clear(spec.Variables)
	return nil
}

// makePodMaps creates the pod maps names, sized for splice. On failure it
// closes what it made.
func makePodMaps(names []string, splice bool) (map[string]*ebpf.Map, error) {
	out := map[string]*ebpf.Map{}
	for _, name := range names {
		ms, err := podMapSpec(name, splice)
		if err == nil {
			out[name], err = ebpf.NewMap(ms)
		}
		if err != nil {
			for _, m := range out {
				m.Close()
			}
			return nil, fmt.Errorf("create map %s: %w", name, err)
		}
	}
	return out, nil
}
