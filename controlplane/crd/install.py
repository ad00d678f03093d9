"""Installing and upgrading the CRDs at operator start: idempotent, safe with two replicas
starting at once.

Each definition is created when absent; when present and different it is replaced with a
resourceVersion precondition, re-reading on 409 (another replica got there first). Then
we wait until each is Established, so the first request against it does not 404.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from importlib import resources as package_files
from typing import Any

import yaml

from controlplane.crd.client import JSON, KubeClient
from controlplane.crd.errors import AlreadyExists, Conflict, CrdError
from controlplane.crd.resources import CRDS

log = logging.getLogger(__name__)
ATTEMPTS = 8


def definitions() -> list[JSON]:
    """The CRDs this version ships, from ``controlplane/crd/definitions``."""
    folder = package_files.files("controlplane.crd") / "definitions"
    out: list[JSON] = []
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".yaml"):
            out.append(yaml.safe_load(entry.read_text()))
    return out


def _covers(current: object, wanted: object) -> bool:
    """``current`` has everything ``wanted`` says (the server adds defaults of its own)."""
    if isinstance(wanted, dict):
        return isinstance(current, dict) and all(
            k in current and _covers(current[k], v) for k, v in wanted.items()
        )
    if isinstance(wanted, list):
        return (
            isinstance(current, list)
            and len(current) == len(wanted)
            and all(_covers(c, w) for c, w in zip(current, wanted, strict=True))
        )
    return current == wanted


def _differs(current: JSON, wanted: JSON) -> bool:
    labels = current.get("metadata", {}).get("labels") or {}
    return not _covers(current.get("spec"), wanted["spec"]) or not _covers(
        labels, wanted["metadata"].get("labels") or {}
    )


def _established(crd: JSON) -> bool:
    conditions = (crd.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Established" and c.get("status") == "True" for c in conditions)


async def install_crds(
    client: KubeClient,
    *,
    timeout: float = 60.0,
    progress: Callable[[str], None] | None = None,
) -> list[str]:
    """Create or upgrade every CRD; return what was done, one line each."""
    done: list[str] = []
    for wanted in definitions():
        done.append(await _install_one(client, wanted))
        if progress is not None:
            progress(done[-1])
    deadline = time.monotonic() + timeout
    for wanted in definitions():
        name = wanted["metadata"]["name"]
        while True:
            current = await client.get_or_none(CRDS, name)
            if current is not None and _established(current):
                break
            if time.monotonic() > deadline:
                raise CrdError(f"CRD {name} is not Established after {timeout:g}s")
            await asyncio.sleep(0.2)
    return done


async def _install_one(client: KubeClient, wanted: JSON) -> str:
    name = wanted["metadata"]["name"]
    for _ in range(ATTEMPTS):
        current = await client.get_or_none(CRDS, name)
        if current is None:
            try:
                await client.create(CRDS, wanted)
            except AlreadyExists:
                continue  # another replica created it: compare with theirs
            log.info("created CRD %s", name)
            return f"created {name}"
        if not _differs(current, wanted):
            return f"unchanged {name}"
        body: dict[str, Any] = dict(current)
        body["spec"] = wanted["spec"]
        meta = dict(current["metadata"])
        meta["labels"] = {**(meta.get("labels") or {}), **(wanted["metadata"].get("labels") or {})}
        body["metadata"] = meta
        try:
            await client.replace(CRDS, body)
        except Conflict:
            continue
        log.info("upgraded CRD %s", name)
        return f"upgraded {name}"
    raise CrdError(f"CRD {name}: kept changing under us ({ATTEMPTS} attempts)")
