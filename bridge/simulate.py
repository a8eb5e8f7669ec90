"""`crm-bridge simulate EVENT.json`: what the rules make of one event, writing nothing.

For every rule, in file order: whether it matched, and if not, why (the event type it is for,
or the first part of its condition that is false, with the values it read); then the exact CRM
operations the matching rules would queue. With `--online`, each connector reads the record
the operation would write to, and the plan shows, field by field, what would change, from what
to what, and what a write policy would hold back (`connectors.base.apply_policies`, the very
decision the connectors make), as `terraform plan` does.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import jinja2
from jinja2 import nodes
from pydantic import ValidationError

from bridge.check import describes, refusal
from bridge.config import Config
from bridge.models import NewDelivery, WebhookPayload
from bridge.rules import ENV, RULE_FAILURES, CompiledRule, RuleSet, Scope, parse_condition
from connectors import registry
from connectors.base import Activity, Connector, FieldInfo, LeadUpsert, apply_policies


class EventFileError(Exception):
    """The event file cannot be read or is not a webhook payload."""


@dataclass
class RuleOutcome:
    """One rule's part in the simulation."""

    name: str
    matched: bool | None  # None: not evaluated, a `stop` rule ended the evaluation first
    reason: str = ""  # why it did not match, or why it sent nothing
    delivery: NewDelivery | None = None
    omitted: dict[str, str] = field(default_factory=dict)  # fields left out, and why


@dataclass
class Simulation:
    summary: str
    rules: list[RuleOutcome]


@dataclass
class FieldChange:
    name: str
    before: Any
    after: Any
    # "+" set on a new record, "~" changed, "=" unchanged, "!" held back, "x" the CRM refuses
    change: str
    why: str = ""


@dataclass
class PlannedOperation:
    rule: str
    connector: str
    headline: str
    fields: list[FieldChange] = field(default_factory=list)
    error: str | None = None


def read_event(path: str) -> dict[str, Any]:
    """A webhook payload from a JSON file (`-`: standard input), validated as the webhook
    endpoint would."""
    try:
        if path == "-":
            path = "(standard input)"
            data = json.loads(sys.stdin.read())
        else:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
    except OSError as exc:
        raise EventFileError(f"cannot read {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise EventFileError(f"{path}: not JSON: {exc}") from None
    try:
        WebhookPayload.model_validate(data)
    except ValidationError as exc:
        issues = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(body)'}: {e['msg']}" for e in exc.errors()
        )
        raise EventFileError(f"{path}: not a webhook payload: {issues}") from None
    assert isinstance(data, dict)
    return data


def simulate(
    config: Config, data: dict[str, Any], source: str, received_at: float | None = None
) -> Simulation:
    """Evaluate every rule on the event `data`, explaining each outcome."""
    contact = RuleSet.contact_of(data)
    received_at = time.time() if received_at is None else received_at
    ruleset = RuleSet(config.rules)
    context = RuleSet.context(source, data, contact, received_at)
    outcomes: list[RuleOutcome] = []
    stopped = False
    for rule in ruleset.rules:
        name = rule.config.name
        if stopped:
            outcomes.append(RuleOutcome(name, None, "not evaluated: a stop rule matched first"))
            continue
        try:
            matched = rule.matches(Scope(context))
        except RULE_FAILURES as exc:
            outcomes.append(RuleOutcome(name, False, f"could not be evaluated: {exc}"))
            continue
        if not matched:
            outcomes.append(RuleOutcome(name, False, explain(rule, context)))
            continue
        if rule.config.action == "stop":
            stopped = True
            outcomes.append(RuleOutcome(name, True, "stop: the rules after it are not evaluated"))
            continue
        # The engine itself makes the delivery: what is shown is what would be queued.
        evaluation = RuleSet([rule.config]).evaluate(context, "simulated-event", received_at)
        omitted: dict[str, str] = {}
        if rule.config.action != "log_activity":
            try:
                rule.operation(Scope(context), omitted)
            except Exception:  # noqa: BLE001  # the evaluation above has the note
                omitted = {}
        delivery = evaluation.deliveries[0] if evaluation.deliveries else None
        reason = "; ".join(evaluation.notes)
        outcomes.append(RuleOutcome(name, True, reason, delivery, omitted))
    email = contact.get("email") or "(no email)"
    summary = f"event {data.get('type')!r} from {source}, contact {email}"
    return Simulation(summary, outcomes)


