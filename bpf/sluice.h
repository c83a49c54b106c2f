/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* The capture contract in one place: maps, structs and the helpers every hook
 * shares. The Go side reads and writes these maps through the
 * bpf2go-generated types, so a layout change here is picked up by
 * `make generate` instead of hand-mirrored.
 *
 * Memory follows connections: what a connection needs lives in its socket's
 * local storage and is freed with the socket; the only table that outlives a
 * socket for a moment (between the app's connect and the sidecar's accept) is
 * emptied as the sidecar's side of the connection is established. */
#pragma once

#include "vmlinux.h"
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#define AF_INET 2
#define AF_INET6 10
#define SOL_IP 0
#define SOL_IPV6 41
#define EPERM 1
#define ENOENT 2
#define EINVAL 22
#define ENOSPC 28
#define ENOPROTOOPT 92
#define ETIMEDOUT 110
#define ECONNREFUSED 111
#define SO_ORIGINAL_DST 80      /* linux/netfilter_ipv4.h */
#define IP6T_SO_ORIGINAL_DST 80 /* linux/netfilter_ipv6/ip6_tables.h */

/* Set from Go before load: the kernel hands a getsockopt program at most one
 * page of optval, so larger values must be passed through with optlen = 0. */
volatile const __u32 page_size = 4096;

/* An IP address in network byte order, IPv4 v4-mapped (::ffff:a.b.c.d). */
struct addr6 {
	__u32 w[4];
};

enum config_flag {
	/* -i '*': every destination not excluded is captured. */
	CONFIG_INCLUDE_ALL_CIDRS = 1 << 0,
	/* -b '*': every inbound port not excluded is captured (inbound hook). */
	CONFIG_INBOUND_ALL_PORTS = 1 << 1,
	/* --flows=false: capture only, no flow telemetry. */
	CONFIG_NO_FLOWS = 1 << 2,
	/* --splice: the app's and the sidecar's ends of a connection in the
	 * pod pass bytes socket to socket (splice.c). */
	CONFIG_SPLICE = 1 << 3,
	/* --fail-open: with no sidecar listening, captured connections go
	 * direct (counted) instead of being refused. */
	CONFIG_FAIL_OPEN = 1 << 4,
	/* --offload-ports or --offload-inbound-ports: the sidecar offers its
	 * connections to the kernel (setsockopt.c), which takes those on the
	 * port sets' ports. */
	CONFIG_OFFLOAD = 1 << 5,
	/* --redirect-dns: the app's DNS (UDP and TCP port 53 to the policy's
	 * nameservers) goes to the sidecar's DNS port (dns.c). */
	CONFIG_REDIRECT_DNS = 1 << 6,
	/* --capture-all-dns: port 53 of any address, not only the
	 * nameservers. */
	CONFIG_CAPTURE_ALL_DNS = 1 << 7,
};

/* resolv.conf holds at most 3 nameservers (glibc's MAXNS); one more for a
 * pod with an IPv4 and an IPv6 server named twice. */
#define MAX_DNS_SERVERS 4

/* Port sets, one bit per port each. */
enum port_set {
	PORT_OUT_EXCLUDE,     /* -o */
	PORT_OUT_INCLUDE,     /* -q */
	PORT_IN_EXCLUDE,      /* -d, enforced by the inbound hook */
	PORT_IN_INCLUDE,      /* -b, enforced by the inbound hook */
	PORT_OUT_KERNEL_ONLY, /* --kernel-only-ports: captured, but no sidecar */
	PORT_IN_KERNEL_ONLY,  /* --kernel-only-inbound-ports */
	PORT_OUT_OFFLOAD,     /* --offload-ports: the sidecar may hand them to the kernel */
	PORT_IN_OFFLOAD,      /* --offload-inbound-ports */
	PORT_SETS,
};

/* A port set is 1024 words of 64 ports; only words with a port in them
 * are stored (ports), so a policy costs what it lists. */
struct port_key {
	__u32 pod;
	__u8 slot;
	__u8 set; /* enum port_set */
	__u16 word;
};

/* One complete capture policy of a pod. Each pod has two (slots 0 and 1):
 * the loader writes the one not in force, its port sets and CIDRs, then
 * flips the pod's policy_active, so a hook sees either the whole old policy
 * or the whole new one. */
