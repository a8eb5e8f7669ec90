"""Salesforce emulator: SOAP and OAuth logins, REST sObjects, a SOQL subset,
sObject Collections, Composite, describe and limits, always over TLS.

Wire format follows /work/shared/docs/crm-apis.md §1 (simple-salesforce 1.12.10).
REST errors are JSON arrays of ``{message, errorCode, fields}`` because the SDK
reads element 0; Collections put ``statusCode`` errors inside per-record results,
as the real API does. State is plain Python under ``lock``; routes run
synchronously with the lock held.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import hmac
import operator
import re
import secrets
import shutil
import ssl
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from html import escape
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import jwt

from .runner import Call, EmulatorBase, Reply, call_matcher
from .tls import LocalCA

__all__ = ["FieldDef", "SObjectDef", "SalesforceEmulator", "sf_id18"]

ORG_ID = "00D000000000001"
USER_ID = "005000000000001AAA"
PARTNER_NS = "urn:partner.soap.sforce.com"
HTML = "text/html;charset=UTF-8"
AUDIT_DATES = ("CreatedDate", "LastModifiedDate", "SystemModstamp")
NOT_FOUND = [{"errorCode": "NOT_FOUND", "message": "The requested resource does not exist"}]
INVALID_SESSION = [{"message": "Session expired or invalid", "errorCode": "INVALID_SESSION_ID"}]
DAILY_LIMIT = [{"message": "TotalRequests Limit exceeded.", "errorCode": "REQUEST_LIMIT_EXCEEDED"}]
# Too many concurrent requests of 20 s or more: the same error code, another limit.
CONCURRENT_LIMIT = [
    {"message": "ConcurrentPerOrgLongTxn Limit exceeded.", "errorCode": "REQUEST_LIMIT_EXCEEDED"}
]
CONVERTED_LEAD = "cannot reference converted lead"
UNAVAILABLE_PAGE = (
    "<html><head><title>Service Unavailable</title></head><body><h1>Service Unavailable</h1>"
    "<p>The server is temporarily unable to service your request.</p></body></html>"
)
DUPLICATE_MESSAGE = (
    "You're creating a duplicate record. We recommend you use an existing record instead."
)
NO_EXTERNAL_ID = "Provided external ID field does not exist or is not accessible: {}"
CHECK_WSDL = "Please reference your WSDL or the describe call for the appropriate names."
ROLLED_BACK = (
    "Record rolled back because not all records were valid and the request was using "
    "AllOrNone header"
)
HALTED = "The transaction was rolled back since another operation in the same transaction failed."
ID_RE = re.compile(r"[a-zA-Z0-9]{15}(?:[a-zA-Z0-9]{3})?")
EMAIL_RE = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
DATE_RE = re.compile(r"\d{4}-\d{2}-\d{2}")
DATA_PATH_RE = re.compile(r"/services/data/v(?P<version>\d+\.\d)(?P<rest>/.*)?")
BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def sf_id18(id15: str) -> str:
    """Salesforce's case-safe 18-character id: three checksum characters over the 15."""
    suffix = ""
    for i in range(3):
        chunk = id15[i * 5 : i * 5 + 5]
        bits = sum(1 << j for j, ch in enumerate(chunk) if "A" <= ch <= "Z")
        suffix += "ABCDEFGHIJKLMNOPQRSTUVWXYZ012345"[bits]
    return id15 + suffix


def normalise_id(value: Any) -> str | None:
    """15- or 18-char id → canonical 18-char id; None when not id-shaped."""
    if not isinstance(value, str) or not ID_RE.fullmatch(value):
        return None
    return sf_id18(value[:15])


def iso_now() -> str:
    now = datetime.now(UTC)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}+0000"


# -- schema -----------------------------------------------------------------------------------
@dataclass
class FieldDef:
    """One sObject field as describe reports it, plus what validation needs."""

    name: str
    # id string email phone url textarea picklist combobox boolean reference date datetime double
    type: str = "string"
    length: int = 255
    label: str = ""
    nillable: bool = True
    createable: bool = True
    updateable: bool = True
    required: bool = False  # REQUIRED_FIELD_MISSING when absent or blank
    default: Any = None
    picklist: list[str] | None = None
    restricted: bool = False
    external_id: bool = False
    unique: bool = False
    reference_to: list[str] = field(default_factory=list)

    @property
    def filterable(self) -> bool:
        """Long text areas (Description, Comments) cannot appear in a SOQL WHERE."""
        return not (self.type == "textarea" and self.length > 255)

    def describe(self) -> dict[str, Any]:
        numeric = self.type in ("boolean", "date", "datetime", "double")
        is_reference = self.type == "reference" and self.name.endswith("Id")
        return {
            "name": self.name,
            "label": self.label or self.name,
            "type": self.type,
            "length": 0 if numeric else self.length,
            "byteLength": 0 if numeric else self.length * 3,
            "precision": 18 if self.type == "double" else 0,
            "scale": 2 if self.type == "double" else 0,
            "nillable": self.nillable,
            "createable": self.createable,
            "updateable": self.updateable,
            "defaultedOnCreate": self.default is not None or self.type == "id",
            "defaultValue": self.default if self.type in ("picklist", "boolean") else None,
            "externalId": self.external_id,
            "unique": self.unique,
            "idLookup": self.type == "id" or self.external_id or self.name == "Email",
            "custom": self.name.endswith("__c"),
            "calculated": False,
            "caseSensitive": False,
            "filterable": self.filterable,
            "sortable": self.type != "textarea",
            "picklistValues": [
                {"active": True, "defaultValue": v == self.default, "label": v, "value": v}
                for v in self.picklist or []
            ],
            "restrictedPicklist": self.restricted,
            "referenceTo": list(self.reference_to),
            "relationshipName": self.name[:-2] if is_reference else None,
            "soapType": SOAP_TYPES.get(self.type, "xsd:string"),
        }


SOAP_TYPES = {
    "id": "tns:ID",
    "reference": "tns:ID",
    "boolean": "xsd:boolean",
    "date": "xsd:date",
    "datetime": "xsd:dateTime",
    "double": "xsd:double",
}


@dataclass
class SObjectDef:
    name: str
    label: str
    key_prefix: str
    fields: dict[str, FieldDef]

    def field(self, name: str) -> FieldDef | None:
        """Field names are case-insensitive in Salesforce."""
        return next((f for k, f in self.fields.items() if k.lower() == name.lower()), None)


def default_schema() -> dict[str, SObjectDef]:
    """Lead, Contact and Task with the fields our connectors touch."""
    ro: dict[str, Any] = {"createable": False, "updateable": False}
    must: dict[str, Any] = {"nillable": False, "required": True}
    lead_status = [
        "Open - Not Contacted",
        "Working - Contacted",
        "Closed - Converted",
        "Closed - Not Converted",
    ]
    sources = ["Web", "Phone Inquiry", "Partner Referral", "Purchased List", "Other"]
    task_status = ["Not Started", "In Progress", "Completed", "Waiting on someone else", "Deferred"]
    lead = [
        FieldDef("FirstName", "string", 40, "First Name"),
        FieldDef("LastName", "string", 80, "Last Name", **must),
        FieldDef("Company", "string", 255, "Company", **must),
        FieldDef("Email", "email", 80, "Email"),
        FieldDef("Phone", "phone", 40, "Phone"),
        FieldDef("Title", "string", 128, "Title"),
        FieldDef(
            "Status",
            "picklist",
            255,
            "Status",
            nillable=False,
            default=lead_status[0],
            picklist=lead_status,
            restricted=True,
        ),
        FieldDef("LeadSource", "picklist", 255, "Lead Source", picklist=sources),
        FieldDef("EmailBouncedReason", "string", 255, "Email Bounced Reason"),
        FieldDef("EmailBouncedDate", "datetime", 0, "Email Bounced Date"),
        FieldDef("Website", "url", 255, "Website"),
        FieldDef("Description", "textarea", 32000, "Description"),
        FieldDef("IsConverted", "boolean", 0, "Converted", nillable=False, default=False, **ro),
        FieldDef(
            "ConvertedContactId",
            "reference",
            18,
            "Converted Contact ID",
            reference_to=["Contact"],
            **ro,
        ),
    ]
    contact = [
        FieldDef("FirstName", "string", 40, "First Name"),
        FieldDef("LastName", "string", 80, "Last Name", **must),
        FieldDef("Email", "email", 80, "Email"),
        FieldDef("Phone", "phone", 40, "Business Phone"),
        FieldDef("Title", "string", 128, "Title"),
        FieldDef("AccountId", "reference", 18, "Account ID", reference_to=["Account"]),
        FieldDef("Description", "textarea", 32000, "Contact Description"),
    ]
    task = [
        FieldDef("Subject", "combobox", 255, "Subject", picklist=["Call", "Send Letter", "Other"]),
        FieldDef("Description", "textarea", 32000, "Comments"),
        FieldDef("WhoId", "reference", 18, "Name ID", reference_to=["Contact", "Lead"]),
        FieldDef(
            "Status",
            "picklist",
            255,
            "Status",
            nillable=False,
            default="Not Started",
            picklist=task_status,
            restricted=True,
        ),
        FieldDef(
            "Priority",
            "picklist",
            255,
            "Priority",
            nillable=False,
            default="Normal",
            picklist=["High", "Normal", "Low"],
            restricted=True,
        ),
        FieldDef("ActivityDate", "date", 0, "Due Date Only"),
    ]
    schema = {}
    for name, prefix, fields in (
        ("Lead", "00Q", lead),
        ("Contact", "003", contact),
        ("Task", "00T", task),
    ):
        # Id first, audit fields last, as describe lists them.
        all_fields = [
            FieldDef("Id", "id", 18, "Record ID", nillable=False, **ro),
            *fields,
            FieldDef("IsDeleted", "boolean", 0, "Deleted", nillable=False, default=False, **ro),
            FieldDef("CreatedDate", "datetime", 0, "Created Date", nillable=False, **ro),
            FieldDef("LastModifiedDate", "datetime", 0, "Last Modified Date", **ro),
            FieldDef("SystemModstamp", "datetime", 0, "System Modstamp", nillable=False, **ro),
        ]
        schema[name] = SObjectDef(name, name, prefix, {f.name: f for f in all_fields})
    return schema


