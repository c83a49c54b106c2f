//go:build ignore
/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* cgroup/setsockopt: the sidecar hands a proxied connection to the kernel
 * (offload), and takes it back, by a setsockopt at level SOL_SLUICE on its
 * far socket, naming the app's end of the hop. The kernel checks who asks
 * and on what, and writes the pod's offload_peers itself: no sidecar holds
 * a map, so none can write another pod's. Every other setsockopt passes
 * through untouched. */
#include "sluice.h"

/* refuse fails the caller's setsockopt with err. */
static __always_inline int refuse(int err)
{
	bpf_set_retval(-err);
	return 0;
}

SEC("cgroup/setsockopt")
int sluice_setsockopt(struct bpf_sockopt *ctx)
{
	if (ctx->level != SOL_SLUICE) {
		/* 0: the kernel takes the caller's own value, uncopied. */
		ctx->optlen = 0;
		return 1;
	}
	struct bpf_sock *sk = ctx->sk;
	__u32 pod = pod_of(bpf_get_netns_cookie(ctx)), slot;
	const struct policy *pol = active_policy(pod, &slot);
	if (!sk || !pol || !is_proxy(pol))
		return refuse(EPERM);
	if (ctx->optname != SLUICE_OFFLOAD_HAND && ctx->optname != SLUICE_OFFLOAD_RELEASE)
		return refuse(ENOPROTOOPT);
	struct tuple_key app = {};
	struct tuple_key *val = ctx->optval;
	if ((void *)(val + 1) > ctx->optval_end || ctx->optlen != sizeof(app))
		return refuse(EINVAL);
	app = *val;
	/* Only a socket sockops put in offload_socks: the sidecar's own, on an
	 * offload port of this pod's policy. */
	struct sock_state *st = held_state(pod, sk);
	void *peers = pod_map(&offload_peers, pod);
	if (!st || !(st->splice & SPLICE_OFFLOAD_READY) || !peers)
		return refuse(ENOENT);
	__u64 far = st->far_cookie;
	if (ctx->optname == SLUICE_OFFLOAD_HAND) {
		if (bpf_map_update_elem(peers, &app, &far, BPF_ANY))
			return refuse(ENOSPC);
		count(pod, COUNT_OFFLOAD_HANDED);
	} else {
		/* Only what this socket was handed: a newer connection may
		 * have the tuple since. */
		__u64 *cur = bpf_map_lookup_elem(peers, &app);
		if (cur && *cur == far)
			bpf_map_delete_elem(peers, &app);
	}
	/* -1: done here; the kernel's own setsockopt never sees the level. */
	ctx->optlen = -1;
	return 1;
}
