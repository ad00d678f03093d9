"""Names: DNS-1123 labels and subdomains (Kubernetes names), node names and endpoint ids;
their checks (raise :class:`~controlplane.model.errors.ModelError`) and parsers (raise
:class:`~controlplane.model.errors.InvalidRecord`).
"""

from __future__ import annotations

import functools
import re
from typing import Final, NewType

from controlplane.model._checks import _short
from controlplane.model.errors import InvalidRecord, ModelError

__all__ = [
    "EndpointID",
    "NodeName",
    "parse_endpoint_id",
    "parse_node_name",
]

NodeName = NewType("NodeName", str)
EndpointID = NewType("EndpointID", str)

# DNS-1123 label / subdomain (Kubernetes names).
_DNS_LABEL = r"[a-z0-9](?:[-a-z0-9]*[a-z0-9])?"
_DNS_LABEL_RE: Final = re.compile(_DNS_LABEL)
_DNS_SUBDOMAIN_RE: Final = re.compile(rf"{_DNS_LABEL}(?:\.{_DNS_LABEL})*")
_SIMPLE_LABEL_RE: Final = re.compile(r"[a-z0-9][-a-z0-9]*")
"""With a last character that is not ``-``: exactly :data:`_DNS_LABEL_RE`, faster."""
_ENDPOINT_ID_RE: Final = re.compile(r"[\x21-\x7e]+")  # printable ASCII, no spaces

_DNS_LABEL_MAX: Final = 63
_DNS_SUBDOMAIN_MAX: Final = 253
_ENDPOINT_ID_MAX: Final = 512


# Node and namespace names repeat across records: the regex match is worth caching.
@functools.lru_cache(maxsize=4096)
def _is_dns_label(value: str) -> bool:
    return _DNS_LABEL_RE.fullmatch(value) is not None


@functools.lru_cache(maxsize=4096)
def _is_dns_subdomain(value: str) -> bool:
    return _DNS_SUBDOMAIN_RE.fullmatch(value) is not None


def _check_dns_label(what: str, value: object) -> str:
    if not isinstance(value, str):
        raise ModelError(f"{what}: expected str, got {type(value).__name__}")
    if not value:
        raise ModelError(f"{what}: must not be empty")
    if len(value) > _DNS_LABEL_MAX:
        raise ModelError(f"{what}: longer than {_DNS_LABEL_MAX} characters: {_short(value)}")
    if not _is_dns_label(value):
        raise ModelError(f"{what}: not a DNS-1123 label: {_short(value)}")
    return value


def _check_dns_subdomain(what: str, value: object) -> str:
    if not isinstance(value, str):
        raise ModelError(f"{what}: expected str, got {type(value).__name__}")
    if not value:
        raise ModelError(f"{what}: must not be empty")
    if len(value) > _DNS_SUBDOMAIN_MAX:
        raise ModelError(f"{what}: longer than {_DNS_SUBDOMAIN_MAX} characters: {_short(value)}")
    if not _is_dns_subdomain(value):
        raise ModelError(f"{what}: not a DNS-1123 subdomain: {_short(value)}")
    return value


def parse_node_name(text: object) -> NodeName:
    """Validate a node name (a DNS-1123 subdomain, as in Kubernetes); raises InvalidRecord."""
    try:
        return NodeName(_check_dns_subdomain("node name", text))
    except ModelError as e:
        raise InvalidRecord(str(e)) from None


def parse_endpoint_id(text: object) -> EndpointID:
    """Validate an endpoint id (1..512 printable ASCII characters, no spaces)."""
    try:
        return EndpointID(_check_endpoint_id("endpoint id", text))
    except ModelError as e:
        raise InvalidRecord(str(e)) from None


def _check_endpoint_id(what: str, value: object) -> str:
    if not isinstance(value, str):
        raise ModelError(f"{what}: expected str, got {type(value).__name__}")
    if not value or len(value) > _ENDPOINT_ID_MAX or not _ENDPOINT_ID_RE.fullmatch(value):
        raise ModelError(
            f"{what}: must be 1..{_ENDPOINT_ID_MAX} printable ASCII characters "
            f"without spaces: {_short(value)}"
        )
    return value
