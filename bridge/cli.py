"""`crm-bridge`: thin commands over the core (serve, check, simulate, migrate, status, dlq,
backfill, forget, schema, completion).

Exit codes: 0 done; 1 failed (the store cannot be reached, a CRM refuses the rules or no
connector could be checked with `check --online`), not found (`dlq`) or some lines invalid
(`backfill`); 2 bad usage or configuration, or a machine that cannot run the daemon as
configured (its port is taken, its store cannot be written): restarting cannot help; 70 an
unexpected error (a bug: one line here, the traceback in the log; `--debug` prints it);
130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sqlite3
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
from aiohttp import web

from bridge import __version__, backfill, dlq, lint, preflight, simulate, status
from bridge.check import check_online
from bridge.config import (
    DEFER_ALL,
    Config,
    json_schema,
    listen_problems,
    load_config,
    secret_values,
)
from bridge.errors import ConfigError, ConfigProblem, StoreUnavailable
from bridge.logs import JsonFormatter, mask_address, setup_logging
from bridge.models import normalise_email
from bridge.reload import Reloader
from bridge.server import STORE, create_app, runner_options
from bridge.store import Store, open_store
from bridge.systemd import Notifier, watchdog, watchdog_interval

T = TypeVar("T")

log = logging.getLogger("crm_bridge")

DEFAULT_CONFIG = Path("config.yaml")
EXIT_FAILED, EXIT_USAGE, EXIT_BUG, EXIT_INTERRUPTED = 1, 2, 70, 130
# Sections whose credentials the commands that call no CRM and serve no webhook never use:
# they load the config without them (the service's credentials exist only while it runs).
NO_CRM = ("connectors", "sources")


class Failed(Exception):
    """A command ends with one line for the user and an exit code."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


def _config_path(args: argparse.Namespace) -> Path:
    return DEFAULT_CONFIG if args.config is None else Path(args.config)


def _load(args: argparse.Namespace, *, defer: tuple[str, ...] = ()) -> Config:
    """The config the command names, checked by the daemon's own loader; SystemExit(2) with
    every problem listed when it is invalid."""
    path = _config_path(args)
    if not path.exists():
        given = "" if args.config is not None else " (the default)"
        raise Failed(
            f"no config file at {path.absolute()}{given}: pass one with --config PATH"
            " (config.example.yaml shows every setting)",
            EXIT_USAGE,
        )
    try:
        return load_config(path, credentials_dir=args.credentials_dir, defer=defer)
    except ConfigError as exc:
        _print_problems(exc.problems)
        raise SystemExit(EXIT_USAGE) from None


def _print_problems(problems: list[ConfigProblem]) -> None:
    print(f"crm-bridge: invalid configuration ({len(problems)} problem(s)):", file=sys.stderr)
    for problem in problems:
        print(f"  {problem}", file=sys.stderr)


def _store_problem(config: Config) -> tuple[str, bool] | None:
    """Why the daemon, as this user, could not keep its SQLite store where the config says."""
    if config.store.type != "sqlite":
        return None
    found = preflight.store_problem(config.store.path)
    if found is None:
        return None
    message, certain = found
    return f"store.path {config.store.path}: {message}", certain


def _store_failure(config: Config, exc: BaseException) -> str:
    """A store that cannot be opened, said the way `migrate` says it, whichever command."""
    if isinstance(exc, StoreUnavailable):
        return str(exc)
    reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    verb = "connect to" if config.store.type == "postgres" else "open"
    return f"cannot {verb} {config.store.describe()}: {reason}"


# What a store raises when it cannot be used; OSError too while it opens (a file it cannot
# create, a server it cannot reach).
STORE_FAULTS = (StoreUnavailable, sqlite3.Error, asyncpg.PostgresError)
OPEN_FAULTS = (*STORE_FAULTS, OSError)


# -- serve ----------------------------------------------------------------------------------


