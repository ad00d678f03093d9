"""The operator's `cp_migration_drift{resource,side}` gauges, from real cp-operator
processes in both modes, each given the other mode's store as its migration peer: the
drift shows what only one store has, and falls to zero once `cpctl migrate` copied it."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path

import pytest
from helpers import eventually
from test_migrate import (  # the two stores side by side, and the state a node writes
    Cluster,
    cluster,
    crd_node,
    populate,
)
from test_operator import OperatorProcess

from controlplane.config import ConfigError
from controlplane.metrics import StoreMetrics
from controlplane.migrate.run import copy_missing
from controlplane.migrate.side import open_side
from controlplane.operator.main import build_parser, settings_from_args

__all__ = ["cluster"]  # the fixture, re-exported for pytest


@contextlib.asynccontextmanager
async def stopping(*procs: OperatorProcess) -> AsyncIterator[None]:
    try:
        yield
    finally:
        for proc in procs:
            await proc.stop()


async def drift_of(proc: OperatorProcess, resource: str, side: str) -> float | None:
    return await proc.sample("cp_migration_drift", f'resource="{resource}",side="{side}"')


async def test_both_operators_export_the_drift_until_the_copy_closes_it(
    cluster: Cluster, tmp_path: Path
) -> None:
    async with crd_node(cluster, "node-a") as stores:
        await populate(stores, "node-a", crd_client=cluster.client)

    kv_op = OperatorProcess(
        tmp_path,
        "op-kv",
        list(cluster.etcd.client_urls),
        f"--migration-peer-kubeconfig={cluster.server.kubeconfig}",
        "--migration-drift-interval=0.3",
    )
    crd_op = OperatorProcess(tmp_path, "op-crd", [])
    crd_op.args = [
        *crd_op.args[:3],
        "--store=crd",
        f"--kubeconfig={cluster.server.kubeconfig}",
        "--id=op-crd",
        "--metrics-address=127.0.0.1:0",
        f"--migration-peer-kvstore-endpoints={','.join(cluster.etcd.client_urls)}",
        "--migration-drift-interval=0.3",
    ]
    async with stopping(kv_op, crd_op):
        # crd -> kvstore: the CRD-mode operator (the cluster's mode) watches the drift
        crd_op.start()
        await eventually(
            lambda: _is(drift_of(crd_op, "endpoints", "only_crd"), 2.0),
            timeout=30,
            message="op-crd reports 2 endpoints only in CRD",
        )
        assert await drift_of(crd_op, "endpoints", "only_kvstore") == 0.0
        assert await drift_of(crd_op, "identities", "only_crd") == 2.0
        assert await drift_of(crd_op, "nodes", "different") == 0.0

        metrics = StoreMetrics.create()
        async with (
            open_side(cluster.crd, metrics) as source,
            open_side(cluster.kv, metrics) as target,
        ):
            await copy_missing(source, target)
        await eventually(
            lambda: _is(crd_op.sample("cp_migration_drift_total"), 0.0),
            timeout=30,
            message="op-crd reports no drift",
        )
        # the kvstore-mode operator, started once the copy is done (it restores the copied
        # CIDR claims when its term starts), sees none either
        kv_op.start()
        await eventually(
            lambda: _positive(kv_op.sample("cp_migration_drift_last_success_timestamp_seconds")),
            timeout=30,
            message="op-kv computed the drift",
        )
        assert await kv_op.sample("cp_migration_drift_total") == 0.0
        assert await drift_of(kv_op, "cidrs", "only_kvstore") == 0.0
        assert "Traceback" not in kv_op.log() + crd_op.log()


async def _positive(value: Awaitable[float | None]) -> bool:
    found = await value
    return found is not None and found > 0


async def _is(value: Awaitable[float | None], want: float) -> bool:
    return await value == want


def test_a_peer_of_the_same_mode_is_a_usage_error() -> None:
    args = build_parser().parse_args(
        ["--store=kvstore", "--kvstore-endpoints=http://127.0.0.1:2379",
         "--migration-peer-kvstore-endpoints=http://127.0.0.1:2380"]
    )  # fmt: skip
    with pytest.raises(ConfigError, match="other mode"):
        settings_from_args(args)
