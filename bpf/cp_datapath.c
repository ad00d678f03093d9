// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * cp_datapath: two tc classifiers on the HOST side of an endpoint's veth.
 *
 * cp_to_endpoint, on clsact EGRESS there (packets travelling toward the pod), enforces the
 * pod's INGRESS policy:
 *   1. non-IP frames (ARP, ...) pass;
 *   2. if the endpoint is not in cp_endpoints with CP_EP_F_INGRESS_ENFORCED, pass
 *      (default allow until a policy selects the endpoint);
 *   3. parse IPv4/IPv6 + L4 (TCP/UDP/SCTP ports, ICMP echo identifiers, ICMP = port 0);
 *      IPv6 neighbour discovery always passes;
 *   4. a reply to a flow the pod opened (cp_ct, within its lifetime) passes;
 *   5. source address -> cp_ipcache (LPM) -> remote identity (miss: reserved:world);
 *   6. (endpoint id, identity, dport, proto) -> cp_policy with wildcards (see cp_maps.h);
 *      a hit with allow=1 passes, anything else drops (default deny).
 *
 * cp_from_endpoint, on clsact INGRESS there (packets from the pod), never drops: it
 * records the flows the pod opens (TCP/UDP/SCTP, ICMP echo requests) in cp_ct for step 4.
 *
 * Every verdict of cp_to_endpoint is counted by reason in cp_metrics (per-CPU {packets,
 * bytes}).
 *
 * The endpoint id is a per-program constant (cp_cfg in .rodata) the loader writes before
 * loading, so each endpoint gets its own program instance; every map is shared by all
 * endpoints of the node and pinned by name (LIBBPF_PIN_BY_NAME) under the loader's pin
 * directory so it outlives the agent.
 *
 * Not handled: IPv6 extension headers are not walked (the first next-header is taken as
 * the L4 protocol); cp_ct keys on addresses and ports only (no TCP state machine).
 */
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "cp_maps.h"

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, CP_IPCACHE_MAX_ENTRIES);
	__type(key, struct cp_ipcache_key);
	__type(value, struct cp_ipcache_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} CP_IPCACHE_MAP SEC(".maps");

/* A map shared by every endpoint of the node, pinned by name under the loader's pin dir. */
#define CP_PINNED_MAP(name, map_type, max, key_type, value_type)                             \
	struct {                                                                             \
		__uint(type, map_type);                                                      \
		__uint(max_entries, max);                                                    \
		__type(key, key_type);                                                       \
		__type(value, value_type);                                                   \
		__uint(pinning, LIBBPF_PIN_BY_NAME);                                         \
	} name SEC(".maps")

CP_PINNED_MAP(CP_POLICY_MAP, BPF_MAP_TYPE_HASH, CP_POLICY_MAX_ENTRIES, struct cp_policy_key,
	      struct cp_policy_value);
CP_PINNED_MAP(CP_ENDPOINTS_MAP, BPF_MAP_TYPE_HASH, CP_ENDPOINTS_MAX_ENTRIES,
	      struct cp_endpoint_key, struct cp_endpoint_value);
CP_PINNED_MAP(CP_CT_MAP, BPF_MAP_TYPE_LRU_HASH, CP_CT_MAX_ENTRIES, struct cp_ct_key,
	      struct cp_ct_value);
/* Array maps need a plain int key in BTF: the key is enum cp_metric_reason. */
CP_PINNED_MAP(CP_METRICS_MAP, BPF_MAP_TYPE_PERCPU_ARRAY, CP_METRICS_MAX_ENTRIES, __u32,
	      struct cp_metrics_value);

/* ==== Flow events (issue 14): maps =================================================== */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, CP_FLOW_EVENTS_BYTES);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} CP_FLOW_EVENTS_MAP SEC(".maps");

CP_PINNED_MAP(CP_FLOW_CONFIG_MAP, BPF_MAP_TYPE_ARRAY, 1, __u32, struct cp_flow_config);
CP_PINNED_MAP(CP_FLOW_LOST_MAP, BPF_MAP_TYPE_PERCPU_ARRAY, CP_FLOW_LOST_MAX_ENTRIES, __u32,
	      __u64);
