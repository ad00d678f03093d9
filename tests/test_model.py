"""Tests for controlplane.model: labels, identities, ranges, endpoints, nodes, pools, leases."""

from __future__ import annotations

import ipaddress
import itertools
from collections.abc import Callable
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from controlplane import codec
from controlplane.model import (
    IDENTITY_HEALTH,
    IDENTITY_HOST,
    IDENTITY_INGRESS,
    IDENTITY_INIT,
    IDENTITY_KUBE_APISERVER,
    IDENTITY_REMOTE_NODE,
    IDENTITY_UNMANAGED,
    IDENTITY_WORLD,
    KEY_COMPONENT_MAX_BYTES,
    RESERVED_IDENTITIES,
    RESERVED_IDENTITY_RANGE,
    SOURCE_UNSPEC,
    CIDRPool,
    Endpoint,
    EndpointID,
    EndpointRecord,
    Identity,
    IdentityRange,
    InvalidLabel,
    InvalidRecord,
    IPLease,
    Label,
    Labels,
    ModelError,
    Node,
    NodeFields,
    NodeName,
    NumericIdentity,
    cluster_identity_range,
    ip_identity_from_dict,
    ip_identity_from_record,
    is_reserved_identity,
    is_usable_ip,
    parse_canonical_ip,
    parse_cidr,
    parse_endpoint_id,
    parse_ip,
    parse_node_name,
    parse_numeric_identity,
    reserved_identity_for,
    reserved_labels,
    router_ip,
    shard_identity_ranges,
    usable_ip_count,
    usable_ips,
)

# ---------------------------------------------------------------------------------------
# strategies
# ---------------------------------------------------------------------------------------

sources = st.sampled_from(["k8s", "reserved", "unspec", "container", "any"]) | st.from_regex(
    r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True
)
names = st.from_regex(r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?", fullmatch=True)
dns_labels = st.from_regex(r"[a-z0-9]([-a-z0-9]{0,10}[a-z0-9])?", fullmatch=True)
prefixes = st.lists(dns_labels, min_size=1, max_size=4).map(".".join)
keys = names | st.tuples(prefixes, names).map("/".join)
values = st.just("") | names


@st.composite
def cidr_labels(draw: st.DrawFn) -> Label:
    address = draw(st.ip_addresses())
    prefix_len = draw(st.integers(0, address.max_prefixlen))
    network = ipaddress.ip_network((address, prefix_len), strict=False)
    return Label("cidr", str(network))


labels_st = st.builds(Label, sources, keys, values) | cidr_labels()


@st.composite
def label_sets(draw: st.DrawFn) -> Labels:
    items = draw(st.lists(labels_st, max_size=8))
    by_key = {(label.source, label.key): label for label in items}  # no conflicting values
    return Labels(tuple(by_key.values()))


def node_names() -> st.SearchStrategy[NodeName]:
    return st.lists(dns_labels, min_size=1, max_size=3).map(".".join).map(NodeName)


def addresses() -> st.SearchStrategy[IPv4Address | IPv6Address]:
    return st.ip_addresses()


@st.composite
def endpoints(draw: st.DrawFn) -> Endpoint:
    ip = draw(addresses())
    return Endpoint(
        ip=ip,
        identity=NumericIdentity(draw(st.integers(1, 2**32 - 1))),
        node=draw(node_names()),
        host_ip=draw(addresses()),
        name=draw(node_names()),
        namespace=draw(dns_labels),
    )


@st.composite
def networks(draw: st.DrawFn) -> IPv4Network | IPv6Network:
    address = draw(addresses())
    prefix_len = draw(st.integers(0, address.max_prefixlen))
    return ipaddress.ip_network((address, prefix_len), strict=False)


@st.composite
def nodes(draw: st.DrawFn) -> Node:
    return Node(
        name=draw(node_names()),
        ips=tuple(draw(st.lists(addresses(), max_size=3, unique=True))),
        pod_cidrs=tuple(draw(st.lists(networks(), max_size=3, unique=True))),
        boot_id=draw(st.from_regex(r"[A-Za-z0-9._-]{0,40}", fullmatch=True)),
    )


@st.composite
def identity_ranges(draw: st.DrawFn) -> IdentityRange:
    first = draw(st.integers(0, 2**32 - 1))
    last = draw(st.integers(first, min(2**32 - 1, first + 10**6)))
    return IdentityRange(first, last)


@st.composite
def pools(draw: st.DrawFn) -> CIDRPool:
    network = draw(networks())
    mask = draw(st.integers(network.prefixlen, network.max_prefixlen))
    return CIDRPool(network, mask, draw(dns_labels))


identities = st.builds(Identity, st.integers(1, 2**32 - 1).map(NumericIdentity), label_sets())
leases = st.builds(
    IPLease,
    node=node_names(),
    ip=addresses(),
    owner=st.from_regex(r"[\x21-\x7e]{1,40}", fullmatch=True).map(EndpointID),
)

# every model type, with a strategy for valid instances
MODEL_TYPES: list[tuple[type[Any], st.SearchStrategy[Any]]] = [
    (Label, labels_st),
    (Labels, label_sets()),
    (Identity, identities),
    (IdentityRange, identity_ranges()),
    (Endpoint, endpoints()),
    (Node, nodes()),
    (CIDRPool, pools()),
    (IPLease, leases),
]
TYPE_IDS = [t.__name__ for t, _ in MODEL_TYPES]

# arbitrary msgpack/JSON-ish garbage (plus types msgpack can produce: bytes, floats, tuples)
leaves = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(-(2**70), 2**70)
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=10)
    | st.sampled_from(
        [
            "",
            "10.0.0.1",
            "::1",
            "fe80::1%eth0",
            "10.0.0.0/24",
            "10.0.0.1/24",
            "k8s:app=web",
            "n1",
            "default",
            "-1",
            "00",
            "sha256:",
        ]
    )
)
garbage = st.recursive(
    leaves,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.lists(inner, max_size=3).map(tuple)
        | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=15,
)


