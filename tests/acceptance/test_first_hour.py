"""The first hour of a new operator (issue 14): every mistake gets one clear line and an exit
code, never a traceback. Each test runs the real `crm-bridge` command as the user would."""

from __future__ import annotations

import asyncio
import json
import os
import queue
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.support import TOKEN, config_yaml, hubspot_settings, sample, wait_for

ROOT = Path(__file__).parent.parent.parent
EXAMPLE = ROOT / "config.example.yaml"
CREDENTIAL = "/run/credentials/crm-bridge.service"
# Without the service's secrets: what a config written as deploy/INSTALL.md says looks like to
# a command run while the service is stopped.
SERVICE_SECRETS = f"""\
sources:
  supersend:
    tokens: ["${{file:{CREDENTIAL}/supersend_webhook_token}}"]
connectors:
  hubspot:
    type: hubspot
    access_token: "${{file:{CREDENTIAL}/hubspot_token}}"
  other:
    type: hubspot
    access_token: ${{HS_TOKEN}}
rules:
  - name: interested-to-hubspot
    when: type == 'interest'
    connector: hubspot
    action: upsert_contact
    fields: {{firstname: "{{{{ contact.first_name }}}}"}}
"""


def run(*args: str, cwd: Path | None = None, stdin: str | None = None, env=None, timeout=60):
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("HUBSPOT_", "HS_"))}
    environment.pop("CREDENTIALS_DIRECTORY", None)
    environment.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "bridge", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd or ROOT,
        input=stdin,
        env=environment,
    )


def one_line(done: subprocess.CompletedProcess[str]) -> str:
    """The command's only line on stderr, as a JSON log line's message or as printed."""
    assert "Traceback" not in done.stderr, done.stderr
    (line,) = done.stderr.strip().splitlines()
    return json.loads(line)["message"] if line.startswith("{") else line


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o600)
    return path


# -- 1. a port already in use ---------------------------------------------------------------


def test_serve_on_a_port_in_use_says_which_and_who_holds_it(tmp_path):
    # Given a port this test listens on
    config = write(tmp_path / "config.yaml", config_yaml(tmp_path / "bridge.db"))
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        # When the daemon is told to listen there
        done = run("serve", "--config", str(config), "--port", str(port))
    # Then one line names the address, the process holding it, and what to do; exit 2
    assert done.returncode == 2
    message = one_line(done)
    assert message.startswith(
        f"cannot listen on 127.0.0.1:{port}: the port is already in use by pid {os.getpid()} ("
    )
    assert message.endswith(
        "stop it, or give this daemon another port (--port N, or server.port in the config)"
    )
    assert not (tmp_path / "bridge.db").exists()  # nothing started before the socket


# -- 2. a store that cannot be written --------------------------------------------------------


def _read_only(directory: Path, *command: str) -> subprocess.CompletedProcess[str]:
    """`command` run with `directory` mounted read-only (a private mount namespace)."""
    script = f'mount --bind -o ro "{directory}" "{directory}" && exec "$@"'
    args = ["unshare", "--mount", "sh", "-c", script, "sh", sys.executable, "-m", "bridge"]
    return subprocess.run([*args, *command], capture_output=True, text=True, timeout=60, cwd=ROOT)


def test_a_read_only_store_directory_is_named_by_check_and_serve(tmp_path):
    probe = subprocess.run(
        ["unshare", "--mount", "true"], capture_output=True, timeout=10, check=False
    )
    if probe.returncode != 0 or not shutil.which("mount"):
        if os.environ.get("CI"):
            pytest.fail(f"cannot make a read-only mount here: {probe.stderr!r}")
        pytest.skip("needs unshare --mount (root) to make a read-only file system")
    store = tmp_path / "ro"
    store.mkdir()
    config = write(tmp_path / "config.yaml", config_yaml(store / "t.db"))
    expected = (
        f"store.path {store / 't.db'}: root (uid 0) cannot write in {store} (the store keeps"
        " its -wal, -shm and .lock files there): it is on a read-only file system"
    )
    checked = _read_only(store, "check", "--config", str(config))
    assert (checked.returncode, one_line(checked)) == (2, f"crm-bridge: {expected}")
    served = _read_only(store, "serve", "--config", str(config), "--port", "0")
    assert (served.returncode, one_line(served)) == (2, expected)


