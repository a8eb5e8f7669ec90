"""Outbound safety: connectors talk only to the hosts their config names.

Each connector's HTTP client gets a guard that refuses any request to another host, and never
follows a redirect (a 3xx comes back as an answer, classified like any other). TLS is always
verified: against the system's CAs or the connector's `ca_bundle`, never `REQUESTS_CA_BUNDLE`.
Salesforce logins name the instance to use afterwards: it must belong to the login's domain
(`*.salesforce.com`, `*.force.com` for Salesforce's own login hosts; the very same host for a
custom `login_url` such as an emulator).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

import requests
import urllib3
from requests.adapters import HTTPAdapter

SALESFORCE_DOMAINS = ("salesforce.com", "force.com", "salesforce.mil")
_DEFAULT_PORTS = {"https": 443, "http": 80}


class OutboundRefused(requests.exceptions.RequestException, urllib3.exceptions.HTTPError):
    """A connector tried to reach a host its config does not name."""


def origin(url: str) -> str:
    """`host:port` of a URL (or of a bare `host[:port]`), lower-case, default port filled."""
    parts = urlsplit(url if "://" in url else f"https://{url}")
    port = parts.port or _DEFAULT_PORTS.get(parts.scheme, 443)
    return f"{(parts.hostname or '').lower()}:{port}"


class HostGuard:
    """The origins one connector may reach."""

    def __init__(self, urls: Iterable[str | None]) -> None:
        self.allowed = {origin(u) for u in urls if u}

    def allow(self, url: str) -> None:
        self.allowed.add(origin(url))

    def check(self, url: str) -> None:
        if origin(url) not in self.allowed:
            # The URL may carry a token in its query: name the host only.
            raise OutboundRefused(
                f"refused to connect to {urlsplit(url).hostname!r}: not in the connector's config"
            )


class _GuardedAdapter(HTTPAdapter):
    def __init__(self, guard: HostGuard) -> None:
        super().__init__()
        self.guard = guard

    def send(self, request: requests.PreparedRequest, *args: Any, **kwargs: Any) -> Any:
        self.guard.check(request.url or "")
        return super().send(request, *args, **kwargs)


def guard_session(session: requests.Session, urls: Iterable[str | None]) -> HostGuard:
    """Confine a requests session to `urls`' hosts; the guard, to allow more later."""
    guard = HostGuard(urls)
    adapter = _GuardedAdapter(guard)
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    # Redirects: the Salesforce session never follows them (allow_redirects=False); one that
    # a caller did follow could not leave these hosts anyway.
    return guard


def guard_pool_manager(pool: urllib3.PoolManager, guard: HostGuard) -> None:
    """Confine a urllib3 pool manager (the HubSpot SDK's) to the guard's hosts, and stop it
    following redirects (urllib3 follows them by default, to any host)."""
    urlopen = pool.urlopen

    def guarded(method: str, url: str, redirect: bool = True, **kw: Any) -> Any:
        guard.check(url)
        return urlopen(method, url, redirect=False, **kw)

    pool.urlopen = guarded  # type: ignore[method-assign]


def guard_sdk_apis(apis: Iterable[Any], base_url: str) -> HostGuard:
    """Guard every generated-SDK API object's pool manager (HubSpot's client)."""
    guard = HostGuard([base_url])
    seen: set[int] = set()
    for api in apis:
        pool = api.api_client.rest_client.pool_manager
        if id(pool) not in seen:
            seen.add(id(pool))
            guard_pool_manager(pool, guard)
    return guard


def instance_belongs(instance: str, login_url: str) -> bool:
    """Whether a Salesforce instance (`host[:port]` or URL) returned by a login at `login_url`
    is one the connector may talk to."""
    host = origin(instance).rpartition(":")[0]
    login_host = origin(login_url).rpartition(":")[0]
    if any(login_host == d or login_host.endswith("." + d) for d in SALESFORCE_DOMAINS):
        return origin(instance).endswith(":443") and any(
            host.endswith("." + d) for d in SALESFORCE_DOMAINS
        )
    return origin(instance) == origin(login_url)


def template_guard(templates: Iterable[str | None]) -> HostGuard | None:
    """For URL templates (the http connector's): the hosts written in them, or None when one
    leaves its host to the template (`{{ ... }}` before the path), which the config accepted."""
    urls: list[str] = []
    for template in templates:
        if not template:
            continue
        scheme, sep, rest = template.partition("://")
        authority = rest.split("/", 1)[0].split("?", 1)[0]
        if not sep or "{" in scheme or "{" in authority:
            return None
        urls.append(f"{scheme}://{authority}")
    return HostGuard(urls)
