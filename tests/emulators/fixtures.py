"""pytest fixtures for the emulators; registered by ``pytest_plugins`` in tests/conftest.py.

Each emulator fixture starts a fresh server per test, stops it afterwards and
fails the test if the emulator itself raised (``emulator.errors``). The CA is
made once per session.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .hubspot import HubSpotEmulator
from .salesforce import SalesforceEmulator
from .tls import LocalCA


@pytest.fixture(scope="session")
def tls_ca(tmp_path_factory: pytest.TempPathFactory) -> LocalCA:
    """Session CA; ``tls_ca.ca_path`` is the PEM file clients trust."""
    ca = LocalCA()
    ca.write_ca_pem(tmp_path_factory.mktemp("emulator-tls") / "ca.pem")
    return ca


@pytest.fixture
def hubspot_emulator() -> Iterator[HubSpotEmulator]:
    """A running HubSpot emulator over plain HTTP (token ``pat-na1-test``)."""
    emulator = HubSpotEmulator()
    emulator.start()
    try:
        yield emulator
    finally:
        emulator.stop()
    assert not emulator.errors, f"the HubSpot emulator failed: {emulator.errors!r}"


@pytest.fixture
def salesforce_emulator(tls_ca: LocalCA) -> Iterator[SalesforceEmulator]:
    """A running Salesforce emulator over TLS; clients use ``.url``/``.instance``, ``.ca_path``."""
    emulator = SalesforceEmulator(tls=tls_ca)
    emulator.start()
    try:
        yield emulator
    finally:
        emulator.stop()
    assert not emulator.errors, f"the Salesforce emulator failed: {emulator.errors!r}"
