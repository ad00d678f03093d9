"""cpctl: the operator-facing CLI."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence

from controlplane.cli import (
    bench_cmd,
    bpf_cmd,
    etcd_cmd,
    identity_cmd,
    ipam_cmd,
    kube_cmd,
    kvstore_cmd,
    migrate_cmd,
    observe_cmd,
    policy_cmd,
    scale_cmd,
    service_cmd,
    status_cmd,
    up_cmd,
    views_cmd,
)
from controlplane.cli.common import EXIT_FAIL, EXIT_USAGE, CommandError, Parser
from controlplane.config import ConfigError
from controlplane.store_types import StoreError

EXIT_INTERRUPTED = 130


def build_parser() -> Parser:
    parser = Parser(prog="cpctl", description="Operate the control plane and its kvstore.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=Parser
    )
    kvstore_cmd.register(commands)
    etcd_cmd.register(commands)
    kube_cmd.register(commands)
    up_cmd.register(commands)
    identity_cmd.register(commands)
    views_cmd.register_endpoint(commands)
    views_cmd.register_node(commands)
    ipam_cmd.register(commands)
    status_cmd.register(commands)
    observe_cmd.register(commands)
    policy_cmd.register(commands)
    service_cmd.register(commands)
    migrate_cmd.register(commands)
    bpf_cmd.register(commands)
    bench_cmd.register(commands)
    scale_cmd.register(commands)
    return parser


async def run_command(args: argparse.Namespace) -> int:
    """Run the command; SIGTERM and SIGHUP stop it as Ctrl-C does: it is cancelled, so it
    stops its children (etcd members, daemons) on its way out, and cpctl exits with
    128 + the signal's number."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    signalled: list[int] = []

    def stop(sig: signal.Signals) -> None:
        signalled.append(sig)
        task.cancel()

    for sig in (signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, stop, sig)
    try:
        status: int = await args.run(args)
        return status
    except asyncio.CancelledError:
        if signalled and task.uncancel() == 0:
            return 128 + signalled[0]
        raise
    finally:
        for sig in (signal.SIGTERM, signal.SIGHUP):
            loop.remove_signal_handler(sig)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        status = asyncio.run(run_command(args))
    except CommandError as exc:
        print(f"cpctl: {exc}", file=sys.stderr)
        return exc.status
    except ConfigError as exc:
        print(f"cpctl: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except StoreError as exc:  # kvstore and CRD mode alike: one line
        print(f"cpctl: {exc}", file=sys.stderr)
        return EXIT_FAIL
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader (a pager, head) went away; say nothing more.
        sys.stderr.close()
        return EXIT_FAIL
    return status


if __name__ == "__main__":
    sys.exit(main())
