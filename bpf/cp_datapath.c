// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * cp_datapath: tc classifier on the HOST side of an endpoint's veth, attached to clsact
 * EGRESS there (packets travelling toward the pod), enforcing the pod's INGRESS policy.
 *
 *   1. non-IP frames (ARP, ...) pass;
 *   2. if the endpoint is not in cp_endpoints with CP_EP_F_INGRESS_ENFORCED, pass
 *      (default allow until a policy selects the endpoint);
 *   3. parse IPv4/IPv6 + L4 (TCP/UDP/SCTP dport, ICMP = port 0); IPv6 neighbour
 *      discovery always passes;
 *   4. source address -> cp_ipcache (LPM) -> remote identity (miss: reserved:world);
 *   5. (endpoint id, identity, dport, proto) -> cp_policy with wildcards (see cp_maps.h);
 *      a hit with allow=1 passes, anything else drops (default deny).
 *
 * Every verdict is counted by reason in cp_metrics (per-CPU {packets, bytes}).
 *
 * The endpoint id is a per-program constant (cp_cfg in .rodata) the loader writes before
 * loading, so each endpoint gets its own program instance; every map is shared by all
 * endpoints of the node and pinned by name (LIBBPF_PIN_BY_NAME) under the loader's pin
 * directory so it outlives the agent.
 *
 * Not handled (stateless program): replies to connections the pod opened itself are
 * subject to the pod's ingress policy too (no conntrack yet); IPv6 extension headers are
 * not walked (the first next-header is taken as the L4 protocol).
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

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, CP_POLICY_MAX_ENTRIES);
	__type(key, struct cp_policy_key);
	__type(value, struct cp_policy_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} CP_POLICY_MAP SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, CP_ENDPOINTS_MAX_ENTRIES);
	__type(key, struct cp_endpoint_key);
	__type(value, struct cp_endpoint_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} CP_ENDPOINTS_MAP SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, CP_METRICS_MAX_ENTRIES);
	__type(key, __u32);
	__type(value, struct cp_metrics_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} CP_METRICS_MAP SEC(".maps");

/* Set by the loader (bpf_map__set_initial_value on .rodata) before bpf_object__load. */
const volatile struct cp_config cp_cfg = {};

#define IPV6_NEXTHDR_FRAGMENT 44
#define IP_OFFSET_MASK 0x1fff
#define IP_MF 0x2000
#define ICMPV6_ND_FIRST 133 /* router solicitation */
#define ICMPV6_ND_LAST 137  /* redirect */

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

SEC("tc")
int cp_to_endpoint(struct __sk_buff *skb)
{
	struct cp_ipcache_key ckey = {};
	struct cp_ipcache_value *cval;
	struct cp_endpoint_key ekey = {};
	struct cp_endpoint_value *eval;
	__u32 ep = cp_cfg.endpoint_id;
	__u32 l4off, identity;
	__u16 dport = 0;
	__u8 proto;
	__be16 h_proto;

	if (bpf_skb_load_bytes(skb, offsetof(struct ethhdr, h_proto), &h_proto, sizeof(h_proto)))
		return PASS(skb, CP_METRIC_ALLOW_NON_IP); /* shorter than an Ethernet header */
	if (h_proto != bpf_htons(ETH_P_IP) && h_proto != bpf_htons(ETH_P_IPV6))
		return PASS(skb, CP_METRIC_ALLOW_NON_IP);

	ekey.endpoint_id = ep;
	eval = bpf_map_lookup_elem(&CP_ENDPOINTS_MAP, &ekey);
	if (!eval || !(eval->flags & CP_EP_F_INGRESS_ENFORCED))
		return PASS(skb, CP_METRIC_ALLOW_NOT_ENFORCED);

	ckey.prefixlen = 128;
	if (h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr ip;

		if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)) || ip.ihl < 5 ||
		    ip.version != 4)
			return DROP(skb, CP_METRIC_DROP_MALFORMED);
		ckey.addr[10] = 0xff;
		ckey.addr[11] = 0xff;
		__builtin_memcpy(&ckey.addr[12], &ip.saddr, 4);
		proto = ip.protocol;
		if (ip.frag_off & bpf_htons(IP_OFFSET_MASK))
			return DROP(skb, CP_METRIC_DROP_FRAGMENT);
		l4off = ETH_HLEN + ip.ihl * 4;
	} else {
		struct ipv6hdr ip6;

		if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip6, sizeof(ip6)) || ip6.version != 6)
			return DROP(skb, CP_METRIC_DROP_MALFORMED);
		__builtin_memcpy(ckey.addr, &ip6.saddr, 16);
		proto = ip6.nexthdr;
		if (proto == IPV6_NEXTHDR_FRAGMENT)
			return DROP(skb, CP_METRIC_DROP_FRAGMENT);
		l4off = ETH_HLEN + sizeof(ip6);
	}

	switch (proto) {
	case IPPROTO_TCP:
	case IPPROTO_UDP:
	case IPPROTO_SCTP: {
		__be16 ports[2]; /* source, destination */

		if (bpf_skb_load_bytes(skb, l4off, ports, sizeof(ports)))
			return DROP(skb, CP_METRIC_DROP_MALFORMED);
		dport = bpf_ntohs(ports[1]);
		break;
	}
	case IPPROTO_ICMPV6: {
		__u8 type;

		if (bpf_skb_load_bytes(skb, l4off, &type, sizeof(type)))
			return DROP(skb, CP_METRIC_DROP_MALFORMED);
		if (type >= ICMPV6_ND_FIRST && type <= ICMPV6_ND_LAST)
			return PASS(skb, CP_METRIC_ALLOW_ICMPV6_ND);
		break;
	}
	default: /* ICMP and the rest: port 0 */
		break;
	}

	cval = bpf_map_lookup_elem(&CP_IPCACHE_MAP, &ckey);
	identity = cval ? cval->sec_identity : CP_IDENTITY_WORLD;

	if (policy_allows(ep, identity, dport, proto))
		return PASS(skb, CP_METRIC_ALLOW_POLICY);
	return DROP(skb, CP_METRIC_DROP_POLICY_DENY);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
