"""`crm-bridge check --online`: the rules checked against the CRMs' own field definitions.

Each connector a rule uses logs in, describes the objects the rules write (HubSpot properties
API, Salesforce describe; HubSpot's Leads object for rules that open one), and every mapped field
(and `hubspot_lead` property) is checked: it exists, it is writable, and
each value the rule can write (constants, value-map results, defaults, a monotonic order) is
of the field's type and, for a picklist or enumeration, one of its options. A templated value
is only known per event: it is checked when its `type:` or a value map says what it gives.
Problems are located in the config file like the loader's.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

from bridge.config import Config, FieldMapping, RuleConfig
from bridge.errors import ConfigProblem
from bridge.expressions import is_template
from connectors.base import Connector, FieldInfo
from connectors.values import allowed_list, moment, number, option, truth

NUMBER_TYPES = {"double", "int", "integer", "long", "currency", "percent", "number"}
BOOLEAN_TYPES = {"boolean", "bool"}
DATE_TYPES = {"date", "datetime"}


@dataclass
class Finding:
    problem: ConfigProblem
    fatal: bool = True  # False: a warning; `check --online` still succeeds
    # The connector it names was not checked at all (no credentials, or it cannot describe its
    # fields): `check --online` says which, and fails when none was.
    unchecked: str | None = None


def _kind(info: FieldInfo) -> str:
    crm_type = info.type.lower()
    if crm_type in BOOLEAN_TYPES:
        return "boolean"
    if crm_type in NUMBER_TYPES:
        return "number"
    if crm_type in DATE_TYPES:
        return crm_type
    return "text"


def _value_problem(value: Any, info: FieldInfo) -> str | None:
    """Why the CRM field `info` would refuse `value`, or None: the connectors' own parsing
    (connectors.values), so `check --online` and a delivery agree."""
    kind = _kind(info)
    # A Salesforce combobox or unrestricted picklist offers options but takes any text.
    if info.options is not None and kind == "text" and info.restricted:
        choices = [str(v) for v in value] if isinstance(value, list | tuple) else [str(value)]
        if info.type == "multipicklist" and len(choices) == 1:
            choices = [c for c in choices[0].split(";") if c]
        for choice in choices:
            if option(info.options, choice) is None:
                hint = difflib.get_close_matches(choice, list(info.options), n=1)
                return (
                    f"{choice!r} is not an option of {info.name}"
                    f" ({info.type}: {allowed_list(info.options, 12)})"
                    + (f" (did you mean `{hint[0]}`?)" if hint else "")
                )
        return None
    if kind == "boolean" and truth(value) is None:
        return f"{value!r} is not a boolean, which {info.name} ({info.type}) holds"
    if kind == "number" and number(value) is None:
        return f"{value!r} is not a number, which {info.name} ({info.type}) holds"
    if kind in ("date", "datetime") and moment(value) is None:
        return f"{value!r} is not a {kind}, which {info.name} ({info.type}) holds"
    if kind == "text" and info.max_length and len(str(value)) > info.max_length:
        return f"{value!r} is longer than {info.name}'s {info.max_length} characters"
    return None


def _candidates(mapping: FieldMapping) -> list[tuple[tuple[str | int, ...], Any]]:
    """Every value the mapping can write that is known before an event comes."""
    found: list[tuple[tuple[str | int, ...], Any]] = []
    if mapping.map is not None:
        found += [(("map", k), v) for k, v in mapping.map.items()]
    elif not is_template(mapping.value):
        found.append((("value",), mapping.value))
    if mapping.default is not None:
        found.append((("default",), mapping.default))
    found += [(("order", i), v) for i, v in enumerate(mapping.order)]
    return found


def check_field(
    mapping: FieldMapping, info: FieldInfo
) -> list[tuple[tuple[str | int, ...], str, bool]]:
    """Problems of one mapped field against the CRM's definition: (where, message, fatal)."""
    out: list[tuple[tuple[str | int, ...], str, bool]] = []
    if not info.writable:
        out.append(((), f"{info.name} is read-only in the CRM", True))
    for where, value in _candidates(mapping):
        problem = _value_problem(value, info)
        if problem:
            out.append((where, problem, True))
    kind = _kind(info)
    templated = is_template(mapping.value) and mapping.map is None
    if templated and info.options is not None and kind == "text":
        out.append(
            (
                ("value",),
                f"{info.name} takes one of {len(info.options)} options and the template's"
                " value is only known per event: a `map:` would check it here",
                False,
            )
        )
    elif templated and kind != "text" and mapping.type not in _TYPES_FOR[kind]:
        out.append(
            (
                ("value",),
                f"{info.name} is a {info.type} field and the template renders text"
                f" (add `type: {_TYPES_FOR[kind][0]}`)",
                False,
            )
        )
    if mapping.max_length and info.max_length and mapping.max_length > info.max_length:
        out.append(
            (
                ("max_length",),
                f"max_length {mapping.max_length} is more than {info.name}'s {info.max_length}",
                True,
            )
        )
    return out