async def _serve(config: Config, sockets: list[socket.socket], config_path: Path) -> None:
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
    pinging: asyncio.Task[None] | None = None
    listening = False
    try:
        await runner.setup()  # opens the store, starts the workers and the router
        for sock in sockets:
            await web.SockSite(runner, sock).start()
        for address in runner.addresses:
            log.info(
                "listening on http://%s:%s",
                *address[:2],
                extra={"action": "server.listening", "url": f"http://{address[0]}:{address[1]}"},
            )
        listening = True
        reloader.prefix = "".join(f"http://{a[0]}:{a[1]}; " for a in runner.addresses)
        # Listening, workers and router running (the app's startup did that): ready.
        notifier.ready(reloader.status())
        reloader.start()
        if notifier.enabled and (interval := watchdog_interval()):
            pinging = asyncio.create_task(watchdog(notifier, interval, app[STORE].backlog))
        await stop.wait()
        notifier.stopping()
        log.info("stopping", extra={"action": "server.stopping"})
    finally:
        await reloader.close()  # a reload under way finishes first
        if pinging is not None:
            pinging.cancel()
            await asyncio.gather(pinging, return_exceptions=True)
        # Stops accepting, lets running handlers finish, then stops workers and the store;
        # after a failed start, stops whatever had started.
        await runner.cleanup()
        if listening:  # a start that failed is said in one line, by the caller
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
    config = _load(args)  # the warnings go to the log, once it is set up
    host = args.host or config.server.host
    port = config.server.port if args.port is None else args.port
    if args.host:  # the command line gets the config file's check
        if problems := listen_problems(config, host):
            _print_problems(problems)
            return EXIT_USAGE
    _log_to_stderr(config)
    for warning in config.warnings:
        log.warning("%s", warning, extra={"action": "config.readable_secret"})
    for warning in config.rule_warnings:
        log.warning("%s", warning, extra={"action": "config.rule_warning"})
    if (found := _store_problem(config)) is not None:
        log.error(  # the message names the user this runs as
            "%s",
            found[0],
            extra={"action": "server.store_unusable", "store": config.store.describe()},
        )
        return EXIT_USAGE
    try:
        # Before the store opens or a CRM is called: a taken port is one line, and nothing
        # else started has to be stopped.
        sockets = preflight.listen(host, port)
    except preflight.ListenError as exc:
        log.error("%s", exc.strerror, extra={"action": "server.cannot_listen"})
        return EXIT_USAGE
    try:
        asyncio.run(_serve(config, sockets, _config_path(args)))
    except STORE_FAULTS as exc:
        log.error("%s", _store_failure(config, exc), extra={"action": "server.store_unavailable"})
        return EXIT_FAILED
    finally:
        for sock in sockets:
            sock.close()
    return 0


# -- check and simulate -----------------------------------------------------------------------


def cmd_check(args: argparse.Namespace) -> int:
    path = _config_path(args)
    # Offline, the secrets need not be there yet (before the service's first start, systemd
    # has not handed them over): each one not read is a warning. --online logs in with them.
    config = _load(args, defer=() if args.online else DEFER_ALL)
    for warning in [*config.warnings, *config.rule_warnings]:
        print(f"crm-bridge: warning: {warning}", file=sys.stderr)
    for unread in config.unread:
        print(f"crm-bridge: warning: not checked: {unread}", file=sys.stderr)
    found = _store_problem(config)
    if found is not None and found[1]:
        print(f"crm-bridge: {found[0]}", file=sys.stderr)  # it names the user checking
        return EXIT_USAGE
    print(f"{path}: OK ({len(config.connectors)} connector(s), {len(config.rules)} rule(s))")
    for name, settings in config.connector_settings.items():
        mode = "live" if settings.has_credentials() else "dry run (no credentials)"
        print(f"  connector {name}: {settings.type}, {mode}")
    if found is not None:
        print(f"  warning: {found[0]}, unless the service manager makes it (StateDirectory=)")
    if (problem := preflight.interpreter_problem()) is not None:
        print(f"  warning: the service may not start: {problem}")
    if not args.online:
        return 0
    return _check_online(config)


