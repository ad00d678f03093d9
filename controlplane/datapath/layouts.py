"""Fixed key/value layouts of the datapath's kernel maps, mirrored from ``bpf/cp_maps.h``.

Each ``ctypes.Structure`` here matches a C struct byte for byte (sizes and offsets are
checked against the compiled C by ``tests/test_bpf_program.py``); integers are host byte
order, addresses network order, ``dport`` host order. The ipcache layouts live in
:mod:`controlplane.datapath.ipcache` and are re-exported here so that one module names every
kernel layout::

    struct cp_policy_key    { __u32 endpoint_id; __u32 sec_identity; __u16 dport;
                              __u8 proto; __u8 pad; };                      /* 12 bytes */
    struct cp_policy_value  { __u8 allow; __u8 pad[3]; };                  /*  4 bytes */
    struct cp_endpoint_key  { __u32 endpoint_id; };                        /*  4 bytes */
    struct cp_endpoint_value{ __u32 flags; };                              /*  4 bytes */
    struct cp_metrics_value { __u64 packets; __u64 bytes; };  /* 16 bytes, per CPU;
                                                 key: __u32 reason (MetricReason) */
    struct cp_config        { __u32 endpoint_id; __u32 pad; };  /* .rodata, 8 bytes */
    struct cp_ct_key        { __u8 endpoint_addr[16]; __u8 peer_addr[16];
                              __u16 endpoint_port; __u16 peer_port; __u8 proto;
                              __u8 pad[3]; };                               /* 40 bytes */
    struct cp_ct_value      { __u64 last_seen_ns; };                       /*  8 bytes */

Policy lookup order in the program (first hit decides): exact ``(ep, id, dport, proto)``,
``(ep, id, 0, proto)``, ``(ep, id, 0, 0)``, ``(ep, 0, dport, proto)``; an endpoint whose
``cp_endpoints`` entry lacks :data:`EP_F_INGRESS_ENFORCED` is default-allow; before the
policy, a reply to a flow the endpoint opened (found in ``cp_ct``) passes.
"""

from __future__ import annotations

import ctypes
import enum
from typing import Final

from controlplane.datapath.ipcache import IpcacheKey, IpcacheValue

__all__ = [
    "CT_F_CLOSING",
    "CT_LIFETIME_ANY_S",
    "CT_LIFETIME_CLOSING_S",
    "CT_LIFETIME_TCP_S",
    "CT_MAP_NAME",
    "CT_MAX_ENTRIES",
    "ENDPOINTS_MAP_NAME",
    "ENDPOINTS_MAX_ENTRIES",
    "EP_F_INGRESS_ENFORCED",
    "FLOW_MAP_NAMES",
    "IDENTITY_ANY",
    "IDENTITY_WORLD",
    "METRICS_MAP_NAME",
    "METRICS_MAX_ENTRIES",
    "POLICY_MAP_NAME",
    "POLICY_MAX_ENTRIES",
    "Config",
    "CtKey",
    "CtValue",
    "EndpointKey",
    "EndpointValue",
    "IpcacheKey",
    "IpcacheValue",
    "MetricReason",
    "MetricsValue",
    "PolicyKey",
    "PolicyValue",
    "decode_percpu_metrics",
    "encode_endpoint",
    "encode_policy_key",
    "encode_policy_value",
]

POLICY_MAP_NAME: Final = "cp_policy"
POLICY_MAX_ENTRIES: Final = 64 * 1024
ENDPOINTS_MAP_NAME: Final = "cp_endpoints"
ENDPOINTS_MAX_ENTRIES: Final = 4096
METRICS_MAP_NAME: Final = "cp_metrics"
METRICS_MAX_ENTRIES: Final = 16
CT_MAP_NAME: Final = "cp_ct"
FLOW_MAP_NAMES: Final = (
    "cp_flow_events",
    "cp_flow_config",
    "cp_flow_lost",
    "cp_flow_state",
    "cp_flow_rate",
)
"""The flow event maps (issue 14; their layouts are in :mod:`.flowevents`)."""
CT_MAX_ENTRIES: Final = 64 * 1024
CT_LIFETIME_TCP_S: Final = 21600
"""How long a ``cp_ct`` TCP entry lives after its last packet from the pod."""
CT_LIFETIME_ANY_S: Final = 60
"""How long any other ``cp_ct`` entry (UDP, SCTP, ICMP echo) lives."""
CT_F_CLOSING: Final = 0x01
"""The lowest bit of ``CtValue.last_seen_ns``: a TCP FIN or RST went by."""
CT_LIFETIME_CLOSING_S: Final = 10
"""How long a closing ``cp_ct`` entry lives after its last packet."""