struct policy {
	__u32 proxy_uid;
	__u32 proxy_gid;
	__u16 outbound_port; /* host order */
	__u16 inbound_port;  /* host order */
	__u32 flags;         /* enum config_flag */
	/* The sidecar's own ports (listeners, metrics, health), 0-terminated:
	 * connections to them are no flows of the pod, and only the proxy
	 * identity may bind them (bind.c). All 8 are in use with Linkerd's
	 * flags: a further port needs the array grown. */
	__u16 sidecar_ports[8];
	/* DNS capture: the sidecar's DNS port and the nameservers whose port
	 * 53 it takes the queries of (IPv4 v4-mapped). */
	__u16 dns_port; /* host order */
	__u16 dns_count;
	struct addr6 dns_servers[MAX_DNS_SERVERS];
};

/* A CIDR of a pod's policy slot. The pod, the slot and the family lead the
 * key, so a lookup only ever matches prefixes of its own pod, slot and
 * family: an IPv6 ::/0 never covers IPv4, as ip6tables rules never see
 * IPv4. prefixlen counts the 48 bits of pod, slot and family too. */
struct cidr_key {
	__u32 prefixlen;
	__u32 pod;
	__u8 slot;
	__u8 family; /* AF_INET or AF_INET6 */
	__u8 addr[16];
};

#define CIDR_KEY_BITS 48

/* How many CIDRs one list (-i, -x, --kernel-only-cidrs) of a pod holds, IPv4
 * and IPv6 together (the loader enforces it): two policy slots of them, the
 * one in force and the one an update fills. Entries are allocated as they
 * are written (BPF_F_NO_PREALLOC), so room costs nothing until used. Cloud
 * provider ranges and Istio's exclusion lists run to thousands. A node's
 * trie holds 16 pods' worth of full lists. */
#define CIDR_SLOT_ENTRIES 8192
#define CIDR_NODE_ENTRIES (16 * 2 * CIDR_SLOT_ENTRIES)

struct orig_dst {
	struct addr6 addr;
	__u16 port;   /* host order */
	__u16 family; /* AF_INET for IPv4 and v4-mapped destinations */
};

enum sock_role {
	/* The app's captured socket: getpeername answers orig. */
	ROLE_APP = 1,
	/* The proxy's accepted end of a captured connection: getsockopt
	 * SO_ORIGINAL_DST answers orig. */
	ROLE_ACCEPTED = 2,
	/* A connection the sidecar dialed (set only with splice on): into the
	 * pod, it is the sidecar's end of an inbound connection. */
	ROLE_SIDECAR = 3,
	/* The app's socket of a kernel-only flow: sent straight to its
	 * destination (or the route's pick) with no sidecar; getpeername
	 * answers orig, and no proxy waits for a note. */
	ROLE_KERNEL_ONLY = 4,
};

enum splice_flag {
	SPLICE_STOPPED = 1 << 0, /* the peer fell behind: bytes go over TCP for good */
	/* The sidecar's dial to an offload port: it joins offload_socks as it
	 * is established. */
	SPLICE_OFFLOAD_DIAL = 1 << 1,
	/* In offload_socks, under far_cookie: the sidecar may hand it a
	 * connection (setsockopt.c). */
	SPLICE_OFFLOAD_READY = 1 << 2,
};

/* What the sidecar asks of the kernel, at this socket option level, so it
 * needs no access to any map:
 * - SLUICE_OFFLOAD_HAND and _RELEASE: setsockopt on its far socket hands a
 *   proxied connection to the kernel and takes it back; the value is the
 *   app's end of the hop (struct tuple_key, as splice_socks keys it). Only
 *   the proxy identity may, only on a socket of its own pod that joined
 *   offload_socks, and the kernel writes the pod's offload_peers
 *   (setsockopt.c).
 * - SLUICE_PLAN: getsockopt on any TCP socket of the pod answers the pod's
 *   struct policy in force: the sidecar's ports, the proxy identity and the
 *   flags (getsockopt.c). */
enum sluice_sockopt {
	SOL_SLUICE = 0x51ce,
	SLUICE_OFFLOAD_HAND = 1,
	SLUICE_OFFLOAD_RELEASE = 2,
	SLUICE_PLAN = 3,
};

/* A flow is a connection of the pod to or from the outside, seen from the
 * socket that carries it on the wire: neither end on loopback, and not the
 * pod talking to its own address. The app's hop to the sidecar is no flow. */
enum flow_flag {
	FLOW_OUTBOUND = 1 << 0,
	FLOW_INBOUND = 1 << 1,
	FLOW_VIA_SIDECAR = 1 << 2, /* the sidecar's socket: its upstream or its accepted one */
	FLOW_FIN = 1 << 3,         /* a FIN was sent or received */
	FLOW_OPEN_LOST = 1 << 4,   /* its open event did not fit in the ring buffer */
	FLOW_KERNEL_ONLY = 1 << 5, /* captured, but by policy carried with no sidecar */
};

