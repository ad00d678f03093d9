// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * cp_sock_lb: socket-level load balancing of ClusterIP services (as Cilium's socket LB).
 *
 * cgroup/connect4   TCP and connected UDP: a connect() to VIP:port becomes a connect() to
 *                   one backend; the kernel never sees a packet to the VIP, so no NAT,
 *                   no conntrack and no reverse translation are needed, and the tc
 *                   programs' policy sees the real backend.
 * cgroup/sendmsg4   unconnected UDP: each datagram to VIP:port goes to the socket's
 *                   backend; the pair (socket cookie, backend) -> VIP is kept in
 *                   cp_lb_revnat ...
 * cgroup/recvmsg4   ... so the source address recvfrom() reports is the VIP again.
 *
 * The backend is slot (hash(socket cookie) % count) of the frontend's current slot set:
 * a socket (a flow) stays on its backend; a new socket may pick any backend of the set
 * current when it connects, so a removed backend gets no new connection once the agent
 * flipped the set. A frontend with no backends refuses at once: connect()/sendmsg()
 * fail with ECONNREFUSED (bpf_set_retval, Linux >= 5.18), counted per frontend.
 *
 * The programs hang on a cgroup v2 (the agent's --lb-cgroup; every process below it,
 * whatever its network namespace) through bpf_links pinned beside the maps, so they keep
 * working while the agent is down or restarting. Maps are shared with the agent and
 * pinned by name (layouts in cp_lb.h).
 */
#include <linux/bpf.h>
#include <linux/in.h>
#include <linux/errno.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "cp_lb.h"

#define CP_LB_MAP(name, map_type, max, key_type, value_type, map_flags_)                     \
	struct {                                                                             \
		__uint(type, map_type);                                                      \
		__uint(max_entries, max);                                                    \
		__uint(map_flags, map_flags_);                                               \
		__type(key, key_type);                                                       \
		__type(value, value_type);                                                   \
		__uint(pinning, LIBBPF_PIN_BY_NAME);                                         \
	} name SEC(".maps")

CP_LB_MAP(CP_LB_SERVICES_MAP, BPF_MAP_TYPE_HASH, CP_LB_SERVICES_MAX_ENTRIES,
	  struct cp_lb_service_key, struct cp_lb_service_value, BPF_F_NO_PREALLOC);
CP_LB_MAP(CP_LB_SLOTS_MAP, BPF_MAP_TYPE_HASH, CP_LB_SLOTS_MAX_ENTRIES, struct cp_lb_slot_key,
	  struct cp_lb_backend, 0);
CP_LB_MAP(CP_LB_REVNAT_MAP, BPF_MAP_TYPE_LRU_HASH, CP_LB_REVNAT_MAX_ENTRIES,
	  struct cp_lb_revnat_key, struct cp_lb_revnat_value, 0);
CP_LB_MAP(CP_LB_METRICS_MAP, BPF_MAP_TYPE_PERCPU_ARRAY, CP_LB_METRICS_MAX_ENTRIES, __u32,
	  struct cp_lb_metrics_value, 0);

#define SYS_PROCEED 1
#define SYS_REJECT 0

enum lb_counter { LB_CONNECT, LB_DATAGRAM, LB_REFUSED, LB_SLOT_MISS };

static __always_inline void count(__u32 frontend_id, enum lb_counter which)
{
	struct cp_lb_metrics_value *m = bpf_map_lookup_elem(&CP_LB_METRICS_MAP, &frontend_id);

	if (!m) /* per-CPU slot: plain increments are safe */
		return;
	if (which == LB_CONNECT)
		m->connects += 1;
	else if (which == LB_DATAGRAM)
		m->datagrams += 1;
	else if (which == LB_REFUSED)
		m->refused += 1;
	else
		m->slot_misses += 1;
}

/* A 64-bit mix (splitmix64's finaliser): spreads consecutive socket cookies. */
static __always_inline __u32 mix(__u64 x)
{
	x ^= x >> 30;
	x *= 0xbf58476d1ce4e5b9ULL;
	x ^= x >> 27;
	x *= 0x94d049bb133111ebULL;
	x ^= x >> 31;
	return (__u32)x;
}

