//go:build ignore
/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* sockops: once a redirected connection is established, index its original
 * destination by 4-tuple, the only key the proxy's accepted socket shares
 * with the app's socket. The splice and RTT telemetry attach here later. */
#include "sluice.h"

static __always_inline void sockops_tuple(const struct bpf_sock_ops *skops, struct tuple_key *key)
{
	if (skops->family == AF_INET) {
		addr_from_v4(&key->client, skops->local_ip4);
		addr_from_v4(&key->server, skops->remote_ip4);
	} else {
		key->client.w[0] = skops->local_ip6[0];
		key->client.w[1] = skops->local_ip6[1];
		key->client.w[2] = skops->local_ip6[2];
		key->client.w[3] = skops->local_ip6[3];
		key->server.w[0] = skops->remote_ip6[0];
		key->server.w[1] = skops->remote_ip6[1];
		key->server.w[2] = skops->remote_ip6[2];
		key->server.w[3] = skops->remote_ip6[3];
	}
	key->client_port = skops->local_port;
	/* remote_port holds the network-order port in its upper 16 bits. */
	key->server_port = bpf_ntohl(skops->remote_port);
}

SEC("sockops")
int sluice_sockops(struct bpf_sock_ops *skops)
{
	if (skops->op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB)
		return 1;
	if (skops->family != AF_INET && skops->family != AF_INET6)
		return 1;

	/* Runs before the final ACK leaves, so the entry exists before the
	 * proxy can accept the connection and ask for it. */
	__u64 cookie = bpf_get_socket_cookie(skops);
	struct orig_dst *orig = bpf_map_lookup_elem(&orig_by_cookie, &cookie);
	if (!orig)
		return 1;

	struct tuple_key key = {};
	sockops_tuple(skops, &key);
	bpf_map_update_elem(&orig_by_tuple, &key, orig, BPF_ANY);
	return 1;
}
