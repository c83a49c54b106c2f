// Package bpf holds Sluice's eBPF programs and their bpf2go bindings; the
// generated objects are committed so `go build` needs no clang.
package bpf

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"sync"
)

//go:generate go tool bpf2go -cc clang -cflags "-O2 -g -Wall -Werror" -target bpfel -type policy -type port_key -type cidr_key -type orig_dst -type sock_state -type tuple_key -type addr6 -type install_meta -type config_flag -type port_set -type sock_role -type counter -type flow_event -type flow_flag -type flow_kind -type flow_end -type route -type route_key -type rr_key -type backend -type route_mode -type rollback_reason -type splice_flag -type listener_slot -type pod_addr_slot -type sluice_sockopt -type node_counter Sluice sluice.c -- -I./headers

// ObjectHash identifies the build: the compiled object this binary embeds,
// NodeLayout and buildLabel. An install completed with another is upgraded
// in place, onto node state of its own. Hashed once a process: an install
// asks for it a dozen times.
var ObjectHash = sync.OnceValue(func() string {
	h := sha256.New()
	h.Write(_SluiceBytes)
	fmt.Fprintf(h, "node layout %d", NodeLayout)
	if buildLabel != "" {
		fmt.Fprintf(h, " label %s", buildLabel)
	}
	return hex.EncodeToString(h.Sum(nil)[:8])
})

// buildLabel, set at link time (-ldflags '-X
// github.com/sluicemesh/sluice/bpf.buildLabel=NAME'), makes a build that
// shares no node state with the same sources built without it: one who
// patches the loader's use of the node maps without touching the object
// labels the build, and the upgrade tests build two of one tree.
var buildLabel string

// NodeLayout versions what the loader keeps in the node's maps beyond what
// the object declares: a loader that reads them otherwise must not share a
// build's node state with one before it. 2: policy_active's second bit
// marks an index taken (loader/node.go).
const NodeLayout = 2