_TYPES_FOR = {
    "boolean": ("boolean",),
    "number": ("number", "integer"),
    "date": ("date", "datetime"),
    "datetime": ("datetime", "date"),
    "text": ("string",),
}


async def check_online(config: Config, connectors: dict[str, Connector]) -> list[Finding]:
    """Log in to each connector the rules use and check their fields; `connectors` are built,
    not opened: they are opened and closed here."""
    findings: list[Finding] = []
    used: dict[str, list[tuple[int, RuleConfig]]] = {}
    for i, rule in enumerate(config.rules):
        if rule.connector is not None and rule.action not in ("stop", "log_activity"):
            used.setdefault(rule.connector, []).append((i, rule))
    for name, connector in connectors.items():
        rules = used.get(name, [])
        if not config.connector_settings[name].has_credentials():
            message = "no credentials: not checked"
            findings.append(Finding(config.problem(("connectors", name), message), False, name))
            continue
        if not describes(connector):
            message = (
                f"not checkable: the {config.connector_settings[name].type} connector cannot"
                " describe its fields (its rules' fields are not checked)"
            )
            findings.append(Finding(config.problem(("connectors", name), message), False, name))
            continue
        try:
            await connector.open()
            await connector.verify()
            described: dict[str, dict[str, FieldInfo]] = {}
            for _, rule in rules:
                obj = rule.record_object
                if obj not in described:
                    described[obj] = await connector.describe(obj)
                if rule.hubspot_lead is not None and "leads" not in described:
                    if config.connector_settings[name].type == "hubspot":
                        described["leads"] = await connector.describe("leads")
        except Exception as exc:  # noqa: BLE001  # any failure to log in or describe is reported
            findings.append(Finding(config.problem(("connectors", name), f"{exc}")))
            continue
        finally:
            await connector.close()
        for i, rule in rules:
            findings.extend(_rule_findings(config, name, i, rule, described))
    return findings


def refusal(
    connector: str, obj: str, fields: dict[str, FieldInfo], name: str, value: Any
) -> str | None:
    """Why the CRM would refuse `value` in its field `name` of `obj` (as `check --online` says
    of a rule), or None: what `simulate --online` marks in its plan."""
    info = fields.get(name)
    if info is None:
        hint = difflib.get_close_matches(name, list(fields), n=1)
        return f"{connector} has no field {name!r} on {obj}" + (
            f" (did you mean `{hint[0]}`?)" if hint else ""
        )
    if not info.writable:
        return f"{info.name} is read-only in the CRM"
    return _value_problem(value, info)


def describes(connector: Connector) -> bool:
    """Whether the connector can tell its CRM's fields (the interface's default cannot)."""
    return type(connector).describe is not Connector.describe


def _rule_findings(
    config: Config, name: str, i: int, rule: RuleConfig, described: dict[str, dict[str, FieldInfo]]
) -> list[Finding]:
    """Rule `i`'s record key, mapped fields and HubSpot Lead properties against the CRM."""
    findings: list[Finding] = []
    fields = described[rule.record_object]
    if rule.id_property is not None and rule.id_property not in fields:
        hint = difflib.get_close_matches(rule.id_property, list(fields), n=1)
        message = f"{name} has no field {rule.id_property!r} on {rule.record_object}" + (
            f" (did you mean `{hint[0]}`?)" if hint else ""
        )
        findings.append(Finding(config.problem(("rules", i, "id_property"), message)))
    for field_name, mapping in rule.fields.items():
        loc: tuple[str | int, ...] = ("rules", i, "fields", field_name)
        findings.extend(_field_findings(config, name, rule.record_object, fields, loc, mapping))
    if rule.hubspot_lead is not None:
        loc = ("rules", i, "hubspot_lead")
        leads = described.get("leads")
        if leads is None:
            message = f"{name} is no HubSpot connector: it opens no Lead object"
            findings.append(Finding(config.problem(loc, message), False))
            return findings
        for prop, value in rule.hubspot_lead.items():
            mapping = FieldMapping(value=value)
            findings.extend(_field_findings(config, name, "leads", leads, (*loc, prop), mapping))
    return findings


def _field_findings(
    config: Config,
    name: str,
    obj: str,
    fields: dict[str, FieldInfo],
    loc: tuple[str | int, ...],
    mapping: FieldMapping,
) -> list[Finding]:
    """One mapped field against the CRM's definitions of `obj`."""
    field_name = str(loc[-1])
    info = fields.get(field_name)
    if info is None:
        hint = difflib.get_close_matches(field_name, list(fields), n=1)
        message = f"{name} has no field {field_name!r} on {obj}" + (
            f" (did you mean `{hint[0]}`?)" if hint else ""
        )
        return [Finding(config.problem(loc, message))]
    return [
        Finding(config.problem((*loc, *where), message), fatal)
        for where, message, fatal in check_field(mapping, info)
    ]
