//go:build ignore
/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* One object for every hook: the hooks share their maps without map
 * replacement at load time, and the loader deletes the programs a given
 * install does not need from the spec. */
#include "bind.c"
#include "dns.c"
#include "connect.c"
#include "getpeername.c"
#include "getsockopt.c"
#include "setsockopt.c"
#include "splice.c"
#include "sockops.c"
#include "sk_lookup.c"
#include "portrange.c"
#include "features.c"

char __license[] SEC("license") = "Dual BSD/GPL";