# -- 3. a PostgreSQL database that does not exist ---------------------------------------------


@pytest.mark.postgres
def test_every_store_command_reports_a_missing_database_as_migrate_does(tmp_path):
    from tests.postgres import SERVER

    url = f"{SERVER}/crm_bridge_missing_{secrets.token_hex(4)}"
    config = write(tmp_path / "config.yaml", f"store:\n  url: {url}\n")
    contacts = write(tmp_path / "contacts.csv", "email\nann@example.com\n")
    expected = (
        f'crm-bridge: cannot connect to {url}: database "{url.rsplit("/", 1)[1]}" does not exist'
    )
    for command in (
        ["migrate"],
        ["status"],
        ["dlq", "list"],
        ["dlq", "show", "1"],
        ["dlq", "retry", "--all"],
        ["dlq", "purge", "--older-than", "7d"],
        ["forget", "ann@example.com"],
        ["backfill", str(contacts)],
    ):
        done = run(*command, "--config", str(config))
        assert (done.returncode, one_line(done)) == (1, expected), command


# -- 4. a relative store path -----------------------------------------------------------------


def test_a_relative_store_path_starts_from_the_config_files_directory(tmp_path):
    # Given a config in etc/ naming its store relatively, and a command run from elsewhere
    etc, elsewhere = tmp_path / "etc", tmp_path / "elsewhere"
    etc.mkdir()
    elsewhere.mkdir()
    config = write(etc / "config.yaml", config_yaml(Path("state/bridge.db")))
    contacts = write(tmp_path / "contacts.csv", "email\nann@example.com\n")
    stored = run("backfill", str(contacts), "--config", str(config), cwd=elsewhere)
    assert stored.returncode == 0, stored.stderr
    # Then the store is beside the config, and every command finds it from anywhere
    assert (etc / "state" / "bridge.db").exists()
    assert not (elsewhere / "state").exists()
    shown = run("status", "--config", str(config), cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.splitlines()[0] == f"store    {etc / 'state' / 'bridge.db'}"


# -- 5. an unexpected error -------------------------------------------------------------------


def test_an_unexpected_error_is_one_line_and_the_traceback_is_kept(tmp_path):
    # An event nested deeper than Python's JSON reader goes: nothing expects that.
    event = tmp_path / "deep.json"
    event.write_text("[" * 100_000 + "]" * 100_000)
    done = run("simulate", str(event), "--config", str(EXAMPLE))
    assert done.returncode == 70
    line = one_line(done)
    match = re.fullmatch(
        r"crm-bridge: unexpected error: RecursionError: .* \(a bug: the traceback is in "
        r"(\S+); --debug prints it\)",
        line,
    )
    assert match, line
    kept = Path(match[1])
    try:
        assert "Traceback (most recent call last)" in kept.read_text()
    finally:
        kept.unlink()
    debug = run("simulate", str(event), "--config", str(EXAMPLE), "--debug")
    assert debug.returncode == 70 and "Traceback (most recent call last)" in debug.stderr


# -- 6. the CLI without the service's secrets -------------------------------------------------


def test_commands_that_call_no_crm_work_without_the_service_secrets(tmp_path):
    config = write(tmp_path / "config.yaml", SERVICE_SECRETS + f"store:\n  path: {tmp_path}/s.db\n")
    contacts = write(tmp_path / "contacts.csv", "email\nann@example.com\n")
    stored = run("backfill", str(contacts), "--type", "interest", "--config", str(config))
    assert stored.returncode == 0, stored.stderr
    for command in (["status"], ["dlq", "list"], ["forget", "ann@example.com"], ["migrate"]):
        done = run(*command, "--config", str(config))
        assert done.returncode == 0, (command, done.stderr)
        assert done.stderr == "", command
    shown = run("status", "--config", str(config))
    # The service will have the secrets: its connectors are live, not dry runs
    assert [line.split()[:2] for line in shown.stdout.splitlines()[-2:]] == [
        ["hubspot", "live"],
        ["other", "live"],
    ]


def test_check_warns_about_secrets_it_cannot_read_yet_and_reads_the_credentials_dir(tmp_path):
    config = write(tmp_path / "config.yaml", SERVICE_SECRETS)
    # Before the first start: warnings, and the config passes
    before = run("check", "--config", str(config))
    assert before.returncode == 0, before.stderr
    warnings = before.stderr.splitlines()
    assert warnings == [
        f"crm-bridge: warning: not checked: {config}:3:14: sources.supersend.tokens[0]: cannot"
        f" read {CREDENTIAL}/supersend_webhook_token: No such file or directory (systemd makes"
        " it while the service runs; --credentials-dir DIR reads the files it would hand over"
        " from DIR)",
        f"crm-bridge: warning: not checked: {config}:7:5: connectors.hubspot.access_token:"
        f" cannot read {CREDENTIAL}/hubspot_token: No such file or directory (systemd makes it"
        " while the service runs; --credentials-dir DIR reads the files it would hand over"
        " from DIR)",
        f"crm-bridge: warning: not checked: {config}:10:5: connectors.other.access_token:"
        " environment variable HS_TOKEN is not set (write ${HS_TOKEN:-} to allow it empty)",
    ]
    # --online needs them: every one is a problem
    online = run("check", "--online", "--config", str(config))
    assert online.returncode == 2
    assert online.stderr.splitlines()[0] == "crm-bridge: invalid configuration (3 problem(s)):"
    # The files systemd will hand over, read from where LoadCredential= takes them
    credentials = tmp_path / "credentials"
    credentials.mkdir(mode=0o700)
    write(credentials / "supersend_webhook_token", "a-webhook-token-of-24-chars")
    given = run("check", "--config", str(config), "--credentials-dir", str(credentials))
    assert given.returncode == 2  # one is missing there: that one is a problem
    assert f"cannot read {credentials}/hubspot_token: No such file or directory" in given.stderr
    write(credentials / "hubspot_token", "pat-na1-from-the-credentials-dir")
    env = {"CREDENTIALS_DIRECTORY": str(credentials), "HS_TOKEN": "pat-na1-from-the-environment"}
    passed = run("check", "--config", str(config), env=env)
    assert passed.returncode == 0, passed.stderr
    assert "warning" not in passed.stderr


# -- 7, 8, 9. the logs ------------------------------------------------------------------------


class TextDaemon:
    """`crm-bridge serve` with `logging.format: text`, its lines read as they come."""

    def __init__(self, config: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HUBSPOT_", "NOTIFY_"))}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bridge", "serve", "--config", str(config), "--port", "0"],
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        listening = self.expect("listening on http://")
        self.url = re.search(r"(http://\S+)", listening)[1]  # type: ignore[index]

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.put(line.rstrip("\n"))

    def expect(self, text: str, timeout: float = 30) -> str:
        while True:
            line = self.lines.get(timeout=timeout)
            assert "Traceback" not in line, line
            if text in line:
                return line

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)


