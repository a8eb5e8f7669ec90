"""`crm-bridge`: thin commands over the core (serve, check, simulate, migrate, status, dlq,
backfill, forget).

Exit codes: 0 done, 1 failed or not found (`dlq`) or some lines invalid (`backfill`) or a CRM
refuses the rules (`check --online`), 2 bad usage or configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from aiohttp import web

from bridge import backfill, dlq, simulate, status
from bridge.check import check_online
from bridge.config import Config, load_config, secret_values
from bridge.errors import ConfigError, StoreUnavailable
from bridge.logs import mask_address, setup_logging
from bridge.reload import Reloader
from bridge.server import STORE, create_app, runner_options
from bridge.store import Store, open_store
from bridge.systemd import Notifier, watchdog, watchdog_interval

T = TypeVar("T")

log = logging.getLogger("crm_bridge")


def _load(path: Path, *, warn: bool = False) -> Config:
    try:
        config = load_config(path)
    except ConfigError as exc:
        print(
            f"crm-bridge: invalid configuration ({len(exc.problems)} problem(s)):", file=sys.stderr
        )
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        raise SystemExit(2) from None
    if warn:
        for warning in config.warnings:
            print(f"crm-bridge: warning: {warning}", file=sys.stderr)
    return config


async def _serve(config: Config, host: str, port: int, config_path: Path) -> None:
    app = create_app(config)
    notifier = Notifier()  # systemd (Type=notify); a no-op without $NOTIFY_SOCKET
    reloader = Reloader(app, config_path, notifier)
    loop = asyncio.get_running_loop()
    # SIGHUP reloads the config (systemctl reload); one that comes while starting waits.
    loop.add_signal_handler(signal.SIGHUP, reloader.request)
    # Before "listening" is logged: a SIGTERM sent as soon as that line shows stops cleanly.
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runner = web.AppRunner(app, **runner_options(config))
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    for address in runner.addresses:
        log.info(
            "listening on http://%s:%s",
            *address[:2],
            extra={"action": "server.listening", "url": f"http://{address[0]}:{address[1]}"},
        )
    reloader.prefix = "".join(f"http://{a[0]}:{a[1]}; " for a in runner.addresses)
    # Listening, workers and router running (the app's startup did that): ready.
    notifier.ready(reloader.status())
    reloader.start()
    pinging: asyncio.Task[None] | None = None
    if notifier.enabled and (interval := watchdog_interval()):
        pinging = asyncio.create_task(watchdog(notifier, interval, app[STORE].backlog))
    try:
        await stop.wait()
        notifier.stopping()
        log.info("stopping", extra={"action": "server.stopping"})
    finally:
        await reloader.close()  # a reload under way finishes first
        if pinging is not None:
            pinging.cancel()
            await asyncio.gather(pinging, return_exceptions=True)
        # Stops accepting, lets running handlers finish, then stops workers and the store.
        await runner.cleanup()
        log.info("stopped", extra={"action": "server.stopped"})
        notifier.close()


def _log_to_stderr(config: Config, level: str | None = None) -> None:
    """The daemon's logging (one redactor for every line) for a command that logs in to CRMs."""
    setup_logging(
        level or config.logging.level,
        config.logging.format,
        mask_personal_data=config.logging.mask_personal_data,
        secrets=secret_values(config),
    )


def cmd_serve(args: argparse.Namespace) -> int:
    config = _load(args.config)  # the warnings go to the log, once it is set up
    _log_to_stderr(config)
    for warning in config.warnings:
        log.warning("%s", warning, extra={"action": "config.readable_secret"})
    host = args.host or config.server.host
    port = config.server.port if args.port is None else args.port
    try:
        asyncio.run(_serve(config, host, port, args.config))
    except StoreUnavailable as exc:
        log.error("%s", exc, extra={"action": "server.store_unavailable"})
        return 1
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    config = _load(args.config, warn=True)
    print(f"{args.config}: OK ({len(config.connectors)} connector(s), {len(config.rules)} rule(s))")
    for name, settings in config.connector_settings.items():
        mode = "live" if settings.has_credentials() else "dry run (no credentials)"
        print(f"  connector {name}: {settings.type}, {mode}")
    if not args.online:
        return 0
    _log_to_stderr(config, "WARNING")  # what the connectors say goes through the redactor
    connectors = simulate.open_connectors(config, set(config.connector_settings))
    findings = asyncio.run(check_online(config, connectors))
    for finding in findings:
        prefix = "  " if finding.fatal else "  warning: "
        print(f"{prefix}{finding.problem}", file=sys.stderr if finding.fatal else sys.stdout)
    fatal = [f for f in findings if f.fatal]
    if fatal:
        print(f"crm-bridge: {len(fatal)} problem(s) found online", file=sys.stderr)
        return 1
    print("online: every mapped field exists and accepts its values")
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    config = _load(args.config)
    try:
        data = simulate.read_event(args.event)
    except simulate.EventFileError as exc:
        print(f"crm-bridge: {exc}", file=sys.stderr)
        return 2
    source = args.source or next(iter(config.sources), "supersend")
    if source not in config.sources:
        print(f"crm-bridge: no source named {source!r}", file=sys.stderr)
        return 2
    result = simulate.simulate(config, data, source)
    if args.online:
        _log_to_stderr(config, "WARNING")  # what the connectors say goes through the redactor
    planned = asyncio.run(simulate.plan_online(result, config)) if args.online else None
    print(simulate.render(result, planned))
    return 0


