//go:build ignore
/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* sockops: hand a captured connection's original destination from the app's
 * socket to the proxy's accepted socket, and track flows. The app's socket
 * and the proxy's share only the 4-tuple, so the app's side publishes the
 * destination by tuple when its handshake completes, and the proxy's side
 * takes it (and deletes it) when its own completes. Flow sockets alone get
 * state callbacks; their opening and closing go to the flow_events ring
 * buffer, with the kernel's own counters for bytes, RTT and retransmits. */
#include "splice.h"

/* is_flow: neither end on loopback, and not the pod talking to itself
 * (the sidecar's hop to the app uses the pod's own address). */
static __always_inline bool is_flow(const struct tuple_key *key)
{
	return !addr_is_loopback(&key->client) && !addr_is_loopback(&key->server) &&
	       !addr_equal(&key->client, &key->server);
}

static __always_inline void set_orig(struct orig_dst *orig, const struct addr6 *addr, __u16 port)
{
	orig->addr = *addr;
	orig->port = port;
	orig->family = addr_is_v4mapped(addr) ? AF_INET : AF_INET6;
}

/* flow_emit sends one event about a flow socket. The local end is the
 * client in key (sockops_tuple's order). tp, when there is one, gives the
 * byte counts without the SYN and FIN sequence numbers that bytes_acked and
 * bytes_received include, and without retransmissions: data only. An event that does
 * not fit in the ring buffer is counted, by what user space needs to keep
 * its counts exact. */
static __always_inline void flow_emit(struct bpf_sock_ops *skops, __u32 pod, struct sock_state *st,
				      const struct tuple_key *key, __u8 kind, __u8 end, struct tcp_sock *tp)
{
	struct flow_event ev = {
		.cookie = bpf_get_socket_cookie(skops),
		.start_ns = st->start_ns,
		.local = key->client,
		.remote = key->server,
		.orig = st->orig,
		.local_port = key->client_port,
		.remote_port = key->server_port,
		.flow = st->flow,
		.connect_us = st->connect_us,
		.kind = kind,
		.end = end,
		.netns_cookie = bpf_get_netns_cookie(skops),
	};
	if (kind != FLOW_OPEN) {
		ev.end_ns = bpf_ktime_get_boot_ns();
		ev.bytes_sent = skops->bytes_acked;
		ev.bytes_received = skops->bytes_received;
		if (tp) {
			ev.bytes_sent = tp->bytes_sent - tp->bytes_retrans;
			/* bytes_received counts a FIN that arrived as a byte.
			 * tcp_fin() alone sets SOCK_DONE: close() (which shuts
			 * receiving down with no FIN), an abort or a reset do
			 * not, so only an arrived FIN is taken off. */
			if ((tp->inet_conn.icsk_inet.sk.__sk_common.skc_flags & (1UL << SOCK_DONE)) &&
			    ev.bytes_received)
				ev.bytes_received--;
		}
		ev.retrans = skops->total_retrans;
		/* srtt_us is kept shifted left by 3. */
		ev.srtt_us = skops->srtt_us >> 3;
		ev.min_rtt_us = skops->rtt_min;
	}
	/* The agent is woken only once a quarter of the ring is used, and
	 * otherwise drains it on its own every 100 ms: a wake-up per event
	 * would cost every connection two context switches. */
	__u64 wake = bpf_ringbuf_query(&flow_events, BPF_RB_AVAIL_DATA) > flow_wake_bytes ? BPF_RB_FORCE_WAKEUP
											  : BPF_RB_NO_WAKEUP;
	if (!bpf_ringbuf_output(&flow_events, &ev, sizeof(ev), wake))
		return;
	count(pod, COUNT_FLOW_EVENT_LOST);
	bool out = st->flow & FLOW_OUTBOUND;
	if (kind == FLOW_OPEN) {
		st->flow |= FLOW_OPEN_LOST;
	} else if (kind == FLOW_CLOSE) {
		count(pod, out ? COUNT_CLOSE_LOST_OUTBOUND : COUNT_CLOSE_LOST_INBOUND);
		if (st->flow & FLOW_OPEN_LOST)
			count(pod, out ? COUNT_BOTH_LOST_OUTBOUND : COUNT_BOTH_LOST_INBOUND);
	}
}

