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

/* offload_ready puts the sidecar's far socket of a connection it may hand
 * to the kernel (its dial to an offload port, or its accepted socket on an
 * inbound one) into offload_socks, where the splice program's offload sends
 * to it once the sidecar names the app's end (setsockopt.c). Only sockops
 * may add a socket to a sockhash, and only as it is established. */
static __always_inline void offload_ready(struct bpf_sock_ops *skops, __u32 pod, struct sock_state *st)
{
	__u64 cookie = bpf_get_socket_cookie(skops);
	void *far_socks = pod_map(&offload_socks, pod);
	if (!far_socks || bpf_sock_hash_update(skops, far_socks, &cookie, BPF_ANY)) {
		count(pod, COUNT_OFFLOAD_FULL);
		return;
	}
	st->far_cookie = cookie;
	st->splice |= SPLICE_OFFLOAD_READY;
}