def explain(rule: CompiledRule, context: dict[str, Any]) -> str:
    """Why `rule` did not match: the type it is for, or the first false part of `when`."""
    if rule.types is not None and context.get("type") not in rule.types:
        wanted = " or ".join(repr(t) for t in sorted(rule.types))
        return f"type is {context.get('type')!r}; the rule is for {wanted}"
    parts = _conjuncts(parse_condition(rule.config.when))
    for part in parts:
        text = rule.config.when if len(parts) == 1 else _unparse(part)
        if text is None:
            break
        try:
            if ENV.compile_expression(text)(**context):
                continue
        except RULE_FAILURES as exc:
            return f"`{text}` could not be evaluated: {exc}"
        values = _values(part, context)
        return f"`{text}` is false" + (f" ({values})" if values else "")
    return f"`{rule.config.when}` is false"


def _conjuncts(node: nodes.Node) -> list[nodes.Node]:
    if isinstance(node, nodes.And):
        return _conjuncts(node.left) + _conjuncts(node.right)
    return [node]


def _values(node: nodes.Node, context: dict[str, Any]) -> str:
    """`contact.interest = 'maybe', type = 'click'`: the fields a condition part read."""
    shown: list[str] = []
    for ref in _references(node):
        text = _unparse(ref)
        if text is None or text in [s.split(" = ")[0] for s in shown]:
            continue
        try:
            value = ENV.compile_expression(text, undefined_to_none=False)(**context)
        except RULE_FAILURES:
            continue
        if isinstance(value, jinja2.Undefined):
            shown.append(f"{text} = (missing)")
        elif value is None:
            shown.append(f"{text} = null")
        elif isinstance(value, str | int | float | bool):
            shown.append(f"{text} = {value!r}")
    return ", ".join(shown)


def _references(node: nodes.Node) -> list[nodes.Node]:
    """The outermost field reads (`contact.Sender.email`, `type`) in `node`."""
    if isinstance(node, nodes.Name) or (
        isinstance(node, nodes.Getattr | nodes.Getitem) and _unparse(node) is not None
    ):
        return [node]
    found: list[nodes.Node] = []
    for child in node.iter_child_nodes():
        found += _references(child)
    return found


_OPERATORS = {
    "eq": "==",
    "ne": "!=",
    "gt": ">",
    "gteq": ">=",
    "lt": "<",
    "lteq": "<=",
    "in": "in",
    "notin": "not in",
}


def _unparse(node: nodes.Node) -> str | None:  # noqa: C901  # one branch per node type
    """The source of a condition part, rebuilt from its syntax tree; None if unsupported."""
    if isinstance(node, nodes.Name):
        return str(node.name)
    if isinstance(node, nodes.Const):
        return repr(node.value) if not isinstance(node.value, bool) else str(node.value).lower()
    if isinstance(node, nodes.Getattr):
        inner = _unparse(node.node)
        return None if inner is None else f"{inner}.{node.attr}"
    if isinstance(node, nodes.Getitem):
        inner, arg = _unparse(node.node), _unparse(node.arg)
        return None if inner is None or arg is None else f"{inner}[{arg}]"
    if isinstance(node, nodes.Tuple | nodes.List):
        items = [_unparse(i) for i in node.items]
        if None in items:
            return None
        joined = ", ".join(i for i in items if i is not None)
        return f"[{joined}]" if isinstance(node, nodes.List) else f"({joined})"
    if isinstance(node, nodes.Not):
        inner = _unparse(node.node)
        return None if inner is None else f"not {inner}"
    if isinstance(node, nodes.And | nodes.Or):
        left, right = _unparse(node.left), _unparse(node.right)
        op = "and" if isinstance(node, nodes.And) else "or"
        return None if left is None or right is None else f"({left} {op} {right})"
    if isinstance(node, nodes.Compare):
        out = _unparse(node.expr)
        for operand in node.ops:
            right = _unparse(operand.expr)
            if out is None or right is None or operand.op not in _OPERATORS:
                return None
            out = f"{out} {_OPERATORS[operand.op]} {right}"
        return out
    if isinstance(node, nodes.Test | nodes.Filter) and not node.kwargs and node.node is not None:
        subject = _unparse(node.node)
        args = [_unparse(a) for a in node.args]
        if subject is None or None in args:
            return None
        call = f"({', '.join(a for a in args if a is not None)})" if args else ""
        joiner = " is " if isinstance(node, nodes.Test) else " | "
        return f"{subject}{joiner}{node.name}{call}"
    return None


