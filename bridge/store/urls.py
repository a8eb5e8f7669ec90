"""A store URL as it may be shown (logs, errors, `status`): without its password.

libpq takes the password in the userinfo (`postgresql://user:secret@host/db`) or as a query
parameter (`postgresql://user@host/db?password=secret`); both go. The one helper for the
config's `describe()` and the store's own messages, so the two cannot drift apart.
"""

from __future__ import annotations

from urllib.parse import unquote, urlsplit, urlunsplit


def redact_url(url: str) -> str:
    """`url` without the password of its userinfo and without any `password` parameter."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        user = netloc.rpartition("@")[0].partition(":")[0]
        host = netloc.rpartition("@")[2]
        netloc = f"{user}@{host}" if user else host
    # The other parameters are kept byte for byte (no re-encoding). The key is compared
    # decoded and case-blind: `pass%77ord` or `Password` is hidden too, one parameter too many
    # hidden being better than a password shown.
    kept = [
        pair
        for pair in parts.query.split("&")
        if pair and unquote(pair.partition("=")[0]).strip().lower() != "password"
    ]
    return urlunsplit(parts._replace(netloc=netloc, query="&".join(kept)))
