"""Hubble's flow filters (``flow.FlowFilter``), checked once and compiled into predicates.

Within one filter every set field must match (AND) and, within a repeated field, any value
(OR). A request's allow list (``whitelist``) passes a flow matching any of its filters (or
every flow when empty); its deny list (``blacklist``) then removes those matching any of
its. Anything a filter cannot mean (a bad address, port, protocol, label selector, enum
value, or a field this server does not implement) raises :class:`FilterError`, which the
API answers with ``INVALID_ARGUMENT`` and the message.

Field meanings as in Hubble: ``*_ip`` an address or a CIDR; ``*_pod`` ``[namespace/]pod
name prefix`` (``ns/`` alone: the whole namespace); ``*_label`` a label selector
(``k=v``, ``k==v``, ``k!=v``, ``k``, ``!k``, ``k in (a,b)``, ``k notin (a,b)``, joined by
``,``), where a key without a source matches any source (``app=web`` matches
``k8s:app=web``); ``node_name`` a glob; ``protocol`` tcp, udp, icmp (ICMPv4), icmpv4,
icmpv6, sctp; ports as decimal text; ``tcp_flags`` every flag set in one of them.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from google.protobuf import unknown_fields

from controlplane.flows.proto import flow_pb2 as pb

__all__ = ["FilterError", "FlowPredicate", "compile_filters", "parse_selector"]

FlowPredicate = Callable[[pb.Flow], bool]

PROTOCOLS: Final = {
    "tcp": "TCP",
    "udp": "UDP",
    "icmp": "ICMPv4",
    "icmpv4": "ICMPv4",
    "icmpv6": "ICMPv6",
    "sctp": "SCTP",
}
_TCP_FLAG_FIELDS: Final = ("FIN", "SYN", "RST", "PSH", "ACK", "URG", "ECE", "CWR", "NS")
_KEY_RE: Final = re.compile(r"^[A-Za-z0-9_.\-/:]+$")
_SET_RE: Final = re.compile(r"^\s*([^\s!=]+)\s+(in|notin)\s+\(([^)]*)\)\s*$")


class FilterError(ValueError):
    """A filter that cannot be applied; the message names the field and the value."""


# -- label selectors ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Requirement:
    key: str
    op: str  # "=", "!=", "exists", "!exists", "in", "notin"
    values: frozenset[str]

    def matches(self, labels: dict[str, str]) -> bool:
        present = self.key in labels
        if self.op == "exists":
            return present
        if self.op == "!exists":
            return not present
        if self.op in ("=", "in"):
            return present and labels[self.key] in self.values
        return not present or labels[self.key] not in self.values  # "!=", "notin"


def _split_requirements(text: str) -> list[str]:
    """Split on commas outside parentheses."""
    parts: list[str] = []
    current: list[str] = []
    depth = 0
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return parts


def _key(field: str, key: str, selector: str) -> str:
    key = key.strip()
    if not key or not _KEY_RE.match(key):
        raise FilterError(f"{field}: bad label key {key!r} in selector {selector!r}")
    return key


def parse_selector(field: str, selector: str) -> list[_Requirement]:
    """A label selector's requirements (all must hold)."""
    if not selector.strip():
        raise FilterError(f"{field}: empty label selector")
    reqs: list[_Requirement] = []
    for part in _split_requirements(selector):
        text = part.strip()
        if not text:
            raise FilterError(f"{field}: empty requirement in selector {selector!r}")
        if m := _SET_RE.match(text):
            values = frozenset(v.strip() for v in m.group(3).split(",") if v.strip())
            if not values:
                raise FilterError(f"{field}: empty value set in selector {selector!r}")
            reqs.append(_Requirement(_key(field, m.group(1), selector), m.group(2), values))
        elif "!=" in text:
            key, value = text.split("!=", 1)
            reqs.append(_Requirement(_key(field, key, selector), "!=", frozenset([value.strip()])))
        elif "=" in text:
            key, value = text.split("==", 1) if "==" in text else text.split("=", 1)
            if "=" in value:
                raise FilterError(f"{field}: bad requirement {text!r} in selector {selector!r}")
            reqs.append(_Requirement(_key(field, key, selector), "=", frozenset([value.strip()])))
        elif text.startswith("!"):
            reqs.append(_Requirement(_key(field, text[1:], selector), "!exists", frozenset()))
        else:
            reqs.append(_Requirement(_key(field, text, selector), "exists", frozenset()))
    return reqs