def is_plain(value: object) -> bool:
    """Only str, int, list and dict (with str keys), recursively."""
    if isinstance(value, bool):
        return False
    if isinstance(value, str | int):
        return True
    if isinstance(value, list):
        return all(is_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and is_plain(v) for k, v in value.items())
    return False


# ---------------------------------------------------------------------------------------
# Label / Labels
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "source", "key", "value"),
    [
        ("k8s:app=web", "k8s", "app", "web"),
        ("app=web", SOURCE_UNSPEC, "app", "web"),
        ("reserved:host", "reserved", "host", ""),
        ("k8s:app=", "k8s", "app", ""),
        ("app", SOURCE_UNSPEC, "app", ""),
        ("k8s:app.kubernetes.io/name=web-1", "k8s", "app.kubernetes.io/name", "web-1"),
        (
            "k8s:io.kubernetes.pod.namespace=default",
            "k8s",
            "io.kubernetes.pod.namespace",
            "default",
        ),
        ("cidr:10.0.0.0/8", "cidr", "10.0.0.0/8", ""),
        ("cidr:2001:db8::/32", "cidr", "2001:db8::/32", ""),
        ("cidr:::/0", "cidr", "::/0", ""),
        ("Container:A_b.c=X", None, None, None),
    ],
)
def test_label_parse(text: str, source: str | None, key: str, value: str) -> None:
    if source is None:
        with pytest.raises(InvalidLabel):
            Label.parse(text)
        return
    label = Label.parse(text)
    assert (label.source, label.key, label.value) == (source, key, value)
    assert Label.parse(label.canonical()) == label


@pytest.mark.parametrize(
    "text",
    [
        "",
        "k8s:",
        ":app=web",
        "=web",
        "k8s:=web",
        "k8s:app=web=x",
        "k8s:app=we b",
        "k8s:app=web;",
        "k8s:-app=web",
        "k8s:app-=web",
        "k8s:a/b/c=web",
        "k8s:/app=web",
        "k8s:Example.com/app=web",
        "k8s:example.com/=web",
        "k8s:app=-web",
        "k8s:app=web\n",
        "K8S:app=web",
        "k8s_x:app=web",
        "k8s:ápp=web",
        "k8s:" + "a" * 64,
        "k8s:app=" + "v" * 64,
        "k8s:" + "a" * 254 + "/app",
        "cidr:10.0.0.1/8",
        "cidr:10.0.0.0",
        "cidr:10.0.0.0/33",
        "cidr:2001:DB8::/32",
        "cidr:10.0.0.0/255.0.0.0",
        "cidr:fe80::%eth0/64",
        "cidr:app",
    ],
)
def test_label_parse_rejects(text: str) -> None:
    with pytest.raises(InvalidLabel) as info:
        Label.parse(text)
    assert isinstance(info.value, ValueError)
    assert "\n" not in str(info.value)
    assert str(info.value)


def test_label_length_limits() -> None:
    Label("k8s", "a" * 63, "v" * 63)
    prefix = ".".join(["a" * 63] * 3 + ["b" * 61])
    assert len(prefix) == 253
    Label("k8s", f"{prefix}/{'n' * 63}")
    with pytest.raises(InvalidLabel):
        Label("k8s", f"{prefix}x/n")
    with pytest.raises(InvalidLabel):
        Label("k8s", "a" * 64)
    with pytest.raises(InvalidLabel):
        Label("k8s", "a", "v" * 64)


def test_label_rejects_wrong_types() -> None:
    with pytest.raises(InvalidLabel):
        Label("k8s", 1)  # type: ignore[arg-type]
    with pytest.raises(InvalidLabel):
        Labels(("k8s:app",))  # type: ignore[arg-type]
    with pytest.raises(InvalidLabel):
        Labels.from_strings("k8s:app")


def test_labels_set_semantics() -> None:
    a = Labels.parse("k8s:b=2;k8s:a=1")
    b = Labels.from_strings(["k8s:a=1", "k8s:b=2", "k8s:a=1"])
    assert a == b
    assert hash(a) == hash(b)
    assert len(a) == 2
    assert a.canonical() == "k8s:a=1;k8s:b=2"
    assert Label("k8s", "a", "1") in a
    assert a.issuperset(Labels.parse("k8s:a=1"))
    assert not a.issuperset(Labels.parse("k8s:a=2"))
    assert a.union(Labels.parse("unspec:c")).canonical() == "k8s:a=1;k8s:b=2;unspec:c"
    assert a.with_source("unspec") == Labels()
    # same key under different sources is allowed; one (source, key) with two values is not
    assert len(Labels.parse("k8s:app=web;container:app=web")) == 2
    with pytest.raises(InvalidLabel):
        Labels.parse("k8s:app=web;k8s:app=db")
    with pytest.raises(InvalidLabel):
        a.union(Labels.parse("k8s:a=3"))


def test_empty_labels() -> None:
    assert Labels.parse("") == Labels()
    assert Labels().canonical() == ""
    assert not Labels()
    assert Labels().key_component().startswith("sha256:")


@given(label_sets())
def test_canonical_round_trips(labels: Labels) -> None:
    canonical = labels.canonical()
    assert Labels.parse(canonical) == labels
    assert Labels.from_strings(labels.to_strings()) == labels
    assert canonical.isascii()
    # the order of the input does not matter
    assert Labels(tuple(reversed(labels.labels))) == labels


