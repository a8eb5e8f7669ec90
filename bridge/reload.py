"""Reload on SIGHUP (`systemctl reload crm-bridge`): the config file read again, applied live.

The file is read with the same loader as at start (`load_config`). An invalid file changes
nothing: every problem is logged (file:line:column: key: message) and the old config keeps
running. A valid one applies, as a restart would:

- `rules`: the router evaluates each batch with one RuleSet; the new one is assigned between
  batches. Deliveries already queued keep the operations they were made with (stored frozen).
- `sources`: webhook tokens take effect with the next request.
- `connectors`: a connector whose settings changed (new credentials, URL, concurrency) is
  rebuilt: its worker stops taking work and lets its calls in flight finish (within
  `server.shutdown_timeout`), the old client is closed and a new connector and worker start.
  An added connector starts; a removed one stops (its queued deliveries stay stored).
- `privacy`: the next retention purge deletes by the new `retention_days` (and waits the new
  `purge_interval` after it).
- every connector's circuit breaker is reset, and deliveries of a rebuilt or paused connector
  waiting out a backoff or an authentication pause are due at once: fixed credentials are
  tried right away.

`server`, `store`, `delivery` and `logging` changes need a restart; a reload says so in its
log line and keeps running with the old values. Secrets read with `${file:...}` from systemd
credentials (`LoadCredential=`) are copied by systemd when the service starts: a new secret
there needs a restart too.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from aiohttp import web

from bridge.breaker import BreakerState
from bridge.config import Config, load_config, secret_values
from bridge.errors import ConfigError, StoreUnavailable
from bridge.logs import REDACTOR
from bridge.rules import RuleSet
from bridge.server import CLOCK, CONFIG, ROUTER, STORE, WORKERS, build_connector, build_worker
from bridge.systemd import Notifier
from connectors.base import Connector, DryRunConnector

log = logging.getLogger("crm_bridge.reload")

# Sections a reload does not apply: the listening socket, the store, the workers' timings and
# the log set-up are made once, at start.
RESTART_SECTIONS = ("server", "store", "delivery", "logging")


class ReloadFailed(Exception):
    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


async def _open_all(new: Config, names: list[str]) -> dict[str, Connector]:
    """The connectors `names` built from `new` and opened; none left open if one fails."""
    opened: dict[str, Connector] = {}
    try:
        for name in names:
            connector = build_connector(name, new)
            opened[name] = connector
            await connector.open()
    except Exception as exc:
        for connector in opened.values():
            await connector.close()
        raise ReloadFailed([f"connector {name}: cannot start: {exc}"]) from exc
    return opened


async def reload_config(app: web.Application, path: Path) -> dict[str, Any]:
    """Apply the config file at `path` to the running `app`; what changed. Raises ReloadFailed
    (nothing changed) when the file is invalid or a changed connector cannot start."""
    try:
        new = load_config(path)
        rules = RuleSet(new.rules)
    except ConfigError as exc:
        raise ReloadFailed([str(p) for p in exc.problems]) from None
    REDACTOR.add_secrets(secret_values(new))  # new tokens are hidden from the first line on
    config, workers, store = app[CONFIG], app[WORKERS], app[STORE]
    added = [n for n in new.connector_settings if n not in workers]
    removed = [n for n in workers if n not in new.connector_settings]
    changed = [
        n
        for n, settings in new.connector_settings.items()
        if n in workers and settings != config.connector_settings.get(n)
    ]
    restart_needed = [s for s in RESTART_SECTIONS if getattr(new, s) != getattr(config, s)]
    fresh = await _open_all(new, added + changed)

    # The swap, with no await in between: a request or a routing batch sees all old or all new.
    # The running Config object is updated in place (handlers read it through the app).
    config.sources = new.sources
    config.connectors = new.connectors
    config.connector_settings = new.connector_settings
    config.rules = new.rules
    config.privacy = new.privacy  # read by the retention purge at each run
    config.source_file = new.source_file
    app[ROUTER].rules = rules
    kept = [name for name in workers if name not in changed and name not in removed]
    paused = [name for name in kept if workers[name].breaker.state is not BreakerState.CLOSED]
    for name in kept:
        workers[name].breaker.reset()  # rebuilt connectors get a new breaker
        workers[name].connector.forget_schema()  # and read the CRM's fields afresh
    for name in added:
        workers[name] = build_worker(app, name, fresh[name], config)
        workers[name].start()

    async def replace(name: str) -> None:
        previous = workers[name]
        await previous.stop(config.server.shutdown_timeout)  # calls in flight finish first
        await previous.connector.close()
        if name in fresh:
            workers[name] = build_worker(app, name, fresh[name], config)
            workers[name].start()
        else:
            del workers[name]

    await asyncio.gather(*(replace(name) for name in changed + removed))
    retried: dict[str, int] = {}
    for name in [*changed, *added, *paused]:
        try:
            retried[name] = await store.retry_now(name, app[CLOCK]())
        except StoreUnavailable as exc:
            log.warning(
                "%s: its waiting deliveries keep their retry times: %s",
                name,
                exc,
                extra={"action": "config.retry_now_failed", "connector": name},
            )
        if name in workers:
            workers[name].wake()
    app[ROUTER].wake()
    return {
        "rules": len(new.rules),
        "connectors_rebuilt": changed,
        "connectors_added": added,
        "connectors_removed": removed,
        "retried_now": {k: v for k, v in retried.items() if v},
        "restart_needed": restart_needed,
    }


def summary(app: web.Application) -> str:
    """One line for `systemctl status`: rules and connectors in effect."""
    connectors = ", ".join(
        f"{name} ({'dry run' if isinstance(w.connector, DryRunConnector) else 'live'})"
        for name, w in app[WORKERS].items()
    )
    return f"{len(app[ROUTER].rules.rules)} rules; connectors: {connectors or 'none'}"


class Reloader:
    """Runs reloads one at a time, on SIGHUP; a SIGHUP during a reload runs one more after it.

    A SIGHUP before `start()` (the daemon still starting) is kept and run once it is ready.
    """

    def __init__(self, app: web.Application, path: Path, notifier: Notifier) -> None:
        self._app = app
        self._path = path
        self._notifier = notifier
        self._task: asyncio.Task[None] | None = None
        self._requested = False
        self._started = False
        self._closed = False
        self.prefix = ""  # "listening on ...", for the status line

    def status(self, state: str = "ready") -> str:
        return f"{state}: {self.prefix}{summary(self._app)}"

    def start(self) -> None:
        self._started = True
        if self._requested:
            self.request()

    def request(self) -> None:
        self._requested = True
        if not self._started or self._closed:
            return
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="reload")

    async def close(self) -> None:
        """No more reloads; wait for the one under way (it is never left half done)."""
        self._closed = True
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        while self._requested and not self._closed:
            self._requested = False
            self._notifier.reloading()
            state = "ready"
            try:
                changes = await reload_config(self._app, self._path)
            except ReloadFailed as exc:
                state = f"reload failed ({len(exc.problems)} problem(s)), previous config running"
                log.error(
                    "reload failed, still running the previous config: %s",
                    "; ".join(exc.problems),
                    extra={
                        "action": "config.reload_failed",
                        "file": str(self._path),
                        "problems": exc.problems,
                    },
                )
            except Exception:  # the daemon survives a reload gone wrong, and says so
                state = "reload failed, previous config running"
                log.exception(
                    "reload failed",
                    extra={"action": "config.reload_failed", "file": str(self._path)},
                )
            else:
                restart = changes["restart_needed"]
                log.info(
                    "config reloaded from %s%s",
                    self._path,
                    f"; {', '.join(restart)} changes need a restart" if restart else "",
                    extra={"action": "config.reloaded", "file": str(self._path), **changes},
                )
            self._notifier.ready(self.status(state))
