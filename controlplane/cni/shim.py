"""The node's CNI launcher: the ``cp-cni`` binary that ``cp-cni install`` copies to the host.

A static C program (``cni/cp-cni-shim.c``): the container runtime runs it with the host's
environment, where Python or this package may be missing, so it only forwards the call
(``CNI_*`` environment and stdin) to the agent's ``POST /v1/cni``, which runs
:mod:`controlplane.cni.main`. A wheel carries it as ``controlplane/cni/bin/cp-cni`` (built
by setup.py); a source tree (a checkout, an editable install) builds ``cni/cp-cni`` with
``make -C cni`` when it is missing or older than its source.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Final

__all__ = ["PACKAGED_SHIM", "SHIM_SRC_DIR", "ShimUnavailable", "build_shim", "find_shim"]

SHIM_SRC_DIR: Final = Path(__file__).resolve().parents[2] / "cni"
PACKAGED_SHIM: Final = Path(__file__).resolve().parent / "bin" / "cp-cni"
_SOURCE: Final = "cp-cni-shim.c"


class ShimUnavailable(RuntimeError):
    """No launcher binary, and none can be built here."""


def find_shim() -> Path:
    """The source tree's ``cni/cp-cni`` (built when needed), else the packaged one."""
    if (SHIM_SRC_DIR / _SOURCE).is_file() and (SHIM_SRC_DIR / "Makefile").is_file():
        return build_shim()
    if PACKAGED_SHIM.is_file():
        return PACKAGED_SHIM
    raise ShimUnavailable(
        f"no CNI launcher binary: {PACKAGED_SHIM} is missing (a package built without a C "
        "compiler?); reinstall from a wheel built with cc, make and libc6-dev"
    )


def build_shim(src_dir: Path = SHIM_SRC_DIR) -> Path:
    """``make -C src_dir`` unless ``cp-cni`` there is newer than its source and Makefile."""
    out = src_dir / "cp-cni"
    sources = [src_dir / _SOURCE, src_dir / "Makefile"]
    if out.is_file() and all(s.stat().st_mtime <= out.stat().st_mtime for s in sources):
        return out
    missing = [t for t in ("make", os.environ.get("CC", "cc")) if shutil.which(t) is None]
    if missing:
        raise ShimUnavailable(
            f"{out} is missing or stale and {' and '.join(missing)} not installed: install "
            f"cc, make and libc6-dev, then run `make -C {src_dir}`"
        )
    proc = subprocess.run(["make", "-C", str(src_dir)], capture_output=True, text=True, check=False)
    if proc.returncode != 0 or not out.is_file():
        raise ShimUnavailable(f"make -C {src_dir} failed:\n{proc.stdout}{proc.stderr}".rstrip())
    return out
