"""Webhook signatures: the Standard Webhooks scheme and a generic HMAC of the body.

Standard Webhooks (https://www.standardwebhooks.com, the scheme Svix and others send): the
sender signs `{webhook-id}.{webhook-timestamp}.{body}` with HMAC-SHA256 under a shared secret
`whsec_<base64>` and sends `webhook-signature: v1,<base64> [v1,<base64> ...]` (several while it
rotates its secret). The receiver accepts if any signature matches any of its active secrets
and the timestamp is within `tolerance` of its clock, either way; it refuses a `webhook-id` it
has seen (the caller asks the store: see Store.seen_message).

Pure functions of bytes and strings: no HTTP, no clock, no store, so they are easy to check
against the reference implementation.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from bridge.errors import PayloadError

SECRET_PREFIX = "whsec_"
MAX_ID_LENGTH = 256  # webhook-id values are short (msg_<ksuid>); longer ones are refused
DIGESTS = {"sha1": hashlib.sha1, "sha256": hashlib.sha256, "sha512": hashlib.sha512}


def decode_secret(secret: str) -> bytes:
    """The key bytes of a `whsec_<base64>` secret (the prefix is optional). Raises ValueError
    without repeating the secret."""
    raw = secret.strip().removeprefix(SECRET_PREFIX)
    raw += "=" * (-len(raw) % 4)  # accepted unpadded too, as the reference libraries do
    try:
        key = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("a Standard Webhooks secret is whsec_ followed by base64") from None
    if len(key) < 16:
        raise ValueError("a Standard Webhooks secret needs at least 16 bytes of key")
    return key


def sign(key: bytes, message_id: str, timestamp: int, body: bytes) -> str:
    """The `v1,<base64>` signature of a message (used by tests and by senders)."""
    content = f"{message_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, content, hashlib.sha256).digest()).decode()


def _refuse(code: str, message: str) -> PayloadError:
    return PayloadError(401, code, message)


@dataclass(frozen=True)
class SignedMessage:
    """What a verified Standard Webhooks request carried besides its body."""

    message_id: str
    timestamp: int


def verify_standard(
    headers: Mapping[str, str],
    body: bytes,
    keys: Sequence[bytes],
    now: float,
    tolerance: float,
) -> SignedMessage:
    """Check a Standard Webhooks signature; the message id and timestamp, or a 401 PayloadError
    (`signature_missing`, `signature_expired`, `signature_invalid`)."""
    # Svix, the scheme's origin, still sends the same headers named svix-*.
    message_id = headers.get("webhook-id") or headers.get("svix-id") or ""
    stamp = headers.get("webhook-timestamp") or headers.get("svix-timestamp") or ""
    signatures = headers.get("webhook-signature") or headers.get("svix-signature") or ""
    if not message_id or not stamp or not signatures:
        raise _refuse(
            "signature_missing",
            "webhook-id, webhook-timestamp and webhook-signature headers are required",
        )
    if len(message_id) > MAX_ID_LENGTH or not message_id.isprintable():
        raise _refuse("signature_invalid", "webhook-id is not a valid message id")
    if not stamp.isascii() or not stamp.isdigit() or len(stamp) > 12:
        raise _refuse("signature_invalid", "webhook-timestamp is not an integer of seconds")
    timestamp = int(stamp)
    # Both directions: an old message may be a replay past the id memory; a future one may
    # have been made in advance by someone who briefly held a secret.
    if abs(now - timestamp) > tolerance:
        raise _refuse(
            "signature_expired",
            f"webhook-timestamp is more than {tolerance:.0f} seconds from the receiver's clock",
        )
    given = [
        part.partition(",")[2].encode()
        for part in signatures.split(" ")[:16]  # rotation sends a few; more is not legitimate
        if part.startswith("v1,")
    ]
    expected = [sign(key, message_id, timestamp, body)[3:].encode() for key in keys]
    # Every pair compared, in constant time each, so timing tells nothing about which matched.
    matches = [hmac.compare_digest(g, e) for g in given for e in expected]
    if not any(matches):
        raise _refuse("signature_invalid", "no valid signature for this message")
    return SignedMessage(message_id, timestamp)


def body_hmac(secret: bytes, body: bytes, algorithm: str, encoding: str) -> str:
    """The generic HMAC of a body, hex or base64 encoded."""
    digest = hmac.new(secret, body, DIGESTS[algorithm]).digest()
    return digest.hex() if encoding == "hex" else base64.b64encode(digest).decode()


def verify_body_hmac(
    value: str | None,
    body: bytes,
    secrets: Sequence[bytes],
    *,
    algorithm: str,
    encoding: str,
    prefix: str,
) -> None:
    """Check a header carrying `<prefix><HMAC of the body>` (e.g. GitHub's `sha256=<hex>`);
    a 401 PayloadError if it is missing or matches no active secret."""
    if not value:
        raise _refuse("signature_missing", "the signature header is missing")
    given = value.strip().removeprefix(prefix)
    if encoding == "hex":
        given = given.lower()
    expected = [body_hmac(s, body, algorithm, encoding) for s in secrets]
    if not any([hmac.compare_digest(given.encode(), e.encode()) for e in expected]):
        raise _refuse("signature_invalid", "no valid signature for this body")
