"""cpctl: the operator-facing CLI."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Sequence

from controlplane.cli import (
    bench_cmd,
    bpf_cmd,
    etcd_cmd,
    identity_cmd,
    ipam_cmd,
    kvstore_cmd,
    policy_cmd,
    scale_cmd,
    status_cmd,
    up_cmd,
    views_cmd,
)
from controlplane.cli.common import EXIT_FAIL, EXIT_USAGE, CommandError, Parser
from controlplane.config import ConfigError
from controlplane.kvstore.errors import KvstoreError

EXIT_INTERRUPTED = 130


def build_parser() -> Parser:
    parser = Parser(prog="cpctl", description="Operate the control plane and its kvstore.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=Parser
    )
    kvstore_cmd.register(commands)
    etcd_cmd.register(commands)
    up_cmd.register(commands)
    identity_cmd.register(commands)
    views_cmd.register_endpoint(commands)
    views_cmd.register_node(commands)
    ipam_cmd.register(commands)
    status_cmd.register(commands)
    policy_cmd.register(commands)
    bpf_cmd.register(commands)
    bench_cmd.register(commands)
    scale_cmd.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        status: int = asyncio.run(args.run(args))
    except CommandError as exc:
        print(f"cpctl: {exc}", file=sys.stderr)
        return exc.status
    except ConfigError as exc:
        print(f"cpctl: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KvstoreError as exc:
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
