"""The rule engine: match stored events and map contact fields onto CRM operations.

Conditions and field templates are Jinja2, in its immutable sandbox (as Ansible's `when:`): no
attribute escapes, no mutation, no file or environment access, bounded arithmetic. A missing
field or `null` is simply undefined, so `contact.Sender.email` on a contact without a Sender is
false, not an error. Everything is compiled when the config loads; a syntax error, an unknown
filter or test, an `include` or a bad regular expression is a config error there.
"""

from __future__ import annotations

import difflib
import hashlib
import logging
import operator
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from bridge import filters
from bridge.config import FieldMapping, RuleConfig
from bridge.errors import RuleError
from bridge.models import NewDelivery
from connectors.base import Activity, LeadUpsert, WritePolicy

log = logging.getLogger("crm_bridge.rules")

MAX_SIZE = 100_000  # the longest string or list `*` may build
# What a user's expression or template may raise besides Jinja2's errors (range too big, a
# division by zero, comparing a number with text): the event gets a note, the router goes on.
RULE_FAILURES = (jinja2.TemplateError, ArithmeticError, TypeError, ValueError, LookupError)


def _finalize(value: Any) -> Any:
    # Jinja would print None as "None"; a missing value must map to nothing.
    return "" if value is None else value


class RuleEnvironment(ImmutableSandboxedEnvironment):
    """Jinja2's immutable sandbox, with `*` and `**` bounded: `'x' * 10**9` cannot eat the
    memory of the daemon, and with our filters and tests. No loader: nothing can be read."""

    intercepted_binops = frozenset(["*", "**"])

    def call_binop(self, context: Any, operator_: str, left: Any, right: Any) -> Any:
        if operator_ == "**":
            if isinstance(right, int | float) and abs(right) > 64:
                raise jinja2.exceptions.SecurityError("exponent too large")
            return operator.pow(left, right)
        if isinstance(left, int) and isinstance(right, str | list | tuple):
            left, right = right, left
        if isinstance(left, str | list | tuple) and isinstance(right, int):
            if len(left) * right > MAX_SIZE:
                raise jinja2.exceptions.SecurityError("result too large")
        return operator.mul(left, right)


ENV = RuleEnvironment(undefined=jinja2.ChainableUndefined, finalize=_finalize, autoescape=False)
for _name in filters.NULL_SAFE:
    # Jinja2's string filters turn null into "None": a contact's null field must stay empty.
    ENV.filters[_name] = filters.null_safe(ENV.filters[_name])
ENV.filters.update(filters.FILTERS)
ENV.tests.update(filters.TESTS)
for _unused in ("lipsum", "cycler", "joiner", "namespace"):
    ENV.globals.pop(_unused, None)


def is_template(value: Any) -> bool:
    return isinstance(value, str) and ("{{" in value or "{%" in value)


def _unknown_name(exc: jinja2.TemplateSyntaxError) -> str:
    """`No filter named 'lowr'.` with the closest known one."""
    message = exc.message or str(exc)
    for kind, known in (("filter", ENV.filters), ("test", ENV.tests)):
        prefix = f"No {kind} named '"
        if message.startswith(prefix):
            name = message[len(prefix) :].split("'", 1)[0]
            hint = difflib.get_close_matches(name, list(known), n=1)
            return f"unknown {kind} {name!r}" + (f" (did you mean `{hint[0]}`?)" if hint else "")
    if "'='" in message:
        message += " (compare with ==)"
    return message


def _ast_problems(tree: nodes.Node) -> Iterator[str]:
    """What parses but may not run: reading templates, and regular expressions that fail."""
    for node in tree.find_all((nodes.Include, nodes.Import, nodes.FromImport, nodes.Extends)):
        yield f"{type(node).__name__.lower()} is not allowed: rules cannot read files"
    for test in tree.find_all(nodes.Test):
        if test.name in filters.REGEX_TESTS and test.args:
            pattern = test.args[0]
            if isinstance(pattern, nodes.Const) and isinstance(pattern.value, str):
                problem = filters.check_pattern(pattern.value)
                if problem:
                    yield problem


def _check(source: str, expression: bool) -> str | None:
    try:
        if expression:
            try:
                ENV.compile_expression(source)
            except jinja2.TemplateSyntaxError as exc:
                if exc.message == "chunk after expression":  # say what came after it
                    ENV.parse("{{ " + source + " }}")
                raise
        else:
            ENV.from_string(source)
        tree = ENV.parse("{{ (" + source + ") }}" if expression else source)
        for problem in _ast_problems(tree):
            return problem
    except jinja2.TemplateSyntaxError as exc:
        kind = "expression" if expression else "template"
        return f"invalid {kind}: {_unknown_name(exc)}"
    return None


def compile_problems(rule: RuleConfig) -> Iterator[tuple[tuple[str, ...], str]]:
    """Syntax errors in a rule's expression and templates, found at load time."""
    problem = _check(rule.when, expression=True)
    if problem:
        yield ("when",), problem
    templates: dict[tuple[str, ...], str] = {("id_value",): rule.id_value}
    for name, mapping in rule.fields.items():
        if is_template(mapping.value):
            templates[("fields", name)] = mapping.value
    if rule.activity is not None:
        templates[("activity", "subject")] = rule.activity.subject
        templates[("activity", "body")] = rule.activity.body
    for where, source in templates.items():
        problem = _check(source, expression=False)
        if problem:
            yield where, problem


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
        and isinstance(expr.expr, nodes.Name | nodes.Getattr)
        and _is_type_name(expr.expr)
        and len(expr.ops) == 1
    ):
        op = expr.ops[0]
        if op.op == "eq" and isinstance(op.expr, nodes.Const) and isinstance(op.expr.value, str):
            return frozenset([op.expr.value])
        if op.op == "in" and isinstance(op.expr, nodes.Tuple | nodes.List):
            items = op.expr.items
            if all(isinstance(i, nodes.Const) and isinstance(i.value, str) for i in items):
                return frozenset(i.value for i in items)  # type: ignore[attr-defined]
    return None


