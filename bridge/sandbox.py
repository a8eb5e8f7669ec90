"""The Jinja2 sandbox rules run in: Jinja2's immutable sandbox, with bounded arithmetic.

`ImmutableSandboxedEnvironment` already refuses attributes starting with `_` (so no
`__class__`, `__globals__`, `__subclasses__`, `__builtins__`), the internals of functions,
frames, generators and code objects, `str.format` tricks (its own formatter checks each field),
and every mutating method; `range` is capped. No loader is configured, so `{% include %}`,
`{% import %}` and `{% extends %}` find nothing, and the globals are Jinja2's harmless own
(`range`, `dict`, `lipsum`, `cycler`, `joiner`, `namespace`): no `os`, no `open`, no
environment. What it does not bound is arithmetic: `10 ** 10 ** 10` or `'x' * 10 ** 10`
would stall the router or fill its memory. Here both are refused past a size.
"""

from __future__ import annotations

from typing import Any

from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

MAX_POWER = 1000  # the largest exponent of `**`
MAX_SEQUENCE = 100_000  # the longest string or list `*` may build


class BoundedSandbox(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset(["**", "*"])

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "**":
            if isinstance(right, int | float) and abs(right) > MAX_POWER:
                raise SecurityError(f"exponent larger than {MAX_POWER}")
            return left**right
        if isinstance(left, str | list | tuple) or isinstance(right, str | list | tuple):
            seq, times = (left, right) if isinstance(left, str | list | tuple) else (right, left)
            if isinstance(times, int) and len(seq) * times > MAX_SEQUENCE:
                raise SecurityError(f"result longer than {MAX_SEQUENCE}")
        return left * right
