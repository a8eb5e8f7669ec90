"""The daemon under systemd's eyes: sd_notify datagrams, the watchdog, reload on SIGHUP, the unit.

The daemon runs as a real process with `$NOTIFY_SOCKET` pointing at a datagram socket the test
binds; every wait reads datagrams (or the daemon's answers) with a timeout, never a fixed sleep.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from tests.support import (
    config_yaml,
    hubspot_emails,
    hubspot_settings,
    salesforce_emails,
    salesforce_settings,
    sample,
    wait_for,
)

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "deploy" / "crm-bridge.service"

CLICK_RULE = """
  - name: clicks-to-hubspot
    when: type == 'click' and contact.interest == 'interested'
    connector: hubspot
    action: upsert_contact
    fields:
      firstname: "{{ contact.first_name }}"
"""
REPLY_RULE = """
  - name: replies-to-hubspot
    when: type == 'reply'
    connector: hubspot
    action: upsert_contact
    fields:
      lastname: replied
"""
# A connector name misspelt: the whole file is refused, with the line of the mistake.
BROKEN_REPLY_RULE = REPLY_RULE.replace("connector: hubspot", "connector: hubspt")


class NotifySocket:
    """What systemd would read: every datagram sent to `address`, in order, as KEY=value dicts."""

    def __init__(self, tmp_path: Path, abstract: bool = False) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        path = tmp_path / "notify.sock"
        if abstract or len(str(path)) > 100:  # sun_path holds 108 bytes
            name = f"crm-bridge-test-{uuid.uuid4().hex}"
            self.sock.bind("\0" + name)
            self.address = "@" + name
        else:
            self.sock.bind(str(path))
            self.address = str(path)
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, dict[str, str]]] = []
        self._cursor = 0
        self._changed = threading.Condition()
        self._closed = False
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while not self._closed:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if line)
            with self._changed:
                self.messages.append((time.monotonic(), fields))
                self._changed.notify_all()

    def expect(self, key: str, timeout: float = 10.0) -> dict[str, str]:
        """The next message (after the last one expected) that has `key`."""

        def find() -> int | None:
            for i in range(self._cursor, len(self.messages)):
                if key in self.messages[i][1]:
                    return i
            return None

        with self._changed:
            if not self._changed.wait_for(lambda: find() is not None, timeout):
                seen = [m for _, m in self.messages[self._cursor :]]
                raise AssertionError(f"no {key}= within {timeout}s; got {seen}")
            index = find()
            assert index is not None
            self._cursor = index + 1
            return self.messages[index][1]

    def env(self, **extra: str) -> dict[str, str]:
        return {"NOTIFY_SOCKET": self.address, **extra}

    def close(self) -> None:
        self._closed = True
        self._reader.join(5)
        self.sock.close()


@pytest.fixture
def notify(tmp_path):
    sock = NotifySocket(tmp_path)
    yield sock
    sock.close()


def write_config(path: Path, hubspot_emulator, rules: str, token: str = "pat-na1-test") -> Path:
    path.write_text(
        config_yaml(
            path.parent / "bridge.db",
            hubspot={"access_token": token, "base_url": hubspot_emulator.url},
            rules=rules,
        )
    )
    return path


def reload(daemon, notify: NotifySocket) -> dict[str, str]:
    """SIGHUP, as `systemctl reload` sends it; the READY=1 that ends the reload."""
    daemon.proc.send_signal(signal.SIGHUP)
    reloading = notify.expect("RELOADING")
    now_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert 0 <= now_usec - int(reloading["MONOTONIC_USEC"]) < 60_000_000
    return notify.expect("READY")


def routed(daemon, event_id: str) -> dict:
    return wait_for(lambda: (e := daemon.event(event_id))["routed_at"] is not None and e)


def test_ready_watchdog_and_stopping(tmp_path, daemon_factory, hubspot_emulator, notify):
    config = write_config(tmp_path / "config.yaml", hubspot_emulator, CLICK_RULE)
    daemon = daemon_factory(config, notify.env(WATCHDOG_USEC="200000"))
    ready = notify.expect("READY")
    assert ready["READY"] == "1"
    assert ready["STATUS"].startswith(f"ready: {daemon.url}; 1 rules; connectors: hubspot (live)")
    # READY=1 means it serves: no wait needed before the first request.
    assert daemon.session.get(f"{daemon.url}/readyz", timeout=10).status_code == 200
    # Pings keep coming, every WATCHDOG_USEC / 2, while the loop runs and the store answers.
    pings = [notify.expect("WATCHDOG") for _ in range(4)]
    assert all(p == {"WATCHDOG": "1"} for p in pings)
    times = [t for t, m in notify.messages if "WATCHDOG" in m]
    assert times[-1] - times[0] < 3.0, "pings should come every 0.1 s"
    daemon.proc.send_signal(signal.SIGTERM)
    assert notify.expect("STOPPING")["STOPPING"] == "1"
    assert daemon.stop() == 0
    assert not daemon.actions("systemd.notify_failed")


def test_sighup_applies_a_new_rule_to_the_next_event(
    tmp_path, daemon_factory, hubspot_emulator, notify
):
    config = write_config(tmp_path / "config.yaml", hubspot_emulator, CLICK_RULE)
    daemon = daemon_factory(config, notify.env())
    notify.expect("READY")
    before = daemon.post(sample(type="reply", email="before@example.com")).json()["event_id"]
    assert routed(daemon, before)["deliveries"] == []

    write_config(config, hubspot_emulator, CLICK_RULE + REPLY_RULE)
    ready = reload(daemon, notify)
    assert ready["STATUS"].startswith("ready: ") and "2 rules" in ready["STATUS"]
    after = daemon.post(sample(type="reply", email="after@example.com")).json()["event_id"]

    deliveries = wait_for(lambda: daemon.settled(after))
    assert [(d["rule"], d["status"]) for d in deliveries] == [("replies-to-hubspot", "done")]
    assert hubspot_emails(hubspot_emulator) == ["after@example.com"]
    (reloaded,) = wait_for(lambda: daemon.actions("config.reloaded"))
    assert reloaded["rules"] == 2
    assert reloaded["connectors_rebuilt"] == [] and reloaded["restart_needed"] == []
    assert daemon.stop() == 0


def definition_reads(emulator) -> int:
    """GETs of the portal's contact property definitions (not of one property)."""
    with emulator.lock:
        return sum(c.path == "/crm/v3/properties/contacts" for c in emulator.calls)