@given(label_sets(), label_sets())
def test_canonical_is_injective(a: Labels, b: Labels) -> None:
    if a != b:
        assert a.canonical() != b.canonical()
        assert a.key_component() != b.key_component()
    else:
        assert a.canonical() == b.canonical()


@given(labels_st, labels_st)
def test_single_label_canonical_is_injective(a: Label, b: Label) -> None:
    assert (a == b) == (a.canonical() == b.canonical())
    assert Label.parse(a.canonical()) == a


@given(label_sets())
def test_key_component(labels: Labels) -> None:
    component = labels.key_component()
    canonical = labels.canonical()
    assert "/" not in component
    assert component
    assert len(component.encode()) <= KEY_COMPONENT_MAX_BYTES
    if canonical and "/" not in canonical and len(canonical.encode()) <= KEY_COMPONENT_MAX_BYTES:
        assert component == canonical
    else:
        assert component.startswith("sha256:")
        assert len(component) == len("sha256:") + 64


def test_key_component_hashes_long_and_slashed_forms() -> None:
    short = Labels.parse("k8s:app=web")
    assert short.key_component() == "k8s:app=web"
    slashed = Labels.parse("k8s:app.kubernetes.io/name=web")
    assert slashed.key_component().startswith("sha256:")
    long = Labels.from_strings([f"k8s:key{i}=value{i}" for i in range(20)])
    assert len(long.canonical()) > KEY_COMPONENT_MAX_BYTES
    assert long.key_component().startswith("sha256:")
    assert Labels.parse("cidr:10.0.0.0/8").key_component().startswith("sha256:")
    # a canonical form that looks like a digest is itself hashed, so the two never collide
    looks_hashed = Labels.parse("sha256:abc")
    assert looks_hashed.key_component() != "sha256:abc"


# ---------------------------------------------------------------------------------------
# identities and ranges
# ---------------------------------------------------------------------------------------


def test_reserved_identities() -> None:
    expected = {
        IDENTITY_HOST: (1, "host"),
        IDENTITY_WORLD: (2, "world"),
        IDENTITY_UNMANAGED: (3, "unmanaged"),
        IDENTITY_HEALTH: (4, "health"),
        IDENTITY_INIT: (5, "init"),
        IDENTITY_REMOTE_NODE: (6, "remote-node"),
        IDENTITY_KUBE_APISERVER: (7, "kube-apiserver"),
        IDENTITY_INGRESS: (8, "ingress"),
    }
    assert set(RESERVED_IDENTITIES) == set(expected)
    for ident, (number, name) in expected.items():
        assert ident == number
        labels = Labels.parse(f"reserved:{name}")
        assert RESERVED_IDENTITIES[ident] == labels
        assert reserved_labels(number) == labels
        assert reserved_identity_for(labels) == ident
        assert is_reserved_identity(ident)
    assert reserved_labels(9) is None
    assert IdentityRange(1, 255) == RESERVED_IDENTITY_RANGE
    assert is_reserved_identity(255)
    assert not is_reserved_identity(256)
    assert not is_reserved_identity(0)
    with pytest.raises(TypeError):
        RESERVED_IDENTITIES[NumericIdentity(9)] = Labels()  # type: ignore[index]


def test_reserved_identity_for() -> None:
    assert reserved_identity_for(Labels.parse("reserved:host;k8s:node-role=worker")) == 1
    assert reserved_identity_for(Labels.parse("k8s:app=web")) is None
    assert reserved_identity_for(Labels()) is None
    assert reserved_identity_for(Labels.parse("reserved:world;k8s:app=web")) is None
    assert reserved_identity_for(Labels.parse("reserved:nonexistent")) is None
    assert reserved_identity_for(Labels.parse("k8s:host")) is None


def test_identity_range() -> None:
    r = IdentityRange(10, 19)
    assert r.size == 10
    assert r.contains(10) and r.contains(19)
    assert not r.contains(9) and not r.contains(20)
    assert list(r.as_range()) == list(range(10, 20))
    assert r.overlaps(IdentityRange(19, 30)) and not r.overlaps(IdentityRange(20, 30))
    assert IdentityRange(5, 5).size == 1
    cluster = cluster_identity_range()
    assert (cluster.first, cluster.last) == (256, 65535)
    for bad in [(2, 1), (-1, 5), (0, 2**32)]:
        with pytest.raises(ModelError):
            IdentityRange(*bad)
    with pytest.raises(ModelError):
        IdentityRange(True, 5)


@given(identity_ranges(), st.integers(1, 300))
def test_shard_ranges_disjoint_and_cover(total: IdentityRange, shards: int) -> None:
    if shards > total.size:
        with pytest.raises(ModelError):
            shard_identity_ranges(total, shards)
        return
    ranges = shard_identity_ranges(total, shards)
    assert len(ranges) == shards
    assert ranges[0].first == total.first
    assert ranges[-1].last == total.last
    for prev, cur in itertools.pairwise(ranges):
        assert cur.first == prev.last + 1  # contiguous, hence disjoint and in order
        assert not prev.overlaps(cur)
    assert sum(r.size for r in ranges) == total.size
    sizes = {r.size for r in ranges}
    assert max(sizes) - min(sizes) <= 1
    for r in ranges:
        assert r.size >= 1
        assert total.contains(r.first) and total.contains(r.last)


@given(st.integers(1, 64))
def test_shard_cluster_range_every_id_has_one_owner(shards: int) -> None:
    ranges = shard_identity_ranges(cluster_identity_range(), shards)
    for ident in (256, 257, 1000, 32768, 65534, 65535):
        assert sum(r.contains(ident) for r in ranges) == 1
    assert not any(r.contains(255) or r.contains(65536) for r in ranges)


