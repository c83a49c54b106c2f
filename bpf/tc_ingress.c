//go:build ignore
/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* tcx/ingress on the pod's interface: hand each new inbound TCP connection
 * for a captured port to the sidecar's inbound listener with bpf_sk_assign.
 * The SYN keeps its destination, so the accepted socket's local address is
 * the original destination and no reply needs translating back; packets of
 * established connections find their socket by the normal lookup. */
#include "sluice.h"
#include <bpf/bpf_core_read.h>

#define ETH_P_IP 0x0800
#define ETH_P_IPV6 0x86DD
#define TCP_FLAGS_OFFSET 13
#define TCP_FLAG_SYN 0x02
#define TCP_FLAG_ACK 0x10
#define IP_FRAG_MASK 0x3fff /* MF flag and fragment offset */

#define TCP_FLAG_RST 0x04
#define ETH_ALEN 6
#define CHECKSUM_PARTIAL 3

extern void *bpf_cast_to_kern_ctx(void *obj) __ksym;

static __always_inline __u16 csum_fold(__u32 sum)
{
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)sum;
}

/* tcp_reset_csum fills the checksum of the 20-byte reset at tcp, whose
 * pseudo-header sums to pseudo. A packet the stack left for the device to
 * checksum (CHECKSUM_PARTIAL, as a veth peer sends) gets the pseudo-header
 * sum, which the device completes over the header; any other gets the
 * whole checksum. */
static __always_inline void tcp_reset_csum(struct __sk_buff *skb, struct tcphdr *tcp, __u32 pseudo)
{
	struct sk_buff *kskb = bpf_cast_to_kern_ctx(skb);
	tcp->check = 0;
	if (BPF_CORE_READ_BITFIELD(kskb, ip_summed) == CHECKSUM_PARTIAL) {
		tcp->check = csum_fold(pseudo);
		return;
	}
	__u32 sum = bpf_csum_diff(0, 0, (__be32 *)tcp, sizeof(*tcp), pseudo);
	tcp->check = ~csum_fold(sum);
}

/* make_reset turns the SYN at tcp into the RST+ACK a closed port would
 * answer, from the SYN's destination back to its source: ports swapped,
 * ack = the SYN's sequence + 1, no options. */
static __always_inline void make_reset(struct tcphdr *tcp)
{
	__be16 port = tcp->source;
	tcp->source = tcp->dest;
	tcp->dest = port;
	tcp->ack_seq = bpf_htonl(bpf_ntohl(tcp->seq) + 1);
	tcp->seq = 0;
	((__u8 *)tcp)[12] = 5 << 4; /* data offset: 20 bytes, no options */
	((__u8 *)tcp)[TCP_FLAGS_OFFSET] = TCP_FLAG_RST | TCP_FLAG_ACK;
	tcp->window = 0;
	tcp->urg_ptr = 0;
}

static __always_inline void swap_eth(struct ethhdr *eth)
{
	__u8 mac[ETH_ALEN];
	__builtin_memcpy(mac, eth->h_source, ETH_ALEN);
	__builtin_memcpy(eth->h_source, eth->h_dest, ETH_ALEN);
	__builtin_memcpy(eth->h_dest, mac, ETH_ALEN);
}

/* refuse answers a captured SYN with a reset sent back out of the interface
 * it came in on, as a closed port would answer it: fail-closed inbound,
 * when no sidecar listens. The SYN itself becomes the reset. */
