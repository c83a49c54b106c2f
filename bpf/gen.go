// Package bpf holds Sluice's eBPF programs and their bpf2go bindings; the
// generated objects are committed so `go build` needs no clang.
package bpf

import (
	"crypto/sha256"
	"encoding/hex"
	"sync"
)

//go:generate go tool bpf2go -cc clang -cflags "-O2 -g -Wall -Werror" -target bpfel -type policy -type port_key -type cidr_key -type orig_dst -type sock_state -type tuple_key -type addr6 -type install_meta -type config_flag -type port_set -type sock_role -type counter -type flow_event -type flow_flag -type flow_kind -type flow_end -type route -type route_key -type rr_key -type backend -type route_mode -type rollback_reason -type splice_flag -type listener_slot -type pod_addr_slot -type sluice_sockopt -type node_counter Sluice sluice.c -- -I./headers

// ObjectHash identifies the compiled object this binary embeds: an install
// completed with another object is upgraded in place. Hashed once a
// process: an install asks for it a dozen times.
var ObjectHash = sync.OnceValue(func() string {
	sum := sha256.Sum256(_SluiceBytes)
	return hex.EncodeToString(sum[:8])
})