def test_shard_ranges_errors() -> None:
    with pytest.raises(ModelError):
        shard_identity_ranges(IdentityRange(1, 3), 4)
    with pytest.raises(ModelError):
        shard_identity_ranges(IdentityRange(1, 3), 0)
    assert shard_identity_ranges(IdentityRange(1, 3), 3) == [
        IdentityRange(1, 1),
        IdentityRange(2, 2),
        IdentityRange(3, 3),
    ]


def test_identity() -> None:
    ident = Identity(NumericIdentity(300), Labels.parse("k8s:app=web"))
    assert not ident.is_reserved
    assert Identity(IDENTITY_HOST, RESERVED_IDENTITIES[IDENTITY_HOST]).is_reserved
    assert ident.to_dict() == {"id": 300, "labels": ["k8s:app=web"]}
    with pytest.raises(ModelError):
        Identity(NumericIdentity(0), Labels())
    with pytest.raises(ModelError):
        Identity(NumericIdentity(2**32), Labels())


# ---------------------------------------------------------------------------------------
# endpoints, nodes, leases
# ---------------------------------------------------------------------------------------


def _endpoint(**overrides: Any) -> Endpoint:
    fields: dict[str, Any] = {
        "ip": IPv4Address("10.0.1.5"),
        "identity": NumericIdentity(1000),
        "node": NodeName("node-1"),
        "host_ip": IPv4Address("192.168.0.10"),
        "name": "web-1",
        "namespace": "default",
    }
    fields.update(overrides)
    return Endpoint(**fields)


def test_endpoint() -> None:
    ep = _endpoint()
    assert ep.prefix_len == 32
    assert ep.prefix == IPv4Network("10.0.1.5/32")
    assert ep.endpoint_id == "default/web-1"
    v6 = _endpoint(ip=IPv6Address("fd00::5"))
    assert v6.prefix_len == 128
    assert _endpoint(ip=IPv4Address("10.0.1.0"), prefix_len=24).prefix == IPv4Network("10.0.1.0/24")
    assert Endpoint.from_dict(ep.to_dict()) == ep


@pytest.mark.parametrize(
    "overrides",
    [
        {"prefix_len": 33},
        {"prefix_len": -2},
        {"ip": IPv4Address("10.0.1.5"), "prefix_len": 24},
        {"identity": 0},
        {"node": "Node_1"},
        {"node": "a/b"},
        {"name": ""},
        {"namespace": "a.b"},
        {"ip": "10.0.0.1"},
        {"host_ip": IPv6Address("fe80::1%eth0")},
    ],
)
def test_endpoint_rejects(overrides: dict[str, Any]) -> None:
    with pytest.raises(ModelError):
        _endpoint(**overrides)


@given(addresses(), st.integers(0, 128))
def test_endpoint_host_bits_match_ipaddress(ip: IPv4Address | IPv6Address, prefix_len: int) -> None:
    if prefix_len > ip.max_prefixlen:
        with pytest.raises(ModelError, match="prefix length"):
            _endpoint(ip=ip, prefix_len=prefix_len)
        return
    try:
        ipaddress.ip_network((ip, prefix_len), strict=True)
    except ValueError:
        with pytest.raises(
            ModelError, match=f"^endpoint ip {ip} has host bits set for /{prefix_len}$"
        ):
            _endpoint(ip=ip, prefix_len=prefix_len)
    else:
        assert _endpoint(ip=ip, prefix_len=prefix_len).prefix_len == prefix_len


def test_endpoint_names_checked_every_time() -> None:
    # the name checks are cached; a cached verdict must still raise with its own field name
    for _ in range(2):
        with pytest.raises(
            ModelError, match=r"^endpoint node: not a DNS-1123 subdomain: 'Node_1'$"
        ):
            _endpoint(node="Node_1")
        with pytest.raises(
            ModelError, match=r"^endpoint name: not a DNS-1123 subdomain: 'Node_1'$"
        ):
            _endpoint(name="Node_1")
        with pytest.raises(ModelError, match=r"^endpoint namespace: not a DNS-1123 label: 'a\.b'$"):
            _endpoint(namespace="a.b")
        assert _endpoint(node="node-1", namespace="default").node == "node-1"


def test_endpoint_from_dict_messages() -> None:
    good = _endpoint().to_dict()
    cases: list[tuple[dict[str, Any], str]] = [
        (
            {**good, "ip": "10.0.1.5", "prefix_len": 24},
            "Endpoint: endpoint ip 10.0.1.5 has host bits set for /24",
        ),
        ({**good, "ip": "10.0.1.256"}, "Endpoint: field 'ip': invalid IP address '10.0.1.256'"),
        (
            {**good, "host_ip": b"x"},
            "Endpoint: field 'host_ip': Endpoint: field 'host_ip': expected str, got bytes",
        ),
        ({k: v for k, v in good.items() if k != "node"}, "Endpoint: missing field 'node'"),
        ({**good, "identity": True}, "Endpoint: field 'identity': expected int, got bool"),
        ({**good, "identity": 0}, "Endpoint: endpoint identity: 0 outside 1..4294967295"),
        ({**good, "namespace": "A"}, "Endpoint: endpoint namespace: not a DNS-1123 label: 'A'"),
        ({**good, "prefix_len": -1}, ""),
    ]
    for record, message in cases:
        if not message:
            assert Endpoint.from_dict(record) == _endpoint()
            continue
        with pytest.raises(InvalidRecord) as info:
            Endpoint.from_dict(record)
        assert str(info.value) == message
    with pytest.raises(InvalidRecord, match=r"^Endpoint: expected a dict, got list$"):
        Endpoint.from_dict([])


