"""cp-operator: the operator daemon's entry point (its control loop is built in a later issue)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from controlplane.flags import Parser, add_kvstore_flags


def build_parser() -> Parser:
    parser = Parser(prog="cp-operator", description="The control plane's operator daemon.")
    add_kvstore_flags(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    build_parser().parse_args(argv)
    print("cp-operator: the daemon is not runnable yet; see --help", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
