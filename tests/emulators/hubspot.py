"""HubSpot CRM v3 emulator: contacts, notes, default associations, contact properties.

Wire format, status codes, error bodies and rate-limit headers follow
/work/shared/docs/crm-apis.md §2; where the real API is unverified (§5) the
choice is noted beside the code. State lives in plain Python under ``lock``
and can be read and changed from the test thread while the server runs.
"""

from __future__ import annotations

import collections
import json
import re
import ssl
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote

from .runner import Call, EmulatorBase, Reply, call_matcher
from .tls import LocalCA

__all__ = ["HubSpotEmulator", "HubSpotRecord", "PropertyDef"]

LIFECYCLE_STAGES = [
    "subscriber", "lead", "marketingqualifiedlead", "salesqualifiedlead",
    "opportunity", "customer", "evangelist", "other",
]  # fmt: skip
LEAD_STATUSES = [
    "NEW", "OPEN", "IN_PROGRESS", "OPEN_DEAL", "UNQUALIFIED",
    "ATTEMPTED_TO_CONTACT", "CONNECTED", "BAD_TIMING",
]  # fmt: skip
# What GET and search return when the caller names no properties.
DEFAULT_CONTACT_PROPERTIES = ["createdate", "email", "firstname", "hs_object_id", "lastmodifieddate", "lastname"]
SYSTEM_PROPERTIES = ["createdate", "hs_object_id", "lastmodifieddate"]
NOTE_TO_CONTACT = 202
CONTACT_TO_NOTE = 201
EMAIL_RE = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
AUTH_MESSAGE = (
    "Authentication credentials not found. This API supports OAuth 2.0 authentication and you can find "
    "more details at https://developers.hubspot.com/docs/methods/auth/oauth-overview"
)
# Unknown paths get the gateway's Jetty page, not JSON (seen on the real API).
JETTY_PAGE = """<html>
<head>
<meta http-equiv="Content-Type" content="text/html;charset=utf-8"/>
<title>Error {status} {reason}</title>
</head>
<body><h2>HTTP ERROR {status} {reason}</h2>
<table>
<tr><th>URI:</th><td>{path}</td></tr>
<tr><th>STATUS:</th><td>{status}</td></tr>
<tr><th>MESSAGE:</th><td>{reason}</td></tr>
</table>
</body>
</html>
"""


def iso_now() -> str:
    now = datetime.now(UTC)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


@dataclass
class PropertyDef:
    """One property definition as ``GET /crm/v3/properties/{object}`` describes it."""

    name: str
    label: str
    type: str = "string"  # string | number | enumeration | datetime | date | bool
    field_type: str = "text"
    options: list[str] | None = None  # enumeration values, in order (lifecyclestage order matters)
    read_only: bool = False
    unique: bool = False
    group: str = "contactinformation"
    hubspot_defined: bool = True

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "label": self.label,
            "type": self.type,
            "fieldType": self.field_type,
            "description": "",
            "groupName": self.group,
            "options": [
                {"label": value, "value": value, "displayOrder": i, "hidden": False, "description": ""}
                for i, value in enumerate(self.options or [])
            ],
            "displayOrder": -1,
            "calculated": False,
            "externalOptions": False,
            "hasUniqueValue": self.unique,
            "hidden": False,
            "hubspotDefined": self.hubspot_defined,
            "formField": not self.read_only,
            "modificationMetadata": {
                "archivable": not self.hubspot_defined,
                "readOnlyDefinition": self.hubspot_defined,
                "readOnlyValue": self.read_only,
            },
            "createdAt": "2020-01-01T00:00:00.000Z",
            "updatedAt": "2020-01-01T00:00:00.000Z",
            "archived": False,
        }