CP_PINNED_MAP(CP_FLOW_STATE_MAP, BPF_MAP_TYPE_LRU_HASH, CP_FLOW_STATE_MAX_ENTRIES,
	      struct cp_ct_key, struct cp_flow_state);
CP_PINNED_MAP(CP_FLOW_RATE_MAP, BPF_MAP_TYPE_PERCPU_ARRAY, 1, __u32, struct cp_flow_rate);
/* ==== end of flow event maps ========================================================= */

/* Set by the loader (bpf_map__set_initial_value on .rodata) before bpf_object__load. */
const volatile struct cp_config cp_cfg = {};

#define IPV6_NEXTHDR_FRAGMENT 44
#define IP_OFFSET_MASK 0x1fff
#define IP_MF 0x2000
#define ICMPV6_ND_FIRST 133 /* router solicitation */
#define ICMPV6_ND_LAST 137  /* redirect */
#define ICMP_ECHO_REQUEST 8
#define ICMP_ECHO_REPLY 0
#define ICMPV6_ECHO_REQUEST 128
#define ICMPV6_ECHO_REPLY 129
#define NSEC_PER_SEC 1000000000ULL
#define CT_REFRESH_NS NSEC_PER_SEC /* rewrite a cp_ct entry's time at most once a second */
#define TCP_FIN 0x01
#define TCP_SYN 0x02
#define TCP_RST 0x04
#define TCP_ACK 0x10
#define TCP_FLAGS_OFF 13

enum parse_result { PARSE_OK, PARSE_NON_IP, PARSE_MALFORMED, PARSE_FRAGMENT };
enum flow_kind { FLOW_OTHER, FLOW_PORTS, FLOW_ECHO_REQUEST, FLOW_ECHO_REPLY, FLOW_ND };

struct flow {
	__u8 src[16]; /* IPv4-mapped for IPv4, as in cp_ipcache */
	__u8 dst[16];
	__u16 sport;  /* host order; ICMP echo: the identifier */
	__u16 dport;  /* host order; ICMP echo: the identifier */
	__u8 proto;
	__u8 kind;    /* enum flow_kind */
	__u8 tcp_flags;
};

struct icmp_echo {
	__u8 type;
	__u8 code;
	__be16 checksum;
	__be16 id;
	__be16 seq;
};

static __always_inline int verdict(struct __sk_buff *skb, __u32 reason, int action)
{
	struct cp_metrics_value *v = bpf_map_lookup_elem(&CP_METRICS_MAP, &reason);

	if (v) { /* per-CPU slot: plain increments are safe */
		v->packets += 1;
		v->bytes += skb->len;
	}
	return action;
}

#define PASS(skb, reason) verdict(skb, reason, TC_ACT_OK)
#define DROP(skb, reason) verdict(skb, reason, TC_ACT_SHOT)

static __always_inline int policy_allows(__u32 ep, __u32 identity, __u16 dport, __u8 proto)
{
	struct cp_policy_key key = {};
	struct cp_policy_value *v;

	key.endpoint_id = ep;
	key.sec_identity = identity;
	key.dport = dport;
	key.proto = proto;
	v = bpf_map_lookup_elem(&CP_POLICY_MAP, &key);
	if (v)
		return v->allow;
	if (dport) {
		key.dport = 0;
		v = bpf_map_lookup_elem(&CP_POLICY_MAP, &key);
		if (v)
			return v->allow;
	}
	key.dport = 0;
	key.proto = 0;
	v = bpf_map_lookup_elem(&CP_POLICY_MAP, &key);
	if (v)
		return v->allow;
	key.sec_identity = 0;
	key.dport = dport;
	key.proto = proto;
	v = bpf_map_lookup_elem(&CP_POLICY_MAP, &key);
	if (v)
		return v->allow;
	return 0;
}