static __always_inline void want_state_cb(struct bpf_sock_ops *skops)
{
	bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
}

/* An outbound connect is under way (its destination already rewritten for
 * captured ones, whose hop to the sidecar is no flow). */
static __always_inline void flow_connect(struct bpf_sock_ops *skops, __u32 pod, const struct tuple_key *k)
{
	struct tuple_key key = *k;
	struct bpf_sock *sk = skops->sk;
	if (!sk || !is_flow(&key))
		return;
	__u32 slot;
	const struct policy *pol = active_policy(pod, &slot);
	if (pol && (pol->flags & CONFIG_NO_FLOWS))
		return;
	struct sock_state *st = subflow_state(pod, sk, BPF_SK_STORAGE_GET_F_CREATE);
	if (!st) {
		count(pod, COUNT_FLOW_NO_STATE);
		return;
	}
	st->flow = FLOW_OUTBOUND | (st->flow & FLOW_VIA_SIDECAR);
	st->start_ns = bpf_ktime_get_boot_ns();
	if (st->role == ROLE_KERNEL_ONLY)
		st->flow |= FLOW_KERNEL_ONLY; /* orig stays what the app asked for */
	else
		set_orig(&st->orig, &key.server, key.server_port);
	want_state_cb(skops);
}

/* An outbound connection is established. A flow is now open. A connection
 * inside the pod that the sidecar has a part in leaves its passive end a
 * note, by tuple, in handshakes (this runs before the final ACK leaves, so
 * before the passive end is established): the app's captured connection
 * leaves the destination for the proxy, and with splice on, the app's
 * captured socket and the sidecar's dials into the pod join the splice table
 * and their note tells the passive end to follow. */
static __always_inline void active_established(struct bpf_sock_ops *skops, __u32 pod, const struct tuple_key *k)
{
	struct bpf_sock *sk = skops->sk;
	if (!sk)
		return;
	struct sock_state *st = subflow_state(pod, sk, 0);
	if (!st)
		return;
	struct tuple_key key = *k;
	if ((st->splice & SPLICE_OFFLOAD_DIAL) && is_flow(&key))
		offload_ready(skops, pod, st);
	if (st->flow & FLOW_OUTBOUND) {
		st->connect_us = (bpf_ktime_get_boot_ns() - st->start_ns) / 1000;
		flow_emit(skops, pod, st, &key, FLOW_OPEN, 0, NULL);
		return;
	}
	if (st->role != ROLE_APP && st->role != ROLE_SIDECAR)
		return;
	__u32 slot;
	bool splice = splice_on(active_policy(pod, &slot)) && !is_flow(&key) && !bpf_skc_to_mptcp_sock(sk);
	if (splice)
		splice_join(skops, pod, &key);
	if (st->role != ROLE_APP && !splice)
		return;
	/* The sidecar's dial has no destination to pass on: family 0. */
	struct orig_dst note = {};
	if (st->role == ROLE_APP)
		note = st->dial;
	void *notes = pod_map(&handshakes, pod);
	if (!notes || bpf_map_update_elem(notes, &key, &note, BPF_ANY))
		count(pod, COUNT_HANDSHAKE_TABLE_FULL);
	/* Told when this socket closes, to drop a note never taken. */
	bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
}

/* inbound_offload readies the sidecar's accepted socket of a connection
 * from outside to an inbound offload port for the sidecar to hand to the
 * kernel. The inbound hook kept the app's port as the socket's own, and the
 * socket is the sidecar's if its owner (its listener's) is the proxy uid:
 * a connection left to the app (fail-open) is not. */