def default_contact_properties() -> dict[str, PropertyDef]:
    defs = [
        PropertyDef("email", "Email", unique=True),
        PropertyDef("firstname", "First Name"),
        PropertyDef("lastname", "Last Name"),
        PropertyDef("phone", "Phone Number", field_type="phonenumber"),
        PropertyDef("mobilephone", "Mobile Phone Number", field_type="phonenumber"),
        PropertyDef("company", "Company Name"),
        PropertyDef("jobtitle", "Job Title"),
        PropertyDef("website", "Website URL"),
        PropertyDef("city", "City"),
        PropertyDef("country", "Country/Region"),
        PropertyDef("hs_lead_status", "Lead Status", "enumeration", "radio", list(LEAD_STATUSES)),
        PropertyDef("lifecyclestage", "Lifecycle Stage", "enumeration", "radio", list(LIFECYCLE_STAGES)),
        PropertyDef("hs_object_id", "Record ID", "number", "number", read_only=True, unique=True),
        PropertyDef("createdate", "Create Date", "datetime", "date", read_only=True),
        PropertyDef("lastmodifieddate", "Last Modified Date", "datetime", "date", read_only=True),
    ]
    return {d.name: d for d in defs}


def default_note_properties() -> dict[str, PropertyDef]:
    defs = [
        PropertyDef("hs_timestamp", "Activity date", "datetime", "date", group="engagement"),
        PropertyDef("hs_note_body", "Note body", field_type="html", group="engagement"),
        PropertyDef("hubspot_owner_id", "Activity assigned to", group="engagement"),
        PropertyDef("hs_attachment_ids", "Attachment IDs", group="engagement"),
        PropertyDef("hs_object_id", "Record ID", "number", "number", read_only=True, unique=True),
        PropertyDef("hs_createdate", "Create Date", "datetime", "date", read_only=True),
        PropertyDef("hs_lastmodifieddate", "Last Modified Date", "datetime", "date", read_only=True),
    ]
    return {d.name: d for d in defs}


@dataclass
class HubSpotRecord:
    """A stored contact or note. ``history`` holds (clock time, properties) per write,
    so search can lag behind writes (``search_delay``)."""

    id: str
    properties: dict[str, str]
    created_at: str
    updated_at: str
    history: list[tuple[float, dict[str, str]]] = field(default_factory=list)

    def to_json(self, names: list[str] | None = None) -> dict[str, Any]:
        props = self.properties if names is None else {n: self.properties.get(n) for n in names}
        return {
            "id": self.id,
            "properties": props,
            "createdAt": self.created_at,
            "updatedAt": self.updated_at,
            "archived": False,
        }


class ValidationFailure(Exception):
    """A 400 VALIDATION_ERROR with HubSpot's per-property error entries."""

    def __init__(self, errors: list[dict[str, str]]) -> None:
        super().__init__(errors)
        self.errors = errors


