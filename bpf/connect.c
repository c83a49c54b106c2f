//go:build ignore
/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* cgroup/connect4 and cgroup/connect6: steer the app's outbound TCP connects
 * to the sidecar's outbound listener and remember, on the app's socket, where
 * they were going. */
#include "sluice.h"
#include "dns.h"

/* cidr_match looks dst up in one of the CIDR tries, in the policy's slot and
 * the destination's own family. */
static __always_inline bool cidr_match(void *trie, __u32 pod, __u32 slot, const struct addr6 *dst, __u16 family)
{
	struct cidr_key key = { .pod = pod, .slot = slot, .family = family };
	if (family == AF_INET) {
		key.prefixlen = CIDR_KEY_BITS + 32;
		__builtin_memcpy(key.addr, &dst->w[3], 4);
	} else {
		key.prefixlen = CIDR_KEY_BITS + 128;
		__builtin_memcpy(key.addr, dst->w, 16);
	}
	return bpf_map_lookup_elem(trie, &key) != NULL;
}

/* The order follows istio-iptables: port exclusions, CIDR exclusions, then
 * included ports (-q) or included CIDRs (-i); exclusions always win. */
static __always_inline bool should_capture(__u32 pod, const struct policy *pol, __u32 slot, const struct addr6 *dst,
					   __u16 port, __u16 family)
{
	if (addr_is_loopback(dst))
		return false;
	if (port_in(pod, slot, PORT_OUT_EXCLUDE, port))
		return false;
	if (cidr_match(&exclude_cidrs, pod, slot, dst, family))
		return false;
	if (port_in(pod, slot, PORT_OUT_INCLUDE, port))
		return true;
	if (pol->flags & CONFIG_INCLUDE_ALL_CIDRS)
		return true;
	return cidr_match(&include_cidrs, pod, slot, dst, family);
}

/* uniform returns a number in [0, n) with every value equally likely, n > 0
 * (Lemire's multiply-and-reject: no modulo bias). */
static __always_inline __u32 uniform(__u32 n)
{
	__u64 m = (__u64)bpf_get_prandom_u32() * n;
	__u32 low = (__u32)m;
	if (low < n) {
		__u32 threshold = -n % n;
		/* Each retry happens with probability below n / 2^32. */
		for (int i = 0; i < 8 && low < threshold; i++) {
			m = (__u64)bpf_get_prandom_u32() * n;
			low = (__u32)m;
		}
	}
	return m >> 32;
}

/* pick_random returns the backend for draw r in [0, total): each backend
 * owns a run of draws as long as its weight. */
static __always_inline int pick_random(const struct route *rt)
{
	__u32 r = uniform(rt->total);
	for (int i = 0; i < MAX_BACKENDS; i++) {
		if (i >= rt->count)
			break;
		if (r < rt->backends[i].weight)
			return i;
		r -= rt->backends[i].weight;
	}
	return -1;
}

/* pick_round_robin is smooth weighted round-robin (as nginx does it): every
 * backend gains its weight, the one with the most goes next and pays the
 * total back. Over any `total` picks each backend gets exactly its weight. */
static __always_inline int pick_round_robin(__u32 pod, const struct route_key *key, const struct route *rt)
{
	struct rr_key rk = { .vip = key->vip, .port = key->port, .pod = pod };
	struct rr_state *rs = bpf_map_lookup_elem(&rr_states, &rk);
	if (!rs) {
		struct rr_state fresh = { .generation = rt->generation };
		bpf_map_update_elem(&rr_states, &rk, &fresh, BPF_NOEXIST);
		rs = bpf_map_lookup_elem(&rr_states, &rk);
		if (!rs) {
			/* The table is full: still a pick in proportion, but
			 * not an exact split, so it is counted. */
			count(pod, COUNT_RR_FALLBACK);
			return pick_random(rt);
		}
	}
	int best = -1;
	bpf_spin_lock(&rs->lock);
	if (rs->generation != rt->generation) {
		for (int i = 0; i < MAX_BACKENDS; i++)
			rs->current[i] = 0;
		rs->generation = rt->generation;
	}
	__s32 most = 0;
	for (int i = 0; i < MAX_BACKENDS; i++) {
		if (i >= rt->count)
			break;
		rs->current[i] += rt->backends[i].weight;
		if (rt->backends[i].weight && (best < 0 || rs->current[i] > most)) {
			best = i;
			most = rs->current[i];
		}
	}
	if (best >= 0 && best < MAX_BACKENDS)
		rs->current[best] -= rt->total;
	bpf_spin_unlock(&rs->lock);
	return best;
}