static __always_inline int parse_flow(struct __sk_buff *skb, struct flow *f)
{
	__be16 h_proto;
	__u32 l4off;

	if (bpf_skb_load_bytes(skb, offsetof(struct ethhdr, h_proto), &h_proto, sizeof(h_proto)))
		return PARSE_NON_IP; /* shorter than an Ethernet header */
	if (h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr ip;

		if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)) || ip.ihl < 5 ||
		    ip.version != 4)
			return PARSE_MALFORMED;
		f->src[10] = f->src[11] = 0xff;
		f->dst[10] = f->dst[11] = 0xff;
		__builtin_memcpy(&f->src[12], &ip.saddr, 4);
		__builtin_memcpy(&f->dst[12], &ip.daddr, 4);
		f->proto = ip.protocol;
		if (ip.frag_off & bpf_htons(IP_OFFSET_MASK))
			return PARSE_FRAGMENT;
		l4off = ETH_HLEN + ip.ihl * 4;
	} else if (h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr ip6;

		if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip6, sizeof(ip6)) || ip6.version != 6)
			return PARSE_MALFORMED;
		__builtin_memcpy(f->src, &ip6.saddr, 16);
		__builtin_memcpy(f->dst, &ip6.daddr, 16);
		f->proto = ip6.nexthdr;
		if (f->proto == IPV6_NEXTHDR_FRAGMENT)
			return PARSE_FRAGMENT;
		l4off = ETH_HLEN + sizeof(ip6);
	} else {
		return PARSE_NON_IP;
	}

	switch (f->proto) {
	case IPPROTO_TCP:
	case IPPROTO_UDP:
	case IPPROTO_SCTP: {
		__be16 ports[2]; /* source, destination */

		if (bpf_skb_load_bytes(skb, l4off, ports, sizeof(ports)))
			return PARSE_MALFORMED;
		f->sport = bpf_ntohs(ports[0]);
		f->dport = bpf_ntohs(ports[1]);
		f->kind = FLOW_PORTS;
		if (f->proto == IPPROTO_TCP &&
		    bpf_skb_load_bytes(skb, l4off + TCP_FLAGS_OFF, &f->tcp_flags, 1))
			return PARSE_MALFORMED;
		break;
	}
	case IPPROTO_ICMP:
	case IPPROTO_ICMPV6: {
		struct icmp_echo h;
		int v6 = f->proto == IPPROTO_ICMPV6;

		if (bpf_skb_load_bytes(skb, l4off, &h, sizeof(h)))
			return PARSE_MALFORMED;
		if (h.type == (v6 ? ICMPV6_ECHO_REQUEST : ICMP_ECHO_REQUEST))
			f->kind = FLOW_ECHO_REQUEST;
		else if (h.type == (v6 ? ICMPV6_ECHO_REPLY : ICMP_ECHO_REPLY))
			f->kind = FLOW_ECHO_REPLY;
		else if (v6 && h.type >= ICMPV6_ND_FIRST && h.type <= ICMPV6_ND_LAST)
			f->kind = FLOW_ND;
		f->sport = f->dport = bpf_ntohs(h.id);
		break;
	}
	default:
		break;
	}
	return PARSE_OK;
}

/* The cp_ct key of a flow as the endpoint sent it: ``outbound`` for a packet from the
 * endpoint, else for one toward it (addresses and ports swapped). */
static __always_inline void ct_key(const struct flow *f, int outbound, struct cp_ct_key *key)
{
	__builtin_memcpy(key->endpoint_addr, outbound ? f->src : f->dst, 16);
	__builtin_memcpy(key->peer_addr, outbound ? f->dst : f->src, 16);
	key->endpoint_port = outbound ? f->sport : f->dport;
	key->peer_port = outbound ? f->dport : f->sport;
	key->proto = f->proto;
}

static __always_inline int ct_closes(const struct flow *f)
{
	return f->proto == IPPROTO_TCP && (f->tcp_flags & (TCP_FIN | TCP_RST));
}

/* Whether a packet toward the endpoint belongs to a flow it opened and that is still alive;
 * a FIN or RST from the peer marks the flow closing. */
static __always_inline int is_reply(const struct flow *f)
{
	struct cp_ct_key key = {};
	struct cp_ct_value *v;
	__u64 lifetime, now, stamp;

	if (f->kind != FLOW_PORTS && f->kind != FLOW_ECHO_REPLY)
		return 0;
	ct_key(f, 0, &key);
	v = bpf_map_lookup_elem(&CP_CT_MAP, &key);
	if (!v)
		return 0;
	stamp = v->last_seen_ns;
	if (stamp & CP_CT_F_CLOSING)
		lifetime = CP_CT_LIFETIME_CLOSING_S;
	else
		lifetime = f->proto == IPPROTO_TCP ? CP_CT_LIFETIME_TCP_S : CP_CT_LIFETIME_ANY_S;
	now = bpf_ktime_get_ns();
	if (now - stamp >= lifetime * NSEC_PER_SEC)
		return 0;
	if (ct_closes(f) && !(stamp & CP_CT_F_CLOSING))
		v->last_seen_ns = (now & ~(__u64)CP_CT_F_CLOSING) | CP_CT_F_CLOSING;
	return 1;
}

