"""RouteManager against the kernel, in a scratch network namespace this test creates.

Needs root and iproute2 ``ip`` (skipped with the reason printed otherwise).
"""

from __future__ import annotations

import os
import secrets
import subprocess
from collections.abc import Iterator
from ipaddress import ip_address, ip_network

import pytest

from controlplane.datapath.routes import RTPROT_CP, RouteManager
from controlplane.model import IPAddress, IPNetwork
from tests.helpers import ip, no_privilege, requires, tools_unmet

pytestmark = requires(
    no_privilege("not root (network namespaces and routes need CAP_NET_ADMIN)")
    if os.geteuid() != 0
    else tools_unmet("ip")
)

TABLE = 100


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"cprt-{secrets.token_hex(4)}"
    ip("netns", "add", name)
    try:
        ip("-n", name, "link", "set", "lo", "up")
        ip("-n", name, "link", "add", "uplink", "type", "veth", "peer", "name", "uplink-peer")
        ip("-n", name, "link", "set", "uplink-peer", "up")
        ip("-n", name, "addr", "add", "10.99.0.1/24", "dev", "uplink")
        ip("-n", name, "addr", "add", "fd99::1/64", "dev", "uplink", "nodad")
        ip("-n", name, "link", "set", "uplink", "up")
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)


def _routes(netns: str, table: int | str, family: str = "-4") -> set[str]:
    out = ip("-n", netns, family, "route", "show", "table", str(table))
    return {" ".join(line.split()) for line in out.splitlines() if line.strip()}


def net(text: str) -> IPNetwork:
    return ip_network(text)


def addr(text: str) -> IPAddress:
    return ip_address(text)


@pytest.mark.parametrize("table", [254, TABLE])
def test_sync_adds_replaces_and_deletes_only_its_own(netns: str, table: int) -> None:
    foreign = "10.30.9.0/24 via 10.99.0.9 dev uplink"
    ip("-n", netns, "route", "add", *foreign.split(), "table", str(table))
    manager = RouteManager(table=table, netns=netns)

    first = manager.sync({net("10.30.1.0/24"): addr("10.99.0.2"),
                          net("10.30.2.0/24"): addr("10.99.0.3"),
                          net("fd30:0:0:1::/64"): addr("fd99::2")})  # fmt: skip
    assert sorted(map(str, first.added)) == ["10.30.1.0/24", "10.30.2.0/24", "fd30:0:0:1::/64"]
    assert (first.replaced, first.deleted, first.errors, first.conflicts) == ([], [], {}, [])
    proto = f"proto {RTPROT_CP}"
    v4 = _routes(netns, table)
    assert f"10.30.1.0/24 via 10.99.0.2 dev uplink {proto}" in v4
    assert f"10.30.2.0/24 via 10.99.0.3 dev uplink {proto}" in v4
    assert any(r.startswith(f"fd30:0:0:1::/64 via fd99::2 dev uplink {proto}")
               for r in _routes(netns, table, "-6"))  # fmt: skip
    assert foreign in v4

    # the same again: nothing to do
    again = manager.sync({net("10.30.1.0/24"): addr("10.99.0.2"),
                          net("10.30.2.0/24"): addr("10.99.0.3"),
                          net("fd30:0:0:1::/64"): addr("fd99::2")})  # fmt: skip
    assert not again.changed and again.unchanged == 3

    # a node moved (new gateway), one left, the v6 one left, the foreign prefix is wanted too
    second = manager.sync({net("10.30.1.0/24"): addr("10.99.0.4"),
                           net("10.30.9.0/24"): addr("10.99.0.5")})  # fmt: skip
    assert [str(n) for n in second.replaced] == ["10.30.1.0/24"]
    assert sorted(map(str, second.deleted)) == ["10.30.2.0/24", "fd30:0:0:1::/64"]
    assert [str(n) for n in second.conflicts] == ["10.30.9.0/24"]  # not ours: left alone
    v4 = _routes(netns, table)
    assert f"10.30.1.0/24 via 10.99.0.4 dev uplink {proto}" in v4
    assert not any(r.startswith("10.30.2.0/24") for r in v4)
    assert foreign in v4
    assert not any("fd30" in r for r in _routes(netns, table, "-6"))
    assert manager.owned() == {net("10.30.1.0/24"): addr("10.99.0.4")}

    # an unreachable gateway is an error for that prefix only
    third = manager.sync({net("10.30.1.0/24"): addr("10.99.0.4"),
                          net("10.30.3.0/24"): addr("192.0.2.77")})  # fmt: skip
    assert list(map(str, third.errors)) == ["10.30.3.0/24"] and third.unchanged == 1

    # another manager (other proto) in the same table does not see or touch ours
    other = RouteManager(table=table, proto=RTPROT_CP + 1, netns=netns)
    assert other.owned() == {}
    assert other.flush() == 0
    assert manager.flush() == 1
    assert _routes(netns, table) >= {foreign}
    assert not any(proto in r for r in _routes(netns, table))


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        RouteManager(proto=0)
    with pytest.raises(ValueError):
        RouteManager(table=0)


async def test_sync_async_from_an_event_loop(netns: str) -> None:
    manager = RouteManager(netns=netns)
    result = await manager.sync_async({net("10.31.0.0/24"): addr("10.99.0.2")})
    assert [str(n) for n in result.added] == ["10.31.0.0/24"]
    assert (await manager.sync_async({})).deleted == [net("10.31.0.0/24")]
