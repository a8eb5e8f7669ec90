"""HubSpot contacts through hubspot-api-client (private-app token).

Create-or-update is a batch upsert keyed by `idProperty=email`: HubSpot decides create versus
update atomically, so there is no search-then-create race and a repeated delivery is harmless.
Up to 100 records go out in one call. HubSpot fails a whole batch with 400 when one input is
invalid, so such a batch is split (first the inputs that do not carry the property HubSpot
named, then halves) until the bad records stand alone: the good ones still land.

Activities are notes or tasks (status COMPLETED), up to 100 created by one batch create, each
with its association to the contact, so there is never an activity without its contact. The
contact is the `record_id` hint (no lookup), else the one a batch read by email finds (one call
for the batch; never search: it lags behind writes). No contact: the activity's result says so
(`missing`) and the delivery engine decides whether to wait for the contact's own upsert. A
hint HubSpot refuses (the contact was deleted or merged: the association is invalid) is checked
with one batch read by id, and those activities fall back to their email.

An activity is logged once: its body ends with `<!-- crm-bridge:KEY -->`. A first attempt
creates it directly (1 call for the batch with hints, 2 without); a later attempt, or a call
after a create whose answer never came, first lists the contacts' notes or tasks (v4 batch
association read, 100 contacts a call) and reads their bodies newest first (batch read, 100 a
call), and creates nothing for an activity whose key one of them carries.

Contact properties are checked and coerced before they are sent, against the portal's own
definitions (GET /crm/v3/properties/contacts, cached; the cache is emptied by `open`, expires
after `property_cache_seconds` and is reloaded once, at most every minute, when it refuses a
value). Booleans, numbers, dates and datetimes go out in HubSpot's formats; a None clears the
property (HubSpot's empty string). With `validate_properties` (the default) an unknown or
read-only property, a value that is not one of an enumeration's options or not of the
property's type is refused before sending, naming the field, the value and what is allowed;
without it such a value goes out as given and HubSpot's own 400 refuses the record.

`lifecyclestage` only moves forward in HubSpot, which silently ignores a backward write:
`implicit_policies` says so (a monotonic policy along the portal's stage order) for the delivery
engine, and the connector gives a write without a policy for it the same one before it merges
two writes of one contact, so a merge never moves the stage back either. The contacts' current
stages are read first (one batch read per 100); a backward value is left out and noted in the
result's detail, or, with `lifecycle_demotion` or the rule's explicit `always`, cleared (PATCH
"") then set.

A 404 or 403 from the properties API (a wrong `base_url`, a token without the schema scopes) is
`Misconfigured`: the delivery engine pauses the connector rather than dead-lettering each write.

A 409 "Contact already exists. Existing ID: <id>" on a create becomes an update of that contact.

With `oauth` instead of `access_token` the connector takes an access token from
POST /oauth/v1/token (grant_type=refresh_token), renews it shortly before it expires and once
when a call gets a 401, under a lock, and writes it into every SDK API object's configuration
(the SDK copies the token there when it builds them and reads it on each request).

Every HTTP call first waits on `limiter`, a sliding window sized from the portal's tier and
corrected by the rate-limit headers of every answer. The SDK's own urllib3 retries are off
(`retry=False`): retries are the delivery engine's. `pauses` reports the limiter's pause (a
429, a spent daily allocation) for the status page.
"""

from __future__ import annotations

import asyncio
import html
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import urllib3
from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from bridge.errors import (
    AuthenticationFailed,
    DeliveryError,
    Misconfigured,
    PermanentDelivery,
    RetryableDelivery,
)
from bridge.ratelimit import RateLimiter
from connectors.base import (
    Activity,
    Connector,
    ConnectorConfig,
    DeliveryResult,
    FieldInfo,
    LeadUpsert,
    Outcome,
    Outcomes,
    Pause,
    WritePolicy,
    apply_policies,
    combine,
    fit_text,
    per_record,
)
from connectors.outbound import guard_sdk_apis
from connectors.values import (
    FieldProblem,
    allowed_list,
    coerce_all,
    moment,
    number,
    option,
    refuse,
    shown,
    truth,
)

# HubSpot's burst limit is per app and rolling over ten seconds.
RATE_WINDOW_SECONDS = 10.0
# Requests per ten seconds by account tier (crm-apis.md §2.5).
TIER_BURST = {"free": 100, "starter": 100, "professional": 190, "enterprise": 190, "api_pack": 250}
# The daily limit resets at midnight in the account's time zone, which we do not know.
DAILY_PAUSE_SECONDS = 3600.0
AUTH_PAUSE_SECONDS = 300.0
# Batch error categories that say "the same input may pass later"; others are permanent.
RETRYABLE_CATEGORIES = frozenset({"RATE_LIMITS", "INTERNAL_ERROR"})
# Whole-batch refusals that one of its inputs may have caused: split the batch to find it.
PER_RECORD_STATUSES = frozenset({400, 409})
# The batch read's and batch create's largest batch (also contacts per v4 association read).
BATCH_READ = 100
# HubSpot's default lifecycle stages, in order: the forward-only order until the portal's own
# definition of lifecyclestage (which may add custom stages) has been read.
DEFAULT_STAGES = (
    "subscriber",
    "lead",
    "marketingqualifiedlead",
    "salesqualifiedlead",
    "opportunity",
    "customer",
    "evangelist",
    "other",
)
# Statuses of a metadata call that say the set-up is wrong, not a record: no such API at
# `base_url` (404) or a token without the scope (403).
MISCONFIGURED_STATUSES = frozenset({403, 404})
# hs_note_body and hs_task_body hold at most 65,536 characters.
BODY_MAX = 65536
# Keys of activities whose create got no answer (timeout, reset): the write may have landed,
# so the next call for the key looks before it creates, even with the same `attempt` (the
# delivery engine's in-call retries repeat it). Bounded: the oldest are forgotten first.
UNSURE_KEYS_MAX = 10000
# A property cache that refuses a value is reloaded first if it is older than this: the portal
# may have gained the property or the option since.
PROPERTY_RECHECK_SECONDS = 60.0
# An OAuth access token is renewed this long before it expires (at most a tenth of its life).
TOKEN_MARGIN_SECONDS = 300.0
# The rule-level object names `describe` takes, and the HubSpot object type each means.
HUBSPOT_OBJECTS = {
    "lead": "contacts",  # a "lead" is a contact here; "leads" is HubSpot's Leads object
    "contact": "contacts",
    "note": "notes",
    "task": "tasks",
}
EXISTING_ID_RE = re.compile(r"Existing ID: *(\d+)")


@dataclass(frozen=True)
class _Engagement:
    """How one kind of activity is written: HubSpot object type, body property, association."""

    object_type: str
    body_property: str
    to_contact: int  # HUBSPOT_DEFINED association type id, engagement -> contact


ENGAGEMENTS = {
    "note": _Engagement("notes", "hs_note_body", 202),
    "task": _Engagement("tasks", "hs_task_body", 204),
}


class HubSpotOAuth(BaseModel):
    """A public app's credentials and the refresh token of its install in the portal."""

    model_config = ConfigDict(extra="forbid")

    client_id: str = Field(min_length=1)
    client_secret: SecretStr
    refresh_token: SecretStr


