"""A throwaway certificate authority for the emulators' TLS.

simple-salesforce only speaks https, so the Salesforce emulator needs a
certificate clients can verify: trustme issues one for 127.0.0.1 and localhost,
and clients trust the CA through a PEM file (``ca_bundle=<path>``,
``requests.Session.verify``, ``REQUESTS_CA_BUNDLE``, HubSpot ``ssl_ca_cert``).
"""

from __future__ import annotations

import ssl
from pathlib import Path

import trustme

__all__ = ["LocalCA"]


class LocalCA:
    """trustme CA plus one server certificate for ``127.0.0.1`` and ``localhost``."""

    def __init__(self) -> None:
        self.ca = trustme.CA()
        self.server_cert = self.ca.issue_cert("127.0.0.1", "localhost")
        self.ca_path: Path | None = None

    def server_context(self) -> ssl.SSLContext:
        """A fresh server-side context presenting the emulator certificate."""
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.server_cert.configure_cert(ctx)
        return ctx

    def client_context(self) -> ssl.SSLContext:
        """A client context trusting only this CA (for aiohttp/httpx/urllib clients)."""
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        self.ca.configure_trust(ctx)
        return ctx

    def write_ca_pem(self, path: str | Path) -> Path:
        """Write the CA certificate as PEM to ``path``; remembered as ``ca_path``."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        self.ca.cert_pem.write_to_path(str(target))
        self.ca_path = target
        return target

    @property
    def ca_pem(self) -> bytes:
        return self.ca.cert_pem.bytes()
