"""Drives ``cp_policy`` and ``cp_endpoints`` (layouts in :mod:`.layouts`) over the Map protocol.

:class:`PolicyMaps` takes the whole desired state (endpoint id -> enforced flag and allowed
``(identity, port, proto)`` set) and makes both maps equal to it by mark-and-sweep against
what the maps actually hold: only differences are written, nothing is ever flushed, and
the order keeps the datapath safe while it changes: new allow entries first, then the
enforcement flags, then the stale entries (so an endpoint becomes enforced only once its
allow entries are in, and stops being enforced before they go).

In kernel mode the maps are the ones the tc program uses, pinned under the agent's
``--bpf-pin-dir`` and created exactly as ``bpf/cp_maps.h`` declares them (hash maps,
flags 0), so libbpf reuses the pins and the maps outlive the agent.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from controlplane.datapath.bpf_syscall import BPF_MAP_TYPE_HASH, ensure_bpffs
from controlplane.datapath.kernel import KernelMap, pinned_map
from controlplane.datapath.layouts import (
    ENDPOINTS_MAP_NAME,
    ENDPOINTS_MAX_ENTRIES,
    EP_F_INGRESS_ENFORCED,
    POLICY_MAP_NAME,
    POLICY_MAX_ENTRIES,
    EndpointKey,
    EndpointValue,
    PolicyKey,
    PolicyValue,
    encode_endpoint,
    encode_policy_key,
    encode_policy_value,
)
from controlplane.datapath.maps import (
    Map,
    MapError,
    UserspaceMap,
    delete_in_batches,
    update_in_batches,
)

log = logging.getLogger(__name__)

Allowed = Iterable[tuple[int, int, int]]
"""``(identity, port, proto)`` entries of one endpoint."""

_POLICY_SIZES = (12, 4)
_ENDPOINT_SIZES = (4, 4)


@dataclass(slots=True)
class PolicyMapStats:
    syncs: int = 0
    updates: int = 0
    deletes: int = 0
    unchanged: int = 0
    errors: int = 0


@dataclass(frozen=True, slots=True)
class PolicyRow:
    endpoint_id: int
    identity: int
    port: int
    proto: int
    allow: bool


class PolicyMaps:
    """The node's policy and endpoint-flag maps (see the module docstring)."""

    def __init__(self, policy: Map, endpoints: Map, *, batch_size: int = 1024) -> None:
        if (policy.key_size, policy.value_size) != _POLICY_SIZES:
            raise ValueError(f"map {policy.name}: want key/value sizes {_POLICY_SIZES}")
        if (endpoints.key_size, endpoints.value_size) != _ENDPOINT_SIZES:
            raise ValueError(f"map {endpoints.name}: want key/value sizes {_ENDPOINT_SIZES}")
        self.policy = policy
        self.endpoints = endpoints
        self.batch_size = batch_size
        self.stats = PolicyMapStats()

    def sync(self, desired: Mapping[int, tuple[bool, Allowed]]) -> bool:
        """Make both maps equal ``desired``; False when a write failed (retry later)."""
        self.stats.syncs += 1
        allow = encode_policy_value(True)
        want_policy: dict[bytes, bytes] = {}
        want_eps: dict[bytes, bytes] = {}
        for ep, (enforced, allowed) in desired.items():
            key, value = encode_endpoint(ep, EP_F_INGRESS_ENFORCED if enforced else 0)
            want_eps[key] = value
            for ident, port, proto in allowed:
                want_policy[encode_policy_key(ep, ident, port, proto)] = allow
        have_policy = dict(self.policy.items())
        have_eps = dict(self.endpoints.items())
        add_policy = [(k, v) for k, v in want_policy.items() if have_policy.get(k) != v]
        set_eps = [(k, v) for k, v in want_eps.items() if have_eps.get(k) != v]
        stale_policy = [k for k in have_policy if k not in want_policy]
        stale_eps = [k for k in have_eps if k not in want_eps]
        self.stats.unchanged += len(want_policy) - len(add_policy) + len(want_eps) - len(set_eps)
        try:
            self._update(self.policy, add_policy)
            self._update(self.endpoints, set_eps)
            self._delete(self.policy, stale_policy)
            self._delete(self.endpoints, stale_eps)
        except MapError as exc:
            self.stats.errors += 1
            log.warning("policy map write failed: %s", exc)
            return False
        return True

    def rows(self, endpoint_id: int | None = None) -> list[PolicyRow]:
        """``cp_policy`` entries (of one endpoint), sorted."""
        return policy_rows(self.policy, endpoint_id)

    def flags(self) -> dict[int, int]:
        """``cp_endpoints``: endpoint id -> flags."""
        return endpoint_flags(self.endpoints)

    def _update(self, map_: Map, entries: list[tuple[bytes, bytes]]) -> None:
        self.stats.updates += update_in_batches(map_, entries, self.batch_size)

    def _delete(self, map_: Map, keys: list[bytes]) -> None:
        self.stats.deletes += delete_in_batches(map_, keys, self.batch_size)


