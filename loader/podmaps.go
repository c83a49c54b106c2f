package loader

import (
	"encoding/binary"
	"fmt"
	"reflect"
	"slices"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/btf"

	"github.com/sluicemesh/sluice/bpf"
)

// noPrealloc is BPF_F_NO_PREALLOC.
const noPrealloc = 1

// podMapSpecs are the layouts of a pod's maps, the inner maps of the node's
// arrays, as bpf/sluice.h declares them (TestPodMapSpecs holds them to the
// object): an install onto programs already on the node makes a pod's maps
// without parsing the object, a quarter of its time otherwise.
func podMapSpecs() map[string]*ebpf.MapSpec {
	size := func(v any) uint32 { return uint32(binary.Size(v)) }
	tuple, orig := size(bpf.SluiceTupleKey{}), size(bpf.SluiceOrigDst{})
	sockState := size(bpf.SluiceSockState{})
	specs := map[string]*ebpf.MapSpec{
		bpf.SluiceMapMeta:       {Type: ebpf.Array, KeySize: 4, ValueSize: size(bpf.SluiceInstallMeta{}), MaxEntries: 1},
		bpf.SluiceMapCounters:   {Type: ebpf.PerCPUArray, KeySize: 4, ValueSize: 8, MaxEntries: 64},
		bpf.SluiceMapHandshakes: {Type: ebpf.Hash, KeySize: tuple, ValueSize: orig, MaxEntries: 256, Flags: noPrealloc},
		bpf.SluiceMapRoutes: {Type: ebpf.Hash, KeySize: size(bpf.SluiceRouteKey{}), ValueSize: size(bpf.SluiceRoute{}),
			MaxEntries: 256, Flags: noPrealloc},
		bpf.SluiceMapRoutesActive:     {Type: ebpf.Array, KeySize: 4, ValueSize: 4, MaxEntries: 1},
		bpf.SluiceMapSpliceSocks:      {Type: ebpf.SockHash, KeySize: tuple, ValueSize: 8, MaxEntries: 1},
		bpf.SluiceMapOffloadSocks:     {Type: ebpf.SockHash, KeySize: 8, ValueSize: 8, MaxEntries: 1},
		bpf.SluiceMapOffloadPeers:     {Type: ebpf.Hash, KeySize: tuple, ValueSize: 8, MaxEntries: 1, Flags: noPrealloc},
		bpf.SluiceMapInboundListeners: {Type: ebpf.SockMap, KeySize: 4, ValueSize: 8, MaxEntries: 2},
		bpf.SluiceMapPodAddrs:         {Type: ebpf.Array, KeySize: 4, ValueSize: size(bpf.SluiceAddr6{}), MaxEntries: 2},
		// Socket storage needs BTF for its key (an int) and value.
		bpf.SluiceMapSockStates: {Type: ebpf.SkStorage, KeySize: 4, ValueSize: sockState, Flags: noPrealloc,
			Key:   &btf.Int{Name: "int", Size: 4, Encoding: btf.Signed},
			Value: bytesType(sockState)},
	}
	// Arrays and hashes get BTF too, a struct value as the node's
	// templates have from the object: Linux 6.1 takes an inner map only if
	// its timer offset matches the template's, and that is -ENOENT for a
	// struct value with no timer but -EINVAL with no BTF or another type
	// (the update fails with EINVAL; later kernels compare BTF records,
	// where all of these are empty).
	for name, ms := range specs {
		value := bytesType(ms.ValueSize)
		if scalarValues[name] {
			value = &btf.Int{Name: "unsigned long", Size: ms.ValueSize}
		}
		switch ms.Type {
		case ebpf.Array:
			ms.Key, ms.Value = &btf.Int{Name: "unsigned int", Size: 4}, value
		case ebpf.Hash:
			ms.Key, ms.Value = bytesType(ms.KeySize), value
		}
	}
	return specs
}

// scalarValues are the pod maps whose value bpf/sluice.h declares as an
// integer, not a struct (TestPodMapSpecs holds them to the object).
var scalarValues = map[string]bool{bpf.SluiceMapRoutesActive: true, bpf.SluiceMapOffloadPeers: true}

// bytesType is the BTF of a struct of n bytes: enough for a map no program
// inspects field by field from user space.
func bytesType(n uint32) btf.Type {
	bytes := &btf.Array{Index: &btf.Int{Name: "unsigned int", Size: 4}, Type: &btf.Int{Name: "unsigned char", Size: 1}, Nelems: n}
	return &btf.Struct{Name: "sluice_bytes", Size: n, Members: []btf.Member{{Name: "bytes", Type: bytes}}}
}

// podMapSpec is the layout of the pod's map name, sized for the plan.
func podMapSpec(name string, splice bool) (*ebpf.MapSpec, error) {
	ms := podMapSpecs()[name]
	if ms == nil {
		return nil, fmt.Errorf("no pod map %s", name)
	}
	ms.Name = name
	if slices.Contains(spliceMaps, name) {
		ms.MaxEntries = spliceTableSize(splice)
	}
	return ms, nil
}

// fitsPodMap reports why m cannot be the pod's map name for the node's
// programs, or nil: the kernel's own test for an inner map, which compares
// the size of arrays only.
func fitsPodMap(name string, m *ebpf.Map) error {
	ms := podMapSpecs()[name]
	if ms == nil {
		return fmt.Errorf("no pod map %s", name)
	}
	if ms.Type != ebpf.Array && ms.Type != ebpf.PerCPUArray {
		ms.MaxEntries = m.MaxEntries()
	}
	return ms.Compatible(m)
}

// objectNames are the names of the object's programs and maps, from the
// bindings bpf2go generated for it.
func objectNames() (progs, maps []string) {
	tags := func(v any) []string {
		var out []string
		t := reflect.TypeOf(v)
		for i := range t.NumField() {
			if tag := t.Field(i).Tag.Get("ebpf"); tag != "" {
				out = append(out, tag)
			}
		}
		slices.Sort(out)
		return out
	}
	return tags(bpf.SluicePrograms{}), tags(bpf.SluiceMaps{})
}