EP_F_INGRESS_ENFORCED: Final = 0x01
"""``cp_endpoints`` flag: a policy selects the endpoint, so its ingress is default-deny."""
IDENTITY_ANY: Final = 0
"""``PolicyKey.sec_identity`` wildcard (an L4-only rule)."""
IDENTITY_WORLD: Final = 2
"""The identity the program gives a source the ipcache does not know."""


class PolicyKey(ctypes.Structure):
    _fields_ = (
        ("endpoint_id", ctypes.c_uint32),
        ("sec_identity", ctypes.c_uint32),
        ("dport", ctypes.c_uint16),
        ("proto", ctypes.c_uint8),
        ("pad", ctypes.c_uint8),
    )


class PolicyValue(ctypes.Structure):
    _fields_ = (("allow", ctypes.c_uint8), ("pad", ctypes.c_uint8 * 3))


class EndpointKey(ctypes.Structure):
    _fields_ = (("endpoint_id", ctypes.c_uint32),)


class EndpointValue(ctypes.Structure):
    _fields_ = (("flags", ctypes.c_uint32),)


class MetricsValue(ctypes.Structure):
    _fields_ = (("packets", ctypes.c_uint64), ("bytes", ctypes.c_uint64))


class CtKey(ctypes.Structure):
    _fields_ = (
        ("endpoint_addr", ctypes.c_uint8 * 16),
        ("peer_addr", ctypes.c_uint8 * 16),
        ("endpoint_port", ctypes.c_uint16),
        ("peer_port", ctypes.c_uint16),
        ("proto", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 3),
    )


class CtValue(ctypes.Structure):
    """When the flow was last seen (ns, ``bpf_ktime_get_ns``), its lowest bit replaced by
    :data:`CT_F_CLOSING`."""

    _fields_ = (("last_seen_ns", ctypes.c_uint64),)


class Config(ctypes.Structure):
    """The program's ``.rodata`` (``const volatile struct cp_config cp_cfg``)."""

    _fields_ = (("endpoint_id", ctypes.c_uint32), ("pad", ctypes.c_uint32))


class MetricReason(enum.IntEnum):
    """Index into ``cp_metrics`` (``enum cp_metric_reason``)."""

    ALLOW_POLICY = 0
    ALLOW_NOT_ENFORCED = 1
    ALLOW_NON_IP = 2
    ALLOW_ICMPV6_ND = 3
    DROP_POLICY_DENY = 4
    DROP_MALFORMED = 5
    DROP_FRAGMENT = 6
    ALLOW_REPLY = 7


assert ctypes.sizeof(PolicyKey) == 12 and ctypes.sizeof(PolicyValue) == 4
assert ctypes.sizeof(MetricsValue) == 16 and ctypes.sizeof(Config) == 8
assert ctypes.sizeof(CtKey) == 40 and ctypes.sizeof(CtValue) == 8
assert len(MetricReason) <= METRICS_MAX_ENTRIES


def encode_policy_key(endpoint_id: int, identity: int, dport: int, proto: int) -> bytes:
    """A ``cp_policy`` key; 0 in identity/dport/proto is the wildcard."""
    return bytes(PolicyKey(endpoint_id, identity, dport, proto, 0))


def encode_policy_value(allow: bool) -> bytes:
    return bytes(PolicyValue(1 if allow else 0))


def encode_endpoint(endpoint_id: int, flags: int) -> tuple[bytes, bytes]:
    """A ``cp_endpoints`` (key, value) pair."""
    return bytes(EndpointKey(endpoint_id)), bytes(EndpointValue(flags))


def decode_percpu_metrics(raw: bytes, ncpus: int) -> MetricsValue:
    """Sum one ``cp_metrics`` per-CPU lookup result (``ncpus`` values of 8-byte-aligned size)."""
    size = ctypes.sizeof(MetricsValue)  # already a multiple of 8: no per-CPU rounding
    if len(raw) != size * ncpus:
        raise ValueError(f"per-CPU metrics value of {len(raw)} bytes, want {size * ncpus}")
    total = MetricsValue()
    for cpu in range(ncpus):
        one = MetricsValue.from_buffer_copy(raw, cpu * size)
        total.packets += one.packets
        total.bytes += one.bytes
    return total
