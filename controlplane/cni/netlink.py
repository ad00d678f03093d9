"""Netlink work of the CNI plugin (pyroute2): the veth pair, pod addressing and routes.

Pod side, Cilium style: the pod's address is a /32 (/128) on ``CNI_IFNAME``, with a link
route to a link-local gateway (169.254.1.1, fe80::1) and a default route via it; the
gateway's neighbour entry is made permanent with the host-side veth's MAC, so no address
is needed on the host side and nothing answers ARP for the gateway. Host side: a link
route to the pod's /32 (/128) over the host veth.

Namespaces are entered with ``setns(CLONE_NEWNET)`` only (``loader.in_netns``): netlink
sockets opened inside stay bound to that namespace.
"""

from __future__ import annotations

import errno
import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from ipaddress import ip_address
from typing import Any, Final

from controlplane.datapath.loader import in_netns
from controlplane.model import IPAddress

__all__ = [
    "GATEWAY_V4",
    "GATEWAY_V6",
    "NetlinkFailure",
    "PodLink",
    "PodState",
    "delete_host_veth",
    "delete_pod_interface",
    "gateway_for",
    "host_veth_name",
    "inspect_pod",
    "link_exists",
    "setup_pod",
]

GATEWAY_V4: Final = ip_address("169.254.1.1")
GATEWAY_V6: Final = ip_address("fe80::1")
_AF_INET: Final = 2
_AF_INET6: Final = 10
_NUD_PERMANENT: Final = 0x80
_RT_SCOPE_LINK: Final = 253
_RTPROT_STATIC: Final = 4


class NetlinkFailure(RuntimeError):
    """A netlink operation failed (message says which)."""


def _hash(container_id: str) -> str:
    return hashlib.sha256(container_id.encode()).hexdigest()[:11]


def host_veth_name(container_id: str) -> str:
    """``cp`` + 11 hex chars of the container id's hash (13 chars, under IFNAMSIZ)."""
    return "cp" + _hash(container_id)


def _temp_peer_name(container_id: str) -> str:
    return "tmp" + _hash(container_id)


def gateway_for(ip: IPAddress) -> IPAddress:
    return GATEWAY_V6 if ip.version == 6 else GATEWAY_V4


@contextmanager
def _ipr(netns: str | None = None) -> Iterator[Any]:
    from pyroute2 import IPRoute

    with in_netns(netns):
        ipr = IPRoute()
    try:
        yield ipr
    finally:
        ipr.close()


def _index(ipr: Any, ifname: str) -> int | None:
    found = ipr.link_lookup(ifname=ifname)
    return int(found[0]) if found else None


def _mac(ipr: Any, index: int) -> str:
    return str(ipr.get_links(index)[0].get_attr("IFLA_ADDRESS"))


def link_exists(ifname: str, netns: str | None = None) -> bool:
    with _ipr(netns) as ipr:
        return _index(ipr, ifname) is not None


@dataclass(frozen=True, slots=True)
class PodLink:
    host_ifname: str
    host_mac: str
    pod_ifname: str
    pod_mac: str
    ip: IPAddress
    gateway: IPAddress