enum flow_kind {
	FLOW_OPEN = 1,           /* established */
	FLOW_CLOSE = 2,          /* closed after it was established */
	FLOW_CONNECT_FAILED = 3, /* an outbound connect that never was */
};

enum flow_end {
	END_FIN = 1,
	END_RST = 2,
	END_TIMEOUT = 3,
	END_REFUSED = 4,
};

/* What a connection's socket carries, for exactly its lifetime. */
struct sock_state {
	struct orig_dst orig; /* what the app asked for (a route's service) */
	struct orig_dst dial; /* where the sidecar goes (the route's pick) */
	__u32 role;           /* enum sock_role */
	__u32 flow;           /* enum flow_flag; 0 for sockets that are no flow */
	__u32 connect_us;     /* SYN sent to established (outbound), SYN-ACK to ACK (inbound) */
	__u32 splice;         /* enum splice_flag */
	__u64 start_ns;       /* boot-time ns: connect (outbound) or established (inbound) */
	union {
		/* A hop's end: the socket it last spliced to, as a kernel
		 * address, read only with bpf_probe_read_kernel for the bytes
		 * waiting there. */
		__u64 splice_peer;
		/* A far socket (never a hop's end): its cookie, once in
		 * offload_socks. One field for both keeps the layout of older
		 * installs, whose live sockets' storage an upgrade keeps. */
		__u64 far_cookie;
	};
};

/* Canary routes: a service (VIP and port) to weighted backends, picked at
 * connect time. A route holds its whole backend set, so replacing a set is
 * one map update, which readers see whole (hash map updates swap the
 * element). Routes live in two slots like the policy: a change of many
 * routes fills the idle slot and flips routes_active. */
#define MAX_BACKENDS 16

enum route_mode {
	ROUTE_RANDOM = 0,
	ROUTE_ROUND_ROBIN = 1, /* smooth weighted round-robin */
};

struct backend {
	struct addr6 addr;
	__u16 port;   /* host order */
	__u16 family; /* AF_INET or AF_INET6 */
	__u32 weight;
	/* Connections this backend was picked for; the loader carries it over
	 * when it rewrites the route, so it only grows. */
	__u64 picks;
};

struct route_key {
	struct addr6 vip;
	__u16 port; /* host order */
	__u8 slot;
	__u8 pad;
};

struct route {
	__u32 generation; /* changes with every write of this route */
	__u32 mode;       /* enum route_mode */
	__u32 count;
	__u32 total; /* sum of the weights */
	/* Written by `sluice route rollout`, for the exporter. */
	__u32 rollout_step;  /* the canary's weight in percent, during a rollout */
	__u32 rollbacks;     /* rollouts of this route rolled back */
	__u32 last_rollback; /* why the last one was: enum rollback_reason */
	__u32 pad;
	struct backend backends[MAX_BACKENDS];
};

enum rollback_reason {
	ROLLBACK_NONE = 0,
	ROLLBACK_FAILURES = 1,
	ROLLBACK_LATENCY = 2,
	ROLLBACK_NO_TRAFFIC = 3, /* no connects to the canary measured within the step's bound */
};

/* Round-robin state per pod and service, node-wide (a value with a spin
 * lock cannot be an inner map on 6.1) (no slot: it follows the route's
 * generation, and starts over when the route changes). The loader deletes a
 * service's entry when its route is deleted or set anew, so a route never
 * inherits an old sequence and entries never outlive their routes. */
struct rr_key {
	struct addr6 vip;
	__u16 port;
	__u16 pad;
	__u32 pod;
};

struct rr_state {
	struct bpf_spin_lock lock;
	__u32 generation;
	__s32 current[MAX_BACKENDS];
};

/* One flow event, as the ring buffer carries it to user space. */
struct flow_event {
	__u64 cookie;
	__u64 start_ns;   /* boot-time ns */
	__u64 end_ns;     /* boot-time ns; 0 for FLOW_OPEN */
	__u64 bytes_sent; /* acknowledged by the peer */
	__u64 bytes_received;
	struct addr6 local;
	struct addr6 remote;
	struct orig_dst orig;
	__u16 local_port;  /* host order */
	__u16 remote_port; /* host order */
	__u32 flow;        /* enum flow_flag */
	__u32 connect_us;
	__u32 srtt_us;
	__u32 min_rtt_us;
	__u32 retrans; /* segments retransmitted */
	__u8 kind;     /* enum flow_kind */
	__u8 end;      /* enum flow_end, for FLOW_CLOSE and FLOW_CONNECT_FAILED */
	__u8 pad[6];
	/* The pod's network namespace: unlike its index in the node's maps,
	 * never another pod's, so an event read after its pod left names no
	 * newer one. */
	__u64 netns_cookie;
};

