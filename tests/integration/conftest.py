"""Connector factories for the integration tests: real SDKs, pointed at the emulators."""

from __future__ import annotations

import pytest

from connectors.hubspot import HubSpotConfig, HubSpotConnector
from connectors.salesforce import SalesforceConfig, SalesforceConnector


@pytest.fixture
async def hubspot_of(hubspot_emulator):
    """Open HubSpot connectors (on `emulator`, default the test's), closed afterwards."""
    opened = []

    async def make(emulator=None, **overrides) -> HubSpotConnector:
        settings = {
            "type": "hubspot",
            "access_token": "pat-na1-test",
            "base_url": (emulator or hubspot_emulator).url,
            "timeout": 2,
        } | overrides
        connector = HubSpotConnector("hubspot", HubSpotConfig.model_validate(settings))
        await connector.open()
        opened.append(connector)
        return connector

    yield make
    for connector in opened:
        await connector.close()


@pytest.fixture
async def salesforce_of(salesforce_emulator):
    """Open Salesforce connectors, closed afterwards; `soap=False` leaves out the SOAP login."""
    opened = []

    async def make(soap: bool = True, **overrides) -> SalesforceConnector:
        settings: dict = {
            "type": "salesforce",
            "login_url": salesforce_emulator.url,
            "ca_bundle": str(salesforce_emulator.ca_path),
            "timeout": 2,
        }
        if soap:
            settings |= {"username": "user@example.com", "password": "pw", "security_token": "tok"}
        settings |= overrides
        connector = SalesforceConnector("salesforce", SalesforceConfig.model_validate(settings))
        await connector.open()
        opened.append(connector)
        return connector

    yield make
    for connector in opened:
        await connector.close()


@pytest.fixture
async def salesforce(salesforce_of) -> SalesforceConnector:
    return await salesforce_of()


@pytest.fixture
async def hubspot(hubspot_of) -> HubSpotConnector:
    return await hubspot_of()
