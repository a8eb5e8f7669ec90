"""Salesforce Leads and Contacts through simple-salesforce.

The connector logs in itself, at a configurable login URL (production, `test` for sandboxes,
My Domain, or an emulator): SOAP username + password + security token, OAuth client
credentials, or OAuth JWT bearer (`auth`, or inferred from the fields given); or it uses an
existing session. It builds the client from the session it got, because the SDK's own
re-login on expiry never stops on object-level calls (simple-salesforce #804). On
`INVALID_SESSION_ID` it logs in again once (every flow but an existing session), under a lock
so concurrent calls share one login, and repeats the call once.

A batch of up to 200 records costs three calls: one SOQL lookup of the emails (records that
carry a `record_id` hint skip it), one sObject Collections update and one Collections create,
each with `allOrNone: false` so that one bad record fails alone. A hint whose record is gone
(deleted, merged) falls back to the lookup. Records keyed by an external-id field go out in one
Collections upsert, where Salesforce decides create versus update. A batch of one record uses
the single-record routes instead (no cheaper as a collection, and its errors are plain). Emails
match in any case, and an existing record's Email is written only when a rule maps it (a rep's
`Ada.Lovelace@Example.com` stays as typed); an update left with nothing to write sends nothing.

An activity is a completed Task on the Lead or Contact (WhoId): the `record_id` hint if it is
an id of that object, else the record with the email that upserts update (one SOQL query per
batch); none is `DeliveryResult(missing=True)`, for the delivery engine to decide. A hint that
Salesforce refuses as WhoId (deleted, merged, a converted Lead) falls back to the lookup, which
names a converted Lead's Contact. The Task's Description ends with a marker line
`[crm-bridge:KEY]`: a first attempt creates it directly; a later attempt, or a call after a
create whose answer never came, first queries the records' Tasks with those Subjects
(Description cannot be filtered in SOQL) and creates nothing where one carries the marker. A
batch of Tasks is one Collections create (one call for up to 200 with hints).

Every call first waits on `limiter`; after each, the org's API usage (`Sforce-Limit-Info`, of
refused calls too) decides whether the next may go. At `daily_reserve` of the daily allocation,
or on REQUEST_LIMIT_EXCEEDED with the allocation spent, the connector stops calling for
`daily_recheck_seconds`, then asks `/limits` whether the rolling 24-hour window freed calls.
REQUEST_LIMIT_EXCEEDED for concurrent long requests (or while the org's count leaves room)
clears in seconds: a short backoff, doubled while it repeats. `pauses()` reports each.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import quote, urlsplit

import requests
from pydantic import Field, SecretStr, model_validator

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
from connectors.outbound import guard_session, instance_belongs
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

T = TypeVar("T")
log = logging.getLogger("crm_bridge.connectors.salesforce")
AUTH_PAUSE_SECONDS = 300.0
# The longest backoff after repeated concurrent-request refusals: they clear in seconds.
CONCURRENCY_BACKOFF_MAX = 60.0
# The pauses the connector holds itself (the limiter's are its own).
HoldKind = Literal["daily_allocation", "concurrency"]
API_USAGE = re.compile(r"(?<![\w-])api-usage=(\d+)/(\d+)")
# Per-record errors that may pass when the same record is sent again.
RETRYABLE_RECORD_CODES = frozenset({"UNABLE_TO_LOCK_ROW"})
# Errors of an update by id that mean the record is not there (any more): a stale hint.
MISSING_RECORD_CODES = frozenset(
    {"NOT_FOUND", "ENTITY_IS_DELETED", "INVALID_CROSS_REFERENCE_KEY", "MALFORMED_ID"}
)
# SOQL goes out in the URL of a GET: keep each lookup well below the ~16 KB URI limit.
MAX_SOQL_CHARS = 6000
LOOKUP_SOQL = "SELECT {:literal} FROM {:literal} WHERE {:literal} IN {} ORDER BY {:literal}"
# Which record an email lookup picks when several have the email (`tie_break`).
TIE_BREAK_ORDER = {
    "oldest": "CreatedDate ASC, Id ASC",
    "newest": "CreatedDate DESC, Id DESC",
    "most_recently_modified": "LastModifiedDate DESC, Id DESC",
}
# Standard Lead fields a Contact does not have: left out when a lead rule's record is written
# to a Contact instead (a converted Lead's Contact, or `target: contact_else_lead`).
LEAD_ONLY_FIELDS = frozenset(
    {
        "Company",
        "Status",
        "Website",
        "Industry",
        "NumberOfEmployees",
        "AnnualRevenue",
        "Rating",
        "IsUnreadByOwner",
    }
)
# Update errors that say the hinted record cannot take this write: find it by email instead.
CONVERTED_CODES = frozenset({"CANNOT_UPDATE_CONVERTED_LEAD"})
OAUTH_TOKEN_PATH = "/services/oauth2/token"
JWT_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
JWT_LIFETIME_SECONDS = 180  # what simple-salesforce uses; Salesforce allows at most 3 minutes
ASSIGNMENT_RULE_ID = re.compile(r"01Q[a-zA-Z0-9]{12}(?:[a-zA-Z0-9]{3})?")
AuthFlow = Literal["soap", "client_credentials", "jwt", "session"]
TASKS_SOQL = "SELECT Id, WhoId, Description FROM Task WHERE WhoId IN {} AND Subject IN {}"
# Id prefixes of the objects a Task's WhoId may name: a hint of another object is ignored.
WHO_PREFIXES = {"Lead": "00Q", "Contact": "003"}
# Task create errors that mean the WhoId record is not there (any more), or is a converted
# Lead (whose activities belong on its Contact): a stale hint.
WHO_GONE_CODES = frozenset(
    {
        "INVALID_CROSS_REFERENCE_KEY",
        "ENTITY_IS_DELETED",
        "MALFORMED_ID",
        "FIELD_INTEGRITY_EXCEPTION",
        "CANNOT_UPDATE_CONVERTED_LEAD",
    }
)
# The rule-level object names `describe` takes, and the sObject each means.
SOBJECTS = {"lead": "Lead", "contact": "Contact", "task": "Task", "note": "Task"}
# A describe cache that refuses a value is reloaded first if it is older than this.
DESCRIBE_RECHECK_SECONDS = 60.0
NUMBER_TYPES = frozenset({"double", "currency", "percent", "int", "long"})
CURRENT_SOQL = "SELECT {:literal} FROM {:literal} WHERE {:literal} IN {}"
SUBJECT_MAX = 255  # Task.Subject
DESCRIPTION_MAX = 32000  # Task.Description (a long text area)
# Keys of activities whose create got no answer (timeout, reset): the write may have landed,
# so the next call for the key looks before it creates, even with the same `attempt` (the
# delivery engine's in-call retries repeat it). Bounded: the oldest are forgotten first.
UNSURE_KEYS_MAX = 10000


def _secret(value: SecretStr | None) -> str:
    return value.get_secret_value() if value is not None else ""


class SalesforceConfig(ConnectorConfig):
    type: Literal["salesforce"] = "salesforce"
    # How to log in; None: inferred from the fields given (see `flow`).
    #   soap: username + password (+ security_token), SOAP login at `login_url`;
    #   client_credentials: consumer_key + consumer_secret, OAuth at `login_url` (a My Domain);
    #   jwt: username + consumer_key + private_key_file (PEM, RSA), OAuth JWT bearer;
    #   session: session_id + instance_url, cannot be renewed when it expires.
    auth: AuthFlow | None = None
    username: str | None = None
    password: SecretStr | None = None
    security_token: SecretStr | None = None  # empty for trusted-IP users
    # https://login.salesforce.com, https://test.salesforce.com (sandbox) or your My Domain.
    login_url: str = "https://login.salesforce.com"
    # Or an existing session: it cannot be renewed when it expires.
    session_id: SecretStr | None = None
    instance_url: str | None = None
    # The connected app (OAuth flows); tokens come from `login_url` + /services/oauth2/token.
    consumer_key: str | None = None
    consumer_secret: SecretStr | None = None
    private_key_file: Path | None = None  # jwt: the connected app certificate's private key
    # jwt: the assertion's `aud`; None: https://test.salesforce.com for sandboxes, else
    # https://login.salesforce.com for Salesforce hosts, else `login_url` itself.
    jwt_audience: str | None = None
    api_version: str = "59.0"
    # Which object a record goes to: the rule's (`rule`), always `lead` or `contact`, or
    # `contact_else_lead`: update the Contact with the email if there is one, else upsert a
    # Lead. Records keyed by an external-id field always go to the rule's object.
    target: Literal["rule", "lead", "contact", "contact_else_lead"] = "rule"
    # Which record an email lookup updates when several have the email.
    tie_break: Literal["oldest", "newest", "most_recently_modified"] = "oldest"
    # Save even when a duplicate rule alerts (Sforce-Duplicate-Rule-Header: allowSave=true);
    # false: the record fails with PermanentDelivery, detail["duplicates"] naming the matches.
    allow_save_on_duplicates: bool = False
    # Lead assignment on create (Sforce-Auto-Assign): `default` (the active rule), `none`, or
    # an assignment rule id (01Q...). None: no header (Salesforce's own default).
    assignment_rule: str | None = None
    # Stop calling once the org's rolling 24-hour API usage reaches this share of its daily
    # allocation (0.9: stop at 90%, leaving 10% to the org's other integrations).
    daily_reserve: float = Field(default=0.9, gt=0, le=1)
    # While stopped for the daily allocation, ask `/limits` this often whether the rolling
    # window has freed calls (one call each time), instead of sitting out a fixed hour.
    daily_recheck_seconds: float = Field(default=300.0, gt=0)
    # REQUEST_LIMIT_EXCEEDED for concurrent long requests clears in seconds: hold calls back
    # this long, twice as long for each refusal in a row (at most a minute).
    concurrency_backoff_seconds: float = Field(default=5.0, gt=0)
    # Client-side pacing, at most this many calls per `rate_limit_seconds`. Salesforce has no
    # short-window limit (only the daily allocation and 25 concurrent long requests): this
    # keeps a backlog from spending the org's daily pool in a few minutes.
    rate_limit_requests: int = Field(default=25, ge=1)
    rate_limit_seconds: float = Field(default=1.0, gt=0)
    # After a Task create that got no answer (timeout, reset, 5xx) the write may still be in
    # progress at Salesforce: its delivery waits this long before it looks for it, so the look
    # does not miss a write that lands just after it.
    activity_settle_seconds: float = Field(default=60.0, gt=0)
    # Check and coerce mapped values against the org's describe data before sending:
    # booleans, numbers, dates and datetimes in Salesforce's formats, picklist values among the
    # active ones (any case), text within the field's length, no unknown or read-only field.
    # A record that fails gets an error naming the field, the value and what is allowed.
    # false: values go out as given and Salesforce's own errors judge them.
    validate_fields: bool = True
    # How long describe data is kept; `open` (start, reload) empties the cache, and a value
    # it refuses reloads it once if it is older than a minute (the admin may just have added
    # the picklist value).
    describe_cache_seconds: float = Field(default=3600.0, gt=0)

    @property
    def flow(self) -> AuthFlow | None:
        """`auth`, or the flow the given fields imply; None: nothing to log in with."""
        if self.auth is not None:
            return self.auth
        if _secret(self.session_id):
            return "session"
        if self.private_key_file is not None:
            return "jwt"
        if self.consumer_key and _secret(self.consumer_secret) and not self.username:
            return "client_credentials"
        if self.username and _secret(self.password):
            return "soap"
        return None

    @model_validator(mode="after")
    def _flow_has_its_fields(self) -> SalesforceConfig:
        flow = self.flow
        required: dict[str, tuple[str, ...]] = {
            "session": ("session_id", "instance_url"),
            "soap": ("username", "password"),
            "client_credentials": ("consumer_key", "consumer_secret"),
            "jwt": ("username", "consumer_key", "private_key_file"),
        }
        if flow is not None:
            missing = [
                name
                for name in required[flow]
                if not (
                    _secret(value) if isinstance(value := getattr(self, name), SecretStr) else value
                )
            ]
            if missing:
                raise ValueError(f"auth {flow} needs {', '.join(missing)}")
        if flow == "jwt" and self.private_key_file and not self.private_key_file.is_file():
            raise ValueError(f"private_key_file {self.private_key_file} is not a file")
        rule = self.assignment_rule
        if rule is not None and rule not in ("default", "none"):
            if not ASSIGNMENT_RULE_ID.fullmatch(rule):
                raise ValueError(
                    "assignment_rule is default, none or an assignment rule id (01Q...)"
                )
        return self

    def has_credentials(self) -> bool:
        return self.flow is not None

    def create_headers(self) -> dict[str, str]:
        """Headers of requests that may create records."""
        headers = self.write_headers()
        if self.assignment_rule is not None:
            value = {"default": "TRUE", "none": "FALSE"}.get(self.assignment_rule)
            headers["Sforce-Auto-Assign"] = value or self.assignment_rule
        return headers

    def write_headers(self) -> dict[str, str]:
        """Headers of every create or update (duplicate rules run on both)."""
        if self.allow_save_on_duplicates:
            return {"Sforce-Duplicate-Rule-Header": "allowSave=true"}
        return {}

    def audience(self) -> str:
        if self.jwt_audience:
            return self.jwt_audience
        host = urlsplit(self.login_url).hostname or ""
        if host == "test.salesforce.com" or host.endswith(".sandbox.my.salesforce.com"):
            return "https://test.salesforce.com"
        if host.endswith(".salesforce.com"):
            return "https://login.salesforce.com"
        return self.login_url.rstrip("/")


class _Session(requests.Session):
    """A requests session with a default timeout, no redirects, and only the configured CA."""

    def __init__(self, timeout: float, verify: str | bool) -> None:
        super().__init__()
        self.timeout = timeout
        self.verify = verify
        # REQUESTS_CA_BUNDLE in the environment would silently override `verify`.
        self.trust_env = False
        self._answers = threading.local()

    def request(
        self, method: str | bytes, url: str | bytes, *args: Any, **kwargs: Any
    ) -> requests.Response:
        kwargs.setdefault("timeout", self.timeout)
        kwargs.setdefault("allow_redirects", False)
        response = super().request(method, url, *args, **kwargs)
        # The SDK keeps no header of a refused call, and the org's count in a 403 tells a
        # spent allocation from a concurrency refusal. Per thread: calls run on several.
        self._answers.limit_info = response.headers.get("Sforce-Limit-Info")
        return response

    def take_usage(self) -> tuple[int, int] | None:
        """(used, max) of the daily allocation from this thread's latest answer, once."""
        info = getattr(self._answers, "limit_info", None)
        self._answers.limit_info = None
        found = API_USAGE.search(info or "")
        return (int(found[1]), int(found[2])) if found else None


