//go:build ignore
/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* cgroup/bind4 and cgroup/bind6: only the proxy identity may bind the capture
 * ports in a captured pod. Anyone else listening there first would receive
 * the pod's captured connections (and their original destinations). */
#include "sluice.h"

static __always_inline int bind_allowed(struct bpf_sock_addr *ctx)
{
	if (ctx->type != SOCK_STREAM)
		return 1;
	__u32 slot;
	const struct policy *pol = active_policy(&slot);
	if (!pol)
		return 1;
	__u16 port = bpf_ntohs(ctx->user_port);
	if (port != pol->outbound_port && port != pol->inbound_port)
		return 1;
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