static __always_inline int refuse(struct __sk_buff *skb, bool v4, __u32 l3_len)
{
	/* A SYN with IPv4 options (never sent by Linux) is dropped rather
	 * than rebuilt: still closed, but the client retries until it gives
	 * up. */
	if (v4 && l3_len != sizeof(struct iphdr))
		return TCX_DROP;
	__u32 len = sizeof(struct ethhdr) + sizeof(struct tcphdr) + (v4 ? sizeof(struct iphdr) : sizeof(struct ipv6hdr));
	if (skb->len > len && bpf_skb_change_tail(skb, len, 0))
		return TCX_DROP;
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > data_end)
		return TCX_DROP;
	swap_eth(eth);
	if (v4) {
		struct iphdr *ip = (void *)(eth + 1);
		if ((void *)(ip + 1) > data_end)
			return TCX_DROP;
		struct tcphdr *tcp = (void *)(ip + 1);
		if ((void *)(tcp + 1) > data_end)
			return TCX_DROP;
		__be32 addr = ip->saddr;
		ip->saddr = ip->daddr;
		ip->daddr = addr;
		ip->tot_len = bpf_htons(sizeof(*ip) + sizeof(*tcp));
		ip->id = 0;
		ip->frag_off = 0;
		ip->ttl = 64;
		ip->check = 0;
		ip->check = ~csum_fold(bpf_csum_diff(0, 0, (__be32 *)ip, sizeof(*ip), 0));
		make_reset(tcp);
		struct {
			__be32 saddr, daddr;
			__u8 zero, proto;
			__be16 len;
		} ph = {ip->saddr, ip->daddr, 0, IPPROTO_TCP, bpf_htons(sizeof(*tcp))};
		tcp_reset_csum(skb, tcp, bpf_csum_diff(0, 0, (__be32 *)&ph, sizeof(ph), 0));
	} else {
		struct ipv6hdr *ip6 = (void *)(eth + 1);
		if ((void *)(ip6 + 1) > data_end)
			return TCX_DROP;
		struct tcphdr *tcp = (void *)(ip6 + 1);
		if ((void *)(tcp + 1) > data_end)
			return TCX_DROP;
		struct in6_addr addr = ip6->saddr;
		ip6->saddr = ip6->daddr;
		ip6->daddr = addr;
		ip6->payload_len = bpf_htons(sizeof(*tcp));
		ip6->hop_limit = 64;
		make_reset(tcp);
		struct {
			struct in6_addr saddr, daddr;
			__be32 len;
			__u8 zero[3], proto;
		} ph = {ip6->saddr, ip6->daddr, bpf_htonl(sizeof(*tcp)), {0, 0, 0}, IPPROTO_TCP};
		tcp_reset_csum(skb, tcp, bpf_csum_diff(0, 0, (__be32 *)&ph, sizeof(ph), 0));
	}
	return bpf_redirect(skb->ifindex, 0);
}

/* no_sidecar handles a captured SYN that found no sidecar listening: on to
 * the application with --fail-open, otherwise refused with a reset. */
static __always_inline int no_sidecar(struct __sk_buff *skb, const struct policy *pol, bool v4, __u32 l3_len)
{
	count(COUNT_INBOUND_NO_LISTENER);
	if (pol->flags & CONFIG_FAIL_OPEN) {
		count(COUNT_FAIL_OPEN_INBOUND);
		return TCX_NEXT;
	}
	count(COUNT_FAIL_CLOSED_INBOUND);
	return refuse(skb, v4, l3_len);
}

/* steer assigns the SYN to the listener found with tuple (whose destination
 * port is already the inbound listener's). With no sidecar listening,
 * no_sidecar decides. Nothing is recorded: the accepted socket's local
 * address is the original destination. */
static __always_inline int steer(struct __sk_buff *skb, const struct policy *pol, struct bpf_sock_tuple *tuple,
				 __u32 tuple_size, __u32 l3_len)
{
	bool v4 = tuple_size == sizeof(tuple->ipv4);
	struct bpf_sock *sk = bpf_sk_lookup_tcp(skb, tuple, tuple_size, BPF_F_CURRENT_NETNS, 0);
	if (!sk)
		return no_sidecar(skb, pol, v4, l3_len);
	if (sk->state != BPF_TCP_LISTEN) {
		bpf_sk_release(sk);
		return no_sidecar(skb, pol, v4, l3_len);
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
	__u32 tuple_size, l3_len;

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
		l3_len = ihl;
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
		l3_len = sizeof(*ip6);
	} else {
		return TCX_NEXT;
	}

	__u32 slot;
	const struct policy *pol = active_policy(&slot);
	if (!pol || !inbound_port_captured(pol, bpf_ntohs(tcp->dest)))
		return TCX_NEXT;
	if (inbound_kernel_only(pol, bpf_ntohs(tcp->dest))) {
		count(COUNT_KERNEL_ONLY_INBOUND);
		return TCX_NEXT;
	}

	/* sport and dport sit at the same offsets in both tuple layouts. */
	if (tuple_size == sizeof(tuple.ipv4)) {
		tuple.ipv4.sport = tcp->source;
		tuple.ipv4.dport = bpf_htons(pol->inbound_port);
	} else {
		tuple.ipv6.sport = tcp->source;
		tuple.ipv6.dport = bpf_htons(pol->inbound_port);
	}
	return steer(skb, pol, &tuple, tuple_size, l3_len);
}