def _check_online(config: Config) -> int:
    _log_to_stderr(config, "WARNING")  # what the connectors say goes through the redactor
    connectors = simulate.open_connectors(config, set(config.connector_settings))
    findings = asyncio.run(check_online(config, connectors))
    for finding in findings:
        prefix = "  " if finding.fatal else "  warning: "
        print(f"{prefix}{finding.problem}", file=sys.stderr if finding.fatal else sys.stdout)
    unchecked = list(dict.fromkeys(f.unchecked for f in findings if f.unchecked))
    checked = [name for name in connectors if name not in unchecked]
    fatal = [f for f in findings if f.fatal]
    if fatal:
        print(f"crm-bridge: {len(fatal)} problem(s) found online", file=sys.stderr)
        return EXIT_FAILED
    if not checked:
        print(
            "crm-bridge: online: no connector was checked"
            + (f" (not checked: {', '.join(unchecked)})" if unchecked else ""),
            file=sys.stderr,
        )
        return EXIT_FAILED
    if unchecked:
        print(f"online: checked {', '.join(checked)}; not checked: {', '.join(unchecked)}")
    print("online: every mapped field exists and accepts its values")
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    config = _load(args, defer=("sources",) if args.online else NO_CRM)
    try:
        data = simulate.read_event(args.event)
    except simulate.EventFileError as exc:
        raise Failed(str(exc), EXIT_USAGE) from None
    source = args.source or next(iter(config.sources), "supersend")
    if source not in config.sources:
        configured = ", ".join(config.sources) or "none"
        raise Failed(f"no source named {source!r}; configured: {configured}", EXIT_USAGE)
    result = simulate.simulate(config, data, source)
    if args.online:
        _log_to_stderr(config, "WARNING")  # what the connectors say goes through the redactor
    planned = asyncio.run(simulate.plan_online(result, config)) if args.online else None
    print(simulate.render(result, planned))
    return 0


# -- the store's commands ---------------------------------------------------------------------


def _on_store(config: Config, work: Callable[[Store], Awaitable[T]]) -> T:
    """Run `work` on the configured store, opened beside a daemon that may be running; a
    store that cannot be reached ends the command with one line, whichever command it is."""

    async def run() -> T:
        store = open_store(config.store, exclusive=False)
        try:
            await store.open()
        except OPEN_FAULTS as exc:
            raise Failed(_store_failure(config, exc)) from None
        try:
            return await work(store)
        finally:
            await store.close()

    try:
        return asyncio.run(run())
    except STORE_FAULTS as exc:
        raise Failed(_store_failure(config, exc)) from None


def _existing_store(args: argparse.Namespace) -> Config:
    # Reading the DLQ must not create an empty store where the config points by mistake (a
    # PostgreSQL store without its schema is refused by the store itself).
    config = _load(args, defer=NO_CRM)
    if config.store.type == "sqlite" and not config.store.path.exists():
        raise Failed(f"no store at {config.store.path}", EXIT_USAGE)
    return config


def cmd_dlq_list(args: argparse.Namespace) -> int:
    config = _existing_store(args)

    async def work(store: Store) -> tuple[list[dict[str, Any]], int] | None:
        if args.connector is not None and args.connector not in config.connectors:
            if args.connector not in await store.counts():  # nor one removed since
                return None
        return await dlq.list_dead(store, args.connector, args.limit)

    listed = _on_store(config, work)
    if listed is None:
        configured = ", ".join(config.connectors) or "none"
        raise Failed(f"no connector named {args.connector!r}; configured: {configured}", EXIT_USAGE)
    rows, total = listed
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
    config = _existing_store(args)
    delivery = _on_store(config, lambda store: store.delivery(args.id))
    if delivery is None:
        raise Failed(f"no delivery {args.id}")
    print(dlq.to_json(dlq.readable(delivery)))
    return 0


def cmd_dlq_retry(args: argparse.Namespace) -> int:
    config = _existing_store(args)
    queued, problem = _on_store(config, lambda store: dlq.retry(store, args.id, time.time()))
    if problem:
        raise Failed(problem)
    print(f"queued {queued} dead deliver{'y' if queued == 1 else 'ies'} again")
    return 0


def cmd_dlq_purge(args: argparse.Namespace) -> int:
    config = _existing_store(args)
    before = time.time() - args.older_than
    purged = _on_store(config, lambda store: store.purge_dead(before))
    print(
        f"purged {purged} dead deliver{'y' if purged == 1 else 'ies'}"
        f" last touched before {dlq.iso(before)}"
    )
    return 0


