"""The kernel settings the datapath needs, read (and set when allowed) under /proc/sys.

Required: ``net.ipv4.ip_forward=1``: a pod's packets arrive on its host-side veth and
leave by another veth or the node's uplink; without forwarding the host drops them and a
pod-to-pod connection silently times out. On a node with an IPv6 address,
``net.ipv6.conf.all.forwarding=1`` too, for the same reason (:func:`wanted`).

``rp_filter`` needs no change for our routes: every pod address has a host route over its
own veth (``cp-cni``) and every other node's pod CIDR a route via that node's IP
(:mod:`controlplane.datapath.routes`), so the reverse path of any packet we forward is the
interface it came in on, which strict mode (1) accepts as well as loose (2) or off (0).
The effective value (the larger of ``conf.all`` and ``conf.default``, the one new veths
get) is reported, not changed: an administrator's choice is left alone.

Everything reads and writes files under a root (``/proc/sys`` by default) so tests use a
directory of their own.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

__all__ = [
    "IPV6_REQUIRED",
    "PROC_SYS",
    "REPORTED",
    "REQUIRED",
    "SysctlState",
    "Want",
    "apply",
    "read",
    "summary",
    "wanted",
    "warning",
]

PROC_SYS: Final = Path("/proc/sys")


@dataclass(frozen=True, slots=True)
class Want:
    name: str
    value: str
    why: str


REQUIRED: Final = (
    Want("net.ipv4.ip_forward", "1", "pod traffic is forwarded between veths and the uplink"),
)
IPV6_REQUIRED: Final = (
    Want("net.ipv6.conf.all.forwarding", "1", "IPv6 pod traffic is forwarded likewise"),
)
REPORTED: Final = ("net.ipv4.conf.all.rp_filter", "net.ipv4.conf.default.rp_filter")


def wanted(*, ipv6: bool) -> tuple[Want, ...]:
    """What a node needs: IPv4 forwarding always; IPv6 forwarding when it has IPv6."""
    return REQUIRED + IPV6_REQUIRED if ipv6 else REQUIRED


@dataclass(frozen=True, slots=True)
class SysctlState:
    name: str
    want: str
    value: str | None
    """What the kernel holds now (None: unreadable, e.g. no such file)."""
    changed: bool = False
    """We wrote it at start."""
    error: str | None = None
    """Why it is wrong and was not set (not allowed, or the write failed)."""

    @property
    def ok(self) -> bool:
        return self.value == self.want

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "want": self.want,
            "value": self.value,
            "ok": self.ok,
            "changed": self.changed,
            "error": self.error,
        }


def _path(root: Path, name: str) -> Path:
    if not name or any(not part or part in (".", "..") for part in name.split(".")):
        raise ValueError(f"bad sysctl name {name!r}")
    return root.joinpath(*name.split("."))


def read(name: str, root: Path = PROC_SYS) -> str | None:
    """The value of ``name`` (stripped), or None when it cannot be read."""
    try:
        return _path(root, name).read_text().strip()
    except OSError:
        return None


def apply(
    *, set_values: bool, root: Path = PROC_SYS, wants: Iterable[Want] = REQUIRED
) -> list[SysctlState]:
    """Check each wanted sysctl; with ``set_values``, write those that differ."""
    states = []
    for want in wants:
        value = read(want.name, root)
        if value == want.value:
            states.append(SysctlState(want.name, want.value, value))
            continue
        if not set_values:
            states.append(
                SysctlState(want.name, want.value, value, error="not set (--set-sysctls is off)")
            )
            continue
        try:
            _path(root, want.name).write_text(want.value + "\n")
        except OSError as e:
            states.append(
                SysctlState(want.name, want.value, value, error=f"cannot set: {e.strerror}")
            )
            continue
        after = read(want.name, root)
        error = None if after == want.value else f"wrote {want.value}, reads {after}"
        states.append(SysctlState(want.name, want.value, after, changed=error is None, error=error))
    return states


def warning(states: Iterable[SysctlState]) -> str | None:
    """One line naming every wrong sysctl, or None when all are as wanted."""
    wrong = [
        f"{s.name}={s.value if s.value is not None else '?'} (want {s.want}; {s.error})"
        for s in states
        if not s.ok
    ]
    if not wrong:
        return None
    return "datapath sysctls wrong, pod traffic may not be forwarded: " + ", ".join(wrong)


def summary(states: Iterable[SysctlState], root: Path = PROC_SYS) -> dict[str, Any]:
    """The status API's view: the required ones and the reported rp_filter values."""
    listed = [s.to_dict() for s in states]
    return {
        "ok": all(s["ok"] for s in listed),
        "required": listed,
        "reported": {name: read(name, root) for name in REPORTED},
    }
