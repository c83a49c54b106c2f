/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* DNS capture's state and decisions, shared by dns.c (sendmsg, recvmsg),
 * connect.c (UDP connects, and TCP to port 53) and getpeername.c. */
#ifndef SLUICE_DNS_H
#define SLUICE_DNS_H

#include "sluice.h"

int forget_earlier_connect(struct bpf_sock_addr *ctx, __u32 pod); /* connect.c */

/* The nameserver a UDP socket's query was sent to, and the DNS port it went
 * to instead: replies from that port are given the nameserver's address. */
struct dns_state {
	struct orig_dst orig;
	__u16 via_port; /* host order */
	__u16 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct dns_state);
} dns_states SEC(".maps");

/* dns_query_to reports whether a send to dst:port is a DNS query to take. */
static __always_inline bool dns_query_to(const struct policy *pol, const struct addr6 *dst, __u16 port)
{
	if (!(pol->flags & CONFIG_REDIRECT_DNS) || port != 53)
		return false;
	if (pol->flags & CONFIG_CAPTURE_ALL_DNS)
		return true;
	for (int i = 0; i < MAX_DNS_SERVERS; i++) {
		if (i >= pol->dns_count)
			break;
		if (addr_equal(&pol->dns_servers[i], dst))
			return true;
	}
	return false;
}

/* dns_fail applies the fail policy to a query with no DNS listener to take
 * it: 0 sends it on to the nameserver (fail open), -1 refuses it at once
 * with ECONNREFUSED, so the resolver moves on rather than waiting out its
 * timeout (fail closed). Both are counted. */
static __always_inline int dns_fail(__u32 pod, const struct policy *pol)
{
	if (pol->flags & CONFIG_FAIL_OPEN) {
		count(pod, COUNT_DNS_FAIL_OPEN);
		return 0;
	}
	count(pod, COUNT_DNS_FAIL_CLOSED);
	bpf_set_retval(-ECONNREFUSED);
	return -1;
}

/* dns_udp decides a UDP connect or sendmsg to dst:port: 1 to send it to
 * the DNS port (the nameserver recorded on the socket), 0 to leave it, -1
 * to refuse it. */
static __always_inline int dns_udp(struct bpf_sock_addr *ctx, const struct addr6 *dst, __u16 port, bool v6)
{
	__u32 pod = pod_of(bpf_get_netns_cookie(ctx)), slot;
	const struct policy *pol = active_policy(pod, &slot);
	if (!pol || !dns_query_to(pol, dst, port) || is_proxy(pol))
		return 0;
	if (!loopback_listening(ctx, pol->dns_port, v6, false))
		return dns_fail(pod, pol);
	struct dns_state *st = bpf_sk_storage_get(&dns_states, ctx->sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!st) {
		/* The answer would come from loopback, which the resolver
		 * drops: refuse at once rather than have it wait. */
		count(pod, COUNT_CONNECT_NO_STATE);
		bpf_set_retval(-ECONNREFUSED);
		return -1;
	}
	st->orig.addr = *dst;
	st->orig.port = port;
	st->orig.family = v6 ? AF_INET6 : AF_INET;
	st->via_port = pol->dns_port;
	count(pod, COUNT_DNS_REDIRECTED);
	return 1;
}

/* Global functions, verified once each, not in every path of connect's. */

/* dns_udp4 takes an IPv4 socket's UDP connect or sendmsg: it returns the
 * hook's verdict (1 go on, 0 refuse). */
__attribute__((noinline)) int dns_udp4(struct bpf_sock_addr *ctx)
{
	if (!ctx)
		return 1;
	struct addr6 dst;
	addr_from_v4(&dst, ctx->user_ip4);
	int v = dns_udp(ctx, &dst, bpf_ntohs(ctx->user_port), false);
	if (v < 0)
		return 0;
	if (v > 0) {
		struct dns_state *st = bpf_sk_storage_get(&dns_states, ctx->sk, 0, 0);
		if (!st)
			return 0;
		ctx->user_ip4 = bpf_htonl(0x7f000001);
		ctx->user_port = bpf_htons(st->via_port);
	}
	return 1;
}

