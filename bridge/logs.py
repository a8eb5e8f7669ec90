"""Logging set-up: JSON lines for machines, plain lines on a terminal; nothing secret in them.

Every record may carry an `action` (a stable name such as `delivery.done`) and ids in `extra`;
the JSON form keeps them as fields, so a user can follow one contact from webhook to CRM.

Every line, whatever its level and whichever library wrote it, passes through one `Redactor`
before it leaves the process: the configured secrets and anything that looks like a credential
(`token=`, `Bearer ...`, a token in a webhook URL, a SOAP `<sessionId>`) become `***`, and,
unless `logging.mask_personal_data` is false, emails become `j***@example.com` and names in
field maps (`firstname`, `LastName`, ...) keep their first letter only.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp.abc import AbstractAccessLogger
from aiohttp.web import BaseRequest, StreamResponse

# Attributes every LogRecord has; anything else came from `extra`.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}

MASK = "***"
# The local part's characters are RFC 5322's `atext` and dots.
_ATEXT = r"A-Za-z0-9!#$%&'*+/=?^_`{|}~\-"
# A local part never starts with `/` here: `postgresql://user@host/db` is a URL's user and host,
# shown as they are (only the password is secret), not an email to mask.
_LOCAL_START = _ATEXT.replace("/", "")
_EMAIL = re.compile(
    rf"(?<![{_ATEXT}.])([{_LOCAL_START}])[{_ATEXT}.]*@([A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+)"
)
# A key naming a credential, whatever comes before it (`hubspot_token`, `accessToken`,
# `X-Api-Key`, `x-webhook-token`), then `:` or `=`, then the value. The key starts where a
# name starts (not `\b`: `_` is a word character, so `hubspot_token` has no boundary at `t`).
_CREDENTIAL = re.compile(
    r"(?i)(?<![A-Za-z0-9_-])([A-Za-z0-9_-]*?(?:token|passw(?:or)?d|secret|session[_-]?id|"
    r"api[_-]?key|signature|authorization))"
    r"(\\?[\"']?\s*[:=]\s*\\?[\"']?)(?:Bearer\s+)?([^\s\"'\\&,;}<]+)"
)
# Substrings every _CREDENTIAL match contains (lower-case).
_CREDENTIAL_WORDS = ("token", "passw", "secret", "session", "key", "signature", "authorization")
_BEARER = re.compile(r"(?i)\b(Bearer|Basic|OAuth)\s+[A-Za-z0-9._~+/=-]{6,}")
_XML_SECRET = re.compile(
    r"(?i)<((?:\w+:)?(?:sessionId|password|access_token|client_secret))>[^<]*</"
)
_QUERY_SECRET = re.compile(r"(?i)(^|&)(token|access_token|key|secret|signature)=[^&]*")
_WEBHOOK_PATH = re.compile(r"(/webhooks/[^/\s?\"']+/)[^/\s?\"'#]+")
# Keys whose values name a person, in the field maps of CRM writes (HubSpot, Salesforce, ours).
PERSONAL_KEYS = frozenset(
    {
        "firstname",
        "lastname",
        "first_name",
        "last_name",
        "fullname",
        "full_name",
        "name",
        "phone",
        "mobilephone",
        "mobile_phone",
    }
)


def mask_email(match: re.Match[str]) -> str:
    return f"{match.group(1)}{MASK}@{match.group(2)}"


def mask_address(text: str) -> str:
    """`jane@example.com` as `j***@example.com` (any email inside `text`)."""
    return _EMAIL.sub(mask_email, text)


class Redactor:
    """Takes secrets and personal data out of log text; one per process (`REDACTOR`)."""

    def __init__(self) -> None:
        self.mask_personal = True
        self._secrets: list[str] = []  # longest first

    def add_secrets(self, secrets: Iterable[str]) -> None:
        """Values to hide wherever they appear (short ones would mask ordinary words)."""
        found = {s for s in secrets if len(s) >= 6}
        # JSON escapes a secret holding quotes or backslashes: hide that form too.
        found |= {orjson.dumps(s).decode()[1:-1] for s in found}
        self._secrets = sorted(set(self._secrets) | found, key=len, reverse=True)

    def text(self, text: str) -> str:
        # Every line of the daemon passes here: each pattern runs only when a cheap substring
        # test says it could match (a routed event's line costs a few microseconds, not 50).
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, MASK)
        lower = text.lower()
        if "</" in text:
            text = _XML_SECRET.sub(rf"<\1>{MASK}</", text)
        if any(word in lower for word in _CREDENTIAL_WORDS):
            text = _CREDENTIAL.sub(rf"\1\2{MASK}", text)
        if "bearer" in lower or "basic" in lower or "oauth" in lower:
            text = _BEARER.sub(rf"\1 {MASK}", text)
        if "/webhooks/" in text:
            text = _WEBHOOK_PATH.sub(rf"\1{MASK}", text)
        if self.mask_personal and "@" in text:
            text = _EMAIL.sub(mask_email, text)
        return text

    def value(self, value: Any, depth: int = 0) -> Any:
        """A structured `extra` value with personal fields masked (nested maps only: the top
        level holds our own fields, such as a connector's `name`)."""
        if isinstance(value, dict):
            return {
                k: self._personal(v)
                if depth and self.mask_personal and str(k).lower() in PERSONAL_KEYS
                else self.value(v, depth + 1)
                for k, v in value.items()
            }
        if isinstance(value, list | tuple):
            return [self.value(v, depth + 1) for v in value]
        return value

    @staticmethod
    def _personal(value: Any) -> Any:
        if isinstance(value, str) and value:
            return value[0] + MASK
        return value if value is None else MASK


REDACTOR = Redactor()


class JsonFormatter(logging.Formatter):
    def __init__(self, redactor: Redactor = REDACTOR) -> None:
        super().__init__()
        self.redactor = redactor

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        out.update(
            {k: self.redactor.value(v) for k, v in vars(record).items() if k not in _STANDARD}
        )
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return self.redactor.text(orjson.dumps(out, default=str).decode())


class TextFormatter(logging.Formatter):
    """One line for a person: the message, then the record's `extra` fields as `key=value`
    (the JSON line's fields, masked alike): which delivery, contact, rule and what it would
    write stay on the line."""

    def __init__(self, redactor: Redactor = REDACTOR) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
        self.redactor = redactor

    def format(self, record: logging.LogRecord) -> str:
        text = self.redactor.text(super().format(record))
        # Each value masked alone: an address right after `key=` would otherwise take the key
        # into its local part.
        pairs = [
            f"{k}={self.redactor.text(_text_value(self.redactor.value(v)))}"
            for k, v in vars(record).items()
            if k not in _STANDARD and v is not None and v != [] and v != {}
        ]
        if pairs:
            head, sep, tail = text.partition("\n")  # a traceback stays below the line
            text = f"{head} {' '.join(pairs)}{sep}{tail}"
        return text


def _text_value(value: Any) -> str:
    """A bare word as it is; anything else (spaces, quotes, `=`, lists, maps) as JSON."""
    # `@` too: `=` may start an email's local part, so `key=j***@x.io` would mask the key.
    if isinstance(value, str) and value and not any(c in value for c in " \"'=@\n\t"):
        return value
    return orjson.dumps(value, default=str).decode()


class LogLimiter:
    """At most `burst` lines per `period` seconds for one kind of line, so that a stranger
    cannot flood the log (a scanner posting to made-up sources). Each line that gets through
    says how many were held back since the last one."""

    def __init__(self, burst: int = 10, period: float = 60.0) -> None:
        self.burst, self.period = burst, period
        self._window_start = float("-inf")
        self._in_window = 0
        self.suppressed = 0

    def allow(self, now: float) -> int | None:
        """None: drop this line; else how many were dropped before it (then reset)."""
        if now - self._window_start >= self.period:
            self._window_start, self._in_window = now, 0
        if self._in_window >= self.burst:
            self.suppressed += 1
            return None
        self._in_window += 1
        dropped, self.suppressed = self.suppressed, 0
        return dropped


class RedactingAccessLogger(AbstractAccessLogger):
    """One line per request (`http.access`): method, path, status, time; a token in the path
    or the query is replaced by `***` (the formatter would catch it too; this is explicit)."""

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        self.logger.info(
            "%s %s %s",
            request.method,
            redact_url(request.path_qs),
            response.status,
            extra={
                "action": "http.access",
                "method": request.method,
                "path": redact_url(request.path_qs),
                "status": response.status,
                "duration_ms": round(time * 1000, 1),
                "remote": request.remote,
            },
        )


def redact_url(path_qs: str) -> str:
    path, sep, query = path_qs.partition("?")
    path = _WEBHOOK_PATH.sub(rf"\1{MASK}", path)
    query = _QUERY_SECRET.sub(rf"\1\2={MASK}", query)
    return path + sep + query


def setup_logging(
    level: str = "INFO",
    fmt: str = "auto",
    *,
    mask_personal_data: bool = True,
    secrets: Iterable[str] = (),
) -> None:
    REDACTOR.mask_personal = mask_personal_data
    REDACTOR.add_secrets(secrets)
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json" or (fmt == "auto" and not sys.stderr.isatty()):
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aiohttp's own access log prints URLs whole; ours (logging.access_log) redacts them.
    logging.getLogger("aiohttp.access").disabled = True
