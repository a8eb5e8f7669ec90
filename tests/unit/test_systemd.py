"""sd_notify by hand: addresses, the watchdog's environment, and when a ping is (not) sent."""

from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid
from collections.abc import Iterator

import pytest

from bridge.errors import StoreUnavailable
from bridge.systemd import Notifier, monotonic_usec, watchdog, watchdog_interval


@pytest.fixture
def abstract_socket() -> Iterator[tuple[socket.socket, str]]:
    name = f"crm-bridge-unit-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.setblocking(False)
    yield sock, "@" + name
    sock.close()


def received(sock: socket.socket) -> list[str]:
    out = []
    while True:
        try:
            out.append(sock.recv(4096).decode())
        except BlockingIOError:
            return out


def test_without_notify_socket_nothing_is_sent() -> None:
    notifier = Notifier({})
    assert not notifier.enabled
    assert notifier.ready("ready") is False
    assert notifier.watchdog() is False


def test_a_non_unix_address_is_refused() -> None:
    assert not Notifier({"NOTIFY_SOCKET": "vsock:2:1234"}).enabled


def test_messages_reach_an_abstract_socket(abstract_socket) -> None:
    sock, address = abstract_socket
    notifier = Notifier({"NOTIFY_SOCKET": address})
    assert notifier.ready("ready: 2 rules")
    assert notifier.reloading()
    assert notifier.stopping()
    notifier.close()
    ready, reloading, stopping = received(sock)
    assert ready == "READY=1\nSTATUS=ready: 2 rules"
    key, value = reloading.split("\n")[1].split("=")
    assert reloading.startswith("RELOADING=1\n") and key == "MONOTONIC_USEC"
    assert 0 <= monotonic_usec() - int(value) < 10_000_000
    assert stopping == "STOPPING=1\nSTATUS=stopping"


def test_a_vanished_socket_is_not_fatal(tmp_path) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    try:
        assert notifier.enabled and notifier.ready("ready") is False
    finally:
        notifier.close()


def test_watchdog_interval_from_the_environment() -> None:
    mine = str(os.getpid())
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 30.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": mine}) == 30.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "soon"}) is None


async def run_watchdog(address: str, probe, seconds: float) -> None:
    """Let the watchdog run for `seconds` (10 half-intervals), then stop it."""
    notifier = Notifier({"NOTIFY_SOCKET": address})
    task = asyncio.create_task(watchdog(notifier, 0.04, probe))
    await asyncio.sleep(seconds)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    notifier.close()


async def test_pings_while_the_store_answers(abstract_socket) -> None:
    sock, address = abstract_socket

    async def answers() -> int:
        return 0

    await run_watchdog(address, answers, 0.2)
    assert len(received(sock)) >= 3


async def test_a_store_error_is_an_answer(abstract_socket) -> None:
    sock, address = abstract_socket

    async def disk_full() -> int:
        raise StoreUnavailable("the store could not commit: database or disk is full")

    await run_watchdog(address, disk_full, 0.2)
    assert set(received(sock)) == {"WATCHDOG=1"}


async def test_no_ping_while_the_store_hangs(abstract_socket) -> None:
    sock, address = abstract_socket
    calls = 0

    async def hangs() -> int:
        nonlocal calls
        calls += 1
        await asyncio.Event().wait()
        return 0

    await run_watchdog(address, hangs, 0.2)
    assert received(sock) == []
    assert calls == 1  # the hung query is awaited again, not piled up


async def test_no_ping_while_the_loop_is_blocked(abstract_socket) -> None:
    sock, address = abstract_socket

    async def answers() -> int:
        return 0

    notifier = Notifier({"NOTIFY_SOCKET": address})
    task = asyncio.create_task(watchdog(notifier, 0.02, answers))
    await asyncio.sleep(0)  # the first ping
    time.sleep(0.2)  # the loop is stuck: a ping now would lie
    between = received(sock)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    notifier.close()
    assert between == []  # pinged from the loop, never from a thread