/* route_pick sets dial to the backend the service's route picks (dial is
 * left alone when dst has no route). It returns false when the route has
 * no backend to give: every weight is 0. */
static __always_inline bool route_pick(__u32 pod, const struct addr6 *dst, __u16 port, struct orig_dst *dial)
{
	void *active_map = pod_map(&routes_active, pod);
	void *routes_map = pod_map(&routes, pod);
	if (!active_map || !routes_map)
		return true;
	__u32 zero = 0;
	__u32 *active = bpf_map_lookup_elem(active_map, &zero);
	if (!active)
		return true;
	struct route_key key = { .vip = *dst, .port = port, .slot = *active & 1 };
	struct route *rt = bpf_map_lookup_elem(routes_map, &key);
	if (!rt)
		return true;
	if (rt->total == 0)
		return false;
	int i = rt->mode == ROUTE_ROUND_ROBIN ? pick_round_robin(pod, &key, rt) : pick_random(rt);
	if (i < 0 || i >= MAX_BACKENDS)
		return false;
	struct backend *b = &rt->backends[i];
	dial->addr = b->addr;
	dial->port = b->port;
	dial->family = b->family;
	__sync_fetch_and_add(&b->picks, 1);
	return true;
}

/* Global functions (not static, not inlined) are verified once, on their
 * own. Inlined, each would be verified again for every path the route pick
 * before or after it leaves open: forget_earlier_connect and bind_pod_addr
 * together doubled connect6's verified instructions, and with them the
 * load time of every install. */

/* forget_earlier_connect clears what an earlier connect of this socket
 * recorded. A socket may connect again, after a connect that failed or that
 * AF_UNSPEC undid: nothing of the first (a destination getpeername would
 * answer, a role splice would act on) may outlive it. */
__attribute__((noinline)) int forget_earlier_connect(struct bpf_sock_addr *ctx, __u32 pod)
{
	if (!ctx)
		return 0;
	struct sock_state *st = subflow_state(pod, ctx->sk, 0);
	if (st)
		__builtin_memset(st, 0, sizeof(*st));
	return 0;
}

/* capture decides whether a connect is redirected and, if so, records the
 * original destination on the socket (and, for a service with a route, the
 * backend picked for it). It returns 1 to redirect to the sidecar, 2 to send
 * it straight to the dial address (kernel-only), 0 to leave the connect alone
 * and -1 to refuse it. */
