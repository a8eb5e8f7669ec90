"""The filters and tests rule templates and conditions may use, besides Jinja2's own.

Every one is total: a missing value (None or undefined) gives an empty result or False, never
an error, so a rule written for one event type does not fail on another that lacks a field.

Filters: `split_name` (a full name as [first, last]), `first_name`, `last_name`, `truncate_to(n)`
(a hard cut, for a CRM field's length), `date(fmt)`, `datetime`, `timestamp_ms`, and Jinja2's
`lower`, `upper`, `title`, `default`, `trim`, `replace`, ...
Tests: `contains`, `startswith`, `endswith`, `match` (a regex from the start), `search`
(a regex anywhere), as in `contact.email is endswith('@acme.com')`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from datetime import UTC, date, datetime
from typing import Any

import jinja2
import re2  # type: ignore[import-untyped]

# Regexes run on RE2, in time linear in the subject: no pattern (a rule's) over any subject (a
# sender's) can backtrack for hours and hold the router. RE2 has no backreferences or
# lookarounds; a rule using them is refused when the config loads.
_RE2 = re2.Options()
_RE2.log_errors = False  # the loader reports a bad pattern itself, with file and line
MAX_PATTERN = 200
MAX_SUBJECT = 10_000


def _missing(value: Any) -> bool:
    return value is None or isinstance(value, jinja2.Undefined)


def _text(value: Any) -> str:
    return "" if _missing(value) else str(value)


def split_name(value: Any) -> list[str]:
    """ "Ada King Lovelace" -> ["Ada", "King Lovelace"]; one word is a first name."""
    parts = _text(value).split(None, 1)
    return [parts[0] if parts else "", parts[1] if len(parts) > 1 else ""]


def first_name(value: Any) -> str:
    return split_name(value)[0]


def last_name(value: Any) -> str:
    return split_name(value)[1]


def truncate_to(value: Any, length: int) -> str:
    """At most `length` characters, cut hard (CRM text fields refuse longer values)."""
    return _text(value)[: max(0, int(length))]


def _as_datetime(value: Any) -> datetime | None:
    if _missing(value) or value == "":
        return None
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day, tzinfo=UTC)
    if isinstance(value, int | float) and not isinstance(value, bool):
        # Epoch seconds, or milliseconds (HubSpot) when too large to be seconds.
        seconds = value / 1000 if value > 1e11 else value
        return datetime.fromtimestamp(seconds, UTC)
    try:
        parsed = datetime.fromisoformat(str(value).strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def format_date(value: Any, fmt: str = "%Y-%m-%d") -> str:
    """An ISO 8601 string, datetime or epoch as `fmt` (UTC); empty if it is not a date."""
    moment = _as_datetime(value)
    return "" if moment is None else moment.astimezone(UTC).strftime(fmt)


def format_datetime(value: Any) -> str:
    """ISO 8601 in UTC with a `Z`, as both CRMs accept for datetime fields."""
    moment = _as_datetime(value)
    if moment is None:
        return ""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def timestamp_ms(value: Any) -> int | str:
    """Epoch milliseconds (HubSpot's date and datetime properties); empty if not a date."""
    moment = _as_datetime(value)
    return "" if moment is None else int(moment.timestamp() * 1000)


NULL_SAFE = ("trim", "lower", "upper", "title", "capitalize", "replace", "truncate", "striptags")


def null_safe(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn`, giving "" for a missing value instead of "None" (Jinja2's string filters)."""
    index = 1 if hasattr(fn, "jinja_pass_arg") else 0  # after the context/environment

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return "" if _missing(args[index]) else fn(*args, **kwargs)

    return wrapper


@functools.lru_cache(maxsize=256)
def _pattern(pattern: str) -> Any:
    if len(pattern) > MAX_PATTERN:
        raise jinja2.exceptions.SecurityError(f"a pattern has at most {MAX_PATTERN} characters")
    return re2.compile(pattern, _RE2)


def check_pattern(pattern: str) -> str | None:
    """Why `pattern` cannot be used, or None; for the loader."""
    try:
        _pattern(pattern)
    except re2.error as exc:
        reason = exc.args[0] if exc.args else exc
        text = reason.decode() if isinstance(reason, bytes) else str(reason)
        if text.startswith(("invalid perl operator", "invalid escape sequence")):
            text += " (rules use RE2 syntax: no backreferences, no lookarounds)"
        return f"invalid regular expression {pattern!r}: {text}"
    except jinja2.exceptions.SecurityError as exc:
        return str(exc)
    return None


def test_match(value: Any, pattern: str) -> bool:
    if _missing(value):
        return False
    return _pattern(pattern).match(_text(value)[:MAX_SUBJECT]) is not None


def test_search(value: Any, pattern: str) -> bool:
    if _missing(value):
        return False
    return _pattern(pattern).search(_text(value)[:MAX_SUBJECT]) is not None


def test_contains(value: Any, item: Any) -> bool:
    if _missing(value) or _missing(item):
        return False
    if isinstance(value, str):
        return str(item) in value
    try:
        return item in value
    except TypeError:
        return False


def test_startswith(value: Any, prefix: Any) -> bool:
    return not _missing(value) and _text(value).startswith(_text(prefix))


def test_endswith(value: Any, suffix: Any) -> bool:
    return not _missing(value) and _text(value).endswith(_text(suffix))


FILTERS = {
    "split_name": split_name,
    "first_name": first_name,
    "last_name": last_name,
    "truncate_to": truncate_to,
    "date": format_date,
    "datetime": format_datetime,
    "timestamp_ms": timestamp_ms,
}
TESTS = {
    "contains": test_contains,
    "startswith": test_startswith,
    "endswith": test_endswith,
    "match": test_match,
    "search": test_search,
}
REGEX_TESTS = ("match", "search")
