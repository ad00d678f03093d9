"""cp-agent: the node agent daemon (``python -m controlplane.agent.main``).

Exit status: 0 after SIGTERM/SIGINT; 1 on a fatal error; 2 on a bad flag or kvstore
configuration, or ``--datapath kernel`` without usable kernel maps (one line on stderr);
75 (``EXIT_RESTART``) when ``--restart-mode=exit`` and the kvstore went unhealthy, for a
supervisor to start the agent again.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Sequence

from controlplane.agent.agent import Agent, AgentExit
from controlplane.agent.datapath import DatapathUnavailable
from controlplane.agent.settings import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_USAGE,
    AgentSettings,
    build_parser,
    settings_from_args,
)
from controlplane.agent.stores import StoreConfig, check_store
from controlplane.config import ConfigError
from controlplane.flags import double_write_store_config
from controlplane.runtime import tune_gc


async def serve(settings: AgentSettings, store: StoreConfig) -> int:
    """Run one agent until a signal; returns the exit status."""
    try:
        agent = Agent(settings, store)
    except DatapathUnavailable as exc:
        print(f"cp-agent: {exc}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, agent.stop)
    task = asyncio.create_task(agent.run(), name="cp-agent")
    started = asyncio.create_task(agent.started.wait())
    await asyncio.wait({task, started}, return_when=asyncio.FIRST_COMPLETED)
    started.cancel()
    if agent.started.is_set():
        metrics = (
            f"http://{settings.telemetry_host}:{agent.telemetry.port}"
            if agent.telemetry is not None
            else "off"
        )
        print(
            f"cp-agent: node {settings.node}, api unix:{settings.api_socket}, metrics {metrics}",
            flush=True,
        )
    try:
        await task
    except AgentExit as exc:
        print(f"cp-agent: {exc}", file=sys.stderr, flush=True)
        return exc.status
    except OSError as exc:
        print(f"cp-agent: {exc}", file=sys.stderr, flush=True)
        return EXIT_FAILURE
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        store = double_write_store_config(args)
        check_store(store)
        settings = settings_from_args(args)
    except ConfigError as exc:
        print(f"cp-agent: {exc}", file=sys.stderr)
        return EXIT_USAGE
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for quiet in ("controlplane.kvstore", "controlplane.crd"):
        logging.getLogger(quiet).setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    tune_gc()
    try:
        return asyncio.run(serve(settings, store))
    except KeyboardInterrupt:
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
