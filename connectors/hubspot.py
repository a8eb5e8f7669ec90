"""HubSpot contacts through hubspot-api-client (private-app token).

Create-or-update is a batch upsert keyed by `idProperty=email`: HubSpot decides create versus
update atomically, so there is no search-then-create race and a repeated delivery is harmless.
Up to 100 records go out in one call. HubSpot fails a whole batch with 400 when one input is
invalid, so such a batch is split (first the inputs that do not carry the property HubSpot
named, then halves) until the bad records stand alone: the good ones still land.

Activities are notes or tasks (status COMPLETED) created with their association to the
contact in the same call, so there is never an activity without its contact. The contact is the
`record_id` hint, else the one a GET by email finds (never search: it lags behind writes); a
contact HubSpot does not have yet is created with just its email by the same batch upsert, so
an activity never waits on, nor races, the contact's own upsert delivery.

An activity is logged once: its body ends with `<!-- crm-bridge:KEY -->`. A first attempt
creates it directly (1 call with a hint, 2 with the GET); a later attempt, or a call after a
create whose answer never came, first lists the contact's notes or tasks (v4 associations, 500
a page) and reads their bodies newest first (batch read, 100 a call) and creates nothing if one
carries the key.

Contact properties are checked and coerced before they are sent, against the portal's own
definitions (GET /crm/v3/properties/contacts, cached; the cache is emptied by `open`, expires
after `property_cache_seconds` and is reloaded once, at most every minute, when it refuses a
value). Booleans, numbers, dates and datetimes go out in HubSpot's formats; a None clears the
property (HubSpot's empty string). With `validate_properties` (the default) an unknown or
read-only property, a value that is not one of an enumeration's options or not of the
property's type is refused before sending, naming the field, the value and what is allowed;
without it such a value goes out as given and HubSpot's own 400 refuses the record.

`lifecyclestage` only moves forward in HubSpot, which silently ignores a backward write. The
contact's current stage is read first (a GET by its id property); a backward value is left out
and noted in the result's detail, or, with `lifecycle_demotion`, cleared (PATCH "") then set.

A 409 "Contact already exists. Existing ID: <id>" on a create becomes an update of that contact.

With `oauth` instead of `access_token` the connector takes an access token from
POST /oauth/v1/token (grant_type=refresh_token), renews it shortly before it expires and once
when a call gets a 401, under a lock, and writes it into every SDK API object's configuration
(the SDK copies the token there when it builds them and reads it on each request).

Every HTTP call first waits on `limiter`, a sliding window sized from the portal's tier and
corrected by the rate-limit headers of every answer. The SDK's own urllib3 retries are off
(`retry=False`): retries are the delivery engine's.
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

from bridge.errors import AuthenticationFailed, DeliveryError, PermanentDelivery, RetryableDelivery
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
# The v4 association list's largest page, and the batch read's largest batch.
ASSOCIATION_PAGE = 500
BATCH_READ = 100
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

    def guarded(self) -> list[str]:
        """Properties whose write policy needs the contact's current value."""
        return [k for k, p in self.policies.items() if p.mode != "always" and k in self.properties]

    @property
    def may_demote(self) -> bool:
        """The rule wrote `lifecyclestage` with an explicit `always`: a backward stage is set."""
        policy = self.policies.get("lifecyclestage")
        return policy is not None and policy.mode == "always"


def _key(id_property: str, value: str) -> str:
    return value.strip().lower() if id_property == "email" else value


def _inputs(leads: list[tuple[int, LeadUpsert, dict[str, str]]]) -> list[_Input]:
    """One input per contact, in first-seen order.

    HubSpot refuses a batch that names a contact twice. The caller sends one input per contact;
    if it does not, the duplicates are merged in order (later fields win, as two upserts in a
    row would leave them, but monotonic fields never move back) and every one of them gets the
    merged write's outcome.
    """
    merged: dict[tuple[str, str], tuple[_Input, LeadUpsert]] = {}
    for position, lead, coerced in leads:
        id_property = lead.id_property or "email"
        key = _key(id_property, lead.id_value)
        written = lead.model_copy(update={"fields": coerced})
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


