"""Salesforce emulator: SOAP and OAuth logins, REST sObjects, SOQL subset,
sObject Collections, Composite, describe and limits — always over TLS.

Wire format follows /work/shared/docs/crm-apis.md §1 (simple-salesforce 1.12.10).
Errors are JSON arrays of ``{message, errorCode, fields}`` because the SDK reads
element 0; Collections use ``statusCode`` inside per-record results as the real API
does. All state is plain Python under ``lock``; routes run synchronously with it held.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import hmac
import re
import secrets
import shutil
import ssl
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from datetime import UTC, datetime
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
JSON_CT = "application/json;charset=UTF-8"
NOT_FOUND = [{"errorCode": "NOT_FOUND", "message": "The requested resource does not exist"}]
INVALID_SESSION = [{"message": "Session expired or invalid", "errorCode": "INVALID_SESSION_ID"}]
UNAVAILABLE_PAGE = (
    "<html><head><title>Service Unavailable</title></head><body><h1>Service Unavailable</h1>"
    "<p>The server is temporarily unable to service your request. Please try again later.</p></body></html>"
)
DUPLICATE_MESSAGE = "You're creating a duplicate record. We recommend you use an existing record instead."
ID_RE = re.compile(r"[a-zA-Z0-9]{15}(?:[a-zA-Z0-9]{3})?")
EMAIL_RE = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
DATE_RE = re.compile(r"\d{4}-\d{2}-\d{2}")


def sf_id18(id15: str) -> str:
    """Salesforce's case-safe 18-character id: three checksum characters over the 15-char id."""
    suffix = ""
    for i in range(3):
        chunk = id15[i * 5 : i * 5 + 5]
        bits = sum(1 << j for j, ch in enumerate(chunk) if "A" <= ch <= "Z")
        suffix += "ABCDEFGHIJKLMNOPQRSTUVWXYZ012345"[bits]
    return id15 + suffix


def normalise_id(value: str) -> str | None:
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
    type: str = "string"  # id string email phone url textarea picklist combobox boolean reference date datetime double
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
    def custom(self) -> bool:
        return self.name.endswith("__c")

    def describe(self) -> dict[str, Any]:
        text = self.type in ("string", "email", "phone", "url", "textarea", "picklist", "combobox", "id", "reference")
        return {
            "name": self.name,
            "label": self.label or self.name,
            "type": self.type,
            "length": self.length if text else 0,
            "byteLength": self.length * 3 if text else 0,
            "precision": 18 if self.type == "double" else 0,
            "scale": 2 if self.type == "double" else 0,
            "digits": 0,
            "nillable": self.nillable,
            "createable": self.createable,
            "updateable": self.updateable,
            "defaultedOnCreate": self.default is not None or self.type == "id",
            "defaultValue": self.default if self.type in ("picklist", "boolean") else None,
            "externalId": self.external_id,
            "unique": self.unique,
            "idLookup": self.type == "id" or self.external_id or self.name == "Email",
            "custom": self.custom,
            "calculated": False,
            "autoNumber": False,
            "caseSensitive": False,
            "filterable": True,
            "sortable": self.type != "textarea",
            "picklistValues": [
                {"active": True, "defaultValue": v == self.default, "label": v, "validFor": None, "value": v}
                for v in self.picklist or []
            ],
            "restrictedPicklist": self.restricted,
            "referenceTo": list(self.reference_to),
            "relationshipName": self.name[:-2] if self.type == "reference" and self.name.endswith("Id") else None,
            "soapType": _SOAP_TYPES.get(self.type, "xsd:string"),
        }


_SOAP_TYPES = {"id": "tns:ID", "reference": "tns:ID", "boolean": "xsd:boolean", "date": "xsd:date",
               "datetime": "xsd:dateTime", "double": "xsd:double"}  # fmt: skip


@dataclass
class SObjectDef:
    name: str
    label: str
    key_prefix: str
    fields: dict[str, FieldDef]

    def field(self, name: str) -> FieldDef | None:
        """Field names are case-insensitive in Salesforce."""
        return self._by_lower().get(name.lower())

    def _by_lower(self) -> dict[str, FieldDef]:
        return {k.lower(): v for k, v in self.fields.items()}


def _system_fields() -> list[FieldDef]:
    ro = {"createable": False, "updateable": False}
    return [
        FieldDef("Id", "id", 18, "Record ID", nillable=False, **ro),
        FieldDef("IsDeleted", "boolean", 0, "Deleted", nillable=False, default=False, **ro),
        FieldDef("CreatedDate", "datetime", 0, "Created Date", nillable=False, **ro),
        FieldDef("LastModifiedDate", "datetime", 0, "Last Modified Date", nillable=False, **ro),
        FieldDef("SystemModstamp", "datetime", 0, "System Modstamp", nillable=False, **ro),
    ]


def default_schema() -> dict[str, SObjectDef]:
    ro = {"createable": False, "updateable": False}
    lead_status = ["Open - Not Contacted", "Working - Contacted", "Closed - Converted", "Closed - Not Converted"]
    lead = [
        FieldDef("FirstName", "string", 40, "First Name"),
        FieldDef("LastName", "string", 80, "Last Name", nillable=False, required=True),
        FieldDef("Company", "string", 255, "Company", nillable=False, required=True),
        FieldDef("Email", "email", 80, "Email"),
        FieldDef("Phone", "phone", 40, "Phone"),
        FieldDef("Title", "string", 128, "Title"),
        FieldDef("Status", "picklist", 255, "Status", nillable=False, default=lead_status[0],
                 picklist=lead_status, restricted=True),  # fmt: skip
        FieldDef("LeadSource", "picklist", 255, "Lead Source",
                 picklist=["Web", "Phone Inquiry", "Partner Referral", "Purchased List", "Other"]),  # fmt: skip
        FieldDef("Website", "url", 255, "Website"),
        FieldDef("Description", "textarea", 32000, "Description"),
        FieldDef("IsConverted", "boolean", 0, "Converted", nillable=False, default=False, **ro),
        FieldDef("ConvertedContactId", "reference", 18, "Converted Contact ID", reference_to=["Contact"], **ro),
    ]
    contact = [
        FieldDef("FirstName", "string", 40, "First Name"),
        FieldDef("LastName", "string", 80, "Last Name", nillable=False, required=True),
        FieldDef("Email", "email", 80, "Email"),
        FieldDef("Phone", "phone", 40, "Business Phone"),
        FieldDef("Title", "string", 128, "Title"),
        FieldDef("AccountId", "reference", 18, "Account ID", reference_to=["Account"]),
        FieldDef("Description", "textarea", 32000, "Contact Description"),
    ]
    task_status = ["Not Started", "In Progress", "Completed", "Waiting on someone else", "Deferred"]
    task = [
        FieldDef("Subject", "combobox", 255, "Subject", picklist=["Call", "Send Letter", "Send Quote", "Other"]),
        FieldDef("Description", "textarea", 32000, "Comments"),
        FieldDef("WhoId", "reference", 18, "Name ID", reference_to=["Contact", "Lead"]),
        FieldDef("Status", "picklist", 255, "Status", nillable=False, default="Not Started",
                 picklist=task_status, restricted=True),  # fmt: skip
        FieldDef("Priority", "picklist", 255, "Priority", nillable=False, default="Normal",
                 picklist=["High", "Normal", "Low"], restricted=True),  # fmt: skip
        FieldDef("ActivityDate", "date", 0, "Due Date Only"),
    ]
    objects = [("Lead", "Lead", "00Q", lead), ("Contact", "Contact", "003", contact), ("Task", "Task", "00T", task)]
    schema = {}
    for name, label, prefix, fields in objects:
        all_fields = _system_fields()
        all_fields[1:1] = fields  # Id first, system audit fields last, as describe lists them
        schema[name] = SObjectDef(name, label, prefix, {f.name: f for f in all_fields})
    return schema