enum xlate { XLATE_NONE, XLATE_DONE, XLATE_REFUSED };

/* Translate ctx's destination when it is a service frontend. */
static __always_inline enum xlate xlate(struct bpf_sock_addr *ctx, __u8 proto,
					enum lb_counter counter, __u64 *cookie_out)
{
	struct cp_lb_service_key key = {
		.vip = ctx->user_ip4,
		.dport = bpf_ntohs((__u16)ctx->user_port),
		.proto = proto,
	};
	struct cp_lb_service_value *svc;
	struct cp_lb_slot_key slot_key = {};
	struct cp_lb_backend *be = NULL;
	__u64 cookie;
	__u32 hash;
	int attempt;

	svc = bpf_map_lookup_elem(&CP_LB_SERVICES_MAP, &key);
	if (!svc)
		return XLATE_NONE;
	cookie = bpf_get_socket_cookie(ctx);
	hash = mix(cookie);
	for (attempt = 0; attempt < 2; attempt++) {
		__u32 count_ = svc->count;

		if (count_ == 0) {
			count(svc->frontend_id, LB_REFUSED);
			return XLATE_REFUSED;
		}
		slot_key.frontend_id = svc->frontend_id;
		slot_key.revision = svc->revision;
		slot_key.slot = hash % count_;
		be = bpf_map_lookup_elem(&CP_LB_SLOTS_MAP, &slot_key);
		if (be)
			break;
		/* The set changed under us (the old revision's slots went): read the entry again. */
		svc = bpf_map_lookup_elem(&CP_LB_SERVICES_MAP, &key);
		if (!svc)
			return XLATE_NONE;
	}
	if (!be) {
		count(svc->frontend_id, LB_SLOT_MISS);
		return XLATE_NONE;
	}
	ctx->user_ip4 = be->addr;
	ctx->user_port = bpf_htons(be->port);
	count(svc->frontend_id, counter);
	*cookie_out = cookie;
	if (proto == IPPROTO_UDP) {
		struct cp_lb_revnat_key rkey = {
			.cookie = cookie, .addr = be->addr, .port = be->port,
		};
		struct cp_lb_revnat_value rval = { .vip = key.vip, .port = key.dport };

		bpf_map_update_elem(&CP_LB_REVNAT_MAP, &rkey, &rval, BPF_ANY);
	}
	return XLATE_DONE;
}

static __always_inline int refuse(void)
{
	bpf_set_retval(-ECONNREFUSED);
	return SYS_REJECT;
}

SEC("cgroup/connect4")
int cp_lb_connect4(struct bpf_sock_addr *ctx)
{
	__u8 proto = ctx->protocol;
	__u64 cookie;

	if (proto != IPPROTO_TCP && proto != IPPROTO_UDP)
		return SYS_PROCEED;
	if (xlate(ctx, proto, LB_CONNECT, &cookie) == XLATE_REFUSED)
		return refuse();
	return SYS_PROCEED;
}

SEC("cgroup/sendmsg4")
int cp_lb_sendmsg4(struct bpf_sock_addr *ctx)
{
	__u64 cookie;

	if (ctx->protocol != IPPROTO_UDP)
		return SYS_PROCEED;
	if (xlate(ctx, IPPROTO_UDP, LB_DATAGRAM, &cookie) == XLATE_REFUSED)
		return refuse();
	return SYS_PROCEED;
}

SEC("cgroup/recvmsg4")
int cp_lb_recvmsg4(struct bpf_sock_addr *ctx)
{
	struct cp_lb_revnat_key key = {
		.cookie = bpf_get_socket_cookie(ctx),
		.addr = ctx->user_ip4,
		.port = bpf_ntohs((__u16)ctx->user_port),
	};
	struct cp_lb_revnat_value *rev;

	if (ctx->protocol != IPPROTO_UDP)
		return SYS_PROCEED;
	rev = bpf_map_lookup_elem(&CP_LB_REVNAT_MAP, &key);
	if (rev) {
		ctx->user_ip4 = rev->vip;
		ctx->user_port = bpf_htons(rev->port);
	}
	return SYS_PROCEED; /* recvmsg hooks must return 1 */
}

char _license[] SEC("license") = "Dual BSD/GPL";
