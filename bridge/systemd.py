"""systemd's notification protocol (sd_notify), written out: a few datagrams on a unix socket.

Under `Type=notify` systemd passes `$NOTIFY_SOCKET`; the daemon says READY=1 once it listens
and its workers run, RELOADING=1 / READY=1 around a reload, STOPPING=1 on SIGTERM, a STATUS=
line for `systemctl status`, and, with `WatchdogSec=`, WATCHDOG=1 at least every
`$WATCHDOG_USEC`: systemd kills and restarts a daemon that stops pinging. Without
`$NOTIFY_SOCKET` (a terminal, the tests) every call is a no-op.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Mapping

from bridge.errors import StoreUnavailable

log = logging.getLogger("crm_bridge.systemd")


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, as RELOADING=1 wants it in MONOTONIC_USEC=."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


class Notifier:
    """Sends notifications to the socket `$NOTIFY_SOCKET` names; does nothing without one."""

    def __init__(self, env: Mapping[str, str] = os.environ) -> None:
        address = env.get("NOTIFY_SOCKET", "")
        self.address: str | None = None
        self._sock: socket.socket | None = None
        if not address:
            return
        if address.startswith("@"):  # an abstract socket
            address = "\0" + address[1:]
        elif not address.startswith("/"):
            log.warning(
                "NOTIFY_SOCKET=%s is not a unix socket: not notifying systemd",
                address,
                extra={"action": "systemd.unsupported_socket"},
            )
            return
        self.address = address
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        # libsystemd blocks; never block the event loop for long on a full socket queue.
        self._sock.settimeout(1.0)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def notify(self, *lines: str) -> bool:
        """Send `KEY=value` lines as one datagram; False when not sent."""
        if self._sock is None or self.address is None:
            return False
        try:
            self._sock.sendto("\n".join(lines).encode(), self.address)
        except OSError as exc:
            log.warning(
                "cannot notify systemd (%s): %s",
                " ".join(lines)[:60],
                exc,
                extra={"action": "systemd.notify_failed"},
            )
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.notify("READY=1", f"STATUS={status}")

    def reloading(self) -> bool:
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec()}")

    def stopping(self) -> bool:
        return self.notify("STOPPING=1", "STATUS=stopping")

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={text}")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def watchdog_interval(env: Mapping[str, str] = os.environ) -> float | None:
    """Seconds within which systemd wants a WATCHDOG=1 from this process, or None."""
    pid = env.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None  # meant for another process
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 1_000_000 if usec > 0 else None


async def watchdog(
    notifier: Notifier, interval: float, probe: Callable[[], Awaitable[object]]
) -> None:
    """Ping every `interval / 2`, only while the daemon is alive: the ping is sent from the
    event loop (a blocked loop sends none) and only after `probe` (a cheap store query)
    answered within that half interval. A store that hangs gets no ping, and systemd restarts
    the daemon once a whole interval went by; a store that answers with an error (a full
    disk) is alive: the daemon recovers by itself when the fault clears, a restart would not
    help."""
    period = interval / 2
    pending: asyncio.Task[object] | None = None
    try:
        while True:
            started = time.monotonic()
            if pending is None:
                pending = asyncio.ensure_future(probe())
            done, _ = await asyncio.wait({pending}, timeout=period)
            if not done:
                # Not cancelled: the same query is awaited again, so a hung store never piles
                # up queries.
                log.warning(
                    "the store did not answer within %.1fs: no watchdog ping",
                    period,
                    extra={"action": "systemd.watchdog_skipped"},
                )
                continue
            task, pending = pending, None
            exc = None if task.cancelled() else task.exception()
            if task.cancelled() or (exc is not None and not isinstance(exc, StoreUnavailable)):
                log.warning(
                    "watchdog probe failed: %r: no watchdog ping",
                    exc,
                    extra={"action": "systemd.watchdog_skipped"},
                )
            else:
                notifier.watchdog()
            await asyncio.sleep(max(0.0, period - (time.monotonic() - started)))
    finally:
        if pending is not None:
            pending.cancel()
