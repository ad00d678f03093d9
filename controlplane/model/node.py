"""Nodes: :class:`Node`, a node as its agent publishes it (name, addresses, pod CIDRs,
boot id).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Final, Self

from controlplane.model._checks import (
    _as_tuple,
    _build,
    _list_field,
    _parse_item,
    _record,
    _set,
    _short,
    _str_field,
)
from controlplane.model.addresses import (
    IPAddress,
    IPNetwork,
    _check_address,
    _check_network,
    parse_cidr,
    parse_ip,
)
from controlplane.model.errors import ModelError
from controlplane.model.names import NodeName, _check_dns_subdomain

__all__ = [
    "Node",
]

_BOOT_ID_RE: Final = re.compile(r"[A-Za-z0-9._-]*")
_FLOWS_ADDRESS_RE: Final = re.compile(r"(?:[A-Za-z0-9.-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\]):\d{1,5}")

_BOOT_ID_MAX: Final = 128


@dataclass(frozen=True, slots=True, kw_only=True)
class Node:
    """A node as published by its agent.

    ``ips`` (primary first) and ``pod_cidrs`` are tuples without duplicates; lists are
    accepted and converted. ``boot_id`` is 0..128 characters of ``[A-Za-z0-9._-]`` (a
    kernel boot UUID; empty when unknown).
    """

    name: NodeName
    ips: tuple[IPAddress, ...] = ()
    pod_cidrs: tuple[IPNetwork, ...] = ()
    boot_id: str = ""
    flows_address: str = ""
    """HOST:PORT of the node's Observer API (its flow server, issue 14) for a relay; empty
    when it serves none over TCP. Stored only when set."""

    def __post_init__(self) -> None:
        _check_dns_subdomain("node name", self.name)
        ips = _as_tuple("node ips", self.ips)
        for ip in ips:
            _check_address("node ip", ip)
        if len(set(ips)) != len(ips):
            raise ModelError("node ips contain duplicates")
        cidrs = _as_tuple("node pod_cidrs", self.pod_cidrs)
        for cidr in cidrs:
            _check_network("node pod cidr", cidr)
        if len(set(cidrs)) != len(cidrs):
            raise ModelError("node pod_cidrs contain duplicates")
        if not isinstance(self.boot_id, str):
            raise ModelError(f"node boot_id: expected str, got {type(self.boot_id).__name__}")
        if len(self.boot_id) > _BOOT_ID_MAX or not _BOOT_ID_RE.fullmatch(self.boot_id):
            raise ModelError(f"node boot_id: invalid {_short(self.boot_id)}")
        if not isinstance(self.flows_address, str) or (
            self.flows_address and not _FLOWS_ADDRESS_RE.fullmatch(self.flows_address)
        ):
            raise ModelError(
                f"node flows_address: want HOST:PORT, got {_short(self.flows_address)}"
            )
        _set(self, "ips", ips)
        _set(self, "pod_cidrs", cidrs)

    def to_dict(self) -> dict[str, Any]:
        out = {
            "name": str(self.name),
            "ips": [str(ip) for ip in self.ips],
            "pod_cidrs": [str(c) for c in self.pod_cidrs],
            "boot_id": self.boot_id,
        }
        if self.flows_address:
            out["flows_address"] = self.flows_address
        return out

    @classmethod
    def from_dict(cls, data: object) -> Self:
        k = "Node"
        d = _record(k, data)
        name = _str_field(k, d, "name")
        ips = tuple(_parse_item(k, "ips", parse_ip, v) for v in _list_field(k, d, "ips"))
        cidrs = tuple(
            _parse_item(k, "pod_cidrs", parse_cidr, v) for v in _list_field(k, d, "pod_cidrs")
        )
        boot_id = _str_field(k, d, "boot_id")
        flows = _str_field(k, d, "flows_address") if "flows_address" in d else ""
        return _build(
            k, cls, name=NodeName(name), ips=ips, pod_cidrs=cidrs, boot_id=boot_id,
            flows_address=flows,
        )  # fmt: skip