def _contact_gone(exc: PermanentDelivery) -> bool:
    """A refusal that says the contact named by a hint is not there (deleted, merged away)."""
    detail = exc.detail if isinstance(exc.detail, dict) else {}
    status = detail.get("status")
    return status == 404 or (status == 400 and "association" in str(exc).lower())


class HubSpotConnector(Connector):
    """Contacts in one HubSpot portal. A "lead" is a contact here, as in HubSpot's own CRM."""

    name = "hubspot"
    config_model = HubSpotConfig
    config: HubSpotConfig
    max_batch = 100
    limiter: RateLimiter

    def __init__(self, instance: str, config: HubSpotConfig) -> None:
        super().__init__(instance, config)
        # Half a second covers the trip of a batch call before HubSpot counts it.
        self.limiter = RateLimiter(config.requests_per_window(), RATE_WINDOW_SECONDS, margin=0.5)
        self._unsure: dict[str, None] = {}  # insertion-ordered set (UNSURE_KEYS_MAX)
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
        self._leads = client.crm.objects.leads.basic_api
        # Per object type: (basic API, batch API, the package of its models).
        self._engagements: dict[str, tuple[Any, Any, Any]] = {
            "notes": (
                client.crm.objects.notes.basic_api,
                client.crm.objects.notes.batch_api,
                notes,
            ),
            "tasks": (
                client.crm.objects.tasks.basic_api,
                client.crm.objects.tasks.batch_api,
                tasks,
            ),
        }
        self._oauth = client.oauth.tokens_api
        # Every API object that carries the bearer token (OAuth renewals rewrite it).
        self._apis = [
            self._batch,
            self._properties,
            self._contacts,
            self._associations,
            self._leads,
            *(
                api
                for basic, batch, _models in self._engagements.values()
                for api in (basic, batch)
            ),
        ]
        # No other host, no redirects (connectors/outbound.py).
        guard_sdk_apis([*self._apis, self._oauth], self.config.base_url)
        if self._token is not None:
            self._set_token(self._token)

    def forget_schema(self) -> None:
        self._definitions_at = None
        self._other_definitions = {}
        self._lead_definitions = None

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
            items = await self._policies(_inputs(ready), outcomes)
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
                response = await self._send(
                    self._properties.get_all_with_http_info, object_type="contacts", archived=False
                )
                self._definitions = {
                    d.name: d for d in (_PropertyDef.of(p) for p in response.results or [])
                }
                self._definitions_at = started
            return self._definitions

    async def describe(self, object: str, reload: bool = False) -> dict[str, FieldInfo]:
        object_type = HUBSPOT_OBJECTS.get(object, object)
        if object_type == "contacts":
            return {n: d.info() for n, d in (await self._contact_properties(reload)).items()}
        cached = self._other_definitions.get(object_type)
        if cached is None or reload:
            response = await self._send(
                self._properties.get_all_with_http_info, object_type=object_type, archived=False
            )
            cached = {d.name: d.info() for d in map(_PropertyDef.of, response.results or [])}
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
            response = await self._send(
                self._properties.get_all_with_http_info, object_type="leads", archived=False
            )
            self._lead_definitions = {
                d.name: d for d in map(_PropertyDef.of, response.results or [])
            }
        return self._lead_definitions

    # -- write policies --------------------------------------------------------------------------
    async def current(self, lead: LeadUpsert, names: list[str]) -> dict[str, Any] | None:
        id_property = lead.id_property or "email"
        found = await self._read_contacts(id_property, [lead.id_value], names)
        return found.get(_key(id_property, lead.id_value))

    async def _read_contacts(
        self, id_property: str, values: list[str], names: list[str]
    ) -> dict[str, dict[str, Any]]:
        """Contacts by id property value (its key), with `names`; missing ones are absent."""
        from hubspot.crm.contacts import BatchReadInputSimplePublicObjectId, SimplePublicObjectId

        found: dict[str, dict[str, Any]] = {}
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
                    found[_key(id_property, str(value))] = {n: properties.get(n) for n in names}
        return found

    async def _policies(self, items: list[_Input], outcomes: Outcomes) -> list[_Input]:
        """Apply write policies and `create: false`: the contacts that need it are read first
        (one batch read per 100); held-back properties are left out and noted in the result.
        Returns the inputs still to write; the others have their outcome."""
        needy = [i for i in items if i.guarded() or not i.create]
        by_property: dict[str, list[_Input]] = {}
        for item in needy:
            by_property.setdefault(item.id_property, []).append(item)
        current: dict[tuple[str, str], dict[str, Any]] = {}
        for id_property, group in by_property.items():
            names = sorted({n for i in group for n in i.guarded()})
            found = await self._read_contacts(id_property, [i.id_value for i in group], names)
            current.update({(id_property, k): v for k, v in found.items()})
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
                self._settle(item, DeliveryResult(skipped=reason), outcomes)
                continue
            probe = LeadUpsert(
                id_value=item.id_value, fields=item.properties, policies=item.policies
            )
            properties, held = apply_policies(probe, record)
            item.properties = {k: str(v) for k, v in properties.items()}
            if held:
                item.detail["held_back"] = held
            kept.append(item)
        return kept

    # -- lifecycle stage ---------------------------------------------------------------------------
    async def _lifecycle(self, items: list[_Input], outcomes: Outcomes) -> list[_Input]:
        """Backward lifecyclestage values left out (noted), or cleared first with demotion."""
        kept: list[_Input] = []
        for item in items:
            stage = item.properties.get("lifecyclestage")
            if not stage:
                kept.append(item)
                continue
            order = (await self._contact_properties()).get("lifecyclestage")
            stages = list(order.options) if order is not None else []
            current = await self._current_stage(item)
            if not current or current not in stages or stage not in stages:
                kept.append(item)
                continue
            if stages.index(stage) >= stages.index(current):
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

    async def _current_stage(self, item: _Input) -> str | None:
        """The contact's lifecyclestage by a GET on its id property; None if it has none."""
        try:
            record = await self._send(
                self._contacts.get_by_id_with_http_info,
                contact_id=item.id_value,
                id_property=None if item.id_property == "hs_object_id" else item.id_property,
                properties=["lifecyclestage"],
            )
        except PermanentDelivery as exc:
            if (exc.detail or {}).get("status") == 404:
                return None  # not created yet: any stage is forward
            raise
        return (getattr(record, "properties", None) or {}).get("lifecyclestage") or None

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
        """A note or a completed task on the contact, once whatever the attempt.

        The result's `record_id` is the contact's id (the store remembers it for the contact's
        next deliveries); the note's or task's id is in `detail["activity_id"]`.
        """
        kind = ENGAGEMENTS[activity.kind]
        properties = _activity_properties(activity)
        # Look before creating on a redelivery, or after a create whose answer never came.
        look = activity.attempt > 1 or activity.key in self._unsure
        if activity.record_id is not None:
            try:
                return await self._log_on(
                    activity.record_id, False, kind, properties, activity, look
                )
            except PermanentDelivery as exc:
                if not _contact_gone(exc):
                    raise
            # The hint names a contact that is gone (deleted, merged): find it by its id.
        contact_id, created = await self._contact_of(activity)
        return await self._log_on(contact_id, created, kind, properties, activity, look)

    async def _log_on(
        self,
        contact_id: str,
        contact_created: bool,
        kind: _Engagement,
        properties: dict[str, str],
        activity: Activity,
        look: bool,
    ) -> DeliveryResult:
        detail: dict[str, Any] = {"object_type": kind.object_type}
        if contact_created:
            detail["contact_created"] = True
        elif look:  # a contact created just now has no activities to find
            found = await self._find_engagement(kind, contact_id, activity.key)
            if found is not None:
                self._unsure.pop(activity.key, None)
                detail.update(activity_id=found, found_existing=True)
                return DeliveryResult(record_id=contact_id, created=False, detail=detail)
        detail["activity_id"] = await self._create_engagement(
            kind, contact_id, properties, activity.key
        )
        return DeliveryResult(record_id=contact_id, created=True, detail=detail)

    async def _contact_of(self, activity: Activity) -> tuple[str, bool]:
        """The contact's id by a GET on its id property, and whether it was created just now.

        A contact HubSpot does not have is created with only its id property (email), by the
        batch upsert: idempotent, so a race with the contact's own upsert or a repeat of this
        call cannot make two. Its other fields arrive with its upsert deliveries.
        """
        id_property = activity.id_property or "email"
        try:
            record = await self._send(
                self._contacts.get_by_id_with_http_info,
                contact_id=activity.id_value,
                id_property=None if id_property == "hs_object_id" else id_property,
                properties=[id_property],
            )
            return str(record.id), False
        except PermanentDelivery as exc:
            if (exc.detail or {}).get("status") != 404:
                raise
        upsert = LeadUpsert(
            object="contact", id_property=activity.id_property, id_value=activity.id_value
        )
        result = await self.upsert_lead(upsert)
        if result.record_id is None:
            raise RetryableDelivery(f"HubSpot upserted contact {activity.id_value} without an id")
        return result.record_id, bool(result.created)

    async def _find_engagement(self, kind: _Engagement, contact_id: str, key: str) -> str | None:
        """The id of the contact's note or task whose body carries `key`, or None."""
        ids: list[str] = []
        after: str | None = None
        while True:
            page = await self._send(
                self._associations.get_page_with_http_info,
                object_type="contacts",
                object_id=contact_id,
                to_object_type=kind.object_type,
                after=after,
                limit=ASSOCIATION_PAGE,
            )
            ids.extend(str(r.to_object_id) for r in page.results or [])
            after = page.paging.next.after if page.paging and page.paging.next else None
            if not after:
                break
        # Newest first: HubSpot's ids grow over time, and the one sought was written lately.
        ids = sorted(set(ids), key=lambda i: (len(i), i), reverse=True)
        _basic, batch, models = self._engagements[kind.object_type]
        for start in range(0, len(ids), BATCH_READ):
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
                if _carries((record.properties or {}).get(kind.body_property) or "", key):
                    return str(record.id)
        return None

    async def _create_engagement(
        self, kind: _Engagement, contact_id: str, properties: dict[str, str], key: str
    ) -> str:
        """Create the note or task with its association to the contact, in one call."""
        basic, _batch, models = self._engagements[kind.object_type]
        spec = models.AssociationSpec(
            association_category="HUBSPOT_DEFINED", association_type_id=kind.to_contact
        )
        body = models.SimplePublicObjectInputForCreate(
            properties=properties,
            associations=[
                models.PublicAssociationsForObject(
                    to=models.PublicObjectId(id=contact_id), types=[spec]
                )
            ],
        )
        # Until HubSpot answers, the write may land without us hearing of it.
        self._unsure[key] = None
        while len(self._unsure) > UNSURE_KEYS_MAX:
            del self._unsure[next(iter(self._unsure))]
        try:
            record = await self._send(
                basic.create_with_http_info, simple_public_object_input_for_create=body
            )
        except DeliveryError as exc:
            if not _maybe_written(exc):
                self._unsure.pop(key, None)
                raise
            # Not again at once: give a write still in progress time to land, then look.
            settle = self.config.activity_settle_seconds
            raise RetryableDelivery(
                f"{exc} (the {kind.object_type[:-1]} may have been written: the next attempt "
                "looks for it first)",
                retry_after=max(settle, getattr(exc, "retry_after", None) or 0.0),
            ) from exc
        self._unsure.pop(key, None)
        return str(record.id)

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
        await self._send(
            self._properties.get_by_name_with_http_info,
            object_type="contacts",
            property_name="email",
        )

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
            self.limiter.pause(DAILY_PAUSE_SECONDS)

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
        self.limiter.pause(retry_after)
        return RetryableDelivery(
            f"HubSpot 429: {_message(getattr(exc, 'body', None))}", retry_after=retry_after
        )
