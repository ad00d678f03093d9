"""Which ipcache the agent drives: the pinned kernel map, or a userspace one.

:func:`choose_datapath` turns ``--datapath auto|kernel|userspace`` and a
:func:`~controlplane.datapath.capabilities.detect_datapath` answer into a
:class:`DatapathChoice` with a one-line reason; :func:`open_ipcache` opens (or creates and
pins) the kernel ``cp_ipcache`` under ``--bpf-pin-dir``, exactly as ``bpf/cp_maps.h``
declares it, so the tc program and the agent share one map that outlives the agent.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from controlplane.agent.settings import DatapathMode
from controlplane.datapath.bpf_syscall import KernelMapError
from controlplane.datapath.capabilities import DatapathSupport, detect_datapath
from controlplane.datapath.ipcache import IPCACHE_MAP_NAME, Ipcache, userspace_ipcache
from controlplane.datapath.kernel import KernelMap, pinned_ipcache
from controlplane.datapath.layouts import CT_MAP_NAME, FLOW_MAP_NAMES, METRICS_MAP_NAME
from controlplane.datapath.lbmap import LbMaps, pinned_lb_maps, userspace_lb_maps
from controlplane.datapath.loader import LoaderError
from controlplane.datapath.policymap import (
    PolicyMaps,
    pinned_policy_maps,
    userspace_policy_maps,
)
from controlplane.datapath.sock_lb import attach_sock_lb

PROGRAM_ONLY_MAPS = (CT_MAP_NAME, METRICS_MAP_NAME, *FLOW_MAP_NAMES)
"""Maps the tc program pins beside ours and the agent does not reconcile (the flow
server opens three of the flow maps, and unpins them too on ``--cleanup-on-exit``)."""


class DatapathUnavailable(Exception):
    """``--datapath kernel`` (or a kernel choice) cannot be honoured: one line, exit 2."""


@dataclass(frozen=True, slots=True)
class DatapathChoice:
    kernel: bool
    reason: str

    @property
    def mode(self) -> str:
        return "kernel" if self.kernel else "userspace"


def choose_datapath(
    mode: DatapathMode, detect: Callable[[], DatapathSupport] | None = None
) -> DatapathChoice:
    """Pick the datapath for ``mode``; ``detect`` (default :func:`detect_datapath`) is only
    asked for auto and kernel.

    Raises :class:`DatapathUnavailable` for ``kernel`` when the kernel maps are unusable.
    """
    if mode is DatapathMode.USERSPACE:
        return DatapathChoice(False, "--datapath userspace")
    support = (detect or detect_datapath)()
    if support.kernel:
        return DatapathChoice(True, support.reason)
    if mode is DatapathMode.KERNEL:
        raise DatapathUnavailable(f"--datapath kernel: kernel eBPF maps unusable: {support.reason}")
    return DatapathChoice(False, support.reason)


def open_ipcache(choice: DatapathChoice, pin_dir: Path) -> Ipcache:
    """The ipcache for ``choice``: the kernel map pinned at ``<pin_dir>/cp_ipcache`` (opened
    with its content when pinned, else created and pinned), or a fresh userspace map."""
    if not choice.kernel:
        return userspace_ipcache()
    try:
        return pinned_ipcache(os.fspath(pin_dir.absolute()))
    except (KernelMapError, OSError) as exc:
        raise DatapathUnavailable(
            f"kernel ipcache at {pin_dir / IPCACHE_MAP_NAME}: {exc}"
        ) from None


def open_policy_maps(choice: DatapathChoice, pin_dir: Path) -> PolicyMaps:
    """``cp_policy`` and ``cp_endpoints``: pinned under ``pin_dir`` beside the ipcache (opened
    with their content when pinned, else created and pinned, exactly as ``bpf/cp_maps.h``
    declares them), or fresh userspace maps."""
    if not choice.kernel:
        return userspace_policy_maps()
    try:
        return pinned_policy_maps(pin_dir)
    except (KernelMapError, OSError) as exc:
        raise DatapathUnavailable(f"kernel policy maps under {pin_dir}: {exc}") from None


def open_lb_maps(choice: DatapathChoice, pin_dir: Path) -> LbMaps:
    """``cp_lb_services``, ``cp_lb_slots`` (and the program's ``cp_lb_metrics``): pinned
    under ``pin_dir`` (opened with their content when pinned, else created as
    ``bpf/cp_lb.h`` declares them), or fresh userspace maps."""
    if not choice.kernel:
        return userspace_lb_maps()
    try:
        return pinned_lb_maps(pin_dir)
    except (KernelMapError, OSError) as exc:
        raise DatapathUnavailable(f"kernel load-balancer maps under {pin_dir}: {exc}") from None


@dataclass(frozen=True, slots=True)
class SockLbState:
    """Whether the socket load balancer is attached, and why not."""

    attached: bool
    detail: str


def start_sock_lb(choice: DatapathChoice, pin_dir: Path, cgroup: Path | None) -> SockLbState:
    """Load ``cp_sock_lb.o`` and attach (or swap into the pinned links) its programs on
    ``cgroup``. A failure is reported, not fatal: the rest of the datapath still works."""
    if not choice.kernel:
        return SockLbState(False, "userspace datapath")
    if cgroup is None:
        return SockLbState(False, "no --lb-cgroup (no cgroup v2 found, or none)")
    try:
        done = attach_sock_lb(pin_dir, cgroup)
    except (LoaderError, OSError) as exc:
        return SockLbState(False, f"socket load balancer not attached: {exc}")
    return SockLbState(True, f"cgroup {cgroup}: {', '.join(done)}")


def unpin_ipcache(ipcache: Ipcache, pin_dir: Path) -> bool:
    """``--cleanup-on-exit``: remove the ipcache pin, the pins of the maps only the tc
    program uses (``cp_ct``, ``cp_metrics``, the flow maps: the loader created them for
    ``cp-cni``), and
    the pin dir when left empty.

    Programs still attached keep their reference to the maps; only the names go."""
    if not isinstance(ipcache.map, KernelMap):
        return False
    removed = False
    for name in (IPCACHE_MAP_NAME, *PROGRAM_ONLY_MAPS):
        with contextlib.suppress(FileNotFoundError):
            (pin_dir / name).unlink()
            removed = True
    with contextlib.suppress(OSError):
        pin_dir.rmdir()  # only when empty: someone else's pins stay, and so does the dir
    return removed


def close_ipcache(ipcache: Ipcache) -> None:
    """Close the kernel map's fd (the pin keeps the map and its entries)."""
    if isinstance(ipcache.map, KernelMap):
        ipcache.map.close()