def open_connectors(config: Config, names: set[str]) -> dict[str, Connector]:
    """The named connectors, built from the config (not yet opened)."""
    built: dict[str, Connector] = {}
    for name in sorted(names):
        settings = config.connector_settings[name]
        cls = registry.get(settings.type)
        assert cls is not None  # the loader checked it
        built[name] = cls(name, settings)
    return built


async def plan_online(simulation: Simulation, config: Config) -> list[PlannedOperation]:
    """Log in to the connectors the operations use (those with credentials), plan, log out.
    A connector that cannot log in gets its reason on each of its operations."""
    used = {o.delivery.connector for o in simulation.rules if o.delivery is not None}
    usable = {n for n in used if config.connector_settings[n].has_credentials()}
    connectors = open_connectors(config, usable)
    failed: dict[str, str] = {}
    try:
        for name, connector in connectors.items():
            try:
                await connector.open()
            except Exception as exc:  # noqa: BLE001  # shown in the plan, the others go on
                failed[name] = f"cannot log in: {exc}"
        live = {n: c for n, c in connectors.items() if n not in failed}
        planned = await plan(simulation, config, live)
    finally:
        for connector in connectors.values():
            await connector.close()
    for item in planned:
        if item.connector in failed:
            item.error = failed[item.connector]
    return planned


async def plan(
    simulation: Simulation, config: Config, connectors: dict[str, Connector]
) -> list[PlannedOperation]:
    """Read each operation's record and compare it with what would be written."""
    planned: list[PlannedOperation] = []
    for outcome in simulation.rules:
        delivery = outcome.delivery
        if delivery is None:
            continue
        connector = connectors.get(delivery.connector)
        settings = config.connector_settings[delivery.connector]
        op = delivery.operation
        item = PlannedOperation(outcome.name, delivery.connector, headline(delivery))
        planned.append(item)
        if isinstance(op, Activity):
            item.fields = [FieldChange("subject", None, op.subject, "+")]
            if op.body:
                item.fields.append(FieldChange("body", None, op.body, "+"))
            continue
        if connector is None or not settings.has_credentials():
            item.error = "no credentials: the current record cannot be read"
            continue
        try:
            current = await connector.current(op, list(op.fields))
            described = await connector.describe(op.object) if describes(connector) else None
        except Exception as exc:  # noqa: BLE001  # a plan shows any failure to read, no traceback
            item.error = f"cannot read the record: {exc}"
            continue
        item.headline, item.fields = _compare(op, current, delivery)
        if described:  # a connector that describes nothing says nothing of its fields
            _mark_refusals(item, delivery.connector, op.object, described)
    return planned


def _mark_refusals(
    item: PlannedOperation, connector: str, obj: str, fields: dict[str, FieldInfo]
) -> None:
    """Each field the CRM would refuse (`check --online`'s reasons): the daemon would dead-
    letter the write, so the plan must not show it as a change."""
    refused = 0
    for change in item.fields:
        why = refusal(connector, obj, fields, change.name, change.after)
        if why is not None:
            change.change, change.why = "x", why
            refused += 1
    if refused:
        item.headline += f"; the CRM would refuse it ({refused} field(s) marked x)"


