"""Apps with one configurable source, served in process on 127.0.0.1."""

from __future__ import annotations

import base64
import json

import pytest
from aiohttp.test_utils import TestClient, TestServer

from bridge.config import parse_config
from bridge.server import create_app, runner_options
from tests.acceptance.conftest import daemon_factory  # noqa: F401  (the daemon as a process)
from tests.support import config_yaml

SECRET_KEY = bytes(range(32))
SECRET = "whsec_" + base64.b64encode(SECRET_KEY).decode()
OLD_KEY = b"an-older-secret-key-0123456789ab"
OLD_SECRET = "whsec_" + base64.b64encode(OLD_KEY).decode()
NOW = 1_700_000_000.0
JSON = {"Content-Type": "application/json"}


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def source_config(
    tmp_path, source: str = "", server: str = "", rules: str | None = None, privacy: str = ""
):
    """The test config with `sources:` replaced by the given YAML (indented under it)."""
    text = config_yaml(tmp_path / "bridge.db", server=server, rules=rules)
    if privacy:
        text += f"privacy:\n{privacy}\n"
    if source:
        head, _, rest = text.partition("sources:\n")
        _, _, tail = rest.partition("store:\n")
        text = f"{head}sources:\n{source}\nstore:\n{tail}"
    return parse_config(text)


@pytest.fixture
async def client_for(tmp_path):
    """Start an app for a source config; closes them all at the end."""
    clients = []

    async def make(source: str = "", server: str = "", clock: Clock | None = None, **kw):
        config = source_config(tmp_path / str(len(clients)), source, server, **kw)
        (tmp_path / str(len(clients))).mkdir(exist_ok=True)
        app = create_app(config, clock=clock or Clock())
        options = runner_options(config)
        options.pop("shutdown_timeout")
        server = TestServer(app, host="127.0.0.1")
        await server.start_server(**options)  # (TestServer's own kwargs do not reach the runner)
        client = TestClient(server)
        await client.start_server()
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


async def answer(response):
    return response.status, json.loads(await response.text())