def _first_error(content: Any) -> tuple[str, str]:
    if isinstance(content, list) and content and isinstance(content[0], dict):
        return str(content[0].get("errorCode", "")), str(content[0].get("message", ""))
    if isinstance(content, bytes):
        content = content.decode(errors="replace")
    return "", str(content)[:500]


def _allocation_spent(message: str, usage: tuple[int, int] | None) -> bool:
    """Whether a REQUEST_LIMIT_EXCEEDED means the daily allocation: the same answer's count
    of the org's calls decides ("api-usage=0/15000" is not a spent allocation, whatever the
    message); without one, the message ("TotalRequests Limit exceeded." for the daily pool,
    "ConcurrentPerOrgLongTxn Limit exceeded." and the like for concurrent requests)."""
    if usage is not None and usage[1]:
        return usage[0] >= usage[1]
    return "TotalRequests" in message


def classify(exc: Exception) -> DeliveryError | None:
    """Map what simple-salesforce raised to retryable or permanent; None for the unexpected."""
    from simple_salesforce.exceptions import (
        SalesforceAuthenticationFailed,
        SalesforceError,
        SalesforceExpiredSession,
    )

    if isinstance(exc, SalesforceAuthenticationFailed):
        return AuthenticationFailed(
            f"Salesforce login failed: {_first_error(exc.content)[1]}",
            retry_after=AUTH_PAUSE_SECONDS,
        )
    if isinstance(exc, SalesforceExpiredSession):
        return AuthenticationFailed("Salesforce session expired", retry_after=AUTH_PAUSE_SECONDS)
    if isinstance(exc, SalesforceError):
        code, message = _first_error(exc.content)
        text = f"Salesforce {exc.status} {code}: {message}".replace("  ", " ")
        if code == "UNABLE_TO_LOCK_ROW" or exc.status == 429 or exc.status >= 500:
            return RetryableDelivery(text)
        if code == "REQUEST_LIMIT_EXCEEDED":
            # The connector's `_limited` judges it with the answer's usage header first.
            return RetryableDelivery(text)
        return PermanentDelivery(text, detail={"status": exc.status, "errors": exc.content})
    if isinstance(exc, (requests.RequestException, OSError, TimeoutError)):
        return RetryableDelivery(f"Salesforce unreachable: {type(exc).__name__}")
    return None


def _field_info(raw: dict[str, Any]) -> FieldInfo:
    """A describe field as the connector interface has it."""
    options = None
    if raw.get("type") in ("picklist", "multipicklist", "combobox"):
        options = tuple(str(v["value"]) for v in raw.get("picklistValues") or [] if v.get("active"))
    return FieldInfo(
        name=str(raw["name"]),
        label=str(raw.get("label") or ""),
        type=str(raw.get("type") or "string"),
        options=options,
        # An unrestricted picklist takes any value (Salesforce keeps it as an inactive one).
        restricted=bool(raw.get("restrictedPicklist")) and raw.get("type") != "combobox",
        writable=bool(raw.get("createable") or raw.get("updateable")),
        max_length=int(raw["length"]) if raw.get("length") else None,
    )


