/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Map layouts of the socket load balancer (cp_sock_lb.c, issue 17).
 *
 * Mirrored byte for byte by ctypes structs in controlplane/datapath/lbmap.py (a test
 * compiles a host probe against this header and compares sizes and offsets). Integers
 * are host byte order, addresses network byte order, ports HOST byte order (the program
 * converts). Explicit padding only.
 *
 * Versioned backend sets: a frontend's backends live in cp_lb_slots under
 * (frontend id, revision, slot). The agent writes a new set under revision r+1 first,
 * then flips the frontend's cp_lb_services entry to {revision r+1, count} in one update
 * (the services map is BPF_F_NO_PREALLOC: a replaced element is freed after an RCU grace
 * period, so a reader never sees a torn value), then deletes revision r's slots. A
 * program that read the old entry just before the flip and misses its slot re-reads the
 * entry once. So no connection ever sees a half-written backend set.
 */
#ifndef CP_LB_H
#define CP_LB_H

#include <linux/types.h>

#define CP_LB_SERVICES_MAP cp_lb_services
#define CP_LB_SLOTS_MAP    cp_lb_slots
#define CP_LB_REVNAT_MAP   cp_lb_revnat
#define CP_LB_METRICS_MAP  cp_lb_metrics

#define CP_LB_SERVICES_MAX_ENTRIES (16 * 1024)
#define CP_LB_SLOTS_MAX_ENTRIES    (256 * 1024)
#define CP_LB_REVNAT_MAX_ENTRIES   (64 * 1024)
#define CP_LB_METRICS_MAX_ENTRIES  (16 * 1024) /* indexed by frontend id (1..max-1) */

/* cp_lb_services: BPF_MAP_TYPE_HASH (BPF_F_NO_PREALLOC). 8-byte key, 12-byte value. */
struct cp_lb_service_key {
	__be32 vip;
	__u16 dport; /* host order */
	__u8 proto;  /* IPPROTO_TCP or IPPROTO_UDP */
	__u8 pad;
};

struct cp_lb_service_value {
	__u32 frontend_id; /* 1..CP_LB_METRICS_MAX_ENTRIES-1, stable while the frontend lives */
	__u32 revision;    /* which slot set is current */
	__u16 count;       /* backends in that set; 0: refuse connections */
	__u16 flags;
};

/* cp_lb_slots: BPF_MAP_TYPE_HASH. 12-byte key, 8-byte value. */
struct cp_lb_slot_key {
	__u32 frontend_id;
	__u32 revision;
	__u32 slot; /* 0..count-1 */
};

struct cp_lb_backend {
	__be32 addr;
	__u16 port; /* host order */
	__u8 pad[2];
};

/* cp_lb_revnat: BPF_MAP_TYPE_LRU_HASH, UDP reverse translation (the source of replies
 * back to the VIP): (socket cookie, backend) -> frontend. 16-byte key, 8-byte value. */
struct cp_lb_revnat_key {
	__u64 cookie;
	__be32 addr;
	__u16 port; /* host order */
	__u8 pad[2];
};

struct cp_lb_revnat_value {
	__be32 vip;
	__u16 port; /* host order */
	__u8 pad[2];
};

/* cp_lb_metrics: BPF_MAP_TYPE_PERCPU_ARRAY, key __u32 frontend id, 32-byte value per
 * CPU (readers sum over CPUs; the agent zeroes an id when it gives it to a frontend). */
struct cp_lb_metrics_value {
	__u64 connects; /* connect() translated to a backend (TCP, connected UDP) */
	__u64 datagrams; /* unconnected UDP sendmsg translated to a backend */
	__u64 refused;  /* no backend: connect/sendmsg refused with ECONNREFUSED */
	__u64 slot_misses; /* a slot was missing twice (should stay 0) */
};

#endif /* CP_LB_H */