/* A connection as its initiator sees it; IPv4 addresses v4-mapped. */
struct tuple_key {
	struct addr6 client;
	struct addr6 server;
	__u16 client_port; /* host order */
	__u16 server_port; /* host order */
};

/* The install's record, written and read by the loader only: whose pins
 * these are (cgroup id and path), what was asked for and how far the install
 * got, as JSON text so `bpftool map dump` shows it to a human. */
struct install_meta {
	char json[4096];
};

/* Node-owned state. The programs are loaded once per node and attached to
 * every captured pod; a pod's own maps are the inner maps of the arrays
 * below, at the pod's index. A hook finds its pod from the network namespace
 * of the socket it runs for (one pod, one network namespace), which is right
 * even in softirq, where sockops runs for the passive end of a connection;
 * sk_lookup, which has no namespace to ask, from the address a packet goes
 * to. Index 0 is no pod: hooks leave such sockets alone. */
#define MAX_PODS 2048

#define POD_MAP_OF(name, inner)                                                                                        \
	struct {                                                                                                       \
		__uint(type, BPF_MAP_TYPE_ARRAY_OF_MAPS);                                                              \
		__uint(max_entries, MAX_PODS);                                                                         \
		__type(key, __u32);                                                                                    \
		__array(values, struct inner);                                                                         \
	} name SEC(".maps")

/* The pod's map called name, whose layout is struct name_map; the loader
 * pins it in the pod's directory under that name. */
#define POD_MAP(name) POD_MAP_OF(name, name##_map)

/* The pods of the node by network namespace cookie. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_PODS);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u64);
	__type(value, __u32);
} pods SEC(".maps");

/* The pods of the node by their addresses (IPv4 v4-mapped), for sk_lookup. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 2 * MAX_PODS);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct addr6);
	__type(value, __u32);
} pod_ips SEC(".maps");

/* What the hooks count for no pod they can name: sk_lookup finds its pod by
 * the address a connection goes to. */
enum node_counter {
	/* TCP from outside to an address of no pod (one a pod got after its
	 * install, or a link-local one, which install never registers):
	 * refused. */
	NODE_INBOUND_UNKNOWN_ADDRESS,
	NODE_COUNTERS,
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 8);
	__type(key, __u32);
	__type(value, __u64);
} node_counters SEC(".maps");
_Static_assert(NODE_COUNTERS <= 8, "more node counters than slots");

static __always_inline void node_count(enum node_counter c)
{
	__u32 key = c;
	__u64 *n = bpf_map_lookup_elem(&node_counters, &key);
	if (n)
		*n += 1;
}

/* pod_map returns the pod's map from the array outer. */
static __always_inline void *pod_map(void *outer, __u32 pod)
{
	return bpf_map_lookup_elem(outer, &pod);
}

/* pod_of returns the index of the pod whose network namespace has cookie,
 * or 0. */
static __always_inline __u32 pod_of(__u64 cookie)
{
	__u32 *pod = bpf_map_lookup_elem(&pods, &cookie);
	return pod ? *pod : 0;
}

/* The pods' policies, node-wide: pod p's slots are 2p and 2p+1, and
 * policy_active[p] says which is in force. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 2 * MAX_PODS);
	__type(key, __u32);
	__type(value, struct policy);
} policies SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MAX_PODS);
	__type(key, __u32);
	__type(value, __u32);
} policy_active SEC(".maps");

/* The port sets' words with a port in them. A pod's full sets in both
 * slots would be 12,288 words; a default pod has a handful. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct port_key);
	__type(value, __u64);
} ports SEC(".maps");

/* The CIDR lists of the policies (-i, -x, --kernel-only-cidrs), each one
 * trie holding every pod's slots and both families. */
struct cidr_trie {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, CIDR_NODE_ENTRIES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct cidr_key);
	__type(value, __u8);
};

struct cidr_trie include_cidrs SEC(".maps");
struct cidr_trie exclude_cidrs SEC(".maps");

/* --kernel-only-cidrs: captured destinations the sidecar has nothing to add
 * to, sent straight there (or to the route's pick) by connect. */
struct cidr_trie kernel_only_cidrs SEC(".maps");

struct sock_states_map {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct sock_state);
};
POD_MAP(sock_states);