class HubSpotEmulator(EmulatorBase):
    """Emulated HubSpot account reachable at ``url`` (plain HTTP unless ``tls`` given).

    State: ``contacts`` / ``notes`` (id → HubSpotRecord), ``associations``
    (set of (note_id, contact_id)), ``properties`` (object type → name → PropertyDef),
    ``calls``. Knobs read on every request: ``token``, ``tier_max``, ``interval_ms``,
    ``daily``, ``daily_used``, ``search_per_second``, ``retry_after``, ``search_delay``,
    ``latency``, ``clock``.
    """

    def __init__(
        self,
        token: str = "pat-na1-test",
        tier_max: int = 100,
        interval_ms: int = 10000,
        daily: int = 250000,
        *,
        clock: Callable[[], float] = time.monotonic,
        tls: LocalCA | None = None,
        search_per_second: int = 5,
        retry_after: float | None = None,
        search_delay: float = 0.0,
        portal_id: int = 12345678,
    ) -> None:
        super().__init__()
        self.token = token
        self.tier_max = tier_max
        self.interval_ms = interval_ms
        self.daily = daily
        self.daily_used = 0
        self.clock = clock
        self.tls = tls
        self.search_per_second = search_per_second
        self.retry_after = retry_after  # seconds; None → 429s carry no Retry-After (HubSpot's usual)
        self.search_delay = search_delay  # seconds of clock time before a write is searchable
        self.portal_id = portal_id
        self.contacts: dict[str, HubSpotRecord] = {}
        self.notes: dict[str, HubSpotRecord] = {}
        self.associations: set[tuple[str, str]] = set()
        self.properties: dict[str, dict[str, PropertyDef]] = {
            "contacts": default_contact_properties(),
            "notes": default_note_properties(),
        }
        self._next_id = 100
        self._window: collections.deque[float] = collections.deque()
        self._search_window: collections.deque[float] = collections.deque()
        self._routes: list[tuple[str, re.Pattern[str], Callable[..., Reply]]] = [
            ("POST", re.compile(r"/crm/v3/objects/contacts/?"), self._create_contact),
            ("POST", re.compile(r"/crm/v3/objects/contacts/batch/upsert"), self._batch_upsert),
            ("POST", re.compile(r"/crm/v3/objects/contacts/search"), self._search),
            ("GET", re.compile(r"/crm/v3/objects/contacts/(?P<object_id>[^/]+)"), self._get_contact),
            ("PATCH", re.compile(r"/crm/v3/objects/contacts/(?P<object_id>[^/]+)"), self._update_contact),
            ("POST", re.compile(r"/crm/v3/objects/notes/?"), self._create_note),
            (
                "PUT",
                re.compile(
                    r"/crm/v4/objects/(?P<from_type>notes|contacts)/(?P<from_id>[^/]+)"
                    r"/associations/default/(?P<to_type>notes|contacts)/(?P<to_id>[^/]+)"
                ),
                self._associate_default,
            ),
            ("GET", re.compile(r"/crm/v3/properties/(?P<object_type>[^/]+)/?"), self._list_properties),
            ("GET", re.compile(r"/crm/v3/properties/(?P<object_type>[^/]+)/(?P<name>[^/]+)"), self._get_property),
        ]

    def _ssl_context(self) -> ssl.SSLContext | None:
        return self.tls.server_context() if self.tls else None

    @property
    def ca_path(self) -> str | None:
        return str(self.tls.ca_path) if self.tls and self.tls.ca_path else None

    # -- helpers for tests -------------------------------------------------------------------
    def add_contact(self, properties: dict[str, str]) -> HubSpotRecord:
        """Store a contact directly (no validation, no API call counted)."""
        with self.lock:
            return self._insert(self.contacts, "contacts", self._normalise(properties))

    def contact_by_email(self, email: str) -> HubSpotRecord | None:
        with self.lock:
            return self._find_contact("email", email)

    def add_property(
        self,
        name: str,
        type: str = "string",  # noqa: A002 - HubSpot's own field name
        field_type: str = "text",
        options: list[str] | None = None,
        *,
        object_type: str = "contacts",
        label: str | None = None,
        unique: bool = False,
    ) -> PropertyDef:
        """Register a custom property (enumerations take ``options``)."""
        prop = PropertyDef(name, label or name, type, field_type, options, unique=unique, hubspot_defined=False)
        with self.lock:
            self.properties[object_type][name] = prop
        return prop

    def set_property_options(self, name: str, options: list[str], object_type: str = "contacts") -> None:
        """Replace an enumeration's options (order = lifecycle order for lifecyclestage)."""
        with self.lock:
            self.properties[object_type][name].options = list(options)

    def exhaust_rate_limit(self) -> None:
        """Fill the current ten-second window so the next counted request gets a 429."""
        with self.lock:
            now = self.clock()
            self._prune(now)
            self._window.extend([now] * max(0, self.tier_max - len(self._window)))

    def fail_next_rate_limited(
        self, n: int = 1, retry_after: float | None = None, match: str | None = None, method: str | None = None
    ) -> None:
        """The next ``n`` matching requests get the ten-secondly 429 (with ``Retry-After`` if given)."""
        headers = self._rate_headers(remaining=0)
        if retry_after is not None:
            headers["Retry-After"] = _fmt_seconds(retry_after)
        self.add_rule(call_matcher(match, method), n, Reply(429, self._rate_limit_body("TEN_SECONDLY_ROLLING"), headers))

    def fail_next_server_error(self, n: int = 1, status: int = 502, match: str | None = None) -> None:
        """The next ``n`` matching requests get an HTML 5xx page, as the edge serves them."""
        body = f"<html><head><title>{status}</title></head><body>{status} Bad Gateway</body></html>"
        self.add_rule(call_matcher(match, None), n, Reply(status, body, {}, "text/html;charset=utf-8"))

    def _default_failure(self, status: int) -> Reply:
        if status == 429:
            return Reply(429, self._rate_limit_body("TEN_SECONDLY_ROLLING"), self._rate_headers(remaining=0))
        return self._error(status, "internal error" if status >= 500 else "error", None)

    # -- dispatch ----------------------------------------------------------------------------
    def _respond(self, call: Call) -> Reply:
        if call.headers.get("Authorization", "") != f"Bearer {self.token}":
            return self._error(401, AUTH_MESSAGE, "INVALID_AUTHENTICATION")
        path = call.raw_path
        is_search = call.method == "POST" and path.rstrip("/").endswith("/search")
        limited = self._check_search_limit() if is_search else self._check_rate_limit()
        if limited is not None:
            return limited
        reply = self._route(call, path)
        if not is_search:
            reply.headers.update(self._rate_headers())
        return reply

    def _route(self, call: Call, path: str) -> Reply:
        path_matched = False
        for method, pattern, handler in self._routes:
            m = pattern.fullmatch(path)
            if not m:
                continue
            path_matched = True
            if method != call.method:
                continue
            params = {k: unquote(v) for k, v in m.groupdict().items()}
            try:
                return handler(call, **params)
            except ValidationFailure as exc:
                return self._validation_error(exc.errors)
        status, reason = (405, "Method Not Allowed") if path_matched else (404, "Not Found")
        page = JETTY_PAGE.format(status=status, reason=reason, path=call.path)
        return Reply(status, page, {}, "text/html;charset=utf-8")

    # -- rate limits -------------------------------------------------------------------------
    def _prune(self, now: float) -> None:
        horizon = now - self.interval_ms / 1000
        while self._window and self._window[0] <= horizon:
            self._window.popleft()

    def _check_rate_limit(self) -> Reply | None:
        now = self.clock()
        self._prune(now)
        if self.daily_used >= self.daily:
            return self._limited("DAILY")
        if len(self._window) >= self.tier_max:
            return self._limited("TEN_SECONDLY_ROLLING")
        # Counted only when admitted: a rejected request does not extend the window.
        self._window.append(now)
        self.daily_used += 1
        return None

    def _check_search_limit(self) -> Reply | None:
        now = self.clock()
        while self._search_window and self._search_window[0] <= now - 1.0:
            self._search_window.popleft()
        if len(self._search_window) >= self.search_per_second:
            # Recorded from the real API: the search 429 has category, no policyName, no headers.
            body = {
                "status": "error",
                "message": "You have reached your secondly limit.",
                "correlationId": str(uuid.uuid4()),
                "category": "RATE_LIMITS",
            }
            headers = {"Retry-After": _fmt_seconds(self.retry_after)} if self.retry_after is not None else {}
            return Reply(429, body, headers)
        self._search_window.append(now)
        return None

    def _limited(self, policy: str) -> Reply:
        headers = self._rate_headers(remaining=0)
        if self.retry_after is not None:
            headers["Retry-After"] = _fmt_seconds(self.retry_after)
        return Reply(429, self._rate_limit_body(policy), headers)

    def _rate_limit_body(self, policy: str) -> dict[str, Any]:
        message = {
            "TEN_SECONDLY_ROLLING": "You have reached your ten_secondly_rolling limit.",
            "DAILY": "You have reached your daily limit.",
        }[policy]
        return {
            "status": "error",
            "message": message,
            "errorType": "RATE_LIMIT",
            "correlationId": str(uuid.uuid4()),
            "policyName": policy,
        }

    def _rate_headers(self, remaining: int | None = None) -> dict[str, str]:
        if remaining is None:
            remaining = max(0, self.tier_max - len(self._window))
        return {
            "X-HubSpot-RateLimit-Daily": str(self.daily),
            "X-HubSpot-RateLimit-Daily-Remaining": str(max(0, self.daily - self.daily_used)),
            "X-HubSpot-RateLimit-Interval-Milliseconds": str(self.interval_ms),
            "X-HubSpot-RateLimit-Max": str(self.tier_max),
            "X-HubSpot-RateLimit-Remaining": str(remaining),
        }

    # -- errors ------------------------------------------------------------------------------
    def _error(self, status: int, message: str, category: str | None, **extra: Any) -> Reply:
        body: dict[str, Any] = {"status": "error", "message": message, "correlationId": str(uuid.uuid4())}
        body.update(extra)
        if category:
            body["category"] = category
        return Reply(status, body)

    def _validation_error(self, errors: list[dict[str, str]]) -> Reply:
        # The real message embeds the per-property list as JSON text; ``errors`` repeats it structured.
        detail = [
            {"isValid": False, "message": e["message"], "error": e["code"], "name": e["name"], "portalId": self.portal_id}
            for e in errors
        ]
        return self._error(
            400,
            f"Property values were not valid: {json.dumps(detail, separators=(',', ':'))}",
            "VALIDATION_ERROR",
            errors=[
                {"message": e["message"], "code": e["code"], "context": {"propertyName": [e["name"]]}} for e in errors
            ],
        )

    def _not_found(self, object_id: str) -> Reply:
        return self._error(
            404, "Object not found.  objectId are usually numeric.", "OBJECT_NOT_FOUND", context={"id": [object_id]}
        )

    def _bad_request(self, message: str) -> Reply:
        return self._error(400, message, "VALIDATION_ERROR")

    # -- storage -----------------------------------------------------------------------------
    def _insert(self, table: dict[str, HubSpotRecord], object_type: str, props: dict[str, str]) -> HubSpotRecord:
        self._next_id += 1
        object_id = str(self._next_id)
        stamp = iso_now()
        created, modified = ("hs_createdate", "hs_lastmodifieddate") if object_type == "notes" else (
            "createdate", "lastmodifieddate")  # fmt: skip
        stored = {k: v for k, v in props.items() if v != ""}
        stored.update({"hs_object_id": object_id, created: stamp, modified: stamp})
        record = HubSpotRecord(object_id, stored, stamp, stamp)
        record.history.append((self.clock(), dict(stored)))
        table[object_id] = record
        return record

    def _apply(self, record: HubSpotRecord, props: dict[str, str]) -> dict[str, str]:
        """Write ``props`` onto a contact; returns what was actually written."""
        written: dict[str, str] = {}
        for name, value in props.items():
            if name == "lifecyclestage" and value and not self._stage_moves_forward(
                record.properties.get("lifecyclestage"), value
            ):
                continue  # HubSpot ignores a backwards stage silently (unverified, see doc §5)
            if value == "":
                record.properties.pop(name, None)
            else:
                record.properties[name] = value
            written[name] = value
        stamp = iso_now()
        record.updated_at = stamp
        record.properties["lastmodifieddate"] = stamp
        record.history.append((self.clock(), dict(record.properties)))
        return written

    def _stage_moves_forward(self, current: str | None, new: str) -> bool:
        order = self.properties["contacts"]["lifecyclestage"].options or []
        if not current or current not in order or new not in order:
            return True
        return order.index(new) >= order.index(current)

    def _find_contact(self, id_property: str, value: str) -> HubSpotRecord | None:
        if id_property in ("hs_object_id", "id"):
            return self.contacts.get(value)
        if id_property == "email":
            value = value.lower()
        return next((c for c in self.contacts.values() if c.properties.get(id_property) == value), None)

    # -- validation --------------------------------------------------------------------------
    def _normalise(self, props: dict[str, Any]) -> dict[str, str]:
        """HubSpot stores strings: numbers and booleans arrive as JSON and are kept as text."""
        out: dict[str, str] = {}
        for name, value in props.items():
            if value is None:
                text = ""
            elif isinstance(value, bool):
                text = "true" if value else "false"
            else:
                text = str(value)
            if name == "email":
                text = text.strip().lower()
            out[name] = text
        return out

    def _validate(self, object_type: str, props: Any) -> dict[str, str]:
        if not isinstance(props, dict):
            raise ValidationFailure([{"name": "properties", "code": "INVALID_INPUT", "message": "properties must be an object"}])
        defs = self.properties[object_type]
        clean = self._normalise(props)
        errors = []
        for name, value in clean.items():
            prop = defs.get(name)
            if prop is None:
                errors.append({"name": name, "code": "PROPERTY_DOESNT_EXIST", "message": f'Property "{name}" does not exist'})
            elif prop.read_only:
                errors.append({
                    "name": name, "code": "READ_ONLY_VALUE",
                    "message": f'"{name}" is a read only property; its value cannot be set.',
                })  # fmt: skip
            elif value == "":
                continue
            elif prop.type == "enumeration" and not self._option_ok(prop, value):
                allowed = ", ".join(prop.options or [])
                errors.append({
                    "name": name, "code": "INVALID_OPTION",
                    "message": f"{value} was not one of the allowed options: [{allowed}]",
                })  # fmt: skip
            elif prop.type == "number" and not _is_number(value):
                errors.append({"name": name, "code": "INVALID_INTEGER", "message": f"{value} was not a valid number."})
            elif prop.type == "bool" and value not in ("true", "false"):
                errors.append({"name": name, "code": "INVALID_BOOLEAN", "message": f"{value} was not a valid boolean."})
            elif name == "email" and object_type == "contacts" and not EMAIL_RE.match(value):
                errors.append({"name": name, "code": "INVALID_EMAIL", "message": f"Email address {value} is invalid"})
        if errors:
            raise ValidationFailure(errors)
        return clean

    @staticmethod
    def _option_ok(prop: PropertyDef, value: str) -> bool:
        options = prop.options or []
        if prop.field_type == "checkbox":  # multi-select: ";"-separated values
            return all(part in options for part in value.split(";"))
        return value in options

    def _conflict(self, existing: HubSpotRecord) -> Reply:
        return self._error(409, f"Contact already exists. Existing ID: {existing.id}", "CONFLICT")

    # -- contacts ------------------------------------------------------------------------------
    def _create_contact(self, call: Call) -> Reply:
        body = call.json if isinstance(call.json, dict) else {}
        props = self._validate("contacts", body.get("properties", {}))
        email = props.get("email")
        if email and (existing := self._find_contact("email", email)):
            return self._conflict(existing)
        record = self._insert(self.contacts, "contacts", props)
        return Reply(201, record.to_json())

    def _requested_names(self, names: list[str] | None) -> list[str]:
        if not names:
            return DEFAULT_CONTACT_PROPERTIES
        # The SDK repeats ``properties=``; raw clients may send one comma-separated value.
        flat = [n for value in names for n in value.split(",") if n]
        return list(dict.fromkeys(flat + SYSTEM_PROPERTIES))

    def _get_contact(self, call: Call, object_id: str) -> Reply:
        id_property = call.param("idProperty") or "hs_object_id"
        if (call.param("archived") or "").lower() == "true":
            return self._not_found(object_id)  # nothing is ever archived here
        record = self._find_contact(id_property, object_id)
        if record is None:
            return self._not_found(object_id)
        data = record.to_json(self._requested_names(call.query.get("properties")))
        if "notes" in ",".join(call.query.get("associations", [])):
            linked = sorted(n for n, c in self.associations if c == record.id)
            data["associations"] = {
                "notes": {"results": [{"id": n, "type": "contact_to_note"} for n in linked]}
            }
        return Reply(200, data)

    def _update_contact(self, call: Call, object_id: str) -> Reply:
        id_property = call.param("idProperty") or "hs_object_id"
        body = call.json if isinstance(call.json, dict) else {}
        props = self._validate("contacts", body.get("properties", {}))
        record = self._find_contact(id_property, object_id)
        if record is None:
            return self._not_found(object_id)
        new_email = props.get("email")
        if new_email and (other := self._find_contact("email", new_email)) and other.id != record.id:
            return self._conflict(other)
        written = self._apply(record, props)
        shown = {k: record.properties.get(k) for k in [*written, *SYSTEM_PROPERTIES]}
        return Reply(200, {**record.to_json(), "properties": shown})

    def _batch_upsert(self, call: Call) -> Reply:
        body = call.json if isinstance(call.json, dict) else {}
        inputs = body.get("inputs")
        if not isinstance(inputs, list) or not inputs:
            return self._bad_request("inputs must not be empty")
        if len(inputs) > 100:
            return self._bad_request(f"Too many inputs: {len(inputs)}. The limit is 100.")
        started = iso_now()
        planned: list[tuple[str, str, dict[str, str]]] = []
        seen: set[str] = set()
        for item in inputs:
            id_property = item.get("idProperty") or "hs_object_id"
            key = str(item.get("id", ""))
            if id_property not in ("hs_object_id", "email") and not self.properties["contacts"].get(
                id_property, PropertyDef("", "")
            ).unique:
                return self._bad_request(f"{id_property} is not a unique property and cannot be used as idProperty")
            key = key.lower() if id_property == "email" else key
            if key in seen:
                return self._bad_request(f"Duplicate IDs found in batch input: [{key}]")
            seen.add(key)
            # Any invalid input fails the whole batch with 400 before anything is written.
            planned.append((id_property, key, self._validate("contacts", item.get("properties", {}))))
        results, errors = [], []
        for id_property, key, props in planned:
            record = self._find_contact(id_property, key)
            if record is None and id_property == "hs_object_id":
                errors.append({
                    "status": "error", "category": "OBJECT_NOT_FOUND",
                    "message": f"Could not find object with id {key}", "context": {"ids": [key]},
                })  # fmt: skip
                continue
            if record is None:
                record = self._insert(self.contacts, "contacts", {**props, id_property: key})
                results.append({**record.to_json(), "new": True})
            else:
                self._apply(record, props)
                results.append({**record.to_json(), "new": False})
        data: dict[str, Any] = {"status": "COMPLETE", "results": results, "startedAt": started, "completedAt": iso_now()}
        if errors:
            data.update(errors=errors, numErrors=len(errors))
            return Reply(207, data)
        return Reply(200, data)

    def _search(self, call: Call) -> Reply:
        body = call.json if isinstance(call.json, dict) else {}
        limit = int(body.get("limit") or 10)
        if limit > 200:
            return self._bad_request("limit must be less than or equal to 200")
        after = int(body.get("after") or 0)
        groups = body.get("filterGroups") or []
        if len(groups) > 5 or sum(len(g.get("filters", [])) for g in groups) > 18:
            return self._bad_request("Too many filters or filter groups")
        try:
            visible = [r for r in (self._search_view(c) for c in self.contacts.values()) if r is not None]
            hits = [r for r in visible if _matches_groups(r[1], groups) and _matches_query(r[1], body.get("query"))]
        except ValueError as exc:
            return self._bad_request(str(exc))
        for sort in reversed(body.get("sorts") or []):
            name = sort if isinstance(sort, str) else sort.get("propertyName", "")
            descending = not isinstance(sort, str) and str(sort.get("direction", "")).upper() == "DESCENDING"
            hits.sort(key=lambda r, n=name: _sort_key(r[1].get(n)), reverse=descending)
        names = self._requested_names(body.get("properties"))
        page = hits[after : after + limit]
        results = [
            {"id": rid, "properties": {n: props.get(n) for n in names},
             "createdAt": self.contacts[rid].created_at, "updatedAt": self.contacts[rid].updated_at, "archived": False}
            for rid, props in page
        ]  # fmt: skip
        data: dict[str, Any] = {"total": len(hits), "results": results}
        if after + limit < len(hits):
            data["paging"] = {"next": {"after": str(after + limit), "link": f"?after={after + limit}"}}
        return Reply(200, data)

    def _search_view(self, record: HubSpotRecord) -> tuple[str, dict[str, str]] | None:
        """The record as the search index sees it: the last write older than ``search_delay``."""
        cutoff = self.clock() - self.search_delay
        indexed = [props for t, props in record.history if t <= cutoff]
        return (record.id, indexed[-1]) if indexed else None

    # -- notes and associations ---------------------------------------------------------------
    def _create_note(self, call: Call) -> Reply:
        body = call.json if isinstance(call.json, dict) else {}
        props = self._validate("notes", body.get("properties", {}))
        if not props.get("hs_timestamp"):
            raise ValidationFailure([{
                "name": "hs_timestamp", "code": "REQUIRED_PROPERTY",
                "message": 'Property "hs_timestamp" is required',
            }])  # fmt: skip
        links: list[str] = []
        for assoc in body.get("associations") or []:
            to_id = str((assoc.get("to") or {}).get("id", ""))
            types = assoc.get("types") or []
            if to_id not in self.contacts:
                return self._bad_request(f"One or more associations are invalid: contact {to_id} does not exist")
            if not any(
                t.get("associationCategory") == "HUBSPOT_DEFINED" and int(t.get("associationTypeId", 0)) == NOTE_TO_CONTACT
                for t in types
            ):
                return self._bad_request(f"invalid association type for note to contact: {types}")
            links.append(to_id)
        record = self._insert(self.notes, "notes", props)
        self.associations.update((record.id, contact_id) for contact_id in links)
        return Reply(201, record.to_json())

    def _associate_default(self, call: Call, from_type: str, from_id: str, to_type: str, to_id: str) -> Reply:
        if from_type == to_type:
            return self._bad_request(f"No default association from {from_type} to {to_type}")
        note_id, contact_id = (from_id, to_id) if from_type == "notes" else (to_id, from_id)
        if note_id not in self.notes:
            return self._not_found(note_id)
        if contact_id not in self.contacts:
            return self._not_found(contact_id)
        started = iso_now()
        self.associations.add((note_id, contact_id))
        spec = {"associationCategory": "HUBSPOT_DEFINED"}
        results = [
            {"from": {"id": note_id}, "to": {"id": contact_id}, "associationSpec": {**spec, "associationTypeId": NOTE_TO_CONTACT}},
            {"from": {"id": contact_id}, "to": {"id": note_id}, "associationSpec": {**spec, "associationTypeId": CONTACT_TO_NOTE}},
        ]
        if from_type == "contacts":
            results.reverse()
        return Reply(200, {"status": "COMPLETE", "results": results, "startedAt": started, "completedAt": iso_now()})

    # -- properties ----------------------------------------------------------------------------
    def _list_properties(self, call: Call, object_type: str) -> Reply:
        defs = self.properties.get(object_type)
        if defs is None:
            return self._error(400, f"Unable to infer object type from: {object_type}", None)
        return Reply(200, {"results": [d.to_json() for d in defs.values()]})

    def _get_property(self, call: Call, object_type: str, name: str) -> Reply:
        defs = self.properties.get(object_type)
        if defs is None:
            return self._error(400, f"Unable to infer object type from: {object_type}", None)
        if name not in defs:
            return self._error(404, f"Unable to find property {name} on object type {object_type}", "OBJECT_NOT_FOUND")
        return Reply(200, defs[name].to_json())


