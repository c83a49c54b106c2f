// Package bpf holds Sluice's eBPF programs and their bpf2go bindings; the
// generated objects are committed so `go build` needs no clang.
package bpf

//go:generate go tool bpf2go -cc clang -cflags "-O2 -g -Wall -Werror" -target bpfel -type capture_config -type lpm_key -type orig_dst -type tuple_key -type addr6 -type config_flag -type port_flag Sluice sluice.c -- -I./headers
