"""Local emulators of the HubSpot CRM v3 and Salesforce REST APIs for tests."""

from .hubspot import HubSpotEmulator
from .runner import Call, ManualClock, ServerThread
from .salesforce import SalesforceEmulator
from .tls import LocalCA

__all__ = [
    "Call",
    "HubSpotEmulator",
    "LocalCA",
    "ManualClock",
    "SalesforceEmulator",
    "ServerThread",
]