class HubSpotConfig(ConnectorConfig):
    type: Literal["hubspot"] = "hubspot"
    # A private app's token, or `oauth` (not both).
    access_token: SecretStr | None = None
    oauth: HubSpotOAuth | None = None
    base_url: str = "https://api.hubapi.com"
    # The portal's subscription: sets its burst limit per 10 s (100, 100, 190, 190, 250).
    tier: Literal["free", "starter", "professional", "enterprise", "api_pack"] = "free"
    # The portal's burst limit per 10 s when it is not the tier's (a negotiated limit, tests).
    rate_limit_requests: int | None = Field(default=None, ge=1)
    # The share of that limit this connector uses; the rest stays free in HubSpot's window for
    # other instances or scripts using the same app, and absorbs clock differences.
    rate_limit_share: float = Field(default=0.8, gt=0, le=1)
    # After a note or task create that got no answer (timeout, reset, 5xx) the write may still
    # be in progress at HubSpot: its delivery waits this long before it looks for it, so the
    # look does not miss a write that lands just after it.
    activity_settle_seconds: float = Field(default=60.0, gt=0)
    # A lifecyclestage earlier than the contact's: HubSpot ignores it. False leaves it out (and
    # says so in the result's detail); True clears the stage first, then sets it (two calls).
    lifecycle_demotion: bool = False
    # The association type of a Lead object to its contact (HubSpot's "lead to primary
    # contact"), for rules that open a HubSpot Lead (`hubspot_lead`).
    lead_association_type: int = Field(default=578, ge=1)
    # Refuse, before sending, a field the portal's definitions refuse (unknown or read-only
    # property, value not among an enumeration's options, value not of the property's type),
    # with the field, the value and what is allowed. False: typed values are still coerced, the
    # rest is sent as given and HubSpot's own 400 refuses the record (its batch is split).
    validate_properties: bool = True
    # How long the portal's contact property definitions are trusted before they are reloaded.
    property_cache_seconds: float = Field(default=600.0, gt=0)

    @model_validator(mode="after")
    def _one_credential(self) -> HubSpotConfig:
        if self.oauth is not None and self.access_token is not None:
            raise ValueError("set either access_token or oauth, not both")
        return self

    def has_credentials(self) -> bool:
        if self.oauth is not None:
            return bool(self.oauth.refresh_token.get_secret_value())
        return bool(self.access_token and self.access_token.get_secret_value())

    def burst_limit(self) -> int:
        """The portal's requests per ten seconds."""
        return self.rate_limit_requests or TIER_BURST[self.tier]

    def requests_per_window(self) -> int:
        """What this connector allows itself per ten seconds."""
        return max(1, int(self.burst_limit() * self.rate_limit_share))


@dataclass(frozen=True)
class _PropertyDef:
    """What the connector needs of one property definition."""

    name: str
    label: str
    type: str  # string | number | enumeration | bool | date | datetime | phone_number | ...
    field_type: str
    options: tuple[str, ...]  # enumeration values in display order (lifecyclestage: stage order)
    read_only: bool

    @classmethod
    def of(cls, prop: Any) -> _PropertyDef:
        options = list(getattr(prop, "options", None) or [])
        orders = [getattr(o, "display_order", None) for o in options]
        if all(isinstance(n, int) and n >= 0 for n in orders):
            # displayOrder -1 means "not set": then the listing's order is the only one.
            options.sort(key=lambda o: int(o.display_order))
        metadata = getattr(prop, "modification_metadata", None)
        return cls(
            name=str(prop.name),
            label=str(getattr(prop, "label", None) or ""),
            type=str(getattr(prop, "type", None) or "string"),
            field_type=str(getattr(prop, "field_type", None) or "text"),
            options=tuple(str(o.value) for o in options),
            read_only=bool(getattr(metadata, "read_only_value", False)),
        )

    def info(self) -> FieldInfo:
        options = self.options if self.type == "enumeration" else None
        return FieldInfo(
            name=self.name,
            label=self.label,
            type=self.type,
            options=options,
            writable=not self.read_only,
        )


def _refuse(name: str, value: Any, expected: str, **detail: Any) -> FieldProblem:
    return refuse("HubSpot property", name, value, expected, **detail)


def _bool(prop: _PropertyDef, value: Any) -> str:
    parsed = truth(value)
    if parsed is None:
        raise _refuse(prop.name, value, "a boolean (true or false)", type=prop.type)
    return "true" if parsed else "false"


def _number_text(prop: _PropertyDef, value: Any) -> str:
    parsed = number(value)
    if parsed is None:
        raise _refuse(prop.name, value, "a number", type=prop.type)
    if isinstance(value, float) and parsed.is_integer() and abs(parsed) < 2**53:
        return str(int(parsed))
    return str(value).strip()


def _date_text(prop: _PropertyDef, value: Any) -> str:
    """YYYY-MM-DD; a value with a time of day must be midnight UTC."""
    when = moment(value)
    if when is None:
        expected = "a date (YYYY-MM-DD, or epoch ms at midnight UTC)"
        raise _refuse(prop.name, value, expected, type=prop.type)
    timed = isinstance(value, datetime | int | float) or (
        isinstance(value, str) and ("T" in value.upper() or value.strip().lstrip("-").isdigit())
    )
    if timed and (when.hour, when.minute, when.second, when.microsecond) != (0, 0, 0, 0):
        expected = "a date: it has a time of day (a HubSpot date is midnight UTC)"
        raise _refuse(prop.name, value, expected, type=prop.type)
    return when.strftime("%Y-%m-%d")


def _datetime_text(prop: _PropertyDef, value: Any) -> str:
    """ISO 8601 UTC with milliseconds."""
    when = moment(value)
    if when is None:
        expected = "a datetime (ISO 8601, or epoch milliseconds)"
        raise _refuse(prop.name, value, expected, type=prop.type)
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _text(prop: _PropertyDef, value: Any) -> str:
    if isinstance(value, dict | list | tuple | set):
        raise _refuse(prop.name, value, "a single value", type=prop.type)
    return _property_value(value)


def _coerce(prop: _PropertyDef, value: Any) -> str:
    """The value as HubSpot takes it for this property; `FieldProblem` if it cannot be."""
    if value is None or value == "":
        return ""  # clears the property
    coerce = {
        "enumeration": _option,
        "bool": _bool,
        "number": _number_text,
        "date": _date_text,
        "datetime": _datetime_text,
    }.get(prop.type, _text)
    return coerce(prop, value)


def _option(prop: _PropertyDef, value: Any) -> str:
    """An enumeration's internal value (given as itself or in another case); several, joined
    by ";", for a multiple checkbox."""
    multiple = prop.field_type == "checkbox"
    if isinstance(value, list | tuple | set) and multiple:
        chosen = [str(v) for v in value]
    elif isinstance(value, str) and multiple:
        chosen = [v for v in value.split(";") if v]
    else:
        chosen = [_property_value(value)]
    out = []
    for item in chosen:
        found = option(prop.options, item)
        if found is None:
            raise FieldProblem(
                f"HubSpot property {prop.name!r}: {item!r} is not one of the allowed values: "
                f"{allowed_list(prop.options)}",
                field=prop.name,
                value=item,
                allowed=list(prop.options),
            )
        out.append(found)
    return ";".join(out)


def _coerce_field(definitions: dict[str, _PropertyDef], name: str, value: Any) -> str:
    prop = definitions.get(name)
    if prop is None:
        raise FieldProblem(
            f"HubSpot property {name!r} does not exist in this portal (value {value!r})",
            field=name,
            value=shown(value),
            expected="a property of contacts",
        )
    if prop.read_only:
        raise FieldProblem(
            f"HubSpot property {name!r} is read-only (value {value!r})",
            field=name,
            value=shown(value),
            expected="a writable property",
        )
    return _coerce(prop, value)


def _coerce_fields(
    definitions: dict[str, _PropertyDef], fields: dict[str, Any]
) -> tuple[dict[str, str], list[FieldProblem]]:
    """Every field checked and coerced; the problems found, all of them."""
    return coerce_all(fields, lambda name, value: _coerce_field(definitions, name, value))


def _property_value(value: Any) -> str:
    # HubSpot properties are strings on the wire; booleans are "true"/"false"; None clears.
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _parse(body: Any) -> Any:
    try:
        return json.loads(body) if isinstance(body, (str, bytes)) else body
    except ValueError:
        return None


def _message(body: Any) -> str:
    data = _parse(body)
    if isinstance(data, dict):
        return str(data.get("message") or data)
    return str(data if data is not None else body)[:500]


def _number(headers: Any, name: str) -> float | None:
    try:
        value = headers.get(name) if headers is not None else None
        return float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def classify(exc: Exception) -> DeliveryError | None:
    """Map what the SDK raised to retryable or permanent; None for anything unexpected.

    The connector handles 429 itself (it also pauses its limiter); here 429 is the fallback.
    """
    status = getattr(exc, "status", None)
    if isinstance(status, int) and hasattr(exc, "body"):
        # Every API package has its own ApiException class: recognise them by attributes.
        message = f"HubSpot {status}: {_message(exc.body)}"
        if status == 429:
            wait = _number(getattr(exc, "headers", None), "Retry-After")
            return RetryableDelivery(message, retry_after=wait or RATE_WINDOW_SECONDS)
        if status >= 500:
            return RetryableDelivery(message)
        if status == 401:
            # A revoked or mistyped token: keep the delivery and wait for a fixed config.
            return AuthenticationFailed(message, retry_after=AUTH_PAUSE_SECONDS)
        body = _parse(exc.body)
        return PermanentDelivery(
            message,
            detail={"status": status, "body": body if body is not None else _message(exc.body)},
        )
    if isinstance(exc, (urllib3.exceptions.HTTPError, OSError, TimeoutError)):
        return RetryableDelivery(f"HubSpot unreachable: {type(exc).__name__}: {exc}")
    return None