def _compare(
    op: LeadUpsert, current: dict[str, Any] | None, delivery: NewDelivery
) -> tuple[str, list[FieldChange]]:
    key = f"{op.id_property or 'email'}={op.id_value}"
    where = f"{delivery.connector}: {op.object} {key}"
    if current is None:
        if not op.create:
            return f"  {where}: no such record; {delivery.action} never creates one", []
        return f"+ {where}: created", [FieldChange(k, None, v, "+") for k, v in op.fields.items()]
    write, held = apply_policies(op, current)
    changes: list[FieldChange] = []
    for name, value in op.fields.items():
        before = current.get(name)
        if _same(before, value):
            changes.append(FieldChange(name, before, value, "="))
        elif name in held:
            changes.append(FieldChange(name, before, value, "!", held[name]))
        elif _same(before, write[name]):
            changes.append(FieldChange(name, before, value, "="))
        else:
            changes.append(FieldChange(name, before, value, "~"))
    if any(c.change == "~" for c in changes):
        return f"~ {where}: updated", changes
    return f"= {where}: nothing would change", changes


def _same(before: Any, after: Any) -> bool:
    if before is None or after is None:
        return before is after
    return str(before).strip().lower() == str(after).strip().lower()


def headline(delivery: NewDelivery) -> str:
    op = delivery.operation
    key = f"{op.id_property or 'email'}={op.id_value}"
    if isinstance(op, Activity):
        return f"+ {delivery.connector}: log a {op.kind} on the {op.object} {key}"
    verb = {"update_status": "update (never create)"}.get(delivery.action, "create or update")
    return f"{delivery.connector}: {verb} the {op.object} {key}"


def _show(value: Any) -> str:
    return "(empty)" if value in (None, "") else json.dumps(value, ensure_ascii=False)


def render(simulation: Simulation, planned: list[PlannedOperation] | None = None) -> str:
    """The simulation as text: rules, operations, and the plan when the CRMs were read."""
    lines = [simulation.summary, "", "Rules:"]
    width = max((len(o.name) for o in simulation.rules), default=0)
    for o in simulation.rules:
        mark = {True: "matched", False: "no", None: "skipped"}[o.matched]
        detail = o.reason
        if o.delivery is not None:
            detail = f"-> {o.delivery.connector} {o.delivery.action}" + (
                f"; {detail}" if detail else ""
            )
        lines.append(f"  {o.name:<{width}}  {mark:<7}  {detail}".rstrip())
    lines += _render_operations(simulation)
    if planned is not None:
        lines += _render_plan(planned)
    return "\n".join(lines)


def _render_operations(simulation: Simulation) -> list[str]:
    deliveries = [o for o in simulation.rules if o.delivery is not None]
    lines = ["", "Operations (nothing is written):" if deliveries else "No operation."]
    for o in deliveries:
        assert o.delivery is not None
        lines.append(f"  [{o.name}] {headline(o.delivery)}")
        op = o.delivery.operation
        if isinstance(op, Activity):
            lines.append(f"      subject: {op.subject}")
            if op.body:
                lines.append(f"      body: {op.body}")
            continue
        for name, value in op.fields.items():
            policy = op.policies.get(name)
            note = f"  ({policy.mode})" if policy else ""
            lines.append(f"      {name} = {_show(value)}{note}")
        for name, why in o.omitted.items():
            lines.append(f"      {name}: left out ({why})")
    return lines


def _render_plan(planned: list[PlannedOperation]) -> list[str]:
    lines = ["", "Plan (read from the CRMs):" if planned else "Plan: nothing to do."]
    for item in planned:
        lines.append(f"  [{item.rule}] {item.headline}")
        if item.error:
            lines.append(f"      ? {item.error}")
        for c in item.fields:
            if c.change == "~":
                text = f"{_show(c.before)} -> {_show(c.after)}"
            elif c.change == "!":
                text = f"{_show(c.before)} kept, not {_show(c.after)} ({c.why})"
            elif c.change == "x":
                text = f"{_show(c.after)} refused: {c.why}"
            else:
                text = _show(c.after)
            lines.append(f"    {c.change} {c.name}: {text}")
    counts = {k: sum(1 for i in planned if i.headline.startswith(k)) for k in "+~="}
    lines.append(
        f"\nPlan: {counts['+']} to create or log, {counts['~']} to change, {counts['=']} unchanged."
    )
    return lines
