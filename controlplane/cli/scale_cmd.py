"""`cpctl scale run SCENARIO`: the failure-injection scale harness (docs/scale.md).

Progress goes to stderr, one line per phase or fault; the report (result.json, summary.md,
plots) to ``--out`` (default ``scale-tests/results/<UTC stamp>-<scenario>/``); stdout gets
the summary, or the whole record with ``--json``. Exit 0 when every invariant and goal
held, 1 otherwise, 2 for a bad scenario file.
"""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from controlplane.cli.common import EXIT_FAIL, EXIT_OK, EXIT_USAGE, CommandError, print_json
from controlplane.scale.progress import Progress
from controlplane.scale.report import markdown, write_report
from controlplane.scale.runner import run_scenario
from controlplane.scale.scenario import ScenarioError, load_scenario

RESULTS = Path("scale-tests/results")


def register(subparsers: Any) -> None:
    scale = subparsers.add_parser("scale", help="failure-injection scale tests (docs/scale.md)")
    commands = scale.add_subparsers(dest="scale_command", required=True, metavar="COMMAND")
    run = commands.add_parser("run", help="run a scenario and write its report")
    run.add_argument("scenario", help="a name in scale-tests/scenarios/ or a TOML file")
    run.add_argument("--out", type=Path, help="report directory (default: a new stamped one)")
    run.add_argument("--json", action="store_true", help="print the whole record as JSON")
    run.set_defaults(run=_run)


async def _run(args: argparse.Namespace) -> int:
    try:
        scenario = load_scenario(args.scenario)
    except ScenarioError as exc:
        raise CommandError(str(exc), EXIT_USAGE) from None
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out: Path = args.out or RESULTS / f"{stamp}-{scenario.name}"
    record = await run_scenario(scenario, out, Progress())
    write_report(record, out)
    if args.json:
        print_json(record)
    else:
        print(markdown(record))
        print(f"report: {out}")
    return EXIT_OK if record["summary"]["passed"] else EXIT_FAIL
