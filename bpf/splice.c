//go:build ignore
/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Splice (--splice): a connection between the app and the sidecar has both
 * its ends in the pod, and with both in splice_socks a message sent on one
 * end is put straight on the other's receive queue: no loopback TCP, no
 * second trip through the stack. sockops adds the ends as they are
 * established; the kernel removes them as they close.
 *
 * Which ends: an active end is the app's captured socket (outbound) or a
 * connection the sidecar dialed (inbound, or a captured destination inside
 * the pod); a passive end joins when its peer's note in handshakes says the
 * peer has, so the app's other loopback connections are never touched.
 *
 * A redirected receive queue has no flow control: a sender faster than its
 * reader would queue until the kernel's TCP memory runs out (ENOMEM). So
 * every message first checks how much waits unread at the peer, and past
 * SPLICE_QUEUE_MAX the connection goes back to TCP for good. Never back:
 * the reader drains the redirected queue before the TCP one, so bytes stay
 * in order only if nothing is redirected after the first byte sent by TCP
 * (the same holds for a message sent before the peer joined). */
#include "splice.h"
#include <bpf/bpf_core_read.h>

/* Unread bytes allowed at the peer: TCP's own default receive buffer is
 * about this size too. */
#define SPLICE_QUEUE_MAX (1 << 20)

/* The sk_user_data bits that are flags, not the pointer (SK_USER_DATA_*). */
#define SK_USER_DATA_PSOCK 4UL
#define SK_USER_DATA_FLAGS 7UL

/* peer_backlog returns how many spliced bytes wait unread at peer, a
 * socket this end spliced to before: its psock's msg_tot_len. No helper
 * gives a sk_msg program another socket's queue (a sockhash lookup needs
 * bpf_sk_release, which sk_msg programs may not call), so peer is the
 * address the last redirect went to, and it is read with
 * bpf_probe_read_kernel, which cannot fault. While the peer is in the table
 * it is alive; once it leaves, the redirect that follows fails and this end
 * stops splicing, whatever was read here. */
static __always_inline __u32 peer_backlog(__u64 peer)
{
	if (!peer)
		return 0;
	unsigned long ud = (unsigned long)BPF_CORE_READ((struct sock *)peer, sk_user_data);
	if (!(ud & SK_USER_DATA_PSOCK))
		return 0;
	struct sk_psock *psock = (struct sk_psock *)(ud & ~SK_USER_DATA_FLAGS);
	/* A kernel without the field (before the 2026 patch that added it)
	 * still loads this program; install refuses splice and offload there
	 * (loader: hasSpliceBacklog), so this 0 is never relied on. */
	if (!bpf_core_field_exists(psock->msg_tot_len))
		return 0;
	return BPF_CORE_READ(psock, msg_tot_len);
}

/* offload sends msg, from the app's end of a connection the sidecar has
 * handed to the kernel, straight out on the sidecar's far socket (egress:
 * onto its send queue, in this send call), where the sidecar would have
 * written it. It may only when that keeps the bytes in order and cannot
 * leave the app waiting:
 * - nothing waits at the sidecar's end of the hop (the peer this message was
 *   just redirected to): the sidecar forwards those bytes first, and takes
 *   them off its queue only once written (it peeks, writes, then reads), so
 *   an empty queue means they are all on the far socket already;
 * - the far socket has room: a send it cannot take at all fails with EAGAIN
 *   on the app's socket, whose own buffer never fills, so a non-blocking
 *   app would wait for room forever. Otherwise the message goes to the
 *   sidecar, which waits for room as a proxy does, and TCP's window slows
 *   the app meanwhile.
 * It returns 1 when msg goes straight on, 0 when it still goes to the peer,
 * and -1 when the peer left meanwhile (msg is then dropped). */