def policy_rows(policy: Map, endpoint_id: int | None = None) -> list[PolicyRow]:
    rows = []
    for key, value in policy.items():
        k = PolicyKey.from_buffer_copy(key)
        if endpoint_id is not None and k.endpoint_id != endpoint_id:
            continue
        allow = bool(PolicyValue.from_buffer_copy(value).allow)
        rows.append(PolicyRow(k.endpoint_id, k.sec_identity, k.dport, k.proto, allow))
    rows.sort(key=lambda r: (r.endpoint_id, r.identity, r.port, r.proto))
    return rows


def endpoint_flags(endpoints: Map) -> dict[int, int]:
    out = {}
    for key, value in endpoints.items():
        out[EndpointKey.from_buffer_copy(key).endpoint_id] = EndpointValue.from_buffer_copy(
            value
        ).flags
    return dict(sorted(out.items()))


def userspace_policy_maps() -> PolicyMaps:
    return PolicyMaps(
        UserspaceMap(POLICY_MAP_NAME, *_POLICY_SIZES, POLICY_MAX_ENTRIES),
        UserspaceMap(ENDPOINTS_MAP_NAME, *_ENDPOINT_SIZES, ENDPOINTS_MAX_ENTRIES),
    )


def pinned_hash_map(
    directory: Path, name: str, sizes: tuple[int, int], max_entries: int
) -> KernelMap:
    """The hash map pinned at ``<directory>/<name>``: opened when pinned (its layout must
    match ``bpf/cp_maps.h``), else created with flags 0 and pinned."""
    ensure_bpffs()
    os.makedirs(directory, exist_ok=True)
    return pinned_map(directory, name, BPF_MAP_TYPE_HASH, sizes, max_entries)


def pinned_policy_maps(pin_dir: Path) -> PolicyMaps:
    """``cp_policy`` and ``cp_endpoints`` pinned under ``pin_dir`` (an absolute bpffs path)."""
    directory = pin_dir.absolute()
    policy = pinned_hash_map(directory, POLICY_MAP_NAME, _POLICY_SIZES, POLICY_MAX_ENTRIES)
    try:
        endpoints = pinned_hash_map(
            directory, ENDPOINTS_MAP_NAME, _ENDPOINT_SIZES, ENDPOINTS_MAX_ENTRIES
        )
    except BaseException:
        policy.close()
        raise
    return PolicyMaps(policy, endpoints)


def close_policy_maps(maps: PolicyMaps) -> None:
    for map_ in (maps.policy, maps.endpoints):
        if isinstance(map_, KernelMap):
            map_.close()


def unpin_policy_maps(maps: PolicyMaps, pin_dir: Path) -> int:
    """``--cleanup-on-exit``: remove the two pins; returns how many were removed."""
    removed = 0
    for map_ in (maps.policy, maps.endpoints):
        if isinstance(map_, KernelMap):
            try:
                (pin_dir / map_.name).unlink()
                removed += 1
            except FileNotFoundError:
                pass
    return removed