static __always_inline void inbound_offload(struct bpf_sock_ops *skops, __u32 pod, __u32 slot, const struct policy *pol,
					    struct bpf_sock *sk, __u16 port)
{
	if (!splice_on(pol) || !port_in(pod, slot, PORT_IN_OFFLOAD, port) ||
	    !inbound_port_captured(pod, slot, pol, port))
		return;
	struct tcp_sock *tp = bpf_skc_to_tcp_sock(sk);
	if (!tp || tp->inet_conn.icsk_inet.sk.sk_uid.val != pol->proxy_uid)
		return;
	struct sock_state *st = subflow_state(pod, sk, BPF_SK_STORAGE_GET_F_CREATE);
	if (st)
		offload_ready(skops, pod, st);
}

/* A connection to a listener in the pod is established: if it is a captured
 * one arriving at the proxy, its socket takes the original destination; if
 * it comes from outside, it is an inbound flow, whose original destination
 * is its own local address (inbound steering rewrites nothing). With splice
 * on, the passive end of a connection whose active end joined the splice
 * table joins it too. */
static __always_inline void passive_established(struct bpf_sock_ops *skops, __u32 pod, const struct tuple_key *k)
{
	struct bpf_sock *sk = skops->sk;
	struct tuple_key key = *k;
	if (is_flow(&key)) {
		__u32 slot;
		const struct policy *pol = active_policy(pod, &slot);
		if (sk && pol)
			inbound_offload(skops, pod, slot, pol, sk, key.client_port);
		if (!sk || (pol && ((pol->flags & CONFIG_NO_FLOWS) || is_sidecar_port(pol, key.client_port))))
			return;
		struct sock_state *st = subflow_state(pod, sk, BPF_SK_STORAGE_GET_F_CREATE);
		if (!st) {
			count(pod, COUNT_FLOW_NO_STATE);
			return;
		}
		bool captured = pol && inbound_port_captured(pod, slot, pol, key.client_port);
		bool kernel_only = captured && inbound_kernel_only(pod, slot, key.client_port);
		st->flow = FLOW_INBOUND | (kernel_only ? FLOW_KERNEL_ONLY : captured ? FLOW_VIA_SIDECAR : 0);
		st->start_ns = bpf_ktime_get_boot_ns();
		/* The handshake's RTT sample: SYN-ACK sent to ACK received. */
		st->connect_us = skops->srtt_us >> 3;
		set_orig(&st->orig, &key.client, key.client_port);
		flow_emit(skops, pod, st, &key, FLOW_OPEN, 0, NULL);
		want_state_cb(skops);
		return;
	}
	swap_ends(&key);
	void *notes = pod_map(&handshakes, pod);
	if (!notes)
		return;
	struct orig_dst *note = bpf_map_lookup_elem(notes, &key);
	if (!note)
		return;
	struct orig_dst orig = *note;
	bpf_map_delete_elem(notes, &key);
	if (!sk)
		return;
	__u32 slot;
	if (splice_on(active_policy(pod, &slot)) && !bpf_skc_to_mptcp_sock(sk)) {
		struct tuple_key own = *k;
		splice_join(skops, pod, &own);
	}
	if (orig.family == 0)
		return;
	struct sock_state *st = subflow_state(pod, sk, BPF_SK_STORAGE_GET_F_CREATE);
	if (st) {
		st->orig = orig;
		st->role = ROLE_ACCEPTED;
	}
}

/* end_reason tells how a flow socket closed: its error, else whether a FIN
 * went either way first. */
static __always_inline __u8 end_reason(struct tcp_sock *tp, const struct sock_state *st, __u32 old_state)
{
	int err = 0;
	if (tp)
		err = tp->inet_conn.icsk_inet.sk.sk_err;
	if (err == ETIMEDOUT)
		return END_TIMEOUT;
	if (old_state == BPF_TCP_SYN_SENT && err == ECONNREFUSED)
		return END_REFUSED;
	if ((st->flow & FLOW_FIN) && !err)
		return END_FIN;
	return END_RST;
}

