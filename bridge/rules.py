"""The rule engine: match stored events and map contact fields onto CRM operations.

Conditions and field templates are Jinja2, in its immutable sandbox (as Ansible's `when:`),
compiled when the config loads (bridge.expressions): no attribute escapes, no mutation, no file
or environment access, bounded arithmetic. A missing field or `null` is simply undefined, so
`contact.Sender.email` on a contact without a Sender is false, not an error.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from bridge import filters
from bridge.config import FieldMapping, RuleConfig
from bridge.errors import RuleError
from bridge.expressions import (
    ENV,
    RULE_FAILURES,
    Condition,
    Scope,
    Template,
    check_source,
    is_template,
    parse_condition,
    types_required,
)
from bridge.models import NewDelivery, normalise_email
from connectors.base import Activity, LeadUpsert, WritePolicy

__all__ = ["ENV", "RULE_FAILURES", "RuleSet", "Scope", "compile_problems", "parse_condition"]

log = logging.getLogger("crm_bridge.rules")


def compile_problems(rule: RuleConfig) -> Iterator[tuple[tuple[str, ...], str]]:
    """Syntax errors in a rule's expression and templates, found at load time."""
    problem = check_source(rule.when, expression=True)
    if problem:
        yield ("when",), problem
    templates: dict[tuple[str, ...], str] = {("id_value",): rule.id_value}
    for name, mapping in rule.fields.items():
        if is_template(mapping.value):
            templates[("fields", name)] = mapping.value
    if rule.activity is not None:
        templates[("activity", "subject")] = rule.activity.subject
        templates[("activity", "body")] = rule.activity.body
    for name, value in (rule.hubspot_lead or {}).items():
        if is_template(value):
            templates[("hubspot_lead", name)] = value
    for where, source in templates.items():
        problem = check_source(source, expression=False)
        if problem:
            yield where, problem


class Omitted(str):
    """Why a mapped field is left out of the write (for `simulate`)."""


_TRUE = ("true", "yes", "1", "on")
_FALSE = ("false", "no", "0", "off")


def _coerce(value: Any, kind: str | None) -> Any:
    if kind is None or value in ("", None):
        return value
    text = str(value).strip()
    if kind == "string":
        return text
    if kind == "boolean":
        if isinstance(value, bool):
            return value
        if text.lower() in _TRUE + _FALSE:
            return text.lower() in _TRUE
        raise ValueError(f"{text!r} is not a boolean")
    if kind in ("number", "integer"):
        number = float(text)
        if kind == "integer" or number.is_integer():
            return int(number)
        return number
    converted = filters.format_date(value) if kind == "date" else filters.format_datetime(value)
    if not converted:
        raise ValueError(f"{text!r} is not a date")
    return converted


def _record_key(rendered: str) -> str:
    """The rendered record key; a key no store column can hold (a NUL) is none at all."""
    key = rendered.strip()
    return "" if "\x00" in key else key


@dataclass
class CompiledField:
    """One mapped field, its template compiled and its map keyed for lookups."""

    name: str
    config: FieldMapping
    template: Template | None
    lookup: dict[str, Any] | None

    @classmethod
    def build(cls, name: str, mapping: FieldMapping) -> CompiledField:
        lookup = None
        if mapping.map is not None:
            lookup = {}
            for key, value in mapping.map.items():
                lookup[str(key)] = value
                lookup.setdefault(str(key).lower(), value)
        template = Template(mapping.value) if is_template(mapping.value) else None
        return cls(name, mapping, template, lookup)

    def value(self, scope: Scope) -> Any:
        """The value to write, or an `Omitted` saying why there is none."""
        mapping = self.config
        value = scope.render(self.template).strip() if self.template else mapping.value
        if self.lookup is not None and value not in ("", None):
            text = str(value)
            found = self.lookup.get(text, self.lookup.get(text.lower(), Omitted()))
            if isinstance(found, Omitted):
                value = Omitted(f"{text!r} is not in the map") if mapping.default is None else None
            else:
                value = found
        if value in ("", None):
            # An empty value is left out: an event that lacks a field must not clear the CRM's.
            value = mapping.default if mapping.default is not None else Omitted("empty")
        if isinstance(value, Omitted):
            return value
        try:
            value = _coerce(value, mapping.type)
        except (ValueError, OverflowError) as exc:  # "abc", or "1e400" as an integer
            return Omitted(f"{exc}, for type {mapping.type}")
        if mapping.max_length is not None and isinstance(value, str):
            value = value[: mapping.max_length]
        return value

    @functools.cached_property
    def policy(self) -> WritePolicy | None:
        if self.config.policy is None:
            return None
        return WritePolicy(mode=self.config.policy, order=tuple(self.config.order))