/* Notes from the active end of a connection inside the pod to its passive
 * end, from the active end's handshake until the passive end's: the only
 * key both sockets share is the 4-tuple. The app's captured connection
 * leaves the destination for the proxy; the sidecar's dial into the pod
 * (splice on) leaves family 0, for the passive end to join the splice
 * table. Entries are deleted when taken, or when the active end closes
 * first. On loopback the passive end is established within the active end's
 * connect, so an entry lives for microseconds: only connections whose final
 * ACK a full accept queue dropped wait longer. 256 entries (4 KiB of
 * buckets, a third of an idle pod) leave room for those; one that finds
 * the table full is counted (handshake_table_full) and fails at the proxy.
 * The table is the pod's own, so only the pod's own connections can fill
 * it. */
struct handshakes_map {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 256);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct tuple_key);
	__type(value, struct orig_dst);
};
POD_MAP(handshakes);

struct meta_map {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct install_meta);
};
POD_MAP(meta);

/* What the hooks did that a user must be able to count: every connection the
 * inbound hook considered, and every one a full table or a failed
 * allocation could not serve. */
enum counter {
	COUNT_INBOUND_STEERED,       /* a captured listener lookup handed to the inbound listener */
	COUNT_INBOUND_NO_LISTENER,   /* a captured listener lookup, but no sidecar listening */
	COUNT_INBOUND_ASSIGN_FAILED, /* listener found, bpf_sk_assign refused */
	COUNT_CONNECT_NO_STATE,      /* connect refused: no socket storage */
	COUNT_HANDSHAKE_TABLE_FULL,  /* the proxy will not learn the destination */
	COUNT_FLOW_NO_STATE,         /* a flow untracked: no socket storage */
	COUNT_FLOW_EVENT_LOST,       /* a flow event dropped: ring buffer full */
	/* Flows whose close event was lost, and of those the ones whose open
	 * event was lost too, by direction: with them user space counts every
	 * flow opened and closed exactly, whatever the ring buffer dropped. */
	COUNT_CLOSE_LOST_OUTBOUND,
	COUNT_CLOSE_LOST_INBOUND,
	COUNT_BOTH_LOST_OUTBOUND,
	COUNT_BOTH_LOST_INBOUND,
	COUNT_ROUTE_REFUSED,  /* a connect to a route whose every weight is 0 */
	COUNT_SPLICE_JOINED,  /* sockets added to the splice table */
	COUNT_SPLICE_FULL,    /* sockets the splice table had no room for */
	COUNT_SPLICE_MSGS,    /* messages passed straight to the peer socket */
	COUNT_SPLICE_BYTES,   /* and their bytes */
	COUNT_SPLICE_STOPPED, /* directions back on TCP: the reader fell behind */
	COUNT_SPLICE_NO_PEER, /* directions on TCP: bytes sent with no peer to take them */
	/* No sidecar listening: inbound connections refused, the kernel
	 * answering as a closed port does (fail closed), or let through
	 * uncaptured (fail open). Outbound
	 * refusals are loopback's own and uncounted: the slot stays unused so
	 * the counters keep their indexes. */
	COUNT_FAIL_CLOSED_OUTBOUND,
	COUNT_FAIL_CLOSED_INBOUND,
	COUNT_FAIL_OPEN_OUTBOUND,
	COUNT_FAIL_OPEN_INBOUND,
	COUNT_KERNEL_ONLY_OUTBOUND,    /* connects sent straight on by policy */
	COUNT_KERNEL_ONLY_INBOUND,     /* inbound connections left to the app by policy */
	COUNT_OFFLOAD_MSGS,            /* app messages sent straight out on the sidecar's far socket */
	COUNT_OFFLOAD_BYTES,           /* and their bytes */
	COUNT_OFFLOAD_VIA_PROXY,       /* offloaded connections' messages the sidecar forwarded itself */
	COUNT_INBOUND_LISTENER_FAILED, /* the sidecar's inbound listener could not be registered for sk_lookup */
	/* A round-robin route's pick made at random: no room for its state
	 * in rr_states (the node's round-robin routes in use outnumber its
	 * entries). */
	COUNT_RR_FALLBACK,
	COUNT_OFFLOAD_FULL,   /* the sidecar's far sockets offload_socks had no room for */
	COUNT_OFFLOAD_HANDED, /* connections the sidecar handed to the kernel */
	COUNT_DNS_REDIRECTED, /* DNS queries (UDP sends, TCP and UDP connects) sent to the sidecar's DNS port */
	/* No DNS listener in the sidecar: queries refused at once (fail
	 * closed: connect or send fails with ECONNREFUSED, no resolver
	 * timeout), or sent to the nameserver asked (fail open). */
	COUNT_DNS_FAIL_CLOSED,
	COUNT_DNS_FAIL_OPEN,
	COUNTERS,
};

/* The counters map has room to spare, so a newer Sluice with more counters
 * reuses an older install's map when it upgrades in place. */
