"""The flows endpoints opened, as the tc programs track them in ``cp_ct``
(``cpctl bpf ct list``)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from controlplane.datapath.ipcache import address_from16
from controlplane.datapath.kernel import KernelMap
from controlplane.datapath.layouts import (
    CT_F_CLOSING,
    CT_LIFETIME_ANY_S,
    CT_LIFETIME_CLOSING_S,
    CT_LIFETIME_TCP_S,
    CtKey,
    CtValue,
)
from controlplane.model import PROTOCOLS

_IPPROTO_TCP = PROTOCOLS["TCP"]


@dataclass(frozen=True, slots=True)
class CtFlow:
    endpoint: str
    """The endpoint's address (the pod's side of the flow)."""
    endpoint_port: int
    peer: str
    peer_port: int
    proto: int
    closing: bool
    """A TCP FIN or RST went by."""
    age_s: float
    """Seconds since the last packet from the pod (to the second: entries are rewritten
    at most once a second)."""
    expires_in_s: float
    """Seconds until replies stop passing; 0 when they already do not (an LRU map keeps
    expired entries until it needs the room)."""


def ct_flows(kmap: KernelMap, now_ns: int | None = None) -> list[CtFlow]:
    """Every entry of ``cp_ct``; ``now_ns`` is ``CLOCK_MONOTONIC`` (``bpf_ktime_get_ns``)."""
    now = time.clock_gettime_ns(time.CLOCK_MONOTONIC) if now_ns is None else now_ns
    out: list[CtFlow] = []
    for raw_key, raw_value in kmap.items():
        key = CtKey.from_buffer_copy(raw_key)
        stamp = int(CtValue.from_buffer_copy(raw_value).last_seen_ns)
        closing = bool(stamp & CT_F_CLOSING)
        if closing:
            lifetime = CT_LIFETIME_CLOSING_S
        else:
            lifetime = CT_LIFETIME_TCP_S if key.proto == _IPPROTO_TCP else CT_LIFETIME_ANY_S
        age = max(0, now - stamp) / 1e9
        out.append(
            CtFlow(
                endpoint=str(address_from16(bytes(key.endpoint_addr))),
                endpoint_port=key.endpoint_port,
                peer=str(address_from16(bytes(key.peer_addr))),
                peer_port=key.peer_port,
                proto=key.proto,
                closing=closing,
                age_s=round(age, 3),
                expires_in_s=round(max(0.0, lifetime - age), 3),
            )
        )
    out.sort(key=lambda f: (f.endpoint, f.endpoint_port, f.peer, f.peer_port, f.proto))
    return out
