"""Rules that load but can never do what they say: a typo in an event type or a contact field.

`type == 'intrest'` and `contact.intrest` are valid Jinja2, so the loader accepts them, and no
contact is ever synced. The payload model and the platform's sample know every field Supersend
sends, and its documentation every event type: a rule that compares `type` with another value,
or reads another contact field, gets a warning (with the closest known name) from `check` and in
the daemon's log. A source declares what else it sends (`event_types`, `contact_fields`);
`contact.custom.*` is the platform's own free-form object and never warned about.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator

from jinja2 import nodes

from bridge.config import Config, RuleConfig
from bridge.errors import ConfigProblem
from bridge.expressions import ENV, is_template
from bridge.models import KNOWN_EVENT_TYPES, Contact

# Types newer platform versions send (see bridge.models), and what `backfill` stores by default.
EXTRA_EVENT_TYPES = ("sent", "unsubscribe", "finished", "backfill")
# The contact fields of the platform's sample event (tests/data/supersend-click.json; a unit
# test keeps the two equal), beside those the model names.
SAMPLE_CONTACT_FIELDS = (
    "id first_name last_name email linkedin_url image title phone timezone_offset company_name"
    " industry note company_url one_liner twitter twitter_id custom validated verified deleted"
    " finished bounced interest clicked opened replied appointment failed state country b_test"
    " test_letter createdAt updatedAt UserId TeamId OrgId CampaignId ContactConfigId SenderId"
    " Sender"
).split()
EVENT_FIELDS = ("type", "CampaignId", "source", "received_at")


def known_types(config: Config) -> list[str]:
    declared = [t for source in config.sources.values() for t in source.event_types]
    return list(dict.fromkeys([*KNOWN_EVENT_TYPES, *EXTRA_EVENT_TYPES, *declared]))


def known_contact_fields(config: Config) -> list[str]:
    declared = [f for source in config.sources.values() for f in source.contact_fields]
    return list(dict.fromkeys([*Contact.model_fields, *SAMPLE_CONTACT_FIELDS, *declared]))


def rule_warnings(config: Config) -> list[ConfigProblem]:
    """Every type comparison and contact field read of every rule that no source can satisfy."""
    types, fields = known_types(config), known_contact_fields(config)
    found: list[ConfigProblem] = []
    for i, rule in enumerate(config.rules):
        for where, tree in _trees(rule):
            for message in _tree_warnings(tree, types, fields):
                found.append(config.problem(("rules", i, *where), message))
    return found


def _trees(rule: RuleConfig) -> Iterator[tuple[tuple[str, ...], nodes.Node]]:
    """The syntax trees of a rule's condition and templates (all parse: the loader checked)."""
    yield ("when",), ENV.parse("{{ (" + rule.when + ") }}")
    sources: dict[tuple[str, ...], str] = {("id_value",): rule.id_value}
    for name, mapping in rule.fields.items():
        if is_template(mapping.value):
            sources[("fields", name)] = mapping.value
    if rule.activity is not None:
        sources[("activity", "subject")] = rule.activity.subject
        sources[("activity", "body")] = rule.activity.body
    for name, value in (rule.hubspot_lead or {}).items():
        if is_template(value):
            sources[("hubspot_lead", name)] = value
    for where, source in sources.items():
        yield where, ENV.parse(source)


def _hint(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    return f" (did you mean `{close[0]}`?)" if close else ""


def _tree_warnings(tree: nodes.Node, types: list[str], fields: list[str]) -> Iterator[str]:
    for compare in tree.find_all(nodes.Compare):
        if not _is_type(compare.expr):
            continue
        for operand in compare.ops:
            for value in _constants(operand.expr):
                if value not in types:
                    yield (
                        f"no source sends type {value!r}{_hint(value, types)}; known: "
                        f"{', '.join(types)} (a source lists others in `event_types`)"
                    )
    seen: set[str] = set()
    for node in tree.find_all((nodes.Getattr, nodes.Getitem)):
        name = _contact_field(node)
        if name is None or name in fields or name in seen:
            continue
        seen.add(name)
        yield (
            f"contact.{name} is not a field of the platform's payload{_hint(name, fields)}"
            " (a source lists others in `contact_fields`)"
        )
    for node in tree.find_all(nodes.Getattr):
        if (
            isinstance(node.node, nodes.Name)
            and node.node.name == "event"
            and node.attr not in EVENT_FIELDS
        ):
            yield (
                f"event.{node.attr} does not exist{_hint(node.attr, list(EVENT_FIELDS))};"
                f" event has {', '.join(EVENT_FIELDS)}"
            )


def _is_type(node: nodes.Node) -> bool:
    """`type` or `event.type`."""
    if isinstance(node, nodes.Name):
        return node.name == "type"
    return (
        isinstance(node, nodes.Getattr)
        and node.attr == "type"
        and isinstance(node.node, nodes.Name)
        and node.node.name == "event"
    )


def _constants(node: nodes.Node) -> list[str]:
    if isinstance(node, nodes.Const) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, nodes.Tuple | nodes.List):
        return [
            i.value for i in node.items if isinstance(i, nodes.Const) and isinstance(i.value, str)
        ]
    return []


def _contact_field(node: nodes.Node) -> str | None:
    """`x` of `contact.x` or `contact['x']`."""
    inner = node.node  # type: ignore[attr-defined]
    if not (isinstance(inner, nodes.Name) and inner.name == "contact"):
        return None
    if isinstance(node, nodes.Getattr):
        return str(node.attr)
    key = node.arg  # type: ignore[attr-defined]
    return key.value if isinstance(key, nodes.Const) and isinstance(key.value, str) else None