@pytest.mark.xfail(reason="issue 14, unfinished this stop: see the closing note", strict=False)
def test_text_log_lines_carry_the_json_lines_fields_masked(tmp_path):
    import requests

    text = config_yaml(tmp_path / "bridge.db").replace("format: json", "format: text")
    daemon = TextDaemon(write(tmp_path / "config.yaml", text))
    try:
        response = requests.post(
            f"{daemon.url}/webhooks/supersend/{TOKEN}",
            json=sample(first_name="Ada", last_name="Lovelace"),
            timeout=10,
        )
        assert response.status_code == 202
        line = daemon.expect("dry run: would write to hubspot")
        assert " action=delivery.dry_run " in line
        assert '"firstname":"A***"' in line and '"lastname":"L***"' in line
        assert ' contact_key="a***@xoxo.capital"' in line
        assert '"rules":' not in line and 'rules=["interested-to-hubspot"]' in line
        assert re.search(r" delivery_ids=\[\d+\]", line)
        assert "andrew@" not in line and "Lovelace" not in line
    finally:
        assert daemon.stop() == 0


def test_an_unknown_source_is_logged_a_few_times_a_minute(daemon_factory, tmp_path):
    daemon = daemon_factory(write(tmp_path / "config.yaml", config_yaml(tmp_path / "bridge.db")))
    for _ in range(25):
        response = daemon.session.post(
            f"{daemon.url}/webhooks/supersned/{TOKEN}", json=sample(), timeout=10
        )
        assert response.json()["error"] == "unknown_source"
    assert daemon.stop() == 0
    refused = daemon.actions("webhook.refused")
    assert len(refused) == 10  # the rest of the minute's are held back, and counted
    assert refused[0]["message"] == (
        "webhook refused: 404 no source named 'supersned' (configured: supersend)"
    )
    assert (refused[0]["source"], refused[0]["error"], refused[0]["level"]) == (
        "supersned",
        "unknown_source",
        "info",
    )
    assert TOKEN not in json.dumps(refused)