def _invalid_properties(detail: Any) -> set[str]:
    """Property names a 400 VALIDATION_ERROR body blames, from `errors` or the message text."""
    body = detail.get("body") if isinstance(detail, dict) else None
    if not isinstance(body, dict):
        return set()
    names: set[str] = set()
    for error in body.get("errors") or []:
        context = error.get("context") if isinstance(error, dict) else None
        if isinstance(context, dict):
            names.update(str(n) for n in context.get("propertyName") or [])
    # "Property values were not valid: [{...,"name":"x"}]": the list is JSON text.
    message = str(body.get("message") or "")
    if not names and ": [" in message:
        listed = _parse(message[message.index(": [") + 2 :])
        if isinstance(listed, list):
            names.update(str(e["name"]) for e in listed if isinstance(e, dict) and "name" in e)
    return names


@dataclass
class _Input:
    """One contact of a batch: the merged properties of every input naming it."""

    id_property: str
    key: str  # how HubSpot compares the id: emails lower-cased
    id_value: str
    properties: dict[str, str]
    positions: list[int] = field(default_factory=list)
    detail: dict[str, Any] = field(default_factory=dict)  # added to its result's detail
    policies: dict[str, WritePolicy] = field(default_factory=dict)
    create: bool = True  # False: update an existing contact only
    # The contact as HubSpot holds it (the values of the properties read), once read; None
    # when it was not read or does not exist.
    current: dict[str, Any] | None = None

    def guarded(self) -> list[str]:
        """Properties whose write policy needs the contact's current value."""
        return [k for k, p in self.policies.items() if p.mode != "always" and k in self.properties]

    @property
    def may_demote(self) -> bool:
        """The rule wrote `lifecyclestage` with an explicit `always`: a backward stage is set."""
        policy = self.policies.get("lifecyclestage")
        return policy is not None and policy.mode == "always"


def _reads(item: _Input) -> list[str]:
    """The properties of the contact to read before writing `item`; empty: no read needed.
    An update-only write reads too (its id property), to know whether the contact exists."""
    names = item.guarded()
    if "lifecyclestage" in item.properties:
        names.append("lifecyclestage")
    if not names and not item.create:
        names.append(item.id_property)
    return names


def _key(id_property: str, value: str) -> str:
    return value.strip().lower() if id_property == "email" else value


def _inputs(
    leads: list[tuple[int, LeadUpsert, dict[str, str]]], implicit: dict[str, WritePolicy]
) -> list[_Input]:
    """One input per contact, in first-seen order.

    HubSpot refuses a batch that names a contact twice. The caller sends one input per contact;
    if it does not, the duplicates are merged in order (later fields win, as two upserts in a
    row would leave them, but monotonic fields never move back) and every one of them gets the
    merged write's outcome. A field the rule gave no policy gets its `implicit` one first (the
    forward-only lifecyclestage): without it the later, lower stage would win the merge.
    """
    merged: dict[tuple[str, str], tuple[_Input, LeadUpsert]] = {}
    for position, lead, coerced in leads:
        id_property = lead.id_property or "email"
        key = _key(id_property, lead.id_value)
        extra = {k: p for k, p in implicit.items() if k in coerced and k not in lead.policies}
        written = lead.model_copy(
            update={"fields": coerced, "policies": {**lead.policies, **extra}}
        )
        if (id_property, key) in merged:
            item, earlier = merged[(id_property, key)]
            written = combine(earlier, written)
        else:
            item = _Input(id_property, key, lead.id_value, {}, [])
        merged[(id_property, key)] = (item, written)
        item.positions.append(position)
    items = []
    for item, lead in merged.values():
        item.properties = {k: str(v) for k, v in lead.fields.items()}
        if item.id_property == "email":
            item.properties.setdefault("email", lead.id_value)
        item.policies, item.create = dict(lead.policies), lead.create
        items.append(item)
    return items


def _split(items: list[_Input], refusal: PermanentDelivery) -> list[list[_Input]]:
    """Two smaller batches, so that the records HubSpot refused end up alone."""
    blamed = _invalid_properties(refusal.detail)
    suspects = [i for i in items if blamed & i.properties.keys()]
    if 0 < len(suspects) < len(items):
        # The inputs without the blamed property most likely pass together in one call.
        return [[i for i in items if i not in suspects], suspects]
    half = len(items) // 2
    return [items[:half], items[half:]]


def _token(key: str) -> str:
    """`crm-bridge:KEY`, safe inside an HTML comment (which "--" would end)."""
    return "crm-bridge:" + html.escape(key).replace("--", "-&#45;")


def _carries(body: str, key: str) -> bool:
    """Whether an activity body carries the key's marker (not a longer key's)."""
    return re.search(re.escape(_token(key)) + r"(?=\s|-->|$)", body) is not None


def _html(text: str) -> str:
    return html.escape(text).replace("\r\n", "\n").replace("\n", "<br>")


def _timestamp(epoch_seconds: float) -> str:
    """hs_timestamp as ISO 8601 UTC with milliseconds (HubSpot also takes epoch ms)."""
    when = datetime.fromtimestamp(epoch_seconds, UTC)
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _activity_properties(activity: Activity) -> dict[str, str]:
    """The note's or task's properties; the body ends with the key's marker."""
    marker = f"<!-- {_token(activity.key)} -->"
    properties = {"hs_timestamp": _timestamp(activity.occurred_at)}
    if activity.kind == "note":

        def note(body: str) -> str:
            text = f"<p><strong>{_html(activity.subject)}</strong></p>"
            return text + (f"<p>{_html(body)}</p>" if body else "") + marker

        properties["hs_note_body"] = fit_text(activity.body, note, BODY_MAX)
    else:

        def task(body: str) -> str:
            return (f"<p>{_html(body)}</p>" if body else "") + marker

        properties["hs_task_subject"] = activity.subject
        properties["hs_task_body"] = fit_text(activity.body, task, BODY_MAX)
        properties["hs_task_status"] = "COMPLETED"
    return properties


def _maybe_written(exc: DeliveryError) -> bool:
    """Whether a failed write may have landed: no answer, or a 5xx. A 401, 403 or 429 is
    HubSpot refusing the request before any write; a permanent error, a refused record."""
    if not isinstance(exc, RetryableDelivery):
        return False
    status = getattr(exc.__cause__, "status", None)
    return exc.__cause__ is not None and not (isinstance(status, int) and status < 500)


def _existing_id(refusal: PermanentDelivery) -> str | None:
    """The contact a 409 "Contact already exists. Existing ID: <id>" names, or None."""
    detail = refusal.detail if isinstance(refusal.detail, dict) else {}
    if detail.get("status") != 409:
        return None
    match = EXISTING_ID_RE.search(str(refusal))
    return match.group(1) if match else None


def _association_refused(exc: PermanentDelivery) -> bool:
    """A 400 about an association: one of the contacts a batch names may be gone (deleted,
    merged away)."""
    detail = exc.detail if isinstance(exc.detail, dict) else {}
    return detail.get("status") == 400 and "association" in str(exc).lower()


def _contact(item: _Pending) -> str:
    """The contact an activity goes to, once located."""
    assert item.contact_id is not None
    return item.contact_id


def _stage_behind(stages: tuple[str, ...], current: Any, requested: Any) -> bool:
    """Whether `requested` is an earlier lifecycle stage than `current` (HubSpot ignores it)."""
    if current in (None, "") or current not in stages or requested not in stages:
        return False
    return stages.index(requested) < stages.index(current)


def _misconfigured(exc: PermanentDelivery, what: str) -> Misconfigured | None:
    """A metadata call's 404 or 403 as the configuration problem it is, else None."""
    detail = exc.detail if isinstance(exc.detail, dict) else {}
    status = detail.get("status")
    if status not in MISCONFIGURED_STATUSES:
        return None
    why = (
        "no such API at base_url"
        if status == 404
        else "the token lacks a scope it needs (HubSpot: private app scopes)"
    )
    return Misconfigured(
        f"HubSpot {what} answered {status}: {why}: {exc}", retry_after=AUTH_PAUSE_SECONDS
    )


