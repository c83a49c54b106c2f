//go:build ignore
/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* cgroup/getpeername4 and cgroup/getpeername6: a captured app sees the
 * destination it asked for as its peer, as it would behind iptables. */
#include "sluice.h"
#include "dns.h"

static __always_inline const struct orig_dst *app_orig(struct bpf_sock_addr *ctx)
{
	if (ctx->type == SOCK_DGRAM) {
		/* A connected UDP socket whose queries go to the DNS port
		 * (not the forwarder's, which learnt a nameserver: via_port 0). */
		struct dns_state *dst = bpf_sk_storage_get(&dns_states, ctx->sk, 0, 0);
		return dst && dst->via_port ? &dst->orig : NULL;
	}
	struct sock_state *st = held_state(pod_of(bpf_get_netns_cookie(ctx)), ctx->sk);
	if (!st || (st->role != ROLE_APP && st->role != ROLE_KERNEL_ONLY))
		return NULL;
	return &st->orig;
}

SEC("cgroup/getpeername4")
int sluice_getpeername4(struct bpf_sock_addr *ctx)
{
	const struct orig_dst *orig = app_orig(ctx);
	if (!orig || orig->family != AF_INET)
		return 1;
	ctx->user_ip4 = orig->addr.w[3];
	ctx->user_port = bpf_htons(orig->port);
	return 1;
}

SEC("cgroup/getpeername6")
int sluice_getpeername6(struct bpf_sock_addr *ctx)
{
	const struct orig_dst *orig = app_orig(ctx);
	if (!orig)
		return 1;
	/* IPv4 destinations are stored v4-mapped, which is what an AF_INET6
	 * socket that connected to one expects back. */
	ctx->user_ip6[0] = orig->addr.w[0];
	ctx->user_ip6[1] = orig->addr.w[1];
	ctx->user_ip6[2] = orig->addr.w[2];
	ctx->user_ip6[3] = orig->addr.w[3];
	ctx->user_port = bpf_htons(orig->port);
	return 1;
}
