/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Joining the splice table, shared by sockops (which adds a connection's
 * local ends as they are established) and splice.c (the sk_msg program that
 * passes their bytes). */
#pragma once

#include "sluice.h"

static __always_inline bool splice_on(const struct policy *pol)
{
	return pol && (pol->flags & CONFIG_SPLICE);
}

static __always_inline void splice_join(struct bpf_sock_ops *skops, __u32 pod, struct tuple_key *key)
{
	/* An offload a sidecar never took back (it was killed) must not
	 * send a new connection with the same tuple elsewhere. */
	void *peers = pod_map(&offload_peers, pod);
	if (peers)
		bpf_map_delete_elem(peers, key);
	void *socks = pod_map(&splice_socks, pod);
	if (!socks || bpf_sock_hash_update(skops, socks, key, BPF_NOEXIST))
		count(pod, COUNT_SPLICE_FULL);
	else
		count(pod, COUNT_SPLICE_JOINED);
}