def _coerce(obj: str, info: FieldInfo | None, name: str, value: Any) -> Any:
    """`value` as Salesforce takes it for this field; `FieldProblem` if it cannot be."""
    what = f"Salesforce {obj} field"
    if info is None:
        raise FieldProblem(
            f"{what} {name!r} does not exist (value {value!r})",
            field=name,
            value=shown(value),
            expected=f"a field of {obj}",
        )
    if not info.writable:
        raise FieldProblem(
            f"{what} {name!r} is read-only (value {value!r})",
            field=name,
            value=shown(value),
            expected="a writable field",
        )
    if value is None or value == "":
        return None  # clears the field
    if info.type in NUMBER_TYPES:
        return _number(what, info, value)
    coerce = {
        "boolean": _boolean,
        "date": _moment,
        "datetime": _moment,
        "multipicklist": _multipicklist,
    }.get(info.type, _text)
    return coerce(what, info, value)


def _boolean(what: str, info: FieldInfo, value: Any) -> bool:
    parsed = truth(value)
    if parsed is None:
        raise refuse(what, info.name, value, "a boolean (true or false)", type=info.type)
    return parsed


def _number(what: str, info: FieldInfo, value: Any) -> int | float:
    amount = number(value)
    if amount is None:
        raise refuse(what, info.name, value, "a number", type=info.type)
    if info.type in ("int", "long"):
        if not amount.is_integer():
            raise refuse(what, info.name, value, "a whole number", type=info.type)
        return int(amount)
    return int(amount) if amount.is_integer() and abs(amount) < 2**53 else amount


def _moment(what: str, info: FieldInfo, value: Any) -> str:
    when = moment(value)
    if when is None:
        expected = "a date (YYYY-MM-DD)" if info.type == "date" else "a datetime (ISO 8601)"
        raise refuse(what, info.name, value, expected, type=info.type)
    if info.type == "date":
        return when.date().isoformat()  # a moment's UTC calendar day
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _multipicklist(what: str, info: FieldInfo, value: Any) -> str:
    chosen = [str(v) for v in value] if isinstance(value, list | tuple) else str(value).split(";")
    return ";".join(_picklist(what, info, v) for v in chosen if v)


def _text(what: str, info: FieldInfo, value: Any) -> str:
    if isinstance(value, dict | list | tuple | set):
        raise refuse(what, info.name, value, "a single value", type=info.type)
    text = ("true" if value else "false") if isinstance(value, bool) else str(value)
    if info.type == "picklist":
        return _picklist(what, info, text)
    if info.max_length and len(text) > info.max_length:
        expected = f"at most {info.max_length} characters long (it has {len(text)})"
        raise refuse(what, info.name, value, expected, type=info.type, max_length=info.max_length)
    return text


def _picklist(what: str, info: FieldInfo, value: str) -> str:
    """The option `value` names, in the org's spelling; a value of no option is refused by a
    restricted picklist and goes as given to an unrestricted one."""
    found = option(info.options or (), value)
    if found is None and not info.restricted:
        return value
    if found is None:
        raise FieldProblem(
            f"{what} {info.name!r}: {value!r} is not one of the allowed values: "
            f"{allowed_list(info.options or ())}",
            field=info.name,
            value=value,
            allowed=list(info.options or ()),
        )
    return found


def _coerce_fields(
    obj: str, described: dict[str, FieldInfo], fields: dict[str, Any]
) -> tuple[dict[str, Any], list[FieldProblem]]:
    """Every field checked and coerced; the problems found, all of them."""
    return coerce_all(fields, lambda name, value: _coerce(obj, described.get(name), name, value))


def _required_for_create(obj: str, fields: dict[str, Any], email: str) -> dict[str, Any]:
    """A new record keyed by `email` carries it (unless a rule maps Email itself); a Lead
    needs LastName and Company, a Contact LastName: fill them from the email."""
    local, _, domain = email.partition("@")
    out = dict(fields)
    if not any(name.lower() == "email" for name in out):
        out["Email"] = email
    if not out.get("LastName"):
        out["LastName"] = local or "Unknown"
    if obj == "Lead" and not out.get("Company"):
        out["Company"] = domain or "Unknown"
    return out


@dataclass
class _Item:
    """One record of a batch: the merged fields of every input naming it."""

    obj: str  # "Lead" or "Contact": the object written
    id_property: str  # "Email" or an external-id field
    id_value: str
    fields: dict[str, Any]
    positions: list[int]
    hint: str | None = None
    target: str | None = None  # the Id to update; None: create
    by_hint: bool = False  # target came from the hint, not from a lookup
    base_obj: str = ""  # the object to write (Lead for contact_else_lead); "": obj
    contact_first: bool = False  # contact_else_lead: a Contact with the email wins
    rule_obj: str = ""  # the object the rule named (its fields are for it); "": obj
    policies: dict[str, WritePolicy] = field(default_factory=dict)
    create: bool = True  # False: update an existing record only
    held: dict[str, str] = field(default_factory=dict)  # fields left out, and why
    # The target's values of the guarded fields, when the lookup that found it read them.
    current: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        self.base_obj = self.base_obj or self.obj
        self.rule_obj = self.rule_obj or self.obj

    def record_fields(self) -> dict[str, Any]:
        """The fields to write: a lead rule's record going to a Contact loses Lead-only ones."""
        if self.obj == "Contact" and self.rule_obj == "Lead":
            return {k: v for k, v in self.fields.items() if k not in LEAD_ONLY_FIELDS}
        return self.fields

    @property
    def by_email(self) -> bool:
        return self.id_property.lower() == "email"

    def guarded(self) -> list[str]:
        """Fields whose write policy needs the record's current value."""
        fields = self.record_fields()
        return [k for k, p in self.policies.items() if p.mode != "always" and k in fields]

    def hold_back(self, current: dict[str, Any] | None) -> None:
        """Apply the write policies to the record's `current` values (None: it is new)."""
        probe = LeadUpsert(id_value=self.id_value, fields=self.fields, policies=self.policies)
        self.fields, held = apply_policies(probe, current)
        self.held.update(held)

    @property
    def email_key(self) -> str:
        return _fold(self.id_value)


def _items(leads: Iterable[tuple[int, LeadUpsert]], target: str = "rule") -> list[_Item]:
    """One item per record, in first-seen order, from (position, lead) pairs.

    The caller sends one input per record; if it does not, the duplicates are merged in order
    (later fields win, as two upserts in a row would leave them, but monotonic fields never
    move back) and all get one outcome: a Collections request naming one record twice would
    fail both.
    """
    merged: dict[tuple[str, str, str], tuple[_Item, LeadUpsert]] = {}
    for position, lead in leads:
        id_property = lead.id_property or "Email"
        email_mode = id_property.lower() == "email"
        wanted = lead.object if target == "rule" or not email_mode else target
        obj = "Contact" if wanted == "contact" else "Lead"
        # Salesforce compares emails case-insensitively; external ids may be case-sensitive.
        value = lead.id_value.strip().lower() if email_mode else lead.id_value
        key = (obj, "email" if email_mode else id_property, value)
        if key not in merged:
            contact_first = wanted == "contact_else_lead"
            rule_obj = "Contact" if lead.object == "contact" else "Lead"
            item = _Item(
                obj,
                id_property,
                lead.id_value,
                {},
                [],
                contact_first=contact_first,
                rule_obj=rule_obj,
            )
            merged[key] = (item, lead)
        else:
            item, earlier = merged[key]
            merged[key] = (item, combine(earlier, lead))
        item.positions.append(position)
        hint = lead.record_id
        # A hint of another object than the one written is no hint (contact_else_lead: either).
        if hint and (item.contact_first or hint.startswith(WHO_PREFIXES[obj])):
            item.hint = item.hint or hint
    items = []
    for item, lead in merged.values():
        # The key field is written on create only (`_required_for_create`), or when a rule
        # maps it: an update never rewrites the Email a rep typed.
        item.fields = dict(lead.fields)
        item.policies, item.create = dict(lead.policies), lead.create
        items.append(item)
    return items


def _fold(value: Any) -> str:
    """A key value as Salesforce compares it: text in any case (emails, external ids)."""
    return str(value).strip().casefold()


V = TypeVar("V")


def _chunks(values: list[V], soql: Callable[[list[V]], str]) -> list[str]:
    """`soql` of `values` split into as few queries as fit in MAX_SOQL_CHARS each."""
    queries: list[str] = []
    chunk: list[V] = []
    for value in values:
        if chunk and len(soql([*chunk, value])) > MAX_SOQL_CHARS:
            queries.append(soql(chunk))
            chunk = []
        chunk.append(value)
    if chunk:
        queries.append(soql(chunk))
    return queries