def cmd_forget(args: argparse.Namespace) -> int:
    try:
        email = normalise_email(args.email)
    except ValueError:
        email = None
    if email is None:
        raise Failed(f"not an email address: {mask_address(args.email)!r}", EXIT_USAGE)
    config = _existing_store(args)
    events, deliveries = _on_store(config, lambda store: store.forget(email))
    # The address is the operator's own input: echoing it masked keeps terminals and
    # scrollback free of it too.
    print(
        f"forgot {mask_address(args.email.strip())}: {events} event(s) and {deliveries} deliver"
        f"{'y' if deliveries == 1 else 'ies'} deleted from {config.store.describe()}"
    )
    return 0


def cmd_backfill(args: argparse.Namespace) -> int:
    config = _load(args, defer=NO_CRM)
    if not args.file.is_file():
        raise Failed(f"no such file: {args.file}", EXIT_USAGE)
    try:
        source = backfill.pick_source(config, args.source)
        summary = _on_store(
            config,
            lambda store: backfill.run_backfill(
                store,
                args.file,
                source=source,
                type_=args.type,
                fmt=args.format,
                other_types=tuple(lint.known_types(config)),
            ),
        )
    except backfill.BackfillError as exc:
        raise Failed(str(exc), EXIT_USAGE) from None
    print(backfill.render_summary(summary, args.file, source, args.type))
    if summary.interrupted:
        return EXIT_INTERRUPTED
    return 1 if summary.invalid else 0


def cmd_migrate(args: argparse.Namespace) -> int:
    config = _load(args, defer=NO_CRM)

    async def run() -> list[str]:
        return await open_store(config.store, exclusive=False).migrate()

    try:
        applied = asyncio.run(run())
    except OPEN_FAULTS as exc:
        raise Failed(_store_failure(config, exc)) from None
    where = config.store.describe()
    if applied:
        print(f"{where}: applied {', '.join(applied)}")
    else:
        print(f"{where}: the schema is up to date")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    config = _existing_store(args)
    report = _on_store(config, lambda store: status.gather(store, config, time.time()))
    print(dlq.to_json(report) if args.json else status.render(report))
    return 0


# -- schema and completion --------------------------------------------------------------------


def cmd_schema(args: argparse.Namespace) -> int:
    print(dlq.to_json(json_schema()))
    return 0


def cmd_completion(args: argparse.Namespace) -> int:
    print(completion_script(build_parser()))
    return 0


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _options(parser: argparse.ArgumentParser) -> list[str]:
    return [o for a in parser._actions for o in a.option_strings if o.startswith("--")]


def completion_script(parser: argparse.ArgumentParser) -> str:
    """A bash completion function for every command, subcommand and option of `parser`
    (zsh: `autoload bashcompinit && bashcompinit` first)."""
    cases: list[str] = []

    def walk(path: str, sub: argparse.ArgumentParser) -> None:
        children = _subcommands(sub)
        words = " ".join([*children, *_options(sub)])
        cases.append(f'        "{path}") words="{words}" ;;')
        for name, child in children.items():
            walk(f"{path} {name}".strip(), child)

    walk("", parser)
    body = "\n".join(cases)
    return f"""# crm-bridge completion for bash: eval "$(crm-bridge completion)"
_crm_bridge() {{
    local cur="${{COMP_WORDS[COMP_CWORD]}}" path="" word words
    for word in "${{COMP_WORDS[@]:1:COMP_CWORD-1}}"; do
        case "$word" in -*) ;; *) [[ -n $(_crm_bridge_words "$path $word") ]] && \\
            path="${{path:+$path }}$word" ;; esac
    done
    words=$(_crm_bridge_words "$path")
    case "$cur" in
        -*|"") COMPREPLY=($(compgen -W "$words" -- "$cur")) ;;
        *) COMPREPLY=($(compgen -W "$words" -- "$cur") $(compgen -f -- "$cur")) ;;
    esac
}}
_crm_bridge_words() {{
    local words=""
    case "${{1# }}" in
{body}
    esac
    echo "$words"
}}
complete -o filenames -F _crm_bridge crm-bridge"""


# -- arguments --------------------------------------------------------------------------------


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