static __always_inline void state_changed(struct bpf_sock_ops *skops, __u32 pod, const struct tuple_key *k)
{
	__u32 old_state = skops->args[0], new_state = skops->args[1];
	struct tuple_key key = *k;
	struct bpf_sock *sk = skops->sk;
	if (!sk)
		return;
	struct sock_state *st = subflow_state(pod, sk, 0);
	if (!st || !(st->flow & (FLOW_OUTBOUND | FLOW_INBOUND))) {
		/* The app's captured socket or the sidecar's dial: drop a
		 * note never taken. */
		void *notes = pod_map(&handshakes, pod);
		if (new_state == BPF_TCP_CLOSE && notes)
			bpf_map_delete_elem(notes, &key);
		return;
	}
	if (new_state == BPF_TCP_FIN_WAIT1 || new_state == BPF_TCP_CLOSE_WAIT)
		st->flow |= FLOW_FIN;
	if (new_state != BPF_TCP_CLOSE)
		return;
	struct tcp_sock *tp = bpf_skc_to_tcp_sock(sk);
	__u8 end = end_reason(tp, st, old_state);
	flow_emit(skops, pod, st, &key, old_state == BPF_TCP_SYN_SENT ? FLOW_CONNECT_FAILED : FLOW_CLOSE, end, tp);
}

/* A socket in the pod starts listening: the sidecar's inbound listener is
 * put where sk_lookup finds it. The bind hook lets only the proxy identity
 * bind the inbound port, so a listener there is the sidecar's. */
static __always_inline void listening(struct bpf_sock_ops *skops, __u32 pod, const struct tuple_key *key)
{
	__u32 slot;
	const struct policy *pol = active_policy(pod, &slot);
	if (!pol || key->client_port != pol->inbound_port)
		return;
	/* A port the kernel picked (listen() with no bind, in a pod whose
	 * port range holds the inbound port) met no bind hook: the listener
	 * must be the proxy uid's too. (The socket's owner, since sockops may
	 * not ask for the current task's credentials on every kernel.) */
	struct bpf_sock *sk = skops->sk;
	struct tcp_sock *tp = sk ? bpf_skc_to_tcp_sock(sk) : NULL;
	if (!tp || tp->inet_conn.icsk_inet.sk.sk_uid.val != pol->proxy_uid) {
		count(pod, COUNT_INBOUND_LISTENER_FAILED);
		return;
	}
	__u32 at = skops->family == AF_INET6 ? LISTENER_IPV6 : LISTENER_IPV4;
	void *listeners = pod_map(&inbound_listeners, pod);
	if (!listeners || bpf_sock_map_update(skops, listeners, &at, BPF_ANY))
		count(pod, COUNT_INBOUND_LISTENER_FAILED);
}

SEC("sockops")
int sluice_sockops(struct bpf_sock_ops *skops)
{
	if (skops->family != AF_INET && skops->family != AF_INET6)
		return 1;
	__u32 op = skops->op;
	if (op != BPF_SOCK_OPS_TCP_CONNECT_CB && op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB &&
	    op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB && op != BPF_SOCK_OPS_STATE_CB &&
	    op != BPF_SOCK_OPS_TCP_LISTEN_CB)
		return 1;
	/* Read once, here: reads in every branch would let the compiler pick
	 * between context fields by pointer arithmetic, which the verifier
	 * refuses. */
	__u32 pod = pod_of(bpf_get_netns_cookie(skops));
	if (!pod)
		return 1;
	struct tuple_key key = {};
	CTX_TUPLE(skops, &key);
	switch (op) {
	case BPF_SOCK_OPS_TCP_CONNECT_CB:
		flow_connect(skops, pod, &key);
		break;
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
		active_established(skops, pod, &key);
		break;
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		passive_established(skops, pod, &key);
		break;
	case BPF_SOCK_OPS_STATE_CB:
		state_changed(skops, pod, &key);
		break;
	case BPF_SOCK_OPS_TCP_LISTEN_CB:
		listening(skops, pod, &key);
		break;
	}
	return 1;
}