def _on_store(config: Config, work: Callable[[Store], Awaitable[T]]) -> T:
    """Run `work` on the configured store, opened beside a daemon that may be running."""

    async def run() -> T:
        store = open_store(config.store, exclusive=False)
        await store.open()
        try:
            return await work(store)
        finally:
            await store.close()

    try:
        return asyncio.run(run())
    except StoreUnavailable as exc:
        print(f"crm-bridge: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


def _existing_store(config: Config) -> Config:
    # Reading the DLQ must not create an empty store where the config points by mistake (a
    # PostgreSQL store without its schema is refused by the store itself).
    if config.store.type == "sqlite" and not config.store.path.exists():
        print(f"crm-bridge: no store at {config.store.path}", file=sys.stderr)
        raise SystemExit(2)
    return config


def cmd_dlq_list(args: argparse.Namespace) -> int:
    config = _existing_store(_load(args.config))
    rows, total = _on_store(config, lambda store: dlq.list_dead(store, args.connector, args.limit))
    if args.json:
        print(dlq.to_json([dlq.readable(r) for r in rows]))
    elif not rows:
        print("no dead deliveries")
    else:
        print(dlq.render_table(rows))
        if total > len(rows):
            print(f"({len(rows)} of {total} shown; raise --limit to see more)")
    return 0


def cmd_dlq_show(args: argparse.Namespace) -> int:
    config = _existing_store(_load(args.config))
    delivery = _on_store(config, lambda store: store.delivery(args.id))
    if delivery is None:
        print(f"crm-bridge: no delivery {args.id}", file=sys.stderr)
        return 1
    print(dlq.to_json(dlq.readable(delivery)))
    return 0


def cmd_dlq_retry(args: argparse.Namespace) -> int:
    config = _existing_store(_load(args.config))
    queued, problem = _on_store(config, lambda store: dlq.retry(store, args.id, time.time()))
    if problem:
        print(f"crm-bridge: {problem}", file=sys.stderr)
        return 1
    print(f"queued {queued} dead deliver{'y' if queued == 1 else 'ies'} again")
    return 0


def cmd_dlq_purge(args: argparse.Namespace) -> int:
    config = _existing_store(_load(args.config))
    before = time.time() - args.older_than
    purged = _on_store(config, lambda store: store.purge_dead(before))
    print(
        f"purged {purged} dead deliver{'y' if purged == 1 else 'ies'}"
        f" last touched before {dlq.iso(before)}"
    )
    return 0


def cmd_forget(args: argparse.Namespace) -> int:
    config = _existing_store(_load(args.config))
    events, deliveries = _on_store(config, lambda store: store.forget(args.email))
    # The address is the operator's own input: echoing it masked keeps terminals and
    # scrollback free of it too.
    print(
        f"forgot {mask_address(args.email)}: {events} event(s) and {deliveries} deliver"
        f"{'y' if deliveries == 1 else 'ies'} deleted from {config.store.describe()}"
    )
    return 0


def cmd_backfill(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if not args.file.is_file():
        print(f"crm-bridge: no such file: {args.file}", file=sys.stderr)
        return 2
    try:
        source = backfill.pick_source(config, args.source)
        summary = _on_store(
            config,
            lambda store: backfill.run_backfill(
                store, args.file, source=source, type_=args.type, fmt=args.format
            ),
        )
    except backfill.BackfillError as exc:
        print(f"crm-bridge: {exc}", file=sys.stderr)
        return 2
    print(backfill.render_summary(summary, args.file, source, args.type))
    return 1 if summary.invalid else 0


def cmd_migrate(args: argparse.Namespace) -> int:
    config = _load(args.config)

    async def run() -> list[str]:
        return await open_store(config.store, exclusive=False).migrate()

    try:
        applied = asyncio.run(run())
    except StoreUnavailable as exc:
        print(f"crm-bridge: {exc}", file=sys.stderr)
        return 1
    where = config.store.describe()
    if applied:
        print(f"{where}: applied {', '.join(applied)}")
    else:
        print(f"{where}: the schema is up to date")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    config = _existing_store(_load(args.config))
    report = _on_store(config, lambda store: status.gather(store, config, time.time()))
    print(dlq.to_json(report) if args.json else status.render(report))
    return 0


def _duration(text: str) -> float:
    try:
        return dlq.parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _event_type(text: str) -> str:
    if not 1 <= len(text) <= 64:
        raise argparse.ArgumentTypeError("an event type has 1 to 64 characters")
    return text


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _add_dlq(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    config = argparse.ArgumentParser(add_help=False)
    config.add_argument("--config", "-c", type=Path, default=Path("config.yaml"))
    dlq_parser = sub.add_parser(
        "dlq",
        help="inspect, retry or purge dead deliveries (daemon running or not)",
        description="Dead deliveries: those the CRM refused for good or that ran out of retries.",
    )
    actions = dlq_parser.add_subparsers(dest="dlq_command", required=True)
    list_ = actions.add_parser("list", parents=[config], help="dead deliveries, oldest first")
    list_.add_argument("--connector", help="only this connector's")
    list_.add_argument("--limit", type=_positive, default=100, help="at most this many (100)")
    list_.add_argument("--json", action="store_true", help="as a JSON array, errors in full")
    list_.set_defaults(func=cmd_dlq_list)
    show = actions.add_parser("show", parents=[config], help="one delivery with its event")
    show.add_argument("id", type=int)
    show.set_defaults(func=cmd_dlq_show)
    retry = actions.add_parser(
        "retry", parents=[config], help="queue dead deliveries again, with a fresh retry horizon"
    )
    which = retry.add_mutually_exclusive_group(required=True)
    which.add_argument("id", type=int, nargs="?", help="the dead delivery to retry")
    which.add_argument("--all", action="store_true", help="every dead delivery")
    retry.set_defaults(func=cmd_dlq_retry)
    purge = actions.add_parser("purge", parents=[config], help="delete old dead deliveries")
    purge.add_argument(
        "--older-than",
        type=_duration,
        required=True,
        metavar="AGE",
        help="last touched longer ago than this: 30m, 12h, 7d, 2w (0s: all)",
    )
    purge.set_defaults(func=cmd_dlq_purge)


def _add_backfill(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "backfill",
        help="store contacts from a CSV or JSON-lines file as events, as webhooks would be",
        description=(
            "Validate each line as a webhook and store it as an event (same idempotency key: a "
            "second run stores nothing new). The daemon's router applies the rules to it. CSV: "
            "the header names contact fields, empty cells are null. JSON lines: full webhook "
            "payloads, which keep their type, or bare contact objects. Rules match on type: "
            "bare contacts and CSV rows get --type, e.g. --type interest."
        ),
    )
    parser.add_argument("file", type=Path, help="a .csv, or a .jsonl/.ndjson file")
    parser.add_argument("--config", "-c", type=Path, default=Path("config.yaml"))
    parser.add_argument("--source", help="the configured source to store under (default: first)")
    parser.add_argument(
        "--type",
        type=_event_type,
        default=backfill.DEFAULT_TYPE,
        help=f"event type of bare contacts and CSV rows (default: {backfill.DEFAULT_TYPE})",
    )
    parser.add_argument(
        "--format", choices=["csv", "jsonl"], help="default: from the extension, else the content"
    )
    parser.set_defaults(func=cmd_backfill)


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
    check.add_argument(
        "--online",
        action="store_true",
        help="also log in to each connector and check every mapped field against the CRM",
    )
    check.set_defaults(func=cmd_check)
    sim = sub.add_parser(
        "simulate",
        help="show what the rules would do with one event, writing nothing",
        description=(
            "Evaluate the rules on one webhook payload: which matched, why the others did not, "
            "and the exact CRM operations they would queue. Nothing is stored or written. With "
            "--online, each connector reads the current record and a plan shows the fields "
            "that would change, from what to what."
        ),
    )
    sim.add_argument("event", help="a JSON file holding one webhook payload")
    sim.add_argument("--config", "-c", type=Path, default=Path("config.yaml"))
    sim.add_argument("--source", help="the configured source it came in on (default: first)")
    sim.add_argument("--online", action="store_true", help="read the CRM records: print a plan")
    sim.set_defaults(func=cmd_simulate)
    migrate = sub.add_parser(
        "migrate",
        help="bring the store's schema up to date (PostgreSQL: apply pending migrations)",
        description=(
            "Apply the schema migrations the configured store lacks, in order, under a lock "
            "(safe while daemons run or start). SQLite makes its schema when it opens."
        ),
    )
    migrate.add_argument("--config", "-c", type=Path, default=Path("config.yaml"))
    migrate.set_defaults(func=cmd_migrate)
    _add_dlq(sub)
    _add_backfill(sub)
    forget = sub.add_parser(
        "forget",
        help="delete a person's events and deliveries (dead letters too) from the store",
        description=(
            "Delete every stored event whose contact email is EMAIL (case-insensitive) and all "
            "their deliveries, whatever their status; works with the daemon running or not. "
            "What was already written to a CRM stays there: erase it in the CRM."
        ),
    )
    forget.add_argument("email")
    forget.add_argument("--config", "-c", type=Path, default=Path("config.yaml"))
    forget.set_defaults(func=cmd_forget)
    status_parser = sub.add_parser(
        "status",
        help="queue, dead letters and connector states (daemon running or not)",
        description=(
            "Queue depth, age of the oldest pending delivery, dead letters and the last error "
            "per connector, from the store; with the daemon answering on server.host:port, its "
            "connectors' circuit breakers too."
        ),
    )
    status_parser.add_argument("--config", "-c", type=Path, default=Path("config.yaml"))
    status_parser.add_argument("--json", action="store_true", help="as JSON, errors in full")
    status_parser.set_defaults(func=cmd_status)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        return int(args.func(args))
    return 130