def test_sighup_makes_connectors_read_the_crm_fields_again(
    tmp_path, daemon_factory, hubspot_emulator, notify
):
    config = write_config(tmp_path / "config.yaml", hubspot_emulator, REPLY_RULE)
    daemon = daemon_factory(config, notify.env())
    notify.expect("READY")
    first = daemon.post(sample(type="reply", email="first@example.com")).json()["event_id"]
    wait_for(lambda: daemon.settled(first))
    assert definition_reads(hubspot_emulator) == 1

    reload(daemon, notify)  # the same config: the connector is kept, its cache is not
    second = daemon.post(sample(type="reply", email="second@example.com")).json()["event_id"]

    assert [d["status"] for d in wait_for(lambda: daemon.settled(second))] == ["done"]
    assert definition_reads(hubspot_emulator) == 2
    assert daemon.stop() == 0


def test_sighup_with_a_broken_config_keeps_the_old_rules(
    tmp_path, daemon_factory, hubspot_emulator, notify
):
    config = write_config(tmp_path / "config.yaml", hubspot_emulator, CLICK_RULE)
    daemon = daemon_factory(config, notify.env())
    notify.expect("READY")

    write_config(config, hubspot_emulator, CLICK_RULE + BROKEN_REPLY_RULE)
    ready = reload(daemon, notify)
    assert "reload failed (1 problem(s)), previous config running" in ready["STATUS"]
    (failed,) = wait_for(lambda: daemon.actions("config.reload_failed"))
    line = config.read_text().splitlines().index("    connector: hubspt") + 1
    (problem,) = failed["problems"]
    assert problem.startswith(f"{config}:{line}:")
    assert "rules[1].connector: no connector named 'hubspt' (did you mean `hubspot`?)" in problem
    assert failed["level"] == "error"

    # The old rules still apply: a reply matches nothing, a click goes to HubSpot.
    reply = daemon.post(sample(type="reply", email="reply@example.com")).json()["event_id"]
    click = daemon.post(sample(email="click@example.com")).json()["event_id"]
    assert routed(daemon, reply)["deliveries"] == []
    deliveries = wait_for(lambda: daemon.settled(click))
    assert [(d["rule"], d["status"]) for d in deliveries] == [("clicks-to-hubspot", "done")]
    assert not daemon.actions("config.reloaded")
    assert daemon.stop() == 0


