"""The daemon as a real process: `crm-bridge serve` started, fed over HTTP, killed, restarted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests


class Daemon:
    """One `crm-bridge serve` subprocess; its JSON log lines are collected as they come."""

    def __init__(
        self,
        config_path: Path,
        extra_env: dict[str, str] | None = None,
        command: list[str] | None = None,
    ) -> None:
        self.config_path = config_path
        self.logs: list[dict] = []
        self.url = ""
        self._listening = threading.Event()
        # Nor the test runner's own systemd socket: a daemon notifies only where a test says.
        inherited = ("HUBSPOT_", "SALESFORCE_", "NOTIFY_SOCKET", "WATCHDOG_")
        env = {k: v for k, v in os.environ.items() if not k.startswith(inherited)}
        env.update(extra_env or {})
        self.proc = subprocess.Popen(
            [
                *(command or [sys.executable, "-m", "bridge"]),
                *("serve", "--config", str(config_path), "--port", "0"),
            ],
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if not self._listening.wait(30) or not self.url:
            self.proc.kill()
            self._close()
            raise AssertionError(f"daemon did not start: {self.logs[-5:]}")
        self.session = requests.Session()
        self.session.trust_env = False

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            try:
                record = json.loads(line)
            except ValueError:
                record = {"message": line.rstrip()}
            self.logs.append(record)
            if record.get("action") == "server.listening":
                self.url = record["url"]
                self._listening.set()
        self._listening.set()  # exited before listening

    def post(self, body: dict | str, token: str = "test-webhook-token") -> requests.Response:
        data = body if isinstance(body, str) else json.dumps(body)
        return self.session.post(
            f"{self.url}/webhooks/supersend/{token}",
            data=data,
            headers={"Content-Type": "application/json"},
            timeout=30,
        )

    def event(self, event_id: str) -> dict:
        return self.session.get(f"{self.url}/events/{event_id}", timeout=30).json()

    def settled(self, event_id: str) -> list[dict] | None:
        """The event's deliveries if none is pending or in flight any more, else None."""
        event = self.event(event_id)
        deliveries = event["deliveries"]
        finished = all(d["status"] not in ("pending", "in_flight") for d in deliveries)
        return deliveries if event["routed_at"] is not None and finished else None

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self._close()

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self._close()

    def _close(self) -> int:
        code = self.proc.wait(30)
        self._reader.join(10)
        if self.proc.stderr:
            self.proc.stderr.close()
        if hasattr(self, "session"):
            self.session.close()
        return code

    def actions(self, name: str) -> list[dict]:
        return [r for r in self.logs if r.get("action") == name]


@pytest.fixture
def daemon_factory() -> Iterator:
    started: list[Daemon] = []

    def start(
        config_path: Path,
        extra_env: dict[str, str] | None = None,
        command: list[str] | None = None,
    ) -> Daemon:
        daemon = Daemon(config_path, extra_env, command)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        if daemon.proc.poll() is None:
            daemon.kill()
        else:
            daemon._close()
