"""`crm-bridge`: thin commands over the core (serve, check)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from pathlib import Path

from aiohttp import web

from bridge.config import Config, load_config
from bridge.errors import ConfigError, StoreUnavailable
from bridge.logs import setup_logging
from bridge.server import create_app

log = logging.getLogger("crm_bridge")


def _load(path: Path) -> Config:
    try:
        return load_config(path)
    except ConfigError as exc:
        print(
            f"crm-bridge: invalid configuration ({len(exc.problems)} problem(s)):", file=sys.stderr
        )
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        raise SystemExit(2) from None


async def _serve(config: Config, host: str, port: int) -> None:
    app = create_app(config)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=config.server.shutdown_timeout)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    for address in runner.addresses:
        log.info(
            "listening on http://%s:%s",
            *address[:2],
            extra={"action": "server.listening", "url": f"http://{address[0]}:{address[1]}"},
        )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
        log.info("stopping", extra={"action": "server.stopping"})
    finally:
        # Stops accepting, lets running handlers finish, then stops workers and the store.
        await runner.cleanup()
        log.info("stopped", extra={"action": "server.stopped"})


def cmd_serve(args: argparse.Namespace) -> int:
    config = _load(args.config)
    setup_logging(config.logging.level, config.logging.format)
    host = args.host or config.server.host
    port = config.server.port if args.port is None else args.port
    try:
        asyncio.run(_serve(config, host, port))
    except StoreUnavailable as exc:
        log.error("%s", exc, extra={"action": "server.store_unavailable"})
        return 1
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    config = _load(args.config)
    print(f"{args.config}: OK ({len(config.connectors)} connector(s), {len(config.rules)} rule(s))")
    for name, settings in config.connector_settings.items():
        mode = "live" if settings.has_credentials() else "dry run (no credentials)"
        print(f"  connector {name}: {settings.type}, {mode}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="crm-bridge", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the daemon")
    serve.add_argument("--config", "-c", type=Path, default=Path("config.yaml"))
    serve.add_argument("--host", help="override server.host")
    serve.add_argument("--port", type=int, help="override server.port (0: any free port)")
    serve.set_defaults(func=cmd_serve)
    check = sub.add_parser("check", help="validate a config file and exit")
    check.add_argument("--config", "-c", type=Path, default=Path("config.yaml"))
    check.set_defaults(func=cmd_check)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        return int(args.func(args))
    return 130
