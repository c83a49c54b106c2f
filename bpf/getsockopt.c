//go:build ignore
/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* cgroup/getsockopt: answer SO_ORIGINAL_DST on the proxy's accepted socket
 * exactly as conntrack would, so Envoy, HAProxy and the built-in proxy need no
 * Sluice-specific API. Every other getsockopt passes through untouched. */
#include "sluice.h"

/* The accepted socket's peer is the app (the connection's client) and its
 * local end is the listener (the server), both as the app's sockops saw them. */
static __always_inline void accepted_tuple(struct bpf_sock *sk, struct tuple_key *key)
{
	if (sk->family == AF_INET) {
		addr_from_v4(&key->client, sk->dst_ip4);
		addr_from_v4(&key->server, sk->src_ip4);
	} else {
		key->client.w[0] = sk->dst_ip6[0];
		key->client.w[1] = sk->dst_ip6[1];
		key->client.w[2] = sk->dst_ip6[2];
		key->client.w[3] = sk->dst_ip6[3];
		key->server.w[0] = sk->src_ip6[0];
		key->server.w[1] = sk->src_ip6[1];
		key->server.w[2] = sk->src_ip6[2];
		key->server.w[3] = sk->src_ip6[3];
	}
	key->client_port = bpf_ntohs(sk->dst_port);
	key->server_port = sk->src_port;
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

SEC("cgroup/getsockopt")
int sluice_getsockopt(struct bpf_sockopt *ctx)
{
	if (ctx->optname != SO_ORIGINAL_DST || (ctx->level != SOL_IP && ctx->level != SOL_IPV6))
		goto pass;

	struct bpf_sock *sk = ctx->sk;
	if (!sk || sk->protocol != IPPROTO_TCP)
		goto pass;

	struct tuple_key key = {};
	accepted_tuple(sk, &key);
	struct orig_dst *orig = bpf_map_lookup_elem(&orig_by_tuple, &key);
	if (!orig)
		goto pass;

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