/* ==== Flow events (issue 14): aggregation, rate limit, the ring buffer ===============
 * See cp_maps.h for the maps and the aggregation levels. flow_event() is called once per
 * packet by each program with the verdict it reached; it returns nothing and never changes
 * the verdict. With aggregation off (the state before the agent configured it) it costs
 * one array lookup. */
_Static_assert(FLOW_OTHER == CP_FLOW_KIND_OTHER && FLOW_PORTS == CP_FLOW_KIND_PORTS &&
		       FLOW_ECHO_REQUEST == CP_FLOW_KIND_ECHO_REQUEST &&
		       FLOW_ECHO_REPLY == CP_FLOW_KIND_ECHO_REPLY && FLOW_ND == CP_FLOW_KIND_ND,
	       "flow kinds as cp_maps.h says");
_Static_assert(sizeof(struct cp_flow_event) == 64, "cp_flow_event is 64 bytes");

#define FLOW_REPORTED_TCP_FLAGS (TCP_SYN | TCP_FIN | TCP_RST)

static __always_inline void flow_lost(__u32 reason)
{
	__u64 *n = bpf_map_lookup_elem(&CP_FLOW_LOST_MAP, &reason);

	if (n) /* per-CPU slot */
		*n += 1;
}

/* The per-CPU token bucket: whether one more event may go out now. */
static __always_inline int flow_rate_allows(const struct cp_flow_config *cfg, __u64 now)
{
	__u32 zero = 0;
	struct cp_flow_rate *r;
	__u64 elapsed, cap;

	if (!cfg->rate_per_sec)
		return 1;
	r = bpf_map_lookup_elem(&CP_FLOW_RATE_MAP, &zero);
	if (!r)
		return 1;
	cap = (__u64)(cfg->burst ? cfg->burst : 1) * NSEC_PER_SEC;
	elapsed = now - r->last_ns;
	if (elapsed > NSEC_PER_SEC)
		elapsed = NSEC_PER_SEC; /* (a full second refills up to rate events) */
	r->last_ns = now;
	r->tokens += elapsed * cfg->rate_per_sec;
	if (r->tokens > cap)
		r->tokens = cap;
	if (r->tokens < NSEC_PER_SEC)
		return 0;
	r->tokens -= NSEC_PER_SEC;
	return 1;
}

/* Aggregation and reply detection for a packet of flow f (``to_ep``: toward the endpoint).
 * Sets CP_FLOW_F_REPLY/NEW/CLOSE in *flags; returns whether the packet is reported.
 * Drops (``drop``) are always reported and never create state. */
