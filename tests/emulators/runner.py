"""Running an emulator: a real aiohttp server in a background thread, plus the
plumbing both CRM emulators share (request log, failure switches, latency).

The server gets its own event loop in its own thread so that blocking SDK calls
in the test thread, async tests on pytest's loop and the daemon running as a
subprocess can all reach it over a real socket on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Self

from aiohttp import web

__all__ = ["Call", "EmulatorBase", "FailRule", "ManualClock", "Reply", "ServerThread"]

HTTP_METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"}


class ServerThread:
    """Serve an aiohttp application from a background thread on an OS-assigned port.

    ``start()`` returns once the socket listens; ``stop()`` closes it and joins the
    thread. Usable as a context manager, sync or async.
    """

    def __init__(
        self,
        app: web.Application,
        *,
        ssl_context: ssl.SSLContext | None = None,
        host: str = "127.0.0.1",
        shutdown_timeout: float = 0.5,
    ) -> None:
        self.app = app
        self.ssl_context = ssl_context
        self.host = host
        # Short: a handler still sleeping for a timeout test must not hold up stop().
        self.shutdown_timeout = shutdown_timeout
        self.port: int | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("server not started")
        scheme = "https" if self.ssl_context else "http"
        return f"{scheme}://{self.host}:{self.port}"

    def start(self, timeout: float = 10.0) -> ServerThread:
        if self._thread is not None:
            raise RuntimeError("server already started")
        self._thread = threading.Thread(target=self._run, name="emulator-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError("emulator server did not start in time")
        if self._error is not None:
            raise RuntimeError("emulator server failed to start") from self._error
        return self

    def stop(self, timeout: float = 10.0) -> None:
        thread, loop, stop_event = self._thread, self._loop, self._stop_event
        if thread is None:
            return
        if loop is not None and stop_event is not None and not loop.is_closed():
            # The loop may close between the check and the call; then the thread is ending anyway.
            try:
                loop.call_soon_threadsafe(stop_event.set)
            except RuntimeError:
                pass
        thread.join(timeout)
        self._thread = None

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # reported to start(), or dropped at exit
            self._error = exc
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        runner = web.AppRunner(
            self.app, handle_signals=False, access_log=None, shutdown_timeout=self.shutdown_timeout
        )
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.host, 0, ssl_context=self.ssl_context)
            await site.start()
            self.port = runner.addresses[0][1]
            self._ready.set()
            await self._stop_event.wait()
        finally:
            server = runner.server
            transports = [c.transport for c in (server.connections if server else [])]
            await runner.cleanup()
            # A TLS close waits for the peer's close_notify, which pooled SDK clients never
            # send; abort what is left so the loop does not close over live sockets. Connections
            # accepted while stopping are only in the list after the cleanup.
            transports += [c.transport for c in (server.connections if server else [])]
            for transport in transports:
                if transport is not None:
                    transport.abort()
            await asyncio.sleep(0)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def __aenter__(self) -> ServerThread:
        # start()/stop() block briefly on a threading.Event: keep them off the caller's loop.
        return await asyncio.to_thread(self.start)

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self.stop)


class ManualClock:
    """A clock tests move by hand, to pass as an emulator's ``clock`` instead of sleeping."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self.now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.now += seconds


@dataclass
class Call:
    """One request as the emulator saw it. ``status`` is filled in once answered."""

    method: str
    path: str  # percent-decoded
    raw_path: str  # as sent, still percent-encoded
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: str
    json: Any = None  # parsed body, or None when empty / not JSON
    status: int | None = None

    def param(self, name: str) -> str | None:
        """First value of a query parameter."""
        values = self.query.get(name)
        return values[0] if values else None


@dataclass
class Reply:
    """What a route answers. ``body``: None (empty), str/bytes (raw), anything else → JSON."""

    status: int
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str | None = None


@dataclass
class FailRule:
    """The next ``remaining`` calls for which ``predicate`` holds get ``reply``
    (after ``delay`` seconds); with ``reply`` None they are only delayed."""

    predicate: Callable[[Call], bool]
    remaining: int
    reply: Reply | None
    delay: float = 0.0
    drop: bool = False  # close the connection instead of answering


def call_matcher(match: str | None, method: str | None) -> Callable[[Call], bool]:
    """A predicate from ``match`` ("/path/substring" or "POST /path/substring") and ``method``."""
    if match and " " in match and match.split(" ", 1)[0].upper() in HTTP_METHODS:
        verb, match = match.split(" ", 1)
        method = method or verb
    wanted = method.upper() if method else None

    def predicate(call: Call) -> bool:
        if wanted and call.method != wanted:
            return False
        return not match or match in call.path or match in call.raw_path

    return predicate