#define COUNTER_SLOTS 64
_Static_assert(COUNTERS <= COUNTER_SLOTS, "more counters than slots");

struct counters_map {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, COUNTER_SLOTS);
	__type(key, __u32);
	__type(value, __u64);
};
POD_MAP(counters);

/* 256 entries: 128 routes, in two slots. The loader makes both route maps
 * with the pod's first route: a pod with none holds neither, and its
 * connects find no map and no route. */
struct routes_map {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 256);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct route_key);
	__type(value, struct route);
};
POD_MAP(routes);

struct routes_active_map {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
};
POD_MAP(routes_active);

/* Round-robin state, one entry per round-robin route a connect used, freed
 * with its route. Sized for the node's routes in use, not for every pod at
 * its most (128 * MAX_PODS would be 4 MiB of buckets): when it is full a
 * pick is made at random, in proportion, and counted (rr_fallback). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 32768);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct rr_key);
	__type(value, struct rr_state);
} rr_states SEC(".maps");

/* Splice: the local ends of connections between the app and the sidecar,
 * keyed by their tuple as each end sees it (tuple_key, itself the client).
 * An end's peer is the entry under the swapped tuple. The loader sizes it
 * (spliceSockets with splice on, 1 without: its buckets are allocated
 * whole). */
struct splice_socks_map {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 1);
	__type(key, struct tuple_key);
	__type(value, __u64);
};
POD_MAP(splice_socks);

/* Offload: the sidecar's sockets on the far side of connections it handed
 * to the kernel (its upstream, or its accepted socket for inbound), keyed by
 * socket cookie: sockops adds the sidecar's sockets on offload ports as
 * they are established, the kernel removes them as they close. offload_peers
 * says, for the app's end of such a connection (keyed as splice_socks is),
 * which of them its messages go out on: the sidecar's setsockopt writes and
 * deletes those (setsockopt.c); sockops deletes one left behind when a new
 * socket joins the splice table with its tuple. Sized as splice_socks. */
struct offload_socks_map {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 1);
	__type(key, __u64);
	__type(value, __u64);
};
POD_MAP(offload_socks);

struct offload_peers_map {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct tuple_key);
	__type(value, __u64);
};
POD_MAP(offload_peers);

/* Inbound capture: the sidecar's inbound listeners, one an address family,
 * which sk_lookup hands captured connections to. sockops puts a listener
 * here as it starts listening on the inbound port (only the proxy identity
 * may bind it); the loader puts one opened before the install; the kernel
 * takes it out as it closes. */
enum listener_slot {
	LISTENER_IPV4 = 0,
	LISTENER_IPV6 = 1,
	LISTENER_SLOTS,
};

struct inbound_listeners_map {
	__uint(type, BPF_MAP_TYPE_SOCKMAP);
	__uint(max_entries, LISTENER_SLOTS);
	__type(key, __u32);
	__type(value, __u64);
};
POD_MAP(inbound_listeners);

/* The pod's own addresses, IPv4 (v4-mapped) and IPv6, as the interface had
 * them at install: the source a captured connect gets (connect.c). Zero:
 * none known (an install without the pod's interface). */
enum pod_addr_slot {
	POD_ADDR_IPV4 = 0,
	POD_ADDR_IPV6 = 1,
	POD_ADDR_SLOTS,
};

struct pod_addrs_map {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, POD_ADDR_SLOTS);
	__type(key, __u32);
	__type(value, struct addr6);
};
POD_MAP(pod_addrs);

/* Flow events of every pod of the node, each with its pod's index, for the
 * node's agent, which drains it: one ring, so an idle pod holds none, and
 * no sidecar reads (or drains) another pod's flows. The loader sizes it for
 * the node (loader/load.go: 256 KiB a CPU, at least this) and sets
 * flow_wake_bytes to a quarter of that. */
#define FLOW_RING_SIZE (1024 * 1024)
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, FLOW_RING_SIZE);
} flow_events SEC(".maps");
volatile const __u64 flow_wake_bytes = FLOW_RING_SIZE / 4;

/* Referenced so their BTF is emitted and bpf2go can generate Go types. The
 * key and value types of inner maps need it too: clang emits only a forward
 * declaration for a type that the __array of an outer map alone names. */
