//go:build ignore
/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* cgroup/connect4 and cgroup/connect6: steer the app's outbound TCP connects
 * to the sidecar's outbound listener and remember where they were going. */
#include "sluice.h"

/* The order follows istio-iptables: port exclusions, CIDR exclusions, then
 * included ports (-q) or included CIDRs (-i); exclusions always win. */
static __always_inline bool should_capture(const struct capture_config *cfg, const struct addr6 *dst,
					   __u16 port)
{
	if (addr_is_loopback(dst))
		return false;

	__u32 port_key = port;
	__u8 *flags = bpf_map_lookup_elem(&port_policy, &port_key);
	__u8 port_flags = flags ? *flags : 0;
	if (port_flags & PORT_OUT_EXCLUDE)
		return false;

	struct lpm_key key = {.prefixlen = 128, .addr = *dst};
	if (bpf_map_lookup_elem(&exclude_cidrs, &key))
		return false;
	if (port_flags & PORT_OUT_INCLUDE)
		return true;
	if (cfg->flags & CONFIG_INCLUDE_ALL_CIDRS)
		return true;
	return bpf_map_lookup_elem(&include_cidrs, &key) != NULL;
}

/* capture decides whether a connect is redirected and, if so, records the
 * original destination under the socket's cookie. It returns 1 to redirect,
 * 0 to leave the connect alone and -1 to refuse it. */
static __always_inline int capture(struct bpf_sock_addr *ctx, const struct capture_config *cfg,
				   const struct addr6 *dst, __u16 port, __u16 family)
{
	if (ctx->type != SOCK_STREAM || ctx->protocol != IPPROTO_TCP)
		return 0;

	/* The proxy's own connections must go out untouched, or it would loop
	 * back into itself. */
	__u64 uid_gid = bpf_get_current_uid_gid();
	if ((__u32)uid_gid == cfg->proxy_uid || (__u32)(uid_gid >> 32) == cfg->proxy_gid)
		return 0;

	if (!should_capture(cfg, dst, port))
		return 0;

	struct orig_dst orig = {.addr = *dst, .port = port, .family = family};
	__u64 cookie = bpf_get_socket_cookie(ctx);
	/* Without the record the proxy could not learn the destination:
	 * refuse the connect rather than let it bypass the sidecar. */
	if (bpf_map_update_elem(&orig_by_cookie, &cookie, &orig, BPF_ANY))
		return -1;
	return 1;
}

SEC("cgroup/connect4")
int sluice_connect4(struct bpf_sock_addr *ctx)
{
	struct capture_config *cfg = get_config();
	if (!cfg)
		return 1;

	struct addr6 dst;
	addr_from_v4(&dst, ctx->user_ip4);
	int verdict = capture(ctx, cfg, &dst, bpf_ntohs(ctx->user_port), AF_INET);
	if (verdict < 0)
		return 0;
	if (verdict > 0) {
		ctx->user_ip4 = bpf_htonl(0x7f000001);
		ctx->user_port = bpf_htons(cfg->outbound_port);
	}
	return 1;
}

SEC("cgroup/connect6")
int sluice_connect6(struct bpf_sock_addr *ctx)
{
	struct capture_config *cfg = get_config();
	if (!cfg)
		return 1;

	struct addr6 dst = {.w = {ctx->user_ip6[0], ctx->user_ip6[1], ctx->user_ip6[2],
				  ctx->user_ip6[3]}};
	/* An AF_INET6 socket connecting to ::ffff:a.b.c.d is IPv4 on the wire:
	 * send it to the IPv4 listener, whose getsockopt answers SOL_IP. */
	bool mapped = addr_is_v4mapped(&dst);
	int verdict = capture(ctx, cfg, &dst, bpf_ntohs(ctx->user_port), mapped ? AF_INET : AF_INET6);
	if (verdict < 0)
		return 0;
	if (verdict > 0) {
		ctx->user_ip6[0] = 0;
		ctx->user_ip6[1] = 0;
		ctx->user_ip6[2] = mapped ? bpf_htonl(0xffff) : 0;
		ctx->user_ip6[3] = mapped ? bpf_htonl(0x7f000001) : bpf_htonl(1);
		ctx->user_port = bpf_htons(cfg->outbound_port);
	}
	return 1;
}
