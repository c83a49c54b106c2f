package loader

import (
	"fmt"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"

	"github.com/sluicemesh/sluice/bpf"
)

// The splice program runs on messages sent by the sockets in the splice
// table: it is attached to the table, not to the cgroup, and the table holds
// it for as long as the table lives. A socket takes the table's program when
// it joins, so the program is attached before any policy lets one join.
// (Kernels from 6.10 offer a bpf_link for this, which cilium/ebpf does not
// wrap yet; the table's own reference does the same job here, since the
// table is pinned.)

// ensureSplice attaches prog to the splice table unless the table already
// runs a program with the same instructions; attaching replaces the one
// there.
func ensureSplice(socks *ebpf.Map, prog *ebpf.Program) (linkAction, error) {
	running, err := splicePrograms(socks)
	if err != nil {
		return "", err
	}
	for _, id := range running {
		if same, err := sameProgram(id, prog); err != nil || same {
			return linkKept, err
		}
	}
	err = link.RawAttachProgram(link.RawAttachProgramOptions{Target: socks.FD(), Program: prog, Attach: ebpf.AttachSkMsgVerdict})
	if err != nil {
		return "", fmt.Errorf("attach %s to %s: %w", bpf.SluiceProgSluiceSplice, bpf.SluiceMapSpliceSocks, err)
	}
	if len(running) > 0 {
		return linkUpdated, nil
	}
	return linkAttached, nil
}

func splicePrograms(socks *ebpf.Map) ([]ebpf.ProgramID, error) {
	res, err := link.QueryPrograms(link.QueryOptions{Target: socks.FD(), Attach: ebpf.AttachSkMsgVerdict})
	if err != nil {
		return nil, fmt.Errorf("list programs on %s: %w", bpf.SluiceMapSpliceSocks, err)
	}
	ids := make([]ebpf.ProgramID, 0, len(res.Programs))
	for _, p := range res.Programs {
		ids = append(ids, p.ID)
	}
	return ids, nil
}

// splice is what a pod's splice table holds.
type splice struct {
	program  string // the program attached to it; "" for none
	memlock  uint64 // the program's kernel memory
	sockets  int    // sockets in it
	capacity int
}

// spliceState reads the pod's splice table.
func spliceState(p *Pins) (splice, error) {
	var sp splice
	socks, err := p.Map(bpf.SluiceMapSpliceSocks)
	if err != nil {
		return sp, err
	}
	sp.capacity = int(socks.MaxEntries())
	if sp.sockets, err = entries(socks); err != nil {
		return sp, fmt.Errorf("read %s: %w", bpf.SluiceMapSpliceSocks, err)
	}
	ids, err := splicePrograms(socks)
	if err != nil || len(ids) == 0 {
		return sp, err
	}
	prog, err := ebpf.NewProgramFromID(ids[0])
	if err != nil {
		return sp, fmt.Errorf("open program %d: %w", ids[0], err)
	}
	defer prog.Close()
	info, err := prog.Info()
	if err != nil {
		return sp, fmt.Errorf("program %d info: %w", ids[0], err)
	}
	sp.program = info.Name
	sp.memlock, _ = info.Memlock()
	return sp, nil
}