def _soql_chunks(
    obj: str,
    values: list[str],
    order: str = TIE_BREAK_ORDER["oldest"],
    key: str = "Email",
    also: Iterable[str] = (),
) -> list[str]:
    """Lookups of the records whose `key` is one of `values`, sorted by `order`, reading the
    fields `also` names too."""
    from simple_salesforce.format import format_soql

    # A converted Lead is never updated: its Contact is, so the lookup reads where it went.
    names = ["Id", key, *(["IsConverted", "ConvertedContactId"] if obj == "Lead" else [])]
    fields = ", ".join(dict.fromkeys([*names, *also]))
    return _chunks(values, lambda chunk: format_soql(LOOKUP_SOQL, fields, obj, key, chunk, order))


def _tasks_soql(pairs: list[tuple[str, str | None]]) -> list[str]:
    """Queries of the Tasks on these (WhoId, Subject) pairs: a superset, the caller matches."""
    from simple_salesforce.format import format_soql

    def soql(chunk: list[tuple[str, str | None]]) -> str:
        whos = list(dict.fromkeys(who for who, _ in chunk))
        subjects = list(dict.fromkeys(subject for _, subject in chunk))
        return format_soql(TASKS_SOQL, whos, subjects)

    return _chunks(pairs, soql)


def _record_errors(exc: Exception) -> list[dict[str, Any]]:
    """A single-record route's error body in the shape of a Collections result's `errors`."""
    content = getattr(exc, "content", None)
    if isinstance(content, list) and content and all(isinstance(e, dict) for e in content):
        return [
            {
                # Extra keys (duplicateResult of DUPLICATES_DETECTED) are kept.
                **{k: v for k, v in e.items() if k not in ("errorCode", "message", "fields")},
                "statusCode": e.get("errorCode", ""),
                "message": e.get("message", ""),
                "fields": e.get("fields") or [],
            }
            for e in content
        ]
    if getattr(exc, "status", None) == 300:  # an external id matching several records
        urls = content if isinstance(content, list) else []
        ids = [str(u).rstrip("/").rsplit("/", 1)[-1] for u in urls]
        message = f"the external id matches {len(ids)} records: {', '.join(ids)}"
        return [{"statusCode": "MULTIPLE_CHOICES", "message": message, "matches": ids}]
    return [{"statusCode": "", "message": _first_error(content)[1]}]


def _is_missing(result: dict[str, Any]) -> bool:
    """Whether a failed update says the record itself is not there."""
    errors = result.get("errors") or []
    return bool(errors) and all(
        isinstance(e, dict)
        and e.get("statusCode") in MISSING_RECORD_CODES | CONVERTED_CODES
        and set(e.get("fields") or []) <= {"Id"}
        for e in errors
    )


def _outcome(result: dict[str, Any], record_id: str | None, created: bool | None) -> Outcome:
    """A Collections (or single-record) result as this record's outcome."""
    if result.get("success"):
        return DeliveryResult(record_id=result.get("id") or record_id, created=created)
    errors = result.get("errors") or []
    first = errors[0] if errors and isinstance(errors[0], dict) else {}
    code = str(first.get("statusCode") or "")
    text = f"Salesforce {code}: {first.get('message', '')}".replace("  ", " ")
    if code in RETRYABLE_RECORD_CODES:
        return RetryableDelivery(text)
    detail: dict[str, Any] = {"errors": errors}
    if code == "DUPLICATES_DETECTED":
        detail["duplicates"] = _duplicate_ids(errors)
    elif code in ("MULTIPLE_CHOICES", "DUPLICATE_EXTERNAL_ID"):
        # Never a guess: the records the external id matches, for a person to merge.
        matches = first.get("matches") or re.findall(
            r"\b[a-zA-Z0-9]{18}\b|\b[a-zA-Z0-9]{15}\b",
            str(first.get("message", "")).partition("[")[2],
        )
        if matches:
            detail["matches"] = list(matches)
    return PermanentDelivery(text, detail=detail)


def _duplicate_ids(errors: list[Any]) -> list[str]:
    """The ids of the records a duplicate rule matched, from DUPLICATES_DETECTED errors."""
    ids: list[str] = []
    for error in errors:
        result = error.get("duplicateResult") if isinstance(error, dict) else None
        for match in (result or {}).get("matchResults") or []:
            for found in match.get("matchRecords") or []:
                record_id = (found.get("record") or {}).get("Id")
                if record_id and record_id not in ids:
                    ids.append(str(record_id))
    return ids


def _marker(key: str) -> str:
    return f"[crm-bridge:{key}]"


def _task_fields(activity: Activity, who: str) -> dict[str, Any]:
    """A completed Task on `who`, dated the day the activity happened (UTC); the Description
    ends with the key's marker line."""
    marker = _marker(activity.key)
    description = fit_text(
        activity.body, lambda body: f"{body}\n\n{marker}" if body else marker, DESCRIPTION_MAX
    )
    return {
        "Subject": activity.subject[:SUBJECT_MAX],
        "Description": description,
        "WhoId": who,
        "Status": "Completed",
        "Priority": "Normal",
        "ActivityDate": datetime.fromtimestamp(activity.occurred_at, UTC).date().isoformat(),
    }


def _maybe_written(exc: DeliveryError) -> bool:
    """Whether a failed write may have landed: no answer, or a 5xx. An expired session, the
    daily guard or a 4xx is Salesforce (or this connector) refusing before any write."""
    if not isinstance(exc, RetryableDelivery) or isinstance(exc, AuthenticationFailed):
        return False
    status = getattr(exc.__cause__, "status", None)
    return exc.__cause__ is not None and not (isinstance(status, int) and status < 500)


def _who_gone(result: dict[str, Any]) -> bool:
    """Whether a failed Task create says its WhoId record is not there (any more)."""
    errors = result.get("errors") or []
    return bool(errors) and all(
        isinstance(e, dict)
        and e.get("statusCode") in WHO_GONE_CODES
        and set(e.get("fields") or []) <= {"WhoId"}
        for e in errors
    )


# -- the calls, run on the connector's threads with the client as first argument -------------
def _query(sf: Any, soql: str) -> Any:
    return sf.query(soql)


def _describe(sf: Any, sobject: str) -> Any:
    return getattr(sf, sobject).describe()


def _limits(sf: Any) -> Any:
    return sf.restful("limits/")


def _query_more(sf: Any, url: str) -> Any:
    return sf.query_more(url, identifier_is_url=True)


def _collection(
    sf: Any,
    path: str,
    method: str,
    records: list[dict[str, Any]],
    headers: dict[str, str] | None = None,
) -> Any:
    body = {"allOrNone": False, "records": records}
    return sf.restful(path, method=method, json=body, headers=headers or {})


def _write_one(
    sf: Any, method: str, path: str, body: dict[str, Any], headers: dict[str, str] | None = None
) -> dict[str, Any]:
    """One record by the single-record route, answered like a Collections result."""
    from simple_salesforce.exceptions import (
        SalesforceMalformedRequest,
        SalesforceMoreThanOneRecord,
        SalesforceResourceNotFound,
    )

    try:
        answer = sf.restful(path, method=method, json=body, headers=headers or {})
    except (
        SalesforceMalformedRequest,
        SalesforceResourceNotFound,
        SalesforceMoreThanOneRecord,
    ) as exc:
        # 400/404/300 name this record's problem: its outcome, not the call's failure.
        return {"success": False, "errors": _record_errors(exc)}
    answer = answer if isinstance(answer, dict) else {}
    # An upsert answers 201 + created (API >= 46), 200 + created=false or, before 46, 204.
    return {"success": True, "errors": [], **answer}


class _SessionExpired(Exception):
    """The session of `client` expired during a call: log in again and repeat it once."""

    def __init__(self, client: Any) -> None:
        super().__init__("session expired")
        self.client = client


class _Refused(Exception):
    """A call on a thread failed with `error`; `usage` is the org's count from its answer."""

    def __init__(self, error: Exception, usage: tuple[int, int] | None) -> None:
        super().__init__(str(error))
        self.error = error
        self.usage = usage


@dataclass
class _Hold:
    """A pause the connector holds itself: no call before `until` (the connector's `clock`)."""

    until: float
    reason: str


@dataclass
class _Logging:
    """One activity of a batch on its way to a Task."""

    position: int
    activity: Activity
    obj: str  # "Lead" or "Contact": the object the activity is for
    look: bool  # an earlier attempt may have written it: look for its Task before creating
    who: str | None = None  # the WhoId; None: not known yet
    by_hint: bool = False  # `who` is the activity's record_id, not found by a lookup

    @property
    def id_field(self) -> str:
        return self.activity.id_property or "Email"

    @property
    def by_email(self) -> bool:
        return self.id_field.lower() == "email"

    @property
    def key(self) -> str:
        return _fold(self.activity.id_value)

    @property
    def subject(self) -> str | None:
        return self.activity.subject[:SUBJECT_MAX] or None  # Salesforce keeps "" as null