def setup_pod(
    container_id: str,
    netns: str,
    ifname: str,
    ip: IPAddress,
    *,
    mtu: int | None = None,
) -> PodLink:
    """Create the veth pair, move the peer into ``netns`` as ``ifname``, address and route
    both sides. A leftover host veth of the same container (a retried ADD) is replaced.
    On failure whatever was created is removed again."""
    from pyroute2 import NetlinkError

    host = host_veth_name(container_id)
    temp = _temp_peer_name(container_id)
    gateway = gateway_for(ip)
    family = _AF_INET6 if ip.version == 6 else _AF_INET
    plen = 128 if ip.version == 6 else 32
    try:
        ns_fd = os.open(netns if "/" in netns else f"/run/netns/{netns}", os.O_RDONLY)
    except OSError as e:
        raise NetlinkFailure(f"open netns {netns}: {e.strerror}") from None
    try:
        with _ipr() as ipr:
            for stale in (host, temp):
                if (idx := _index(ipr, stale)) is not None:
                    ipr.link("del", index=idx)
            with _ipr(netns) as pipr:
                if _index(pipr, ifname) is not None:
                    raise NetlinkFailure(f"interface {ifname} already exists in {netns}")
            extra: dict[str, Any] = {} if mtu is None else {"mtu": mtu}
            try:
                ipr.link("add", ifname=host, kind="veth", peer={"ifname": temp, **extra}, **extra)
            except NetlinkError as e:
                raise NetlinkFailure(f"create veth {host}: {e}") from e
            try:
                host_idx = _index(ipr, host)
                temp_idx = _index(ipr, temp)
                if host_idx is None or temp_idx is None:
                    raise NetlinkFailure(f"veth {host} vanished after creation")
                host_mac = _mac(ipr, host_idx)
                ipr.link("set", index=temp_idx, net_ns_fd=ns_fd)
                with _ipr(netns) as pipr:
                    pidx = _index(pipr, temp)
                    if pidx is None:
                        raise NetlinkFailure(f"{temp} did not arrive in {netns}")
                    pipr.link("set", index=pidx, ifname=ifname)
                    pipr.link("set", index=pidx, state="up")
                    if (lo := _index(pipr, "lo")) is not None:
                        pipr.link("set", index=lo, state="up")
                    pod_mac = _mac(pipr, pidx)
                    pipr.addr("add", index=pidx, address=str(ip), prefixlen=plen, family=family)
                    pipr.route(
                        "replace",
                        dst=f"{gateway}/{plen}",
                        oif=pidx,
                        scope=_RT_SCOPE_LINK,
                        family=family,
                        proto=_RTPROT_STATIC,
                    )
                    pipr.neigh(
                        "replace",
                        dst=str(gateway),
                        lladdr=host_mac,
                        ifindex=pidx,
                        state=_NUD_PERMANENT,
                        family=family,
                    )
                    pipr.route(
                        "replace",
                        dst="::/0" if ip.version == 6 else "0.0.0.0/0",
                        gateway=str(gateway),
                        oif=pidx,
                        family=family,
                        proto=_RTPROT_STATIC,
                    )
                ipr.link("set", index=host_idx, state="up")
                ipr.route(
                    "replace",
                    dst=f"{ip}/{plen}",
                    oif=host_idx,
                    scope=_RT_SCOPE_LINK,
                    family=family,
                    proto=_RTPROT_STATIC,
                )
            except NetlinkError as e:
                _quiet_delete(ipr, host)
                raise NetlinkFailure(f"set up {host} / {netns}:{ifname}: {e}") from e
            except BaseException:
                _quiet_delete(ipr, host)
                raise
    finally:
        os.close(ns_fd)
    return PodLink(host, host_mac, ifname, pod_mac, ip, gateway)


def _quiet_delete(ipr: Any, ifname: str) -> None:
    from pyroute2 import NetlinkError

    if (idx := _index(ipr, ifname)) is not None:
        with suppress(NetlinkError):
            ipr.link("del", index=idx)


def delete_host_veth(container_id: str) -> bool:
    """Delete the container's host veth (its peer goes with it). False when absent."""
    name = host_veth_name(container_id)
    with _ipr() as ipr:
        return _delete_link(ipr, name, name)


def delete_pod_interface(netns: str, ifname: str) -> bool:
    """Delete ``ifname`` inside ``netns`` if both exist (a peer left without host veth)."""
    path = netns if "/" in netns else f"/run/netns/{netns}"
    if not os.path.exists(path):
        return False
    with _ipr(netns) as ipr:
        return _delete_link(ipr, ifname, f"{netns}:{ifname}")


def _delete_link(ipr: Any, ifname: str, what: str) -> bool:
    """Delete ``ifname``; False when it does not exist (or vanished meanwhile)."""
    from pyroute2 import NetlinkError

    idx = _index(ipr, ifname)
    if idx is None:
        return False
    try:
        ipr.link("del", index=idx)
    except NetlinkError as e:
        if e.code == errno.ENODEV:
            return False
        raise NetlinkFailure(f"delete {what}: {e}") from e
    return True


@dataclass(frozen=True, slots=True)
class PodState:
    exists: bool
    up: bool
    addresses: frozenset[IPAddress]
    default_gateway: IPAddress | None


def inspect_pod(netns: str, ifname: str) -> PodState:
    """What ``ifname`` in ``netns`` looks like (exists, up, addresses, default gateway)."""
    with _ipr(netns) as ipr:
        idx = _index(ipr, ifname)
        if idx is None:
            return PodState(False, False, frozenset(), None)
        link = ipr.get_links(idx)[0]
        up = link.get_attr("IFLA_OPERSTATE") in ("UP", "UNKNOWN") or bool(link["flags"] & 1)
        addrs = frozenset(ip_address(a.get_attr("IFA_ADDRESS")) for a in ipr.get_addr(index=idx))
        gateway: IPAddress | None = None
        for family in (_AF_INET, _AF_INET6):
            for r in ipr.route("dump", family=family):
                if r.get("dst_len") == 0 and r.get_attr("RTA_OIF") == idx:
                    gw = r.get_attr("RTA_GATEWAY")
                    if gw is not None and gateway is None:
                        gateway = ip_address(gw)
        return PodState(True, up, addrs, gateway)