def test_a_stored_event_gives_its_times_as_dlq_show_does(daemon_factory, tmp_path):
    daemon = daemon_factory(write(tmp_path / "config.yaml", config_yaml(tmp_path / "bridge.db")))
    event_id = daemon.post(sample()).json()["event_id"]
    (delivery, *_) = wait_for(lambda: daemon.settled(event_id))
    event = daemon.event(event_id)
    iso = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"
    assert re.fullmatch(iso, event["received_at"]) and re.fullmatch(iso, event["routed_at"])
    assert re.fullmatch(iso, delivery["created_at"]) and re.fullmatch(iso, delivery["updated_at"])
    assert json.loads(event["body"])["type"] == "click"  # the body stays as it came
    assert daemon.stop() == 0


# -- 10, 11. online checks that can be trusted ------------------------------------------------


def test_check_online_names_what_it_could_not_check(tmp_path, hubspot_emulator):
    text = config_yaml(tmp_path / "bridge.db", hubspot=hubspot_settings(hubspot_emulator)).replace(
        "  salesforce:\n    type: salesforce\n",
        "  internal:\n    type: http\n    url: http://127.0.0.1:9/leads\n",
    )
    config = write(
        tmp_path / "config.yaml", text.replace("connector: salesforce", "connector: internal")
    )
    done = run("check", "--online", "--config", str(config))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert any(
        "connectors.internal: not checkable: the http connector cannot describe its fields" in line
        for line in lines
    )
    assert lines[-2:] == [
        "online: checked hubspot; not checked: internal",
        "online: every mapped field exists and accepts its values",
    ]


def test_simulate_online_marks_the_fields_the_crm_would_refuse(tmp_path, hubspot_emulator):
    rules = """
  - name: typo
    when: type == 'click'
    connector: hubspot
    action: upsert_contact
    fields:
      frstname: Ada
      lastname: Lovelace
"""
    text = config_yaml(
        tmp_path / "bridge.db", hubspot=hubspot_settings(hubspot_emulator), rules=rules
    )
    config = write(tmp_path / "config.yaml", text)
    done = run("simulate", "-", "--online", "--config", str(config), stdin=json.dumps(sample()))
    assert done.returncode == 0, done.stderr
    plan = done.stdout.split("Plan (read from the CRMs):\n", 1)[1].splitlines()
    assert plan[0].endswith("; the CRM would refuse it (1 field(s) marked x)")
    assert plan[1].startswith('    x frstname: "')
    assert plan[1].endswith(
        "refused: hubspot has no field 'frstname' on contact (did you mean `firstname`?)"
    )
    assert plan[2] == '    + lastname: "Lovelace"'