def _common() -> argparse.ArgumentParser:
    """The options every command that reads the config takes."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        "-c",
        type=Path,
        default=None,
        metavar="PATH",
        help=f"the config file (default: {DEFAULT_CONFIG} in the current directory)",
    )
    common.add_argument(
        "--credentials-dir",
        type=Path,
        default=os.environ.get("CREDENTIALS_DIRECTORY") or None,
        metavar="DIR",
        help="read ${file:/run/credentials/<unit>/NAME} from DIR/NAME instead: the files"
        " systemd's LoadCredential= hands over (default: $CREDENTIALS_DIRECTORY)",
    )
    common.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="print the traceback of an unexpected error",
    )
    return common


def _add_dlq(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    dlq_parser = sub.add_parser(
        "dlq",
        help="inspect, retry or purge dead deliveries (daemon running or not)",
        description="Dead deliveries: those the CRM refused for good or that ran out of retries.",
    )
    actions = dlq_parser.add_subparsers(dest="dlq_command", required=True)
    list_ = actions.add_parser("list", parents=[common], help="dead deliveries, oldest first")
    list_.add_argument("--connector", help="only this connector's")
    list_.add_argument("--limit", type=_positive, default=100, help="at most this many (100)")
    list_.add_argument("--json", action="store_true", help="as a JSON array, errors in full")
    list_.set_defaults(func=cmd_dlq_list)
    show = actions.add_parser("show", parents=[common], help="one delivery with its event")
    show.add_argument("id", type=int)
    show.set_defaults(func=cmd_dlq_show)
    retry = actions.add_parser(
        "retry", parents=[common], help="queue dead deliveries again, with a fresh retry horizon"
    )
    which = retry.add_mutually_exclusive_group(required=True)
    which.add_argument("id", type=int, nargs="?", help="the dead delivery to retry")
    which.add_argument("--all", action="store_true", help="every dead delivery")
    retry.set_defaults(func=cmd_dlq_retry)
    purge = actions.add_parser("purge", parents=[common], help="delete old dead deliveries")
    purge.add_argument(
        "--older-than",
        type=_duration,
        required=True,
        metavar="AGE",
        help="last touched longer ago than this: 30m, 12h, 7d, 2w (0s: all)",
    )
    purge.set_defaults(func=cmd_dlq_purge)


def _add_backfill(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    parser = sub.add_parser(
        "backfill",
        parents=[common],
        help="store contacts from a CSV or JSON-lines file as events, as webhooks would be",
        description=(
            "Validate each line as a webhook and store it as an event (same idempotency key: a "
            "second run stores nothing new). The daemon's router applies the rules to it. CSV: "
            "the header names contact fields, empty cells are null. JSON lines: full webhook "
            "payloads, which keep their type, or bare contact objects. Rules match on type: "
            "bare contacts and CSV rows get --type, e.g. --type interest. Ctrl-C stops after "
            "the lines being stored and prints what was stored."
        ),
    )
    parser.add_argument("file", type=Path, help="a .csv, or a .jsonl/.ndjson file")
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


def _add_check_and_simulate(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    check = sub.add_parser(
        "check",
        parents=[common],
        help="validate a config file and exit",
        description=(
            "Load the config with the daemon's own loader and say what the daemon would refuse. "
            "Offline, a secret that cannot be read yet (a systemd credential before the "
            "service's first start, an unset variable) is a warning: --credentials-dir reads "
            "the files systemd will hand over. --online logs in with every secret."
        ),
    )
    check.add_argument(
        "--online",
        action="store_true",
        help="also log in to each connector and check every mapped field against the CRM",
    )
    check.set_defaults(func=cmd_check)
    sim = sub.add_parser(
        "simulate",
        parents=[common],
        help="show what the rules would do with one event, writing nothing",
        description=(
            "Evaluate the rules on one webhook payload: which matched, why the others did not, "
            "and the exact CRM operations they would queue. Nothing is stored or written. With "
            "--online, each connector reads the current record and a plan shows the fields "
            "that would change, from what to what, and those the CRM would refuse."
        ),
    )
    sim.add_argument("event", help="a JSON file holding one webhook payload (-: standard input)")
    sim.add_argument("--source", help="the configured source it came in on (default: first)")
    sim.add_argument("--online", action="store_true", help="read the CRM records: print a plan")
    sim.set_defaults(func=cmd_simulate)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="crm-bridge", description=__doc__)
    parser.add_argument("--version", action="version", version=f"crm-bridge {_version()}")
    parser.add_argument(
        "--debug", action="store_true", help="print the traceback of an unexpected error"
    )
    common = _common()
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", parents=[common], help="run the daemon")
    serve.add_argument("--host", help="override server.host")
    serve.add_argument("--port", type=int, help="override server.port (0: any free port)")
    serve.set_defaults(func=cmd_serve)
    _add_check_and_simulate(sub, common)
    migrate = sub.add_parser(
        "migrate",
        parents=[common],
        help="bring the store's schema up to date (PostgreSQL: apply pending migrations)",
        description=(
            "Apply the schema migrations the configured store lacks, in order, under a lock "
            "(safe while daemons run or start). SQLite makes its schema when it opens."
        ),
    )
    migrate.set_defaults(func=cmd_migrate)
    _add_dlq(sub, common)
    _add_backfill(sub, common)
    forget = sub.add_parser(
        "forget",
        parents=[common],
        help="delete a person's events and deliveries (dead letters too) from the store",
        description=(
            "Delete every stored event whose contact email is EMAIL (case-insensitive) and all "
            "their deliveries, whatever their status; works with the daemon running or not. "
            "What was already written to a CRM stays there: erase it in the CRM."
        ),
    )
    forget.add_argument("email")
    forget.set_defaults(func=cmd_forget)
    status_parser = sub.add_parser(
        "status",
        parents=[common],
        help="queue, dead letters and connector states (daemon running or not)",
        description=(
            "Queue depth, age of the oldest pending delivery, dead letters and the last error "
            "per connector, from the store; with the daemon answering on server.host:port, its "
            "connectors' circuit breakers too."
        ),
    )
    status_parser.add_argument("--json", action="store_true", help="as JSON, errors in full")
    status_parser.set_defaults(func=cmd_status)
    schema = sub.add_parser(
        "schema",
        help="print the JSON Schema of config.yaml (for editors: autocomplete, validation)",
    )
    schema.set_defaults(func=cmd_schema)
    completion = sub.add_parser(
        "completion",
        help='print a bash completion script: eval "$(crm-bridge completion)"',
        description="zsh: `autoload bashcompinit && bashcompinit` first.",
    )
    completion.set_defaults(func=cmd_completion)
    return parser


def _version() -> str:
    try:
        return metadata.version("crm-bridge")
    except metadata.PackageNotFoundError:  # run from a checkout that is not installed
        return __version__


# -- the top level ----------------------------------------------------------------------------


def _crash_log(text: str) -> str | None:
    """Keep a traceback in a file of its own (a command that is not the daemon has no log of
    its own); where, or None."""
    try:
        fd, path = tempfile.mkstemp(prefix="crm-bridge-error-", suffix=".log")
        with os.fdopen(fd, "w") as f:
            f.write(text)
    except OSError:
        return None
    return path


def _crashed(args: argparse.Namespace, exc: BaseException) -> int:
    """An exception no command expected: one line for the user, the traceback in the log (the
    daemon's JSON log, else a file of its own)."""
    text = "".join(traceback.format_exception(exc))
    summary = f"{type(exc).__name__}: {exc}".strip().splitlines()[0][:300]
    if getattr(args, "debug", False):
        sys.stderr.write(text)
        print(f"crm-bridge: unexpected error: {summary}", file=sys.stderr)
        return EXIT_BUG
    handlers = logging.getLogger().handlers if args.command == "serve" else []
    if any(isinstance(h.formatter, JsonFormatter) for h in handlers):
        # The journal: one JSON line, the traceback in it.
        log.error(
            "unexpected error: %s", summary, extra={"action": "server.crashed", "traceback": text}
        )
        where: str | None = "the log (action server.crashed)"
    else:
        where = _crash_log(text)
        if handlers:
            log.error(
                "unexpected error: %s (traceback: %s)",
                summary,
                where,
                extra={"action": "server.crashed"},
            )
    print(
        f"crm-bridge: unexpected error: {summary} (a bug: the traceback is in "
        f"{where or 'no file, the temporary directory is not writable'}; --debug prints it)",
        file=sys.stderr,
    )
    return EXIT_BUG


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except Failed as exc:
        print(f"crm-bridge: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `crm-bridge schema | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED
    except Exception as exc:  # noqa: BLE001  # the last resort: no traceback on a terminal
        return _crashed(args, exc)