static __always_inline int capture(struct bpf_sock_addr *ctx, __u32 pod, const struct policy *pol, __u32 slot,
				   const struct addr6 *dst, __u16 port, __u16 family)
{
	if (ctx->type != SOCK_STREAM || (ctx->protocol != IPPROTO_TCP && ctx->protocol != IPPROTO_MPTCP))
		return 0;
	/* The proxy's own connections must go out untouched, or it would loop
	 * back into itself. Those leaving the pod are flows the sidecar
	 * carries: sockops tracks them from here. Those into the pod (the
	 * sidecar's end of an inbound connection) may be spliced, and those to
	 * an offload port may be handed the app's direction. */
	if (is_proxy(pol)) {
		bool flow = !(pol->flags & CONFIG_NO_FLOWS) && !addr_is_loopback(dst);
		bool splice = pol->flags & CONFIG_SPLICE;
		if (flow || splice) {
			struct sock_state *st = subflow_state(pod, ctx->sk, BPF_SK_STORAGE_GET_F_CREATE);
			if (st && flow)
				st->flow |= FLOW_VIA_SIDECAR;
			if (st && splice)
				st->role = ROLE_SIDECAR;
			if (st && splice && port_in(pod, slot, PORT_OUT_OFFLOAD, port))
				st->splice |= SPLICE_OFFLOAD_DIAL;
		}
		return 0;
	}
	forget_earlier_connect(ctx, pod);
	if (!should_capture(pod, pol, slot, dst, port, family))
		return 0;
	bool kernel_only = port_in(pod, slot, PORT_OUT_KERNEL_ONLY, port) ||
			   cidr_match(&kernel_only_cidrs, pod, slot, dst, family);
	/* Only fail-open asks whether the sidecar listens: a connect
	 * redirected to a port nobody listens on is refused at once by
	 * loopback's reset, which is fail-closed. */
	if (!kernel_only && (pol->flags & CONFIG_FAIL_OPEN) &&
	    !loopback_listening(ctx, pol->outbound_port, family == AF_INET6, true)) {
		count(pod, COUNT_FAIL_OPEN_OUTBOUND);
		return 0;
	}

	struct orig_dst orig = { .addr = *dst, .port = port, .family = family };
	struct orig_dst dial = orig;
	if (!route_pick(pod, dst, port, &dial)) {
		/* Refused at once, as a closed port would be: never a hang. */
		count(pod, COUNT_ROUTE_REFUSED);
		bpf_set_retval(-ECONNREFUSED);
		return -1;
	}
	struct sock_state *st = subflow_state(pod, ctx->sk, BPF_SK_STORAGE_GET_F_CREATE);
	/* Without the record the proxy could not learn the destination:
	 * refuse the connect rather than let it bypass the sidecar. */
	if (!st) {
		count(pod, COUNT_CONNECT_NO_STATE);
		return -1;
	}
	st->orig = orig;
	st->dial = dial;
	if (kernel_only) {
		/* No sidecar: on to the destination, or the route's pick. */
		count(pod, COUNT_KERNEL_ONLY_OUTBOUND);
		st->role = ROLE_KERNEL_ONLY;
		return 2;
	}
	st->role = ROLE_APP;
	return 1;
}

/* pod_addr returns the pod's own address of a family (IPv4 v4-mapped), or
 * NULL when the install recorded none. */
static __always_inline const struct addr6 *pod_addr(__u32 pod, __u32 which)
{
	void *m = pod_map(&pod_addrs, pod);
	if (!m)
		return NULL;
	const struct addr6 *a = bpf_map_lookup_elem(m, &which);
	if (!a || (a->w[0] | a->w[1] | a->w[2] | a->w[3]) == 0)
		return NULL;
	return a;
}

/* bind_pod_addr binds a socket whose connect goes to the sidecar to the
 * pod's own address (which, v6 for an AF_INET6 socket): sent to loopback,
 * it would get a loopback source address, where under iptables REDIRECT,
 * and with no sidecar at all, it has the pod's own, which apps read back
 * with getsockname and advertise. The port is still picked at connect
 * (bpf_bind binds as IP_BIND_ADDRESS_NO_PORT does). A socket the app bound
 * itself keeps its own address: bpf_bind fails, and nothing else changes. */
__attribute__((noinline)) int bind_pod_addr(struct bpf_sock_addr *ctx, __u32 pod, __u32 which, __u32 v6)
{
	if (!ctx)
		return 0;
	const struct addr6 *a = pod_addr(pod, which);
	if (!a)
		return 0;
	if (!v6) {
		struct sockaddr_in sin = { .sin_family = AF_INET, .sin_addr.s_addr = a->w[3] };
		return bpf_bind(ctx, (struct sockaddr *)&sin, sizeof(sin));
	}
	struct sockaddr_in6 sin6 = { .sin6_family = AF_INET6 };
	__builtin_memcpy(&sin6.sin6_addr, a->w, sizeof(a->w));
	return bpf_bind(ctx, (struct sockaddr *)&sin6, sizeof(sin6));
}