class EmulatorBase:
    """Shared state handling: a lock, the call log, failure rules and latency.

    Subclasses implement ``_respond(call) -> Reply`` (called with the lock held, so
    routes are plain synchronous Python) and may override ``_decorate`` to add
    headers to every reply, injected failures included.
    """

    json_content_type = "application/json;charset=utf-8"

    def __init__(self) -> None:
        # Re-entrant: composite requests dispatch sub-requests while holding it.
        self.lock = threading.RLock()
        self.calls: list[Call] = []
        self.errors: list[BaseException] = []  # emulator bugs, answered as 500 and kept here
        self.latency: float = 0.0
        self._rules: list[FailRule] = []
        # Requests received and not answered yet; ``wait_idle`` waits until there are none.
        self._in_flight = 0
        self._idle = threading.Condition(self.lock)
        self._server: ServerThread | None = None

    # -- lifecycle -------------------------------------------------------------------------
    def _ssl_context(self) -> ssl.SSLContext | None:
        return None

    def build_app(self) -> web.Application:
        app = web.Application(client_max_size=32 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._entry)
        return app

    def start(self) -> Self:
        if self._server is not None:
            raise RuntimeError("emulator already started")
        self._server = ServerThread(self.build_app(), ssl_context=self._ssl_context()).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    @property
    def url(self) -> str:
        """Base URL without trailing slash, e.g. ``https://127.0.0.1:54321``."""
        if self._server is None:
            raise RuntimeError("emulator not started")
        return self._server.url

    @property
    def port(self) -> int:
        if self._server is None or self._server.port is None:
            raise RuntimeError("emulator not started")
        return self._server.port

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- switches ----------------------------------------------------------------------------
    def fail_next(
        self,
        n: int,
        status: int,
        body: Any = None,
        headers: dict[str, str] | None = None,
        match: str | None = None,
        method: str | None = None,
        content_type: str | None = None,
    ) -> None:
        """Answer the next ``n`` matching requests with ``status`` and ``body``
        (default: the API's usual error body for that status) instead of serving them."""
        reply = (
            self._default_failure(status) if body is None else Reply(status, body, {}, content_type)
        )
        reply.headers.update(headers or {})
        self.add_rule(call_matcher(match, method), n, reply)

    def delay_next(
        self, n: int, seconds: float, match: str | None = None, method: str | None = None
    ) -> None:
        """Serve the next ``n`` matching requests normally, but ``seconds`` late."""
        self.add_rule(call_matcher(match, method), n, None, delay=seconds)

    def drop_next(
        self,
        n: int,
        match: str | None = None,
        method: str | None = None,
        *,
        after_processing: bool = True,
    ) -> None:
        """Close the connection of the next ``n`` matching requests without an answer. With
        ``after_processing`` the request is served first: the write happens, the client never
        hears of it (a reset after commit); otherwise nothing happens (a reset before)."""
        reply = None if after_processing else Reply(502)
        self.add_rule(call_matcher(match, method), n, reply, drop=True)

    def add_rule(
        self,
        predicate: Callable[[Call], bool],
        n: int,
        reply: Reply | None,
        delay: float = 0.0,
        drop: bool = False,
    ) -> None:
        with self.lock:
            self._rules.append(FailRule(predicate, n, reply, delay, drop))

    def clear_failures(self) -> None:
        with self.lock:
            self._rules.clear()

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Block until every request received so far is served, delayed ones included.

        A client that timed out does not stop its request: the emulator still serves it once
        its delay has passed, as a real CRM finishes a write whose caller stopped listening.
        """
        with self._idle:
            if not self._idle.wait_for(lambda: self._in_flight == 0, timeout):
                raise TimeoutError(f"{self._in_flight} requests still in flight")

    def calls_to(self, method: str | None = None, path_contains: str | None = None) -> list[Call]:
        """Logged calls filtered by method and path substring."""
        match = call_matcher(path_contains, method)
        with self.lock:
            return [c for c in self.calls if match(c)]

    def _default_failure(self, status: int) -> Reply:
        """The API's usual answer for ``status``, used by ``fail_next`` when no body is given."""
        return Reply(status, {"status": status})

    # -- request handling --------------------------------------------------------------------
    async def _entry(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        text = raw.decode("utf-8", errors="replace")
        parsed: Any = None
        if text.strip():
            try:
                parsed = json.loads(text)
            except ValueError:
                parsed = None
        call = Call(
            method=request.method,
            path=request.path,
            raw_path=request.rel_url.raw_path,
            query={k: request.query.getall(k) for k in request.query.keys()},
            headers=dict(request.headers),
            body=text,
            json=parsed,
        )
        with self.lock:
            self.calls.append(call)
            rule = self._take_rule(call)
            delay = self.latency + (rule.delay if rule else 0.0)
            self._in_flight += 1
        try:
            return await self._serve(request, call, rule, delay)
        finally:
            with self._idle:
                self._in_flight -= 1
                self._idle.notify_all()

    async def _serve(
        self, request: web.Request, call: Call, rule: FailRule | None, delay: float
    ) -> web.StreamResponse:
        if delay > 0:
            await asyncio.sleep(delay)
        with self.lock:
            if rule is not None and rule.reply is not None:
                # A copy: the same rule may answer several calls and _decorate adds headers.
                reply = replace(rule.reply, headers=dict(rule.reply.headers))
            else:
                try:
                    reply = self._respond(call)
                except Exception as exc:  # a bug in the emulator: visible to the test
                    self.errors.append(exc)
                    reply = Reply(500, f"emulator error: {exc!r}")
            reply = self._decorate(call, reply)
        if rule is not None and rule.drop:
            call.status = None
            if request.transport is not None:
                request.transport.abort()
            raise ConnectionResetError("dropped by the emulator")
        call.status = reply.status
        return self._to_response(reply)

    def _take_rule(self, call: Call) -> FailRule | None:
        for rule in self._rules:
            if rule.remaining > 0 and rule.predicate(call):
                rule.remaining -= 1
                if rule.remaining == 0:
                    self._rules.remove(rule)
                return rule
        return None

    def _respond(self, call: Call) -> Reply:
        raise NotImplementedError

    def _decorate(self, call: Call, reply: Reply) -> Reply:
        return reply

    def _to_response(self, reply: Reply) -> web.Response:
        if reply.body is None:
            return web.Response(status=reply.status, headers=reply.headers)
        if isinstance(reply.body, (str, bytes)):
            data = reply.body.encode() if isinstance(reply.body, str) else reply.body
            ctype = reply.content_type or "text/plain;charset=utf-8"
        else:
            data = json.dumps(reply.body).encode()
            ctype = reply.content_type or self.json_content_type
        headers = {"Content-Type": ctype, **reply.headers}
        return web.Response(status=reply.status, body=data, headers=headers)
