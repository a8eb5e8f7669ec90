"""Who may post to a source: an IP allow-list, a token, a signature.

The client's address is the socket's peer, or, when that peer is a configured proxy, the
nearest address in `X-Forwarded-For` that is not itself a trusted proxy (the header's left part
is whatever the client wrote). Secrets are compared in constant time, against every active
one, always, so neither the answer nor its timing tells which one matched.

A request is local (this machine's own: the operator endpoints, a source without a token) only
if it comes from loopback, not from a trusted proxy, and carries no forwarding header: a
reverse proxy on this host connects from loopback too, on behalf of anyone.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Mapping, Sequence

from bridge.config import SignatureConfig, SourceConfig
from bridge.errors import PayloadError
from bridge.ingress.signatures import (
    SignedMessage,
    decode_secret,
    verify_body_hmac,
    verify_standard,
)

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _address(text: str | None) -> IPAddress | None:
    try:
        return ipaddress.ip_address((text or "").strip())
    except ValueError:
        return None


def _within(address: IPAddress, networks: Sequence[IPNetwork]) -> bool:
    return any(address in net for net in networks if net.version == address.version)


def client_address(
    peer: str | None, forwarded_for: str | None, trusted_proxies: Sequence[IPNetwork]
) -> IPAddress | None:
    """The address a request came from (None if it cannot be told)."""
    address = _address(peer)
    if address is None or not forwarded_for or not _within(address, trusted_proxies):
        return address
    for hop in reversed(forwarded_for.split(",")):
        hop_address = _address(hop)
        if hop_address is None:
            return None  # a garbled chain: trust none of it
        if not _within(hop_address, trusted_proxies):
            return hop_address
        address = hop_address
    return address


# Headers a proxy adds for the client it forwards (X-Real-IP: nginx's common set-up).
FORWARDING_HEADERS = ("X-Forwarded-For", "Forwarded", "X-Real-IP")


def is_local(
    peer: str | None, headers: Mapping[str, str], trusted_proxies: Sequence[IPNetwork]
) -> bool:
    """Whether a request comes from this machine itself, not through a proxy."""
    address = _address(peer)
    if address is None or not address.is_loopback or _within(address, trusted_proxies):
        return False
    return not any(name in headers for name in FORWARDING_HEADERS)


def check_address(address: IPAddress | None, allowed: Sequence[IPNetwork]) -> None:
    if allowed and (address is None or not _within(address, allowed)):
        raise PayloadError(403, "ip_forbidden", "this address may not post to this source")


def presented_token(
    places: Sequence[str],
    path_token: str | None,
    query: Mapping[str, str],
    headers: Mapping[str, str],
) -> str | None:
    """The token the request carries, looked for only where the source allows it."""
    if "path" in places and path_token:
        return path_token
    if "query" in places and query.get("token"):
        return query["token"]
    if "header" in places:
        if headers.get("X-Webhook-Token"):
            return headers["X-Webhook-Token"]
        scheme, _, value = headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer" and value:
            return value
    return None


def check_token(source: SourceConfig, given: str | None, local: bool) -> None:
    """`local`: the request is this machine's own (`is_local`)."""
    tokens = source.active_tokens()
    if not tokens:
        # Allowed by the config only while the daemon listens on loopback: for this machine.
        if source.signature is None and not local:
            raise PayloadError(
                401, "unauthorized", "this source has no token: only this machine may post to it"
            )
        return
    presented = (given or "").encode()
    if not any([hmac.compare_digest(presented, t.encode()) for t in tokens]):
        raise PayloadError(401, "unauthorized", "missing or wrong webhook token")


def check_signature(
    signature: SignatureConfig, headers: Mapping[str, str], body: bytes, now: float
) -> SignedMessage | None:
    """Verify the request's signature; the Standard Webhooks message (for the replay check),
    or None for a generic HMAC."""
    secrets = [s.get_secret_value() for s in signature.secrets]
    if signature.scheme == "standard_webhooks":
        keys = [decode_secret(s) for s in secrets]
        return verify_standard(headers, body, keys, now, signature.tolerance)
    verify_body_hmac(
        headers.get(signature.header),
        body,
        [s.encode() for s in secrets],
        algorithm=signature.algorithm,
        encoding=signature.encoding,
        prefix=signature.prefix,
    )
    return None


def replayed() -> PayloadError:
    return PayloadError(
        409, "replayed", "this webhook-id was already received and its event is not stored"
    )