SEC("cgroup/connect4")
int sluice_connect4(struct bpf_sock_addr *ctx)
{
	/* DNS first (dns.c): UDP, and TCP to port 53, whatever -i, -x and
	 * the ports say, as Istio's DNS rules come before its capture's. */
	if (ctx->type == SOCK_DGRAM) {
		dns_learn4(ctx);
		return dns_udp4(ctx) ? 1 : 0;
	}
	if (ctx->user_port == bpf_htons(53)) {
		int dns = dns_tcp4(ctx);
		if (dns != DNS_NOT_TAKEN)
			return dns == DNS_TAKEN ? 1 : 0;
	}
	__u32 pod = pod_of(bpf_get_netns_cookie(ctx)), slot;
	const struct policy *pol = active_policy(pod, &slot);
	if (!pol)
		return 1;

	struct addr6 dst;
	addr_from_v4(&dst, ctx->user_ip4);
	int verdict = capture(ctx, pod, pol, slot, &dst, bpf_ntohs(ctx->user_port), AF_INET);
	if (verdict < 0)
		return 0;
	if (verdict == 1) {
		bind_pod_addr(ctx, pod, POD_ADDR_IPV4, 0);
		ctx->user_ip4 = bpf_htonl(0x7f000001);
		ctx->user_port = bpf_htons(pol->outbound_port);
	} else if (verdict == 2) {
		struct sock_state *st = subflow_state(pod, ctx->sk, 0);
		if (!st)
			return 0;
		ctx->user_ip4 = st->dial.addr.w[3];
		ctx->user_port = bpf_htons(st->dial.port);
	}
	return 1;
}

SEC("cgroup/connect6")
int sluice_connect6(struct bpf_sock_addr *ctx)
{
	if (ctx->type == SOCK_DGRAM) {
		dns_learn6(ctx);
		return dns_udp6(ctx) ? 1 : 0;
	}
	if (ctx->user_port == bpf_htons(53)) {
		int dns = dns_tcp6(ctx);
		if (dns != DNS_NOT_TAKEN)
			return dns == DNS_TAKEN ? 1 : 0;
	}
	__u32 pod = pod_of(bpf_get_netns_cookie(ctx)), slot;
	const struct policy *pol = active_policy(pod, &slot);
	if (!pol)
		return 1;

	struct addr6 dst = { .w = { ctx->user_ip6[0], ctx->user_ip6[1], ctx->user_ip6[2], ctx->user_ip6[3] } };
	/* An AF_INET6 socket connecting to ::ffff:a.b.c.d is IPv4 on the wire:
	 * IPv4 rules apply, and it goes to the IPv4 listener, whose getsockopt
	 * answers SOL_IP. */
	bool mapped = addr_is_v4mapped(&dst);
	int verdict = capture(ctx, pod, pol, slot, &dst, bpf_ntohs(ctx->user_port), mapped ? AF_INET : AF_INET6);
	if (verdict < 0)
		return 0;
	if (verdict == 2) {
		struct sock_state *st = subflow_state(pod, ctx->sk, 0);
		if (!st)
			return 0;
		ctx->user_ip6[0] = st->dial.addr.w[0];
		ctx->user_ip6[1] = st->dial.addr.w[1];
		ctx->user_ip6[2] = st->dial.addr.w[2];
		ctx->user_ip6[3] = st->dial.addr.w[3];
		ctx->user_port = bpf_htons(st->dial.port);
	} else if (verdict == 1) {
		bind_pod_addr(ctx, pod, mapped ? POD_ADDR_IPV4 : POD_ADDR_IPV6, 1);
		ctx->user_ip6[0] = 0;
		ctx->user_ip6[1] = 0;
		ctx->user_ip6[2] = mapped ? bpf_htonl(0xffff) : 0;
		ctx->user_ip6[3] = mapped ? bpf_htonl(0x7f000001) : bpf_htonl(1);
		ctx->user_port = bpf_htons(pol->outbound_port);
	}
	return 1;
}