const struct tuple_key *unused_tuple_key __attribute__((unused));
const struct sock_state *unused_sock_state __attribute__((unused));
const struct orig_dst *unused_orig_dst __attribute__((unused));
const struct install_meta *unused_install_meta __attribute__((unused));
const struct route_key *unused_route_key __attribute__((unused));
const struct route *unused_route __attribute__((unused));
const enum config_flag *unused_config_flag __attribute__((unused));
const enum port_set *unused_port_set __attribute__((unused));
const enum sock_role *unused_sock_role __attribute__((unused));
const enum counter *unused_counter __attribute__((unused));
const enum flow_flag *unused_flow_flag __attribute__((unused));
const enum flow_kind *unused_flow_kind __attribute__((unused));
const enum flow_end *unused_flow_end __attribute__((unused));
const struct flow_event *unused_flow_event __attribute__((unused));
const enum route_mode *unused_route_mode __attribute__((unused));
const enum rollback_reason *unused_rollback_reason __attribute__((unused));
const enum splice_flag *unused_splice_flag __attribute__((unused));
const enum sluice_sockopt *unused_sluice_sockopt __attribute__((unused));
const enum node_counter *unused_node_counter __attribute__((unused));
const enum listener_slot *unused_listener_slot __attribute__((unused));
const enum pod_addr_slot *unused_pod_addr_slot __attribute__((unused));

/* count_n is a global function, verified once on its own rather than on
 * every path of every hook that counts. */
__attribute__((noinline)) int count_n(__u32 pod, __u32 c, __u64 delta)
{
	void *m = pod_map(&counters, pod);
	if (!m)
		return 0;
	__u64 *n = bpf_map_lookup_elem(m, &c);
	if (n)
		*n += delta;
	return 0;
}

static __always_inline void count(__u32 pod, enum counter c)
{
	count_n(pod, c, 1);
}

/* loopback_listening reports whether a socket of the caller's network
 * namespace listens on port (TCP, or UDP) of 127.0.0.1 (v6 false: IPv4 and
 * v4-mapped connects) or ::1, or of a wildcard: whether the sidecar is
 * there to take what a hook would send it. */
static __always_inline bool loopback_listening(struct bpf_sock_addr *ctx, __u16 port, bool v6, bool tcp)
{
	struct bpf_sock_tuple tuple = {};
	struct bpf_sock *sk;
	__u32 size = sizeof(tuple.ipv4);
	if (!v6) {
		tuple.ipv4.saddr = tuple.ipv4.daddr = bpf_htonl(0x7f000001);
		tuple.ipv4.dport = bpf_htons(port);
	} else {
		tuple.ipv6.saddr[3] = tuple.ipv6.daddr[3] = bpf_htonl(1);
		tuple.ipv6.dport = bpf_htons(port);
		size = sizeof(tuple.ipv6);
	}
	if (tcp)
		sk = bpf_sk_lookup_tcp(ctx, &tuple, size, BPF_F_CURRENT_NETNS, 0);
	else
		sk = bpf_sk_lookup_udp(ctx, &tuple, size, BPF_F_CURRENT_NETNS, 0);
	if (!sk)
		return false;
	bpf_sk_release(sk);
	return true;
}

/* active_policy returns the pod's policy in force and its slot; NULL for
 * no pod (index 0, whose policy the loader never writes). */
static __always_inline const struct policy *active_policy(__u32 pod, __u32 *slot)
{
	if (!pod)
		return NULL;
	__u32 *active = bpf_map_lookup_elem(&policy_active, &pod);
	if (!active)
		return NULL;
	__u32 s = *active & 1;
	*slot = s;
	__u32 at = 2 * pod + s;
	return bpf_map_lookup_elem(&policies, &at);
}

static __always_inline bool port_in(__u32 pod, __u32 slot, enum port_set set, __u16 port)
{
	struct port_key key = { .pod = pod, .slot = slot, .set = set, .word = port >> 6 };
	__u64 *word = bpf_map_lookup_elem(&ports, &key);
	return word && ((*word >> (port & 63)) & 1);
}

/* The proxy's own sockets are never captured and only they get
 * SO_ORIGINAL_DST answered and may bind the capture ports. */
static __always_inline bool is_proxy(const struct policy *pol)
{
	__u64 uid_gid = bpf_get_current_uid_gid();
	return (__u32)uid_gid == pol->proxy_uid || (__u32)(uid_gid >> 32) == pol->proxy_gid;
}

static __always_inline bool is_sidecar_port(const struct policy *pol, __u16 port)
{
	for (int i = 0; i < 8; i++) {
		if (pol->sidecar_ports[i] == 0)
			return false;
		if (pol->sidecar_ports[i] == port)
			return true;
	}
	return false;
}

static __always_inline bool inbound_kernel_only(__u32 pod, __u32 slot, __u16 port)
{
	return port_in(pod, slot, PORT_IN_KERNEL_ONLY, port);
}

static __always_inline bool inbound_port_captured(__u32 pod, __u32 slot, const struct policy *pol, __u16 port)
{
	if (port_in(pod, slot, PORT_IN_EXCLUDE, port))
		return false;
	return (pol->flags & CONFIG_INBOUND_ALL_PORTS) || port_in(pod, slot, PORT_IN_INCLUDE, port);
}

