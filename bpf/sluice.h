/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Maps, structs and helpers shared by every Sluice hook. The Go side reads
 * and writes these maps through the bpf2go-generated types, so any layout
 * change here is picked up by `make generate` instead of hand-mirrored. */
#pragma once

#include "vmlinux.h"
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#define AF_INET 2
#define AF_INET6 10
#define SOL_IP 0
#define SOL_IPV6 41
#define SO_ORIGINAL_DST 80      /* linux/netfilter_ipv4.h */
#define IP6T_SO_ORIGINAL_DST 80 /* linux/netfilter_ipv6/ip6_tables.h */

/* Set from Go before load: the kernel hands a getsockopt program at most one
 * page of optval, so larger values must be passed through with optlen = 0. */
volatile const __u32 page_size = 4096;

/* An IP address in network byte order; IPv4 is stored v4-mapped
 * (::ffff:a.b.c.d) so one code path and one LPM trie serve both families,
 * and dual-stack sockets that see v4-mapped addresses match IPv4 entries. */
struct addr6 {
	__u32 w[4];
};

enum config_flag {
	/* -i '*': every destination not excluded is captured. */
	CONFIG_INCLUDE_ALL_CIDRS = 1 << 0,
	/* -b '*': every inbound port not excluded is captured (inbound hook). */
	CONFIG_INBOUND_ALL_PORTS = 1 << 1,
};

enum port_flag {
	PORT_OUT_EXCLUDE = 1 << 0, /* -o */
	PORT_OUT_INCLUDE = 1 << 1, /* -q */
	PORT_IN_EXCLUDE = 1 << 2,  /* -d, enforced by the inbound hook */
	PORT_IN_INCLUDE = 1 << 3,  /* -b, enforced by the inbound hook */
};

struct capture_config {
	__u32 proxy_uid;
	__u32 proxy_gid;
	__u16 outbound_port; /* host order */
	__u16 inbound_port;  /* host order */
	__u32 flags;         /* enum config_flag */
};

struct lpm_key {
	__u32 prefixlen; /* IPv4 prefixes are stored as 96 + len */
	struct addr6 addr;
};

struct orig_dst {
	struct addr6 addr;
	__u16 port;   /* host order */
	__u16 family; /* AF_INET for IPv4 and v4-mapped destinations */
};

/* A connection as its initiator sees it; IPv4 addresses v4-mapped. */
struct tuple_key {
	struct addr6 client;
	struct addr6 server;
	__u16 client_port; /* host order */
	__u16 server_port; /* host order */
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct capture_config);
} capture_cfg SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 1024);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct lpm_key);
	__type(value, __u8);
} include_cidrs SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 1024);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct lpm_key);
	__type(value, __u8);
} exclude_cidrs SEC(".maps");

/* Port (host order) -> enum port_flag bits: one array lookup answers every
 * port rule, and port ranges cost nothing extra. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__type(value, __u8);
} port_policy SEC(".maps");

/* Filled at connect, read by sockops and getpeername. Cookies are never
 * reused, so stale entries are harmless and LRU bounds them. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64);
	__type(value, struct orig_dst);
} orig_by_cookie SEC(".maps");

/* Filled once the app's connection is established (sockops) or when an
 * inbound SYN is steered (tc_ingress); read by getsockopt on the
 * proxy's accepted socket. Not deleted at close: a proxy may accept a
 * connection after the app already closed it (as conntrack keeps its entry). */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct tuple_key);
	__type(value, struct orig_dst);
} orig_by_tuple SEC(".maps");

/* Referenced so their BTF is emitted and bpf2go can generate Go types. */
const enum config_flag *unused_config_flag __attribute__((unused));
const enum port_flag *unused_port_flag __attribute__((unused));

static __always_inline struct capture_config *get_config(void)
{
	__u32 zero = 0;
	return bpf_map_lookup_elem(&capture_cfg, &zero);
}

static __always_inline void addr_from_v4(struct addr6 *a, __u32 ip4)
{
	a->w[0] = 0;
	a->w[1] = 0;
	a->w[2] = bpf_htonl(0xffff);
	a->w[3] = ip4;
}

static __always_inline bool addr_is_v4mapped(const struct addr6 *a)
{
	return a->w[0] == 0 && a->w[1] == 0 && a->w[2] == bpf_htonl(0xffff);
}

static __always_inline bool addr_is_loopback(const struct addr6 *a)
{
	if (addr_is_v4mapped(a))
		return (bpf_ntohl(a->w[3]) >> 24) == 127;
	return a->w[0] == 0 && a->w[1] == 0 && a->w[2] == 0 && a->w[3] == bpf_htonl(1);
}