@dataclass(frozen=True)
class _Contact:
    """A contact a batch read found: its id and the values of the properties read."""

    id: str
    values: dict[str, Any]


@dataclass
class _Pending:
    """One activity of a batch on its way to HubSpot."""

    position: int
    activity: Activity
    kind: _Engagement
    properties: dict[str, str]
    contact_id: str | None  # the hint until HubSpot refuses it, else the one found by email
    # The contact came from a hint: if HubSpot says it is gone, look for it by its email.
    hinted: bool
    look: bool  # look for an earlier write of it before creating

    @property
    def trace_id(self) -> str:
        """Sent as objectWriteTraceId: HubSpot's results come back in any order."""
        return str(self.position)

    def missing(self) -> DeliveryResult:
        activity = self.activity
        return DeliveryResult(
            skipped=(
                f"no contact with {activity.id_property or 'email'} {activity.id_value!r} "
                f"to log the {activity.kind} on"
            ),
            missing=True,
        )


class HubSpotConnector(Connector):
    """Contacts in one HubSpot portal. A "lead" is a contact here, as in HubSpot's own CRM."""

    name = "hubspot"
    config_model = HubSpotConfig
    config: HubSpotConfig
    max_batch = 100
    max_activity_batch = BATCH_READ
    limiter: RateLimiter

    def __init__(self, instance: str, config: HubSpotConfig) -> None:
        super().__init__(instance, config)
        # Half a second covers the trip of a batch call before HubSpot counts it.
        self.limiter = RateLimiter(config.requests_per_window(), RATE_WINDOW_SECONDS, margin=0.5)
        self._unsure: dict[str, None] = {}  # insertion-ordered set (UNSURE_KEYS_MAX)
        # What the limiter's current pause is (kind, reason), for `pauses`.
        self._pause: tuple[Literal["rate_limit", "daily_allocation"], str] = ("rate_limit", "")
        # The portal's contact properties and when they were loaded (time.monotonic).
        self._definitions: dict[str, _PropertyDef] = {}
        self._definitions_at: float | None = None
        self._definitions_lock = asyncio.Lock()
        self._other_definitions: dict[str, dict[str, FieldInfo]] = {}  # notes, tasks, leads
        self._lead_definitions: dict[str, _PropertyDef] | None = None
        # OAuth: the access token, when to renew it (time.monotonic), the refresh token.
        self._token: str | None = None
        self._token_renew_at = 0.0
        self._token_lock = asyncio.Lock()
        self._refresh_token = (
            config.oauth.refresh_token.get_secret_value() if config.oauth is not None else None
        )
        self._apis: list[Any] = []

    async def open(self) -> None:
        import hubspot.crm.objects.notes as notes
        import hubspot.crm.objects.tasks as tasks
        from hubspot import HubSpot

        assert self.config.access_token is not None or self.config.oauth is not None
        self.forget_schema()  # the portal's definitions are read again before the next write
        client = HubSpot(
            access_token=(
                self.config.access_token.get_secret_value() if self.config.access_token else None
            ),
            host=self.config.base_url.rstrip("/"),
            retry=False,
            ssl_ca_cert=str(self.config.ca_bundle) if self.config.ca_bundle else None,
            connection_pool_maxsize=self.config.max_concurrency,
        )
        # Each attribute access builds a new API object with a new pool: build it once.
        self._batch = client.crm.contacts.batch_api
        self._properties = client.crm.properties.core_api
        self._contacts = client.crm.contacts.basic_api
        self._associations = client.crm.associations.v4.basic_api
        self._association_batch = client.crm.associations.v4.batch_api
        self._leads = client.crm.objects.leads.basic_api
        # Per object type: (batch API, the package of its models).
        self._engagements: dict[str, tuple[Any, Any]] = {
            "notes": (client.crm.objects.notes.batch_api, notes),
            "tasks": (client.crm.objects.tasks.batch_api, tasks),
        }
        self._oauth = client.oauth.tokens_api
        # Every API object that carries the bearer token (OAuth renewals rewrite it).
        self._apis = [
            self._batch,
            self._properties,
            self._contacts,
            self._associations,
            self._association_batch,
            self._leads,
            *(batch for batch, _models in self._engagements.values()),
        ]
        # No other host, no redirects (connectors/outbound.py).
        guard_sdk_apis([*self._apis, self._oauth], self.config.base_url)
        if self._token is not None:
            self._set_token(self._token)

    def forget_schema(self) -> None:
        self._definitions_at = None
        self._other_definitions = {}
        self._lead_definitions = None

    def implicit_policies(self) -> dict[str, WritePolicy]:
        """lifecyclestage moves forward only (HubSpot ignores a backward write), unless
        `lifecycle_demotion` lets a write move it back."""
        if self.config.lifecycle_demotion:
            return {}
        return {"lifecyclestage": WritePolicy(mode="monotonic", order=self._stage_order())}

    def _stage_order(self) -> tuple[str, ...]:
        """The portal's lifecycle stages in display order once read, else HubSpot's defaults."""
        definition = self._definitions.get("lifecyclestage")
        if definition is None or not definition.options:
            return DEFAULT_STAGES
        return definition.options

    def pauses(self) -> list[Pause]:
        paused = self.limiter.paused_for()
        if paused <= 0:
            return []
        kind, reason = self._pause
        return [Pause(kind=kind, reason=reason or "HubSpot rate limit", until=time.time() + paused)]

    async def upsert_lead(self, lead: LeadUpsert) -> DeliveryResult:
        (outcome,) = await self.upsert_leads([lead])
        if isinstance(outcome, DeliveryError):
            raise outcome
        return outcome

    async def upsert_leads(self, leads: list[LeadUpsert]) -> list[Outcome]:
        """One batch upsert per 100 contacts; outcomes per input, in input order.

        A record HubSpot refuses gets a PermanentDelivery (RetryableDelivery when the error's
        category says it may pass later) with HubSpot's message; the others their result.
        A failure of a whole call (429, 5xx, network, 401/403) raises when no record has an
        outcome yet; after some have landed it becomes the outcome of the records left.
        """

        async def send(outcomes: Outcomes) -> None:
            ready = await self._check(leads, outcomes)
            items = await self._policies(_inputs(ready, self.implicit_policies()), outcomes)
            items = await self._lifecycle(items, outcomes)
            by_property: dict[str, list[_Input]] = {}
            for item in items:
                by_property.setdefault(item.id_property, []).append(item)
            try:
                for items in by_property.values():
                    for start in range(0, len(items), self.max_batch):
                        await self._write(items[start : start + self.max_batch], outcomes)
            finally:
                # The contacts that landed get their Lead even when a later call fails: their
                # deliveries end done and would not come back for it.
                await self._open_leads(leads, outcomes)

        return await per_record(len(leads), "HubSpot", send)

    # -- properties ------------------------------------------------------------------------------
    async def _check(
        self, leads: list[LeadUpsert], outcomes: Outcomes
    ) -> list[tuple[int, LeadUpsert, dict[str, str]]]:
        """Each lead's fields checked and coerced against the portal's definitions; a lead with
        a field they refuse gets its PermanentDelivery now and is not sent."""
        ready: list[tuple[int, LeadUpsert, dict[str, str]]] = []
        if any(lead.fields for lead in leads):
            definitions = await self._contact_properties()
        for position, lead in enumerate(leads):
            if not lead.fields:
                ready.append((position, lead, {}))
                continue
            coerced, problems = _coerce_fields(definitions, lead.fields)
            if problems and not self.config.validate_properties:
                # HubSpot judges: what could not be coerced goes as it was given.
                for problem in problems:
                    name = problem.detail["field"]
                    coerced[name] = _property_value(lead.fields[name])
                coerced = {name: coerced[name] for name in lead.fields}  # the caller's order
                problems = []
            if problems and self._definitions_stale(PROPERTY_RECHECK_SECONDS):
                # The portal may have gained the property or option since they were loaded.
                definitions = await self._contact_properties(reload=True)
                coerced, problems = _coerce_fields(definitions, lead.fields)
            if problems:
                message = "; ".join(str(p) for p in problems)
                outcomes[position] = PermanentDelivery(
                    message, detail={"invalid_fields": [p.detail for p in problems]}
                )
                continue
            ready.append((position, lead, coerced))
        return ready

    def _definitions_stale(self, age: float) -> bool:
        loaded = self._definitions_at
        return loaded is None or time.monotonic() - loaded >= age

    async def _contact_properties(self, reload: bool = False) -> dict[str, _PropertyDef]:
        """The portal's contact property definitions, from the cache unless it is too old."""
        async with self._definitions_lock:
            if reload or self._definitions_stale(self.config.property_cache_seconds):
                started = time.monotonic()
                self._definitions = await self._property_defs("contacts")
                self._definitions_at = started
            return self._definitions

    async def _property_defs(self, object_type: str) -> dict[str, _PropertyDef]:
        """GET /crm/v3/properties/{object_type}; a 404 or 403 is the set-up's, not a record's."""
        try:
            response = await self._send(
                self._properties.get_all_with_http_info, object_type=object_type, archived=False
            )
        except PermanentDelivery as exc:
            misconfigured = _misconfigured(exc, f"GET /crm/v3/properties/{object_type}")
            if misconfigured is None:
                raise
            raise misconfigured from exc
        return {d.name: d for d in map(_PropertyDef.of, response.results or [])}

    async def describe(self, object: str, reload: bool = False) -> dict[str, FieldInfo]:
        object_type = HUBSPOT_OBJECTS.get(object, object)
        if object_type == "contacts":
            return {n: d.info() for n, d in (await self._contact_properties(reload)).items()}
        cached = self._other_definitions.get(object_type)
        if cached is None or reload:
            definitions = await self._property_defs(object_type)
            cached = {name: d.info() for name, d in definitions.items()}
            self._other_definitions[object_type] = cached
        return cached

    # -- the Leads object ------------------------------------------------------------------------
    async def _open_leads(self, leads: list[LeadUpsert], outcomes: Outcomes) -> None:
        """For the written contacts whose rule asks for it, a HubSpot Lead associated with the
        contact, unless the contact has one already (so a repeated delivery opens none)."""
        wanted: dict[str, tuple[list[int], dict[str, Any]]] = {}
        for position, lead in enumerate(leads):
            outcome = outcomes[position]
            if lead.hubspot_lead is None or not isinstance(outcome, DeliveryResult):
                continue
            if outcome.record_id is None or outcome.skipped is not None:
                continue
            positions, _ = wanted.setdefault(outcome.record_id, ([], lead.hubspot_lead))
            positions.append(position)
        for contact_id, (positions, properties) in wanted.items():
            try:
                detail = await self._open_lead(contact_id, properties, leads[positions[0]])
            except DeliveryError as exc:
                # The contact is written; the retry writes it again (harmlessly) and looks
                # for the lead before opening one.
                for position in positions:
                    outcomes[position] = exc
                continue
            for position in positions:
                done = outcomes[position]
                assert isinstance(done, DeliveryResult)
                outcomes[position] = done.model_copy(
                    update={"detail": {**done.detail, "hubspot_lead": detail}}
                )

    async def _open_lead(
        self, contact_id: str, wanted: dict[str, Any], lead: LeadUpsert
    ) -> dict[str, Any]:
        from hubspot.crm.objects import leads as models

        page = await self._send(
            self._associations.get_page_with_http_info,
            object_type="contacts",
            object_id=contact_id,
            to_object_type="leads",
            limit=1,
        )
        if page.results:
            return {"id": str(page.results[0].to_object_id), "created": False}
        definitions = await self._lead_properties()
        properties, problems = _coerce_fields(definitions, wanted)
        if problems:
            raise PermanentDelivery(
                "HubSpot Lead: " + "; ".join(str(p) for p in problems),
                detail={"invalid_fields": [p.detail for p in problems]},
            )
        if not properties.get("hs_lead_name"):
            first, last = lead.fields.get("firstname"), lead.fields.get("lastname")
            properties["hs_lead_name"] = " ".join(str(n) for n in (first, last) if n) or (
                lead.id_value
            )
        spec = models.AssociationSpec(
            association_category="HUBSPOT_DEFINED",
            association_type_id=self.config.lead_association_type,
        )
        body = models.SimplePublicObjectInputForCreate(
            properties=properties,
            associations=[
                models.PublicAssociationsForObject(
                    to=models.PublicObjectId(id=contact_id), types=[spec]
                )
            ],
        )
        try:
            record = await self._send(
                self._leads.create_with_http_info, simple_public_object_input_for_create=body
            )
        except DeliveryError as exc:
            if not _maybe_written(exc):
                raise
            # It may land later: give it time before the next attempt looks for it.
            raise RetryableDelivery(
                f"{exc} (the lead may have been opened: the next attempt looks for it first)",
                retry_after=max(
                    self.config.activity_settle_seconds, getattr(exc, "retry_after", None) or 0.0
                ),
            ) from exc
        return {"id": str(record.id), "created": True}

    async def _lead_properties(self) -> dict[str, _PropertyDef]:
        if self._lead_definitions is None:
            self._lead_definitions = await self._property_defs("leads")
        return self._lead_definitions

    # -- write policies --------------------------------------------------------------------------
    async def current(self, lead: LeadUpsert, names: list[str]) -> dict[str, Any] | None:
        id_property = lead.id_property or "email"
        found = await self._read_contacts(id_property, [lead.id_value], names)
        record = found.get(_key(id_property, lead.id_value))
        return record.values if record is not None else None

    async def _read_contacts(
        self, id_property: str, values: list[str], names: list[str]
    ) -> dict[str, _Contact]:
        """Contacts by id property value (its key), with `names`; missing ones are absent.
        One batch read per 100 values: HubSpot answers 207 naming the ones it does not have."""
        from hubspot.crm.contacts import BatchReadInputSimplePublicObjectId, SimplePublicObjectId

        found: dict[str, _Contact] = {}
        # Once per contact: HubSpot compares emails in any case.
        values = list({_key(id_property, v): v for v in values}.values())
        for start in range(0, len(values), BATCH_READ):
            body = BatchReadInputSimplePublicObjectId(
                # The id property too: the results come back keyed by it, in any order.
                properties=list(dict.fromkeys([*names, id_property])),
                properties_with_history=[],
                id_property=None if id_property == "hs_object_id" else id_property,
                inputs=[SimplePublicObjectId(id=v) for v in values[start : start + BATCH_READ]],
            )
            # Contacts HubSpot does not have make it a 207 with errors: the others still count.
            response = await self._send(
                self._batch.read_with_http_info,
                batch_read_input_simple_public_object_id=body,
                archived=False,
            )
            for record in response.results or []:
                properties = record.properties or {}
                value = record.id if id_property == "hs_object_id" else properties.get(id_property)
                if value is not None:
                    values_read = {n: properties.get(n) for n in names}
                    found[_key(id_property, str(value))] = _Contact(str(record.id), values_read)
        return found

    async def _policies(self, items: list[_Input], outcomes: Outcomes) -> list[_Input]:
        """Apply write policies and `create: false`: the contacts that need it (and those
        writing lifecyclestage, which only moves forward) are read first, one batch read per
        100; held-back properties are left out and noted in the result. Returns the inputs
        still to write; the others have their outcome."""
        needy = [i for i in items if _reads(i)]
        by_property: dict[str, list[_Input]] = {}
        for item in needy:
            by_property.setdefault(item.id_property, []).append(item)
        current: dict[tuple[str, str], dict[str, Any]] = {}
        for id_property, group in by_property.items():
            names = sorted({n for i in group for n in _reads(i)})
            found = await self._read_contacts(id_property, [i.id_value for i in group], names)
            current.update({(id_property, k): c.values for k, c in found.items()})
        stages = self._stage_order()
        kept: list[_Input] = []
        for item in items:
            if item not in needy:
                kept.append(item)
                continue
            record = current.get((item.id_property, item.key))
            if record is None and not item.create:
                reason = (
                    f"no contact with {item.id_property} {item.id_value!r} to update, "
                    "and the rule does not create one"
                )
                self._settle(item, DeliveryResult(skipped=reason, missing=True), outcomes)
                continue
            item.current = record
            probe = LeadUpsert(
                id_value=item.id_value, fields=item.properties, policies=item.policies
            )
            properties, held = apply_policies(probe, record)
            stage, now = item.properties.get("lifecyclestage"), (record or {}).get("lifecyclestage")
            if "lifecyclestage" in held and _stage_behind(stages, now, stage):
                item.detail["lifecyclestage_skipped"] = {"current": now, "requested": stage}
            item.properties = {k: str(v) for k, v in properties.items()}
            if held:
                item.detail["held_back"] = held
            kept.append(item)
        return kept

    # -- lifecycle stage ---------------------------------------------------------------------------
    async def _lifecycle(self, items: list[_Input], outcomes: Outcomes) -> list[_Input]:
        """Backward lifecyclestage values (against the stage `_policies` read) left out and
        noted, or, with demotion, cleared first (HubSpot takes a lower stage only after "")."""
        stages = self._stage_order()
        kept: list[_Input] = []
        for item in items:
            stage = item.properties.get("lifecyclestage")
            current = (item.current or {}).get("lifecyclestage") or None
            if not stage or not _stage_behind(stages, current, stage):
                kept.append(item)
                continue
            if not (self.config.lifecycle_demotion or item.may_demote):
                # HubSpot would ignore it: do not send it, and say so.
                del item.properties["lifecyclestage"]
                item.detail["lifecyclestage_skipped"] = {"current": current, "requested": stage}
                kept.append(item)
                continue
            try:
                await self._send(
                    self._contacts.update_with_http_info,
                    contact_id=item.id_value,
                    id_property=None if item.id_property == "hs_object_id" else item.id_property,
                    simple_public_object_input=self._contact_input({"lifecyclestage": ""}),
                )
            except PermanentDelivery as refusal:
                self._settle(item, refusal, outcomes)
                continue
            item.detail["lifecyclestage_demoted"] = {"from": current, "to": stage}
            kept.append(item)
        return kept

    @staticmethod
    def _contact_input(properties: dict[str, str]) -> Any:
        from hubspot.crm.contacts import SimplePublicObjectInput

        return SimplePublicObjectInput(properties=properties)

    # -- writes ------------------------------------------------------------------------------------
    async def _write(self, items: list[_Input], outcomes: Outcomes) -> None:
        try:
            response = await self._upsert(items)
        except PermanentDelivery as refusal:
            if (refusal.detail or {}).get("status") not in PER_RECORD_STATUSES:
                raise  # not about a record (403 scopes, 404 route): the whole call failed
            if len(items) == 1:
                existing = _existing_id(refusal)
                if existing is not None:
                    await self._update_existing(items[0], existing, outcomes)
                    return
                blamed = _invalid_properties(refusal.detail) & items[0].properties.keys()
                if blamed and self.config.validate_properties:
                    # The portal refused what the cached definitions allowed: they are old.
                    self._definitions_at = None
                self._settle(items[0], refusal, outcomes)
                return
            # HubSpot refuses the whole batch for one bad input: find it, let the rest land.
            for part in _split(items, refusal):
                await self._write(part, outcomes)
            return
        self._map_results(items, response, outcomes)

    async def _update_existing(self, item: _Input, contact_id: str, outcomes: Outcomes) -> None:
        """A create HubSpot refused with 409 "already exists": update the contact it names."""
        properties = dict(item.properties)
        if item.id_property != "hs_object_id":
            properties.setdefault(item.id_property, item.id_value)
        try:
            await self._send(
                self._contacts.update_with_http_info,
                contact_id=contact_id,
                simple_public_object_input=self._contact_input(properties),
            )
        except PermanentDelivery as refusal:
            self._settle(item, refusal, outcomes)
            return
        detail = {**item.detail, "resolved_conflict": contact_id}
        result = DeliveryResult(record_id=contact_id, created=False, detail=detail)
        self._settle(item, result, outcomes)

    @staticmethod
    def _settle(item: _Input, outcome: Outcome, outcomes: Outcomes) -> None:
        for position in item.positions:
            outcomes[position] = outcome

    def _map_results(self, items: list[_Input], response: Any, outcomes: Outcomes) -> None:
        """Results by id (HubSpot's order is not the input's), errors by the ids they name."""
        id_property = items[0].id_property  # one batch, one id property
        by_key = {i.key: i for i in items}
        for record in getattr(response, "results", None) or []:
            properties = getattr(record, "properties", None) or {}
            value = record.id if id_property == "hs_object_id" else properties.get(id_property)
            item = by_key.get(_key(id_property, str(value))) if value is not None else None
            if item is None and len(items) == 1:
                item = items[0]
            if item is not None:
                result = DeliveryResult(
                    record_id=record.id, created=getattr(record, "new", None), detail=item.detail
                )
                self._settle(item, result, outcomes)
        for error in getattr(response, "errors", None) or []:
            context = getattr(error, "context", None) or {}
            named = {_key(id_property, str(v)) for values in context.values() for v in values or []}
            text = f"HubSpot refused the record: {error.message}"
            failure: DeliveryError
            if getattr(error, "category", None) in RETRYABLE_CATEGORIES:
                failure = RetryableDelivery(text)
            else:
                failure = PermanentDelivery(text, detail={"errors": [error.to_dict()]})
            for key in named & by_key.keys():
                self._settle(by_key[key], failure, outcomes)

    # -- activities --------------------------------------------------------------------------------
    async def log_activity(self, activity: Activity) -> DeliveryResult:
        """A note or a completed task on the contact, once whatever the attempt."""
        (outcome,) = await self.log_activities([activity])
        if isinstance(outcome, DeliveryError):
            raise outcome
        return outcome

    async def log_activities(self, activities: list[Activity]) -> list[Outcome]:
        """Notes and completed tasks on their contacts, each once whatever the attempt: one
        batch read finds the contacts that come without a hint, one batch create per kind and
        100 writes them. Outcomes per activity, in order, as `upsert_leads`.

        A result's `record_id` is the contact's id (the store remembers it for the contact's
        next deliveries); the note's or task's id is in `detail["activity_id"]`. No contact to
        log on: `DeliveryResult(skipped=..., missing=True)`.
        """

        async def send(outcomes: Outcomes) -> None:
            pending = [self._pending(i, a) for i, a in enumerate(activities)]
            await self._log(pending, outcomes, fall_back=True)

        return await per_record(len(activities), "HubSpot", send)

    def _pending(self, position: int, activity: Activity) -> _Pending:
        return _Pending(
            position=position,
            activity=activity,
            kind=ENGAGEMENTS[activity.kind],
            properties=_activity_properties(activity),
            contact_id=activity.record_id,
            hinted=activity.record_id is not None,
            # Look before creating on a redelivery, or after a create whose answer never came.
            look=activity.attempt > 1 or activity.key in self._unsure,
        )

    async def _log(self, pending: list[_Pending], outcomes: Outcomes, fall_back: bool) -> None:
        """Find the contacts, look for earlier writes where needed, create the rest; then once
        more, by their id property, for those whose hinted contact HubSpot says is gone."""
        pending = await self._locate(pending, outcomes)
        pending = await self._find_logged(pending, outcomes)
        gone: list[_Pending] = []
        for kind in ENGAGEMENTS.values():
            of_kind = [p for p in pending if p.kind is kind]
            for start in range(0, len(of_kind), self.max_activity_batch):
                chunk = of_kind[start : start + self.max_activity_batch]
                gone.extend(await self._create(chunk, outcomes, check=True))
        again = [p for p in gone if fall_back and p.hinted]
        for item in gone:
            if item not in again:
                outcomes[item.position] = item.missing()
        if again:
            for item in again:
                item.contact_id, item.hinted = None, False
            await self._log(again, outcomes, fall_back=False)

    async def _locate(self, pending: list[_Pending], outcomes: Outcomes) -> list[_Pending]:
        """The contact of each activity that has none yet, by its id property (one batch read
        per 100); those HubSpot does not have get their `missing` result. Returns the rest."""
        by_property: dict[str, list[_Pending]] = {}
        for item in pending:
            if item.contact_id is not None:
                continue
            id_property = item.activity.id_property or "email"
            if id_property == "hs_object_id":
                item.contact_id = item.activity.id_value  # the contact's id itself
            else:
                by_property.setdefault(id_property, []).append(item)
        for id_property, group in by_property.items():
            values = [item.activity.id_value for item in group]
            found = await self._read_contacts(id_property, values, [])
            for item in group:
                contact = found.get(_key(id_property, item.activity.id_value))
                if contact is None:
                    outcomes[item.position] = item.missing()
                else:
                    item.contact_id = contact.id
        return [item for item in pending if item.contact_id is not None]

    async def _find_logged(self, pending: list[_Pending], outcomes: Outcomes) -> list[_Pending]:
        """The activities that must look and whose key a note or task of their contact carries
        get that one as their result (nothing is created). Returns the others."""
        lookers = [item for item in pending if item.look]
        found: dict[int, str] = {}  # position -> the note's or task's id
        for kind in ENGAGEMENTS.values():
            of_kind = [item for item in lookers if item.kind is kind]
            if of_kind:
                linked = await self._linked(kind, {_contact(item) for item in of_kind})
                found.update(await self._carrying(kind, of_kind, linked))
        for item in lookers:
            if item.position in found:
                self._unsure.pop(item.activity.key, None)
                detail = {
                    "object_type": item.kind.object_type,
                    "activity_id": found[item.position],
                    "found_existing": True,
                }
                outcomes[item.position] = DeliveryResult(
                    record_id=item.contact_id, created=False, detail=detail
                )
        return [item for item in pending if item.position not in found]

    async def _linked(self, kind: _Engagement, contact_ids: set[str]) -> dict[str, set[str]]:
        """The ids of each contact's notes or tasks: v4 batch association reads, 100 contacts
        a call, again with `after` for a contact whose list has more pages."""
        from hubspot.crm.associations.v4 import (
            BatchInputPublicFetchAssociationsBatchRequest,
            PublicFetchAssociationsBatchRequest,
        )

        linked: dict[str, set[str]] = {c: set() for c in contact_ids}
        todo: list[tuple[str, str | None]] = [(c, None) for c in sorted(contact_ids)]
        while todo:
            chunk, todo = todo[:BATCH_READ], todo[BATCH_READ:]
            body = BatchInputPublicFetchAssociationsBatchRequest(
                inputs=[PublicFetchAssociationsBatchRequest(id=c, after=a) for c, a in chunk]
            )
            # A contact without any (or one that is gone) makes it a 207 naming it: none there.
            response = await self._send(
                self._association_batch.get_page_with_http_info,
                from_object_type="contacts",
                to_object_type=kind.object_type,
                batch_input_public_fetch_associations_batch_request=body,
            )
            for result in response.results or []:
                contact = str(result._from.id)
                linked.setdefault(contact, set()).update(
                    str(to.to_object_id) for to in result.to or []
                )
                paging = result.paging
                if paging is not None and paging.next is not None and paging.next.after:
                    todo.append((contact, str(paging.next.after)))
        return linked

    async def _carrying(
        self, kind: _Engagement, lookers: list[_Pending], linked: dict[str, set[str]]
    ) -> dict[int, str]:
        """For each looker, the id of its contact's note or task whose body carries its key.
        The bodies are read newest first (HubSpot's ids grow over time, and the ones sought
        were written lately), 100 a call, until every key is found or no id is left."""
        ids = sorted(
            {i for item in lookers for i in linked.get(_contact(item), set())},
            key=lambda i: (len(i), i),
            reverse=True,
        )
        wanted = {item.position: item for item in lookers}
        found: dict[int, str] = {}
        batch, models = self._engagements[kind.object_type]
        for start in range(0, len(ids), BATCH_READ):
            if not wanted:
                break
            body = models.BatchReadInputSimplePublicObjectId(
                properties=[kind.body_property],
                properties_with_history=[],
                inputs=[models.SimplePublicObjectId(id=i) for i in ids[start : start + BATCH_READ]],
            )
            # Ids deleted since the listing make it a 207 with errors: the others still count.
            response = await self._send(
                batch.read_with_http_info,
                batch_read_input_simple_public_object_id=body,
                archived=False,
            )
            for record in response.results or []:
                text = (record.properties or {}).get(kind.body_property) or ""
                for position, item in list(wanted.items()):
                    mine = str(record.id) in linked.get(_contact(item), set())
                    if mine and _carries(text, item.activity.key):
                        found[position] = str(record.id)
                        del wanted[position]
        return found

    async def _create(
        self, chunk: list[_Pending], outcomes: Outcomes, check: bool
    ) -> list[_Pending]:
        """One batch create of notes or tasks (one kind), each with its association to its
        contact. Returns the activities whose contact HubSpot says is gone (`check`: it refused
        the batch over an association, and a batch read by id shows which)."""
        kind = chunk[0].kind
        batch, models = self._engagements[kind.object_type]
        spec = models.AssociationSpec(
            association_category="HUBSPOT_DEFINED", association_type_id=kind.to_contact
        )
        body = models.BatchInputSimplePublicObjectBatchInputForCreate(
            inputs=[
                models.SimplePublicObjectBatchInputForCreate(
                    properties=item.properties,
                    associations=[
                        models.PublicAssociationsForObject(
                            to=models.PublicObjectId(id=item.contact_id), types=[spec]
                        )
                    ],
                    object_write_trace_id=item.trace_id,
                )
                for item in chunk
            ]
        )
        # Until HubSpot answers, the writes may land without us hearing of it.
        for item in chunk:
            self._mark_unsure(item.activity.key)
        try:
            response = await self._send(
                batch.create_with_http_info,
                batch_input_simple_public_object_batch_input_for_create=body,
            )
        except PermanentDelivery as refusal:
            for item in chunk:  # refused: nothing was written
                self._unsure.pop(item.activity.key, None)
            return await self._refused(chunk, refusal, outcomes, check)
        except DeliveryError as exc:
            if not _maybe_written(exc):
                for item in chunk:
                    self._unsure.pop(item.activity.key, None)
                raise
            # Not again at once: give a write still in progress time to land, then look.
            settle = self.config.activity_settle_seconds
            raise RetryableDelivery(
                f"{exc} (the {kind.object_type} may have been written: the next attempt "
                "looks for them first)",
                retry_after=max(settle, getattr(exc, "retry_after", None) or 0.0),
            ) from exc
        self._map_created(chunk, response, outcomes)
        return []

    async def _refused(
        self, chunk: list[_Pending], refusal: PermanentDelivery, outcomes: Outcomes, check: bool
    ) -> list[_Pending]:
        """A batch create HubSpot refused whole: the gone contacts' activities are returned,
        the rest sent again; else the batch is split until the refused input stands alone."""
        if check and _association_refused(refusal):
            gone_ids = await self._gone({_contact(item) for item in chunk})
            gone = [item for item in chunk if item.contact_id in gone_ids]
            rest = [item for item in chunk if item.contact_id not in gone_ids]
            if gone:
                return gone + (await self._create(rest, outcomes, check=False) if rest else [])
        if (refusal.detail or {}).get("status") not in PER_RECORD_STATUSES:
            raise refusal  # not about a record (403 scopes, 404 route): the whole call failed
        if len(chunk) == 1:
            outcomes[chunk[0].position] = refusal
            return []
        half = len(chunk) // 2
        first = await self._create(chunk[:half], outcomes, check=False)
        return first + await self._create(chunk[half:], outcomes, check=False)

    async def _gone(self, contact_ids: set[str]) -> set[str]:
        """Those of `contact_ids` HubSpot does not have (deleted, merged away)."""
        found = await self._read_contacts("hs_object_id", sorted(contact_ids), [])
        return contact_ids - found.keys()

    def _map_created(self, chunk: list[_Pending], response: Any, outcomes: Outcomes) -> None:
        """Results by their objectWriteTraceId (else by the key in the body): HubSpot's order
        is not the input's. An activity without a result stays unsure: its retry looks first."""
        kind = chunk[0].kind
        waiting = {item.trace_id: item for item in chunk}
        for record in getattr(response, "results", None) or []:
            item = waiting.get(str(getattr(record, "object_write_trace_id", None) or ""))
            if item is None:
                text = (record.properties or {}).get(kind.body_property) or ""
                item = next((i for i in waiting.values() if _carries(text, i.activity.key)), None)
            if item is None:
                continue
            del waiting[item.trace_id]
            self._unsure.pop(item.activity.key, None)
            detail = {"object_type": kind.object_type, "activity_id": str(record.id)}
            outcomes[item.position] = DeliveryResult(
                record_id=item.contact_id, created=True, detail=detail
            )
        for error in getattr(response, "errors", None) or []:
            context = getattr(error, "context", None) or {}
            named = {str(v) for values in context.values() for v in values or []}
            failure: DeliveryError
            text = f"HubSpot refused the {kind.object_type[:-1]}: {error.message}"
            if getattr(error, "category", None) in RETRYABLE_CATEGORIES:
                failure = RetryableDelivery(text)
            else:
                failure = PermanentDelivery(text, detail={"errors": [error.to_dict()]})
            for trace_id in named & waiting.keys():
                item = waiting.pop(trace_id)
                self._unsure.pop(item.activity.key, None)
                outcomes[item.position] = failure

    def _mark_unsure(self, key: str) -> None:
        self._unsure[key] = None
        while len(self._unsure) > UNSURE_KEYS_MAX:
            del self._unsure[next(iter(self._unsure))]

    async def _upsert(self, items: list[_Input]) -> Any:
        """One batch upsert call, under the limiter; its headers correct the limiter."""
        from hubspot.crm.contacts import (
            BatchInputSimplePublicObjectBatchInputUpsert,
            SimplePublicObjectBatchInputUpsert,
        )

        body = BatchInputSimplePublicObjectBatchInputUpsert(
            inputs=[
                SimplePublicObjectBatchInputUpsert(
                    id=i.id_value, id_property=i.id_property, properties=i.properties
                )
                for i in items
            ]
        )
        return await self._send(
            self._batch.upsert_with_http_info,
            batch_input_simple_public_object_batch_input_upsert=body,
        )

    async def verify(self) -> None:
        # One small read the token must be allowed: the definition of `email`.
        try:
            await self._send(
                self._properties.get_by_name_with_http_info,
                object_type="contacts",
                property_name="email",
            )
        except PermanentDelivery as exc:
            misconfigured = _misconfigured(exc, "GET /crm/v3/properties/contacts/email")
            if misconfigured is None:
                raise
            raise misconfigured from exc

    async def _send(self, call: Callable[..., Any], **kwargs: Any) -> Any:
        """One `*_with_http_info` call under the limiter; its headers correct the limiter.
        With OAuth, a 401 renews the access token and repeats the call, once."""
        if self.config.oauth is None:
            return await self._send_once(call, **kwargs)
        await self._authorize()
        used = self._token
        try:
            return await self._send_once(call, **kwargs)
        except AuthenticationFailed:
            await self._authorize(stale=used)
            return await self._send_once(call, **kwargs)

    # -- OAuth -------------------------------------------------------------------------------------
    async def _authorize(self, stale: str | None = None) -> None:
        """A live access token in every API object: renewed when near its expiry, or when
        `stale` (the token a call was refused with) is still the current one."""
        if self._fresh(stale):
            return
        async with self._token_lock:
            if not self._fresh(stale):  # another call may have renewed it meanwhile
                await self._renew()

    def _fresh(self, stale: str | None) -> bool:
        token = self._token
        return token is not None and token != stale and time.monotonic() < self._token_renew_at

    async def _renew(self) -> None:
        """POST /oauth/v1/token with grant_type=refresh_token."""
        oauth = self.config.oauth
        assert oauth is not None and self._refresh_token is not None
        started = time.monotonic()
        try:
            response, _status, _headers = await self.run_blocking(
                self._oauth.create_with_http_info,
                grant_type="refresh_token",
                client_id=oauth.client_id,
                client_secret=oauth.client_secret.get_secret_value(),
                refresh_token=self._refresh_token,
                _request_timeout=self.config.timeout,
            )
        except Exception as exc:
            status = getattr(exc, "status", None)
            if isinstance(status, int) and 400 <= status < 500 and status != 429:
                body = _parse(getattr(exc, "body", None))
                code = body.get("status") if isinstance(body, dict) else None
                raise AuthenticationFailed(
                    f"HubSpot OAuth token refresh refused ({status} {code or ''}): "
                    f"{_message(getattr(exc, 'body', None))}",
                    retry_after=AUTH_PAUSE_SECONDS,
                ) from exc
            mapped = classify(exc)
            if mapped is None:
                raise
            raise mapped from exc
        if not response.access_token:
            raise RetryableDelivery("HubSpot OAuth token refresh returned no access token")
        lifetime = float(response.expires_in or 0)
        self._token_renew_at = started + lifetime - min(TOKEN_MARGIN_SECONDS, lifetime / 10)
        if response.refresh_token:
            self._refresh_token = response.refresh_token
        self._set_token(response.access_token)

    def _set_token(self, token: str) -> None:
        """The SDK reads `configuration.access_token` on every request: rewrite it everywhere."""
        self._token = token
        for api in self._apis:
            api.api_client.configuration.access_token = token

    async def _send_once(self, call: Callable[..., Any], **kwargs: Any) -> Any:
        await self._acquire()
        try:
            response, _status, headers = await self.run_blocking(
                call, _request_timeout=self.config.timeout, **kwargs
            )
        except Exception as exc:
            if getattr(exc, "status", None) == 429 and hasattr(exc, "body"):
                raise self._rate_limited(exc) from exc
            self._observe(getattr(exc, "headers", None))
            mapped = classify(exc)
            if mapped is None:
                raise
            raise mapped from exc
        self._observe(headers)
        return response

    async def _acquire(self) -> None:
        """Wait for the limiter, unless it is paused for longer than a window: then fail fast,
        so the delivery is rescheduled instead of holding a worker for up to an hour."""
        paused = self.limiter.paused_for()
        if paused > RATE_WINDOW_SECONDS:
            raise RetryableDelivery(
                f"HubSpot rate limit: paused for {paused:.0f}s", retry_after=paused
            )
        await self.limiter.acquire()

    def _observe(self, headers: Any) -> None:
        """Fold HubSpot's own counters into the limiter (absent on errors before the gateway)."""
        remaining = _number(headers, "X-HubSpot-RateLimit-Remaining")
        if remaining is not None:
            interval = _number(headers, "X-HubSpot-RateLimit-Interval-Milliseconds")
            maximum = _number(headers, "X-HubSpot-RateLimit-Max") or self.config.burst_limit()
            # Keep the share we do not use free in HubSpot's window, whoever spends the rest.
            reserve = max(0, int(maximum) - self.limiter.requests)
            window = interval / 1000 if interval else RATE_WINDOW_SECONDS
            self.limiter.observe(int(remaining) - reserve, window)
        daily = _number(headers, "X-HubSpot-RateLimit-Daily-Remaining")
        if daily is not None and daily <= 0:
            limit = _number(headers, "X-HubSpot-RateLimit-Daily")
            of = f" of {int(limit)}" if limit is not None else ""
            self._pause_for(
                DAILY_PAUSE_SECONDS,
                "daily_allocation",
                f"HubSpot's daily API allocation{of} is spent (resets at midnight, portal time)",
            )

    def _rate_limited(self, exc: Exception) -> RetryableDelivery:
        """A 429: pause the limiter for as long as HubSpot asked, or as the limit implies."""
        headers = getattr(exc, "headers", None)
        body = _parse(getattr(exc, "body", None))
        policy = body.get("policyName") if isinstance(body, dict) else None
        retry_after = _number(headers, "Retry-After")
        if retry_after is None and policy == "DAILY":
            # The daily reset is at midnight in the account's time zone: unknown here.
            retry_after = DAILY_PAUSE_SECONDS
        if retry_after is None:
            # A rolling window: everything counted now has left it one window from now.
            interval = _number(headers, "X-HubSpot-RateLimit-Interval-Milliseconds")
            retry_after = interval / 1000 if interval else RATE_WINDOW_SECONDS
        message = f"HubSpot 429: {_message(getattr(exc, 'body', None))}"
        kind: Literal["rate_limit", "daily_allocation"] = (
            "daily_allocation" if policy == "DAILY" else "rate_limit"
        )
        self._pause_for(retry_after, kind, message)
        return RetryableDelivery(message, retry_after=retry_after)

    def _pause_for(
        self, seconds: float, kind: Literal["rate_limit", "daily_allocation"], reason: str
    ) -> None:
        """Pause the limiter, and remember why for `pauses` (the longer pause's reason wins)."""
        if seconds >= self.limiter.paused_for():
            self._pause = (kind, reason)
        self.limiter.pause(seconds)