# -- search matching ---------------------------------------------------------------------------
def _matches_groups(props: dict[str, str], groups: list[dict[str, Any]]) -> bool:
    if not groups:
        return True
    return any(all(_matches_filter(props, f) for f in g.get("filters", [])) for g in groups)


def _matches_filter(props: dict[str, str], flt: dict[str, Any]) -> bool:
    name, op = flt.get("propertyName", ""), str(flt.get("operator", "EQ")).upper()
    actual = props.get(name)
    value = flt.get("value")
    # Search compares text case-insensitively (email is stored lower-case anyway).
    a = actual.lower() if isinstance(actual, str) else actual
    v = str(value).lower() if value is not None else None
    values = [str(x).lower() for x in flt.get("values") or []]
    if op == "EQ":
        return a == v
    if op == "NEQ":
        return a != v
    if op == "IN":
        return a in values
    if op == "NOT_IN":
        return a not in values
    if op == "HAS_PROPERTY":
        return actual is not None
    if op == "NOT_HAS_PROPERTY":
        return actual is None
    if op in ("CONTAINS_TOKEN", "NOT_CONTAINS_TOKEN"):
        pattern = re.compile("^" + ".*".join(map(re.escape, (v or "").split("*"))) + "$")
        tokens = re.split(r"[\s@.,;]+", a or "") + [a or ""]
        found = any(pattern.match(t) for t in tokens)
        return found if op == "CONTAINS_TOKEN" else not found
    if op in ("LT", "LTE", "GT", "GTE"):
        if actual is None:
            return False
        x, y = _sort_key(actual), _sort_key(value)
        return {"LT": x < y, "LTE": x <= y, "GT": x > y, "GTE": x >= y}[op]
    raise ValueError(f"Unsupported filter operator: {op}")


def _matches_query(props: dict[str, str], query: str | None) -> bool:
    if not query:
        return True
    q = query.lower()
    return any(q in (props.get(n) or "").lower() for n in ("firstname", "lastname", "email", "phone", "company"))


def _sort_key(value: Any) -> tuple[int, float, str]:
    text = "" if value is None else str(value)
    return (0, float(text), "") if _is_number(text) else (1, 0.0, text.lower())


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _fmt_seconds(seconds: float) -> str:
    return str(int(seconds)) if float(seconds).is_integer() else str(seconds)