static __always_inline int flow_aggregate(const struct cp_flow_config *cfg,
					  const struct flow *f, int to_ep, int drop, __u64 now,
					  __u8 *flags)
{
	struct cp_ct_key key = {};
	struct cp_flow_state *st;
	struct cp_flow_state fresh = {};
	__u8 dir = to_ep ? CP_FLOW_F_TO_ENDPOINT : 0;
	__u8 syn_only = f->proto == IPPROTO_TCP && (f->tcp_flags & (TCP_SYN | TCP_ACK)) == TCP_SYN;
	__u8 *seen;
	__u8 fresh_bits;

	if (ct_closes(f))
		*flags |= CP_FLOW_F_CLOSE;
	ct_key(f, !to_ep, &key);
	st = bpf_map_lookup_elem(&CP_FLOW_STATE_MAP, &key);
	if (st && syn_only && ((st->flags_to | st->flags_from) & (TCP_FIN | TCP_RST)))
		st = 0; /* a closed flow's ports used again: a new flow */
	if (!st) {
		if (drop) {
			/* who opened it: the sender of a bare SYN or an echo request */
			if (f->proto == IPPROTO_TCP && (f->tcp_flags & (TCP_SYN | TCP_ACK)) ==
							  (TCP_SYN | TCP_ACK))
				*flags |= CP_FLOW_F_REPLY;
			else if (f->kind == FLOW_ECHO_REPLY)
				*flags |= CP_FLOW_F_REPLY;
			return 1;
		}
		fresh.last_report_ns = now;
		fresh.origin = dir;
		if ((f->proto == IPPROTO_TCP &&
		     (f->tcp_flags & (TCP_SYN | TCP_ACK)) == (TCP_SYN | TCP_ACK)) ||
		    f->kind == FLOW_ECHO_REPLY)
			fresh.origin = dir ^ CP_FLOW_F_TO_ENDPOINT; /* we see the answer first */
		if (to_ep)
			fresh.flags_to = f->tcp_flags;
		else
			fresh.flags_from = f->tcp_flags;
		bpf_map_update_elem(&CP_FLOW_STATE_MAP, &key, &fresh, BPF_ANY);
		*flags |= CP_FLOW_F_NEW;
		if (fresh.origin != dir)
			*flags |= CP_FLOW_F_REPLY;
		return 1;
	}
	if (st->origin != dir)
		*flags |= CP_FLOW_F_REPLY;
	seen = to_ep ? &st->flags_to : &st->flags_from;
	fresh_bits = f->tcp_flags & ~*seen & FLOW_REPORTED_TCP_FLAGS;
	if (fresh_bits)
		*seen |= f->tcp_flags;
	if (drop || cfg->aggregation == CP_FLOW_AGG_NONE || fresh_bits ||
	    now - st->last_report_ns >= (__u64)cfg->report_interval_s * NSEC_PER_SEC) {
		st->last_report_ns = now;
		return 1;
	}
	return 0;
}

static __always_inline void flow_event(struct __sk_buff *skb, const struct flow *f, int to_ep,
				       __u8 type, __u32 reason, __u32 identity)
{
	__u32 zero = 0;
	struct cp_flow_config *cfg = bpf_map_lookup_elem(&CP_FLOW_CONFIG_MAP, &zero);
	struct cp_flow_event *ev;
	__u64 now;
	__u8 flags = to_ep ? CP_FLOW_F_TO_ENDPOINT : 0;

	if (!cfg || cfg->aggregation == CP_FLOW_AGG_OFF)
		return;
	now = bpf_ktime_get_ns();
	if (!flow_aggregate(cfg, f, to_ep, type == CP_FLOW_T_DROP, now, &flags))
		return;
	if (!flow_rate_allows(cfg, now)) {
		flow_lost(CP_FLOW_LOST_RATE_LIMIT);
		return;
	}
	ev = bpf_ringbuf_reserve(&CP_FLOW_EVENTS_MAP, sizeof(*ev), 0);
	if (!ev) {
		flow_lost(CP_FLOW_LOST_RINGBUF_FULL);
		return;
	}
	ev->ktime_ns = now;
	__builtin_memcpy(ev->src, f->src, 16);
	__builtin_memcpy(ev->dst, f->dst, 16);
	ev->endpoint_id = cp_cfg.endpoint_id;
	ev->identity = identity;
	if (identity)
		flags |= CP_FLOW_F_IDENTITY;
	ev->len = skb->len;
	ev->sport = f->sport;
	ev->dport = f->dport;
	ev->proto = f->proto;
	ev->type = type;
	ev->reason = reason;
	ev->tcp_flags = f->tcp_flags;
	ev->flags = flags;
	ev->kind = f->kind;
	ev->pad[0] = ev->pad[1] = 0;
	bpf_ringbuf_submit(ev, 0);
}

/* cp_to_endpoint's verdicts with a flow event (the flow was parsed). */
static __always_inline int flow_verdict(struct __sk_buff *skb, const struct flow *f,
					__u32 reason, __u32 identity, __u8 type, int action)
{
	flow_event(skb, f, 1, type, reason, identity);
	return verdict(skb, reason, action);
}

#define FLOW_PASS(skb, f, reason, identity, type)                                            \
	flow_verdict(skb, f, reason, identity, type, TC_ACT_OK)