/* dns_udp6 is dns_udp4 for an IPv6 socket: a v4-mapped nameserver's
 * queries go to ::ffff:127.0.0.1, an IPv6 one's to ::1. */
__attribute__((noinline)) int dns_udp6(struct bpf_sock_addr *ctx)
{
	if (!ctx)
		return 1;
	struct addr6 dst = { .w = { ctx->user_ip6[0], ctx->user_ip6[1], ctx->user_ip6[2], ctx->user_ip6[3] } };
	bool mapped = addr_is_v4mapped(&dst);
	int v = dns_udp(ctx, &dst, bpf_ntohs(ctx->user_port), !mapped);
	if (v < 0)
		return 0;
	if (v > 0) {
		struct dns_state *st = bpf_sk_storage_get(&dns_states, ctx->sk, 0, 0);
		if (!st)
			return 0;
		ctx->user_ip6[0] = 0;
		ctx->user_ip6[1] = 0;
		ctx->user_ip6[2] = mapped ? bpf_htonl(0xffff) : 0;
		ctx->user_ip6[3] = mapped ? bpf_htonl(0x7f000001) : bpf_htonl(1);
		ctx->user_port = bpf_htons(st->via_port);
	}
	return 1;
}

/* dns_learn serves the DNS forwarder, which is to ask the nameserver the
 * app asked: the forwarder (the proxy) connects a UDP socket to a query's
 * source, the app's socket. That socket is found as a reply from the DNS
 * port would find it, and the nameserver it asked is copied to the
 * forwarder's socket, whose SO_ORIGINAL_DST then answers it (getsockopt.c).
 * via_port 0: nothing comes from port 0, so no source is rewritten there. */
static __always_inline void dns_learn(struct bpf_sock_addr *ctx, struct bpf_sock_tuple *tuple, __u32 size)
{
	__u32 pod = pod_of(bpf_get_netns_cookie(ctx)), slot;
	const struct policy *pol = active_policy(pod, &slot);
	if (!pol || !(pol->flags & CONFIG_REDIRECT_DNS) || !is_proxy(pol))
		return;
	if (size == sizeof(tuple->ipv4))
		tuple->ipv4.sport = bpf_htons(pol->dns_port);
	else
		tuple->ipv6.sport = bpf_htons(pol->dns_port);
	struct bpf_sock *app = bpf_sk_lookup_udp(ctx, tuple, size, BPF_F_CURRENT_NETNS, 0);
	if (!app)
		return;
	struct dns_state *ast = bpf_sk_storage_get(&dns_states, app, 0, 0);
	struct dns_state found = {};
	if (ast && ast->via_port == pol->dns_port)
		found = *ast;
	bpf_sk_release(app);
	if (!found.via_port)
		return;
	struct dns_state *own = bpf_sk_storage_get(&dns_states, ctx->sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!own)
		return;
	own->orig = found.orig;
	own->via_port = 0;
}

/* dns_learn4 and dns_learn6 are dns_learn for connect4 and connect6: the
 * query came to the forwarder on 127.0.0.1 or ::1 from the address the
 * forwarder connects to. */
__attribute__((noinline)) int dns_learn4(struct bpf_sock_addr *ctx)
{
	if (!ctx)
		return 0;
	struct bpf_sock_tuple tuple = {};
	tuple.ipv4.saddr = bpf_htonl(0x7f000001);
	tuple.ipv4.daddr = ctx->user_ip4;
	tuple.ipv4.dport = (__u16)ctx->user_port;
	dns_learn(ctx, &tuple, sizeof(tuple.ipv4));
	return 0;
}

__attribute__((noinline)) int dns_learn6(struct bpf_sock_addr *ctx)
{
	if (!ctx)
		return 0;
	struct bpf_sock_tuple tuple = {};
	tuple.ipv6.saddr[3] = bpf_htonl(1);
	tuple.ipv6.daddr[0] = ctx->user_ip6[0];
	tuple.ipv6.daddr[1] = ctx->user_ip6[1];
	tuple.ipv6.daddr[2] = ctx->user_ip6[2];
	tuple.ipv6.daddr[3] = ctx->user_ip6[3];
	tuple.ipv6.dport = (__u16)ctx->user_port;
	dns_learn(ctx, &tuple, sizeof(tuple.ipv6));
	return 0;
}

