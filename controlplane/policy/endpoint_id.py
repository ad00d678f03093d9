"""The numeric endpoint id the tc program keys its policy by (``cp_cfg.endpoint_id``).

An endpoint's id is its IP's offset inside the node's pod CIDR: stable for as long as
the endpoint keeps its IP, unique on the node (the node's endpoints all lie in its CIDR),
never 0 (the network address is never handed out) and computable by anyone who knows the
CIDR. It must fit the datapath's u32, so a pod CIDR with more than 2**32 addresses (an
IPv6 prefix shorter than /96) is refused.
"""

from __future__ import annotations

from typing import Final

from controlplane.model import IPAddress, IPNetwork

MAX_CIDR_ADDRESSES: Final = 2**32


class EndpointIDError(ValueError):
    """The CIDR is too large for u32 endpoint ids, or the IP is not in it."""


def check_cidr(cidr: IPNetwork) -> None:
    if cidr.num_addresses > MAX_CIDR_ADDRESSES:
        raise EndpointIDError(
            f"pod CIDR {cidr} has {cidr.num_addresses} addresses; endpoint ids are u32 "
            f"offsets, so at most 2**32 (IPv6: /96 or longer) are supported"
        )


def endpoint_id(cidr: IPNetwork, ip: IPAddress) -> int:
    """``ip``'s offset in ``cidr``; raises :class:`EndpointIDError`."""
    check_cidr(cidr)
    if ip.version != cidr.version or ip not in cidr:
        raise EndpointIDError(f"{ip} is not in the pod CIDR {cidr}")
    return int(ip) - int(cidr.network_address)