def _is_type_name(node: nodes.Node) -> bool:
    """`type` or `event.type`."""
    if isinstance(node, nodes.Name):
        return node.name == "type"
    return (
        isinstance(node, nodes.Getattr)
        and node.attr == "type"
        and isinstance(node.node, nodes.Name)
        and node.node.name == "event"
    )


def parse_condition(source: str) -> nodes.Node:
    """The expression's syntax tree (for the type shortcut and for `simulate`'s reasons)."""
    output = ENV.parse("{{ (" + source + ") }}").body[0]
    assert isinstance(output, nodes.Output)
    return output.nodes[0]


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


@dataclass
class CompiledField:
    """One mapped field, its template compiled and its map keyed for lookups."""

    name: str
    config: FieldMapping
    template: jinja2.Template | None
    lookup: dict[str, Any] | None

    @classmethod
    def build(cls, name: str, mapping: FieldMapping) -> CompiledField:
        lookup = None
        if mapping.map is not None:
            lookup = {}
            for key, value in mapping.map.items():
                lookup[str(key)] = value
                lookup.setdefault(str(key).lower(), value)
        template = ENV.from_string(mapping.value) if is_template(mapping.value) else None
        return cls(name, mapping, template, lookup)

    def value(self, context: dict[str, Any]) -> Any:
        """The value to write, or an `Omitted` saying why there is none."""
        mapping = self.config
        value = self.template.render(context).strip() if self.template else mapping.value
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
        except ValueError as exc:
            return Omitted(f"{exc}, for type {mapping.type}")
        if mapping.max_length is not None and isinstance(value, str):
            value = value[: mapping.max_length]
        return value

    def policy(self) -> WritePolicy | None:
        if self.config.policy == "always":
            return None
        return WritePolicy(mode=self.config.policy, order=tuple(self.config.order))


@dataclass
class CompiledRule:
    """A rule ready to evaluate: its condition and templates compiled once."""

    config: RuleConfig
    when: Callable[..., Any]
    id_value: jinja2.Template
    fields: list[CompiledField] = field(default_factory=list)
    types: frozenset[str] | None = None  # None: any event type may match
    subject: jinja2.Template | None = None
    body: jinja2.Template | None = None

    @classmethod
    def build(cls, rule: RuleConfig) -> CompiledRule:
        return cls(
            config=rule,
            types=_types_required(parse_condition(rule.when)),
            when=ENV.compile_expression(rule.when),
            id_value=ENV.from_string(rule.id_value),
            fields=[CompiledField.build(k, v) for k, v in rule.fields.items()],
            subject=ENV.from_string(rule.activity.subject) if rule.activity else None,
            body=ENV.from_string(rule.activity.body) if rule.activity else None,
        )

    def matches(self, context: dict[str, Any]) -> bool:
        """Whether the condition holds; raises jinja2.TemplateError when it cannot run."""
        if self.types is not None and context.get("type") not in self.types:
            return False
        return bool(self.when(**context))

    def activity(
        self, context: dict[str, Any], event_id: str, occurred_at: float
    ) -> Activity | None:
        """The activity this rule logs, or None when the record has no key."""
        assert self.subject is not None and self.body is not None and self.config.activity
        try:
            key = self.id_value.render(context).strip()
            subject = self.subject.render(context).strip()
            body = self.body.render(context).strip()
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
        )

    def operation(
        self, context: dict[str, Any], omitted: dict[str, str] | None = None
    ) -> LeadUpsert | None:
        """The CRM write this rule asks for, or None when the record has no key or nothing to
        write. Fields left out, and why, go to `omitted` when given."""
        values: dict[str, Any] = {}
        policies: dict[str, WritePolicy] = {}
        try:
            key = self.id_value.render(context).strip()
            for spec in self.fields:
                value = spec.value(context)
                if isinstance(value, Omitted):
                    if omitted is not None:
                        omitted[spec.name] = str(value)
                    continue
                values[spec.name] = value
                if (policy := spec.policy()) is not None:
                    policies[spec.name] = policy
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
        )


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
        for rule in self.rules:
            try:
                if not rule.matches(context):
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
                    op = rule.activity(context, event_id, occurred_at)
                else:
                    op = rule.operation(context)
            except RuleError as exc:
                result.notes.append(str(exc))
                continue
            if op is None:
                result.notes.append(self._nothing_sent(rule, context))
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
    def _nothing_sent(rule: CompiledRule, context: dict[str, Any]) -> str:
        if rule.config.action == "update_status" and rule.id_value.render(context).strip():
            return (
                f"rule {rule.config.name!r} matched but every field is empty:"
                f" nothing sent to {rule.config.connector}"
            )
        return (
            f"rule {rule.config.name!r} matched but the record key "
            f"({rule.config.id_value}) is empty: nothing sent to {rule.config.connector}"
        )