def test_node() -> None:
    node = Node(
        name=NodeName("node-1"),
        ips=(IPv4Address("192.168.0.10"), IPv6Address("fd00::10")),
        pod_cidrs=(IPv4Network("10.0.1.0/24"),),
        boot_id="3f1c2b9e-1c1d-4c1a-9a8f-0d7e3f1a2b3c",
    )
    assert Node.from_dict(node.to_dict()) == node
    assert Node(name=NodeName("n"), ips=[IPv4Address("1.2.3.4")]).ips == (  # type: ignore[arg-type]
        IPv4Address("1.2.3.4"),
    )
    with pytest.raises(ModelError):
        Node(name=NodeName("n"), ips=(IPv4Address("1.2.3.4"), IPv4Address("1.2.3.4")))
    with pytest.raises(ModelError):
        Node(name=NodeName("n"), boot_id="has space")
    with pytest.raises(ModelError):
        Node(name=NodeName(""))


def test_ip_lease() -> None:
    lease = IPLease(node=NodeName("n1"), ip=IPv4Address("10.0.1.2"), owner=EndpointID("ns/pod"))
    assert lease.to_dict() == {"node": "n1", "ip": "10.0.1.2", "owner": "ns/pod"}
    assert IPLease.from_dict(lease.to_dict()) == lease
    with pytest.raises(ModelError):
        IPLease(node=NodeName("n1"), ip=IPv4Address("10.0.1.2"), owner=EndpointID(""))


def test_parse_helpers() -> None:
    assert parse_ip("10.0.0.1") == IPv4Address("10.0.0.1")
    assert parse_ip("2001:DB8::1") == IPv6Address("2001:db8::1")
    assert parse_cidr("10.0.0.0/24") == IPv4Network("10.0.0.0/24")
    assert parse_numeric_identity("65535") == 65535
    assert parse_node_name("node-1.example") == "node-1.example"
    assert parse_endpoint_id("ns/pod") == "ns/pod"
    bad: list[tuple[Callable[[object], object], object]] = [
        (parse_ip, "10.0.0.256"),
        (parse_ip, "fe80::1%eth0"),
        (parse_ip, 167772161),
        (parse_ip, "010.0.0.1"),
        (parse_cidr, "10.0.0.1/24"),
        (parse_cidr, "10.0.0.0"),
        (parse_cidr, None),
        (parse_numeric_identity, "0"),
        (parse_numeric_identity, "007"),
        (parse_numeric_identity, "+7"),
        (parse_numeric_identity, " 7"),
        (parse_numeric_identity, "4294967296"),
        (parse_numeric_identity, "99999999999999999999"),
        (parse_numeric_identity, 7),
        (parse_node_name, "Node"),
        (parse_node_name, "a/b"),
        (parse_endpoint_id, "a b"),
        (parse_endpoint_id, ""),
    ]
    for parse, text in bad:
        with pytest.raises(InvalidRecord):
            parse(text)


# strings near the edge of what the IPv4 and IPv6 parsers accept
_octets = (
    st.integers(0, 300).map(str)
    | st.tuples(st.integers(0, 300), st.integers(2, 4)).map(lambda t: str(t[0]).zfill(t[1]))
    | st.sampled_from(
        [
            "",
            "\u0661",
            "\u0661\u0662",
            "\uff11",
            "\u00b2",
            "0x1",
            "+1",
            "-1",
            " 1",
            "1 ",
            "1e1",
            "a",
            "\x00",
        ]
    )
)
_dotted = st.lists(_octets, min_size=1, max_size=6).map(".".join)
_noise = st.sampled_from(["", " ", "\n", "\x00", "/32", "%eth0", ".", ":", "\ud800", "::ffff:"])
_ipv6_texts = st.ip_addresses(v=6).flatmap(
    lambda a: st.sampled_from([str(a), a.exploded, str(a).upper(), a.exploded.replace(":0", ":")])
)
ip_texts = (
    st.text(max_size=20)
    | st.text(st.characters(codec=None) | st.characters(categories=["Cs"]), max_size=12)
    | st.tuples(_noise, _dotted, _noise).map("".join)
    | st.ip_addresses(v=4).map(str)
    | _ipv6_texts
    | st.tuples(_ipv6_texts, _noise).map("".join)
    | st.tuples(st.just("::ffff:"), _dotted).map("".join)
)


def _reference_ip(text: str) -> IPv4Address | IPv6Address | None:
    """What parse_ip accepts, spelled with ipaddress alone."""
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, IPv6Address) and address.scope_id is not None:
        return None
    return address


@given(ip_texts)
@example("1.2.3.4")
@example("0.0.0.0")
@example("255.255.255.255")
@example("01.2.3.4")
@example("1.2.3.04")
@example("1.2.3.00")
@example("256.1.1.1")
@example("1.2.3")
@example("1.2.3.4.5")
@example("1..3.4")
@example(" 1.2.3.4")
@example("1.2.3.4 ")
@example("1.2.3.4\n")
@example("1.2.3.4\x00")
@example("\x001.2.3.4")
@example("\u0661.2.3.4")
@example("1.2.3.4/32")
@example("0x1.2.3.4")
@example("\ud800")
@example("::ffff:1.2.3.4")
@example("::ffff:01.2.3.4")
@example("fe80::1%eth0")
@example("2001:DB8::1")
def test_parse_ip_matches_ipaddress(text: str) -> None:
    expected = _reference_ip(text)
    if expected is None:
        with pytest.raises(InvalidRecord):
            parse_ip(text)
        with pytest.raises(InvalidRecord):
            parse_canonical_ip(text)
        return
    got = parse_ip(text)
    assert type(got) is type(expected)
    assert got == expected
    if str(expected) == text:
        canonical = parse_canonical_ip(text)
        assert type(canonical) is type(expected)
        assert canonical == expected
    else:
        with pytest.raises(InvalidRecord, match="not in canonical form"):
            parse_canonical_ip(text)


