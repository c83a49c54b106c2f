package loader

import (
	"errors"
	"fmt"
	"sync"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/btf"

	"github.com/sluicemesh/sluice/bpf"
	"github.com/sluicemesh/sluice/redirect"
)

// spliceBacklog reports whether the kernel counts the bytes spliced to a
// socket and not read yet (struct sk_psock's msg_tot_len, a 2026 addition:
// Debian's 6.1 lacks it, its 6.12 has it). Splice's and offload's flow
// control read it (bpf/splice.c: peer_backlog); without it a spliced socket's queue could
// grow without bound, so install refuses both there. root is the pin root:
// the node's sluice_features answers in microseconds; before this build
// has programs on the node the kernel's BTF is read (38 ms, once a
// process). A variable, for tests to stand in another kernel.
var spliceBacklog = func(root string) error {
	if p, err := openNodeProgram(root, bpf.SluiceProgSluiceFeatures); err == nil && p != nil {
		defer p.Close()
		if features, err := p.Run(&ebpf.RunOptions{}); err == nil {
			if features&featureSpliceBacklog == 0 {
				return errNoSpliceBacklog
			}
			return nil
		}
	}
	return spliceBacklogBTF()
}

// SpliceSupported is nil where install takes --splice and --offload-ports
// (the kernel counts spliced bytes), else why not; root is the pin root.
func SpliceSupported(root string) error { return spliceBacklog(root) }

// featureSpliceBacklog is sluice_features' bit for msg_tot_len
// (bpf/features.c).
const featureSpliceBacklog = 1

var errNoSpliceBacklog = errors.New("this kernel's struct sk_psock has no msg_tot_len (a 2026 addition: Debian's 6.12.118 and Linux 6.18 have it, 6.1 does not)")

// spliceBacklogBTF is spliceBacklog from the kernel's BTF.
var spliceBacklogBTF = sync.OnceValue(func() error {
	spec := kernelTypes
	var err error
	if spec == nil {
		spec, err = btf.LoadKernelSpec()
	}
	if err != nil {
		return fmt.Errorf("read the kernel's BTF: %w", err)
	}
	var psock *btf.Struct
	if err := spec.TypeByName("sk_psock", &psock); err != nil {
		return fmt.Errorf("the kernel's BTF has no struct sk_psock: %w", err)
	}
	for _, m := range psock.Members {
		if m.Name == "msg_tot_len" {
			return nil
		}
	}
	return errNoSpliceBacklog
})

// kernelCanDo refuses a plan that asks for what this kernel cannot do
// safely, naming the feature; nothing is changed before it.
func kernelCanDo(root string, plan redirect.Plan) error {
	if !plan.Splice && len(plan.OffloadPorts) == 0 && len(plan.OffloadInboundPorts) == 0 {
		return nil
	}
	if err := spliceBacklog(root); err != nil {
		return fmt.Errorf("--splice and --offload-ports need the kernel to count a socket's spliced bytes, for flow control: %w; install without them (capture, telemetry, routes and kernel-only work without)", err)
	}
	return nil
}