# -- 12, 13. what the loader lets through -----------------------------------------------------


def test_check_warns_about_a_type_or_a_field_no_source_sends(tmp_path):
    text = (
        EXAMPLE.read_text()
        .replace(
            "when: type == 'reply'\n    connector: hubspot\n    action: upsert_contact",
            "when: type == 'replied'\n    connector: hubspot\n    action: upsert_contact",
        )
        .replace("{{ contact.first_name | trim }}", "{{ contact.frist_name | trim }}")
    )
    config = write(tmp_path / "config.yaml", text)
    done = run("check", "--config", str(config))
    assert done.returncode == 0, done.stderr
    warnings = [w.split(": ", 3)[-1] for w in done.stderr.splitlines()]
    assert warnings == [
        "rules[1].fields.firstname: contact.frist_name is not a field of the platform's payload"
        " (did you mean `first_name`?) (a source lists others in `contact_fields`)",
        "rules[4].when: no source sends type 'replied' (did you mean `reply`?); known: open,"
        " click, reply, bounce, interest, appointment, sent, unsubscribe, finished, backfill (a"
        " source lists others in `event_types`)",
    ]
    declared = text.replace(
        "    kind: supersend\n",
        "    kind: supersend\n    event_types: [replied]\n    contact_fields: [frist_name]\n",
        1,
    )
    assert run("check", "--config", str(write(config, declared))).stderr == ""


def test_an_empty_config_is_an_error(tmp_path):
    config = write(tmp_path / "config.yaml", "# to do\n")
    done = run("check", "--config", str(config))
    assert done.returncode == 2
    assert done.stderr.splitlines()[1] == (
        f"  {config}: (top level): the file is empty (config.example.yaml shows every setting)"
    )


def test_serve_host_gets_the_check_the_config_file_gets(tmp_path):
    text = config_yaml(tmp_path / "bridge.db").replace(f'tokens: ["{TOKEN}"]', "tokens: []")
    config = write(tmp_path / "config.yaml", text)
    done = run("serve", "--config", str(config), "--host", "0.0.0.0", "--port", "0")
    assert done.returncode == 2
    assert done.stderr.splitlines()[1].endswith(
        "sources.supersend.tokens: a token or a signature is required when listening on"
        " 0.0.0.0 (--host) (not loopback)"
    )


# -- 14, 15. small things ---------------------------------------------------------------------


def test_version_help_and_a_missing_default_config(tmp_path):
    version = run("--version")
    assert version.stdout.strip().startswith("crm-bridge ")
    helped = " ".join(run("check", "--help").stdout.split())
    assert "(default: config.yaml in the current directory)" in helped
    bare = run("check", cwd=tmp_path)
    assert (bare.returncode, one_line(bare)) == (
        2,
        f"crm-bridge: no config file at {tmp_path / 'config.yaml'} (the default): pass one with"
        " --config PATH (config.example.yaml shows every setting)",
    )


def test_simulate_reads_standard_input_and_names_the_sources(tmp_path):
    event = json.dumps(sample(type="reply"))
    done = run("simulate", "-", "--config", str(EXAMPLE), stdin=event)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("event 'reply' from supersend, contact andrew@xoxo.capital")
    unknown = run("simulate", "-", "--source", "nosuch", "--config", str(EXAMPLE), stdin=event)
    assert (unknown.returncode, one_line(unknown)) == (
        2,
        "crm-bridge: no source named 'nosuch'; configured: supersend",
    )


def test_empty_and_unknown_arguments_are_errors(tmp_path):
    config = write(tmp_path / "config.yaml", config_yaml(tmp_path / "bridge.db"))
    contacts = write(tmp_path / "contacts.csv", "email\nann@example.com\n")
    assert run("backfill", str(contacts), "--config", str(config)).returncode == 0
    empty = run("forget", "", "--config", str(config))
    assert (empty.returncode, one_line(empty)) == (2, "crm-bridge: not an email address: ''")
    nosuch = run("dlq", "list", "--connector", "nosuch", "--config", str(config))
    assert (nosuch.returncode, one_line(nosuch)) == (
        2,
        "crm-bridge: no connector named 'nosuch'; configured: hubspot, salesforce",
    )


