"""The string ``format``s kube-apiserver checks in custom resources.

apiextensions validates a string against its schema's ``format`` when the format is one
it knows (kube-openapi's strfmt registry); unknown formats are ignored, as there. Each
check here is a predicate on the string; a failure is reported by the schema validator
with kube's message ("spec.ip in body must be of type ipv4: ..."). Nothing is normalised.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import ipaddress
import re
from collections.abc import Callable

_UUID = re.compile(r"^[0-9a-f]{8}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{12}$", re.I)
_MAC = re.compile(
    r"^([0-9A-Fa-f]{2}([:-])(?:[0-9A-Fa-f]{2}\2){4}[0-9A-Fa-f]{2}"
    r"|[0-9A-Fa-f]{4}\.[0-9A-Fa-f]{4}\.[0-9A-Fa-f]{4})$"
)
_HOSTNAME = re.compile(
    r"^([a-zA-Z0-9]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?)(\.[a-zA-Z0-9]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?)*\.?$"
)
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+$")
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_DATE_TIME = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$")


def _ipv4(text: str) -> bool:
    try:
        ipaddress.IPv4Address(text)
    except ValueError:
        return False
    return True


def _ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def _cidr(text: str) -> bool:
    if "/" not in text:
        return False
    try:
        ipaddress.ip_network(text, strict=False)
    except ValueError:
        return False
    return True


def _byte(text: str) -> bool:
    try:
        base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return False
    return True


def _date(text: str) -> bool:
    if not _DATE.match(text):
        return False
    try:
        datetime.date.fromisoformat(text)
    except ValueError:
        return False
    return True


def _date_time(text: str) -> bool:
    if not _DATE_TIME.match(text):
        return False
    try:
        datetime.datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        return False
    return True


def _hostname(text: str) -> bool:
    return len(text) <= 255 and bool(_HOSTNAME.match(text))


FORMATS: dict[str, Callable[[str], bool]] = {
    "ipv4": _ipv4,
    "ipv6": _ipv6,
    "cidr": _cidr,
    "mac": lambda text: bool(_MAC.match(text)),
    "uuid": lambda text: bool(_UUID.match(text)),
    "hostname": _hostname,
    "email": lambda text: bool(_EMAIL.match(text)),
    "byte": _byte,
    "date": _date,
    "date-time": _date_time,
    "datetime": _date_time,
}


def conforms(format_name: str, text: str) -> bool:
    """False only when ``format_name`` is a known format and ``text`` does not meet it."""
    check = FORMATS.get(format_name)
    return check is None or check(text)