def test_parse_ip_messages() -> None:
    with pytest.raises(InvalidRecord, match=r"^invalid IP address '10\.0\.0\.256'$"):
        parse_ip("10.0.0.256")
    with pytest.raises(InvalidRecord, match=r"^invalid IP address '1\.2\.3\.4\\x00'$"):
        parse_ip("1.2.3.4\x00")
    with pytest.raises(InvalidRecord, match=r"^IP address: expected str, got bytes$"):
        parse_ip(b"1.2.3.4")
    with pytest.raises(InvalidRecord, match=r"^IP address: expected str, got bytes$"):
        parse_canonical_ip(b"1.2.3.4")


def test_parse_canonical_ip() -> None:
    assert parse_canonical_ip("10.0.0.1") == IPv4Address("10.0.0.1")
    assert parse_canonical_ip("2001:db8::1") == IPv6Address("2001:db8::1")
    for text in ("2001:DB8::1", "2001:db8:0::1", "::0", "0:0::1"):
        assert parse_ip(text)
        with pytest.raises(InvalidRecord, match="is not in canonical form"):
            parse_canonical_ip(text)
    for text in ("010.0.0.1", "10.0.0.256", "fe80::1%eth0", ""):
        with pytest.raises(InvalidRecord, match="invalid IP address"):
            parse_canonical_ip(text)


# ---------------------------------------------------------------------------------------
# CIDR pool and usable IPs
# ---------------------------------------------------------------------------------------


def test_default_pool() -> None:
    pool = CIDRPool()
    assert pool.cidr == IPv4Network("10.0.0.0/8")
    assert pool.mask_size == 24
    assert pool.size == 65536
    assert pool.cidr_at(0) == IPv4Network("10.0.0.0/24")
    assert pool.cidr_at(258) == IPv4Network("10.1.2.0/24")
    assert pool.cidr_at(65535) == IPv4Network("10.255.255.0/24")
    assert pool.index_of(IPv4Network("10.1.2.0/24")) == 258
    outside: list[IPv4Network | IPv6Network] = [
        IPv4Network("10.1.2.0/25"),
        IPv4Network("11.0.0.0/24"),
        IPv4Network("10.0.0.0/8"),
        IPv6Network("fd00::/120"),
    ]
    for bad in outside:
        assert not pool.contains(bad)
        with pytest.raises(ModelError):
            pool.index_of(bad)
    for index in (-1, 65536, True):
        with pytest.raises(ModelError):
            pool.cidr_at(index)


def test_small_pool_iteration_ipv6() -> None:
    pool = CIDRPool(IPv6Network("fd00::/118"), 120, "v6")
    cidrs = list(pool.iter_cidrs())
    assert cidrs == list(IPv6Network("fd00::/118").subnets(new_prefix=120))
    assert [pool.index_of(c) for c in cidrs] == list(range(pool.size))
    # a low IPv6 address must stay IPv6
    low = CIDRPool(IPv6Network("::/120"), 124)
    assert isinstance(low.cidr_at(1), IPv6Network)
    assert low.cidr_at(1) == IPv6Network("::10/124")


@pytest.mark.parametrize(
    ("cidr", "mask", "name"),
    [
        (IPv4Network("10.0.0.0/8"), 7, "default"),
        (IPv4Network("10.0.0.0/8"), 33, "default"),
        (IPv6Network("fd00::/64"), 129, "default"),
        (IPv4Network("10.0.0.0/8"), 24, "Bad/Name"),
        (IPv4Network("10.0.0.0/8"), 24, ""),
    ],
)
def test_pool_rejects(cidr: IPv4Network | IPv6Network, mask: int, name: str) -> None:
    with pytest.raises(ModelError):
        CIDRPool(cidr, mask, name)


@given(pools(), st.data())
def test_pool_index_round_trips(pool: CIDRPool, data: st.DataObject) -> None:
    index = data.draw(st.integers(0, pool.size - 1))
    cidr = pool.cidr_at(index)
    assert cidr.version == pool.cidr.version
    assert cidr.prefixlen == pool.mask_size
    assert cidr.subnet_of(pool.cidr)  # type: ignore[arg-type]
    assert pool.contains(cidr)
    assert pool.index_of(cidr) == index
    if index > 0:
        assert pool.cidr_at(index - 1) != cidr


def test_usable_ips_ipv4() -> None:
    cidr = IPv4Network("10.0.1.0/24")
    ips = list(usable_ips(cidr))
    assert router_ip(cidr) == IPv4Address("10.0.1.1")
    assert ips[0] == IPv4Address("10.0.1.2")
    assert ips[-1] == IPv4Address("10.0.1.254")
    assert len(ips) == usable_ip_count(cidr) == 253
    for excluded in ("10.0.1.0", "10.0.1.1", "10.0.1.255"):
        assert IPv4Address(excluded) not in ips
        assert not is_usable_ip(cidr, IPv4Address(excluded))
    assert is_usable_ip(cidr, IPv4Address("10.0.1.2"))
    assert not is_usable_ip(cidr, IPv4Address("10.0.2.2"))
    assert not is_usable_ip(cidr, IPv6Address("::a00:102"))


