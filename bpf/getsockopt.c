//go:build ignore
/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* cgroup/getsockopt: answer SO_ORIGINAL_DST on the proxy's accepted socket
 * exactly as conntrack would, so Envoy, HAProxy and the built-in proxy need no
 * Sluice-specific API; on the DNS forwarder's UDP socket connected to a
 * query's source, the nameserver asked; and answer the built-in sidecar's
 * SLUICE_PLAN. Every other getsockopt passes through untouched. */
#include "sluice.h"
#include "dns.h"

/* inbound_orig is the original destination of a connection the inbound hook
 * steered: bpf_sk_assign keeps the SYN's destination, so it is the socket's
 * own local address. A connection made straight to the inbound listener has
 * the listener's port and gets no answer, as with conntrack. */
static __always_inline bool inbound_orig(__u32 pod, __u32 slot, const struct policy *pol, const struct bpf_sock *sk,
					 struct orig_dst *orig)
{
	__u16 port = sk->src_port;
	if (port == pol->inbound_port || port == pol->outbound_port || !inbound_port_captured(pod, slot, pol, port))
		return false;
	/* Every field is read, at its fixed offset, before the family picks
	 * one; the barriers keep the compiler from sinking the reads into the
	 * branches and turning the choice into pointer arithmetic on the
	 * socket, which the verifier refuses. */
	__u32 ip4 = sk->src_ip4;
	__u32 ip6[4] = { sk->src_ip6[0], sk->src_ip6[1], sk->src_ip6[2], sk->src_ip6[3] };
	barrier_var(ip4);
	barrier_var(ip6[0]);
	barrier_var(ip6[1]);
	barrier_var(ip6[2]);
	barrier_var(ip6[3]);
	if (sk->family == AF_INET)
		addr_from_v4(&orig->addr, ip4);
	else
		addr_from_v6(&orig->addr, ip6);
	orig->port = port;
	orig->family = addr_is_v4mapped(&orig->addr) ? AF_INET : AF_INET6;
	return true;
}

static __always_inline int answer4(struct bpf_sockopt *ctx, const struct orig_dst *orig)
{
	struct sockaddr_in *sin = ctx->optval;
	if ((void *)(sin + 1) > ctx->optval_end)
		return 0;
	sin->sin_family = AF_INET;
	sin->sin_port = bpf_htons(orig->port);
	sin->sin_addr.s_addr = orig->addr.w[3];
	__builtin_memset(sin->__pad, 0, sizeof(sin->__pad));
	ctx->optlen = sizeof(*sin);
	ctx->retval = 0;
	return 1;
}

static __always_inline int answer6(struct bpf_sockopt *ctx, const struct orig_dst *orig)
{
	struct sockaddr_in6 *sin6 = ctx->optval;
	if ((void *)(sin6 + 1) > ctx->optval_end)
		return 0;
	sin6->sin6_family = AF_INET6;
	sin6->sin6_port = bpf_htons(orig->port);
	sin6->sin6_flowinfo = 0;
	sin6->sin6_addr.in6_u.u6_addr32[0] = orig->addr.w[0];
	sin6->sin6_addr.in6_u.u6_addr32[1] = orig->addr.w[1];
	sin6->sin6_addr.in6_u.u6_addr32[2] = orig->addr.w[2];
	sin6->sin6_addr.in6_u.u6_addr32[3] = orig->addr.w[3];
	sin6->sin6_scope_id = 0;
	ctx->optlen = sizeof(*sin6);
	ctx->retval = 0;
	return 1;
}

/* answer_plan answers SLUICE_PLAN with the pod's policy in force, to any
 * process of the pod (it is no secret there): the sidecar learns its ports,
 * identity and flags from the kernel, not from pins. */
static __always_inline int answer_plan(struct bpf_sockopt *ctx)
{
	__u32 pod = pod_of(bpf_get_netns_cookie(ctx)), slot;
	const struct policy *pol = active_policy(pod, &slot);
	struct policy *out = ctx->optval;
	if (!pol || ctx->optname != SLUICE_PLAN || (void *)(out + 1) > ctx->optval_end)
		return 0;
	*out = *pol;
	ctx->optlen = sizeof(*out);
	ctx->retval = 0;
	return 1;
}

SEC("cgroup/getsockopt")
int sluice_getsockopt(struct bpf_sockopt *ctx)
{
	if (ctx->level == SOL_SLUICE && answer_plan(ctx))
		return 1;
	if (ctx->optname != SO_ORIGINAL_DST || (ctx->level != SOL_IP && ctx->level != SOL_IPV6))
		goto pass;

	struct bpf_sock *sk = ctx->sk;
	if (!sk || (sk->protocol != IPPROTO_TCP && sk->protocol != IPPROTO_MPTCP && sk->protocol != IPPROTO_UDP))
		goto pass;
	__u32 pod = pod_of(bpf_get_netns_cookie(ctx)), slot;
	const struct policy *pol = active_policy(pod, &slot);
	if (!pol || !is_proxy(pol))
		goto pass;

	struct orig_dst inbound = {};
	const struct orig_dst *orig = &inbound;
	if (sk->protocol == IPPROTO_UDP) {
		/* The DNS forwarder's socket connected to a query's source
		 * (dns_learn): the nameserver that query was sent to. */
		struct dns_state *dst = bpf_sk_storage_get(&dns_states, sk, 0, 0);
		if (!dst || dst->via_port)
			goto pass;
		orig = &dst->orig;
	} else {
		struct sock_state *st = held_state(pod, sk);
		if (st && st->role == ROLE_ACCEPTED)
			orig = &st->orig;
		else if (!inbound_orig(pod, slot, pol, sk, &inbound))
			goto pass;
	}

	/* Like conntrack, each level answers only for its own family. */
	if (ctx->level == SOL_IP && orig->family == AF_INET && answer4(ctx, orig))
		return 1;
	if (ctx->level == SOL_IPV6 && orig->family == AF_INET6 && answer6(ctx, orig))
		return 1;

pass:
	/* optlen 0 tells the kernel to hand the caller its own result; the
	 * program only sees the first page of a larger value, which it must not
	 * truncate. */
	if (ctx->optlen > (int)page_size)
		ctx->optlen = 0;
	return 1;
}
