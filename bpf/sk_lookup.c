//go:build ignore
/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* sk_lookup on the pod's network namespace: inbound capture. The kernel runs
 * it whenever it looks for a listener for a TCP segment, after it has
 * reassembled fragments, walked IPv6 extension headers and found no
 * established, request or TIME_WAIT socket of the segment's own tuple. So
 * it sees every way a connection can start: a SYN, the ACK of a SYN-cookie
 * handshake, a SYN that recycles a TIME_WAIT tuple. For a captured port it
 * hands the lookup to the sidecar's inbound listener; the segment keeps its
 * destination, so the accepted socket's own address is the original
 * destination and nothing is rewritten or recorded. With no sidecar it
 * drops the lookup, and the kernel answers as it answers a closed port (a
 * reset, under its own rules), or with --fail-open lets the app have it.
 * A lookup for an address it knows no pod of is dropped alike. */
#include "sluice.h"

/* Every network namespace's loopback device has this index. */
#define LOOPBACK_IFINDEX 1

/* no_sidecar decides for a captured lookup with no sidecar listening. */
static __always_inline int no_sidecar(__u32 pod, const struct policy *pol)
{
	count(pod, COUNT_INBOUND_NO_LISTENER);
	if (pol->flags & CONFIG_FAIL_OPEN) {
		count(pod, COUNT_FAIL_OPEN_INBOUND);
		return SK_PASS;
	}
	count(pod, COUNT_FAIL_CLOSED_INBOUND);
	return SK_DROP;
}

/* from_inside tells a connection from inside the pod (the sidecar's own hop
 * to the app, the app to itself): it comes over loopback, but the kernel
 * names the interface of the address it goes to, so the source says it: a
 * loopback address (the sidecar dials IPv4 from 127.0.0.6), or the very
 * address it goes to (what the kernel picks to reach a local address). The
 * kernel drops packets from the network with a loopback source; one forged
 * with the pod's own address gets its SYN-ACK sent to the pod itself, so it
 * never completes a handshake. */
static __always_inline bool from_inside(const struct bpf_sk_lookup *ctx, const struct addr6 *local)
{
	if (ctx->ingress_ifindex == LOOPBACK_IFINDEX)
		return true;
	if (ctx->family == AF_INET)
		return (bpf_ntohl(ctx->remote_ip4) >> 24) == 127 || ctx->remote_ip4 == ctx->local_ip4;
	struct addr6 remote = { .w = { ctx->remote_ip6[0], ctx->remote_ip6[1], ctx->remote_ip6[2],
				       ctx->remote_ip6[3] } };
	return addr_is_loopback(&remote) || addr_equal(&remote, local);
}

/* local_addr is the address the lookup is for: the pod's own. Both
 * families' fields are read before the family picks one (see CTX_TUPLE). */
static __always_inline void local_addr(const struct bpf_sk_lookup *ctx, struct addr6 *local)
{
	__u32 l4 = ctx->local_ip4;
	__u32 l6[4] = { ctx->local_ip6[0], ctx->local_ip6[1], ctx->local_ip6[2], ctx->local_ip6[3] };
	barrier_var(l4);
	for (int i = 0; i < 4; i++)
		barrier_var(l6[i]);
	if (ctx->family == AF_INET)
		addr_from_v4(local, l4);
	else
		addr_from_v6(local, l6);
}

SEC("sk_lookup")
int sluice_sk_lookup(struct bpf_sk_lookup *ctx)
{
	if (ctx->protocol != IPPROTO_TCP)
		return SK_PASS;
	struct addr6 local;
	local_addr(ctx, &local);
	if (from_inside(ctx, &local))
		return SK_PASS;
	/* This program runs only in captured pods' namespaces, so an address
	 * of no pod is one its pod got after install registered its
	 * addresses (or a link-local one, never registered). Whose policy
	 * applies is unknown: refused, as a closed port is, and counted,
	 * never the app's unsteered. Rerunning install registers it. */
	__u32 *at = bpf_map_lookup_elem(&pod_ips, &local);
	if (!at) {
		node_count(NODE_INBOUND_UNKNOWN_ADDRESS);
		return SK_DROP;
	}
	__u32 pod = *at, slot;
	const struct policy *pol = active_policy(pod, &slot);
	void *listeners = pod_map(&inbound_listeners, pod);
	if (!pol || !listeners || !inbound_port_captured(pod, slot, pol, ctx->local_port))
		return SK_PASS;
	if (inbound_kernel_only(pod, slot, ctx->local_port)) {
		count(pod, COUNT_KERNEL_ONLY_INBOUND);
		return SK_PASS;
	}
	__u32 key = ctx->family == AF_INET6 ? LISTENER_IPV6 : LISTENER_IPV4;
	struct bpf_sock *sk = bpf_map_lookup_elem(listeners, &key);
	if (!sk && key == LISTENER_IPV4) {
		/* A dual-stack IPv6 listener takes IPv4 too. */
		key = LISTENER_IPV6;
		sk = bpf_map_lookup_elem(listeners, &key);
	}
	if (!sk)
		return no_sidecar(pod, pol);
	long err = bpf_sk_assign(ctx, sk, 0);
	bpf_sk_release(sk);
	if (err) {
		/* An IPv6-only listener for an IPv4 connection, or one closing. */
		count(pod, COUNT_INBOUND_ASSIGN_FAILED);
		return no_sidecar(pod, pol);
	}
	count(pod, COUNT_INBOUND_STEERED);
	return SK_PASS;
}