def _label_map(labels: Iterable[str]) -> dict[str, str]:
    """``source:key=value`` labels by ``source:key`` and by ``key`` alone."""
    out: dict[str, str] = {}
    for label in labels:
        full, _, value = label.partition("=")
        out[full] = value
        source, sep, key = full.partition(":")
        if sep and "/" not in source:
            out.setdefault(key, value)
    return out


# -- fields ---------------------------------------------------------------------------


def _networks(
    field: str, values: Sequence[str]
) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    out = []
    for value in values:
        try:
            out.append(ipaddress.ip_network(value.strip(), strict=False))
        except ValueError:
            raise FilterError(f"{field}: {value!r} is not an IP address or CIDR") from None
    return out


def _ip_match(field: str, values: Sequence[str], side: Callable[[pb.Flow], str]) -> FlowPredicate:
    nets = _networks(field, values)

    def match(flow: pb.Flow) -> bool:
        text = side(flow)
        if not text:
            return False
        addr = ipaddress.ip_address(text)
        return any(addr.version == n.version and addr in n for n in nets)

    return match


def _pod_match(
    field: str, values: Sequence[str], side: Callable[[pb.Flow], pb.Endpoint]
) -> FlowPredicate:
    pods: list[tuple[str | None, str]] = []
    for value in values:
        if not value or value.count("/") > 1:
            raise FilterError(f"{field}: {value!r} is not [namespace/]pod-name-prefix")
        namespace, sep, prefix = value.rpartition("/")
        if sep and not namespace:
            raise FilterError(f"{field}: {value!r} has an empty namespace")
        pods.append((namespace if sep else None, prefix))

    def match(flow: pb.Flow) -> bool:
        ep = side(flow)
        return any(
            (ns is None or ep.namespace == ns)
            and ep.pod_name.startswith(prefix)
            and (ep.pod_name != "" or (ns is not None and prefix == ""))
            for ns, prefix in pods
        )

    return match


def _label_match(
    field: str, values: Sequence[str], side: Callable[[pb.Flow], pb.Endpoint]
) -> FlowPredicate:
    selectors = [parse_selector(field, v) for v in values]

    def match(flow: pb.Flow) -> bool:
        labels = _label_map(side(flow).labels)
        return any(all(r.matches(labels) for r in reqs) for reqs in selectors)

    return match


def _ports(field: str, values: Sequence[str]) -> frozenset[int]:
    out = set()
    for value in values:
        try:
            port = int(value, 10)
        except ValueError:
            raise FilterError(f"{field}: {value!r} is not a port number") from None
        if not 0 <= port <= 65535:
            raise FilterError(f"{field}: {value!r} is not a port number (0-65535)")
        out.add(port)
    return frozenset(out)


def ports_of(flow: pb.Flow) -> tuple[int, int] | None:
    l4 = flow.l4
    which = l4.WhichOneof("protocol")
    if which == "TCP":
        return l4.TCP.source_port, l4.TCP.destination_port
    if which == "UDP":
        return l4.UDP.source_port, l4.UDP.destination_port
    if which == "SCTP":
        return l4.SCTP.source_port, l4.SCTP.destination_port
    return None


def _enum_values(field: str, values: Iterable[int], enum: object, name: str) -> frozenset[int]:
    valid = set(enum.values())  # type: ignore[attr-defined]
    for value in values:
        if value not in valid:
            raise FilterError(f"{field}: {value} is not a {name}")
    return frozenset(values)