# Prefixes of objects we do not store but that references may point at.
FOREIGN_PREFIXES = {"Account": "001", "User": "005"}


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
        return {"statusCode": self.code, "message": self.message, "fields": self.fields or [], **self.extra}


class RestFailure(Exception):
    """Abort a route with a finished reply."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(reply.status)
        self.reply = reply


def _fail(status: int, errors: list[SfError]) -> RestFailure:
    return RestFailure(Reply(status, [e.rest() for e in errors]))


# -- the emulator ---------------------------------------------------------------------------------
class SalesforceEmulator(EmulatorBase):
    """An emulated org at ``url`` (``https://127.0.0.1:<port>``), trusted via ``ca_path``.

    State: ``records(obj)``, ``record(id)``, ``sessions``, ``logins``, ``api_used``,
    ``calls``, ``schema``. Knobs: ``daily_max``, ``expire_always``, ``latency``,
    ``duplicate_rules`` (see ``enable_duplicate_rule``).
    """

    json_content_type = JSON_CT

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
        self.jwt_public_key = jwt_public_key  # when set, JWT assertions are verified (RS256)
        self.api_used = 0
        self.expire_always = False
        self.sessions: set[str] = set()
        self.logins = 0  # successful SOAP + OAuth logins
        self.schema = default_schema()
        self.duplicate_rules: dict[str, list[str]] = {}
        self._records: dict[str, dict[str, dict[str, Any]]] = {name: {} for name in self.schema}
        self._deleted: dict[str, tuple[str, dict[str, Any]]] = {}
        self._counter = 0
        self._own_tmp: Path | None = None
        if tls is None:
            tls = LocalCA()
        if tls.ca_path is None:
            self._own_tmp = Path(tempfile.mkdtemp(prefix="sf-emulator-"))
            tls.write_ca_pem(self._own_tmp / "ca.pem")
        self.tls = tls

    # -- lifecycle ---------------------------------------------------------------------------
    def _ssl_context(self) -> ssl.SSLContext:
        return self.tls.server_context()

    @property
    def ca_path(self) -> str:
        """PEM of the CA that signed the emulator's certificate (``requests`` ``verify=``)."""
        return str(self.tls.ca_path)

    @property
    def instance(self) -> str:
        """``127.0.0.1:<port>`` — what simple-salesforce calls the instance."""
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        super().stop()
        if self._own_tmp is not None:
            shutil.rmtree(self._own_tmp, ignore_errors=True)
            self._own_tmp = None

    # -- test helpers --------------------------------------------------------------------------
    def records(self, obj: str) -> list[dict[str, Any]]:
        """Copies of the live records of ``obj``, in creation order."""
        with self.lock:
            return [dict(r) for r in self._records[obj].values()]

    def record(self, record_id: str) -> dict[str, Any] | None:
        with self.lock:
            found = self._find(record_id)
            return dict(found[1]) if found else None

    def seed(self, obj: str, fields: dict[str, Any]) -> str:
        """Store a record directly (defaults applied, no validation, no API usage)."""
        with self.lock:
            sobj = self.schema[obj]
            clean = {(sobj.field(k).name if sobj.field(k) else k): v for k, v in fields.items()}
            return self._insert(obj, clean)["Id"]

    def add_field(
        self,
        obj: str,
        name: str,
        type: str = "string",  # noqa: A002 - the describe attribute's name
        *,
        length: int = 255,
        external_id: bool = False,
        unique: bool = False,
        picklist: list[str] | None = None,
        restricted: bool = False,
        required: bool = False,
    ) -> FieldDef:
        """Register a custom field (name must end in ``__c``), e.g. an external id for upserts."""
        if not name.endswith("__c"):
            raise ValueError("custom field names end in __c")
        fdef = FieldDef(name, type, length, name[:-3].replace("_", " "), external_id=external_id, unique=unique,
                        picklist=picklist, restricted=restricted, required=required,
                        nillable=not required)  # fmt: skip
        with self.lock:
            self.schema[obj].fields[name] = fdef
        return fdef

    def new_session(self) -> str:
        """A valid session id without a login round trip (for token-based clients)."""
        with self.lock:
            sid = f"{ORG_ID}!AQ{secrets.token_urlsafe(48)}"
            self.sessions.add(sid)
            return sid

    def expire_sessions(self) -> None:
        """Invalidate every session issued so far; logging in again works."""
        with self.lock:
            self.sessions.clear()

    def enable_duplicate_rule(self, obj: str = "Lead", fields: tuple[str, ...] = ("Email",)) -> None:
        """Block inserts/updates matching an existing record on ``fields`` (case-insensitive)
        with DUPLICATES_DETECTED, unless ``Sforce-Duplicate-Rule-Header: allowSave=true``."""
        with self.lock:
            self.duplicate_rules[obj] = list(fields)

    def disable_duplicate_rules(self) -> None:
        with self.lock:
            self.duplicate_rules.clear()

    def lock_rows(self, n: int = 1, match: str | None = None) -> None:
        """The next ``n`` matching writes (POST/PATCH/PUT/DELETE) fail with 400 UNABLE_TO_LOCK_ROW."""
        base = call_matcher(match, None)
        body = [{"message": "unable to obtain exclusive access to this record", "errorCode": "UNABLE_TO_LOCK_ROW",
                 "fields": []}]  # fmt: skip

        def is_write(call: Call) -> bool:
            return call.method in ("POST", "PATCH", "PUT", "DELETE") and "/services/data/" in call.path and base(call)

        self.add_rule(is_write, n, Reply(400, body))

    def fail_next_non_json_401(self, n: int = 1, match: str | None = None) -> None:
        """401 with an HTML body: the SDK's re-login path then dies in ``response.json()``."""
        page = "<html><body><h1>401 Unauthorized</h1><p>Session expired or invalid</p></body></html>"
        self.add_rule(self._data_matcher(match), n, Reply(401, page, {}, "text/html;charset=UTF-8"))

    def fail_next_unavailable(self, n: int = 1, match: str | None = None, status: int = 503) -> None:
        """5xx with an HTML page, as Salesforce's edge serves during maintenance."""
        self.add_rule(self._data_matcher(match), n, Reply(status, UNAVAILABLE_PAGE, {}, "text/html;charset=UTF-8"))

    def fail_next_expired(self, n: int = 1, match: str | None = None) -> None:
        """The next ``n`` REST calls get 401 INVALID_SESSION_ID whatever their session."""
        self.add_rule(self._data_matcher(match), n, Reply(401, INVALID_SESSION))

    def refuse_next_concurrent(self, n: int = 1, match: str | None = None) -> None:
        """403 for too many concurrent long requests (retryable, unlike the daily limit)."""
        body = [{"message": "ConcurrentPerOrgLongTxn Limit exceeded.", "errorCode": "REQUEST_LIMIT_EXCEEDED"}]
        self.add_rule(self._data_matcher(match), n, Reply(403, body))

    def _data_matcher(self, match: str | None) -> Any:
        base = call_matcher(match, None)
        return lambda call: call.path.startswith("/services/data/") and base(call)

    def _default_failure(self, status: int) -> Reply:
        if status >= 500:
            return Reply(status, UNAVAILABLE_PAGE, {}, "text/html;charset=UTF-8")
        body = {
            300: [],
            401: INVALID_SESSION,
            403: [{"message": "TotalRequests Limit exceeded.", "errorCode": "REQUEST_LIMIT_EXCEEDED"}],
            404: NOT_FOUND,
        }.get(status, [{"message": "An unexpected error occurred.", "errorCode": "UNKNOWN_EXCEPTION"}])
        return Reply(status, copy.deepcopy(body))

    # -- dispatch -----------------------------------------------------------------------------
    def _respond(self, call: Call) -> Reply:
        path = call.raw_path
        if call.method == "POST" and re.fullmatch(r"/services/Soap/u/[\d.]+/?", path):
            return self._soap_login(call, path.rstrip("/").rsplit("/", 1)[1])
        if call.method == "POST" and path.rstrip("/") == "/services/oauth2/token":
            return self._oauth_token(call)
        if path.rstrip("/") == "/services/data":
            versions = [{"label": f"v{v}", "url": f"/services/data/v{v}", "version": v} for v in ("58.0", "59.0", "60.0")]
            return Reply(200, versions)
        m = re.fullmatch(r"/services/data/v(?P<version>\d+\.\d)(?P<rest>/.*)?", path)
        if not m:
            return Reply(404, NOT_FOUND)
        if self.expire_always or self._session_of(call) not in self.sessions:
            return Reply(401, INVALID_SESSION)  # not counted against the daily allocation
        if self.api_used >= self.daily_max:
            return Reply(403, [{"message": "TotalRequests Limit exceeded.", "errorCode": "REQUEST_LIMIT_EXCEEDED"}])
        self.api_used += 1
        body: Any = call.json
        if call.body.strip() and body is None and call.method in ("POST", "PATCH", "PUT"):
            return Reply(400, [{"message": "Unexpected character: was expecting a JSON value", "errorCode": "JSON_PARSER_ERROR"}])
        return self._dispatch(call.method, m["version"], (m["rest"] or "/").lstrip("/"), call.query, body, call.headers)

    def _decorate(self, call: Call, reply: Reply) -> Reply:
        if call.path.startswith("/services/data/v"):
            reply.headers.setdefault("Sforce-Limit-Info", f"api-usage={self.api_used}/{self.daily_max}")
        return reply

    @staticmethod
    def _session_of(call: Call) -> str | None:
        auth = call.headers.get("Authorization", "")
        for scheme in ("Bearer ", "OAuth "):
            if auth.startswith(scheme):
                return auth[len(scheme) :].strip()
        return call.headers.get("X-SFDC-Session")

    def _dispatch(
        self, method: str, version: str, rest: str, query: dict[str, list[str]], body: Any, headers: dict[str, str]
    ) -> Reply:
        """Route one REST request (also used for Composite sub-requests). ``rest`` is still percent-encoded."""
        parts = rest.split("/")
        if parts and parts[-1] == "":
            parts.pop()  # trailing slash: sobjects/Lead/ and query/ are the SDK's spelling
        try:
            return self._route(method, version, parts, query, body, headers)
        except RestFailure as exc:
            return exc.reply

    def _route(
        self, method: str, version: str, parts: list[str], query: dict[str, list[str]], body: Any, headers: dict[str, str]
    ) -> Reply:
        head = parts[0] if parts else ""
        if not parts:
            return Reply(200, {k: f"/services/data/v{version}/{k}" for k in ("sobjects", "query", "queryAll", "limits", "composite")})
        if head in ("query", "queryAll") and len(parts) == 1 and method == "GET":
            return self._query(version, (query.get("q") or [""])[0], include_deleted=head == "queryAll")
        if head == "limits" and len(parts) == 1 and method == "GET":
            return Reply(200, self._limits())
        if head == "composite" and len(parts) == 1 and method == "POST":
            return self._composite(version, body, headers)
        if head == "composite" and len(parts) >= 2 and parts[1] == "sobjects":
            return self._collections(method, version, parts[2:], body, headers)
        if head == "sobjects":
            return self._sobjects(method, version, [unquote(p) for p in parts[1:3]] + parts[3:], body, headers)
        raise RestFailure(Reply(404, NOT_FOUND))

    def _sobjects(self, method: str, version: str, parts: list[str], body: Any, headers: dict[str, str]) -> Reply:
        if not parts:
            if method != "GET":
                raise RestFailure(Reply(405, [{"errorCode": "METHOD_NOT_ALLOWED",
                                               "message": f"HTTP Method '{method}' not allowed. Allowed are GET"}]))  # fmt: skip
            return Reply(200, {"encoding": "UTF-8", "maxBatchSize": 200,
                               "sobjects": [self._object_summary(o, version) for o in self.schema.values()]})  # fmt: skip
        sobj = self._sobject(parts[0])
        if len(parts) == 1:
            if method == "POST":
                new_id, errors = self._create(sobj, body, headers)
                if errors:
                    raise _fail(400, errors)
                return Reply(201, {"id": new_id, "success": True, "errors": []})
            if method == "GET":
                return Reply(200, {"objectDescribe": self._object_summary(sobj, version), "recentItems": []})
            raise self._method_not_allowed(method, "GET, HEAD, POST")
        if len(parts) == 2 and parts[1] == "describe" and method == "GET":
            return Reply(200, self._describe(sobj, version))
        if len(parts) == 2:
            return self._by_id(method, version, sobj, parts[1], body, headers)
        if len(parts) == 3:
            # The value stays percent-encoded until here: "a%2Fb" must not split the path.
            return self._by_external_id(method, version, sobj, parts[1], unquote(parts[2]), body, headers)
        raise RestFailure(Reply(404, NOT_FOUND))

    def _sobject(self, name: str) -> SObjectDef:
        for sobj in self.schema.values():
            if sobj.name.lower() == name.lower():
                return sobj
        raise RestFailure(Reply(404, NOT_FOUND))

    @staticmethod
    def _method_not_allowed(method: str, allowed: str) -> RestFailure:
        return RestFailure(Reply(405, [{"errorCode": "METHOD_NOT_ALLOWED",
                                        "message": f"HTTP Method '{method}' not allowed. Allowed are {allowed}"}]))  # fmt: skip

    # -- single-record routes ---------------------------------------------------------------------
    def _by_id(self, method: str, version: str, sobj: SObjectDef, raw_id: str, body: Any, headers: dict[str, str]) -> Reply:
        record = self._existing(sobj, raw_id)
        if method == "GET":
            return Reply(200, self._render(sobj, record, version, None))
        if method == "PATCH":
            errors = self._update(sobj, record, body, headers)
            if errors:
                raise _fail(400, errors)
            return Reply(204)
        if method == "DELETE":
            self._delete(sobj, record)
            return Reply(204)
        raise self._method_not_allowed(method, "GET, HEAD, PATCH, DELETE")

    def _existing(self, sobj: SObjectDef, raw_id: str) -> dict[str, Any]:
        rid = normalise_id(raw_id)
        if rid is None or not rid.startswith(sobj.key_prefix):
            # A segment that is not an id of this object is read as an external-id field name.
            raise _fail(404, [SfError("NOT_FOUND", f"Provided external ID field does not exist or is not accessible: {raw_id}")])
        if rid in self._deleted:
            raise _fail(404, [SfError("ENTITY_IS_DELETED", "entity is deleted", [])])
        record = self._records[sobj.name].get(rid)
        if record is None:
            raise RestFailure(Reply(404, NOT_FOUND))
        return record

    def _by_external_id(
        self, method: str, version: str, sobj: SObjectDef, field_name: str, value: str, body: Any, headers: dict[str, str]
    ) -> Reply:
        fdef = sobj.field(field_name)
        usable = fdef is not None and (fdef.external_id or fdef.type == "id" or (method == "GET" and fdef.custom))
        if fdef is None or not usable:
            raise _fail(404, [SfError("NOT_FOUND", f"Provided external ID field does not exist or is not accessible: {field_name}")])
        matches = self._match_external(sobj, fdef, value)
        if len(matches) > 1:
            return Reply(300, [self._record_url(sobj, r["Id"], version) for r in matches])
        if method == "GET":
            if not matches:
                raise RestFailure(Reply(404, NOT_FOUND))
            return Reply(200, self._render(sobj, matches[0], version, None))
        if method == "DELETE":
            if not matches:
                raise RestFailure(Reply(404, NOT_FOUND))
            self._delete(sobj, matches[0])
            return Reply(204)
        if method != "PATCH":
            raise self._method_not_allowed(method, "GET, HEAD, PATCH, DELETE")
        if not isinstance(body, dict):
            raise _fail(400, [SfError("JSON_PARSER_ERROR", "The request body must be a JSON object")])
        if matches:
            errors = self._update(sobj, matches[0], body, headers)
            if errors:
                raise _fail(400, errors)
            if float(version) < 46.0:
                return Reply(204)  # before API 46 an upsert-update answered 204 without a body
            return Reply(200, {"id": matches[0]["Id"], "success": True, "errors": [], "created": False})
        if fdef.type == "id":
            raise RestFailure(Reply(404, NOT_FOUND))
        new_id, errors = self._create(sobj, {**body, fdef.name: value}, headers)
        if errors:
            raise _fail(400, errors)
        return Reply(201, {"id": new_id, "success": True, "errors": [], "created": True})

    def _match_external(self, sobj: SObjectDef, fdef: FieldDef, value: str) -> list[dict[str, Any]]:
        if fdef.type == "id":
            rid = normalise_id(value)
            return [r for r in self._records[sobj.name].values() if r["Id"] == rid]
        # External ids compare case-insensitively unless declared case-sensitive (not emulated).
        return [r for r in self._records[sobj.name].values() if _ci(r.get(fdef.name)) == value.lower()]

    # -- record operations (shared by REST, Collections and Composite) --------------------------
    def _create(self, sobj: SObjectDef, body: Any, headers: dict[str, str]) -> tuple[str | None, list[SfError]]:
        if not isinstance(body, dict):
            return None, [SfError("JSON_PARSER_ERROR", "The request body must be a JSON object")]
        clean, errors = self._validate(sobj, body, None)
        if errors:
            return None, errors
        errors = self._check_unique(sobj, clean, None) + self._check_duplicates(sobj, clean, None, headers)
        if errors:
            return None, errors
        return self._insert(sobj.name, clean)["Id"], []

    def _update(self, sobj: SObjectDef, record: dict[str, Any], body: Any, headers: dict[str, str]) -> list[SfError]:
        if not isinstance(body, dict):
            return [SfError("JSON_PARSER_ERROR", "The request body must be a JSON object")]
        clean, errors = self._validate(sobj, body, record)
        if errors:
            return errors
        errors = self._check_unique(sobj, clean, record["Id"]) + self._check_duplicates(
            sobj, {**record, **clean}, record["Id"], headers
        )
        if errors:
            return errors
        record.update(clean)
        record["LastModifiedDate"] = record["SystemModstamp"] = iso_now()
        return []

    def _delete(self, sobj: SObjectDef, record: dict[str, Any]) -> None:
        del self._records[sobj.name][record["Id"]]
        self._deleted[record["Id"]] = (sobj.name, {**record, "IsDeleted": True})

    def _insert(self, obj: str, values: dict[str, Any]) -> dict[str, Any]:
        sobj = self.schema[obj]
        self._counter += 1
        digits = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
        n, tail = self._counter, ""
        while n:
            n, r = divmod(n, 62)
            tail = digits[r] + tail
        rid = sf_id18(sobj.key_prefix + "8d" + tail.rjust(10, "0"))
        stamp = iso_now()
        record: dict[str, Any] = {f.name: f.default for f in sobj.fields.values()}
        record.update(values)
        record.update(Id=rid, IsDeleted=False, CreatedDate=stamp, LastModifiedDate=stamp, SystemModstamp=stamp)
        self._records[obj][rid] = record
        return record

    def _find(self, record_id: str) -> tuple[str, dict[str, Any]] | None:
        rid = normalise_id(record_id)
        for obj, table in self._records.items():
            if rid in table:
                return obj, table[rid]
        return None

    # -- validation --------------------------------------------------------------------------------
    def _validate(
        self, sobj: SObjectDef, body: dict[str, Any], existing: dict[str, Any] | None
    ) -> tuple[dict[str, Any], list[SfError]]:
        clean: dict[str, Any] = {}
        not_writable: list[str] = []
        errors: list[SfError] = []
        for key, value in body.items():
            if key == "attributes":
                continue
            fdef = sobj.field(key)
            if fdef is None:
                # Real API stops at the first unknown field and reports only it.
                return {}, [SfError("INVALID_FIELD", f"No such column '{key}' on sobject of type {sobj.name}", [])]
            if not (fdef.updateable if existing is not None else fdef.createable):
                not_writable.append(fdef.name)
                continue
            error = self._check_value(fdef, value)
            if error:
                errors.append(error)
            clean[fdef.name] = value
        if not_writable:
            errors.insert(0, SfError(
                "INVALID_FIELD_FOR_INSERT_UPDATE",
                f"Unable to create/update fields: {', '.join(not_writable)}. Please check the security settings of "
                "this field and verify that it is read/write for your profile or permission set.",
                not_writable,
            ))  # fmt: skip
        merged = {**(existing or {}), **clean}
        required = [f.name for f in sobj.fields.values() if f.required and merged.get(f.name) in (None, "")]
        if existing is not None:
            required = [name for name in required if name in clean]  # an update only fails on what it blanks
        if required:
            errors.append(SfError("REQUIRED_FIELD_MISSING", f"Required fields are missing: [{', '.join(required)}]", required))
        return clean, errors

    def _check_value(self, fdef: FieldDef, value: Any) -> SfError | None:
        label = fdef.label or fdef.name
        if value is None:
            return None  # nillability is enforced as "required" above
        if fdef.type == "boolean":
            if not isinstance(value, bool):
                return SfError("JSON_PARSER_ERROR", f"Cannot deserialize instance of boolean from VALUE_STRING value {value}")
            return None
        if fdef.type == "double":
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                return SfError("JSON_PARSER_ERROR", f"Cannot deserialize instance of double from VALUE_STRING value {value}")
            return None
        if isinstance(value, (dict, list)):
            return SfError("JSON_PARSER_ERROR", f"Cannot deserialize instance of string from START_OBJECT value for {fdef.name}")
        text = value if isinstance(value, str) else str(value)
        if fdef.type == "reference":
            return self._check_reference(fdef, text)
        if fdef.type == "date" and not DATE_RE.fullmatch(text):
            return SfError("JSON_PARSER_ERROR", f"Cannot deserialize instance of date from VALUE_STRING value {text} "
                                                "or request may be missing a required field")  # fmt: skip
        if fdef.type == "picklist" and fdef.restricted and text and text not in (fdef.picklist or []):
            return SfError("INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST",
                           f"{label}: bad value for restricted picklist field: {text}", [fdef.name])  # fmt: skip
        if fdef.type == "email" and text and not EMAIL_RE.match(text):
            return SfError("INVALID_EMAIL_ADDRESS", f"{label}: invalid email address: {text}", [fdef.name])
        if fdef.length and len(text) > fdef.length and fdef.type not in ("date", "datetime"):
            return SfError("STRING_TOO_LONG", f"{label}: data value too large: {text} (max length={fdef.length})", [fdef.name])
        return None

    def _check_reference(self, fdef: FieldDef, text: str) -> SfError | None:
        label = fdef.label or fdef.name
        if text == "":
            return None
        rid = normalise_id(text)
        if rid is None:
            return SfError("MALFORMED_ID", f"{label}: id value of incorrect type: {text}", [fdef.name])
        targets = [t for t in fdef.reference_to if rid.startswith(self._prefix_of(t))]
        if not targets:
            return SfError("FIELD_INTEGRITY_EXCEPTION", f"{label}: id value of incorrect type: {text}", [fdef.name])
        if targets[0] in self._records and rid not in self._records[targets[0]]:
            return SfError("INVALID_CROSS_REFERENCE_KEY", "invalid cross reference id", [])
        return None

    def _prefix_of(self, obj: str) -> str:
        return self.schema[obj].key_prefix if obj in self.schema else FOREIGN_PREFIXES.get(obj, "???")

    def _check_unique(self, sobj: SObjectDef, clean: dict[str, Any], own_id: str | None) -> list[SfError]:
        errors = []
        for name, value in clean.items():
            fdef = sobj.fields[name]
            if not fdef.unique or value in (None, ""):
                continue
            other = next((r for r in self._records[sobj.name].values()
                          if r["Id"] != own_id and _ci(r.get(name)) == _ci(value)), None)  # fmt: skip
            if other:
                errors.append(SfError("DUPLICATE_VALUE", f"duplicate value found: {name} duplicates value on record "
                                                         f"with id: {other['Id']}", []))  # fmt: skip
        return errors

    def _check_duplicates(
        self, sobj: SObjectDef, values: dict[str, Any], own_id: str | None, headers: dict[str, str]
    ) -> list[SfError]:
        rule = self.duplicate_rules.get(sobj.name)
        if not rule or "allowsave=true" in headers.get("Sforce-Duplicate-Rule-Header", "").replace(" ", "").lower():
            return []
        if any(values.get(f) in (None, "") for f in rule):
            return []
        matches = [r for r in self._records[sobj.name].values()
                   if r["Id"] != own_id and all(_ci(r.get(f)) == _ci(values.get(f)) for f in rule)]  # fmt: skip
        if not matches:
            return []
        duplicate_result = {
            "allowSave": False,
            "duplicateRule": f"Standard_{sobj.name}_Duplicate_Rule",
            "duplicateRuleEntityType": sobj.name,
            "errorMessage": DUPLICATE_MESSAGE,
            "matchResults": [{
                "entityType": sobj.name, "errors": [], "matchEngine": "FuzzyMatchEngine",
                "matchRecords": [{
                    "additionalInformation": [], "fieldDiffs": [], "matchConfidence": 100.0,
                    "record": {"attributes": {"type": sobj.name, "url": self._record_url(sobj, r["Id"], "59.0")}, "Id": r["Id"]},
                } for r in matches],
                "rule": f"Standard_{sobj.name}_Match_Rule_v1_0", "size": len(matches), "success": True,
            }],
        }  # fmt: skip
        return [SfError("DUPLICATES_DETECTED", DUPLICATE_MESSAGE, [], {"duplicateResult": duplicate_result})]

    # -- rendering ----------------------------------------------------------------------------------
    @staticmethod
    def _record_url(sobj: SObjectDef, rid: str, version: str) -> str:
        return f"/services/data/v{version}/sobjects/{sobj.name}/{rid}"

    def _render(self, sobj: SObjectDef, record: dict[str, Any], version: str, names: list[str] | None) -> dict[str, Any]:
        out: dict[str, Any] = {"attributes": {"type": sobj.name, "url": self._record_url(sobj, record["Id"], version)}}
        for name in names or list(sobj.fields):
            out[name] = record.get(name)
        return out

    def _object_summary(self, sobj: SObjectDef, version: str) -> dict[str, Any]:
        base = f"/services/data/v{version}/sobjects/{sobj.name}"
        return {
            "name": sobj.name, "label": sobj.label, "labelPlural": sobj.label + "s", "keyPrefix": sobj.key_prefix,
            "custom": False, "createable": True, "updateable": True, "deletable": True, "queryable": True,
            "retrieveable": True, "searchable": True, "layoutable": True,
            "urls": {"sobject": base, "describe": f"{base}/describe", "rowTemplate": f"{base}/{{ID}}"},
        }  # fmt: skip

    def _describe(self, sobj: SObjectDef, version: str) -> dict[str, Any]:
        return {**self._object_summary(sobj, version), "fields": [f.describe() for f in sobj.fields.values()],
                "childRelationships": [], "recordTypeInfos": []}  # fmt: skip

    def _limits(self) -> dict[str, Any]:
        def pool(maximum: int, remaining: int | None = None) -> dict[str, int]:
            return {"Max": maximum, "Remaining": maximum if remaining is None else remaining}

        return {
            "DailyApiRequests": pool(self.daily_max, max(0, self.daily_max - self.api_used)),
            "DailyAsyncApexExecutions": pool(250000),
            "DailyBulkApiBatches": pool(15000),
            "DailyBulkV2QueryJobs": pool(10000),
            "DataStorageMB": pool(5),
            "FileStorageMB": pool(20),
            "SingleEmail": pool(15),
        }

    # -- SOQL -----------------------------------------------------------------------------------------
    def _query(self, version: str, soql: str, include_deleted: bool) -> Reply:
        if not soql.strip():
            raise _fail(400, [SfError("MALFORMED_QUERY", "A query string has to be specified")])
        try:
            parsed = SoqlParser(soql).parse()
        except SoqlError as exc:
            raise _fail(400, [SfError("MALFORMED_QUERY", str(exc))]) from None
        obj_name = parsed["object"]
        sobj = next((o for o in self.schema.values() if o.name.lower() == obj_name.lower()), None)
        if sobj is None:
            raise _fail(400, [SfError("INVALID_TYPE", f"sObject type '{obj_name}' is not supported. If you are attempting "
                                      "to use a custom object, be sure to append the '__c' after the entity name. Please "
                                      "reference your WSDL or the describe call for the appropriate names.")])  # fmt: skip
        resolve = self._soql_field_resolver(sobj)
        names = None if parsed["count"] else [resolve(f) for f in parsed["fields"]]
        if names is not None and len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise _fail(400, [SfError("MALFORMED_QUERY", f"duplicate field selected: {dup}")])
        where = parsed["where"]
        if where is not None:
            _resolve_condition_fields(where, resolve)
        rows = list(self._records[sobj.name].values())
        if include_deleted:
            rows += [rec for obj, rec in self._deleted.values() if obj == sobj.name]
        rows = [r for r in rows if where is None or _eval_condition(where, r, sobj)]
        for name, descending, nulls_last in reversed([(resolve(f), d, n) for f, d, n in parsed["order"]]):
            present = sorted((r for r in rows if r.get(name) is not None), key=lambda r, n=name: _order_key(r[n]),
                             reverse=descending)  # fmt: skip
            absent = [r for r in rows if r.get(name) is None]
            rows = present + absent if nulls_last else absent + present
        total = len(rows)
        rows = rows[parsed["offset"] :]
        if parsed["limit"] is not None:
            rows = rows[: parsed["limit"]]
        if names is None:
            return Reply(200, {"totalSize": min(total, parsed["limit"] or total), "done": True, "records": []})
        return Reply(200, {"totalSize": len(rows), "done": True,
                           "records": [self._render(sobj, r, version, names) for r in rows]})  # fmt: skip

    @staticmethod
    def _soql_field_resolver(sobj: SObjectDef) -> Any:
        def resolve(name: str) -> str:
            fdef = sobj.field(name)
            if fdef is None:
                raise _fail(400, [SfError("INVALID_FIELD", f"No such column '{name}' on entity '{sobj.name}'. If you are "
                                          "attempting to use a custom field, be sure to append the '__c' after the custom "
                                          "field name. Please reference your WSDL or the describe call for the "
                                          "appropriate names.")])  # fmt: skip
            return fdef.name

        return resolve

    # -- sObject Collections --------------------------------------------------------------------------
    def _collections(self, method: str, version: str, parts: list[str], body: Any, headers: dict[str, str]) -> Reply:
        if not isinstance(body, dict) or not isinstance(body.get("records"), list):
            if method == "DELETE":
                raise _fail(400, [SfError("INVALID_FIELD", "ids parameter is required for delete")])
            raise _fail(400, [SfError("JSON_PARSER_ERROR", "The request body must contain a records array")])
        records = body["records"]
        if len(records) > 200:
            raise _fail(400, [SfError("EXCEEDED_ID_LIMIT", "EXCEEDED_ID_LIMIT: record limit reached. cannot submit "
                                                          "more than 200 records into this call")])  # fmt: skip
        all_or_none = bool(body.get("allOrNone", False))
        snapshot = self._snapshot() if all_or_none else None
        if method == "POST" and not parts:
            results = [self._collection_create(rec, headers) for rec in records]
        elif method == "PATCH" and not parts:
            results = [self._collection_update(rec, headers) for rec in records]
        elif method == "PATCH" and len(parts) == 2:
            results = self._collection_upsert(self._sobject(unquote(parts[0])), unquote(parts[1]), records, headers)
        else:
            raise RestFailure(Reply(404, NOT_FOUND))
        if snapshot is not None and not all(r["success"] for r in results):
            self._restore(snapshot)
            rolled_back = SfError("ALL_OR_NONE_OPERATION_ROLLED_BACK", "Record rolled back because not all records "
                                  "were valid and the request was using AllOrNone header", []).collection()  # fmt: skip
            results = [r if not r["success"] else {"success": False, "errors": [rolled_back]} for r in results]
            results = [{**{k: v for k, v in r.items() if k != "id"}, "id": None} for r in results]
        return Reply(200, results)

    def _record_type(self, rec: Any) -> SObjectDef | SfError:
        if not isinstance(rec, dict):
            return SfError("JSON_PARSER_ERROR", "Each record must be a JSON object")
        obj = (rec.get("attributes") or {}).get("type")
        if not obj:
            return SfError("INVALID_TYPE", "Must send a concrete entity type.")
        try:
            return self._sobject(obj)
        except RestFailure:
            return SfError("INVALID_TYPE", f"sObject type '{obj}' is not supported.")

    def _collection_create(self, rec: Any, headers: dict[str, str]) -> dict[str, Any]:
        sobj = self._record_type(rec)
        if isinstance(sobj, SfError):
            return {"success": False, "errors": [sobj.collection()]}
        if any(k.lower() == "id" for k in rec):
            return {"success": False, "errors": [SfError("INVALID_FIELD", "cannot specify Id in an insert call", []).collection()]}
        new_id, errors = self._create(sobj, rec, headers)
        if errors:
            return {"success": False, "errors": [e.collection() for e in errors]}
        return {"id": new_id, "success": True, "errors": []}

    def _collection_update(self, rec: Any, headers: dict[str, str]) -> dict[str, Any]:
        sobj = self._record_type(rec)
        if isinstance(sobj, SfError):
            return {"success": False, "errors": [sobj.collection()]}
        fields = {k: v for k, v in rec.items() if k.lower() != "id"}
        rid = normalise_id(str(next((v for k, v in rec.items() if k.lower() == "id"), "")))
        record = self._records[sobj.name].get(rid or "")
        if record is None:
            return {"success": False, "errors": [SfError("MALFORMED_ID", "invalid record id", []).collection()]}
        errors = self._update(sobj, record, fields, headers)
        if errors:
            return {"id": record["Id"], "success": False, "errors": [e.collection() for e in errors]}
        return {"id": record["Id"], "success": True, "errors": []}

    def _collection_upsert(
        self, sobj: SObjectDef, field_name: str, records: list[Any], headers: dict[str, str]
    ) -> list[dict[str, Any]]:
        fdef = sobj.field(field_name)
        if fdef is None or not (fdef.external_id or fdef.type == "id"):
            raise _fail(400, [SfError("INVALID_FIELD", f"Field name provided, {field_name} is not an External ID "
                                                      "or indexed field for " + sobj.name)])  # fmt: skip
        values = [str(r.get(fdef.name, "")).lower() if isinstance(r, dict) else "" for r in records]
        results = []
        for rec, value in zip(records, values, strict=True):
            rtype = self._record_type(rec)
            if isinstance(rtype, SfError):
                results.append({"success": False, "errors": [rtype.collection()]})
                continue
            if values.count(value) > 1:
                err = SfError("DUPLICATE_EXTERNAL_ID", f"Duplicate external id specified: {rec.get(fdef.name)}", [fdef.name])
                results.append({"success": False, "errors": [err.collection()]})
                continue
            matches = self._match_external(sobj, fdef, value)
            if len(matches) > 1:
                ids = ", ".join(m["Id"] for m in matches)
                err = SfError("DUPLICATE_EXTERNAL_ID", f"{fdef.name}: more than one record found for external id field: [{ids}]",
                              [fdef.name])  # fmt: skip
                results.append({"success": False, "errors": [err.collection()]})
            elif matches:
                errors = self._update(sobj, matches[0], rec, headers)
                results.append({"id": matches[0]["Id"], "success": not errors, "errors": [e.collection() for e in errors],
                                "created": False})  # fmt: skip
            else:
                new_id, errors = self._create(sobj, rec, headers)
                if errors:
                    results.append({"success": False, "errors": [e.collection() for e in errors], "created": False})
                else:
                    results.append({"id": new_id, "success": True, "errors": [], "created": True})
        return results

    def _snapshot(self) -> tuple[Any, Any, int]:
        return copy.deepcopy(self._records), copy.deepcopy(self._deleted), self._counter

    def _restore(self, snapshot: tuple[Any, Any, int]) -> None:
        self._records, self._deleted, self._counter = snapshot

    # -- Composite --------------------------------------------------------------------------------------
    def _composite(self, version: str, body: Any, headers: dict[str, str]) -> Reply:
        subrequests = body.get("compositeRequest") if isinstance(body, dict) else None
        if not isinstance(subrequests, list) or not subrequests:
            raise _fail(400, [SfError("JSON_PARSER_ERROR", "compositeRequest must be a non-empty array")])
        if len(subrequests) > 25:
            raise _fail(400, [SfError("INVALID_INPUT", "Composite request contains more than 25 subrequests")])
        all_or_none = bool(body.get("allOrNone", False))
        snapshot = self._snapshot() if all_or_none else None
        responses: list[dict[str, Any]] = []
        by_ref: dict[str, Any] = {}
        failed = False
        for sub in subrequests:
            ref = sub.get("referenceId", "")
            try:
                url = _substitute(sub.get("url", ""), by_ref)
                sub_body = _substitute(sub.get("body"), by_ref)
            except KeyError as exc:
                reply = Reply(400, [{"errorCode": "PROCESSING_HALTED",
                                     "message": f"Invalid reference specified. No value for {exc.args[0]} found."}])  # fmt: skip
            else:
                reply = self._composite_one(sub.get("method", "GET").upper(), url, sub_body, headers)
            failed = failed or reply.status >= 400
            http_headers = {}
            if reply.status == 201 and isinstance(reply.body, dict) and "id" in reply.body:
                http_headers["Location"] = f"{urlsplit(url).path.rstrip('/')}/{reply.body['id']}"
            responses.append({"body": reply.body, "httpHeaders": http_headers, "httpStatusCode": reply.status,
                              "referenceId": ref})  # fmt: skip
            if reply.status < 400:
                by_ref[ref] = reply.body
        if failed and snapshot is not None:
            self._restore(snapshot)
            halted = [{"errorCode": "PROCESSING_HALTED",
                       "message": "The transaction was rolled back since another operation in the same transaction "
                                  "failed."}]  # fmt: skip
            responses = [r if r["httpStatusCode"] >= 400 else {**r, "body": halted, "httpHeaders": {}, "httpStatusCode": 400}
                         for r in responses]  # fmt: skip
        return Reply(200, {"compositeResponse": responses})

    def _composite_one(self, method: str, url: str, body: Any, headers: dict[str, str]) -> Reply:
        parts = urlsplit(url)
        m = re.fullmatch(r"/services/data/v(?P<version>\d+\.\d)(?P<rest>/.*)?", parts.path)
        if not m:
            return Reply(400, [{"errorCode": "INVALID_INPUT", "message": f"Invalid url: {url}"}])
        query = parse_qs(parts.query)
        return self._dispatch(method, m["version"], (m["rest"] or "/").lstrip("/"), query, body, headers)

    # -- logins ----------------------------------------------------------------------------------------
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
            return _soap_fault("soapenv:Client", "INVALID_REQUEST", "Unable to parse the SOAP request body")
        username = root.findtext(f".//{{{PARTNER_NS}}}username")
        password = root.findtext(f".//{{{PARTNER_NS}}}password")
        if username is None or password is None:
            return _soap_fault("soapenv:Client", "INVALID_REQUEST", "Element {urn:partner.soap.sforce.com}login missing")
        if username != self.username or not self._password_ok(password):
            return _soap_fault("sf:INVALID_LOGIN", "INVALID_LOGIN",
                               "Invalid username, password, security token; or user locked out.")  # fmt: skip
        sid = self._issue_session()
        base = self.url
        xml = (
            '<?xml version="1.0" encoding="UTF-8"?><soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" '
            'xmlns="urn:partner.soap.sforce.com" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><soapenv:Body>'
            "<loginResponse><result>"
            f"<metadataServerUrl>{base}/services/Soap/m/{version}/{ORG_ID}</metadataServerUrl>"
            "<passwordExpired>false</passwordExpired><sandbox>false</sandbox>"
            f"<serverUrl>{base}/services/Soap/u/{version}/{ORG_ID}</serverUrl>"
            f"<sessionId>{escape(sid)}</sessionId><userId>{USER_ID}</userId>"
            "<userInfo><accessibilityMode>false</accessibilityMode><currencySymbol>$</currencySymbol>"
            f"<organizationId>{ORG_ID}AAA</organizationId><organizationName>Emulated Org</organizationName>"
            f"<sessionSecondsValid>7200</sessionSecondsValid><userEmail>{escape(self.username)}</userEmail>"
            f"<userFullName>Emulated User</userFullName><userId>{USER_ID}</userId>"
            f"<userName>{escape(self.username)}</userName></userInfo>"
            "</result></loginResponse></soapenv:Body></soapenv:Envelope>"
        )
        return Reply(200, xml, {}, "text/xml;charset=UTF-8")

    def _oauth_token(self, call: Call) -> Reply:
        form = {k: v[0] for k, v in parse_qs(call.body, keep_blank_values=True).items()}
        client_id, client_secret = form.get("client_id"), form.get("client_secret")
        auth = call.headers.get("Authorization", "")
        if auth.startswith("Basic "):
            try:
                client_id, _, client_secret = base64.b64decode(auth[6:]).decode().partition(":")
            except ValueError:
                return _oauth_error("invalid_client", "invalid client credentials")
        grant = form.get("grant_type", "")
        if grant == "password":
            if client_id != self.consumer_key:
                return _oauth_error("invalid_client_id", "client identifier invalid")
            if client_secret != self.consumer_secret:
                return _oauth_error("invalid_client", "invalid client credentials")
            if form.get("username") != self.username or not self._password_ok(form.get("password", "")):
                return _oauth_error("invalid_grant", "authentication failure")
        elif grant == "client_credentials":
            if client_id != self.consumer_key or client_secret != self.consumer_secret:
                return _oauth_error("invalid_client", "invalid client credentials")
        elif grant == "urn:ietf:params:oauth:grant-type:jwt-bearer":
            problem = self._jwt_problem(form.get("assertion", ""))
            if problem:
                return _oauth_error(*problem)
        else:
            return _oauth_error("unsupported_grant_type", "grant type not supported")
        sid = self._issue_session()
        issued_at = str(int(time.time() * 1000))
        identity = f"{self.url}/id/{ORG_ID}AAA/{USER_ID}"
        signature = base64.b64encode(
            hmac.new(self.consumer_secret.encode(), (identity + issued_at).encode(), hashlib.sha256).digest()
        ).decode()
        return Reply(200, {
            "access_token": sid, "instance_url": self.url, "id": identity, "token_type": "Bearer",
            "issued_at": issued_at, "signature": signature, "scope": "api",
        })  # fmt: skip

    def _jwt_problem(self, assertion: str) -> tuple[str, str] | None:
        try:
            if self.jwt_public_key is not None:
                claims = jwt.decode(assertion, self.jwt_public_key, algorithms=["RS256"],
                                    options={"verify_aud": False, "verify_exp": False})  # fmt: skip
            else:
                claims = jwt.decode(assertion, options={"verify_signature": False})
        except jwt.PyJWTError:
            return "invalid_grant", "invalid assertion"
        if claims.get("iss") != self.consumer_key:
            return "invalid_client_id", "client identifier invalid"
        if claims.get("sub") != self.username:
            return "invalid_grant", "user hasn't approved this consumer"
        try:
            expired = int(str(claims.get("exp"))) < time.time()
        except ValueError:
            return "invalid_grant", "invalid assertion"
        if expired:
            return "invalid_grant", "expired authorization code"
        return None


# -- module helpers --------------------------------------------------------------------------------
def _ci(value: Any) -> Any:
    return value.lower() if isinstance(value, str) else value


def _soap_fault(faultcode: str, code: str, message: str) -> Reply:
    xml = (
        '<?xml version="1.0" encoding="UTF-8"?><soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" '
        'xmlns:sf="urn:fault.partner.soap.sforce.com" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">'
        f"<soapenv:Body><soapenv:Fault><faultcode>{faultcode}</faultcode><faultstring>{code}: {escape(message)}</faultstring>"
        '<detail><sf:LoginFault xsi:type="sf:LoginFault">'
        f"<sf:exceptionCode>{code}</sf:exceptionCode><sf:exceptionMessage>{escape(message)}</sf:exceptionMessage>"
        "</sf:LoginFault></detail></soapenv:Fault></soapenv:Body></soapenv:Envelope>"
    )
    return Reply(500, xml, {}, "text/xml;charset=UTF-8")


def _oauth_error(error: str, description: str) -> Reply:
    return Reply(400, {"error": error, "error_description": description})


_REF_RE = re.compile(r"@\{([^}]+)\}")


def _substitute(value: Any, refs: dict[str, Any]) -> Any:
    """Replace Composite ``@{ref.path}`` references with earlier results (KeyError when missing)."""
    if isinstance(value, str):
        whole = _REF_RE.fullmatch(value)
        if whole:
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


# -- SOQL subset ----------------------------------------------------------------------------------
class SoqlError(ValueError):
    pass


_SOQL_ESCAPES = {"\\": "\\", "'": "'", '"': '"', "n": "\n", "r": "\r", "t": "\t", "b": "\b", "f": "\f",
                 "%": "\ue000", "_": "\ue001"}  # fmt: skip
# \% and \_ are literal only inside LIKE patterns; kept as private-use markers until then.
_TOKEN_RE = re.compile(
    r"\s*(?:(?P<str>'(?:[^'\\]|\\.)*')|(?P<date>\d{4}-\d{2}-\d{2}(?:T[\d:.]+(?:Z|[+-]\d{2}:?\d{2}))?)"
    r"|(?P<num>-?\d+(?:\.\d+)?)|(?P<op>!=|<>|<=|>=|=|<|>|\(|\)|,)|(?P<word>[A-Za-z_][A-Za-z0-9_.]*))"
)
_KEYWORDS = {"SELECT", "FROM", "WHERE", "AND", "OR", "NOT", "IN", "LIKE", "ORDER", "BY", "ASC", "DESC", "NULLS",
             "FIRST", "LAST", "LIMIT", "OFFSET", "NULL", "TRUE", "FALSE", "COUNT"}  # fmt: skip


@dataclass
class _Tok:
    kind: str  # str date num op word kw
    value: Any
    text: str


class SoqlParser:
    """``SELECT f, ... | COUNT() FROM Obj [WHERE cond] [ORDER BY f [ASC|DESC] [NULLS FIRST|LAST], ...]
    [LIMIT n] [OFFSET n]`` with =, !=, <>, <, <=, >, >=, [NOT] IN (...), LIKE, AND, OR, NOT, parentheses."""

    def __init__(self, text: str) -> None:
        self.tokens = self._lex(text)
        self.pos = 0

    @staticmethod
    def _lex(text: str) -> list[_Tok]:
        tokens, pos = [], 0
        text = text.rstrip()
        while pos < len(text):
            m = _TOKEN_RE.match(text, pos)
            if not m or m.end() == pos:
                raise SoqlError(f"unexpected token: '{text[pos:].split()[0] if text[pos:].split() else text[pos:]}'")
            pos = m.end()
            kind = m.lastgroup or ""
            raw = m[kind]
            if kind == "str":
                tokens.append(_Tok("str", _unescape(raw[1:-1]), raw))
            elif kind == "num":
                tokens.append(_Tok("num", float(raw) if "." in raw else int(raw), raw))
            elif kind == "word" and raw.upper() in _KEYWORDS:
                tokens.append(_Tok("kw", raw.upper(), raw))
            else:
                tokens.append(_Tok(kind, raw, raw))
        return tokens

    def _peek(self, *values: str) -> bool:
        tok = self.tokens[self.pos] if self.pos < len(self.tokens) else None
        return tok is not None and tok.kind in ("kw", "op") and tok.value in values

    def _take(self, *values: str) -> _Tok:
        if self.pos >= len(self.tokens):
            raise SoqlError(f"unexpected end of query, expecting {' or '.join(values) or 'more'}")
        tok = self.tokens[self.pos]
        if values and not (tok.kind in ("kw", "op") and tok.value in values):
            raise SoqlError(f"unexpected token: '{tok.text}'")
        self.pos += 1
        return tok

    def _ident(self) -> str:
        tok = self._take()
        if tok.kind != "word":
            raise SoqlError(f"unexpected token: '{tok.text}'")
        return tok.value

    def parse(self) -> dict[str, Any]:
        self._take("SELECT")
        fields: list[str] = []
        count = False
        if self._peek("COUNT"):
            self._take("COUNT")
            self._take("(")
            self._take(")")
            count = True
        else:
            fields.append(self._ident())
            while self._peek(","):
                self._take(",")
                fields.append(self._ident())
        self._take("FROM")
        obj = self._ident()
        where = None
        if self._peek("WHERE"):
            self._take("WHERE")
            where = self._or()
        order: list[tuple[str, bool, bool]] = []
        if self._peek("ORDER"):
            self._take("ORDER")
            self._take("BY")
            while True:
                name = self._ident()
                descending = False
                if self._peek("ASC", "DESC"):
                    descending = self._take().value == "DESC"
                nulls_last = descending
                if self._peek("NULLS"):
                    self._take("NULLS")
                    nulls_last = self._take("FIRST", "LAST").value == "LAST"
                order.append((name, descending, nulls_last))
                if not self._peek(","):
                    break
                self._take(",")
        limit = offset = None
        if self._peek("LIMIT"):
            self._take("LIMIT")
            limit = self._int()
        if self._peek("OFFSET"):
            self._take("OFFSET")
            offset = self._int()
        if self.pos != len(self.tokens):
            raise SoqlError(f"unexpected token: '{self.tokens[self.pos].text}'")
        return {"fields": fields, "count": count, "object": obj, "where": where, "order": order,
                "limit": limit, "offset": offset or 0}  # fmt: skip

    def _int(self) -> int:
        tok = self._take()
        if tok.kind != "num" or not isinstance(tok.value, int):
            raise SoqlError(f"unexpected token: '{tok.text}'")
        return tok.value

    def _or(self) -> Any:
        node = self._and()
        while self._peek("OR"):
            self._take("OR")
            node = ("or", node, self._and())
        return node

    def _and(self) -> Any:
        node = self._not()
        while self._peek("AND"):
            self._take("AND")
            node = ("and", node, self._not())
        return node

    def _not(self) -> Any:
        if self._peek("NOT"):
            self._take("NOT")
            return ("not", self._not())
        if self._peek("("):
            self._take("(")
            node = self._or()
            self._take(")")
            return node
        return self._comparison()

    def _comparison(self) -> Any:
        name = self._ident()
        if self._peek("NOT"):
            self._take("NOT")
            self._take("IN")
            return ("not", ["in", name, self._list()])
        if self._peek("IN"):
            self._take("IN")
            return ["in", name, self._list()]
        if self._peek("LIKE"):
            self._take("LIKE")
            tok = self._take()
            if tok.kind != "str":
                raise SoqlError(f"unexpected token: '{tok.text}'")
            return ["like", name, tok.value]
        op = self._take("=", "!=", "<>", "<", "<=", ">", ">=").value
        return ["cmp", name, "!=" if op == "<>" else op, self._literal()]

    def _list(self) -> list[Any]:
        self._take("(")
        values = [self._literal()]
        while self._peek(","):
            self._take(",")
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
        ch = body[i]
        if ch == "\\":
            if i + 1 >= len(body) or body[i + 1] not in _SOQL_ESCAPES:
                raise SoqlError("Invalid string literal. Illegal character sequence.")
            out.append(_SOQL_ESCAPES[body[i + 1]])
            i += 2
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def _plain(value: Any) -> Any:
    return value.replace("\ue000", "%").replace("\ue001", "_") if isinstance(value, str) else value


def _resolve_condition_fields(node: Any, resolve: Any) -> None:
    if isinstance(node, tuple):
        for child in node[1:]:
            _resolve_condition_fields(child, resolve)
    else:
        node[1] = resolve(node[1])


def _eval_condition(node: Any, record: dict[str, Any], sobj: SObjectDef) -> bool:
    if isinstance(node, tuple):
        if node[0] == "and":
            return _eval_condition(node[1], record, sobj) and _eval_condition(node[2], record, sobj)
        if node[0] == "or":
            return _eval_condition(node[1], record, sobj) or _eval_condition(node[2], record, sobj)
        return not _eval_condition(node[1], record, sobj)
    kind, name = node[0], node[1]
    fdef = sobj.fields[name]
    actual = _comparable(fdef, record.get(name))
    if kind == "in":
        return actual in [_comparable(fdef, _plain(v)) for v in node[2]]
    if kind == "like":
        if actual is None:
            return False
        pattern = "".join(".*" if c == "%" else "." if c == "_" else re.escape(_plain(c)) for c in node[2])
        return re.fullmatch(pattern, str(actual), re.IGNORECASE | re.DOTALL) is not None
    op, expected = node[2], _comparable(fdef, _plain(node[3]))
    if op == "=":
        return actual == expected
    if op == "!=":
        return actual != expected
    if actual is None or expected is None:
        return False
    try:
        return {"<": actual < expected, "<=": actual <= expected, ">": actual > expected, ">=": actual >= expected}[op]
    except TypeError:
        return False


def _comparable(fdef: FieldDef, value: Any) -> Any:
    """Normalise for SOQL comparison: text is case-insensitive, ids compare as 18-char, '' is null."""
    if value is None or value == "":
        return None
    if fdef.type in ("id", "reference") and isinstance(value, str):
        return normalise_id(value) or value
    if isinstance(value, str):
        return value.lower()
    return value


def _order_key(value: Any) -> Any:
    return value.lower() if isinstance(value, str) else value
