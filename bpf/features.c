//go:build ignore
/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* syscall: the optional kernel fields this kernel has, as CO-RE found them
 * when the node's programs were loaded. Install asks it before it installs
 * splice or offload: reading the kernel's BTF itself takes 38 ms a process. */
#include "sluice.h"
#include <bpf/bpf_core_read.h>

/* Bit 0: sk_psock counts the bytes spliced to a socket and not read yet
 * (msg_tot_len, a 2026 addition), which splice's flow control reads. */
#define FEATURE_SPLICE_BACKLOG 1

SEC("syscall")
int sluice_features(void *ctx)
{
	int features = 0;

	if (bpf_core_field_exists(((struct sk_psock *)0)->msg_tot_len))
		features |= FEATURE_SPLICE_BACKLOG;
	return features;
}
