/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Shared map layouts of the control-plane datapath (issue 5).
 *
 * This header is included by the BPF program (cp_datapath.c, clang -target bpf) and by the
 * host-side layout probe the tests compile (tests/test_bpf_program.py). Every struct here
 * is mirrored byte for byte by a ctypes.Structure in Python:
 *
 *   struct cp_ipcache_key / cp_ipcache_value  <-> controlplane/datapath/ipcache.py
 *   everything else                           <-> controlplane/datapath/layouts.py
 *
 * Integers are host byte order (what Python's ctypes writes on the same machine);
 * addresses are network byte order; dport is HOST byte order (the program converts).
 * Explicit padding only: no implicit holes, so the kernel, C and ctypes agree.
 */
#ifndef CP_MAPS_H
#define CP_MAPS_H

#include <linux/types.h>

/* Map names (also the pin file names under the pin directory). */
#define CP_IPCACHE_MAP   cp_ipcache
#define CP_POLICY_MAP    cp_policy
#define CP_ENDPOINTS_MAP cp_endpoints
#define CP_METRICS_MAP   cp_metrics
#define CP_CT_MAP        cp_ct

#define CP_IPCACHE_MAX_ENTRIES   (512 * 1024)
#define CP_POLICY_MAX_ENTRIES    (64 * 1024)
#define CP_ENDPOINTS_MAX_ENTRIES 4096
#define CP_METRICS_MAX_ENTRIES   16
#define CP_CT_MAX_ENTRIES        (64 * 1024)

/* cp_ipcache: BPF_MAP_TYPE_LPM_TRIE (BPF_F_NO_PREALLOC). 20-byte key, 24-byte value.
 * IPv4 a.b.c.d/n is stored IPv4-mapped (::ffff:a.b.c.d) with prefixlen 96 + n. */
struct cp_ipcache_key {
	__u32 prefixlen;
	__u8 addr[16];
};

#define CP_IPCACHE_FLAG_LOCAL 0x01 /* an endpoint (or the host) of this node */
#define CP_IPCACHE_FLAG_NODE  0x02 /* a node's own IP */

struct cp_ipcache_value {
	__u32 sec_identity;
	__u8 tunnel_endpoint[16];
	__u8 flags;
	__u8 pad[3];
};

/* Identity a source gets when the ipcache has no prefix for it (reserved:world, as in
 * controlplane.model.IDENTITY_WORLD). */
#define CP_IDENTITY_WORLD 2

/* cp_policy: BPF_MAP_TYPE_HASH, one map for every endpoint of the node. 12-byte key,
 * 4-byte value. Lookup order (first hit decides, allow=1 permits, allow=0 denies):
 *   {ep, identity, dport, proto}   exact L3+L4
 *   {ep, identity, 0,     proto}   any port of that protocol
 *   {ep, identity, 0,     0}       L3 only: anything from that identity
 *   {ep, 0,        dport, proto}   L4 only: that port from any identity
 * ICMP/ICMPv6 carry dport 0 (allow ping with {ep, id, 0, IPPROTO_ICMP}). */
struct cp_policy_key {
	__u32 endpoint_id;
	__u32 sec_identity; /* remote (source) identity; 0 = any identity */
	__u16 dport;        /* host byte order; 0 = any port */
	__u8 proto;         /* IPPROTO_*; 0 = any protocol */
	__u8 pad;
};

struct cp_policy_value {
	__u8 allow; /* 1 = permit, 0 = explicit deny */
	__u8 pad[3];
};

/* cp_endpoints: BPF_MAP_TYPE_HASH endpoint id -> enforcement flags. An endpoint without an
 * entry, or without CP_EP_F_INGRESS_ENFORCED, is default-allow (no policy selects it);
 * with the flag it is default-deny (as in Cilium). */
#define CP_EP_F_INGRESS_ENFORCED 0x01

struct cp_endpoint_key {
	__u32 endpoint_id;
};

struct cp_endpoint_value {
	__u32 flags;
};

/* cp_metrics: BPF_MAP_TYPE_PERCPU_ARRAY, key __u32 reason (array maps need a plain int key
 * in BTF), value {packets, bytes} per CPU; readers sum over the possible CPUs. */
enum cp_metric_reason {
	CP_METRIC_ALLOW_POLICY = 0,      /* a policy entry permitted the packet */
	CP_METRIC_ALLOW_NOT_ENFORCED = 1, /* no policy selects the endpoint: default allow */
	CP_METRIC_ALLOW_NON_IP = 2,      /* ARP and other non-IP frames */
	CP_METRIC_ALLOW_ICMPV6_ND = 3,   /* IPv6 neighbour discovery, always allowed */
	CP_METRIC_DROP_POLICY_DENY = 4,  /* enforced endpoint, no (or a deny) policy entry */
	CP_METRIC_DROP_MALFORMED = 5,    /* truncated or invalid L3/L4 headers */
	CP_METRIC_DROP_FRAGMENT = 6,     /* non-first IP fragment of an enforced endpoint */
	CP_METRIC_ALLOW_REPLY = 7,       /* a reply to a flow the endpoint opened (cp_ct) */
	CP_METRIC_REASONS = 8,
};

struct cp_metrics_value {
	__u64 packets;
	__u64 bytes;
};

/* cp_ct: BPF_MAP_TYPE_LRU_HASH of the flows endpoints opened, so that an enforced
 * endpoint's ingress policy does not drop the replies. cp_from_endpoint (host-side veth
 * ingress: packets from the pod) records every TCP/UDP/SCTP packet and ICMP echo request
 * with the time it saw it; cp_to_endpoint passes a packet whose reversed flow was seen
 * within the lifetime (TCP 6 h, others 60 s, as Cilium's defaults). A TCP FIN or RST in
 * either direction marks the entry closing: it then lives 10 s after its last packet
 * (Cilium's close timeout), and a new SYN from the pod opens it again. 40-byte key,
 * 8-byte value: the time in ns, whose lowest bit is replaced by CP_CT_F_CLOSING.
 * Addresses as in cp_ipcache (IPv4-mapped); ports host order; for ICMP echo both ports
 * are the echo identifier. */
#define CP_CT_LIFETIME_TCP_S 21600
#define CP_CT_LIFETIME_ANY_S 60
#define CP_CT_LIFETIME_CLOSING_S 10
#define CP_CT_F_CLOSING 1

struct cp_ct_key {
	__u8 endpoint_addr[16];
	__u8 peer_addr[16];
	__u16 endpoint_port;
	__u16 peer_port;
	__u8 proto;
	__u8 pad[3];
};

struct cp_ct_value {
	__u64 last_seen_ns; /* bpf_ktime_get_ns() */
};

/* Read-only per-program configuration (.rodata), set by the loader before load. */
struct cp_config {
	__u32 endpoint_id;
	__u32 pad;
};

/* ==== Flow events (issue 14) ==========================================================
 * The tc programs report flows into a BPF ring buffer (cp_flow_events) that the agent's
 * flow server reads (controlplane/datapath/flowevents.py mirrors everything below).
 *
 *   cp_flow_events  RINGBUF of struct cp_flow_event records (CP_FLOW_EVENTS_BYTES)
 *   cp_flow_config  ARRAY[1] struct cp_flow_config, written by the agent; all zero (the
 *                   state before any agent configured it) = events off
 *   cp_flow_lost    PERCPU_ARRAY u32 reason (enum cp_flow_lost_reason) -> u64 events the
 *                   kernel could not deliver: never silent
 *   cp_flow_state   LRU_HASH struct cp_ct_key -> struct cp_flow_state: per flow, who opened
 *                   it (is_reply), the TCP flags already reported each way, the last report
 *   cp_flow_rate    PERCPU_ARRAY[1] struct cp_flow_rate: the token bucket of the rate limit
 *
 * Aggregation (like Cilium's monitor aggregation): NONE reports every packet; MEDIUM
 * reports each drop, the first packet of a flow in each direction, a TCP SYN, FIN or RST
 * not yet reported in that direction, and otherwise at most one packet per flow and
 * direction every report_interval_s. Then the per-CPU rate limit (rate_per_sec, burst;
 * 0 = unlimited) applies; what it refuses counts as CP_FLOW_LOST_RATE_LIMIT, a full ring
 * buffer as CP_FLOW_LOST_RINGBUF_FULL. */
#define CP_FLOW_EVENTS_MAP cp_flow_events
#define CP_FLOW_CONFIG_MAP cp_flow_config
#define CP_FLOW_LOST_MAP   cp_flow_lost
#define CP_FLOW_STATE_MAP  cp_flow_state
#define CP_FLOW_RATE_MAP   cp_flow_rate

#define CP_FLOW_EVENTS_BYTES       (4 * 1024 * 1024)
#define CP_FLOW_STATE_MAX_ENTRIES  (64 * 1024)
#define CP_FLOW_LOST_MAX_ENTRIES   4

enum cp_flow_aggregation {
	CP_FLOW_AGG_OFF = 0,    /* no events at all */
	CP_FLOW_AGG_NONE = 1,   /* every packet */
	CP_FLOW_AGG_MEDIUM = 2, /* drops, new flows, TCP flag changes, one per interval */
};

struct cp_flow_config {
	__u32 aggregation;       /* enum cp_flow_aggregation */
	__u32 rate_per_sec;      /* events per second per CPU; 0 = unlimited */
	__u32 burst;             /* token bucket depth (events) */
	__u32 report_interval_s; /* MEDIUM: re-report a busy flow at most this often */
};

/* Types as Cilium's monitor message types, so Flow.event_type means the same. */
enum cp_flow_type {
	CP_FLOW_T_DROP = 1,
	CP_FLOW_T_TRACE = 4,          /* forwarded without a policy decision */
	CP_FLOW_T_POLICY_VERDICT = 5, /* forwarded by a policy entry */
};

#define CP_FLOW_F_TO_ENDPOINT 0x01 /* seen by cp_to_endpoint (toward the pod), else from it */
#define CP_FLOW_F_REPLY       0x02 /* the other side opened the flow */
#define CP_FLOW_F_NEW         0x04 /* first packet of the flow the programs saw */
#define CP_FLOW_F_CLOSE       0x08 /* a TCP FIN or RST */
#define CP_FLOW_F_IDENTITY    0x10 /* identity is the remote side's, from cp_ipcache */

/* struct flow's kind in cp_datapath.c (the ICMP type is told from it). */
#define CP_FLOW_KIND_OTHER         0
#define CP_FLOW_KIND_PORTS         1
#define CP_FLOW_KIND_ECHO_REQUEST  2
#define CP_FLOW_KIND_ECHO_REPLY    3
#define CP_FLOW_KIND_ND            4

/* One ring buffer record: 64 bytes. Addresses as in cp_ipcache (IPv4-mapped); ports host
 * order (ICMP echo: the identifier). */
struct cp_flow_event {
	__u64 ktime_ns;  /* bpf_ktime_get_ns(): CLOCK_MONOTONIC */
	__u8 src[16];
	__u8 dst[16];
	__u32 endpoint_id;
	__u32 identity;  /* with CP_FLOW_F_IDENTITY */
	__u32 len;       /* skb->len */
	__u16 sport;
	__u16 dport;
	__u8 proto;
	__u8 type;       /* enum cp_flow_type */
	__u8 reason;     /* enum cp_metric_reason */
	__u8 tcp_flags;
	__u8 flags;      /* CP_FLOW_F_* */
	__u8 kind;       /* CP_FLOW_KIND_* */
	__u8 pad[2];
};

enum cp_flow_lost_reason {
	CP_FLOW_LOST_RINGBUF_FULL = 0, /* the reader did not keep up */
	CP_FLOW_LOST_RATE_LIMIT = 1,   /* refused by the rate limit */
	CP_FLOW_LOST_REASONS = 2,
};

struct cp_flow_state {
	__u64 last_report_ns;
	__u8 flags_to;   /* TCP flags reported toward the endpoint */
	__u8 flags_from; /* ... and from it */
	__u8 origin;     /* CP_FLOW_F_TO_ENDPOINT when the peer opened the flow, else 0 */
	__u8 pad[5];
};

struct cp_flow_rate {
	__u64 tokens; /* in 1e-9 events */
	__u64 last_ns;
};
/* ==== end of flow events ============================================================= */

#endif /* CP_MAPS_H */