#define FLOW_DROP(skb, f, reason, identity)                                                  \
	flow_verdict(skb, f, reason, identity, CP_FLOW_T_DROP, TC_ACT_SHOT)
/* ==== end of flow events ============================================================= */

SEC("tc")
int cp_to_endpoint(struct __sk_buff *skb)
{
	struct cp_ipcache_key ckey = {};
	struct cp_ipcache_value *cval;
	struct cp_endpoint_key ekey = {};
	struct cp_endpoint_value *eval;
	struct flow f = {};
	__u32 ep = cp_cfg.endpoint_id;
	__u32 identity;
	int parsed;

	parsed = parse_flow(skb, &f);
	if (parsed == PARSE_NON_IP)
		return PASS(skb, CP_METRIC_ALLOW_NON_IP);

	ekey.endpoint_id = ep;
	eval = bpf_map_lookup_elem(&CP_ENDPOINTS_MAP, &ekey);
	if (!eval || !(eval->flags & CP_EP_F_INGRESS_ENFORCED)) {
		if (parsed != PARSE_OK || f.kind == FLOW_ND)
			return PASS(skb, CP_METRIC_ALLOW_NOT_ENFORCED);
		return FLOW_PASS(skb, &f, CP_METRIC_ALLOW_NOT_ENFORCED, 0, CP_FLOW_T_TRACE);
	}

	if (parsed == PARSE_MALFORMED)
		return FLOW_DROP(skb, &f, CP_METRIC_DROP_MALFORMED, 0);
	if (parsed == PARSE_FRAGMENT)
		return FLOW_DROP(skb, &f, CP_METRIC_DROP_FRAGMENT, 0);
	if (f.kind == FLOW_ND)
		return PASS(skb, CP_METRIC_ALLOW_ICMPV6_ND);
	if (is_reply(&f))
		return FLOW_PASS(skb, &f, CP_METRIC_ALLOW_REPLY, 0, CP_FLOW_T_TRACE);

	ckey.prefixlen = 128;
	__builtin_memcpy(ckey.addr, f.src, 16);
	cval = bpf_map_lookup_elem(&CP_IPCACHE_MAP, &ckey);
	identity = cval ? cval->sec_identity : CP_IDENTITY_WORLD;

	if (policy_allows(ep, identity, f.kind == FLOW_PORTS ? f.dport : 0, f.proto))
		return FLOW_PASS(skb, &f, CP_METRIC_ALLOW_POLICY, identity, CP_FLOW_T_POLICY_VERDICT);
	return FLOW_DROP(skb, &f, CP_METRIC_DROP_POLICY_DENY, identity);
}

SEC("tc")
int cp_from_endpoint(struct __sk_buff *skb)
{
	struct cp_ct_key key = {};
	struct cp_ct_value fresh = {};
	struct cp_ct_value *seen;
	struct flow f = {};
	__u64 now, old, closing;

	if (parse_flow(skb, &f) != PARSE_OK)
		return TC_ACT_OK;
	if (f.kind != FLOW_ND) /* flow events (issue 14) */
		flow_event(skb, &f, 0, CP_FLOW_T_TRACE, CP_METRIC_ALLOW_NOT_ENFORCED, 0);
	if (f.kind != FLOW_PORTS && f.kind != FLOW_ECHO_REQUEST)
		return TC_ACT_OK;
	ct_key(&f, 1, &key);
	now = bpf_ktime_get_ns() & ~(__u64)CP_CT_F_CLOSING;
	closing = ct_closes(&f) ? CP_CT_F_CLOSING : 0;
	seen = bpf_map_lookup_elem(&CP_CT_MAP, &key);
	if (seen) {
		old = seen->last_seen_ns;
		/* a new connection on the same ports (a bare SYN) is open again */
		if (f.proto != IPPROTO_TCP || (f.tcp_flags & (TCP_SYN | TCP_ACK)) != TCP_SYN)
			closing |= old & CP_CT_F_CLOSING;
		if (closing != (old & CP_CT_F_CLOSING) || now - old > CT_REFRESH_NS)
			seen->last_seen_ns = now | closing;
		return TC_ACT_OK;
	}
	fresh.last_seen_ns = now | closing;
	bpf_map_update_elem(&CP_CT_MAP, &key, &fresh, BPF_ANY);
	return TC_ACT_OK;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