@dataclass
class CompiledRule:
    """A rule ready to evaluate: its condition and templates compiled once."""

    config: RuleConfig
    condition: Condition
    id_value: Template
    fields: list[CompiledField] = field(default_factory=list)
    types: frozenset[str] | None = None  # None: any event type may match
    subject: Template | None = None
    body: Template | None = None
    hubspot_lead: dict[str, Template | Any] | None = None

    @functools.cached_property
    def when(self) -> Callable[..., Any]:
        """The condition as Jinja2 alone runs it: the reference `Condition`'s fast paths are
        tested against. Compiled on first use only."""
        return ENV.compile_expression(self.config.when)

    @classmethod
    def build(cls, rule: RuleConfig) -> CompiledRule:
        return cls(
            config=rule,
            types=types_required(parse_condition(rule.when)),
            condition=Condition(rule.when),
            id_value=Template(rule.id_value),
            fields=[CompiledField.build(k, v) for k, v in rule.fields.items()],
            subject=Template(rule.activity.subject) if rule.activity else None,
            body=Template(rule.activity.body) if rule.activity else None,
            hubspot_lead=None
            if rule.hubspot_lead is None
            else {k: Template(v) if is_template(v) else v for k, v in rule.hubspot_lead.items()},
        )

    def matches(self, scope: Scope) -> bool:
        """Whether the condition holds; raises one of RULE_FAILURES when it cannot run."""
        if self.types is not None and scope.variables.get("type") not in self.types:
            return False
        return self.condition.holds(scope)

    def activity(self, scope: Scope, event_id: str, occurred_at: float) -> Activity | None:
        """The activity this rule logs, or None when the record has no key."""
        assert self.subject is not None and self.body is not None and self.config.activity
        try:
            key = _record_key(scope.render(self.id_value))
            subject = scope.render(self.subject).strip()
            body = scope.render(self.body).strip()
        except RULE_FAILURES as exc:
            raise RuleError(f"rule {self.config.name!r}: {exc}") from exc
        if not key:
            return None
        return Activity(
            kind=self.config.activity.kind,
            object=self.config.activity.object,
            id_property=self.config.id_property,
            id_value=key,
            subject=subject,
            body=body,
            occurred_at=occurred_at,
            # The same event and rule always give the same key: a redelivery finds its twin.
            key=hashlib.sha256(f"{event_id}/{self.config.name}".encode()).hexdigest()[:24],
            if_missing=self.config.if_missing,
        )

    def operation(self, scope: Scope, omitted: dict[str, str] | None = None) -> LeadUpsert | None:
        """The CRM write this rule asks for, or None when the record has no key or nothing to
        write. Fields left out, and why, go to `omitted` when given."""
        values: dict[str, Any] = {}
        policies: dict[str, WritePolicy] = {}
        try:
            key = _record_key(scope.render(self.id_value))
            for spec in self.fields:
                value = spec.value(scope)
                if isinstance(value, Omitted):
                    if omitted is not None:
                        omitted[spec.name] = str(value)
                    continue
                values[spec.name] = value
                if (policy := spec.policy) is not None:
                    policies[spec.name] = policy
            hubspot_lead = self._hubspot_lead(scope)
        except RULE_FAILURES as exc:
            raise RuleError(f"rule {self.config.name!r}: {exc}") from exc
        if not key or (self.config.action == "update_status" and not values):
            return None  # an upsert keyed alone still makes the record; a status update not
        return LeadUpsert(
            object=self.config.record_object,
            id_property=self.config.id_property,
            id_value=key,
            fields=values,
            policies=policies,
            create=self.config.action != "update_status",
            hubspot_lead=hubspot_lead,
            if_missing=self.config.if_missing,
        )

    def _hubspot_lead(self, scope: Scope) -> dict[str, Any] | None:
        if self.hubspot_lead is None:
            return None
        rendered = {
            k: scope.render(v).strip() if isinstance(v, Template) else v
            for k, v in self.hubspot_lead.items()
        }
        return {k: v for k, v in rendered.items() if v not in ("", None)}


