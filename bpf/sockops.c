//go:build ignore
/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* sockops: hand a captured connection's original destination from the app's
 * socket to the proxy's accepted socket. The two share only the 4-tuple, so
 * the app's side publishes it by tuple when its handshake completes, and the
 * proxy's side takes it (and deletes it) when its own completes. The flow
 * telemetry and the splice attach here later. */
#include "sluice.h"

/* sockops_tuple fills key with the connection as the local end sees it: the
 * local end as the client. The proxy's side swaps it (swap_ends) rather than
 * reading the fields the other way round, which would let the compiler pick
 * between context fields by pointer arithmetic, which the verifier refuses. */
static __always_inline void sockops_tuple(const struct bpf_sock_ops *skops, struct tuple_key *key)
{
	if (skops->family == AF_INET) {
		addr_from_v4(&key->client, skops->local_ip4);
		addr_from_v4(&key->server, skops->remote_ip4);
	} else {
		__u32 l[4] = {skops->local_ip6[0], skops->local_ip6[1], skops->local_ip6[2], skops->local_ip6[3]};
		__u32 r[4] = {skops->remote_ip6[0], skops->remote_ip6[1], skops->remote_ip6[2], skops->remote_ip6[3]};
		addr_from_v6(&key->client, l);
		addr_from_v6(&key->server, r);
	}
	key->client_port = skops->local_port;
	/* remote_port holds the network-order port in its upper 16 bits. */
	key->server_port = bpf_ntohl(skops->remote_port);
}

static __always_inline void swap_ends(struct tuple_key *key)
{
	struct addr6 a = key->client;
	__u16 p = key->client_port;
	key->client = key->server;
	key->client_port = key->server_port;
	key->server = a;
	key->server_port = p;
}

/* The app's captured connection is established (this runs before the final
 * ACK leaves, so before the proxy's side can be): publish its destination. */
static __always_inline void app_established(struct bpf_sock_ops *skops)
{
	struct bpf_sock *sk = skops->sk;
	if (!sk)
		return;
	struct sock_state *st = subflow_state(sk, 0);
	if (!st || st->role != ROLE_APP)
		return;
	struct tuple_key key = {};
	sockops_tuple(skops, &key);
	if (bpf_map_update_elem(&handshakes, &key, &st->orig, BPF_ANY))
		count(COUNT_HANDSHAKE_TABLE_FULL);
	/* Told when the app's socket closes, to drop an entry the proxy
	 * never took. */
	bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
}

/* A connection to a listener in the pod is established: if it is a captured
 * one arriving at the proxy, its socket takes the original destination. */
static __always_inline void accepted_established(struct bpf_sock_ops *skops)
{
	struct tuple_key key = {};
	sockops_tuple(skops, &key);
	swap_ends(&key);
	struct orig_dst *orig = bpf_map_lookup_elem(&handshakes, &key);
	if (!orig)
		return;
	struct bpf_sock *sk = skops->sk;
	if (sk) {
		struct sock_state *st = subflow_state(sk, BPF_SK_STORAGE_GET_F_CREATE);
		if (st) {
			st->orig = *orig;
			st->role = ROLE_ACCEPTED;
		}
	}
	bpf_map_delete_elem(&handshakes, &key);
}

SEC("sockops")
int sluice_sockops(struct bpf_sock_ops *skops)
{
	if (skops->family != AF_INET && skops->family != AF_INET6)
		return 1;
	switch (skops->op) {
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
		app_established(skops);
		break;
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		accepted_established(skops);
		break;
	case BPF_SOCK_OPS_STATE_CB:
		if (skops->args[1] == BPF_TCP_CLOSE) {
			struct tuple_key key = {};
			sockops_tuple(skops, &key);
			bpf_map_delete_elem(&handshakes, &key);
		}
		break;
	}
	return 1;
}