def _compile_one(f: pb.FlowFilter, where: str) -> FlowPredicate:
    unknown = unknown_fields.UnknownFieldSet(f)
    if len(unknown):
        numbers = sorted({unknown[i].field_number for i in range(len(unknown))})
        raise FilterError(f"{where}: filter field(s) {numbers} not supported by this server")
    for field in f.event_type:
        if field.match_sub_type and field.type == 0:
            raise FilterError(f"{where}.event_type: sub_type without type")
    checks: list[FlowPredicate] = []
    if f.source_ip:
        checks.append(_ip_match(f"{where}.source_ip", f.source_ip, lambda fl: fl.IP.source))
    if f.destination_ip:
        checks.append(
            _ip_match(f"{where}.destination_ip", f.destination_ip, lambda fl: fl.IP.destination)
        )
    if f.source_pod:
        checks.append(_pod_match(f"{where}.source_pod", f.source_pod, lambda fl: fl.source))
    if f.destination_pod:
        checks.append(
            _pod_match(f"{where}.destination_pod", f.destination_pod, lambda fl: fl.destination)
        )
    if f.source_label:
        checks.append(_label_match(f"{where}.source_label", f.source_label, lambda fl: fl.source))
    if f.destination_label:
        checks.append(
            _label_match(
                f"{where}.destination_label", f.destination_label, lambda fl: fl.destination
            )
        )
    if f.source_identity:
        src_ids = frozenset(f.source_identity)
        checks.append(lambda fl: fl.source.identity in src_ids)
    if f.destination_identity:
        dst_ids = frozenset(f.destination_identity)
        checks.append(lambda fl: fl.destination.identity in dst_ids)
    if f.verdict:
        verdicts = _enum_values(f"{where}.verdict", f.verdict, pb.Verdict, "verdict")
        checks.append(lambda fl: fl.verdict in verdicts)
    if f.traffic_direction:
        directions = _enum_values(
            f"{where}.traffic_direction", f.traffic_direction, pb.TrafficDirection, "direction"
        )
        checks.append(lambda fl: fl.traffic_direction in directions)
    if f.ip_version:
        versions = _enum_values(f"{where}.ip_version", f.ip_version, pb.IPVersion, "IP version")
        checks.append(lambda fl: fl.IP.ipVersion in versions)
    if f.protocol:
        protos = set()
        for value in f.protocol:
            name = PROTOCOLS.get(value.strip().lower())
            if name is None:
                raise FilterError(
                    f"{where}.protocol: {value!r} is not one of {', '.join(sorted(PROTOCOLS))}"
                )
            protos.add(name)
        checks.append(lambda fl: fl.l4.WhichOneof("protocol") in protos)
    if f.source_port:
        sports = _ports(f"{where}.source_port", f.source_port)
        checks.append(lambda fl: (p := ports_of(fl)) is not None and p[0] in sports)
    if f.destination_port:
        dports = _ports(f"{where}.destination_port", f.destination_port)
        checks.append(lambda fl: (p := ports_of(fl)) is not None and p[1] in dports)
    if f.reply:
        replies = frozenset(f.reply)
        checks.append(lambda fl: fl.HasField("is_reply") and fl.is_reply.value in replies)
    if f.tcp_flags:
        wanted = [
            [name for name in _TCP_FLAG_FIELDS if getattr(flags, name)] for flags in f.tcp_flags
        ]
        if any(not names for names in wanted):
            raise FilterError(f"{where}.tcp_flags: a filter entry sets no flag")

        def flags_match(fl: pb.Flow) -> bool:
            if fl.l4.WhichOneof("protocol") != "TCP":
                return False
            have = fl.l4.TCP.flags
            return any(all(getattr(have, name) for name in names) for names in wanted)

        checks.append(flags_match)
    if f.node_name:
        patterns = [re.compile(fnmatch.translate(p)) for p in f.node_name if p]
        if len(patterns) != len(f.node_name):
            raise FilterError(f"{where}.node_name: empty pattern")
        checks.append(lambda fl: any(p.match(fl.node_name) for p in patterns))
    if f.event_type:
        types = [(e.type, e.match_sub_type, e.sub_type) for e in f.event_type]
        checks.append(
            lambda fl: any(
                fl.event_type.type == t and (not sub or fl.event_type.sub_type == st)
                for t, sub, st in types
            )
        )

    def match(flow: pb.Flow) -> bool:
        return all(check(flow) for check in checks)

    return match


def compile_filters(allow: Sequence[pb.FlowFilter], deny: Sequence[pb.FlowFilter]) -> FlowPredicate:
    """The predicate of a request's allow (``whitelist``) and deny (``blacklist``) lists;
    raises :class:`FilterError`."""
    allows = [_compile_one(f, f"whitelist[{i}]") for i, f in enumerate(allow)]
    denies = [_compile_one(f, f"blacklist[{i}]") for i, f in enumerate(deny)]

    def predicate(flow: pb.Flow) -> bool:
        if allows and not any(a(flow) for a in allows):
            return False
        return not any(d(flow) for d in denies)

    return predicate
