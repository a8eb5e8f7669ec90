"""Reading mapped values as the types CRM fields hold: the parsing both connectors share.

Each CRM then writes the parsed value in its own wire format (HubSpot: strings, epoch
milliseconds; Salesforce: JSON booleans, numbers and ISO dates); a value that cannot be read
becomes a `FieldProblem` naming the field, the value and what was expected.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from datetime import UTC, date, datetime
from typing import Any

# Epoch numbers at least this large are milliseconds (HubSpot's unit), smaller ones seconds.
EPOCH_MS_FROM = 100_000_000_000
TRUTH = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


class FieldProblem(ValueError):
    """One field the CRM's definitions refuse: the message names field, value, expectation."""

    def __init__(self, message: str, **detail: Any) -> None:
        super().__init__(message)
        self.detail = detail


def shown(value: Any) -> Any:
    """A value as an error's detail can hold it."""
    return value if isinstance(value, str | int | float | bool) else repr(value)


def refuse(crm_field: str, name: str, value: Any, expected: str, **detail: Any) -> FieldProblem:
    """`crm_field` is how the CRM calls it, e.g. "HubSpot property" or "Salesforce Lead field"."""
    return FieldProblem(
        f"{crm_field} {name!r}: {value!r} is not {expected}",
        field=name,
        value=shown(value),
        expected=expected,
        **detail,
    )


def coerce_all(
    fields: dict[str, Any], coerce: Callable[[str, Any], Any]
) -> tuple[dict[str, Any], list[FieldProblem]]:
    """Every field through `coerce(name, value)`; the problems found, all of them. A value
    the parsing itself chokes on is that field's problem too, never the whole batch's."""
    out: dict[str, Any] = {}
    problems: list[FieldProblem] = []
    for name, value in fields.items():
        try:
            out[name] = coerce(name, value)
        except FieldProblem as problem:
            problems.append(problem)
        except (ValueError, OverflowError, TypeError) as exc:
            problems.append(
                FieldProblem(
                    f"field {name!r}: {value!r} cannot be read ({exc})",
                    field=name,
                    value=shown(value),
                    expected="a readable value",
                )
            )
    return out, problems


def epoch_moment(value: float) -> datetime:
    """An epoch number: milliseconds when large, else seconds."""
    seconds = value / 1000 if abs(value) >= EPOCH_MS_FROM else value
    return datetime.fromtimestamp(seconds, UTC)


def moment(value: Any) -> datetime | None:
    """A UTC datetime from a datetime, date, epoch number or ISO 8601 text (naive means UTC);
    None if it is none. Epoch numbers, also as text (templates render text), are milliseconds
    when large and seconds otherwise; eight digits are a basic ISO date (20240115)."""
    if isinstance(value, datetime):
        result = value
    elif isinstance(value, date):
        result = datetime(value.year, value.month, value.day)
    elif isinstance(value, int | float) and not isinstance(value, bool):
        return _epoch(float(value))
    elif isinstance(value, str):
        text = value.strip()
        if re.fullmatch(r"-?\d+", text) and len(text.lstrip("-")) != 8:
            return _epoch(float(text)) if len(text) <= 17 else None
        try:
            result = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
        except ValueError:
            return None
    else:
        return None
    return result.replace(tzinfo=UTC) if result.tzinfo is None else result.astimezone(UTC)


def _epoch(value: float) -> datetime | None:
    if not math.isfinite(value):
        return None
    try:
        return epoch_moment(value)
    except (OverflowError, OSError, ValueError):  # beyond the years datetime can hold
        return None


def truth(value: Any) -> bool | None:
    """True/False from a boolean, 1/0, or "true"/"yes"/"1" and their opposites; else None."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str | int):
        return TRUTH.get(str(value).strip().lower())
    return None


def number(value: Any) -> float | None:
    """A finite number from a number or numeric text; else None (booleans are not numbers)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        result = float(value)
    elif isinstance(value, str):
        try:
            result = float(value.strip())
        except ValueError:
            return None
    else:
        return None
    return result if math.isfinite(result) else None


def option(options: Iterable[str], value: str) -> str | None:
    """The option `value` names, exactly or in another case; None if none does."""
    options = list(options)
    if value in options:
        return value
    folded = {o.lower(): o for o in options}
    return folded.get(value.strip().lower())


def allowed_list(options: Iterable[str], limit: int = 50) -> str:
    """ "[a, b, …]" for an error message (the detail keeps them all)."""
    options = list(options)
    more = ", …" if len(options) > limit else ""
    return f"[{', '.join(options[:limit])}{more}]"