static __always_inline int offload(struct sk_msg_md *msg, __u32 pod, struct sock_state *st, const __u64 *far,
				   struct tuple_key *peer, __u32 size)
{
	void *far_socks = pod_map(&offload_socks, pod);
	void *socks = pod_map(&splice_socks, pod);
	if (!far_socks || !socks || peer_backlog(st->splice_peer))
		goto via_proxy;
	if (bpf_msg_redirect_hash(msg, far_socks, (void *)far, 0) != SK_PASS)
		goto via_proxy; /* the far socket closed: the sidecar is ending it */
	struct sock *sk = (struct sock *)BPF_CORE_READ((struct sk_msg *)msg, sk_redir);
	/* A message larger than the room is taken in part: the app's send
	 * returns short, and the app sends the rest again (to the sidecar,
	 * if the far socket is still full). It is not split here with
	 * bpf_msg_apply_bytes (the part that fits straight on, the rest to
	 * the sidecar): that made this kernel (6.18) spin in the sidecar's
	 * reads and grow its memory by gigabytes within seconds, with 200
	 * connections at once. The bytes counted are those that fit. */
	int room = BPF_CORE_READ(sk, sk_sndbuf) - BPF_CORE_READ(sk, sk_wmem_queued);
	if (room > 0) {
		count(pod, COUNT_OFFLOAD_MSGS);
		count_n(pod, COUNT_OFFLOAD_BYTES, (__u32)room < size ? (__u32)room : size);
		return 1;
	}
	/* Back to the peer, which the call before this one found. */
	if (bpf_msg_redirect_hash(msg, socks, peer, BPF_F_INGRESS) != SK_PASS)
		return -1;
via_proxy:
	count(pod, COUNT_OFFLOAD_VIA_PROXY);
	return 0;
}

/* tcp_for_good passes this message and, without running the program
 * again, the next 4 GiB this end sends: a stopped end never splices again. */
static __always_inline int tcp_for_good(struct sk_msg_md *msg)
{
	bpf_msg_apply_bytes(msg, ~0U);
	return SK_PASS;
}

/* splice_stop sends this end's bytes by TCP from now on. */
static __always_inline int splice_stop(struct sk_msg_md *msg, __u32 pod, struct sock_state *st, enum counter why)
{
	st->splice |= SPLICE_STOPPED;
	count(pod, why);
	return tcp_for_good(msg);
}

SEC("sk_msg")
int sluice_splice(struct sk_msg_md *msg)
{
	struct bpf_sock *sk = msg->sk;
	if (!sk)
		return SK_PASS;
	__u32 pod = pod_of(bpf_get_netns_cookie(msg));
	void *states = pod_map(&sock_states, pod);
	void *socks = pod_map(&splice_socks, pod);
	if (!states || !socks)
		return SK_PASS;
	struct sock_state *st = bpf_sk_storage_get(states, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!st)
		return SK_PASS;
	if (st->splice & SPLICE_STOPPED)
		return tcp_for_good(msg);
	if (peer_backlog(st->splice_peer) > SPLICE_QUEUE_MAX)
		return splice_stop(msg, pod, st, COUNT_SPLICE_STOPPED);
	struct tuple_key peer = {};
	CTX_TUPLE(msg, &peer);
	swap_ends(&peer);
	__u32 size = msg->size;
	/* No peer in the table: it closed, or has not joined yet (its end of
	 * the handshake is still on its way). bpf_msg_redirect_hash would
	 * have the message dropped; it goes by TCP instead, and so does the
	 * rest of this direction, to keep the bytes in order. */
	if (bpf_msg_redirect_hash(msg, socks, &peer, BPF_F_INGRESS) != SK_PASS)
		return splice_stop(msg, pod, st, COUNT_SPLICE_NO_PEER);
	/* The context is the kernel's struct sk_msg, whose sk_redir the
	 * redirect just set to the peer. */
	st->splice_peer = (__u64)BPF_CORE_READ((struct sk_msg *)msg, sk_redir);
	struct tuple_key own = peer;
	swap_ends(&own);
	void *peers = pod_map(&offload_peers, pod);
	__u64 *far = peers ? bpf_map_lookup_elem(peers, &own) : NULL;
	if (far) {
		int done = offload(msg, pod, st, far, &peer, size);
		if (done > 0)
			return SK_PASS;
		if (done < 0)
			return SK_DROP;
	}
	count(pod, COUNT_SPLICE_MSGS);
	count_n(pod, COUNT_SPLICE_BYTES, size);
	return SK_PASS;
}