@pytest.mark.parametrize(
    ("cidr", "router", "usable"),
    [
        ("10.0.0.0/30", "10.0.0.1", ["10.0.0.2"]),
        ("10.0.0.0/29", "10.0.0.1", ["10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5", "10.0.0.6"]),
        ("10.0.0.0/31", None, []),
        ("10.0.0.0/32", None, []),
        ("fd00::/126", "fd00::1", ["fd00::2", "fd00::3"]),
        ("fd00::/127", "fd00::1", []),
        ("fd00::/128", None, []),
    ],
)
def test_usable_ips_small(cidr: str, router: str | None, usable: list[str]) -> None:
    network = ipaddress.ip_network(cidr)
    expected_router = ipaddress.ip_address(router) if router else None
    assert router_ip(network) == expected_router
    got = list(usable_ips(network))
    assert got == [ipaddress.ip_address(u) for u in usable]
    assert usable_ip_count(network) == len(usable)


@given(networks().filter(lambda n: n.max_prefixlen - n.prefixlen <= 10))
def test_usable_ips_properties(network: IPv4Network | IPv6Network) -> None:
    got = list(usable_ips(network))
    assert len(got) == usable_ip_count(network)
    assert network.network_address not in got
    if network.version == 4:
        assert network.broadcast_address not in got
    router = router_ip(network)
    if router is not None:
        assert router in network and router not in got
    for ip in got:
        assert ip in network
        assert ip.version == network.version
        assert is_usable_ip(network, ip)


# ---------------------------------------------------------------------------------------
# to_dict / from_dict
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("cls", "strategy"), MODEL_TYPES, ids=TYPE_IDS)
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(data=st.data())
def test_dict_round_trip(
    cls: type[Any], strategy: st.SearchStrategy[Any], data: st.DataObject
) -> None:
    obj = data.draw(strategy)
    plain = obj.to_dict()
    assert is_plain(plain)
    assert cls.from_dict(plain) == obj
    # survives msgpack, including tuples instead of lists
    packed = msgpack.packb(plain)
    assert cls.from_dict(msgpack.unpackb(packed)) == obj
    assert cls.from_dict(msgpack.unpackb(packed, use_list=False)) == obj
    # unknown fields are ignored
    assert cls.from_dict({**plain, "future_field": [1, "x"]}) == obj


def _check_only_invalid_record(cls: type[Any], value: object) -> None:
    try:
        obj = cls.from_dict(value)
    except InvalidRecord as e:
        message = str(e)
        assert message
        assert "\n" not in message and "\r" not in message
    else:
        assert isinstance(obj, cls)
        assert cls.from_dict(obj.to_dict()) == obj


@pytest.mark.parametrize(("cls", "strategy"), MODEL_TYPES, ids=TYPE_IDS)
@settings(deadline=None)
@given(value=garbage)
def test_from_dict_garbage_raises_only_invalid_record(
    cls: type[Any], strategy: st.SearchStrategy[Any], value: object
) -> None:
    _check_only_invalid_record(cls, value)


@pytest.mark.parametrize(("cls", "strategy"), MODEL_TYPES, ids=TYPE_IDS)
@settings(deadline=None)
@given(data=st.data())
def test_from_dict_corrupted_fields_raise_only_invalid_record(
    cls: type[Any], strategy: st.SearchStrategy[Any], data: st.DataObject
) -> None:
    """Start from a valid record and corrupt, drop or add fields."""
    plain: dict[str, Any] = data.draw(strategy).to_dict()
    names = sorted(plain)
    action = data.draw(st.sampled_from(["replace", "drop", "replace-item", "keys"]))
    if action == "replace":
        plain[data.draw(st.sampled_from(names))] = data.draw(garbage)
    elif action == "drop":
        del plain[data.draw(st.sampled_from(names))]
    elif action == "replace-item":
        lists = [n for n in names if isinstance(plain[n], list) and plain[n]]
        if lists:
            name = data.draw(st.sampled_from(lists))
            items = list(plain[name])
            items[data.draw(st.integers(0, len(items) - 1))] = data.draw(garbage)
            plain[name] = items
    else:
        plain = data.draw(
            st.dictionaries(st.sampled_from([*names, "x", ""]), garbage, max_size=len(names) + 1)
        )
    _check_only_invalid_record(cls, plain)


MALFORMED: list[tuple[type[Any], object]] = [
    (Label, None),
    (Label, []),
    (Label, {"source": "k8s", "key": "app"}),
    (Label, {"source": "k8s", "key": "app", "value": 1}),
    (Label, {"source": "k8s", "key": "a b", "value": ""}),
    (Labels, {"labels": "k8s:app=web"}),
    (Labels, {"labels": [1]}),
    (Labels, {"labels": ["k8s:app=web", "k8s:app=db"]}),
    (Labels, {}),
    (Identity, {"id": "300", "labels": []}),
    (Identity, {"id": True, "labels": []}),
    (Identity, {"id": 0, "labels": []}),
    (Identity, {"id": 300, "labels": ["bad label"]}),
    (Identity, {"id": 300}),
    (IdentityRange, {"first": 5, "last": 1}),
    (IdentityRange, {"first": 1.0, "last": 5}),
    (Endpoint, {"ip": "10.0.0.1"}),
    (
        Endpoint,
        {
            "ip": "10.0.0.300",
            "prefix_len": 32,
            "identity": 5,
            "node": "n",
            "host_ip": "1.1.1.1",
            "name": "p",
            "namespace": "d",
        },
    ),
    (
        Endpoint,
        {
            "ip": "10.0.0.1",
            "prefix_len": 32,
            "identity": 5,
            "node": "n",
            "host_ip": b"\x01",
            "name": "p",
            "namespace": "d",
        },
    ),
    (
        Endpoint,
        {
            "ip": "10.0.0.1",
            "prefix_len": 64,
            "identity": 5,
            "node": "n",
            "host_ip": "1.1.1.1",
            "name": "p",
            "namespace": "d",
        },
    ),
    (Node, {"name": "n", "ips": ["1.2.3.4"], "pod_cidrs": ["10.0.0.1/24"], "boot_id": ""}),
    (Node, {"name": "n", "ips": "1.2.3.4", "pod_cidrs": [], "boot_id": ""}),
    (Node, {"name": "n", "ips": [], "pod_cidrs": [], "boot_id": None}),
    (CIDRPool, {"name": "default", "cidr": "10.0.0.0/8", "mask_size": 4}),
    (CIDRPool, {"name": "default", "cidr": "10.0.0.1/8", "mask_size": 24}),
    (IPLease, {"node": "n", "ip": "10.0.0.1", "owner": ""}),
    (IPLease, {"node": "n", "ip": "10.0.0.1"}),
]


