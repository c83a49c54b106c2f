//go:build ignore
/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* tcx/ingress on the pod's interface: hand each new inbound TCP connection
 * for a captured port to the sidecar's inbound listener with bpf_sk_assign.
 * The SYN keeps its destination, so the accepted socket's local address is
 * the original destination and no reply needs translating back; packets of
 * established connections find their socket by the normal lookup. */
#include "sluice.h"

#define ETH_P_IP 0x0800
#define ETH_P_IPV6 0x86DD
#define TCP_FLAGS_OFFSET 13
#define TCP_FLAG_SYN 0x02
#define TCP_FLAG_ACK 0x10
#define IP_FRAG_MASK 0x3fff /* MF flag and fragment offset */

/* steer assigns the SYN to the listener found with tuple (whose destination
 * port is already the inbound listener's). With no sidecar listening the SYN
 * goes on to the application. Nothing is recorded: the accepted socket's
 * local address is the original destination. */
static __always_inline int steer(struct __sk_buff *skb, struct bpf_sock_tuple *tuple, __u32 tuple_size)
{
	struct bpf_sock *sk = bpf_sk_lookup_tcp(skb, tuple, tuple_size, BPF_F_CURRENT_NETNS, 0);
	if (!sk) {
		count(COUNT_INBOUND_NO_LISTENER);
		return TCX_NEXT;
	}
	if (sk->state != BPF_TCP_LISTEN) {
		bpf_sk_release(sk);
		count(COUNT_INBOUND_NO_LISTENER);
		return TCX_NEXT;
	}
	long err = bpf_sk_assign(skb, sk, 0);
	bpf_sk_release(sk);
	if (err) {
		count(COUNT_INBOUND_ASSIGN_FAILED);
		return TCX_NEXT;
	}
	count(COUNT_INBOUND_STEERED);
	return TCX_PASS;
}

SEC("tcx/ingress")
int sluice_tc_ingress(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > data_end)
		return TCX_NEXT;

	struct bpf_sock_tuple tuple = {};
	struct tcphdr *tcp;
	__u32 tuple_size;

	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);
		if ((void *)(ip + 1) > data_end || ip->protocol != IPPROTO_TCP ||
		    (ip->frag_off & bpf_htons(IP_FRAG_MASK)))
			return TCX_NEXT;
		__u32 ihl = (*(__u8 *)ip & 0x0f) * 4;
		if (ihl < sizeof(*ip))
			return TCX_NEXT;
		tcp = (void *)ip + ihl;
		if ((void *)(tcp + 1) > data_end)
			return TCX_NEXT;
		/* Only a connection's first SYN is steered; everything else
		 * returns here without a map lookup. */
		if ((((__u8 *)tcp)[TCP_FLAGS_OFFSET] & (TCP_FLAG_SYN | TCP_FLAG_ACK)) != TCP_FLAG_SYN)
			return TCX_NEXT;
		tuple.ipv4.saddr = ip->saddr;
		tuple.ipv4.daddr = ip->daddr;
		tuple_size = sizeof(tuple.ipv4);
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);
		/* Extension headers before TCP are not parsed: such SYNs go
		 * straight to the application. */
		if ((void *)(ip6 + 1) > data_end || ip6->nexthdr != IPPROTO_TCP)
			return TCX_NEXT;
		tcp = (void *)(ip6 + 1);
		if ((void *)(tcp + 1) > data_end)
			return TCX_NEXT;
		if ((((__u8 *)tcp)[TCP_FLAGS_OFFSET] & (TCP_FLAG_SYN | TCP_FLAG_ACK)) != TCP_FLAG_SYN)
			return TCX_NEXT;
		for (int i = 0; i < 4; i++) {
			tuple.ipv6.saddr[i] = ip6->saddr.in6_u.u6_addr32[i];
			tuple.ipv6.daddr[i] = ip6->daddr.in6_u.u6_addr32[i];
		}
		tuple_size = sizeof(tuple.ipv6);
	} else {
		return TCX_NEXT;
	}

	__u32 slot;
	const struct policy *pol = active_policy(&slot);
	if (!pol || !inbound_port_captured(pol, bpf_ntohs(tcp->dest)))
		return TCX_NEXT;

	/* sport and dport sit at the same offsets in both tuple layouts. */
	if (tuple_size == sizeof(tuple.ipv4)) {
		tuple.ipv4.sport = tcp->source;
		tuple.ipv4.dport = bpf_htons(pol->inbound_port);
	} else {
		tuple.ipv6.sport = tcp->source;
		tuple.ipv6.dport = bpf_htons(pol->inbound_port);
	}
	return steer(skb, &tuple, tuple_size);
}
