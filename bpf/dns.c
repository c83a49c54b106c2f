//go:build ignore
/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* DNS capture (--redirect-dns): the app's queries to port 53 of its
 * nameservers (of any address with --capture-all-dns) go to the sidecar's
 * DNS port on loopback instead, as Istio's DNS proxying has iptables do.
 * UDP is taken at connect (connected sockets: Go, glibc) and at sendmsg
 * (unconnected sendto: musl), and a reply's source is given back as the
 * nameserver asked at recvmsg, since resolvers drop answers from any other
 * address. TCP (a truncated answer's retry) is taken by the TCP capture
 * (connect.c) to the same port. The proxy identity's own queries, the
 * forwarder's to the nameservers, are never taken. */
#include "dns.h"

SEC("cgroup/sendmsg4")
int sluice_sendmsg4(struct bpf_sock_addr *ctx)
{
	return dns_udp4(ctx) ? 1 : 0;
}

SEC("cgroup/sendmsg6")
int sluice_sendmsg6(struct bpf_sock_addr *ctx)
{
	return dns_udp6(ctx) ? 1 : 0;
}

/* dns_reply returns the nameserver to give as the source of a datagram
 * from the socket's DNS port, or NULL to leave the source as it is. */
static __always_inline const struct orig_dst *dns_reply(struct bpf_sock_addr *ctx)
{
	struct dns_state *st = bpf_sk_storage_get(&dns_states, ctx->sk, 0, 0);
	if (!st || bpf_ntohs(ctx->user_port) != st->via_port)
		return NULL;
	return &st->orig;
}

SEC("cgroup/recvmsg4")
int sluice_recvmsg4(struct bpf_sock_addr *ctx)
{
	const struct orig_dst *o = dns_reply(ctx);
	if (o && ctx->user_ip4 == bpf_htonl(0x7f000001)) {
		ctx->user_ip4 = o->addr.w[3];
		ctx->user_port = bpf_htons(o->port);
	}
	return 1;
}

SEC("cgroup/recvmsg6")
int sluice_recvmsg6(struct bpf_sock_addr *ctx)
{
	const struct orig_dst *o = dns_reply(ctx);
	if (!o)
		return 1;
	struct addr6 src = { .w = { ctx->user_ip6[0], ctx->user_ip6[1], ctx->user_ip6[2], ctx->user_ip6[3] } };
	if (!addr_is_loopback(&src))
		return 1;
	ctx->user_ip6[0] = o->addr.w[0];
	ctx->user_ip6[1] = o->addr.w[1];
	ctx->user_ip6[2] = o->addr.w[2];
	ctx->user_ip6[3] = o->addr.w[3];
	ctx->user_port = bpf_htons(o->port);
	return 1;
}
