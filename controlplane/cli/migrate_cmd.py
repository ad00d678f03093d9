"""`cpctl migrate`: move a cluster's state between CRD mode and kvstore mode.

    cpctl migrate --from crd --to kvstore --kubeconfig F --kvstore-endpoints URLS [--dry-run]
    cpctl migrate --from kvstore --to crd ...
    cpctl migrate status --kubeconfig F --kvstore-endpoints URLS

The copy writes what the source has and the target lacks (identities with their numbers,
nodes, pod CIDR claims, IP leases, endpoints with their IPs, policies, services when both
modes have them); it checks everything first and writes nothing when the target holds a
conflicting record (exit 1, one line). A second run writes nothing and says so; a run
cut short is finished by the next. ``status`` shows the drift per resource and exits 0
only when there is none. See docs/operations.md, "Moving between CRD and kvstore mode".
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from controlplane.cli.common import EXIT_FAIL, EXIT_OK, CommandError, print_json, print_table
from controlplane.config import ConfigError, CrdConfig, KvstoreConfig
from controlplane.flags import add_json_flag, add_kvstore_flags, kvstore_config, positive_int
from controlplane.metrics import StoreMetrics
from controlplane.migrate.plan import RESOURCES, drift, read_snapshot
from controlplane.migrate.run import Conflicts, copy_missing
from controlplane.migrate.side import open_side

MODES = ("crd", "kvstore")
SHOWN = 20
"""Records listed per resource by --dry-run (the rest are counted)."""


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "migrate",
        help="copy state between CRD mode and kvstore mode; show their drift",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    parser.add_argument(
        "action",
        nargs="?",
        choices=("copy", "status"),
        default="copy",
        help="copy (the default: needs --from and --to) or status (the drift)",
    )
    parser.add_argument("--from", dest="source", choices=MODES, help="the store to copy from")
    parser.add_argument("--to", dest="target", choices=MODES, help="the store to copy into")
    parser.add_argument("--dry-run", action="store_true", help="print the plan; write nothing")
    parser.add_argument(
        "--pool",
        action="append",
        metavar="NAME",
        help="CIDR pool whose claims are copied (repeatable; default: default)",
    )
    parser.add_argument("--cluster-name", default="default", help="kvstore key cluster part")
    parser.add_argument(
        "--lease-ttl",
        type=positive_int,
        default=900,
        metavar="SECONDS",
        help="TTL of the etcd lease that holds copied endpoints, node records, IP leases "
        "and identity references until the node's agent adopts them (default 900, the "
        "agent's --lease-ttl)",
    )
    group = parser.add_argument_group("CRD mode")
    group.add_argument("--kubeconfig", metavar="FILE", help="kubeconfig of the Kubernetes API")
    group.add_argument("--kube-context", metavar="NAME", help="kubeconfig context to use")
    add_kvstore_flags(parser)
    add_json_flag(parser)
    parser.set_defaults(run=run)


def configs(args: argparse.Namespace) -> dict[str, KvstoreConfig | CrdConfig]:
    """Both stores the flags name (raises ConfigError with one line)."""
    return {
        "crd": CrdConfig(
            kubeconfig=args.kubeconfig, context=args.kube_context, request_timeout=args.timeout
        ),
        "kvstore": kvstore_config(args),
    }


async def run(args: argparse.Namespace) -> int:
    if args.action == "status":
        return await run_status(args)
    if args.source is None or args.target is None:
        raise ConfigError("migrate: give --from and --to (crd, kvstore)")
    if args.source == args.target:
        raise ConfigError(f"migrate: --from and --to are both {args.source}")
    stores = configs(args)
    pools = args.pool or ["default"]
    metrics = StoreMetrics.create()
    reported: dict[str, int] = {}

    def progress(resource: str, done: int, total: int) -> None:
        step = max(1, total // 10)
        if done == total or done - reported.get(resource, 0) >= step:
            reported[resource] = done
            print(f"migrate: {resource}: {done}/{total} written", file=sys.stderr, flush=True)

    async with (
        open_side(stores[args.source], metrics, cluster=args.cluster_name) as source,
        open_side(
            stores[args.target], metrics, cluster=args.cluster_name, lease_ttl=args.lease_ttl
        ) as target,
    ):
        print(f"migrate: from {source.describe} to {target.describe}", file=sys.stderr)
        try:
            outcome = await copy_missing(
                source, target, pools=pools, dry_run=args.dry_run, progress=progress
            )
        except Conflicts as exc:
            if args.json:
                print_json({**exc.plan.to_json(), "written": {}, "failed": []})
            else:
                for line in exc.plan.conflicts[1:]:
                    print(f"migrate: conflict: {line}", file=sys.stderr)
            raise CommandError(f"migrate: {exc}") from None
    plan = outcome.plan
    if args.json:
        print_json({**outcome.to_json(), "dry_run": args.dry_run})
        return EXIT_FAIL if outcome.failed else EXIT_OK
    for line in plan.skipped:
        print(f"migrate: skipped {line}", file=sys.stderr)
    rows = [
        [r, plan.present.get(r, 0), len(plan.copies.get(r, [])), outcome.written.get(r, "-")]
        for r in RESOURCES
        if r in plan.present
    ]
    print_table(["RESOURCE", "PRESENT", "TO WRITE", "WRITTEN"], rows)
    if args.dry_run:
        for resource in RESOURCES:
            items = plan.copies.get(resource, [])
            for item in items[:SHOWN]:
                print(f"  would write {resource[:-1] if resource != 'policies' else 'policy'}: "
                      f"{_describe(item)}")  # fmt: skip
            if len(items) > SHOWN:
                print(f"  ... and {len(items) - SHOWN} more {resource}")
    if plan.writes == 0:
        print(f"migrate: nothing to do: {plan.target} has everything {plan.source} has")
    elif args.dry_run:
        print(f"migrate: dry run: {plan.writes} records would be written; nothing written")
    else:
        total = sum(outcome.written.values())
        print(f"migrate: {total} records written to {plan.target}")
    for line in outcome.failed:
        print(f"migrate: not written (the target changed meanwhile): {line}", file=sys.stderr)
    if outcome.failed:
        print("migrate: run it again to finish", file=sys.stderr)
        return EXIT_FAIL
    return EXIT_OK


def _describe(item: Any) -> str:
    if isinstance(item, list):  # one pod's addresses, one node's leases
        return "; ".join(_describe(x) for x in item)
    to_dict = getattr(item, "to_dict", None)
    if to_dict is not None:
        return " ".join(f"{k}={v}" for k, v in to_dict().items())
    return str(item)


async def run_status(args: argparse.Namespace) -> int:
    stores = configs(args)
    pools = args.pool or ["default"]
    metrics = StoreMetrics.create()
    async with (
        open_side(stores["crd"], metrics, cluster=args.cluster_name) as crd,
        open_side(stores["kvstore"], metrics, cluster=args.cluster_name) as kv,
    ):
        found = drift(await read_snapshot(crd, pools), await read_snapshot(kv, pools))
    if args.json:
        print_json(found.to_json())
    else:
        rows = [
            [r, c["only_crd"], c["only_kvstore"], c["different"]] for r, c in found.counts.items()
        ]
        print_table(["RESOURCE", "ONLY-CRD", "ONLY-KVSTORE", "DIFFERENT"], rows)
        for resource, lines in found.examples.items():
            for line in lines:
                print(f"  {resource}: {line}")
        if found.total == 0:
            print("migrate status: no drift: both stores hold the same records")
        else:
            print(f"migrate status: {found.total} records differ", file=sys.stderr)
    return EXIT_OK if found.total == 0 else EXIT_FAIL