/* What dns_tcp4 and dns_tcp6 did with a TCP connect to port 53. */
enum dns_tcp_verdict {
	DNS_NOT_TAKEN = 0, /* no query to take (or fail open): capture decides */
	DNS_TAKEN = 1,     /* sent to the DNS port */
	DNS_REFUSED = 2,   /* refused (fail closed, or no socket storage) */
};

/* dns_tcp decides a TCP connect of the app's to dst:port: taken to the DNS
 * port, with the nameserver recorded as the app's destination
 * (getpeername answers it), refused, or left to capture. */
static __always_inline int dns_tcp(struct bpf_sock_addr *ctx, const struct addr6 *dst, __u16 port, __u16 family)
{
	__u32 pod = pod_of(bpf_get_netns_cookie(ctx)), slot;
	const struct policy *pol = active_policy(pod, &slot);
	if (!pol || ctx->type != SOCK_STREAM || (ctx->protocol != IPPROTO_TCP && ctx->protocol != IPPROTO_MPTCP) ||
	    !dns_query_to(pol, dst, port) || is_proxy(pol))
		return DNS_NOT_TAKEN;
	if (!loopback_listening(ctx, pol->dns_port, family == AF_INET6, true))
		return dns_fail(pod, pol) < 0 ? DNS_REFUSED : DNS_NOT_TAKEN;
	forget_earlier_connect(ctx, pod);
	struct sock_state *st = subflow_state(pod, ctx->sk, BPF_SK_STORAGE_GET_F_CREATE);
	if (!st) {
		count(pod, COUNT_CONNECT_NO_STATE);
		return DNS_REFUSED;
	}
	st->orig.addr = *dst;
	st->orig.port = port;
	st->orig.family = family;
	st->dial = st->orig;
	st->role = ROLE_APP;
	count(pod, COUNT_DNS_REDIRECTED);
	return DNS_TAKEN;
}

/* dns_tcp4 and dns_tcp6 are dns_tcp for connect4 and connect6, rewriting
 * the destination of a connect they take; global functions, verified once
 * each rather than in every path of connect's. */
__attribute__((noinline)) int dns_tcp4(struct bpf_sock_addr *ctx)
{
	if (!ctx)
		return DNS_NOT_TAKEN;
	struct addr6 dst;
	addr_from_v4(&dst, ctx->user_ip4);
	int v = dns_tcp(ctx, &dst, bpf_ntohs(ctx->user_port), AF_INET);
	if (v == DNS_TAKEN) {
		__u32 slot;
		const struct policy *pol = active_policy(pod_of(bpf_get_netns_cookie(ctx)), &slot);
		if (!pol)
			return DNS_REFUSED;
		ctx->user_ip4 = bpf_htonl(0x7f000001);
		ctx->user_port = bpf_htons(pol->dns_port);
	}
	return v;
}

__attribute__((noinline)) int dns_tcp6(struct bpf_sock_addr *ctx)
{
	if (!ctx)
		return DNS_NOT_TAKEN;
	struct addr6 dst = { .w = { ctx->user_ip6[0], ctx->user_ip6[1], ctx->user_ip6[2], ctx->user_ip6[3] } };
	bool mapped = addr_is_v4mapped(&dst);
	int v = dns_tcp(ctx, &dst, bpf_ntohs(ctx->user_port), mapped ? AF_INET : AF_INET6);
	if (v == DNS_TAKEN) {
		__u32 slot;
		const struct policy *pol = active_policy(pod_of(bpf_get_netns_cookie(ctx)), &slot);
		if (!pol)
			return DNS_REFUSED;
		ctx->user_ip6[0] = 0;
		ctx->user_ip6[1] = 0;
		ctx->user_ip6[2] = mapped ? bpf_htonl(0xffff) : 0;
		ctx->user_ip6[3] = mapped ? bpf_htonl(0x7f000001) : bpf_htonl(1);
		ctx->user_port = bpf_htons(pol->dns_port);
	}
	return v;
}

#endif /* SLUICE_DNS_H */
