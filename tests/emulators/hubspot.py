"""HubSpot CRM v3 emulator: contacts (batch upsert, batch read by id, email or another unique
property), notes and tasks (create, batch create with associations, batch read), v4 associations
(default create, list a contact's notes or tasks, batch read), properties, OAuth token refresh.
``endpoint_counts()`` counts the calls per endpoint, so tests can assert calls per record.

Wire format, status codes, error bodies and rate-limit headers follow
/work/shared/docs/crm-apis.md §2; where the real API is unverified (§5) the
choice is noted beside the code. State is plain Python under ``lock`` and can be
read and changed from the test thread while the server runs.
"""

from __future__ import annotations

import base64
import collections
import json
import re
import ssl
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Any
from urllib.parse import parse_qs, unquote

from .runner import Call, EmulatorBase, Reply, call_matcher
from .tls import LocalCA

__all__ = ["HubSpotEmulator", "HubSpotRecord", "PropertyDef"]

LIFECYCLE_STAGES = (
    "subscriber lead marketingqualifiedlead salesqualifiedlead opportunity customer evangelist "
    "other"
).split()
LEAD_STATUSES = (
    "NEW OPEN IN_PROGRESS OPEN_DEAL UNQUALIFIED ATTEMPTED_TO_CONTACT CONNECTED BAD_TIMING"
).split()
# What GET and search return when the caller names no properties.
DEFAULT_PROPERTIES = "createdate email firstname hs_object_id lastmodifieddate lastname".split()
SYSTEM_PROPERTIES = ["createdate", "hs_object_id", "lastmodifieddate"]
NOTE_TO_CONTACT, CONTACT_TO_NOTE = 202, 201
TASK_TO_CONTACT, CONTACT_TO_TASK = 204, 203
LEAD_TO_PRIMARY_CONTACT, CONTACT_TO_LEAD = 578, 579
LEAD_TYPES = "NEW_BUSINESS UPSELL RE_ATTEMPTING".split()
# HUBSPOT_DEFINED association type ids by (from, to) object type.
ASSOCIATION_TYPES = {
    ("notes", "contacts"): NOTE_TO_CONTACT,
    ("contacts", "notes"): CONTACT_TO_NOTE,
    ("tasks", "contacts"): TASK_TO_CONTACT,
    ("contacts", "tasks"): CONTACT_TO_TASK,
    ("leads", "contacts"): LEAD_TO_PRIMARY_CONTACT,
    ("contacts", "leads"): CONTACT_TO_LEAD,
}
ENGAGEMENTS = ("notes", "tasks")
# What a read of a note or task returns besides the properties asked for.
ENGAGEMENT_SYSTEM_PROPERTIES = ["hs_createdate", "hs_lastmodifieddate", "hs_object_id"]
TASK_STATUSES = "NOT_STARTED IN_PROGRESS WAITING COMPLETED DEFERRED".split()
TASK_PRIORITIES = "LOW MEDIUM HIGH".split()
TASK_TYPES = "EMAIL CALL TODO LINKED_IN".split()
# Inputs per batch call (v3 batch create/read/upsert), and per v4 association batch read.
BATCH_LIMIT = 100
ASSOCIATION_BATCH_LIMIT = 1000
# Associations of one record per page (the v4 list, and each input of the v4 batch read).
ASSOCIATION_PAGE = 500
# A path segment that is a record id or an email, for ``endpoint_counts``.
ID_SEGMENT_RE = re.compile(r"/(\d+|[^/]*(?:@|%40)[^/]*)(?=/|$)")
MISSING_SCOPES_MESSAGE = (
    "This app hasn't been granted all required scopes to make this call. Read more about "
    "required scopes here: https://developers.hubspot.com/scopes."
)
# hs_timestamp and other datetimes: epoch milliseconds, or an ISO 8601 date or date-time.
EPOCH_MS_RE = re.compile(r"^-?\d+$")
EMAIL_RE = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
HTML = "text/html;charset=utf-8"
OAUTH_TOKEN_PATH = "/oauth/v1/token"
# HubSpot's OAuth access tokens live 30 minutes.
OAUTH_EXPIRES_IN = 1800
AUTH_MESSAGE = (
    "Authentication credentials not found. This API supports OAuth 2.0 authentication and you "
    "can find more details at https://developers.hubspot.com/docs/methods/auth/oauth-overview"
)
RATE_MESSAGES = {
    "TEN_SECONDLY_ROLLING": "You have reached your ten_secondly_rolling limit.",
    "DAILY": "You have reached your daily limit.",
}
# Unknown paths get the gateway's Jetty page, not JSON (as the real API answers).
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
    options: list[str] | None = None  # enumeration values in order (lifecyclestage order matters)
    read_only: bool = False
    unique: bool = False
    group: str = "contactinformation"
    hubspot_defined: bool = True

    def to_json(self) -> dict[str, Any]:
        options = [
            {"label": v, "value": v, "displayOrder": i, "hidden": False, "description": ""}
            for i, v in enumerate(self.options or [])
        ]
        return {
            "name": self.name,
            "label": self.label,
            "type": self.type,
            "fieldType": self.field_type,
            "description": "",
            "groupName": self.group,
            "options": options,
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


def default_properties() -> dict[str, dict[str, PropertyDef]]:
    """Contact and note properties the connectors use, with HubSpot's default options."""
    ro: dict[str, Any] = {"read_only": True}
    engagement: dict[str, Any] = {"group": "engagement"}
    contacts = [
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
        PropertyDef(
            "lifecyclestage", "Lifecycle Stage", "enumeration", "radio", list(LIFECYCLE_STAGES)
        ),
        PropertyDef("hs_object_id", "Record ID", "number", "number", unique=True, **ro),
        PropertyDef("createdate", "Create Date", "datetime", "date", **ro),
        PropertyDef("lastmodifieddate", "Last Modified Date", "datetime", "date", **ro),
    ]
    notes = [
        PropertyDef("hs_timestamp", "Activity date", "datetime", "date", **engagement),
        PropertyDef("hs_note_body", "Note body", field_type="html", **engagement),
        PropertyDef("hubspot_owner_id", "Activity assigned to", **engagement),
        PropertyDef("hs_attachment_ids", "Attachment IDs", **engagement),
        PropertyDef("hs_object_id", "Record ID", "number", "number", unique=True, **ro),
        PropertyDef("hs_createdate", "Create Date", "datetime", "date", **ro),
        PropertyDef("hs_lastmodifieddate", "Last Modified Date", "datetime", "date", **ro),
    ]
    tasks = [
        PropertyDef("hs_timestamp", "Due date", "datetime", "date", **engagement),
        PropertyDef("hs_task_subject", "Task Title", **engagement),
        PropertyDef("hs_task_body", "Notes", field_type="html", **engagement),
        PropertyDef(
            "hs_task_status", "Task Status", "enumeration", "select", TASK_STATUSES, **engagement
        ),
        PropertyDef(
            "hs_task_priority", "Priority", "enumeration", "select", TASK_PRIORITIES, **engagement
        ),
        PropertyDef("hs_task_type", "Task Type", "enumeration", "select", TASK_TYPES, **engagement),
        PropertyDef("hubspot_owner_id", "Assigned to", **engagement),
        PropertyDef("hs_object_id", "Record ID", "number", "number", unique=True, **ro),
        PropertyDef("hs_createdate", "Create Date", "datetime", "date", **ro),
        PropertyDef("hs_lastmodifieddate", "Last Modified Date", "datetime", "date", **ro),
    ]
    leads = [
        PropertyDef("hs_lead_name", "Lead name"),
        PropertyDef("hs_lead_type", "Lead type", "enumeration", "select", LEAD_TYPES),
        PropertyDef(
            "hs_lead_label", "Lead label", "enumeration", "select", ["COLD", "WARM", "HOT"]
        ),
        PropertyDef("hubspot_owner_id", "Lead owner"),
        PropertyDef("hs_object_id", "Record ID", "number", "number", unique=True, **ro),
        PropertyDef("hs_createdate", "Create Date", "datetime", "date", **ro),
        PropertyDef("hs_lastmodifieddate", "Last Modified Date", "datetime", "date", **ro),
    ]
    return {
        "contacts": {p.name: p for p in contacts},
        "notes": {p.name: p for p in notes},
        "tasks": {p.name: p for p in tasks},
        "leads": {p.name: p for p in leads},
    }


@dataclass
class HubSpotRecord:
    """A stored contact or note. ``history`` keeps (clock time, properties) per write so
    that search can lag behind writes (``search_delay``)."""

    id: str
    properties: dict[str, str]
    created_at: str
    updated_at: str
    history: list[tuple[float, dict[str, str]]] = field(default_factory=list)

    def to_json(
        self, names: list[str] | None = None, props: dict[str, str] | None = None
    ) -> dict[str, Any]:
        props = self.properties if props is None else props
        shown = props if names is None else {n: props.get(n) for n in names}
        return {
            "id": self.id,
            "properties": shown,
            "createdAt": self.created_at,
            "updatedAt": self.updated_at,
            "archived": False,
        }


class BadInput(Exception):
    """A body the API cannot deserialize: 400 without a category."""


class Refused(Exception):
    """A request a route refuses with ``reply`` (raised from helpers shared by routes)."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(reply.status)
        self.reply = reply


class ValidationFailure(Exception):
    """A 400 VALIDATION_ERROR with HubSpot's per-property error entries."""

    def __init__(self, *errors: dict[str, str]) -> None:
        super().__init__(errors)
        self.errors = list(errors)


def invalid(name: str, code: str, message: str) -> dict[str, str]:
    return {"name": name, "code": code, "message": message}


def hs_error(status: int, message: str, category: str | None = None, **extra: Any) -> Reply:
    """HubSpot's error body: ``{status, message, correlationId, [context], category}``."""
    body: dict[str, Any] = {
        "status": "error",
        "message": message,
        "correlationId": str(uuid.uuid4()),
    }
    body.update(extra)
    if category:
        body["category"] = category
    return Reply(status, body)


def bad_request(message: str) -> Reply:
    return hs_error(400, message, "VALIDATION_ERROR")


def not_found(object_id: str) -> Reply:
    message = "Object not found.  objectId are usually numeric."
    return hs_error(404, message, "OBJECT_NOT_FOUND", context={"id": [object_id]})


class HubSpotEmulator(EmulatorBase):
    """An emulated HubSpot account at ``url`` (plain HTTP unless ``tls`` is given).

    State: ``contacts``, ``notes`` and ``tasks`` (id → HubSpotRecord), ``associations`` (set
    of (note_id, contact_id)), ``task_associations`` (set of (task_id, contact_id)),
    ``properties`` (object type → name → PropertyDef), ``calls``.
    Knobs read on every request: ``token``, ``tier_max``, ``interval_ms``, ``daily``,
    ``daily_used``, ``search_per_second``, ``retry_after``, ``search_delay``, ``latency``,
    ``clock``, ``reverse_batch_results``, ``oauth_expires_in``, ``unavailable`` (path prefixes
    answered as unknown routes: 404) and ``missing_scopes`` (path prefix → scope: 403).
    OAuth: ``add_oauth_app`` registers a client and its refresh token; ``POST /oauth/v1/token``
    (form-encoded, ``grant_type=refresh_token``) issues access tokens accepted like ``token``
    until they expire on ``clock`` (``expire_oauth_tokens`` ends them early).
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
        self.retry_after = retry_after  # seconds; None: 429s carry no Retry-After (HubSpot's usual)
        self.search_delay = search_delay  # clock seconds before a write becomes searchable
        # HubSpot does not promise batch results in input order: True answers them reversed.
        self.reverse_batch_results = False
        self.portal_id = portal_id
        self.contacts: dict[str, HubSpotRecord] = {}
        self.notes: dict[str, HubSpotRecord] = {}
        self.tasks: dict[str, HubSpotRecord] = {}
        self.associations: set[tuple[str, str]] = set()  # (note id, contact id)
        self.task_associations: set[tuple[str, str]] = set()  # (task id, contact id)
        self.leads: dict[str, HubSpotRecord] = {}  # the Leads object (crm/v3/objects/leads)
        self.lead_associations: set[tuple[str, str]] = set()  # (lead id, contact id)
        self.properties = default_properties()
        self.oauth_clients: dict[str, str] = {}  # client id -> client secret
        self.refresh_tokens: dict[str, str] = {}  # refresh token -> client id
        self.oauth_tokens: dict[str, float] = {}  # access token -> expiry on ``clock``
        self.oauth_expires_in = OAUTH_EXPIRES_IN
        # Path prefixes this portal does not serve (a wrong base URL, an API not enabled): the
        # gateway's 404 page, as for any unknown path.
        self.unavailable: set[str] = set()
        # Path prefix -> the scope the token lacks for it: 403 MISSING_SCOPES.
        self.missing_scopes: dict[str, str] = {}
        self._next_id = 100
        self._window: collections.deque[float] = collections.deque()
        self._search_window: collections.deque[float] = collections.deque()
        contact, engagement, props = (
            "/crm/v3/objects/contacts",
            "/crm/v3/objects/(?P<object_type>notes|tasks|leads)",
            "/crm/v3/properties",
        )
        # v4 paths take the object type in the singular or the plural.
        v4_type = "(?P<{}>notes?|tasks?|leads?|contacts?)"
        assoc_of = "/crm/v4/objects/" + v4_type.format("from_type") + "/(?P<from_id>[^/]+)"
        assoc_default = assoc_of + "/associations/default/" + v4_type.format("to_type")
        routes: list[tuple[str, str, Callable[..., Reply]]] = [
            ("POST", contact + "/?", self._create_contact),
            ("POST", contact + "/batch/upsert", self._batch_upsert),
            ("POST", contact + "/batch/read", self._batch_read_contacts),
            ("POST", contact + "/search", self._search),
            ("GET", contact + "/(?P<object_id>[^/]+)", self._get_contact),
            ("PATCH", contact + "/(?P<object_id>[^/]+)", self._update_contact),
            ("POST", engagement + "/?", self._create_engagement),
            ("POST", engagement + "/batch/create", self._batch_create),
            ("POST", engagement + "/batch/read", self._batch_read),
            ("PUT", assoc_default + "/(?P<to_id>[^/]+)", self._associate_default),
            ("GET", assoc_of + "/associations/" + v4_type.format("to_type"), self._associations),
            (
                "POST",
                "/crm/v4/associations/"
                + v4_type.format("from_type")
                + "/"
                + v4_type.format("to_type")
                + "/batch/read",
                self._batch_associations,
            ),
            ("GET", props + "/(?P<object_type>[^/]+)/?", self._list_properties),
            ("GET", props + "/(?P<object_type>[^/]+)/(?P<name>[^/]+)", self._get_property),
        ]
        self._routes = [(method, re.compile(path), handler) for method, path, handler in routes]

    def _ssl_context(self) -> ssl.SSLContext | None:
        return self.tls.server_context() if self.tls else None

    @property
    def ca_path(self) -> str | None:
        return str(self.tls.ca_path) if self.tls and self.tls.ca_path else None

    # -- state helpers for tests ---------------------------------------------------------------
    def add_contact(self, properties: dict[str, Any]) -> HubSpotRecord:
        """Store a contact directly (no validation, no API call counted)."""
        with self.lock:
            return self._insert(self.contacts, _normalise(properties))

    def contact_by_email(self, email: str) -> HubSpotRecord | None:
        with self.lock:
            return self._find_contact("email", email)

    def delete_contact(self, contact_id: str) -> None:
        """Remove a contact and its associations (deleted or merged away in the portal)."""
        with self.lock:
            self.contacts.pop(contact_id, None)
            for links in (self.associations, self.task_associations, self.lead_associations):
                links.difference_update({link for link in links if link[1] == contact_id})

    def endpoint_counts(self, since: int = 0) -> dict[str, int]:
        """Calls per endpoint since the ``since``-th call, as ``{"POST /crm/v3/objects/
        notes/batch/create": 1, "GET /crm/v3/objects/contacts/{id}": 3}``: record ids and
        emails in the path read ``{id}``."""
        with self.lock:
            calls = self.calls[since:]
        counts = collections.Counter(
            f"{c.method} {ID_SEGMENT_RE.sub('/{id}', c.raw_path)}" for c in calls
        )
        return dict(counts)

    def add_engagement(
        self, object_type: str, properties: dict[str, Any], contact_id: str | None = None
    ) -> HubSpotRecord:
        """Store a note or task directly, associated to ``contact_id`` if given (no API call)."""
        with self.lock:
            record = self._insert(self._table(object_type), _normalise(properties))
            if contact_id is not None:
                self._links(object_type).add((record.id, contact_id))
            return record

    def engagements_of(self, object_type: str, contact_id: str) -> list[HubSpotRecord]:
        """The notes or tasks associated to a contact, oldest first."""
        with self.lock:
            table = self._table(object_type)
            ids = sorted((e for e, c in self._links(object_type) if c == contact_id), key=int)
            return [table[i] for i in ids if i in table]

    def add_property(
        self,
        name: str,
        type: str = "string",
        field_type: str = "text",
        options: list[str] | None = None,
        *,
        object_type: str = "contacts",
        label: str | None = None,
        unique: bool = False,
    ) -> PropertyDef:
        """Register a custom property (an enumeration takes ``options``)."""
        prop = PropertyDef(
            name, label or name, type, field_type, options, unique=unique, hubspot_defined=False
        )
        with self.lock:
            self.properties[object_type][name] = prop
        return prop

    def set_property_options(
        self, name: str, options: list[str], object_type: str = "contacts"
    ) -> None:
        """Replace an enumeration's options (for lifecyclestage the order is the stage order)."""
        with self.lock:
            self.properties[object_type][name].options = list(options)

    # -- OAuth ---------------------------------------------------------------------------------
    def add_oauth_app(self, client_id: str, client_secret: str, refresh_token: str) -> None:
        """An app installed in this portal: its credentials and one refresh token."""
        with self.lock:
            self.oauth_clients[client_id] = client_secret
            self.refresh_tokens[refresh_token] = client_id

    def expire_oauth_tokens(self) -> None:
        """Every access token issued so far expires now (a clock jump, a long suspend)."""
        with self.lock:
            now = self.clock()
            self.oauth_tokens = {t: min(e, now) for t, e in self.oauth_tokens.items()}

    def _oauth_token(self, call: Call) -> Reply:
        """``POST /oauth/v1/token``: a form body; errors are ``{status: BAD_..., message}``."""
        form = {k: v[0] for k, v in parse_qs(call.body, keep_blank_values=True).items()}

        def refused(status: str, message: str) -> Reply:
            return Reply(
                400, {"status": status, "message": message, "correlationId": str(uuid.uuid4())}
            )

        if form.get("grant_type") != "refresh_token":
            return refused("BAD_GRANT_TYPE", "missing or unsupported grant_type")
        client_id = form.get("client_id", "")
        if client_id not in self.oauth_clients:
            return refused("BAD_CLIENT_ID", "missing or unknown client id")
        if self.oauth_clients[client_id] != form.get("client_secret"):
            return refused("BAD_CLIENT_SECRET", "missing or invalid client secret")
        refresh = form.get("refresh_token", "")
        if self.refresh_tokens.get(refresh) != client_id:
            return refused("BAD_REFRESH_TOKEN", "missing or unknown refresh token")
        access = f"oauth-{uuid.uuid4().hex}"
        self.oauth_tokens[access] = self.clock() + self.oauth_expires_in
        # HubSpot's refresh tokens do not rotate: the same one comes back.
        body = {
            "token_type": "bearer",
            "refresh_token": refresh,
            "access_token": access,
            "expires_in": self.oauth_expires_in,
        }
        return Reply(200, body)

    def _unauthorized(self, call: Call) -> Reply | None:
        """None when the bearer token is the private-app token or a live OAuth token."""
        header = call.headers.get("Authorization", "")
        token = header[len("Bearer ") :] if header.startswith("Bearer ") else None
        if token is not None and token == self.token:
            return None
        expiry = self.oauth_tokens.get(token or "")
        if expiry is None:
            return hs_error(401, AUTH_MESSAGE, "INVALID_AUTHENTICATION")
        ago = self.clock() - expiry
        if ago < 0:
            return None
        # The real message counts the seconds since expiry; the category is EXPIRED_AUTHENTICATION.
        message = f"The OAuth token used to make this call expired {int(ago)} second(s) ago."
        return hs_error(401, message, "EXPIRED_AUTHENTICATION")

    # -- failure switches ----------------------------------------------------------------------
    def exhaust_rate_limit(self) -> None:
        """Fill the current ten-second window: the next counted request gets a 429."""
        with self.lock:
            now = self.clock()
            self._prune(now)
            self._window.extend([now] * max(0, self.tier_max - len(self._window)))

    def fail_next_rate_limited(
        self,
        n: int = 1,
        retry_after: float | None = None,
        match: str | None = None,
        method: str | None = None,
    ) -> None:
        """The next ``n`` matching requests get the ten-secondly 429 (``Retry-After`` if given)."""
        reply = self._limited("TEN_SECONDLY_ROLLING", retry_after)
        self.add_rule(call_matcher(match, method), n, reply)

    def fail_next_server_error(
        self, n: int = 1, status: int = 502, match: str | None = None
    ) -> None:
        """The next ``n`` matching requests get an HTML 5xx page, as HubSpot's edge serves them."""
        page = f"<html><head><title>{status}</title></head><body>{status} Bad Gateway</body></html>"
        self.add_rule(call_matcher(match, None), n, Reply(status, page, {}, HTML))

    def _default_failure(self, status: int) -> Reply:
        if status == 429:
            return self._limited("TEN_SECONDLY_ROLLING", None)
        return hs_error(status, "internal error" if status >= 500 else "error")

    # -- dispatch --------------------------------------------------------------------------------
    def _respond(self, call: Call) -> Reply:
        if call.raw_path.rstrip("/") == OAUTH_TOKEN_PATH:
            # No bearer token, not counted against the API's rate limits (unverified, §5).
            if call.method != "POST":
                return Reply(
                    405,
                    JETTY_PAGE.format(status=405, reason="Method Not Allowed", path=call.path),
                    {},
                    HTML,
                )
            return self._oauth_token(call)
        refused = self._unauthorized(call)
        if refused is not None:
            return refused
        if any(call.raw_path.startswith(prefix) for prefix in self.unavailable):
            page = JETTY_PAGE.format(status=404, reason="Not Found", path=call.path)
            return Reply(404, page, {}, HTML)
        scope = next(
            (v for k, v in self.missing_scopes.items() if call.raw_path.startswith(k)), None
        )
        if scope is not None:
            return hs_error(
                403,
                MISSING_SCOPES_MESSAGE,
                "MISSING_SCOPES",
                errors=[
                    {
                        "message": "One or more of the following scopes are required.",
                        "context": {"requiredGranularScopes": [scope]},
                    }
                ],
                links={"scopes": "https://developers.hubspot.com/scopes"},
            )
        is_search = call.method == "POST" and call.raw_path.rstrip("/").endswith("/search")
        limited = self._check_search_limit() if is_search else self._check_rate_limit()
        if limited is not None:
            return limited
        reply = self._route(call)
        if not is_search:  # search responses carry no rate-limit headers
            reply.headers.update(self._rate_headers())
        return reply

    def _route(self, call: Call) -> Reply:
        if call.body.strip() and call.json is None:
            return hs_error(400, "Invalid input JSON on line 1, column 1: Unrecognized token")
        path_known = False
        for method, pattern, handler in self._routes:
            m = pattern.fullmatch(call.raw_path)
            if not m:
                continue
            path_known = True
            if method == call.method:
                try:
                    return handler(call, **{k: unquote(v) for k, v in m.groupdict().items()})
                except ValidationFailure as exc:
                    return self._validation_error(exc.errors)
                except Refused as exc:
                    return exc.reply
                except BadInput as exc:
                    return hs_error(400, f"Invalid input JSON on line -1, column -1: {exc}")
        status, reason = (405, "Method Not Allowed") if path_known else (404, "Not Found")
        return Reply(
            status, JETTY_PAGE.format(status=status, reason=reason, path=call.path), {}, HTML
        )

    # -- rate limits -----------------------------------------------------------------------------
    def _prune(self, now: float) -> None:
        horizon = now - self.interval_ms / 1000
        while self._window and self._window[0] <= horizon:
            self._window.popleft()

    def _check_rate_limit(self) -> Reply | None:
        now = self.clock()
        self._prune(now)
        if self.daily_used >= self.daily:
            return self._limited("DAILY", self.retry_after)
        if len(self._window) >= self.tier_max:
            return self._limited("TEN_SECONDLY_ROLLING", self.retry_after)
        # Counted only when admitted: a rejected request does not extend the window.
        self._window.append(now)
        self.daily_used += 1
        return None

    def _check_search_limit(self) -> Reply | None:
        now = self.clock()
        while self._search_window and self._search_window[0] <= now - 1.0:
            self._search_window.popleft()
        if len(self._search_window) < self.search_per_second:
            self._search_window.append(now)
            return None
        # As recorded from the real API: category, no policyName, no rate-limit headers.
        reply = hs_error(429, "You have reached your secondly limit.", "RATE_LIMITS")
        if self.retry_after is not None:
            reply.headers["Retry-After"] = _fmt_seconds(self.retry_after)
        return reply

    def _limited(self, policy: str, retry_after: float | None) -> Reply:
        body = {
            "status": "error",
            "message": RATE_MESSAGES[policy],
            "errorType": "RATE_LIMIT",
            "correlationId": str(uuid.uuid4()),
            "policyName": policy,
        }
        headers = self._rate_headers(remaining=0)
        if retry_after is not None:
            headers["Retry-After"] = _fmt_seconds(retry_after)
        return Reply(429, body, headers)

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

    def _validation_error(self, errors: list[dict[str, str]]) -> Reply:
        # The real message embeds the per-property list as JSON text; ``errors`` repeats it.
        detail = [
            {
                "isValid": False,
                "message": e["message"],
                "error": e["code"],
                "name": e["name"],
                "portalId": self.portal_id,
            }
            for e in errors
        ]
        structured = [
            {"message": e["message"], "code": e["code"], "context": {"propertyName": [e["name"]]}}
            for e in errors
        ]
        message = "Property values were not valid: " + json.dumps(detail, separators=(",", ":"))
        return hs_error(400, message, "VALIDATION_ERROR", errors=structured)

    # -- storage ---------------------------------------------------------------------------------
    def _insert(self, table: dict[str, HubSpotRecord], props: dict[str, str]) -> HubSpotRecord:
        self._next_id += 1
        object_id, stamp = str(self._next_id), iso_now()
        prefix = "" if table is self.contacts else "hs_"  # notes, tasks: hs_createdate
        stored = {k: v for k, v in props.items() if v != ""}
        stored.update(
            {
                "hs_object_id": object_id,
                f"{prefix}createdate": stamp,
                f"{prefix}lastmodifieddate": stamp,
            }
        )
        record = HubSpotRecord(object_id, stored, stamp, stamp, [(self.clock(), dict(stored))])
        table[object_id] = record
        return record

    def _apply(self, record: HubSpotRecord, props: dict[str, str]) -> list[str]:
        """Write ``props`` onto a contact; returns the names actually written."""
        written = []
        for name, value in props.items():
            current = record.properties.get(name)
            if name == "lifecyclestage" and value and not self._stage_forward(current, value):
                continue  # a backwards stage is ignored silently (unverified, doc §5)
            if value == "":
                record.properties.pop(name, None)  # empty string clears
            else:
                record.properties[name] = value
            written.append(name)
        record.updated_at = record.properties["lastmodifieddate"] = iso_now()
        record.history.append((self.clock(), dict(record.properties)))
        return written

    def _stage_forward(self, current: str | None, new: str) -> bool:
        order = self.properties["contacts"]["lifecyclestage"].options or []
        if not current or current not in order or new not in order:
            return True
        return order.index(new) >= order.index(current)

    def _find_contact(self, id_property: str, value: str) -> HubSpotRecord | None:
        if id_property == "hs_object_id":
            return self.contacts.get(value)
        if id_property == "email":
            value = value.lower()  # HubSpot stores emails lower-cased
        return next(
            (c for c in self.contacts.values() if c.properties.get(id_property) == value), None
        )

    def _validate(self, object_type: str, props: Any) -> dict[str, str]:
        """Check property names, read-only flags, options and formats; raise all problems."""
        if not isinstance(props, dict):
            raise ValidationFailure(
                invalid("properties", "INVALID_INPUT", "properties must be an object")
            )
        defs = self.properties[object_type]
        clean = _normalise(props)
        errors = [
            e
            for name, value in clean.items()
            if (e := _check_property(defs.get(name), name, value))
        ]
        if errors:
            raise ValidationFailure(*errors)
        return clean

    # -- contacts --------------------------------------------------------------------------------
    def _create_contact(self, call: Call) -> Reply:
        props = self._validate("contacts", _body(call, "properties")["properties"])
        if (email := props.get("email")) and (existing := self._find_contact("email", email)):
            return _conflict(existing)
        return Reply(201, self._insert(self.contacts, props).to_json())

    def _get_contact(self, call: Call, object_id: str) -> Reply:
        record = self._find_contact(call.param("idProperty") or "hs_object_id", object_id)
        if record is None or (call.param("archived") or "").lower() == "true":
            return not_found(object_id)  # nothing is ever archived here
        data = record.to_json(_requested(call.query.get("properties")))
        wanted = ",".join(call.query.get("associations", []))
        for object_type, label in (("notes", "contact_to_note"), ("tasks", "contact_to_task")):
            if object_type in wanted:
                linked = sorted(e for e, c in self._links(object_type) if c == record.id)
                results = [{"id": e, "type": label} for e in linked]
                data.setdefault("associations", {})[object_type] = {"results": results}
        return Reply(200, data)

    def _update_contact(self, call: Call, object_id: str) -> Reply:
        props = self._validate("contacts", _body(call, "properties")["properties"])
        record = self._find_contact(call.param("idProperty") or "hs_object_id", object_id)
        if record is None:
            return not_found(object_id)
        other = self._find_contact("email", props["email"]) if props.get("email") else None
        if other is not None and other.id != record.id:
            return _conflict(other)
        written = self._apply(record, props)
        return Reply(200, record.to_json([*written, *SYSTEM_PROPERTIES]))

    def _batch_upsert(self, call: Call) -> Reply:
        """Upsert by a unique property; any invalid input fails the batch before any write."""
        inputs = _body(call, "inputs")["inputs"]
        if (
            not isinstance(inputs, list)
            or not inputs
            or not all(isinstance(i, dict) for i in inputs)
        ):
            return bad_request("inputs must be a non-empty list of objects")
        if len(inputs) > 100:
            return bad_request(f"Too many inputs: {len(inputs)}. The limit is 100.")
        started = iso_now()
        planned: list[tuple[str, str, dict[str, str]]] = []
        for item in inputs:
            id_property = item.get("idProperty") or "hs_object_id"
            prop = self.properties["contacts"].get(id_property)
            if prop is None or not prop.unique:
                return bad_request(
                    f"{id_property} is not a unique property; it cannot be idProperty"
                )
            key = str(item.get("id", ""))
            key = key.lower() if id_property == "email" else key
            if key in [k for _, k, _ in planned]:
                return bad_request(f"Duplicate IDs found in batch input: [{key}]")
            planned.append(
                (id_property, key, self._validate("contacts", item.get("properties", {})))
            )
        results, errors = [], []
        for id_property, key, props in planned:
            record = self._find_contact(id_property, key)
            if record is None and id_property == "hs_object_id":
                errors.append(
                    {
                        "status": "error",
                        "category": "OBJECT_NOT_FOUND",
                        "context": {"ids": [key]},
                        "message": f"Could not find object with id {key}",
                    }
                )
            elif record is None:
                email = props.get("email")
                if email and (existing := self._find_contact("email", email)) is not None:
                    # Creating a second contact with a taken email is a 409 for the whole call.
                    return _conflict(existing)
                record = self._insert(self.contacts, {**props, id_property: key})
                results.append({**record.to_json(), "new": True})
            else:
                self._apply(record, props)
                results.append({**record.to_json(), "new": False})
        if self.reverse_batch_results:
            results.reverse()
        data: dict[str, Any] = {
            "status": "COMPLETE",
            "results": results,
            "startedAt": started,
            "completedAt": iso_now(),
        }
        if errors:
            return Reply(207, {**data, "errors": errors, "numErrors": len(errors)})
        return Reply(200, data)

    def _search(self, call: Call) -> Reply:
        body = _body(call)
        try:
            limit, after = int(body.get("limit") or 10), int(body.get("after") or 0)
        except (TypeError, ValueError):
            return bad_request("limit and after must be integers")
        groups = body.get("filterGroups") or []
        if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
            return bad_request("filterGroups must be a list of objects")
        if limit > 200:
            return bad_request("limit must be less than or equal to 200")
        if len(groups) > 5 or sum(len(g.get("filters", [])) for g in groups) > 18:
            return bad_request("Too many filters or filter groups")
        # Search is eventually consistent: it sees the last write older than ``search_delay``.
        cutoff = self.clock() - self.search_delay
        hits = []
        for record in self.contacts.values():
            indexed = [props for t, props in record.history if t <= cutoff]
            if indexed:
                hits.append((record, indexed[-1]))
        try:
            hits = [
                (r, p) for r, p in hits if _matches(p, groups) and _contains(p, body.get("query"))
            ]
        except ValueError as exc:
            return bad_request(str(exc))
        for sort in reversed(body.get("sorts") or []):
            if not isinstance(sort, str | dict):
                return bad_request("sorts must be property names or objects")
            name = sort if isinstance(sort, str) else sort.get("propertyName", "")
            descending = (
                isinstance(sort, dict) and str(sort.get("direction")).upper() == "DESCENDING"
            )
            hits.sort(key=partial(_hit_key, name), reverse=descending)
        names = _requested(body.get("properties"))
        data: dict[str, Any] = {
            "total": len(hits),
            "results": [r.to_json(names, p) for r, p in hits[after : after + limit]],
        }
        if after + limit < len(hits):
            data["paging"] = {
                "next": {"after": str(after + limit), "link": f"?after={after + limit}"}
            }
        return Reply(200, data)

    # -- notes, tasks and associations -----------------------------------------------------------
    def _table(self, object_type: str) -> dict[str, HubSpotRecord]:
        tables = {"notes": self.notes, "tasks": self.tasks, "leads": self.leads}
        return {**tables, "contacts": self.contacts}[object_type]

    def _links(self, object_type: str) -> set[tuple[str, str]]:
        """(engagement or lead id, contact id) pairs of the notes, the tasks or the leads."""
        links = {"notes": self.associations, "leads": self.lead_associations}
        return links.get(object_type, self.task_associations)

    def _create_engagement(self, call: Call, object_type: str) -> Reply:
        """A note, a task or a lead, created with its associations in the same call (a lead
        must have one: its contact)."""
        props, links = self._plan_engagement(object_type, _body(call, "properties"))
        record = self._insert(self._table(object_type), props)
        self._links(object_type).update((record.id, contact_id) for contact_id in links)
        return Reply(201, record.to_json())

    def _plan_engagement(
        self, object_type: str, body: dict[str, Any]
    ) -> tuple[dict[str, str], list[str]]:
        """The checked properties and the contact ids of one create input; raises what the
        API answers for a bad one."""
        props = self._validate(object_type, body.get("properties"))
        required = "hs_lead_name" if object_type == "leads" else "hs_timestamp"
        if not props.get(required):
            raise ValidationFailure(
                invalid(required, "REQUIRED_PROPERTY", f'Property "{required}" is required')
            )
        if object_type == "leads" and not body.get("associations"):
            raise Refused(bad_request("A lead must be associated with a contact or a company"))
        expected = ASSOCIATION_TYPES[(object_type, "contacts")]
        singular = object_type[:-1]
        links: list[str] = []
        for assoc in body.get("associations") or []:
            if not isinstance(assoc, dict):
                raise Refused(bad_request("associations must be objects"))
            to_id = str((assoc.get("to") or {}).get("id", ""))
            types = assoc.get("types") or []
            if to_id not in self.contacts:
                # The exact text is unverified (crm-apis.md §5); it names the association.
                raise Refused(
                    bad_request(f"One or more associations are invalid: no contact {to_id}")
                )
            if not any(
                t.get("associationCategory") == "HUBSPOT_DEFINED"
                and int(t.get("associationTypeId", 0)) == expected
                for t in types
            ):
                raise Refused(
                    bad_request(f"invalid association type for {singular} to contact: {types}")
                )
            links.append(to_id)
        return props, links

    def _batch_create(self, call: Call, object_type: str) -> Reply:
        """``{inputs: [{properties, associations, objectWriteTraceId?}]}``, up to 100: every
        input is checked before any is written, and one bad input refuses the whole batch (as
        batch upsert does). 201 with the records, each echoing its objectWriteTraceId."""
        inputs = _body(call, "inputs")["inputs"]
        if (
            not isinstance(inputs, list)
            or not inputs
            or not all(isinstance(i, dict) for i in inputs)
        ):
            return bad_request("inputs must be a non-empty list of objects")
        if len(inputs) > BATCH_LIMIT:
            return bad_request(f"Too many inputs: {len(inputs)}. The limit is {BATCH_LIMIT}.")
        started = iso_now()
        planned = [(item, *self._plan_engagement(object_type, item)) for item in inputs]
        results = []
        for item, props, links in planned:
            record = self._insert(self._table(object_type), props)
            self._links(object_type).update((record.id, contact_id) for contact_id in links)
            result = record.to_json()
            if item.get("objectWriteTraceId") is not None:
                result["objectWriteTraceId"] = str(item["objectWriteTraceId"])
            results.append(result)
        if self.reverse_batch_results:
            results.reverse()
        data = {
            "status": "COMPLETE",
            "results": results,
            "startedAt": started,
            "completedAt": iso_now(),
        }
        return Reply(201, data)

    def _batch_read_contacts(self, call: Call) -> Reply:
        return self._batch_read(call, "contacts")

    def _batch_read(self, call: Call, object_type: str) -> Reply:
        """``{properties, idProperty?, inputs: [{id}]}``: the live records, by id (contacts also
        by email, their unique property); ids not found make it a 207 naming them."""
        body = _body(call, "inputs")
        inputs = body["inputs"]
        if not isinstance(inputs, list) or not all(isinstance(i, dict) for i in inputs):
            return bad_request("inputs must be a list of objects")
        if len(inputs) > BATCH_LIMIT:
            return bad_request(f"Too many inputs: {len(inputs)}. The limit is {BATCH_LIMIT}.")
        contacts = object_type == "contacts"
        id_property = body.get("idProperty") or "hs_object_id"
        unique = self.properties[object_type].get(id_property)
        if id_property != "hs_object_id" and (not contacts or unique is None or not unique.unique):
            return bad_request(f"{id_property} is not a unique property of {object_type}")
        archived = (call.param("archived") or "").lower() == "true"  # nothing is ever archived
        names = body.get("properties") or []
        if not isinstance(names, list):
            return bad_request("properties must be a list of property names")
        if contacts:
            names = _requested(names or None)
        else:
            names = list(dict.fromkeys([*names, *ENGAGEMENT_SYSTEM_PROPERTIES]))
        table = self._table(object_type)

        def find(object_id: str) -> HubSpotRecord | None:
            if archived:
                return None
            return self._find_contact(id_property, object_id) if contacts else table.get(object_id)

        started = iso_now()
        results, missing = [], []
        for item in inputs:
            record = find(str(item.get("id", "")))
            if record is None:
                missing.append(str(item.get("id", "")))
            else:
                results.append(record.to_json(names))
        data: dict[str, Any] = {
            "status": "COMPLETE",
            "results": results,
            "startedAt": started,
            "completedAt": iso_now(),
        }
        if not missing:
            return Reply(200, data)
        error = {
            "status": "error",
            "category": "OBJECT_NOT_FOUND",
            "message": f"Could not get some {object_type[:-1].upper()} objects, they may be "
            "deleted or not exist. Check that ids are valid.",
            "context": {"ids": missing},
        }
        return Reply(207, {**data, "numErrors": 1, "errors": [error]})

    def _associations(self, call: Call, from_type: str, from_id: str, to_type: str) -> Reply:
        """v4 list: ``{results: [{toObjectId, associationTypes}], paging?}``, by id, 500 a page."""
        from_type, to_type = _plural(from_type), _plural(to_type)
        pair = (from_type, to_type)
        if pair not in ASSOCIATION_TYPES:
            return bad_request(f"No associations from {from_type} to {to_type} here")
        try:
            limit = int(call.param("limit") or 500)
            offset = int(base64.urlsafe_b64decode(call.param("after") or "MA==").decode())
        except ValueError:
            return bad_request("limit must be an integer and after a paging cursor")
        if not 1 <= limit <= 500:
            return bad_request("limit must be between 1 and 500")
        # An unknown record has no associations (the real answer for it is unverified).
        ids = self._linked_ids(from_type, from_id, to_type)
        spec = {"category": "HUBSPOT_DEFINED", "typeId": ASSOCIATION_TYPES[pair], "label": None}
        page = ids[offset : offset + limit]
        data: dict[str, Any] = {
            "results": [{"toObjectId": int(i), "associationTypes": [dict(spec)]} for i in page]
        }
        if offset + limit < len(ids):
            after = base64.urlsafe_b64encode(str(offset + limit).encode()).decode()
            data["paging"] = {"next": {"after": after, "link": f"?after={after}"}}
        return Reply(200, data)

    def _linked_ids(self, from_type: str, from_id: str, to_type: str) -> list[str]:
        """The ids of ``to_type`` records associated with one record, oldest first."""
        if from_type == "contacts":
            ids = [e for e, c in self._links(to_type) if c == from_id]
        else:
            ids = [c for e, c in self._links(from_type) if e == from_id]
        return sorted(ids, key=int)

    def _batch_associations(self, call: Call, from_type: str, to_type: str) -> Reply:
        """v4 ``{inputs: [{id, after?}]}``: per record ``{from: {id}, to: [{toObjectId,
        associationTypes}], paging?}``, 500 a page (``paging`` only when there are more). A
        record without any (or unknown) is an error of a 207: the real text is unverified."""
        from_type, to_type = _plural(from_type), _plural(to_type)
        pair = (from_type, to_type)
        if pair not in ASSOCIATION_TYPES:
            return bad_request(f"No associations from {from_type} to {to_type} here")
        inputs = _body(call, "inputs")["inputs"]
        if not isinstance(inputs, list) or not all(isinstance(i, dict) for i in inputs):
            return bad_request("inputs must be a list of objects")
        if len(inputs) > ASSOCIATION_BATCH_LIMIT:
            return bad_request(
                f"Too many inputs: {len(inputs)}. The limit is {ASSOCIATION_BATCH_LIMIT}."
            )
        started = iso_now()
        spec = {"category": "HUBSPOT_DEFINED", "typeId": ASSOCIATION_TYPES[pair], "label": None}
        results, without = [], []
        for item in inputs:
            from_id = str(item.get("id", ""))
            try:
                offset = int(base64.urlsafe_b64decode(item.get("after") or "MA==").decode())
            except ValueError:
                return bad_request("after must be a paging cursor")
            ids = self._linked_ids(from_type, from_id, to_type)
            if not ids:
                without.append(from_id)
                continue
            page = ids[offset : offset + ASSOCIATION_PAGE]
            result: dict[str, Any] = {
                "from": {"id": from_id},
                "to": [{"toObjectId": int(i), "associationTypes": [dict(spec)]} for i in page],
            }
            if offset + ASSOCIATION_PAGE < len(ids):
                after = base64.urlsafe_b64encode(str(offset + ASSOCIATION_PAGE).encode()).decode()
                result["paging"] = {"next": {"after": after, "link": None}}
            results.append(result)
        data: dict[str, Any] = {
            "status": "COMPLETE",
            "results": results,
            "startedAt": started,
            "completedAt": iso_now(),
        }
        if not without:
            return Reply(200, data)
        errors = [
            {
                "status": "error",
                "category": "OBJECT_NOT_FOUND",
                "message": f"No {to_type} is associated with {from_type[:-1]} {from_id}.",
                "context": {"fromObjectId": [from_id]},
            }
            for from_id in without
        ]
        return Reply(207, {**data, "numErrors": len(errors), "errors": errors})

    def _associate_default(
        self, call: Call, from_type: str, from_id: str, to_type: str, to_id: str
    ) -> Reply:
        from_type, to_type = _plural(from_type), _plural(to_type)
        if (from_type, to_type) not in ASSOCIATION_TYPES:
            return bad_request(f"No default association from {from_type} to {to_type}")
        kind = to_type if from_type == "contacts" else from_type  # notes or tasks
        note_id, contact_id = (to_id, from_id) if from_type == "contacts" else (from_id, to_id)
        for object_id, table in ((note_id, self._table(kind)), (contact_id, self.contacts)):
            if object_id not in table:
                return not_found(object_id)
        started = iso_now()
        self._links(kind).add((note_id, contact_id))

        def link(a: str, b: str, type_id: int) -> dict[str, Any]:
            spec = {"associationCategory": "HUBSPOT_DEFINED", "associationTypeId": type_id}
            return {"from": {"id": a}, "to": {"id": b}, "associationSpec": spec}

        results = [
            link(note_id, contact_id, ASSOCIATION_TYPES[(kind, "contacts")]),
            link(contact_id, note_id, ASSOCIATION_TYPES[("contacts", kind)]),
        ]
        if from_type == "contacts":
            results.reverse()
        data = {
            "status": "COMPLETE",
            "results": results,
            "startedAt": started,
            "completedAt": iso_now(),
        }
        return Reply(200, data)

    # -- properties ------------------------------------------------------------------------------
    def _list_properties(self, call: Call, object_type: str) -> Reply:
        if object_type not in self.properties:
            return hs_error(400, f"Unable to infer object type from: {object_type}")
        return Reply(200, {"results": [d.to_json() for d in self.properties[object_type].values()]})

    def _get_property(self, call: Call, object_type: str, name: str) -> Reply:
        if object_type not in self.properties:
            return hs_error(400, f"Unable to infer object type from: {object_type}")
        prop = self.properties[object_type].get(name)
        if prop is None:
            message = f"Unable to find property {name} on object type {object_type}"
            return hs_error(404, message, "OBJECT_NOT_FOUND")
        return Reply(200, prop.to_json())


# -- helpers -------------------------------------------------------------------------------------
def _plural(object_type: str) -> str:
    """v4 paths accept ``contact`` for ``contacts``, ``note`` for ``notes``."""
    return object_type if object_type.endswith("s") else object_type + "s"


def _body(call: Call, *required: str) -> dict[str, Any]:
    """The JSON object body; HubSpot rejects a missing body or missing required attributes."""
    body = call.json
    if not isinstance(body, dict) or any(body.get(name) is None for name in required):
        missing = ", ".join(required) or "body"
        raise BadInput(
            f"Cannot build the request, some required attributes are not set [{missing}]"
        )
    return body


def _conflict(existing: HubSpotRecord) -> Reply:
    return hs_error(409, f"Contact already exists. Existing ID: {existing.id}", "CONFLICT")


def _requested(names: list[str] | None) -> list[str]:
    """Requested property names plus the system ones; the default set when none are named."""
    if not names:
        return DEFAULT_PROPERTIES
    # The SDK repeats ``properties=``; raw clients may send one comma-separated value.
    flat = [n for value in names for n in value.split(",") if n]
    return list(dict.fromkeys(flat + SYSTEM_PROPERTIES))


def _normalise(props: dict[str, Any]) -> dict[str, str]:
    """HubSpot keeps strings: JSON numbers and booleans become text, null becomes ''."""
    out = {}
    for name, value in props.items():
        text = (
            "" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
        )
        out[name] = text.strip().lower() if name == "email" else text
    return out


def _check_property(prop: PropertyDef | None, name: str, value: str) -> dict[str, str] | None:
    if prop is None:
        return invalid(name, "PROPERTY_DOESNT_EXIST", f'Property "{name}" does not exist')
    if prop.read_only:
        return invalid(
            name, "READ_ONLY_VALUE", f'"{name}" is a read only property; its value cannot be set.'
        )
    if value == "":
        return None
    if prop.type == "datetime" and not _is_datetime(value):
        # The error code is not verified against the real API (crm-apis.md §5).
        return invalid(name, "INVALID_DATE", f"{value} is not a valid datetime.")
    if prop.type == "date" and (problem := _date_problem(value)):
        return invalid(name, "INVALID_DATE", problem)
    options = prop.options or []
    # A multi-select checkbox takes ";"-separated values.
    chosen = value.split(";") if prop.field_type == "checkbox" else [value]
    if prop.type == "enumeration" and not all(v in options for v in chosen):
        return invalid(
            name,
            "INVALID_OPTION",
            f"{value} was not one of the allowed options: [{', '.join(options)}]",
        )
    if prop.type == "number" and not _is_number(value):
        return invalid(name, "INVALID_INTEGER", f"{value} was not a valid number.")
    if prop.type == "bool" and value not in ("true", "false"):
        return invalid(name, "INVALID_BOOLEAN", f"{value} was not a valid boolean.")
    if name == "email" and not EMAIL_RE.match(value):
        return invalid(name, "INVALID_EMAIL", f"Email address {value} is invalid")
    return None


def _matches(props: dict[str, str], groups: list[dict[str, Any]]) -> bool:
    """filterGroups are OR-ed; the filters inside a group are AND-ed."""
    return not groups or any(all(_filter(props, f) for f in g.get("filters", [])) for g in groups)


def _filter(props: dict[str, str], flt: dict[str, Any]) -> bool:
    op, actual = str(flt.get("operator", "EQ")).upper(), props.get(flt.get("propertyName", ""))
    # Search compares text case-insensitively.
    a = actual.lower() if actual is not None else None
    v = str(flt["value"]).lower() if flt.get("value") is not None else None
    values = [str(x).lower() for x in flt.get("values") or []]
    if op in ("CONTAINS_TOKEN", "NOT_CONTAINS_TOKEN"):
        pattern = re.compile(".*".join(map(re.escape, (v or "").split("*"))))
        tokens = [*re.split(r"[\s@.,;]+", a or ""), a or ""]
        return any(pattern.fullmatch(t) for t in tokens) == (op == "CONTAINS_TOKEN")
    if op in ("LT", "LTE", "GT", "GTE"):
        if actual is None:
            return False
        x, y = _sort_key(actual), _sort_key(flt.get("value"))
        return {"LT": x < y, "LTE": x <= y, "GT": x > y, "GTE": x >= y}[op]
    checks = {
        "EQ": lambda: a == v,
        "NEQ": lambda: a != v,
        "IN": lambda: a in values,
        "NOT_IN": lambda: a not in values,
        "HAS_PROPERTY": lambda: actual is not None,
        "NOT_HAS_PROPERTY": lambda: actual is None,
    }
    if op not in checks:
        raise ValueError(f"Unsupported filter operator: {op}")
    return checks[op]()


def _contains(props: dict[str, str], query: str | None) -> bool:
    """The free-text ``query`` looks into the default searchable properties."""
    names = ("firstname", "lastname", "email", "phone", "company")
    return not query or any(str(query).lower() in (props.get(n) or "").lower() for n in names)


def _hit_key(name: str, hit: tuple[HubSpotRecord, dict[str, str]]) -> tuple[int, float, str]:
    return _sort_key(hit[1].get(name))


def _sort_key(value: Any) -> tuple[int, float, str]:
    text = "" if value is None else str(value)
    return (0, float(text), "") if _is_number(text) else (1, 0.0, text.lower())


def _is_datetime(text: str) -> bool:
    """Epoch milliseconds or ISO 8601 (``2024-05-01``, ``2024-05-01T12:00:00.000Z``)."""
    if EPOCH_MS_RE.match(text):
        return True
    try:
        datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return False
    return True


def _date_problem(text: str) -> str | None:
    """A date takes ``YYYY-MM-DD`` or epoch milliseconds at midnight UTC; else what is wrong."""
    if EPOCH_MS_RE.match(text):
        ms = int(text) % 86_400_000
        if ms:
            moment = datetime.fromtimestamp(int(text) / 1000, UTC)
            return f"{text} is at {moment.strftime('%H:%M:%S.%f')[:-3]} UTC, not midnight!"
        return None
    try:
        datetime.strptime(text, "%Y-%m-%d")
    except ValueError:
        return f"{text} is not a valid date."
    return None


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _fmt_seconds(seconds: float) -> str:
    return str(int(seconds)) if float(seconds).is_integer() else str(seconds)
