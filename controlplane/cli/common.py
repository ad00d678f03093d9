"""What every cpctl command shares: kvstore flags, output, and one-line errors."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

# The flag helpers live beside the settings (the daemons use them too); commands import
# them from here with the output helpers.
from controlplane.flags import EXIT_USAGE as EXIT_USAGE
from controlplane.flags import Parser as Parser
from controlplane.flags import add_json_flag as add_json_flag
from controlplane.flags import add_kvstore_flags as add_kvstore_flags
from controlplane.flags import kvstore_config as kvstore_config
from controlplane.flags import positive_float as positive_float
from controlplane.flags import positive_int as positive_int

EXIT_OK = 0
EXIT_FAIL = 1


class CommandError(Exception):
    """A failure to report as one line on stderr, with an exit status."""

    def __init__(self, message: str, status: int = EXIT_FAIL) -> None:
        super().__init__(message)
        self.status = status


def print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, sort_keys=False, default=str)
    sys.stdout.write("\n")


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [[str(h) for h in headers]] + [["-" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for row in cells:
        print("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip())


def human_bytes(size: int | None) -> str | None:
    if size is None:
        return None
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return None