@dataclass
class Evaluation:
    """The deliveries one event produces, and why rules that matched produced none."""

    deliveries: list[NewDelivery] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    matched: list[str] = field(default_factory=list)
    stopped_by: str | None = None  # the `stop` rule that ended the evaluation


class RuleSet:
    """All rules, in file order. Several may match one event; each match is one delivery,
    until a matching `stop` rule ends the evaluation."""

    def __init__(self, rules: list[RuleConfig]) -> None:
        self.rules = [CompiledRule.build(r) for r in rules]
        # The rules each event type can match, in file order: a rule that names its types is
        # never looked at for the others, so a large file costs little per event.
        self._untyped = [r for r in self.rules if r.types is None]
        named = {t for r in self.rules if r.types is not None for t in r.types}
        self._by_type = {
            t: [r for r in self.rules if r.types is None or t in r.types] for t in named
        }

    @staticmethod
    def contact_of(data: dict[str, Any]) -> dict[str, Any]:
        """The contact rules see: the raw one (unknown fields included) with its email
        normalised as the webhook's validation did, or None when it is not an address."""
        contact = dict(data.get("contact") or {})
        try:
            contact["email"] = normalise_email(contact.get("email"))
        except ValueError:
            contact["email"] = None
        return contact

    @staticmethod
    def context(
        source: str, data: dict[str, Any], contact: dict[str, Any], received_at: float = 0.0
    ) -> dict[str, Any]:
        """What expressions see: the event's fields at the top level, plus `event`, `contact`,
        `sender` and `source`."""
        return {
            **data,
            "contact": contact,
            "sender": contact.get("Sender"),
            "source": source,
            "event": {
                "type": data.get("type"),
                "CampaignId": data.get("CampaignId"),
                "source": source,
                "received_at": datetime.fromtimestamp(received_at, UTC) if received_at else None,
            },
        }

    def evaluate(
        self, context: dict[str, Any], event_id: str = "", occurred_at: float = 0.0
    ) -> Evaluation:
        result = Evaluation()
        scope = Scope(context)
        for rule in self._by_type.get(context.get("type"), self._untyped):  # type: ignore[arg-type]
            try:
                if not rule.condition.holds(scope):
                    continue
            except RULE_FAILURES as exc:
                result.notes.append(f"rule {rule.config.name!r} could not be evaluated: {exc}")
                continue
            result.matched.append(rule.config.name)
            if rule.config.action == "stop":
                result.stopped_by = rule.config.name
                break
            try:
                op: LeadUpsert | Activity | None
                if rule.config.action == "log_activity":
                    op = rule.activity(scope, event_id, occurred_at)
                else:
                    op = rule.operation(scope)
            except RuleError as exc:
                result.notes.append(str(exc))
                continue
            if op is None:
                result.notes.append(self._nothing_sent(rule, scope))
                continue
            assert rule.config.connector is not None  # every action but stop has one
            result.deliveries.append(
                NewDelivery(
                    rule=rule.config.name,
                    connector=rule.config.connector,
                    action=rule.config.action,
                    contact_key=op.id_value.lower(),
                    operation=op,
                )
            )
        return result

    @staticmethod
    def _nothing_sent(rule: CompiledRule, scope: Scope) -> str:
        if rule.config.action == "update_status" and scope.render(rule.id_value).strip():
            return (
                f"rule {rule.config.name!r} matched but every field is empty:"
                f" nothing sent to {rule.config.connector}"
            )
        return (
            f"rule {rule.config.name!r} matched but the record key "
            f"({rule.config.id_value}) is empty: nothing sent to {rule.config.connector}"
        )
