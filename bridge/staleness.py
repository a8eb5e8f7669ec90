"""Per-field staleness: which event decided each CRM field of a contact, so that the order in
which a contact's events arrive does not change what the CRM ends up holding.

The platform resends and reorders webhooks. A contact's deliveries queued together are sent in
`sort_at` (`updatedAt`) order, but one that arrives late meets a CRM that newer events have
written already: skipping it whole loses the fields only it writes, applying it whole undoes
newer data. So for each contact and connector the store keeps a `Ledger`: per field, the write
that decided its value (its `sort_at` and policy) and as much history as the answer needs,
which is the value that applying every write in `sort_at` order would have left:

- `always`: the newest write wins; monotonic writes newer than it still move it forward.
- `monotonic`: forward along its order whenever it arrives, unless a newer `always` write
  reset the field (then it is older than that reset, and held).
- `if_empty`: the oldest one wins where we were the only writers (in order, it came first).
- `on_create`: the oldest create wins (in order, it would have created the record).

A field the ledger has not seen is left to the connector's own check against the CRM's values
(what a rep typed is only known there). Activities are never stale: they happened.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, Field

from connectors.base import LeadUpsert, WritePolicy, combine, forward

Mode = Literal["always", "if_empty", "on_create", "monotonic"]
ALWAYS = WritePolicy()


class Mark(BaseModel):
    """What the ledger knows of one field."""

    at: float  # sort_at of the write that set the value the CRM holds
    mode: Mode  # the policy that write was sent under
    reset_at: float | None = None  # the newest `always` write applied
    # Monotonic writes since that reset which no newer, further-along write has passed:
    # what a late `always` write older than them must still be moved forward by.
    rises: list[tuple[float, str]] = Field(default_factory=list)
    order: tuple[str, ...] = ()


class Ledger(BaseModel):
    """Per field of one contact's record on one connector; kept in the store."""

    fields: dict[str, Mark] = Field(default_factory=dict)


@dataclass(frozen=True)
class Write:
    """One field of one delivery, as it was sent (after the ledger's decision)."""

    name: str
    at: float
    mode: Mode
    value: Any
    order: tuple[str, ...] = ()


@dataclass(frozen=True)
class Decision:
    """Send `value` under `policy` (None: as is, the ledger decided), or hold it (`held`)."""

    value: Any = None
    policy: WritePolicy | None = None
    held: str | None = None


def decide(mark: Mark | None, value: Any, policy: WritePolicy, at: float) -> Decision:
    """What to do with a write of `value` under `policy`, from an event of `sort_at` `at`."""
    if mark is None:
        return Decision(value, policy)  # new to us: the connector checks the CRM's value
    newer_reset = mark.reset_at is not None and mark.reset_at > at
    if policy.mode == "always":
        if newer_reset:
            return Decision(held=f"a newer event ({mark.reset_at}) decided it")
        # In order, the monotonic writes newer than this one came after it.
        target = value
        for rise_at, rise in sorted(mark.rises):
            if rise_at > at and forward(mark.order, target, rise):
                target = rise
        return Decision(target, None)
    if policy.mode == "monotonic":
        if newer_reset:
            return Decision(held=f"older than a newer event's value ({mark.reset_at})")
        return Decision(value, policy)  # compared along its order with the CRM's value
    if policy.mode == "if_empty":
        if mark.mode == "if_empty" and mark.at > at and mark.reset_at is None and not mark.rises:
            return Decision(value, None)  # in order, this one found the field empty first
        return Decision(held="if_empty: an event has written the field")
    if mark.mode == "on_create" and mark.at > at:
        return Decision(value, None)  # in order, this older event would have created it
    return Decision(held="on_create: the record exists")


def resolve(
    ledger: Ledger, writes: list[tuple[float, LeadUpsert]]
) -> tuple[LeadUpsert | None, list[Write], dict[str, str]]:
    """One write for a contact's deliveries (in `sort_at` order) as the ledger allows: the
    merged upsert (None when nothing is left of them), the fields as sent, and those held."""
    provisional = ledger
    merged: LeadUpsert | None = None
    sent: list[Write] = []
    held: dict[str, str] = {}
    for at, op in writes:
        fields: dict[str, Any] = {}
        policies: dict[str, WritePolicy] = {}
        mine: list[Write] = []
        for name, value in op.fields.items():
            policy = op.policies.get(name, ALWAYS)
            decision = decide(provisional.fields.get(name), value, policy, at)
            if decision.held is not None:
                held[name] = decision.held
                continue
            held.pop(name, None)
            fields[name] = decision.value
            if name in op.policies and (decision.policy or policy.mode == "always"):
                # An explicit `always` stays explicit (HubSpot may then move a stage back).
                policies[name] = decision.policy or policy
            mine.append(Write(name, at, policy.mode, decision.value, policy.order))
        provisional = after(provisional, mine)
        sent.extend(mine)
        part = op.model_copy(update={"fields": fields, "policies": policies})
        merged = combine(merged, part)
    return merged, sent, held


def after(ledger: Ledger, sent: list[Write], crm_held: frozenset[str] = frozenset()) -> Ledger:
    """The ledger once `sent` is applied; `crm_held` fields the CRM kept as they were (its
    own policy check found a value a rep typed, or a stage further along)."""
    fields = dict(ledger.fields)
    for write in sorted(sent, key=lambda w: w.at):
        if write.value is None or (isinstance(write.value, str) and not write.value.strip()):
            continue  # an empty value leaves the field empty: it decides nothing
        mark = fields.get(write.name)
        rises = list(mark.rises) if mark else []
        order = write.order or (mark.order if mark else ())
        if write.mode == "monotonic":
            rises = _rise(rises, order, write.at, write.value)
        if write.name in crm_held:
            if mark is not None:
                fields[write.name] = mark.model_copy(update={"rises": rises, "order": order})
            continue
        reset_at = mark.reset_at if mark else None
        if write.mode == "always":
            reset_at = write.at if reset_at is None else max(reset_at, write.at)
        if reset_at is not None:
            rises = [r for r in rises if r[0] > reset_at]
        fields[write.name] = Mark(
            at=write.at, mode=write.mode, reset_at=reset_at, rises=rises, order=order
        )
    return Ledger(fields=fields)


def _rise(
    rises: list[tuple[float, str]], order: tuple[str, ...], at: float, value: Any
) -> list[tuple[float, str]]:
    """`rises` with (at, value) added, keeping only writes no newer one has passed or matched."""
    folded = [str(o).casefold() for o in order]
    if str(value).casefold() not in folded:
        return rises  # a value outside the order never moves anything

    def rank(v: str) -> int:
        text = str(v).casefold()
        return folded.index(text) if text in folded else -1

    every = [*rises, (at, str(value))]
    return sorted(
        (a, v)
        for a, v in set(every)
        if not any((b, w) != (a, v) and b >= a and rank(w) >= rank(v) for b, w in every)
    )
