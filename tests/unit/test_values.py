"""Reading mapped values as CRM field types: the parsing both connectors share."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from connectors.values import coerce_all, moment


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("1700000000", datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC)),  # seconds, as text
        (1700000000, datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC)),
        ("1700000000000", datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC)),  # milliseconds
        ("20240115", datetime(2024, 1, 15, tzinfo=UTC)),  # a basic ISO date, not an epoch
        ("2024-01-15T10:00:00-05:00", datetime(2024, 1, 15, 15, tzinfo=UTC)),
        ("999999999999999", None),  # beyond the years a datetime holds: no value, no crash
        (1e300, None),
        ("next week", None),
    ],
)
def test_moment_reads_epochs_and_iso_text(value, expected):
    assert moment(value) == expected


def test_a_value_the_parsing_chokes_on_is_that_fields_problem_only():
    def coerce(name: str, value: object) -> object:
        if name == "bad":
            raise OverflowError("int too large to convert")
        return value

    out, problems = coerce_all({"good": 1, "bad": "1e400"}, coerce)

    assert out == {"good": 1}
    assert [str(p) for p in problems] == [
        "field 'bad': '1e400' cannot be read (int too large to convert)"
    ]