@pytest.mark.xfail(reason="issue 14, unfinished: races the signal under load", strict=False)
def test_ctrl_c_during_backfill_prints_what_was_stored(tmp_path):
    db = tmp_path / "bridge.db"
    config = write(tmp_path / "config.yaml", config_yaml(db))
    contacts = tmp_path / "contacts.csv"
    contacts.write_text("email\n" + "".join(f"c{i}@example.com\n" for i in range(300_000)))
    proc = subprocess.Popen(
        [sys.executable, "-m", "bridge", "backfill", str(contacts), "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:

        def stored() -> int:
            import sqlite3

            if not db.exists():
                return 0
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
                return int(conn.execute("SELECT count(*) FROM events").fetchone()[0])

        wait_for(lambda: stored() > 0, timeout=60)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    lines = out.splitlines()
    count = stored()
    assert 0 < count < 300_000
    assert f"  stored          {count}" in lines
    assert re.fullmatch(
        r"interrupted after \d+ line\(s\): run it again to store the rest \(what is stored"
        r" already is skipped\)",
        lines[-1],
    )


def test_a_second_backfill_with_another_type_says_what_was_stored_before(tmp_path):
    config = write(tmp_path / "config.yaml", config_yaml(tmp_path / "bridge.db"))
    contacts = write(tmp_path / "contacts.csv", "email\nann@example.com\nbob@example.com\n")
    first = run("backfill", str(contacts), "--type", "interest", "--config", str(config))
    assert first.returncode == 0, first.stderr
    second = run("backfill", str(contacts), "--type", "click", "--config", str(config))
    assert second.returncode == 0, second.stderr
    assert (
        "rows of this file were stored before by a run with another --type (2 with --type"
        " interest): the type is part of an event, so they are now stored twice, once as"
        " 'click', and the rules apply to both"
    ) in second.stdout.splitlines()


def test_bash_completion_completes_commands_and_options():
    script = run("completion").stdout

    def complete(*words: str) -> list[str]:
        line = " ".join(f"'{w}'" for w in words)
        asked = f"COMP_WORDS=({line}); COMP_CWORD={len(words) - 1}; _crm_bridge"
        shell = f'{script}\n{asked}; echo "${{COMPREPLY[@]}}"'
        done = subprocess.run(["bash", "-c", shell], capture_output=True, text=True, timeout=10)
        assert done.returncode == 0, done.stderr
        return done.stdout.split()

    assert complete("crm-bridge", "dl") == ["dlq"]
    assert complete("crm-bridge", "dlq", "") == ["list", "show", "retry", "purge", "--help"]
    assert "--older-than" in complete("crm-bridge", "dlq", "purge", "--")
    assert complete("crm-bridge", "check", "-c", "x.yaml", "--cre") == ["--credentials-dir"]


def test_the_json_schema_is_the_one_shipped_and_the_example_follows_it():
    import jsonschema_rs
    import yaml

    printed = run("schema")
    assert printed.returncode == 0
    schema = json.loads(printed.stdout)
    assert json.loads((ROOT / "config.schema.json").read_text()) == schema
    assert EXAMPLE.read_text().startswith("# yaml-language-server: $schema=config.schema.json\n")
    validator = jsonschema_rs.validator_for(schema)
    assert [e.message for e in validator.iter_errors(yaml.safe_load(EXAMPLE.read_text()))] == []
    typo = yaml.safe_load(EXAMPLE.read_text())
    typo["server"]["prot"] = 1
    assert not validator.is_valid(typo)


# -- 17. the docs say what the daemon does ----------------------------------------------------


@pytest.mark.postgres
@pytest.mark.xfail(reason="issue 14, unfinished this stop: see the closing note", strict=False)
def test_a_store_url_is_shown_without_its_password_and_is_no_secret_without_one(tmp_path):
    import asyncpg

    from tests.postgres import SERVER

    name = f"crm_bridge_empty_{secrets.token_hex(4)}"

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(f"{SERVER}/postgres", timeout=5)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    try:
        host = SERVER.split("@", 1)[1]
        url = f"postgresql://postgres:pw-not-to-be-shown@{host}/{name}"
        config = tmp_path / "config.yaml"
        config.write_text(
            config_yaml(
                tmp_path / "bridge.db",
                store=f"store:\n  url: {url}\n  migrate_on_start: false\n",
            ).replace(f'tokens: ["{TOKEN}"]', 'tokens: ["${WEBHOOK_TOKEN}"]')
        )
        config.chmod(0o600)
        env = {"WEBHOOK_TOKEN": TOKEN}
        done = run("serve", "--config", str(config), "--port", "0", env=env)
        assert done.returncode == 1
        assert one_line(done).startswith(
            f"the schema of postgresql://postgres@{host}/{name} lacks "
        )
        assert "pw-not-to-be-shown" not in done.stderr
        # A URL without a password holds no secret: a config readable by others is fine
        config.write_text(config.read_text().replace(":pw-not-to-be-shown@", "@"))
        config.chmod(0o644)
        checked = run("check", "--config", str(config), env=env)
        assert checked.returncode == 0 and "holds a secret" not in checked.stderr
    finally:
        asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


DOCS = [ROOT / "README.md", ROOT / "deploy" / "INSTALL.md", *sorted((ROOT / "docs").glob("*.md"))]
COMMAND = re.compile(r"^(?:sudo\s+)?(?:\S*/)?crm-bridge\s+(?P<args>[^#|>]*)")


def documented_commands() -> list[tuple[str, str]]:
    """Every `crm-bridge ...` line of the docs' shell blocks, as (doc, arguments)."""
    found = []
    for doc in DOCS:
        block = False
        for line in doc.read_text().splitlines():
            if line.startswith("```"):
                block = line.strip() in ("```sh", "```bash", "```console")
                continue
            match = COMMAND.match(line.strip()) if block else None
            if match:
                found.append((doc.name, match["args"].strip()))
    return found


@pytest.mark.xfail(reason="issue 14, unfinished this stop: see the closing note", strict=False)
def test_every_command_the_docs_show_runs(tmp_path):
    # Given the documents' commands, on a store with a dead letter, from the checkout
    commands = documented_commands()
    assert len(commands) >= 12, commands
    db = tmp_path / "bridge.db"
    config = write(tmp_path / "config.yaml", config_yaml(db))
    files = {
        "contacts.csv": write(tmp_path / "contacts.csv", "email\nann@example.com\n"),
        "event.json": write(tmp_path / "event.json", json.dumps(sample())),
    }
    assert run("backfill", str(files["contacts.csv"]), "--config", str(config)).returncode == 0
    for doc, arguments in commands:
        words = arguments.replace("[--json]", "--json").split()
        words = [w for w in words if w not in ("|", "[--connector", "hubspot]")]
        # The doc's own config, files and placeholders stand for this test's
        args, skip = [], False
        for word in words:
            if skip:
                skip = False
                continue
            if word in ("--config", "-c"):
                skip = True
                continue
            args.append(str(files.get(word, word)))
        if not args or args[0] in ("serve",) or "--online" in args:
            continue  # the daemon and the CRMs have tests of their own
        if args[:2] == ["dlq", "retry"]:
            args = ["dlq", "retry", "--all"]
        if args[0] == "forget":
            args = ["forget", "someone@example.com"]
        done = run(*args, "--config", str(config))
        assert "Traceback" not in done.stderr, (doc, arguments, done.stderr)
        assert "usage:" not in done.stderr, (doc, arguments, done.stderr)
        assert done.returncode in (0, 1), (doc, arguments, done.stdout, done.stderr)