# Objects we do not store but that reference fields may point at.
FOREIGN_PREFIXES = {"Account": "001", "User": "005"}


# -- errors and requests ------------------------------------------------------------------------
@dataclass
class SfError:
    code: str
    message: str
    fields: list[str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def rest(self) -> dict[str, Any]:
        out: dict[str, Any] = {"message": self.message, "errorCode": self.code}
        if self.fields is not None:
            out["fields"] = self.fields
        return {**out, **self.extra}

    def collection(self) -> dict[str, Any]:
        base = {"statusCode": self.code, "message": self.message, "fields": self.fields or []}
        return {**base, **self.extra}


class RestFailure(Exception):
    """Abort a route with a finished reply."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(reply.status)
        self.reply = reply


def fail(status: int, *errors: SfError) -> RestFailure:
    return RestFailure(Reply(status, [e.rest() for e in errors]))


def not_found() -> RestFailure:
    return RestFailure(Reply(404, copy.deepcopy(NOT_FOUND)))


def not_json() -> SfError:
    return SfError("JSON_PARSER_ERROR", "The request body must be a JSON object")


@dataclass
class RestRequest:
    """One REST call (or Composite sub-request) below ``/services/data/v{version}/``."""

    method: str
    version: str
    parts: list[str]  # path segments, still percent-encoded
    query: dict[str, list[str]]
    body: Any
    headers: dict[str, str]

    def url_of(self, obj: str, rid: str) -> str:
        return f"/services/data/v{self.version}/sobjects/{obj}/{rid}"


Record = dict[str, Any]


# -- the emulator -------------------------------------------------------------------------------
class SalesforceEmulator(EmulatorBase):
    """An emulated org at ``url`` (``https://127.0.0.1:<port>``), trusted via ``ca_path``.

    State: ``records(obj)``, ``record(id)``, ``sessions``, ``logins``, ``api_used``,
    ``calls``, ``schema``. Knobs read per request: ``daily_max``, ``expire_always``,
    ``latency``, ``duplicate_rules``, ``jwt_public_key``.

    ``api_used`` counts what Salesforce counts against the daily allocation: every data API
    request that got past the session check (a Collections or Composite request is one),
    not logins, not refusals; ``data_calls()`` lists them, for calls-per-record assertions.
    """

    json_content_type = "application/json;charset=UTF-8"

    def __init__(
        self,
        username: str = "user@example.com",
        password: str = "pw",
        security_token: str = "tok",
        consumer_key: str = "test-consumer-key",
        consumer_secret: str = "test-consumer-secret",
        daily_max: int = 15000,
        *,
        tls: LocalCA | None = None,
        jwt_public_key: str | bytes | None = None,
    ) -> None:
        super().__init__()
        self.username = username
        self.password = password
        self.security_token = security_token
        self.consumer_key = consumer_key
        self.consumer_secret = consumer_secret
        self.daily_max = daily_max
        self.jwt_public_key = jwt_public_key  # when set, JWT signatures are verified (RS256)
        self.api_used = 0
        self.expire_always = False
        self.sessions: set[str] = set()
        self.logins = 0  # successful SOAP + OAuth logins
        self.schema = default_schema()
        self.duplicate_rules: dict[str, list[str]] = {}
        self._records: dict[str, dict[str, Record]] = {name: {} for name in self.schema}
        self._deleted: dict[str, tuple[str, Record]] = {}
        self._locked: dict[str, int] = {}  # record id -> writes still to refuse (lock_records)
        self._counter = 0
        self._own_tmp: Path | None = None
        self.tls = tls or LocalCA()
        if self.tls.ca_path is None:
            self._own_tmp = Path(tempfile.mkdtemp(prefix="sf-emulator-"))
            self.tls.write_ca_pem(self._own_tmp / "ca.pem")

    # -- lifecycle ---------------------------------------------------------------------------
    def _ssl_context(self) -> ssl.SSLContext:
        return self.tls.server_context()

    @property
    def ca_path(self) -> str:
        """PEM of the CA that signed the emulator's certificate (``requests`` ``verify=``)."""
        return str(self.tls.ca_path)

    @property
    def instance(self) -> str:
        """``127.0.0.1:<port>``: what simple-salesforce calls the instance."""
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        super().stop()
        if self._own_tmp is not None:
            shutil.rmtree(self._own_tmp, ignore_errors=True)
            self._own_tmp = None

    # -- state helpers for tests ----------------------------------------------------------------
    def records(self, obj: str) -> list[Record]:
        """Copies of the live records of ``obj``, in creation order."""
        with self.lock:
            return [dict(r) for r in self._records[obj].values()]

    def record(self, record_id: str) -> Record | None:
        """A copy of the live record with this (15- or 18-char) id, of any object."""
        rid = normalise_id(record_id)
        with self.lock:
            found = next((t[rid] for t in self._records.values() if rid in t), None)
            return dict(found) if found else None

    def seed(self, obj: str, fields: dict[str, Any]) -> str:
        """Store a record directly (defaults applied; no validation, no API usage)."""
        with self.lock:
            sobj = self.schema[obj]
            clean = {(f.name if (f := sobj.field(k)) else k): v for k, v in fields.items()}
            record = self._insert(sobj, clean)
            # Audit dates given here are kept (older or newer records for ordering tests).
            record.update({k: clean[k] for k in AUDIT_DATES if k in clean})
            return str(record["Id"])

    def data_calls(self, since: int = 0) -> list[str]:
        """The data API requests among ``calls[since:]``, as "METHOD path" (logins left out)."""
        with self.lock:
            calls = self.calls[since:]
        return [f"{c.method} {c.path}" for c in calls if c.path.startswith("/services/data/v")]

    def convert_lead(self, lead_id: str, contact_id: str | None = None) -> str:
        """Convert a Lead, as a rep does: it becomes read-only, ``IsConverted``, pointing at
        its Contact (``contact_id``, or a new one with the Lead's name and email). Writes and
        Tasks naming it are refused with CANNOT_UPDATE_CONVERTED_LEAD. Returns the Contact id."""
        rid = normalise_id(lead_id) or lead_id
        with self.lock:
            lead = self._records["Lead"][rid]
            if contact_id is None:
                names = ("FirstName", "LastName", "Email", "Phone", "Title")
                values = {k: lead.get(k) for k in names if lead.get(k) is not None}
                contact_id = str(self._insert(self.schema["Contact"], values)["Id"])
            lead.update(
                IsConverted=True, ConvertedContactId=contact_id, Status="Closed - Converted"
            )
            return contact_id

    def remove_sobject(self, name: str) -> None:
        """Hide an object from the API user (no licence, no permission): describe, queries and
        writes naming it answer as for an object that does not exist (404 NOT_FOUND)."""
        with self.lock:
            self.schema.pop(name)

    def delete(self, record_id: str) -> None:
        """Delete a record directly, to the recycle bin: ``queryAll`` still sees it and writes
        to its id get ENTITY_IS_DELETED (no API usage)."""
        rid = normalise_id(record_id)
        with self.lock:
            obj = next(name for name, table in self._records.items() if rid in table)
            self._delete(self.schema[obj], self._records[obj][rid or ""])

    def add_field(
        self,
        obj: str,
        name: str,
        type: str = "string",
        *,
        length: int = 255,
        external_id: bool = False,
        unique: bool = False,
        picklist: list[str] | None = None,
        restricted: bool = False,
        required: bool = False,
    ) -> FieldDef:
        """Register a custom field (``name`` ends in ``__c``), e.g. an external id for upserts."""
        if not name.endswith("__c"):
            raise ValueError("custom field names end in __c")
        fdef = FieldDef(
            name,
            type,
            length,
            name[:-3].replace("_", " "),
            nillable=not required,
            required=required,
            picklist=picklist,
            restricted=restricted,
            external_id=external_id,
            unique=unique,
        )
        with self.lock:
            self.schema[obj].fields[name] = fdef
        return fdef

    def new_session(self) -> str:
        """A valid session id without a login round trip (for token-based clients)."""
        with self.lock:
            sid = f"{ORG_ID}!AQ{secrets.token_urlsafe(48)}"
            self.sessions.add(sid)
            return sid

    # -- failure switches ----------------------------------------------------------------------
    def expire_sessions(self) -> None:
        """Invalidate every session issued so far; logging in again works."""
        with self.lock:
            self.sessions.clear()

    def fail_next_expired(self, n: int = 1, match: str | None = None) -> None:
        """The next ``n`` REST calls get 401 INVALID_SESSION_ID whatever their session."""
        self.add_rule(self._data_matcher(match), n, Reply(401, INVALID_SESSION))

    def fail_next_non_json_401(self, n: int = 1, match: str | None = None) -> None:
        """401 with an HTML body (the SDK's re-login path then fails in ``response.json()``)."""
        page = (
            "<html><body><h1>401 Unauthorized</h1><p>Session expired or invalid</p></body></html>"
        )
        self.add_rule(self._data_matcher(match), n, Reply(401, page, {}, HTML))

    def lock_rows(self, n: int = 1, match: str | None = None) -> None:
        """The next ``n`` matching writes (POST/PATCH/PUT/DELETE) get 400 UNABLE_TO_LOCK_ROW."""
        data = self._data_matcher(match)
        error = SfError(
            "UNABLE_TO_LOCK_ROW", "unable to obtain exclusive access to this record", []
        )

        def is_write(call: Call) -> bool:
            return call.method in ("POST", "PATCH", "PUT", "DELETE") and data(call)

        self.add_rule(is_write, n, Reply(400, [error.rest()]))

    def lock_records(self, *record_ids: str, n: int = 1) -> None:
        """The next ``n`` updates of each of these records fail with UNABLE_TO_LOCK_ROW, as when
        another transaction holds the row: per record inside a collection (the others are
        saved), 400 on the single-record routes."""
        with self.lock:
            for record_id in record_ids:
                self._locked[normalise_id(record_id) or record_id] = n

    def enable_duplicate_rule(
        self, obj: str = "Lead", fields: tuple[str, ...] = ("Email",)
    ) -> None:
        """Block writes matching another record on ``fields`` (case-insensitive) with
        DUPLICATES_DETECTED, unless ``Sforce-Duplicate-Rule-Header: allowSave=true``."""
        with self.lock:
            self.duplicate_rules[obj] = list(fields)

    def disable_duplicate_rules(self) -> None:
        with self.lock:
            self.duplicate_rules.clear()

    def fail_next_unavailable(
        self, n: int = 1, match: str | None = None, status: int = 503
    ) -> None:
        """5xx with an HTML page, as Salesforce serves during maintenance."""
        self.add_rule(self._data_matcher(match), n, Reply(status, UNAVAILABLE_PAGE, {}, HTML))

    def refuse_next_concurrent(self, n: int = 1, match: str | None = None) -> None:
        """403 REQUEST_LIMIT_EXCEEDED for too many concurrent long requests (clears in seconds,
        unlike the daily limit); not counted, so its Sforce-Limit-Info shows the org's room."""
        self.add_rule(self._data_matcher(match), n, Reply(403, copy.deepcopy(CONCURRENT_LIMIT)))

    @staticmethod
    def _data_matcher(match: str | None) -> Callable[[Call], bool]:
        base = call_matcher(match, None)
        return lambda call: call.path.startswith("/services/data/") and base(call)

    def _default_failure(self, status: int) -> Reply:
        if status >= 500:
            return Reply(status, UNAVAILABLE_PAGE, {}, HTML)
        unknown = [{"message": "An unexpected error occurred.", "errorCode": "UNKNOWN_EXCEPTION"}]
        body = {401: INVALID_SESSION, 403: DAILY_LIMIT, 404: NOT_FOUND}.get(status, unknown)
        return Reply(status, copy.deepcopy(body))

    # -- dispatch -------------------------------------------------------------------------------
    def _respond(self, call: Call) -> Reply:
        path = call.raw_path
        if call.method == "POST" and re.fullmatch(r"/services/Soap/u/[\d.]+/?", path):
            return self._soap_login(call, path.rstrip("/").rsplit("/", 1)[1])
        if call.method == "POST" and path.rstrip("/") == "/services/oauth2/token":
            return self._oauth_token(call)
        if path.rstrip("/") == "/services/data":
            versions = ("58.0", "59.0", "60.0")
            body = [
                {"label": f"v{v}", "url": f"/services/data/v{v}", "version": v} for v in versions
            ]
            return Reply(200, body)
        m = DATA_PATH_RE.fullmatch(path)
        if not m:
            return Reply(404, copy.deepcopy(NOT_FOUND))
        if self.expire_always or _session_of(call) not in self.sessions:
            return Reply(401, INVALID_SESSION)  # not counted against the daily allocation
        if self.api_used >= self.daily_max:
            return Reply(403, DAILY_LIMIT)
        self.api_used += 1
        if call.body.strip() and call.json is None and call.method in ("POST", "PATCH", "PUT"):
            error = SfError("JSON_PARSER_ERROR", "Unexpected character: was expecting a JSON value")
            return Reply(400, [error.rest()])
        rest = (m["rest"] or "/").lstrip("/")
        req = RestRequest(
            call.method, m["version"], rest.split("/"), call.query, call.json, call.headers
        )
        return self._dispatch(req)

    def _decorate(self, call: Call, reply: Reply) -> Reply:
        if call.path.startswith("/services/data/v"):
            usage = f"api-usage={self.api_used}/{self.daily_max}"
            reply.headers.setdefault("Sforce-Limit-Info", usage)
        return reply

    def _dispatch(self, req: RestRequest) -> Reply:
        """Route one REST request; also used for Composite sub-requests."""
        if req.parts and req.parts[-1] == "":
            req.parts.pop()  # trailing slash: the SDK says sobjects/Lead/ and query/
        try:
            return self._route(req)
        except RestFailure as exc:
            return exc.reply

    def _route(self, req: RestRequest) -> Reply:
        parts, method = req.parts, req.method
        head = parts[0] if parts else ""
        if not parts:
            names = ("sobjects", "query", "queryAll", "limits", "composite")
            return Reply(200, {k: f"/services/data/v{req.version}/{k}" for k in names})
        if head in ("query", "queryAll") and len(parts) == 1 and method == "GET":
            soql = (req.query.get("q") or [""])[0]
            return self._query(req, soql, include_deleted=head == "queryAll")
        if head == "limits" and len(parts) == 1 and method == "GET":
            return Reply(200, self._limits())
        if head == "composite" and len(parts) == 1 and method == "POST":
            return self._composite(req)
        if head == "composite" and len(parts) >= 2 and parts[1] == "sobjects":
            return self._collections(req)
        if head == "sobjects":
            return self._sobjects(req)
        raise not_found()

    def _sobjects(self, req: RestRequest) -> Reply:
        parts, method = req.parts[1:], req.method
        if not parts and method == "GET":
            summaries = [self._summary(o, req) for o in self.schema.values()]
            return Reply(200, {"encoding": "UTF-8", "maxBatchSize": 200, "sobjects": summaries})
        if not parts:
            raise self._method_not_allowed(method, "GET")
        sobj = self._sobject(unquote(parts[0]))
        if len(parts) == 1 and method == "POST":
            new_id, errors = self._create(sobj, req.body, req.headers)
            if errors:
                raise fail(400, *errors)
            return Reply(201, {"id": new_id, "success": True, "errors": []})
        if len(parts) == 1 and method == "GET":
            return Reply(200, {"objectDescribe": self._summary(sobj, req), "recentItems": []})
        if len(parts) == 1:
            raise self._method_not_allowed(method, "GET, HEAD, POST")
        if len(parts) == 2 and parts[1] == "describe" and method == "GET":
            return Reply(200, self._describe(sobj, req))
        if len(parts) == 2:
            return self._by_id(req, sobj, unquote(parts[1]))
        if len(parts) == 3:
            # The value stays percent-encoded until here: "a%2Fb" must not split the path.
            return self._by_external_id(req, sobj, unquote(parts[1]), unquote(parts[2]))
        raise not_found()

    def _sobject(self, name: str) -> SObjectDef:
        sobj = next((o for o in self.schema.values() if o.name.lower() == name.lower()), None)
        if sobj is None:
            raise not_found()
        return sobj

    @staticmethod
    def _method_not_allowed(method: str, allowed: str) -> RestFailure:
        message = f"HTTP Method '{method}' not allowed. Allowed are {allowed}"
        return RestFailure(Reply(405, [{"errorCode": "METHOD_NOT_ALLOWED", "message": message}]))

    # -- single-record routes ---------------------------------------------------------------------
    def _by_id(self, req: RestRequest, sobj: SObjectDef, raw_id: str) -> Reply:
        rid = normalise_id(raw_id)
        if rid is None or not rid.startswith(sobj.key_prefix):
            # A segment that is not an id of this object is read as an external-id field name.
            raise fail(404, SfError("NOT_FOUND", NO_EXTERNAL_ID.format(raw_id)))
        if rid in self._deleted:
            raise fail(404, SfError("ENTITY_IS_DELETED", "entity is deleted", []))
        record = self._records[sobj.name].get(rid)
        if record is None:
            raise not_found()
        if req.method == "GET":
            return Reply(200, self._render(sobj, record, req))
        if req.method == "PATCH":
            errors = self._update(sobj, record, req.body, req.headers)
            if errors:
                raise fail(400, *errors)
            return Reply(204)
        if req.method == "DELETE":
            self._delete(sobj, record)
            return Reply(204)
        raise self._method_not_allowed(req.method, "GET, HEAD, PATCH, DELETE")

    def _by_external_id(self, req: RestRequest, sobj: SObjectDef, name: str, value: str) -> Reply:
        fdef = sobj.field(name)
        # Reads also work on plain custom fields (simple-salesforce issue #694); writes do not.
        readable = fdef is not None and req.method == "GET" and fdef.name.endswith("__c")
        if fdef is None or not (fdef.external_id or fdef.type == "id" or readable):
            raise fail(404, SfError("NOT_FOUND", NO_EXTERNAL_ID.format(name)))
        matches = self._match_external(sobj, fdef, value)
        if len(matches) > 1:
            return Reply(300, [req.url_of(sobj.name, r["Id"]) for r in matches])
        if req.method in ("GET", "DELETE") and not matches:
            raise not_found()
        if req.method == "GET":
            return Reply(200, self._render(sobj, matches[0], req))
        if req.method == "DELETE":
            self._delete(sobj, matches[0])
            return Reply(204)
        if req.method != "PATCH":
            raise self._method_not_allowed(req.method, "GET, HEAD, PATCH, DELETE")
        if not isinstance(req.body, dict):
            raise fail(400, not_json())
        if matches:
            errors = self._update(sobj, matches[0], req.body, req.headers)
            if errors:
                raise fail(400, *errors)
            if float(req.version) < 46.0:
                return Reply(204)  # before API 46 an upsert-update answered 204 without a body
            result = {"id": matches[0]["Id"], "success": True, "errors": [], "created": False}
            return Reply(200, result)
        if fdef.type == "id":
            raise not_found()
        new_id, errors = self._create(sobj, {**req.body, fdef.name: value}, req.headers)
        if errors:
            raise fail(400, *errors)
        return Reply(201, {"id": new_id, "success": True, "errors": [], "created": True})

    def _match_external(self, sobj: SObjectDef, fdef: FieldDef, value: str) -> list[Record]:
        rows = self._records[sobj.name].values()
        if fdef.type == "id":
            return [r for r in rows if r["Id"] == normalise_id(value)]
        # External ids compare case-insensitively (case-sensitive ones are not emulated).
        return [r for r in rows if _text(r.get(fdef.name)).lower() == value.lower()]

    # -- record operations (shared by REST, Collections and Composite) ---------------------------
    def _create(
        self, sobj: SObjectDef, body: Any, headers: dict[str, str]
    ) -> tuple[str | None, list[SfError]]:
        if not isinstance(body, dict):
            return None, [not_json()]
        clean, errors = self._validate(sobj, body, None)
        if not errors:
            errors = self._conflicts(sobj, clean, clean, None, headers)
        if errors:
            return None, errors
        return self._insert(sobj, clean)["Id"], []

    def _update(
        self, sobj: SObjectDef, record: Record, body: Any, headers: dict[str, str]
    ) -> list[SfError]:
        if not isinstance(body, dict):
            return [not_json()]
        if sobj.name == "Lead" and record.get("IsConverted"):
            return [SfError("CANNOT_UPDATE_CONVERTED_LEAD", CONVERTED_LEAD, [])]
        if self._locked.get(record["Id"], 0) > 0:
            self._locked[record["Id"]] -= 1
            message = (
                f"unable to obtain exclusive access to this record or 1 records: {record['Id']}"
            )
            return [SfError("UNABLE_TO_LOCK_ROW", message, [])]
        clean, errors = self._validate(sobj, body, record)
        if not errors:
            errors = self._conflicts(sobj, clean, {**record, **clean}, record["Id"], headers)
        if errors:
            return errors
        record.update(clean)
        record["LastModifiedDate"] = record["SystemModstamp"] = iso_now()
        return []

    def _delete(self, sobj: SObjectDef, record: Record) -> None:
        del self._records[sobj.name][record["Id"]]
        self._deleted[record["Id"]] = (sobj.name, {**record, "IsDeleted": True})

    def _insert(self, sobj: SObjectDef, values: dict[str, Any]) -> Record:
        self._counter += 1
        n, tail = self._counter, ""
        while n:
            n, r = divmod(n, 62)
            tail = BASE62[r] + tail
        rid = sf_id18(sobj.key_prefix + "8d" + tail.rjust(10, "0"))
        stamp = iso_now()
        record: Record = {f.name: f.default for f in sobj.fields.values()}
        record.update(values)
        record.update(
            Id=rid, IsDeleted=False, CreatedDate=stamp, LastModifiedDate=stamp, SystemModstamp=stamp
        )
        self._records[sobj.name][rid] = record
        return record

    # -- validation ------------------------------------------------------------------------------
    def _validate(
        self, sobj: SObjectDef, body: dict[str, Any], existing: Record | None
    ) -> tuple[dict[str, Any], list[SfError]]:
        clean: dict[str, Any] = {}
        not_writable: list[str] = []
        errors: list[SfError] = []
        for key, value in body.items():
            if key == "attributes":
                continue
            fdef = sobj.field(key)
            if fdef is None:
                # The real API stops at the first unknown field and reports only it.
                message = f"No such column '{key}' on sobject of type {sobj.name}"
                return {}, [SfError("INVALID_FIELD", message, [])]
            if not (fdef.updateable if existing is not None else fdef.createable):
                not_writable.append(fdef.name)
                continue
            if error := self._check_value(fdef, value):
                errors.append(error)
            clean[fdef.name] = value
        if not_writable:
            message = (
                f"Unable to create/update fields: {', '.join(not_writable)}. Please check the "
                "security settings of this field and verify that it is read/write for your "
                "profile or permission set."
            )
            errors.insert(0, SfError("INVALID_FIELD_FOR_INSERT_UPDATE", message, not_writable))
        merged = {**(existing or {}), **clean}
        missing = [
            f.name for f in sobj.fields.values() if f.required and merged.get(f.name) in (None, "")
        ]
        if existing is not None:
            missing = [
                name for name in missing if name in clean
            ]  # an update fails on what it blanks
        if missing:
            message = f"Required fields are missing: [{', '.join(missing)}]"
            errors.append(SfError("REQUIRED_FIELD_MISSING", message, missing))
        return clean, errors

    def _check_value(self, fdef: FieldDef, value: Any) -> SfError | None:
        label = fdef.label or fdef.name
        if value is None:
            return None  # blanks are judged by the required check
        kind = {"boolean": "boolean", "double": "double"}.get(fdef.type)
        wrong_scalar = (kind == "boolean" and not isinstance(value, bool)) or (
            kind == "double" and (isinstance(value, bool) or not isinstance(value, int | float))
        )
        if wrong_scalar or (kind is None and isinstance(value, dict | list)):
            message = f"Cannot deserialize instance of {kind or 'string'} from value {value!r}"
            return SfError("JSON_PARSER_ERROR", message)
        if kind:
            return None
        text = value if isinstance(value, str) else str(value)
        if fdef.type == "reference":
            return self._check_reference(fdef, text)
        if fdef.type == "date" and not DATE_RE.fullmatch(text):
            return SfError("JSON_PARSER_ERROR", f"Cannot deserialize instance of date from {text}")
        if fdef.restricted and text and text not in (fdef.picklist or []):
            message = f"{label}: bad value for restricted picklist field: {text}"
            return SfError("INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST", message, [fdef.name])
        if fdef.type == "email" and text and not EMAIL_RE.match(text):
            message = f"{label}: invalid email address: {text}"
            return SfError("INVALID_EMAIL_ADDRESS", message, [fdef.name])
        if fdef.length and len(text) > fdef.length and fdef.type not in ("date", "datetime"):
            message = f"{label}: data value too large: {text} (max length={fdef.length})"
            return SfError("STRING_TOO_LONG", message, [fdef.name])
        return None

    def _check_reference(self, fdef: FieldDef, text: str) -> SfError | None:
        if text == "":
            return None
        message = f"{fdef.label or fdef.name}: id value of incorrect type: {text}"
        rid = normalise_id(text)
        if rid is None:
            return SfError("MALFORMED_ID", message, [fdef.name])
        targets = [t for t in fdef.reference_to if rid.startswith(self._prefix_of(t))]
        if not targets:
            return SfError("FIELD_INTEGRITY_EXCEPTION", message, [fdef.name])
        if targets[0] in self._records and rid not in self._records[targets[0]]:
            return SfError("INVALID_CROSS_REFERENCE_KEY", "invalid cross reference id", [])
        if targets[0] == "Lead" and self._records["Lead"][rid].get("IsConverted"):
            # A converted Lead takes no new activity (nor any reference): its Contact does.
            return SfError("CANNOT_UPDATE_CONVERTED_LEAD", CONVERTED_LEAD, [])
        return None

    def _prefix_of(self, obj: str) -> str:
        sobj = self.schema.get(obj)
        return sobj.key_prefix if sobj else FOREIGN_PREFIXES.get(obj, "???")

    def _conflicts(
        self,
        sobj: SObjectDef,
        clean: dict[str, Any],
        merged: dict[str, Any],
        own_id: str | None,
        headers: dict[str, str],
    ) -> list[SfError]:
        """Unique-field clashes (DUPLICATE_VALUE) and duplicate-rule hits (DUPLICATES_DETECTED)."""
        others = [r for r in self._records[sobj.name].values() if r["Id"] != own_id]
        errors = []
        for name, value in clean.items():
            if not sobj.fields[name].unique or value in (None, ""):
                continue
            if other := next((r for r in others if _ci(r.get(name)) == _ci(value)), None):
                message = f"duplicate value found: {name} duplicates value on record with id: "
                message += other["Id"]
                errors.append(SfError("DUPLICATE_VALUE", message, []))
        rule = self.duplicate_rules.get(sobj.name)
        allow = headers.get("Sforce-Duplicate-Rule-Header", "").replace(" ", "").lower()
        if errors or not rule or "allowsave=true" in allow:
            return errors
        if any(merged.get(f) in (None, "") for f in rule):
            return []
        matches = [r for r in others if all(_ci(r.get(f)) == _ci(merged.get(f)) for f in rule)]
        if not matches:
            return []
        extra = {"duplicateResult": _duplicate_result(sobj.name, [r["Id"] for r in matches])}
        return [SfError("DUPLICATES_DETECTED", DUPLICATE_MESSAGE, [], extra)]

    # -- rendering -------------------------------------------------------------------------------
    def _render(
        self, sobj: SObjectDef, record: Record, req: RestRequest, names: list[str] | None = None
    ) -> Record:
        out: Record = {
            "attributes": {"type": sobj.name, "url": req.url_of(sobj.name, record["Id"])}
        }
        out.update((name, record.get(name)) for name in names or sobj.fields)
        return out

    def _summary(self, sobj: SObjectDef, req: RestRequest) -> dict[str, Any]:
        base = f"/services/data/v{req.version}/sobjects/{sobj.name}"
        flags = ("createable", "updateable", "deletable", "queryable", "retrieveable", "searchable")
        return {
            "name": sobj.name,
            "label": sobj.label,
            "labelPlural": sobj.label + "s",
            "keyPrefix": sobj.key_prefix,
            "custom": False,
            **dict.fromkeys(flags, True),
            "urls": {
                "sobject": base,
                "describe": f"{base}/describe",
                "rowTemplate": f"{base}/{{ID}}",
            },
        }

    def _describe(self, sobj: SObjectDef, req: RestRequest) -> dict[str, Any]:
        fields = [f.describe() for f in sobj.fields.values()]
        return {**self._summary(sobj, req), "fields": fields, "childRelationships": []}

    def _limits(self) -> dict[str, Any]:
        pools = {
            "DailyAsyncApexExecutions": 250000,
            "DailyBulkApiBatches": 15000,
            "DailyBulkV2QueryJobs": 10000,
            "DataStorageMB": 5,
            "FileStorageMB": 20,
        }
        remaining = max(0, self.daily_max - self.api_used)
        limits = {"DailyApiRequests": {"Max": self.daily_max, "Remaining": remaining}}
        limits.update({name: {"Max": m, "Remaining": m} for name, m in pools.items()})
        return limits

    # -- SOQL ------------------------------------------------------------------------------------
    def _query(self, req: RestRequest, soql: str, include_deleted: bool) -> Reply:
        if not soql.strip():
            raise fail(400, SfError("MALFORMED_QUERY", "A query string has to be specified"))
        try:
            query = SoqlParser(soql).parse()
        except SoqlError as exc:
            raise fail(400, SfError("MALFORMED_QUERY", str(exc))) from None
        sobj = next((o for o in self.schema.values() if o.name.lower() == query.obj.lower()), None)
        if sobj is None:
            message = f"sObject type '{query.obj}' is not supported. {CHECK_WSDL}"
            raise fail(400, SfError("INVALID_TYPE", message))
        resolve = _soql_resolver(sobj)
        names = [resolve(f) for f in query.fields]
        if dup := next((n for n in names if names.count(n) > 1), None):
            raise fail(400, SfError("MALFORMED_QUERY", f"duplicate field selected: {dup}"))
        if query.where is not None:
            _resolve_fields(query.where, resolve)
            for name in _where_fields(query.where):
                if not sobj.fields[name].filterable:
                    message = f"field '{name}' can not be filtered in a query call"
                    raise fail(400, SfError("INVALID_FIELD", message))
        for name, _, _ in query.order:
            if sobj.fields[resolve(name)].type == "textarea":
                message = f"field '{resolve(name)}' can not be sorted in a query call"
                raise fail(400, SfError("INVALID_FIELD", message))
        rows = list(self._records[sobj.name].values())
        if include_deleted:
            rows += [rec for obj, rec in self._deleted.values() if obj == sobj.name]
        rows = [r for r in rows if query.where is None or _eval(query.where, r, sobj)]
        for name, descending, nulls_last in reversed(query.order):
            name = resolve(name)
            present = [r for r in rows if r.get(name) is not None]
            present.sort(key=partial(_row_key, name), reverse=descending)
            absent = [r for r in rows if r.get(name) is None]
            rows = present + absent if nulls_last else absent + present
        rows = rows[query.offset :][: query.limit]
        records = [] if query.count else [self._render(sobj, r, req, names) for r in rows]
        return Reply(200, {"totalSize": len(rows), "done": True, "records": records})

    # -- sObject Collections ---------------------------------------------------------------------
    def _collections(self, req: RestRequest) -> Reply:
        body, parts = req.body, req.parts[2:]
        if not isinstance(body, dict) or not isinstance(body.get("records"), list):
            raise fail(400, SfError("JSON_PARSER_ERROR", "The request body needs a records array"))
        records = body["records"]
        if len(records) > 200:
            message = "record limit reached. cannot submit more than 200 records into this call"
            raise fail(400, SfError("EXCEEDED_ID_LIMIT", f"EXCEEDED_ID_LIMIT: {message}"))
        snapshot = self._snapshot() if body.get("allOrNone") else None
        if req.method == "POST" and not parts:
            results = [self._collection_create(rec, req.headers) for rec in records]
        elif req.method == "PATCH" and not parts:
            results = [self._collection_update(rec, req.headers) for rec in records]
        elif req.method == "PATCH" and len(parts) == 2:
            sobj = self._sobject(unquote(parts[0]))
            results = self._collection_upsert(sobj, unquote(parts[1]), records, req.headers)
        else:
            raise not_found()
        if snapshot is not None and not all(r["success"] for r in results):
            self._restore(snapshot)
            rolled_back = SfError("ALL_OR_NONE_OPERATION_ROLLED_BACK", ROLLED_BACK, []).collection()
            results = [
                {"success": False, "errors": [rolled_back]} if r["success"] else r for r in results
            ]
        return Reply(200, results)

    def _record_type(self, rec: Any) -> SObjectDef | SfError:
        if not isinstance(rec, dict):
            return not_json()
        attributes = rec.get("attributes")
        obj = attributes.get("type") if isinstance(attributes, dict) else None
        if not obj or not isinstance(obj, str):
            return SfError("INVALID_TYPE", "Must send a concrete entity type.")
        try:
            return self._sobject(obj)
        except RestFailure:
            return SfError("INVALID_TYPE", f"sObject type '{obj}' is not supported.")

    def _collection_create(self, rec: Any, headers: dict[str, str]) -> dict[str, Any]:
        sobj = self._record_type(rec)
        if isinstance(sobj, SfError):
            return _failed([sobj])
        if any(k.lower() == "id" for k in rec):
            return _failed([SfError("INVALID_FIELD", "cannot specify Id in an insert call", [])])
        new_id, errors = self._create(sobj, rec, headers)
        return _failed(errors) if errors else {"id": new_id, "success": True, "errors": []}

    def _collection_update(self, rec: Any, headers: dict[str, str]) -> dict[str, Any]:
        sobj = self._record_type(rec)
        if isinstance(sobj, SfError):
            return _failed([sobj])
        rid = normalise_id(_text(_get_ci(rec, "Id")))
        record = self._records[sobj.name].get(rid or "")
        if record is None and rid in self._deleted:
            return {"id": rid, **_failed([SfError("ENTITY_IS_DELETED", "entity is deleted", [])])}
        if record is None:
            return _failed([SfError("MALFORMED_ID", "invalid record id", [])])
        errors = self._update(
            sobj, record, {k: v for k, v in rec.items() if k.lower() != "id"}, headers
        )
        result = _failed(errors) if errors else {"success": True, "errors": []}
        return {"id": record["Id"], **result}

    def _collection_upsert(
        self, sobj: SObjectDef, name: str, records: list[Any], headers: dict[str, str]
    ) -> list[dict[str, Any]]:
        fdef = sobj.field(name)
        if fdef is None or not (fdef.external_id or fdef.type == "id"):
            message = f"Field name provided, {name} is not an External ID or indexed field"
            raise fail(400, SfError("INVALID_FIELD", message))
        values = [
            _text(_get_ci(r, fdef.name)).lower() if isinstance(r, dict) else "" for r in records
        ]
        results = []
        for rec, value in zip(records, values, strict=True):
            results.append(self._upsert_one(sobj, fdef, rec, value, values, headers))
        return results

    def _upsert_one(
        self,
        sobj: SObjectDef,
        fdef: FieldDef,
        rec: Any,
        value: str,
        batch: list[str],
        headers: dict[str, str],
    ) -> dict[str, Any]:
        rtype = self._record_type(rec)
        if isinstance(rtype, SfError):
            return _failed([rtype])
        if value == "":
            return _failed([SfError("MISSING_ARGUMENT", f"{fdef.name} not specified", [fdef.name])])
        if batch.count(value) > 1:
            message = f"Duplicate external id specified: {_get_ci(rec, fdef.name)}"
            return _failed([SfError("DUPLICATE_EXTERNAL_ID", message, [fdef.name])])
        matches = self._match_external(sobj, fdef, value)
        if len(matches) > 1:
            ids = ", ".join(m["Id"] for m in matches)
            message = f"{fdef.name}: more than one record found for external id field: [{ids}]"
            return _failed([SfError("DUPLICATE_EXTERNAL_ID", message, [fdef.name])])
        if matches:
            errors = self._update(sobj, matches[0], rec, headers)
            result = _failed(errors) if errors else {"success": True, "errors": []}
            return {"id": matches[0]["Id"], **result, "created": False}
        new_id, errors = self._create(sobj, rec, headers)
        if errors:
            return {**_failed(errors), "created": False}
        return {"id": new_id, "success": True, "errors": [], "created": True}

    def _snapshot(self) -> tuple[Any, Any, int]:
        return copy.deepcopy(self._records), copy.deepcopy(self._deleted), self._counter

    def _restore(self, snapshot: tuple[Any, Any, int]) -> None:
        self._records, self._deleted, self._counter = snapshot

    # -- Composite -------------------------------------------------------------------------------
    def _composite(self, req: RestRequest) -> Reply:
        """Sub-requests in order with ``@{ref.path}`` references; one API call in total."""
        body = req.body if isinstance(req.body, dict) else {}
        subrequests = body.get("compositeRequest")
        if (
            not isinstance(subrequests, list)
            or not subrequests
            or not all(isinstance(sub, dict) for sub in subrequests)
        ):
            raise fail(
                400, SfError("JSON_PARSER_ERROR", "compositeRequest must be a non-empty array")
            )
        if len(subrequests) > 25:
            raise fail(
                400, SfError("INVALID_INPUT", "A composite request has at most 25 subrequests")
            )
        snapshot = self._snapshot() if body.get("allOrNone") else None
        responses: list[dict[str, Any]] = []
        results: dict[str, Any] = {}
        for sub in subrequests:
            ref, url, method = sub.get("referenceId", ""), sub.get("url"), sub.get("method", "GET")
            if not isinstance(url, str) or not isinstance(method, str):
                raise fail(
                    400, SfError("JSON_PARSER_ERROR", "Each subrequest needs a url and a method")
                )
            try:
                url, sub_body = _substitute(url, results), _substitute(sub.get("body"), results)
            except KeyError as exc:
                message = f"Invalid reference specified. No value for {exc.args[0]} found."
                reply = Reply(400, [{"errorCode": "PROCESSING_HALTED", "message": message}])
            else:
                headers = {**req.headers, **(sub.get("httpHeaders") or {})}
                reply = self._composite_one(method.upper(), url, sub_body, headers)
            location = {}
            if reply.status == 201 and isinstance(reply.body, dict):
                location["Location"] = f"{urlsplit(url).path.rstrip('/')}/{reply.body.get('id')}"
            responses.append(
                {
                    "body": reply.body,
                    "httpHeaders": location,
                    "httpStatusCode": reply.status,
                    "referenceId": ref,
                }
            )
            if reply.status < 400:
                results[ref] = reply.body
        if snapshot is not None and any(r["httpStatusCode"] >= 400 for r in responses):
            self._restore(snapshot)
            halted = {
                "body": [{"errorCode": "PROCESSING_HALTED", "message": HALTED}],
                "httpHeaders": {},
                "httpStatusCode": 400,
            }
            responses = [r if r["httpStatusCode"] >= 400 else {**r, **halted} for r in responses]
        return Reply(200, {"compositeResponse": responses})

    def _composite_one(self, method: str, url: str, body: Any, headers: dict[str, str]) -> Reply:
        parts = urlsplit(url)
        m = DATA_PATH_RE.fullmatch(parts.path)
        if not m:
            return Reply(400, [{"errorCode": "INVALID_INPUT", "message": f"Invalid url: {url}"}])
        rest = (m["rest"] or "/").lstrip("/").split("/")
        return self._dispatch(
            RestRequest(method, m["version"], rest, parse_qs(parts.query), body, headers)
        )

    # -- logins ----------------------------------------------------------------------------------
    def _issue_session(self) -> str:
        self.logins += 1
        sid = f"{ORG_ID}!AQ{secrets.token_urlsafe(48)}"
        self.sessions.add(sid)
        return sid

    def _password_ok(self, password: str) -> bool:
        # The token is appended to the password; an empty token models a trusted-IP user.
        return password == self.password + self.security_token

    def _soap_login(self, call: Call, version: str) -> Reply:
        try:
            root = ET.fromstring(call.body)
        except ET.ParseError:
            return _soap_fault("soapenv:Client", "INVALID_REQUEST", "Unable to parse the request")
        username = root.findtext(f".//{{{PARTNER_NS}}}username")
        password = root.findtext(f".//{{{PARTNER_NS}}}password")
        if username is None or password is None:
            return _soap_fault("soapenv:Client", "INVALID_REQUEST", "login element missing")
        if username != self.username or not self._password_ok(password):
            message = "Invalid username, password, security token; or user locked out."
            return _soap_fault("sf:INVALID_LOGIN", "INVALID_LOGIN", message)
        sid, base, user = escape(self._issue_session()), self.url, escape(self.username)
        result = (
            f"<metadataServerUrl>{base}/services/Soap/m/{version}/{ORG_ID}</metadataServerUrl>"
            "<passwordExpired>false</passwordExpired><sandbox>false</sandbox>"
            f"<serverUrl>{base}/services/Soap/u/{version}/{ORG_ID}</serverUrl>"
            f"<sessionId>{sid}</sessionId><userId>{USER_ID}</userId>"
            f"<userInfo><organizationId>{ORG_ID}AAA</organizationId>"
            "<organizationName>Emulated Org</organizationName>"
            "<sessionSecondsValid>7200</sessionSecondsValid>"
            f"<userEmail>{user}</userEmail><userId>{USER_ID}</userId>"
            f"<userName>{user}</userName></userInfo>"
        )
        body = f"<loginResponse><result>{result}</result></loginResponse>"
        return Reply(200, _soap_envelope(body, 'xmlns="urn:partner.soap.sforce.com"'), {}, XML)

    def _oauth_token(self, call: Call) -> Reply:
        form = {k: v[0] for k, v in parse_qs(call.body, keep_blank_values=True).items()}
        client_id, secret = form.get("client_id"), form.get("client_secret")
        auth = call.headers.get("Authorization", "")
        if auth.startswith("Basic "):
            try:
                client_id, _, secret = base64.b64decode(auth[6:]).decode().partition(":")
            except ValueError:
                return _oauth_error("invalid_client", "invalid client credentials")
        grant = form.get("grant_type", "")
        if grant in ("password", "client_credentials") and client_id != self.consumer_key:
            return _oauth_error("invalid_client_id", "client identifier invalid")
        if grant in ("password", "client_credentials") and secret != self.consumer_secret:
            return _oauth_error("invalid_client", "invalid client credentials")
        if grant == "password":
            user_ok = form.get("username") == self.username
            if not user_ok or not self._password_ok(form.get("password", "")):
                return _oauth_error("invalid_grant", "authentication failure")
        elif grant == "urn:ietf:params:oauth:grant-type:jwt-bearer":
            if problem := self._jwt_problem(form.get("assertion", "")):
                return _oauth_error(*problem)
        elif grant != "client_credentials":
            return _oauth_error("unsupported_grant_type", "grant type not supported")
        issued_at = str(int(time.time() * 1000))
        identity = f"{self.url}/id/{ORG_ID}AAA/{USER_ID}"
        digest = hmac.new(
            self.consumer_secret.encode(), (identity + issued_at).encode(), hashlib.sha256
        ).digest()
        return Reply(
            200,
            {
                "access_token": self._issue_session(),
                "instance_url": self.url,
                "id": identity,
                "token_type": "Bearer",
                "issued_at": issued_at,
                "signature": base64.b64encode(digest).decode(),
                "scope": "api",
            },
        )

    def _jwt_problem(self, assertion: str) -> tuple[str, str] | None:
        lenient: Any = {"verify_aud": False, "verify_exp": False}  # exp arrives as a string
        try:
            if self.jwt_public_key is not None:
                claims = jwt.decode(
                    assertion, self.jwt_public_key, algorithms=["RS256"], options=lenient
                )
            else:
                claims = jwt.decode(assertion, options={"verify_signature": False})
            expired = int(str(claims.get("exp"))) < time.time()
        except (jwt.PyJWTError, ValueError):
            return "invalid_grant", "invalid assertion"
        if claims.get("iss") != self.consumer_key:
            return "invalid_client_id", "client identifier invalid"
        if claims.get("sub") != self.username:
            return "invalid_grant", "user hasn't approved this consumer"
        if expired:
            return "invalid_grant", "expired authorization code"
        return None


# -- module helpers -----------------------------------------------------------------------------
XML = "text/xml;charset=UTF-8"


def _session_of(call: Call) -> str | None:
    auth = call.headers.get("Authorization", "")
    for scheme in ("Bearer ", "OAuth "):
        if auth.startswith(scheme):
            return auth[len(scheme) :].strip()
    return call.headers.get("X-SFDC-Session")


def _row_key(name: str, row: Record) -> Any:
    return _ci(row[name])


def _ci(value: Any) -> Any:
    return value.lower() if isinstance(value, str) else value


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def _get_ci(record: dict[str, Any], name: str) -> Any:
    return next((v for k, v in record.items() if k.lower() == name.lower()), None)


def _failed(errors: list[SfError]) -> dict[str, Any]:
    return {"success": False, "errors": [e.collection() for e in errors]}


def _duplicate_result(obj: str, ids: list[str]) -> dict[str, Any]:
    """The ``duplicateResult`` Salesforce attaches to DUPLICATES_DETECTED."""
    matches = [
        {
            "additionalInformation": [],
            "fieldDiffs": [],
            "matchConfidence": 100.0,
            "record": {
                "attributes": {"type": obj, "url": f"/services/data/v59.0/sobjects/{obj}/{rid}"},
                "Id": rid,
            },
        }
        for rid in ids
    ]
    return {
        "allowSave": False,
        "duplicateRule": f"Standard_{obj}_Duplicate_Rule",
        "duplicateRuleEntityType": obj,
        "errorMessage": DUPLICATE_MESSAGE,
        "matchResults": [
            {
                "entityType": obj,
                "errors": [],
                "matchEngine": "FuzzyMatchEngine",
                "matchRecords": matches,
                "rule": f"Standard_{obj}_Match_Rule_v1_0",
                "size": len(matches),
                "success": True,
            }
        ],
    }


def _soap_envelope(body: str, namespaces: str) -> str:
    return (
        '<?xml version="1.0" encoding="UTF-8"?><soapenv:Envelope '
        'xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" '
        f'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" {namespaces}>'
        f"<soapenv:Body>{body}</soapenv:Body></soapenv:Envelope>"
    )


def _soap_fault(faultcode: str, code: str, message: str) -> Reply:
    """HTTP 500 SOAP fault carrying ``sf:exceptionCode`` as the real login endpoint sends."""
    text = escape(message)
    fault = (
        f"<soapenv:Fault><faultcode>{faultcode}</faultcode>"
        f"<faultstring>{code}: {text}</faultstring>"
        '<detail><sf:LoginFault xsi:type="sf:LoginFault">'
        f"<sf:exceptionCode>{code}</sf:exceptionCode>"
        f"<sf:exceptionMessage>{text}</sf:exceptionMessage>"
        "</sf:LoginFault></detail></soapenv:Fault>"
    )
    return Reply(
        500, _soap_envelope(fault, 'xmlns:sf="urn:fault.partner.soap.sforce.com"'), {}, XML
    )


def _oauth_error(error: str, description: str) -> Reply:
    return Reply(400, {"error": error, "error_description": description})


_REF_RE = re.compile(r"@\{([^}]+)\}")


def _substitute(value: Any, refs: dict[str, Any]) -> Any:
    """Replace Composite ``@{ref.path}`` references with earlier results (KeyError when missing)."""
    if isinstance(value, str):
        if whole := _REF_RE.fullmatch(value):
            return _lookup_ref(whole[1], refs)
        return _REF_RE.sub(lambda m: str(_lookup_ref(m[1], refs)), value)
    if isinstance(value, dict):
        return {k: _substitute(v, refs) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, refs) for v in value]
    return value


def _lookup_ref(path: str, refs: dict[str, Any]) -> Any:
    ref, _, rest = path.partition(".")
    if ref not in refs:
        raise KeyError(path)
    node = refs[ref]
    for token in re.findall(r"[^.\[\]]+|\[\d+\]", rest):
        try:
            node = node[int(token[1:-1])] if token.startswith("[") else node[token]
        except (KeyError, IndexError, TypeError):
            raise KeyError(path) from None
    return node


# -- SOQL subset --------------------------------------------------------------------------------
class SoqlError(ValueError):
    """A MALFORMED_QUERY; the message mimics Salesforce's ``unexpected token``."""


# \% and \_ are literal only inside LIKE; they stay private-use markers until then.
SOQL_ESCAPES = {
    "\\": "\\",
    "'": "'",
    '"': '"',
    "n": "\n",
    "r": "\r",
    "t": "\t",
    "b": "\b",
    "f": "\f",
    "%": "\ue000",
    "_": "\ue001",
}
TOKEN_RE = re.compile(
    r"\s*(?:(?P<str>'(?:[^'\\]|\\.)*')"
    r"|(?P<date>\d{4}-\d{2}-\d{2}(?:T[\d:.]+(?:Z|[+-]\d{2}:?\d{2}))?)"
    r"|(?P<num>-?\d+(?:\.\d+)?)|(?P<op>!=|<>|<=|>=|=|<|>|\(|\)|,)"
    r"|(?P<word>[A-Za-z_][A-Za-z0-9_.]*))"
)
KEYWORDS = {
    "SELECT",
    "FROM",
    "WHERE",
    "AND",
    "OR",
    "NOT",
    "IN",
    "LIKE",
    "ORDER",
    "BY",
    "ASC",
    "DESC",
    "NULLS",
    "FIRST",
    "LAST",
    "LIMIT",
    "OFFSET",
    "NULL",
    "TRUE",
    "FALSE",
    "COUNT",
}


@dataclass
class Token:
    kind: str  # str date num op word kw
    value: Any
    text: str


@dataclass
class SoqlQuery:
    obj: str
    fields: list[str]
    count: bool
    # ("and"|"or", a, b) | ("not", a) | ["cmp", field, op, value] | ["in"|"like", field, values]
    where: Any
    order: list[tuple[str, bool, bool]]  # (field, descending, nulls last)
    limit: int | None
    offset: int


class SoqlParser:
    """``SELECT f, ... | COUNT() FROM Obj [WHERE cond] [ORDER BY f [ASC|DESC] [NULLS FIRST|LAST],
    ...] [LIMIT n] [OFFSET n]``; conditions use = != <> < <= > >=, [NOT] IN (...), LIKE, AND,
    OR, NOT and parentheses; values are strings, numbers, dates, true, false, null."""

    def __init__(self, text: str) -> None:
        self.tokens = self._lex(text.rstrip())
        self.pos = 0

    @staticmethod
    def _lex(text: str) -> list[Token]:
        tokens, pos = [], 0
        while pos < len(text):
            m = TOKEN_RE.match(text, pos)
            if not m:
                raise SoqlError(f"unexpected token: '{text[pos:].split()[0]}'")
            pos, kind = m.end(), m.lastgroup or ""
            raw = m[kind]
            if kind == "str":
                tokens.append(Token("str", _unescape(raw[1:-1]), raw))
            elif kind == "num":
                tokens.append(Token("num", float(raw) if "." in raw else int(raw), raw))
            elif kind == "word" and raw.upper() in KEYWORDS:
                tokens.append(Token("kw", raw.upper(), raw))
            else:
                tokens.append(Token(kind, raw, raw))
        return tokens

    def _at(self, *values: str) -> bool:
        tok = self.tokens[self.pos] if self.pos < len(self.tokens) else None
        return tok is not None and tok.kind in ("kw", "op") and tok.value in values

    def _take(self, *values: str) -> Token:
        if self.pos >= len(self.tokens):
            raise SoqlError(f"unexpected end of query, expecting {' or '.join(values) or 'more'}")
        tok = self.tokens[self.pos]
        if values and not (tok.kind in ("kw", "op") and tok.value in values):
            raise SoqlError(f"unexpected token: '{tok.text}'")
        self.pos += 1
        return tok

    def _take_if(self, *values: str) -> bool:
        if self._at(*values):
            self.pos += 1
            return True
        return False

    def _typed(self, *kinds: str) -> Token:
        tok = self._take()
        if tok.kind not in kinds:
            raise SoqlError(f"unexpected token: '{tok.text}'")
        return tok

    def parse(self) -> SoqlQuery:
        self._take("SELECT")
        fields: list[str] = []
        count = self._take_if("COUNT")
        if count:
            self._take("(")
            self._take(")")
        else:
            fields.append(self._typed("word").value)
            while self._take_if(","):
                fields.append(self._typed("word").value)
        self._take("FROM")
        obj = self._typed("word").value
        where = self._or() if self._take_if("WHERE") else None
        order: list[tuple[str, bool, bool]] = []
        if self._take_if("ORDER"):
            self._take("BY")
            while True:
                name = self._typed("word").value
                descending = (
                    self._take("ASC", "DESC").value == "DESC" if self._at("ASC", "DESC") else False
                )
                nulls_last = descending
                if self._take_if("NULLS"):
                    nulls_last = self._take("FIRST", "LAST").value == "LAST"
                order.append((name, descending, nulls_last))
                if not self._take_if(","):
                    break
        limit = self._count_value() if self._take_if("LIMIT") else None
        offset = self._count_value() if self._take_if("OFFSET") else 0
        if self.pos != len(self.tokens):
            raise SoqlError(f"unexpected token: '{self.tokens[self.pos].text}'")
        return SoqlQuery(obj, fields, count, where, order, limit, offset)

    def _count_value(self) -> int:
        tok = self._typed("num")
        if not isinstance(tok.value, int):
            raise SoqlError(f"unexpected token: '{tok.text}'")
        return tok.value

    def _or(self) -> Any:
        node = self._and()
        while self._take_if("OR"):
            node = ("or", node, self._and())
        return node

    def _and(self) -> Any:
        node = self._not()
        while self._take_if("AND"):
            node = ("and", node, self._not())
        return node

    def _not(self) -> Any:
        if self._take_if("NOT"):
            return ("not", self._not())
        if self._take_if("("):
            node = self._or()
            self._take(")")
            return node
        return self._comparison()

    def _comparison(self) -> Any:
        name = self._typed("word").value
        if self._take_if("NOT"):
            self._take("IN")
            return ("not", ["in", name, self._list()])
        if self._take_if("IN"):
            return ["in", name, self._list()]
        if self._take_if("LIKE"):
            return ["like", name, self._typed("str").value]
        op = self._take("=", "!=", "<>", "<", "<=", ">", ">=").value
        return ["cmp", name, "!=" if op == "<>" else op, self._literal()]

    def _list(self) -> list[Any]:
        self._take("(")
        values = [self._literal()]
        while self._take_if(","):
            values.append(self._literal())
        self._take(")")
        return values

    def _literal(self) -> Any:
        tok = self._take()
        if tok.kind in ("str", "num", "date"):
            return tok.value
        if tok.kind == "kw" and tok.value in ("NULL", "TRUE", "FALSE"):
            return {"NULL": None, "TRUE": True, "FALSE": False}[tok.value]
        raise SoqlError(f"unexpected token: '{tok.text}'")


def _unescape(body: str) -> str:
    out, i = [], 0
    while i < len(body):
        if body[i] != "\\":
            out.append(body[i])
            i += 1
            continue
        if i + 1 >= len(body) or body[i + 1] not in SOQL_ESCAPES:
            raise SoqlError("Invalid string literal. Illegal character sequence.")
        out.append(SOQL_ESCAPES[body[i + 1]])
        i += 2
    return "".join(out)


def _plain(value: Any) -> Any:
    return value.replace("\ue000", "%").replace("\ue001", "_") if isinstance(value, str) else value


def _soql_resolver(sobj: SObjectDef) -> Callable[[str], str]:
    def resolve(name: str) -> str:
        fdef = sobj.field(name)
        if fdef is None:
            message = (
                f"No such column '{name}' on entity '{sobj.name}'. If you are attempting to use a "
                "custom field, be sure to append the '__c' after the custom field name. "
                + CHECK_WSDL
            )
            raise fail(400, SfError("INVALID_FIELD", message))
        return fdef.name

    return resolve


def _resolve_fields(node: Any, resolve: Callable[[str], str]) -> None:
    if isinstance(node, tuple):
        for child in node[1:]:
            _resolve_fields(child, resolve)
    else:
        node[1] = resolve(node[1])


def _where_fields(node: Any) -> list[str]:
    if isinstance(node, tuple):
        return [name for child in node[1:] for name in _where_fields(child)]
    return [node[1]]


def _eval(node: Any, record: Record, sobj: SObjectDef) -> bool:
    if isinstance(node, tuple):
        if node[0] == "and":
            return _eval(node[1], record, sobj) and _eval(node[2], record, sobj)
        if node[0] == "or":
            return _eval(node[1], record, sobj) or _eval(node[2], record, sobj)
        return not _eval(node[1], record, sobj)
    kind, name = node[0], node[1]
    fdef = sobj.fields[name]
    actual = _comparable(fdef, record.get(name))
    if kind == "in":
        return actual in [_comparable(fdef, _plain(v)) for v in node[2]]
    if kind == "like":
        wild = {"%": ".*", "_": "."}
        pattern = "".join(wild.get(c) or re.escape(_plain(c)) for c in node[2])
        return actual is not None and re.fullmatch(pattern, str(actual), re.I | re.S) is not None
    op, expected = node[2], _comparable(fdef, _plain(node[3]))
    if op in ("=", "!="):
        equal = bool(actual == expected)
        return equal if op == "=" else not equal
    if actual is None or expected is None:
        return False
    try:
        return bool(ORDERINGS[op](actual, expected))
    except TypeError:  # e.g. a boolean field compared with a string
        return False


ORDERINGS: dict[str, Callable[[Any, Any], Any]] = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}


def _comparable(fdef: FieldDef, value: Any) -> Any:
    """SOQL comparison form: text is case-insensitive, ids compare as 18-char, '' is null."""
    if value is None or value == "":
        return None
    if fdef.type in ("id", "reference") and isinstance(value, str):
        return normalise_id(value) or value
    return _ci(value)