def test_readyz_fails_on_a_refused_token_and_recovers_after_a_reload(
    tmp_path, daemon_factory, hubspot_emulator
):
    notify = NotifySocket(tmp_path, abstract=True)  # systemd's own socket is abstract at times
    try:
        hubspot_emulator.token = "pat-na1-other"  # the portal's token was rotated
        config = write_config(tmp_path / "config.yaml", hubspot_emulator, CLICK_RULE)
        daemon = daemon_factory(config, notify.env())
        notify.expect("READY")

        def readyz():
            return daemon.session.get(f"{daemon.url}/readyz", timeout=10)

        # Unready at once: the connector verifies its token when it starts, before any event
        refused = wait_for(lambda: (r := readyz()).status_code == 503 and r.json())
        assert "hubspot" in refused["reasons"], refused
        assert daemon.post(sample()).status_code == 202

        write_config(config, hubspot_emulator, CLICK_RULE, token="pat-na1-other")
        reload(daemon, notify)
        assert readyz().status_code == 200
        # The delivery waiting out the authentication pause goes at once, with the new token.
        wait_for(lambda: hubspot_emails(hubspot_emulator) == ["andrew@xoxo.capital"], timeout=10)
        (reloaded,) = wait_for(lambda: daemon.actions("config.reloaded"))
        assert reloaded["connectors_rebuilt"] == ["hubspot"]
        assert readyz().status_code == 200
        assert daemon.stop() == 0
    finally:
        notify.close()


def _systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        pytest.skip("systemd-analyze is not installed")
    return found


def _unit_copy(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this venv's crm-bridge (verify wants it to exist)."""
    executable = Path(sys.executable).parent / "crm-bridge"
    assert executable.exists(), executable
    text = UNIT.read_text()
    assert "/opt/crm-bridge/venv/bin/crm-bridge" in text
    unit = tmp_path / "crm-bridge.service"
    unit.write_text(text.replace("/opt/crm-bridge/venv/bin/crm-bridge", str(executable)))
    return unit


def test_the_unit_passes_systemd_analyze(tmp_path):
    analyze = _systemd_analyze()
    unit = _unit_copy(tmp_path)
    verify = subprocess.run(
        [analyze, "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert verify.returncode == 0 and not verify.stderr.strip(), verify.stderr
    text = UNIT.read_text()
    for setting in (
        "Type=notify",
        "NotifyAccess=main",
        "WatchdogSec=30",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "Restart=on-failure",
        "DynamicUser=yes",
        "MemoryDenyWriteExecute=yes",
    ):
        assert re.search(rf"^{re.escape(setting)}$", text, re.MULTILINE), setting
    # Exposure as `systemd-analyze security` rates it (0 best, 10 worst); 1.1 when written.
    security = subprocess.run(
        [analyze, "security", "--offline=true", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    score = re.search(r"Overall exposure level for crm-bridge.service: ([\d.]+)", security.stdout)
    assert score, security.stdout + security.stderr
    assert float(score.group(1)) <= 1.5, security.stdout


# systemd's MemoryDenyWriteExecute=yes refuses writable+executable mappings; the kernel's
# PR_SET_MDWE does the same for a process and its children: the daemon must run under it.
MDWE = """
import ctypes, mmap, os, runpy, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN
    sys.exit(f"PR_SET_MDWE: {os.strerror(ctypes.get_errno())}")
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
except OSError:
    pass
else:
    sys.exit("PR_SET_MDWE is not in effect")
if sys.argv[1:] == ["probe"]:
    sys.exit(0)
sys.argv[0] = "crm-bridge"
runpy.run_module("bridge", run_name="__main__", alter_sys=True)
"""


def test_the_daemon_runs_with_memory_deny_write_execute(
    tmp_path, daemon_factory, hubspot_emulator, salesforce_emulator, notify
):
    probe = subprocess.run(
        [sys.executable, "-c", MDWE, "probe"], capture_output=True, text=True, timeout=30
    )
    if probe.returncode != 0:
        pytest.skip(f"this kernel cannot refuse W+X mappings: {probe.stderr.strip()}")
    config = tmp_path / "config.yaml"
    config.write_text(
        config_yaml(
            tmp_path / "bridge.db",
            hubspot=hubspot_settings(hubspot_emulator),
            salesforce=salesforce_settings(salesforce_emulator),
        )
    )
    daemon = daemon_factory(config, notify.env(), [sys.executable, "-c", MDWE])
    notify.expect("READY")
    assert daemon.post(sample()).status_code == 202
    wait_for(lambda: hubspot_emails(hubspot_emulator) and salesforce_emails(salesforce_emulator))
    daemon.proc.send_signal(signal.SIGHUP)  # rules compiled again, under the same restriction
    notify.expect("RELOADING")
    notify.expect("READY")
    assert daemon.stop() == 0
    assert not [r for r in daemon.logs if r.get("level") in ("error", "critical")], daemon.logs
    assert os.path.exists(tmp_path / "bridge.db")
