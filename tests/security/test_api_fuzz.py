"""schemathesis against a live daemon (a subprocess on 127.0.0.1), from the OpenAPI document
it serves: no 5xx, no crash, every answer as documented, and nothing accepted that the schema
forbids (negative data is refused with a 4xx). Bounded: FUZZ_EXAMPLES per operation and
generation mode (positive, negative)."""

from __future__ import annotations

import os

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from bridge.openapi import document
from tests.acceptance.conftest import Daemon
from tests.support import TOKEN, config_yaml

FUZZ_EXAMPLES = int(os.environ.get("CRM_BRIDGE_FUZZ_EXAMPLES", "100"))
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
]
COUNTS: dict[str, int] = {}
STATUSES: dict[str, dict[int, int]] = {}


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    path = tmp / "config.yaml"
    # A token-less source (allowed on loopback) lets positive cases through to the store, and
    # a token source checks that refusals stay refusals whatever the body.
    text = config_yaml(tmp / "bridge.db").replace(
        f'    tokens: ["{TOKEN}"]\n', f'    tokens: []\n  guarded:\n    tokens: ["{TOKEN}"]\n'
    )
    path.write_text(text)
    daemon = Daemon(path)
    yield daemon
    # The figures (run with -s to see them): cases and answers per operation and mode.
    for label, count in sorted(COUNTS.items()):
        answers = ", ".join(f"{s}: {n}" for s, n in sorted(STATUSES.get(label, {}).items()))
        print(f"\nfuzz {label}: {count} cases; {answers}")
    print(f"\nfuzz total: {sum(COUNTS.values())} cases")
    assert daemon.stop() == 0  # no crash: it stops cleanly after the whole run
    assert not [r for r in daemon.logs if r.get("level") in ("error", "critical")]


# The operations, from the document the daemon serves (checked equal to it below).
SOURCES = ["guarded", "supersend"]
SCHEMA = schemathesis.openapi.from_dict(document(SOURCES))
OPERATIONS = [result.ok() for result in SCHEMA.get_all_operations()]


def test_the_daemon_serves_the_document(daemon):
    served = daemon.session.get(f"{daemon.url}/openapi.json", timeout=10)
    assert served.status_code == 200 and served.json() == document(SOURCES)


# Negative data needs something to break: the webhook operations (body, path); the GETs
# take nothing a request could get wrong (an event id is any string).
RUNS = [(op, GenerationMode.POSITIVE) for op in OPERATIONS] + [
    (op, GenerationMode.NEGATIVE) for op in OPERATIONS if op.method == "post"
]


@pytest.mark.parametrize(
    ("operation", "mode"), RUNS, ids=[f"{op.label} {mode.value}" for op, mode in RUNS]
)
def test_the_api_holds_its_schema(daemon, operation, mode):
    label = f"{operation.label} ({mode.value})"

    @settings(
        max_examples=FUZZ_EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(operation.as_strategy(generation_mode=mode))
    def run(case):
        COUNTS[label] = COUNTS.get(label, 0) + 1
        response = case.call_and_validate(base_url=daemon.url, checks=CHECKS, timeout=10)
        seen = STATUSES.setdefault(label, {})
        seen[response.status_code] = seen.get(response.status_code, 0) + 1

    run()
    assert COUNTS[label] > 0