/* A connection's state lives on the socket its owner holds. An MPTCP
 * connection reaches the hooks both as its MPTCP socket (what the app and the
 * proxy hold, and what getpeername and getsockopt see) and as a TCP subflow
 * (what connect and sockops see): subflow_state finds the MPTCP socket's
 * storage from a subflow, and is the plain socket's own otherwise. */
static __always_inline struct sock_state *subflow_state(__u32 pod, void *sk, __u64 flags)
{
	void *m = pod_map(&sock_states, pod);
	if (!m)
		return NULL;
	struct mptcp_sock *msk = bpf_skc_to_mptcp_sock(sk);
	if (msk)
		return bpf_sk_storage_get(m, msk, 0, flags);
	return bpf_sk_storage_get(m, sk, 0, flags);
}

static __always_inline struct sock_state *held_state(__u32 pod, void *sk)
{
	void *m = pod_map(&sock_states, pod);
	if (!m)
		return NULL;
	return bpf_sk_storage_get(m, sk, 0, 0);
}

static __always_inline void addr_from_v4(struct addr6 *a, __u32 ip4)
{
	a->w[0] = 0;
	a->w[1] = 0;
	a->w[2] = bpf_htonl(0xffff);
	a->w[3] = ip4;
}

static __always_inline void addr_from_v6(struct addr6 *a, const __u32 *ip6)
{
	a->w[0] = ip6[0];
	a->w[1] = ip6[1];
	a->w[2] = ip6[2];
	a->w[3] = ip6[3];
}

/* CTX_TUPLE fills key with the connection as the local end sees it (the
 * local end as the client), from a sock_ops or sk_msg context: both name
 * the fields alike. Every address field is read, at its fixed offset,
 * before the family picks one; the barriers keep the compiler from sinking
 * the reads into the branches and turning the choice into pointer
 * arithmetic on the context, which the verifier refuses. */
#define CTX_TUPLE(ctx, key)                                                                                            \
	do {                                                                                                           \
		__u32 l4 = (ctx)->local_ip4, r4 = (ctx)->remote_ip4;                                                   \
		__u32 l6[4] = { (ctx)->local_ip6[0], (ctx)->local_ip6[1], (ctx)->local_ip6[2], (ctx)->local_ip6[3] };  \
		__u32 r6[4] = { (ctx)->remote_ip6[0], (ctx)->remote_ip6[1], (ctx)->remote_ip6[2],                      \
				(ctx)->remote_ip6[3] };                                                                \
		barrier_var(l4);                                                                                       \
		barrier_var(r4);                                                                                       \
		for (int i = 0; i < 4; i++) {                                                                          \
			barrier_var(l6[i]);                                                                            \
			barrier_var(r6[i]);                                                                            \
		}                                                                                                      \
		if ((ctx)->family == AF_INET) {                                                                        \
			addr_from_v4(&(key)->client, l4);                                                              \
			addr_from_v4(&(key)->server, r4);                                                              \
		} else {                                                                                               \
			addr_from_v6(&(key)->client, l6);                                                              \
			addr_from_v6(&(key)->server, r6);                                                              \
		}                                                                                                      \
		(key)->client_port = (ctx)->local_port;                                                                \
		/* remote_port holds the network-order port in its upper 16 bits. */                                   \
		(key)->server_port = bpf_ntohl((ctx)->remote_port);                                                    \
	} while (0)

/* swap_ends turns a connection's key as one end sees it into the key as the
 * other end sees it. */
static __always_inline void swap_ends(struct tuple_key *key)
{
	struct addr6 a = key->client;
	__u16 p = key->client_port;
	key->client = key->server;
	key->client_port = key->server_port;
	key->server = a;
	key->server_port = p;
}

static __always_inline bool addr_is_v4mapped(const struct addr6 *a)
{
	return a->w[0] == 0 && a->w[1] == 0 && a->w[2] == bpf_htonl(0xffff);
}

static __always_inline bool addr_equal(const struct addr6 *a, const struct addr6 *b)
{
	return a->w[0] == b->w[0] && a->w[1] == b->w[1] && a->w[2] == b->w[2] && a->w[3] == b->w[3];
}

static __always_inline bool addr_is_loopback(const struct addr6 *a)
{
	if (addr_is_v4mapped(a))
		return (bpf_ntohl(a->w[3]) >> 24) == 127;
	return a->w[0] == 0 && a->w[1] == 0 && a->w[2] == 0 && a->w[3] == bpf_htonl(1);
}
