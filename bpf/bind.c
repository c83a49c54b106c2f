//go:build ignore
/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* cgroup/bind4 and cgroup/bind6: only the proxy identity may bind the
 * sidecar's ports in a captured pod: the capture ports, whose listener
 * would receive the pod's captured connections (and their original
 * destinations), and every other port the sidecar must own (metrics,
 * health: policy.sidecar_ports), which a process taking it while the
 * sidecar restarts would hold against every restart after. */
#include "sluice.h"

static __always_inline int bind_allowed(struct bpf_sock_addr *ctx)
{
	__u32 slot;
	const struct policy *pol = active_policy(pod_of(bpf_get_netns_cookie(ctx)), &slot);
	if (!pol)
		return 1;
	__u16 port = bpf_ntohs(ctx->user_port);
	/* UDP: the DNS port alone, which would receive the pod's queries. */
	if (ctx->type == SOCK_DGRAM) {
		if (!(pol->flags & CONFIG_REDIRECT_DNS) || port != pol->dns_port)
			return 1;
	} else if (ctx->type != SOCK_STREAM ||
		   (port != pol->outbound_port && port != pol->inbound_port && !is_sidecar_port(pol, port))) {
		return 1;
	}
	/* 0 makes bind(2) fail with EPERM. */
	return is_proxy(pol) ? 1 : 0;
}

SEC("cgroup/bind4")
int sluice_bind4(struct bpf_sock_addr *ctx)
{
	return bind_allowed(ctx);
}

SEC("cgroup/bind6")
int sluice_bind6(struct bpf_sock_addr *ctx)
{
	return bind_allowed(ctx);
}