class SalesforceConnector(Connector):
    """Leads and Contacts in one Salesforce org."""

    name = "salesforce"
    config_model = SalesforceConfig
    config: SalesforceConfig
    max_batch = 200  # an sObject Collections request takes 200 records
    max_activity_batch = 200  # Tasks go out in one Collections create
    limiter: RateLimiter

    def __init__(self, instance: str, config: SalesforceConfig) -> None:
        super().__init__(instance, config)
        self.limiter = RateLimiter(config.rate_limit_requests, config.rate_limit_seconds)
        # (used, max) of the org's daily allocation from the latest answer, for metrics.
        self.api_usage: tuple[int, int] | None = None
        # Monotonic seconds the connector's own pauses are timed by (tests move it).
        self.clock: Callable[[], float] = time.monotonic
        self._holds: dict[HoldKind, _Hold] = {}  # the connector's own pauses, by kind
        # A daily-allocation pause ran out: the next call first asks /limits (one at a time).
        self._recheck_daily = False
        self._probe_lock = asyncio.Lock()
        self._concurrency_refusals = 0  # REQUEST_LIMIT_EXCEEDED for concurrency in a row
        self._unsure: dict[str, None] = {}  # insertion-ordered set (UNSURE_KEYS_MAX)
        # sObject -> (its fields as describe lists them, when loaded: time.monotonic()).
        self._described: dict[str, tuple[dict[str, FieldInfo], float]] = {}
        self._describe_lock = asyncio.Lock()

    def forget_schema(self) -> None:
        self._described = {}

    async def open(self) -> None:
        self.forget_schema()  # a start reads the org's describe data again
        verify: str | bool = str(self.config.ca_bundle) if self.config.ca_bundle else True
        self._session = _Session(self.config.timeout, verify)
        self._guard = guard_session(
            self._session, [self.config.login_url, self.config.instance_url]
        )
        self._login_lock = threading.Lock()
        self._sf: Any = None
        self._login_error: DeliveryError | None = None
        try:
            await self.run_blocking(self._login, None)
        except Exception as exc:
            # Not fatal: deliveries wait and retry, and the first one logs in again.
            mapped = classify(exc)
            if mapped is None:
                raise
            self._login_error = mapped
            log.warning(
                "salesforce %s: login failed: %s",
                self.instance,
                mapped,
                extra={"action": "connector.login_failed", "connector": self.instance},
            )

    async def verify(self) -> None:
        # `open` logged in (or tried to): its outcome is the answer, no call needed.
        if self._login_error is not None:
            raise self._login_error

    async def close(self) -> None:
        self._session.close()
        await super().close()

    def _login(self, stale: Any) -> Any:
        """Log in unless another thread already replaced the `stale` client."""
        from simple_salesforce.api import Salesforce
        from simple_salesforce.login import SalesforceLogin

        with self._login_lock:
            if self._sf is not None and self._sf is not stale:
                return self._sf
            cfg = self.config
            flow = cfg.flow
            if flow == "session":
                if stale is not None:
                    from simple_salesforce.exceptions import SalesforceExpiredSession

                    raise SalesforceExpiredSession(cfg.instance_url or "", 401, "session", b"")
                session_id = _secret(cfg.session_id)
                instance = urlsplit(cfg.instance_url or "").netloc
            elif flow in ("client_credentials", "jwt"):
                session_id, instance = self._oauth_token(flow)
            else:
                session_id, instance = SalesforceLogin(
                    username=cfg.username,
                    password=cfg.password.get_secret_value() if cfg.password else "",
                    security_token=cfg.security_token.get_secret_value()
                    if cfg.security_token
                    else "",
                    scratch_url=cfg.login_url.rstrip("/"),
                    sf_version=cfg.api_version,
                    session=self._session,
                )
            # A login names the instance: it must be in the login's domain (connectors/outbound.py).
            if flow != "session" and not instance_belongs(instance, cfg.login_url):
                from simple_salesforce.exceptions import SalesforceAuthenticationFailed

                raise SalesforceAuthenticationFailed(
                    "instance_url", f"the login named an instance outside {cfg.login_url}"
                )
            self._guard.allow(instance)
            self._sf = Salesforce(
                session_id=session_id,
                instance=instance,
                session=self._session,
                version=cfg.api_version,
            )
            return self._sf

    def _oauth_token(self, flow: str) -> tuple[str, str]:
        """A token by OAuth client credentials or JWT bearer from `login_url`'s token endpoint.

        simple-salesforce would build the token URL from `domain` (never a port, never an
        emulator): the connector asks for the token itself and builds the client from it.
        """
        from simple_salesforce.exceptions import SalesforceAuthenticationFailed

        cfg = self.config
        url = cfg.login_url.rstrip("/") + OAUTH_TOKEN_PATH
        if flow == "client_credentials":
            basic = (cfg.consumer_key or "", _secret(cfg.consumer_secret))
            form = {"grant_type": "client_credentials"}
            response = self._session.post(url, data=form, auth=basic)
        else:
            import jwt

            claims = {
                "iss": cfg.consumer_key,
                "sub": cfg.username,
                "aud": cfg.audience(),
                "exp": int(time.time()) + JWT_LIFETIME_SECONDS,
            }
            try:  # read at each login: a rotated key file is picked up
                key = Path(cfg.private_key_file or "").read_bytes()
                assertion = jwt.encode(claims, key, algorithm="RS256")
            except (OSError, ValueError, TypeError, jwt.PyJWTError) as exc:
                raise SalesforceAuthenticationFailed(
                    "private_key", f"cannot sign the JWT with {cfg.private_key_file}: {exc}"
                ) from exc
            response = self._session.post(
                url, data={"grant_type": JWT_GRANT, "assertion": assertion}
            )
        if response.status_code >= 500:
            response.raise_for_status()  # requests.HTTPError: retryable
        try:
            body = response.json()
        except ValueError:
            body = {}
        body = body if isinstance(body, dict) else {}
        if response.status_code != 200 or not body.get("access_token"):
            raise SalesforceAuthenticationFailed(
                body.get("error") or response.status_code,
                str(body.get("error_description") or response.text[:200]),
            )
        instance = urlsplit(str(body.get("instance_url") or "")).netloc
        if not instance:
            raise SalesforceAuthenticationFailed(
                "no_instance", "the token came without instance_url"
            )
        return str(body["access_token"]), instance

    # -- one HTTP call: pauses, limiter, session, usage ----------------------------------------
    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(client, *args)` on a thread, unless a pause holds calls back, after the limiter."""
        await self._check_pauses()
        return await self._send(fn, *args)

    async def _send(self, fn: Callable[..., T], *args: Any) -> T:
        try:
            await self.limiter.acquire()
            answer: tuple[T, tuple[int, int] | None]
            try:
                answer = await self.run_blocking(self._run, fn, args, None)
            except _SessionExpired as expired:
                await self.limiter.acquire()
                answer = await self.run_blocking(self._run, fn, args, expired.client)
        except DeliveryError:
            raise
        except _Refused as refused:
            exc = refused.error
            limited = self._limited(exc, refused.usage)
            if limited is not None:
                self.api_usage = refused.usage or self.api_usage
                raise limited from exc
            self._note_usage(refused.usage)
            mapped = classify(exc)
            if mapped is None:
                raise exc from None
            raise mapped from exc
        except Exception as exc:  # around the call: the outer timeout
            mapped = classify(exc)
            if mapped is None:
                raise
            raise mapped from exc
        result, usage = answer
        self._concurrency_refusals = 0
        self._note_usage(usage)
        return result

    def _run(
        self, fn: Callable[..., T], args: tuple[Any, ...], stale: Any
    ) -> tuple[T, tuple[int, int] | None]:
        """The call and the org's usage its answer reported; a failure comes as `_Refused`."""
        from simple_salesforce.exceptions import SalesforceExpiredSession

        self._session.take_usage()  # not an earlier call's on this thread
        try:
            sf = self._sf if stale is None and self._sf is not None else self._login(stale)
            try:
                result = fn(sf, *args)
            except SalesforceExpiredSession as exc:
                if stale is not None:
                    raise  # expired again right after a login: give up for now
                raise _SessionExpired(sf) from exc
        except _SessionExpired:
            raise
        except Exception as exc:
            raise _Refused(exc, self._session.take_usage()) from exc
        return result, self._session.take_usage()

    def _note_usage(self, usage: tuple[int, int] | None) -> None:
        if usage is None:
            return
        self.api_usage = usage
        used, total = usage
        if total and used >= self.config.daily_reserve * total:
            self._hold(
                "daily_allocation",
                self.config.daily_recheck_seconds,
                f"the org used {used} of {total} daily API requests, at or above "
                f"the {self.config.daily_reserve:.0%} this connector may use",
            )

    def _limited(self, exc: Exception, usage: tuple[int, int] | None) -> RetryableDelivery | None:
        """REQUEST_LIMIT_EXCEEDED as a pause of its kind; None for any other error."""
        code, message = _first_error(getattr(exc, "content", None))
        if code != "REQUEST_LIMIT_EXCEEDED":
            return None
        text = f"Salesforce {getattr(exc, 'status', 403)} {code}: {message}"
        if _allocation_spent(message, usage):
            counted = f" ({usage[0]} of {usage[1]} requests used)" if usage else ""
            seconds = self._hold(
                "daily_allocation",
                self.config.daily_recheck_seconds,
                f"the org's daily API allocation is spent{counted}",
            )
            return RetryableDelivery(text, retry_after=seconds)
        # Concurrent long requests (or a refusal the org's count does not back): seconds.
        self._concurrency_refusals += 1
        backoff = self.config.concurrency_backoff_seconds * 2 ** (self._concurrency_refusals - 1)
        seconds = self._hold(
            "concurrency",
            min(backoff, CONCURRENCY_BACKOFF_MAX),
            f"Salesforce refused concurrent requests ({message.strip() or code})",
        )
        return RetryableDelivery(text, retry_after=seconds)

    def _hold(self, kind: HoldKind, seconds: float, reason: str) -> float:
        """Hold every call back for `seconds` (longer if already held); returns `seconds`."""
        now = self.clock()
        current = self._holds.get(kind)
        if current is None or current.until <= now:
            log.warning(
                "salesforce %s: no calls for %.0fs: %s",
                self.instance,
                seconds,
                reason,
                extra={"action": f"connector.{kind}", "connector": self.instance},
            )
        until = max(now + seconds, current.until if current else 0.0)
        self._holds[kind] = _Hold(until, reason)
        if kind == "daily_allocation":
            self._recheck_daily = True
        return seconds

    def _held(self) -> tuple[float, str] | None:
        """(seconds left, reason) of the longest pause now; None when nothing holds."""
        now = self.clock()
        live = [(h.until - now, h.reason) for h in self._holds.values() if h.until > now]
        return max(live) if live else None

    async def _check_pauses(self) -> None:
        """Answer instead of calling while a pause holds; after a daily-allocation pause,
        ask /limits first whether the rolling 24-hour window freed calls (usage is a rolling
        count: nobody can say when, so the connector looks every `daily_recheck_seconds`)."""
        if self._recheck_daily and self._held() is None:
            async with self._probe_lock:
                if self._recheck_daily and self._held() is None:
                    await self._probe_limits()
        held = self._held()
        if held is not None:
            wait, reason = held
            raise RetryableDelivery(f"Salesforce: {reason}", retry_after=float(math.ceil(wait)))

    async def _probe_limits(self) -> None:
        self._recheck_daily = False
        try:
            limits = await self._send(_limits)
        except DeliveryError:
            self._recheck_daily = True  # unanswered: the next call asks again
            raise
        daily = (limits if isinstance(limits, dict) else {}).get("DailyApiRequests") or {}
        total, remaining = daily.get("Max"), daily.get("Remaining")
        if isinstance(total, int) and isinstance(remaining, int):
            self._note_usage((total - remaining, total))  # may hold again

    def pauses(self) -> list[Pause]:
        now, wall = self.clock(), time.time()
        own = [
            Pause(kind=kind, reason=f"Salesforce: {hold.reason}", until=wall + hold.until - now)
            for kind, hold in self._holds.items()
            if hold.until > now
        ]
        return own + self.limiter.pauses()

    # -- batches -------------------------------------------------------------------------------
    async def upsert_lead(self, lead: LeadUpsert) -> DeliveryResult:
        (outcome,) = await self.upsert_leads([lead])
        if isinstance(outcome, DeliveryError):
            raise outcome
        return outcome

    async def upsert_leads(self, leads: list[LeadUpsert]) -> list[Outcome]:
        """Outcomes per input, in input order.

        A record Salesforce refuses gets a PermanentDelivery with Salesforce's errorCode and
        message (RetryableDelivery for UNABLE_TO_LOCK_ROW); the others their result. A failure
        of a whole call (network, 5xx, expired session, daily limit) raises when no record has
        an outcome yet; after some have landed it becomes the outcome of the records left.
        """

        async def send(outcomes: Outcomes) -> None:
            ready = await self._check(leads, outcomes)
            items = _items(ready, self.config.target)
            for start in range(0, len(items), self.max_batch):
                await self._upsert_batch(items[start : start + self.max_batch], outcomes)

        return await per_record(len(leads), "Salesforce", send)

    # -- describe ------------------------------------------------------------------------------
    async def describe(self, object: str, reload: bool = False) -> dict[str, FieldInfo]:
        sobject = SOBJECTS.get(object, object)
        async with self._describe_lock:
            cached = self._described.get(sobject)
            age = time.monotonic() - cached[1] if cached else math.inf
            if reload or age >= self.config.describe_cache_seconds:
                started = time.monotonic()
                raw = await self._describe(sobject)
                fields = {f["name"]: _field_info(f) for f in raw.get("fields") or []}
                self._described[sobject] = (fields, started)
            return self._described[sobject][0]

    async def _describe(self, sobject: str) -> Any:
        try:
            return await self._call(_describe, sobject)
        except PermanentDelivery as exc:
            cause = exc.__cause__
            if getattr(cause, "status", None) != 404:
                raise
            # No record can pass while the org hides the object: the connector's set-up (the
            # object or the user's permissions), for a person to fix, not every delivery's.
            raise Misconfigured(
                f"Salesforce has no {sobject} object for this user (describe answered 404 "
                f"{_first_error(getattr(cause, 'content', None))[0] or 'NOT_FOUND'}): check "
                "the object's name and the user's profile and permission sets",
                retry_after=AUTH_PAUSE_SECONDS,
            ) from cause

    def _describe_stale(self, sobject: str) -> bool:
        cached = self._described.get(sobject)
        return cached is None or time.monotonic() - cached[1] >= DESCRIBE_RECHECK_SECONDS

    async def _check(
        self, leads: list[LeadUpsert], outcomes: Outcomes
    ) -> list[tuple[int, LeadUpsert]]:
        """Each lead's fields checked and coerced against its object's describe data; a lead
        with a field it refuses gets its PermanentDelivery now and is not sent."""
        if not self.config.validate_fields:
            return list(enumerate(leads))
        ready: list[tuple[int, LeadUpsert]] = []
        for position, lead in enumerate(leads):
            if not lead.fields:
                ready.append((position, lead))
                continue
            # The rule's object: its fields are for it (a Lead rule's record written to a
            # Contact loses the Lead-only ones later).
            wanted = lead.object
            sobject = SOBJECTS[wanted]
            described = await self.describe(wanted)
            coerced, problems = _coerce_fields(sobject, described, lead.fields)
            if problems and self._describe_stale(sobject):
                # The org may have gained the field or the picklist value since.
                described = await self.describe(wanted, reload=True)
                coerced, problems = _coerce_fields(sobject, described, lead.fields)
            if problems:
                outcomes[position] = PermanentDelivery(
                    "; ".join(str(p) for p in problems),
                    detail={"invalid_fields": [p.detail for p in problems]},
                )
                continue
            ready.append((position, lead.model_copy(update={"fields": coerced})))
        return ready

    # -- write policies --------------------------------------------------------------------------
    async def current(self, lead: LeadUpsert, names: list[str]) -> dict[str, Any] | None:
        (item,) = _items([(0, lead)], self.config.target)
        if item.by_email:
            await self._look_up([item])
        else:
            found = await self._current_by(item.obj, item.id_property, [item.id_value], [])
            item.target = next(iter(found.values()), {}).get("Id")
        if item.target is None:
            return None
        known = set(await self.describe(item.obj.lower()))
        wanted = [n for n in names if n in known and n != "Id"]
        found = await self._current_by(item.obj, "Id", [item.target], wanted)
        record = found.get(item.target) or {}
        return {n: record.get(n) for n in names if n in known}

    async def _current_by(
        self, obj: str, key: str, values: list[str], names: list[str]
    ) -> dict[str, dict[str, Any]]:
        """Records of `obj` whose `key` is one of `values`, with `names`, by key value."""
        from simple_salesforce.format import format_soql

        select = ", ".join(dict.fromkeys(["Id", key, *names]))
        found: dict[str, dict[str, Any]] = {}
        for start in range(0, len(values), 200):
            soql = format_soql(CURRENT_SOQL, select, obj, key, values[start : start + 200])
            page = await self._call(_query, soql)
            for record in page.get("records", []):
                found.setdefault(str(record.get(key)), record)
        return found

    async def _policies(self, items: list[_Item], outcomes: Outcomes) -> list[_Item]:
        """Apply write policies and `create: false` to items whose target is known (None: a
        create); the current values are read in one query per object. Returns the items
        still to write; the others have their outcome."""
        out: list[_Item] = []
        by_obj: dict[str, list[_Item]] = {}
        for item in items:
            if item.target is None:
                if not item.create:
                    # The delivery engine decides: wait for the write creating it, or not.
                    skipped = DeliveryResult(
                        skipped=f"no {item.obj} with {item.id_property} {item.id_value!r} "
                        "to update, and the rule does not create one",
                        missing=True,
                    )
                    self._settle(item, skipped, outcomes)
                    continue
            elif item.guarded():
                if item.current is not None and set(item.guarded()) <= set(item.current):
                    item.hold_back(item.current)  # the lookup read them: no second query
                else:
                    by_obj.setdefault(item.obj, []).append(item)
            out.append(item)
        for obj, group in by_obj.items():
            names = sorted({n for i in group for n in i.guarded()})
            if obj == "Lead":
                names = list(dict.fromkeys([*names, "IsConverted"]))
            found = await self._current_by(obj, "Id", [str(i.target) for i in group], names)
            for item in group:
                # A hinted record that is gone (or a converted Lead) keeps its fields: the
                # update fails as stale, and the lookup finds where the record went.
                current = found.get(str(item.target))
                if current is not None and not current.get("IsConverted"):
                    item.hold_back(current)
        return out

    async def _upsert_batch(self, items: list[_Item], outcomes: Outcomes) -> None:
        by_external_id: dict[tuple[str, str], list[_Item]] = {}
        for item in items:
            if not item.by_email:
                by_external_id.setdefault((item.obj, item.id_property), []).append(item)
        for (obj, id_field), group in by_external_id.items():
            if any(i.guarded() or not i.create for i in group):
                # Salesforce decides create versus update, but a policy needs to know first.
                values = [i.id_value for i in group]
                found = await self._current_by(obj, id_field, values, [])
                # SOQL's IN compares text without case, as an upsert by external id does.
                by_value = {k.casefold(): record for k, record in found.items()}
                for item in group:
                    item.target = (by_value.get(item.id_value.casefold()) or {}).get("Id")
                group = await self._policies(group, outcomes)
                group = self._unchanged(group, outcomes)
            if group:
                await self._upsert_by_external_id(obj, id_field, group, outcomes)

        # Email is not unique in Salesforce: update one record with it (`tie_break`), or create.
        by_email = [i for i in items if i.by_email]
        for item in by_email:
            item.target, item.by_hint = item.hint, item.hint is not None
            if item.hint and item.contact_first:
                item.obj = "Contact" if item.hint.startswith(WHO_PREFIXES["Contact"]) else "Lead"
        await self._look_up([i for i in by_email if not i.by_hint])
        stale = await self._save(await self._policies(by_email, outcomes), outcomes)
        if stale:  # hinted records that are gone: find them by email after all
            await self._look_up(stale)
            await self._save(await self._policies(stale, outcomes), outcomes)

    def _unchanged(self, items: list[_Item], outcomes: Outcomes) -> list[_Item]:
        """Existing records left with nothing to write (every field held back by its policy,
        or none mapped) are done without a call; returns the others."""
        out = []
        for item in items:
            if item.target and not item.record_fields():
                done = DeliveryResult(
                    record_id=item.target,
                    created=False,
                    detail={"unchanged": "nothing left to write"},
                )
                self._settle(item, done, outcomes)
            else:
                out.append(item)
        return out

    async def _look_up(self, items: list[_Item]) -> None:
        """Set each item's object and target: the record with its email that `tie_break`
        picks, in one query per object; None: create one.

        `contact_else_lead` items look among Contacts first, then among Leads. A converted
        Lead is never the target: an unconverted Lead with the email is, else the converted
        Lead's Contact.
        """
        for item in items:
            item.obj = "Contact" if item.contact_first else item.base_obj
            item.current = None
        for obj in ("Contact", "Lead"):  # a contact_else_lead item not found moves on to Leads
            group = [i for i in items if i.obj == obj]
            also = self._readable(obj, {n for i in group for n in i.guarded()})
            found = await self._find_records(obj, "Email", [i.email_key for i in group], also)
            for item in group:
                item.target, item.current = found.get(item.email_key, (None, None))
                if obj == "Contact" and item.contact_first and item.target is None:
                    item.obj = "Lead"
                if (
                    obj == "Lead"
                    and item.target
                    and item.target.startswith(WHO_PREFIXES["Contact"])
                ):
                    item.obj = "Contact"  # the Contact a converted Lead became

    def _readable(self, obj: str, names: set[str]) -> list[str]:
        """The fields of `names` a lookup of `obj` may read as well: those its cached describe
        lists (a name it does not know would fail the whole query; `_policies` reads the
        others by Id)."""
        described = self._described.get(obj)
        return sorted(n for n in names if described and n in described[0])

    async def _find_by(self, obj: str, key: str, values: list[str]) -> dict[str, str]:
        """Folded key value -> the id of the record with it that `tie_break` picks."""
        found = await self._find_records(obj, key, values)
        return {value: record_id for value, (record_id, _) in found.items()}

    async def _find_records(
        self, obj: str, key: str, values: list[str], also: list[str] | None = None
    ) -> dict[str, tuple[str, dict[str, Any] | None]]:
        """Folded key value -> (the id of the record with it that `tie_break` picks, its
        values of `also`), in one query per ~6 KB of values; a converted Lead's Contact
        ("003…") comes without values."""
        if not values:
            return {}
        order = TIE_BREAK_ORDER[self.config.tie_break]
        found: dict[str, tuple[str, dict[str, Any] | None]] = {}
        converted: dict[str, tuple[str, dict[str, Any] | None]] = {}
        for soql in _soql_chunks(obj, list(dict.fromkeys(values)), order, key, also or ()):
            page = await self._call(_query, soql)
            while True:
                for record in page.get("records", []):
                    # Sorted by the tie-break: keep the first record seen per value; SOQL
                    # compares text in any case, so must this.
                    value = next((v for k, v in record.items() if k.lower() == key.lower()), "")
                    folded = _fold(value or "")
                    if not record.get("IsConverted"):
                        current = {n: record.get(n) for n in also} if also else None
                        found.setdefault(folded, (str(record["Id"]), current))
                    elif record.get("ConvertedContactId"):
                        converted.setdefault(folded, (str(record["ConvertedContactId"]), None))
                if page.get("done", True) or not page.get("nextRecordsUrl"):
                    break
                page = await self._call(_query_more, page["nextRecordsUrl"])
        return converted | found

    async def _save(self, items: list[_Item], outcomes: Outcomes) -> list[_Item]:
        """Update the items that have a target, create the others.

        Returns the items updated by a hint whose record is gone, without an outcome.
        """
        stale: list[_Item] = []
        # Grouped by object: Salesforce processes a collection in runs of one type (10 at most).
        updates = sorted(
            self._unchanged([i for i in items if i.target], outcomes), key=lambda i: i.obj
        )
        creates = sorted((i for i in items if not i.target), key=lambda i: i.obj)
        if updates:
            records = [{"Id": i.target, **i.record_fields()} for i in updates]
            results = await self._write("PATCH", updates, records)
            for item, result in zip(updates, results, strict=True):
                if item.by_hint and not result.get("success") and _is_missing(result):
                    # Gone, or a converted Lead: look for the record (or its Contact) by email.
                    item.target, item.by_hint = None, False
                    stale.append(item)
                else:
                    self._settle(item, _outcome(result, item.target, created=False), outcomes)
        if creates:
            records = [_required_for_create(i.obj, i.record_fields(), i.id_value) for i in creates]
            results = await self._write("POST", creates, records)
            for item, result in zip(creates, results, strict=True):
                self._settle(item, _outcome(result, None, created=True), outcomes)
        return stale

    async def _upsert_by_external_id(
        self, obj: str, id_field: str, items: list[_Item], outcomes: Outcomes
    ) -> None:
        """Salesforce decides create versus update by the external id: no lookup."""
        from simple_salesforce.format import format_external_id

        if len(items) == 1:
            (item,) = items
            path = f"sobjects/{obj}/{format_external_id(id_field, item.id_value)}"
            headers = self.config.create_headers()  # an upsert may create
            results = [await self._call(_write_one, "PATCH", path, item.fields, headers)]
        else:
            records = [
                {"attributes": {"type": obj}, **i.fields, id_field: i.id_value} for i in items
            ]
            path = f"composite/sobjects/{obj}/{id_field}"
            headers = self.config.create_headers()
            results = self._checked(
                await self._call(_collection, path, "PATCH", records, headers), items
            )
        for item, result in zip(items, results, strict=True):
            # Before API 46 a single upsert answered 201 {id} when it created, 204 otherwise.
            created = result.get("created", bool(result.get("id")))
            self._settle(item, _outcome(result, None, created), outcomes)

    async def _write(
        self, method: Literal["POST", "PATCH"], items: list[_Item], records: list[dict[str, Any]]
    ) -> list[dict[str, Any]]:
        """Create (POST) or update (PATCH, records carry Id) `items`; one result per item."""
        cfg = self.config
        headers = cfg.create_headers() if method == "POST" else cfg.write_headers()
        if len(items) == 1:
            (item,), (record,) = items, records
            if method == "POST":
                path = f"sobjects/{item.obj}/"
                return [await self._call(_write_one, method, path, record, headers)]
            body = {k: v for k, v in record.items() if k != "Id"}
            path = f"sobjects/{item.obj}/{quote(str(record['Id']), safe='')}"
            result = await self._call(_write_one, method, path, body, headers)
            return [{"id": record["Id"], **result}]
        typed = [{"attributes": {"type": i.obj}, **r} for i, r in zip(items, records, strict=True)]
        return self._checked(
            await self._call(_collection, "composite/sobjects", method, typed, headers), items
        )

    # -- activities --------------------------------------------------------------------------------
    async def log_activity(self, activity: Activity) -> DeliveryResult:
        """A completed Task on the Lead or Contact, once whatever the attempt.

        The result's `record_id` is the Lead's or Contact's id (the store remembers it for the
        record's next deliveries); the Task's id is in `detail["activity_id"]`.
        """
        (outcome,) = await self.log_activities([activity])
        if isinstance(outcome, DeliveryError):
            raise outcome
        return outcome

    async def log_activities(self, activities: list[Activity]) -> list[Outcome]:
        """Outcomes per activity, in order, as `upsert_leads`: the WhoIds of a batch in one
        query per object (none for a `record_id` hint), its Tasks in one Collections create."""

        async def send(outcomes: Outcomes) -> None:
            entries = [self._logging(i, a) for i, a in enumerate(activities)]
            for start in range(0, len(entries), self.max_activity_batch):
                await self._log_batch(entries[start : start + self.max_activity_batch], outcomes)

        return await per_record(len(activities), "Salesforce", send)

    def _logging(self, position: int, activity: Activity) -> _Logging:
        target = self.config.target
        wanted = activity.object if target in ("rule", "contact_else_lead") else target
        obj = "Lead" if wanted == "lead" else "Contact"
        # Look before creating on a redelivery, or after a create whose answer never came.
        look = activity.attempt > 1 or activity.key in self._unsure
        entry = _Logging(position, activity, obj, look)
        hint = activity.record_id
        # A hint of another object than the activity's is no hint (contact_else_lead: either).
        prefixes = tuple(WHO_PREFIXES.values()) if target == "contact_else_lead" else ()
        if hint and hint.startswith((WHO_PREFIXES[obj], *prefixes)):
            entry.who, entry.by_hint = hint, True
        return entry

    async def _log_batch(self, entries: list[_Logging], outcomes: Outcomes) -> None:
        await self._find_whos([e for e in entries if e.who is None], outcomes)
        gone = await self._create_tasks([e for e in entries if e.who is not None], outcomes)
        stale = [e for e in gone if e.by_hint]
        gone = [e for e in gone if not e.by_hint]
        for entry in stale:  # deleted, merged or converted: find the record by its key
            entry.who, entry.by_hint = None, False
        await self._find_whos(stale, outcomes)
        gone += await self._create_tasks([e for e in stale if e.who is not None], outcomes)
        for entry in gone:  # deleted or merged between the query and the create: look again
            outcomes[entry.position] = RetryableDelivery(
                f"Salesforce {entry.obj} {entry.activity.id_value} vanished while logging "
                "the activity"
            )

    async def _find_whos(self, entries: list[_Logging], outcomes: Outcomes) -> None:
        """Set each entry's WhoId: the record with its key that upserts update (`tie_break`,
        `contact_else_lead` a Contact first, a converted Lead's Contact), in one query per
        object and key field. An entry without one gets its `missing` outcome."""
        either = self.config.target == "contact_else_lead"
        by_email = [e for e in entries if e.by_email]
        contacts = [e for e in by_email if either or e.obj == "Contact"]
        found = await self._find_by("Contact", "Email", [e.key for e in contacts])
        for entry in contacts:
            entry.who = found.get(entry.key)
        leads = [e for e in by_email if e.who is None and e.obj == "Lead"]
        found = await self._find_by("Lead", "Email", [e.key for e in leads])
        for entry in leads:
            entry.who = found.get(entry.key)
        # An external id belongs to the activity's object only.
        by_field: dict[tuple[str, str], list[_Logging]] = {}
        for entry in entries:
            if not entry.by_email:
                by_field.setdefault((entry.obj, entry.id_field), []).append(entry)
        for (obj, id_field), group in by_field.items():
            found = await self._find_by(obj, id_field, [e.activity.id_value for e in group])
            for entry in group:
                entry.who = found.get(entry.key)
        for entry in entries:
            if entry.who is None:
                value = entry.activity.id_value.strip()
                outcomes[entry.position] = DeliveryResult(
                    skipped=f"no Salesforce {entry.obj} with {entry.id_field} {value} to log "
                    "the activity on",
                    missing=True,
                    detail={"object": entry.obj, "id_field": entry.id_field, "id_value": value},
                )

    async def _create_tasks(self, entries: list[_Logging], outcomes: Outcomes) -> list[_Logging]:
        """Find or create each entry's Task on its `who`; returns the entries whose `who`
        Salesforce says is not there (any more), without an outcome."""
        found = await self._find_tasks([e for e in entries if e.look])
        for entry in entries:
            if (task_id := found.get(entry.activity.key)) is not None:
                self._unsure.pop(entry.activity.key, None)
                detail = {"object": "Task", "activity_id": task_id, "found_existing": True}
                outcomes[entry.position] = DeliveryResult(
                    record_id=entry.who, created=False, detail=detail
                )
        entries = [e for e in entries if e.activity.key not in found]
        if not entries:
            return []
        # Until Salesforce answers, the writes may land without us hearing of it.
        for entry in entries:
            self._unsure[entry.activity.key] = None
        while len(self._unsure) > UNSURE_KEYS_MAX:
            del self._unsure[next(iter(self._unsure))]
        try:
            results = await self._write_tasks(
                [_task_fields(e.activity, str(e.who)) for e in entries]
            )
        except DeliveryError as exc:
            if not _maybe_written(exc):
                for entry in entries:
                    self._unsure.pop(entry.activity.key, None)
                raise
            # Not again at once: give a write still in progress time to land, then look.
            settle = self.config.activity_settle_seconds
            raise RetryableDelivery(
                f"{exc} (the Task may have been written: the next attempt looks for it first)",
                retry_after=max(settle, getattr(exc, "retry_after", None) or 0.0),
            ) from exc
        gone = []
        for entry, result in zip(entries, results, strict=True):
            self._unsure.pop(entry.activity.key, None)  # an answer: written or refused
            if result.get("success"):
                detail = {"object": "Task", "activity_id": result.get("id")}
                outcomes[entry.position] = DeliveryResult(
                    record_id=entry.who, created=True, detail=detail
                )
            elif _who_gone(result):
                gone.append(entry)
            else:
                outcomes[entry.position] = _outcome(result, None, None)
        return gone

    async def _write_tasks(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if len(records) == 1:  # the single-record route: no cheaper as a collection
            return [await self._call(_write_one, "POST", "sobjects/Task/", records[0])]
        typed = [{"attributes": {"type": "Task"}, **r} for r in records]
        answer = await self._call(_collection, "composite/sobjects", "POST", typed)
        return self._checked(answer, records)

    async def _find_tasks(self, entries: list[_Logging]) -> dict[str, str]:
        """Activity key -> the id of the Task on the entry's `who` whose Description carries
        the key's marker, for the entries that have one; one query per ~6 KB of ids."""
        if not entries:
            return {}
        wanted: dict[str, list[_Logging]] = {}
        for entry in entries:
            wanted.setdefault(str(entry.who)[:15], []).append(entry)
        found: dict[str, str] = {}
        for soql in _tasks_soql([(str(e.who), e.subject) for e in entries]):
            page = await self._call(_query, soql)
            while True:
                for record in page.get("records", []):
                    description = record.get("Description") or ""
                    # The marker names the key: the Subject only narrowed the query.
                    for entry in wanted.get(str(record.get("WhoId"))[:15], []):
                        if _marker(entry.activity.key) in description:
                            found.setdefault(entry.activity.key, str(record["Id"]))
                if page.get("done", True) or not page.get("nextRecordsUrl"):
                    break
                page = await self._call(_query_more, page["nextRecordsUrl"])
        return found

    @staticmethod
    def _checked(results: Any, items: list[Any]) -> list[dict[str, Any]]:
        if not isinstance(results, list) or len(results) != len(items):
            raise RetryableDelivery(f"Salesforce answered a collection with {results!r:.200}")
        return [r if isinstance(r, dict) else {"success": False, "errors": []} for r in results]

    @staticmethod
    def _settle(item: _Item, outcome: Outcome, outcomes: Outcomes) -> None:
        if item.held and isinstance(outcome, DeliveryResult):
            detail = {**outcome.detail, "held_back": dict(item.held)}
            outcome = outcome.model_copy(update={"detail": detail})
        for position in item.positions:
            outcomes[position] = outcome
