"""The rule engine: match stored events and map contact fields onto CRM operations.

Conditions and field templates are Jinja2, in its immutable sandbox (as Ansible's `when:`): no
attribute escapes, no mutation, no file or environment access. A missing field or `null` is
simply undefined, so `contact.Sender.email` on a contact without a Sender is false, not an error.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import jinja2
from jinja2 import nodes

from bridge.config import RuleConfig
from bridge.errors import RuleError
from bridge.models import NewDelivery
from bridge.sandbox import BoundedSandbox
from connectors.base import Activity, LeadUpsert

log = logging.getLogger("crm_bridge.rules")

_ACTION_OBJECT = {"upsert_lead": "lead", "upsert_contact": "contact"}


def _finalize(value: Any) -> Any:
    # Jinja would print None as "None"; a missing value must map to nothing.
    return "" if value is None else value


# Jinja2's immutable sandbox with bounded arithmetic (bridge/sandbox.py).
ENV = BoundedSandbox(undefined=jinja2.ChainableUndefined, finalize=_finalize, autoescape=False)


# What an expression over a sender's data may raise: a note on the event, never a crash.
EVALUATION_ERRORS = (
    jinja2.TemplateError,
    TypeError,
    ValueError,
    ArithmeticError,
    LookupError,
    AttributeError,
)


def _is_template(value: Any) -> bool:
    return isinstance(value, str) and ("{{" in value or "{%" in value)


def compile_problems(rule: RuleConfig) -> Iterator[tuple[tuple[str, ...], str]]:
    """Syntax errors in a rule's expression and templates, found at load time."""
    try:
        ENV.compile_expression(rule.when)
    except jinja2.TemplateSyntaxError as exc:
        yield ("when",), f"invalid expression: {exc.message}"
    templates = {"id_value": rule.id_value} | {
        f"fields.{k}": v for k, v in rule.fields.items() if _is_template(v)
    }
    if rule.activity is not None:
        templates |= {
            "activity.subject": rule.activity.subject,
            "activity.body": rule.activity.body,
        }
    for where, source in templates.items():
        try:
            ENV.from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            yield tuple(where.split(".", 1)), f"invalid template: {exc.message}"


def _types_required(expr: nodes.Node) -> frozenset[str] | None:
    """The event types an expression can be true for, when it says so at its top level
    (`type == 'reply' and ...`, `type in ('open', 'click') or type == 'reply'`); None if any.
    Lets the engine skip most rules of a large file without evaluating them."""
    if isinstance(expr, nodes.And):
        left, right = _types_required(expr.left), _types_required(expr.right)
        if left is None or right is None:
            return left if right is None else right
        return left & right
    if isinstance(expr, nodes.Or):
        left, right = _types_required(expr.left), _types_required(expr.right)
        return None if left is None or right is None else left | right
    if (
        isinstance(expr, nodes.Compare)
        and isinstance(expr.expr, nodes.Name)
        and expr.expr.name == "type"
        and len(expr.ops) == 1
    ):
        op = expr.ops[0]
        if op.op == "eq" and isinstance(op.expr, nodes.Const) and isinstance(op.expr.value, str):
            return frozenset([op.expr.value])
        if op.op == "in" and isinstance(op.expr, (nodes.Tuple, nodes.List)):
            items = op.expr.items
            if all(isinstance(i, nodes.Const) and isinstance(i.value, str) for i in items):
                return frozenset(i.value for i in items)  # type: ignore[attr-defined]
    return None


