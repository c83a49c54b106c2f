//go:build ignore
/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* syscall: the local port range of the calling thread's network namespace,
 * run by install (BPF_PROG_TEST_RUN) while it visits the pod's namespace.
 * Reading /proc/sys/net/ipv4/ip_local_port_range instead walks, in the
 * dcache, one "net" entry for every network namespace on the node that ever
 * read a net sysctl (each namespace has its own, under the same parent):
 * 3 ms of an install with 1,000 pods on the node, 0.15 ms with 40. */
#include "sluice.h"
#include <bpf/bpf_core_read.h>

/* Only the fields read, so the object carries their BTF alone, not
 * task_struct's and all it points to (CO-RE matches by name, the ___suffix
 * dropped). Since Linux 6.8 both ends of the range share one word (low 16
 * bits the first port); before, they were two ints behind a seqlock. */
struct local_ports___word {
	__u32 range;
} __attribute__((preserve_access_index));

struct local_ports___ints {
	seqlock_t lock;
	int range[2];
} __attribute__((preserve_access_index));

struct netns_ipv4___word {
	struct local_ports___word ip_local_ports;
} __attribute__((preserve_access_index));

struct netns_ipv4___ints {
	struct local_ports___ints ip_local_ports;
} __attribute__((preserve_access_index));

struct net___word {
	struct netns_ipv4___word ipv4;
} __attribute__((preserve_access_index));

struct net___ints {
	struct netns_ipv4___ints ipv4;
} __attribute__((preserve_access_index));

struct nsproxy___min {
	void *net_ns;
} __attribute__((preserve_access_index));

struct task_struct___min {
	struct nsproxy___min *nsproxy;
} __attribute__((preserve_access_index));

/* Returns the range as low | high << 16, 0 when it cannot be read (the
 * caller then reads /proc/sys). */
SEC("syscall")
int sluice_port_range(void *ctx)
{
	struct task_struct___min *task = (void *)bpf_get_current_task();
	void *net = BPF_CORE_READ(task, nsproxy, net_ns);

	if (!net)
		return 0;
	if (bpf_core_field_exists(((struct local_ports___ints *)0)->lock)) {
		struct net___ints *old = net;
		int lo = BPF_CORE_READ(old, ipv4.ip_local_ports.range[0]);
		int hi = BPF_CORE_READ(old, ipv4.ip_local_ports.range[1]);

		return (lo & 0xffff) | (hi & 0xffff) << 16;
	}
	return BPF_CORE_READ((struct net___word *)net, ipv4.ip_local_ports.range);
}