@pytest.mark.parametrize(("cls", "value"), MALFORMED)
def test_from_dict_rejects_malformed(cls: type[Any], value: object) -> None:
    with pytest.raises(InvalidRecord) as info:
        cls.from_dict(value)
    assert isinstance(info.value, ValueError)
    assert cls.__name__ in str(info.value)
    assert "\n" not in str(info.value)


# -- the ipcache's fast path for endpoint records ------------------------------------------

_ENDPOINT_RECORDS = codec.typed_decoder("endpoint", EndpointRecord)
_VALID_ENDPOINT: dict[str, Any] = {
    "ip": "10.0.1.5",
    "prefix_len": 32,
    "identity": 1234,
    "node": "node-1.example",
    "host_ip": "192.168.0.8",
    "name": "web-5f7c9",
    "namespace": "default",
}
_ODD: list[Any] = [
    None, True, False, 0, 1, -1, -2, 24, 32, 33, 64, 128, 129, 255, 2**32 - 1, 2**32,
    2**63, -(2**63), 1.0, 32.0, b"x", [], {}, "", "a", "A", "a-", "-a", "a.b", "a..b",
    "a_b", "a\n", "\na", "ä", "x" * 63, "x" * 64, "x" * 253, "x" * 254,
    ".".join(["x" * 63] * 4), "10.0.0.1", "10.0.1.0", "10.0.0.0", "010.0.0.1", "1.2.3",
    "1.2.3.4 ", "fd00::1", "fd00::", "FD00::1", "fe80::1%eth0", "::ffff:1.2.3.4",
    "2001:db8::", "0.0.0.0", "255.255.255.255",
]  # fmt: skip
_ODD_VALUES = st.sampled_from(_ODD)


@st.composite
def _endpoint_records(draw: st.DrawFn) -> dict[str, Any]:
    record = dict(_VALID_ENDPOINT)
    for field in draw(st.lists(st.sampled_from(sorted(record)), max_size=3, unique=True)):
        action = draw(st.sampled_from(["odd", "odd", "delete"]))
        if action == "delete":
            del record[field]
        else:
            record[field] = draw(_ODD_VALUES)
    if draw(st.booleans()):
        record[draw(st.sampled_from(["extra", "ip6", "labels"]))] = draw(_ODD_VALUES)
    return record


_NODE_FIELDS = NodeFields(limit=8)  # shared by every example: a small one starts over often


def _fast(raw: bytes) -> Any:
    try:
        return ip_identity_from_record(_ENDPOINT_RECORDS(raw), _NODE_FIELDS)
    except (codec.DecodeError, ModelError):
        return None


def _strict(raw: bytes) -> Any:
    try:
        return ip_identity_from_dict(codec.decode("endpoint", raw))
    except (codec.DecodeError, ModelError):
        return None


@settings(max_examples=1500, deadline=None)
@given(_endpoint_records())
@example(dict(_VALID_ENDPOINT, ip="fd00::", prefix_len=-1))
@example(dict(_VALID_ENDPOINT, ip="10.0.1.0", prefix_len=24))
def test_fast_endpoint_decode_agrees_with_the_strict_path_and_the_model(
    record: dict[str, Any],
) -> None:
    """The msgspec schema only ever takes a record the strict path takes, with the same
    result; the strict path takes exactly what Endpoint.from_dict takes."""
    _check_endpoint_decoders_agree(record)


@pytest.mark.parametrize("field", sorted(_VALID_ENDPOINT))
def test_fast_endpoint_decode_agrees_on_every_odd_value_of_each_field(field: str) -> None:
    for value in _ODD:
        _check_endpoint_decoders_agree(dict(_VALID_ENDPOINT, **{field: value}))
    _check_endpoint_decoders_agree({k: v for k, v in _VALID_ENDPOINT.items() if k != field})


def _check_endpoint_decoders_agree(record: dict[str, Any]) -> None:
    raw = codec.encode("endpoint", record)
    fast, strict = _fast(raw), _strict(raw)
    if fast is not None:
        assert fast == strict
    try:
        endpoint = Endpoint.from_dict(record)
    except ModelError:
        assert strict is None
    else:
        assert strict == endpoint.ip_identity
        assert fast == strict, "the fast path refused a valid record"


@pytest.mark.parametrize(
    "raw",
    [
        codec.encode("node", _VALID_ENDPOINT),
        msgpack.packb({"v": 2, "k": "endpoint", "d": _VALID_ENDPOINT}),
        msgpack.packb({"v": True, "k": "endpoint", "d": _VALID_ENDPOINT}),
        msgpack.packb({"v": 1, "k": "endpoint"}),
        msgpack.packb({"v": 1, "k": "endpoint", "d": [1, 2]}),
        codec.encode("endpoint", _VALID_ENDPOINT) + b"\x00",
        b"\xc1",
        b"",
    ],
)
def test_fast_endpoint_decode_refuses_bad_envelopes(raw: bytes) -> None:
    assert _strict(raw) is None
    with pytest.raises(codec.DecodeError):
        _ENDPOINT_RECORDS(raw)