@dataclass
class CompiledRule:
    """A rule ready to evaluate: its condition and templates compiled once."""

    config: RuleConfig
    when: Callable[..., Any]
    id_value: jinja2.Template
    fields: dict[str, jinja2.Template | Any] = field(default_factory=dict)
    types: frozenset[str] | None = None  # None: any event type may match
    subject: jinja2.Template | None = None
    body: jinja2.Template | None = None

    @classmethod
    def build(cls, rule: RuleConfig) -> CompiledRule:
        parsed = ENV.parse("{{ (" + rule.when + ") }}")
        output = parsed.body[0]
        assert isinstance(output, nodes.Output)
        return cls(
            config=rule,
            types=_types_required(output.nodes[0]),
            when=ENV.compile_expression(rule.when),
            id_value=ENV.from_string(rule.id_value),
            fields={
                k: ENV.from_string(v) if _is_template(v) else v for k, v in rule.fields.items()
            },
            subject=ENV.from_string(rule.activity.subject) if rule.activity else None,
            body=ENV.from_string(rule.activity.body) if rule.activity else None,
        )

    def activity(
        self, context: dict[str, Any], event_id: str, occurred_at: float
    ) -> Activity | None:
        """The activity this rule logs, or None when the record has no key."""
        assert self.subject is not None and self.body is not None and self.config.activity
        try:
            key = self.id_value.render(context).strip()
            subject = self.subject.render(context).strip()
            body = self.body.render(context).strip()
        except jinja2.TemplateError as exc:
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
        )

    def operation(self, context: dict[str, Any]) -> LeadUpsert | None:
        """The CRM write this rule asks for, or None when the record has no key."""
        try:
            key = self.id_value.render(context).strip()
            values: dict[str, Any] = {}
            for name, spec in self.fields.items():
                value = spec.render(context).strip() if isinstance(spec, jinja2.Template) else spec
                # An empty value is left out: an event that lacks a field must not clear the CRM's.
                if value not in ("", None):
                    values[name] = value
        except jinja2.TemplateError as exc:
            raise RuleError(f"rule {self.config.name!r}: {exc}") from exc
        if not key:
            return None
        return LeadUpsert(
            object=_ACTION_OBJECT[self.config.action],  # type: ignore[arg-type]
            id_property=self.config.id_property,
            id_value=key,
            fields=values,
        )


@dataclass
class Evaluation:
    """The deliveries one event produces, and why rules that matched produced none."""

    deliveries: list[NewDelivery] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class RuleSet:
    """All rules, in file order. Several may match one event; each match is one delivery."""

    def __init__(self, rules: list[RuleConfig]) -> None:
        self.rules = [CompiledRule.build(r) for r in rules]

    @staticmethod
    def context(source: str, data: dict[str, Any], contact: dict[str, Any]) -> dict[str, Any]:
        """What expressions see: the event's fields at the top level, plus `event` and `source`."""
        return {
            **data,
            "contact": contact,
            "sender": contact.get("Sender"),
            "source": source,
            "event": {
                "type": data.get("type"),
                "CampaignId": data.get("CampaignId"),
                "source": source,
            },
        }

    def evaluate(
        self, context: dict[str, Any], event_id: str = "", occurred_at: float = 0.0
    ) -> Evaluation:
        result = Evaluation()
        event_type = context.get("type")
        for rule in self.rules:
            if rule.types is not None and event_type not in rule.types:
                continue
            try:
                matched = bool(rule.when(**context))
            except EVALUATION_ERRORS as exc:  # e.g. `contact.custom.score > 5` on a string
                result.notes.append(f"rule {rule.config.name!r} could not be evaluated: {exc}")
                continue
            if not matched:
                continue
            try:
                op: LeadUpsert | Activity | None
                if rule.config.action == "log_activity":
                    op = rule.activity(context, event_id, occurred_at)
                else:
                    op = rule.operation(context)
            except RuleError as exc:
                result.notes.append(str(exc))
                continue
            except EVALUATION_ERRORS as exc:
                result.notes.append(f"rule {rule.config.name!r} could not be rendered: {exc}")
                continue
            if op is None:
                result.notes.append(
                    f"rule {rule.config.name!r} matched but the record key "
                    f"({rule.config.id_value}) is empty: nothing sent to {rule.config.connector}"
                )
                continue
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
