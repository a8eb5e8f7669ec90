"""The daemon's configuration: typed models of config.yaml and a loader that locates every problem.

`load_config` is the one loader: `crm-bridge serve` and `crm-bridge check` both call it, so a
config that passes `check` is exactly a config the daemon accepts. Problems are collected and
reported together, each as file:line:column: key: message.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import unquote, urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    IPvAnyNetwork,
    PrivateAttr,
    SecretStr,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from bridge.errors import ConfigError, ConfigProblem
from connectors import registry
from connectors.base import ConnectorConfig

Loc = tuple[str | int, ...]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ServerConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    max_body_bytes: int = Field(default=256 * 1024, ge=1024)
    shutdown_timeout: float = Field(default=20.0, gt=0)
    # Hostile input: JSON shape, slow clients, too many requests at once.
    max_json_depth: int = Field(default=32, ge=2, le=512)
    max_json_fields: int = Field(default=5000, ge=10, description="keys and items, all levels")
    header_timeout: float = Field(default=15.0, gt=0, description="to send the request headers")
    read_timeout: float = Field(default=15.0, gt=0, description="to send the body, once headers")
    max_concurrent_requests: int = Field(default=256, ge=1, description="webhooks in progress")
    # Proxies whose X-Forwarded-For is believed (for sources' allow_ips); nobody else's is.
    trusted_proxies: list[IPvAnyNetwork] = Field(default_factory=list)


class SignatureConfig(_Strict):
    """A signed source: Standard Webhooks (`webhook-id/-timestamp/-signature`) or a generic
    HMAC of the body in one header."""

    scheme: Literal["standard_webhooks", "hmac"] = "standard_webhooks"
    # Several may be active at once (rotation). standard_webhooks: `whsec_<base64>`.
    secrets: list[SecretStr] = Field(min_length=1)
    tolerance: float = Field(default=300.0, gt=0, description="seconds of clock skew, both ways")
    # Senders retry for up to three days: ids are remembered longer than that.
    replay_window: float = Field(default=96 * 3600.0, ge=96 * 3600.0)
    # hmac only: where the signature travels and how it is written.
    header: str = "X-Signature"
    algorithm: Literal["sha256", "sha1", "sha512"] = "sha256"
    encoding: Literal["hex", "base64"] = "hex"
    prefix: str = Field(default="", description="e.g. sha256= (GitHub style)")

    @model_validator(mode="after")
    def _secrets_decode(self) -> SignatureConfig:
        from bridge.ingress.signatures import decode_secret

        if self.scheme == "standard_webhooks":
            for secret in self.secrets:
                decode_secret(secret.get_secret_value())  # ValueError names no secret
        elif any(len(s.get_secret_value()) < 16 for s in self.secrets):
            raise ValueError("an HMAC secret needs at least 16 characters")
        return self

    @model_validator(mode="after")
    def _replays_outlive_the_tolerance(self) -> SignatureConfig:
        # A webhook-timestamp is good for `tolerance` either side of our clock: a captured
        # request can be sent again for up to twice the tolerance after its first arrival.
        if 2 * self.tolerance >= self.replay_window:
            raise ValueError(
                f"tolerance ({self.tolerance:g} s) must be less than half of replay_window"
                f" ({self.replay_window:g} s): a webhook-timestamp is good for tolerance either"
                " way, so a captured request would be accepted again once its webhook-id is"
                " forgotten"
            )
        return self


class RateLimitConfig(_Strict):
    """A token bucket per source: `rate` webhooks a second on average, bursts up to `burst`."""

    rate: float = Field(gt=0)
    burst: int = Field(ge=1)


TokenPlace = Literal["path", "query", "header"]


def _everywhere() -> list[TokenPlace]:
    return ["path", "query", "header"]


class SourceConfig(_Strict):
    kind: Literal["supersend"] = "supersend"
    # Several tokens may be active at once, so one can be rotated without downtime.
    tokens: list[SecretStr] = Field(default_factory=list)
    # Where a token may travel: the URL (path segment, ?token=; Supersend can do nothing
    # else) or a header (X-Webhook-Token, Authorization: Bearer).
    token_in: list[TokenPlace] = Field(default_factory=_everywhere, min_length=1)
    signature: SignatureConfig | None = None
    allow_ips: list[IPvAnyNetwork] = Field(default_factory=list, description="CIDRs; empty: any")
    rate_limit: RateLimitConfig | None = None
    # What this source sends beyond the platform's documented payload, so that `check` does
    # not take a rule reading them for a typo (`bridge.lint`).
    event_types: list[str] = Field(default_factory=list, description="extra event types")
    contact_fields: list[str] = Field(default_factory=list, description="extra contact fields")

    @field_validator("tokens")
    @classmethod
    def _tokens_are_long(cls, tokens: list[SecretStr]) -> list[SecretStr]:
        if any(0 < len(t.get_secret_value()) < 16 for t in tokens):
            raise ValueError("a token needs at least 16 characters")
        return tokens

    def active_tokens(self) -> list[str]:
        return [t.get_secret_value() for t in self.tokens if t.get_secret_value()]


class SqliteStoreConfig(_Strict):
    type: Literal["sqlite"] = "sqlite"
    path: Path = Path("crm-bridge.db")

    def describe(self) -> str:
        return str(self.path)


class PostgresStoreConfig(_Strict):
    """A PostgreSQL store shared by several daemons: `store: {url: postgresql://...}`."""

    type: Literal["postgres"] = "postgres"
    # libpq form: postgresql://user:password@host:port/database?sslmode=...; a secret, since
    # it may hold the password (write ${file:/run/credentials/...} or ${PG_URL}).
    url: SecretStr
    pool_min: int = Field(default=2, ge=0, le=100)
    pool_max: int = Field(default=10, ge=1, le=100)
    # Apply pending schema migrations when the daemon starts (under an advisory lock, so
    # instances starting together migrate once); false: only `crm-bridge migrate` does.
    migrate_on_start: bool = True
    command_timeout: float = Field(default=30.0, gt=0)

    @field_validator("url")
    @classmethod
    def _postgres_url(cls, value: SecretStr) -> SecretStr:
        if urlsplit(value.get_secret_value()).scheme not in ("postgresql", "postgres"):
            raise ValueError("a PostgreSQL URL starts with postgresql://")
        return value

    @model_validator(mode="after")
    def _pool_bounds(self) -> PostgresStoreConfig:
        if self.pool_min > self.pool_max:
            raise ValueError(f"pool_min ({self.pool_min}) exceeds pool_max ({self.pool_max})")
        return self

    def describe(self) -> str:
        """The URL without its password (userinfo or `?password=`), for logs and `status`."""
        from bridge.store.urls import redact_url  # the store's own messages use it too

        return redact_url(self.url.get_secret_value())


def _store_kind(data: Any) -> str:
    # `type:` decides; without it a `url:` means PostgreSQL, anything else the SQLite file.
    if isinstance(data, dict):
        kind = data.get("type") or ("postgres" if "url" in data else "sqlite")
        return str(kind) if kind in STORE_KINDS else "sqlite"
    return str(getattr(data, "type", "sqlite"))


STORE_KINDS = ("sqlite", "postgres")
_STORE_MODELS: dict[str, type[BaseModel]] = {
    "sqlite": SqliteStoreConfig,
    "postgres": PostgresStoreConfig,
}
StoreConfig = Annotated[
    Annotated[SqliteStoreConfig, Tag("sqlite")] | Annotated[PostgresStoreConfig, Tag("postgres")],
    Discriminator(_store_kind),
]


class DeliveryConfig(_Strict):
    in_call_attempts: int = Field(default=3, ge=1, le=10)
    in_call_wait: float = Field(default=0.5, ge=0, description="first in-call backoff, seconds")
    in_call_wait_max: float = Field(default=5.0, ge=0)
    backoff_initial: float = Field(default=30.0, ge=0)
    backoff_max: float = Field(default=3600.0, ge=0)
    horizon: float = Field(default=86400.0, gt=0, description="dead-letter after this long")
    lease_seconds: float = Field(default=300.0, gt=0)
    poll_interval: float = Field(default=1.0, gt=0)
    # Hold new deliveries this long so a contact's burst (open, click, reply) merges into one
    # write; whatever is queued for a contact merges anyway, up to coalesce_max deliveries.
    coalesce_window: float = Field(default=0.0, ge=0)
    coalesce_max: int = Field(default=50, ge=0)
    breaker_failures: int = Field(default=5, ge=1, description="failed calls in a row to pause")
    breaker_cooldown: float = Field(default=30.0, gt=0)
    breaker_cooldown_max: float = Field(default=600.0, gt=0)
    auth_pause: float = Field(default=300.0, gt=0, description="pause after a refused login")
    # Above this many unfinished deliveries the webhook answers 503 + Retry-After.
    max_backlog: int = Field(default=100_000, ge=1)
    # A status update or an activity whose record does not exist yet waits this long for the
    # contact's delivery that creates it (released at once when it lands); then `if_missing`.
    await_record: float = Field(default=900.0, ge=0)
    # Under load (a call in flight), gather what is due until a call ends, for this long
    # (seconds) at most, so that batches fill; a lone delivery after an idle spell leaves at once.
    batch_gather: float = Field(default=0.25, ge=0, le=5)


class ConnectorEntry(BaseModel):
    """A connector as written in YAML: its `type` picks the class that validates the rest."""

    model_config = ConfigDict(extra="allow")

    type: str


class ActivityConfig(_Strict):
    """What `log_activity` writes: a HubSpot note (or task), a Salesforce Task."""

    kind: Literal["note", "task"] = "note"
    object: Literal["lead", "contact"] = "contact"  # the record it is logged on
    subject: str = Field(min_length=1, description="template")
    body: str = Field(default="", description="template")


ACTIONS = ("upsert_lead", "upsert_contact", "update_status", "log_activity", "stop")
POLICIES = ("always", "if_empty", "on_create", "monotonic")


class FieldMapping(_Strict):
    """One CRM field of a rule: where its value comes from, and when it may be written.

    Written in YAML as a bare value (`hs_lead_status: OPEN`, `firstname: "{{ ... }}"`) or as
    a mapping with `value` and the options below.
    """

    value: Any = Field(description="a template, or a constant written as is")
    # Rendered value -> CRM value (matched as text, case-insensitively). A value the map does
    # not name is left out, or becomes `default`.
    map: dict[str, Any] | None = None
    default: Any = None  # when the value renders empty or the map does not name it
    type: Literal["string", "number", "integer", "boolean", "date", "datetime"] | None = None
    max_length: int | None = Field(default=None, ge=1, description="cut longer text to this")
    # Not given: written always. Given as `always`, the connector is told so explicitly (HubSpot
    # then lets the rule move lifecyclestage backwards).
    policy: Literal["always", "if_empty", "on_create", "monotonic"] | None = None
    order: list[str] = Field(default_factory=list, description="monotonic: first to last")

    @model_validator(mode="before")
    @classmethod
    def _bare_value(cls, data: Any) -> Any:
        return data if isinstance(data, dict) else {"value": data}

    @model_validator(mode="after")
    def _order_goes_with_monotonic(self) -> FieldMapping:
        if self.policy == "monotonic" and len(self.order) < 2:
            raise ValueError("policy monotonic needs an `order:` of at least two values")
        if self.policy != "monotonic" and self.order:
            raise ValueError(
                f"`order:` is only for policy monotonic, not {self.policy or 'always'}"
            )
        return self


class RuleConfig(_Strict):
    name: str = Field(min_length=1)
    when: str = Field(min_length=1, description="Jinja2 expression, e.g. type == 'reply'")
    connector: str | None = None
    # Checked by the loader, which names the closest action when one is misspelt.
    action: str = "upsert_lead"
    # update_status: the kind of record it updates (never creates).
    object: Literal["lead", "contact"] | None = None
    # The CRM field that identifies the record (None: the CRM's email field), and its value.
    id_property: str | None = None
    id_value: str = "{{ contact.email }}"
    fields: dict[str, FieldMapping] = Field(default_factory=dict)
    activity: ActivityConfig | None = None
    # HubSpot: also open a Lead object for the contact (once), with these properties (constants
    # or templates); `{}` for the defaults (hs_lead_name: the contact's name, else its email).
    hubspot_lead: dict[str, Any] | None = None
    # update_status and log_activity, when the record does not exist: `wait` (the default)
    # for the delivery that creates it up to delivery.await_record, then skip; `skip` at once;
    # `dead_letter` after the wait (a person must act).
    if_missing: Literal["wait", "skip", "dead_letter"] = "wait"

    @model_validator(mode="after")
    def _settings_go_with_the_action(self) -> RuleConfig:
        if self.action == "log_activity" and self.activity is None:
            raise ValueError("action log_activity needs an `activity:` (subject, body)")
        if self.action != "log_activity" and self.activity is not None:
            raise ValueError(f"`activity:` is only for action log_activity, not {self.action}")
        if self.action == "update_status" and not self.fields:
            raise ValueError("action update_status needs `fields:` (the status to set)")
        if self.action == "stop" and (self.fields or self.connector):
            raise ValueError("action stop takes no `connector:` nor `fields:`")
        if self.hubspot_lead is not None and self.action not in ("upsert_lead", "upsert_contact"):
            raise ValueError(f"`hubspot_lead:` goes with an upsert action, not {self.action}")
        if self.object is not None and self.action != "update_status":
            raise ValueError(f"`object:` is only for action update_status, not {self.action}")
        if "if_missing" in self.model_fields_set and self.action not in (
            "update_status",
            "log_activity",
        ):
            raise ValueError(
                f"`if_missing:` is for update_status and log_activity, not {self.action}"
            )
        return self

    @property
    def record_object(self) -> Literal["lead", "contact"]:
        """The kind of record an upsert or status update writes."""
        if self.action == "upsert_contact":
            return "contact"
        return self.object or "lead"


class LoggingConfig(_Strict):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["json", "text", "auto"] = "auto"
    # Emails (j***@example.com) and names are masked in every log line unless this is false.
    mask_personal_data: bool = True
    # Each request as one line (`http.access`), tokens in its URL redacted.
    access_log: bool = False


MIN_RETENTION_DAYS = 4  # senders retry for up to three days, and a day to spare


class PrivacyConfig(_Strict):
    # Delivered (or skipped) events older than this are deleted from the store; None: kept.
    retention_days: float | None = None
    purge_interval: float = Field(default=3600.0, gt=0, description="seconds between purges")

    @field_validator("retention_days")
    @classmethod
    def _outlive_the_senders_retries(cls, days: float | None) -> float | None:
        # A stored event is what makes a resend of it a duplicate (its idempotency key).
        if days is not None and days < MIN_RETENTION_DAYS:
            raise ValueError(
                f"retention_days must be at least {MIN_RETENTION_DAYS}: senders retry for up to"
                " 3 days, and a resend of an event purged sooner would be delivered twice"
            )
        return days


class Config(_Strict):
    server: ServerConfig = Field(default_factory=ServerConfig)
    sources: dict[str, SourceConfig] = Field(default_factory=lambda: {"supersend": SourceConfig()})
    store: StoreConfig = Field(default_factory=SqliteStoreConfig)
    delivery: DeliveryConfig = Field(default_factory=DeliveryConfig)
    connectors: dict[str, ConnectorEntry] = Field(default_factory=dict)
    rules: list[RuleConfig] = Field(default_factory=list)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)

    # Filled by the loader: each connector's settings, validated by its own class's model.
    connector_settings: dict[str, ConnectorConfig] = Field(default_factory=dict, exclude=True)
    source_file: str = Field(default="<memory>", exclude=True)
    # Filled by the loader: things to fix that do not stop the daemon (a secret readable by
    # others). `check` prints them, `serve` logs them.
    warnings: list[str] = Field(default_factory=list, exclude=True)
    # Filled by the loader: rules that can never match as written (a type no source sends, a
    # contact field the payload lacks; `bridge.lint`). `check` prints them, `serve` logs them.
    rule_warnings: list[str] = Field(default_factory=list, exclude=True)
    # Filled by the loader: credentials of deferred sections it could not read (`defer=`).
    unread: list[str] = Field(default_factory=list, exclude=True)
    readable_credentials: list[str] = Field(default_factory=list, exclude=True)
    _marks: dict[Loc, yaml.Mark] = PrivateAttr(default_factory=dict)

    def problem(self, loc: Loc, message: str) -> ConfigProblem:
        """A problem found after loading (`check --online`), located like the loader's."""
        problems = _Problems(self.source_file, self._marks)
        problems.add(loc, message)
        return problems.items[0]


# ${VAR}, ${VAR:-default}, ${file:/path}
_INTERPOLATION = re.compile(
    r"\$\{(?:(?P<file>file):(?P<path>[^}]+)|(?P<var>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>[^}]*))?)\}"
)
# Where systemd hands a service its credentials (LoadCredential=): /run/credentials/<unit>/<name>.
SYSTEMD_CREDENTIALS = re.compile(r"^/run/credentials/[^/]+/(?P<name>[^/]+)$")
# What an unread credential becomes in a deferred section (see `load_config`): a value every
# secret's validator accepts (a token's 16 characters, a Standard Webhooks key's base64), so the
# rest of the section is still checked. Never sent anywhere: only commands that call no CRM and
# serve no webhook defer.
UNREAD = "whsec_Y3JtLWJyaWRnZTogY3JlZGVudGlhbCBub3QgcmVhZA=="
UNREAD_URL = "postgresql://unread-credential@localhost/unread"
DEFER_ALL = ("server", "sources", "store", "delivery", "connectors", "rules", "logging", "privacy")


class _Resolver:
    """Interpolation for one load: where relative paths start, where systemd credentials are
    read from, which sections may leave a credential unread, and what was found."""

    def __init__(
        self,
        base_dir: Path | None = None,
        credentials_dir: Path | None = None,
        defer: tuple[str, ...] = (),
    ) -> None:
        self.base_dir = base_dir
        self.credentials_dir = credentials_dir
        self.defer = defer
        self.problems: list[tuple[Loc, str]] = []
        self.unread: list[tuple[Loc, str]] = []  # in a deferred section: warnings, not problems
        self.readable_credentials: list[str] = []  # credential files others may read
        self.failed: list[Loc] = []  # where an interpolation failed (reported already)

    def path(self, text: str) -> Path:
        """A file a config names: a systemd credential from `credentials_dir` when one is given
        (`check --credentials-dir` reads the files systemd will hand over), a relative path
        from the config file's directory."""
        match = SYSTEMD_CREDENTIALS.match(text)
        if match and self.credentials_dir is not None:
            return self.credentials_dir / match["name"]
        path = Path(text).expanduser()
        if self.base_dir is not None and not path.is_absolute():
            return self.base_dir / path
        return path

    def interpolate(self, value: str, loc: Loc) -> str:
        unread: list[str] = []
        handed_over = False  # a file the caller said systemd hands over: missing is a problem

        def replace(m: re.Match[str]) -> str:
            if m.group("file"):
                path = self.path(m.group("path"))
                try:
                    text = path.read_text().strip()
                    if path.stat().st_mode & 0o077:
                        self.readable_credentials.append(str(path))
                    return text
                except OSError as exc:
                    nonlocal handed_over
                    hint = ""
                    if self.credentials_dir is not None and path.is_relative_to(
                        self.credentials_dir
                    ):
                        handed_over = True
                    elif SYSTEMD_CREDENTIALS.match(str(path)):
                        hint = (
                            " (systemd makes it while the service runs; --credentials-dir DIR"
                            " reads the files it would hand over from DIR)"
                        )
                    unread.append(f"cannot read {path}: {exc.strerror}{hint}")
                    return UNREAD
            var = m.group("var")
            if var in os.environ:
                return os.environ[var]
            if m.group("default") is not None:
                return m.group("default")
            unread.append(
                f"environment variable {var} is not set (write ${{{var}:-}} to allow it empty)"
            )
            return UNREAD

        out = _INTERPOLATION.sub(replace, value)
        if not unread:
            return out
        found = [(loc, message) for message in unread]
        self.failed.append(loc)
        if loc[:1] and loc[0] in self.defer and not handed_over:
            self.unread += found
            return UNREAD_URL if loc == ("store", "url") else out
        self.problems += found
        return ""

    def failed_under(self, loc: Loc) -> bool:
        """Whether a validation problem at `loc` may come from a value that could not be read
        (already reported, or deferred) or its stand-in: the field itself, or a model holding
        it (a model's own check, under its section)."""
        return len(loc) >= 2 and any(f[: len(loc)] == loc for f in self.failed)


def _walk(node: yaml.Node, loc: Loc, marks: dict[Loc, yaml.Mark], resolver: _Resolver) -> Any:
    """Build plain data from a YAML node, remembering where each key stands and interpolating."""
    marks[loc] = node.start_mark
    if isinstance(node, yaml.MappingNode):
        out: dict[Any, Any] = {}
        merged: list[yaml.Node] = []
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: keys written win
                merged += (
                    value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
                )
                continue
            key = key_node.value
            if key in out:
                resolver.problems.append(((*loc, key), "duplicate key"))
            marks[(*loc, key)] = key_node.start_mark
            out[key] = _walk(value_node, (*loc, key), marks, resolver)
            marks[(*loc, key)] = key_node.start_mark
        for source in merged:
            if not isinstance(source, yaml.MappingNode):
                resolver.problems.append((loc, "`<<` merges a mapping only"))
                continue
            for key_node, value_node in source.value:
                if key_node.value not in out:
                    out[key_node.value] = _walk(value_node, (*loc, key_node.value), marks, resolver)
                    marks.setdefault((*loc, key_node.value), key_node.start_mark)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_walk(item, (*loc, i), marks, resolver) for i, item in enumerate(node.value)]
    value = yaml.SafeLoader("").construct_object(node)
    if isinstance(value, str) and "${" in value:
        return resolver.interpolate(value, loc)
    return value


def _key(loc: Loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


class _Problems:
    def __init__(
        self,
        file: str,
        marks: dict[Loc, yaml.Mark],
        skip: Callable[[Loc], bool] | None = None,
    ) -> None:
        self.file, self.marks, self.items = file, marks, list[ConfigProblem]()
        self.skip = skip  # validation problems not to report (an unread credential's stand-in)

    def add(self, loc: Loc, message: str) -> None:
        # The deepest location the YAML has: a missing key is reported at its parent.
        where = loc
        while where and where not in self.marks:
            where = where[:-1]
        mark = self.marks.get(where)
        self.items.append(
            ConfigProblem(
                self.file,
                mark.line + 1 if mark else None,
                mark.column + 1 if mark else None,
                _key(loc),
                message,
            )
        )

    def add_validation(self, prefix: Loc, exc: ValidationError, model: type[BaseModel]) -> None:
        errors = exc.errors()
        # A required key reported missing because it was misspelt: the misspelling says it all.
        misspelt = {
            (*err["loc"][:-1], hint)
            for err in errors
            if err["type"] == "extra_forbidden"
            for hint in difflib.get_close_matches(
                str(err["loc"][-1]), _known_fields(model, tuple(err["loc"][:-1])), n=1
            )
        }
        for err in errors:
            if err["type"] == "missing" and tuple(err["loc"]) in misspelt:
                continue
            err_loc, err_model = tuple(err["loc"]), model
            if err_loc[:1] == ("store",) and len(err_loc) > 1 and err_loc[1] in STORE_KINDS:
                # The store union's tag is no key of the YAML: report under `store.`.
                err_model = _STORE_MODELS[str(err_loc[1])]
                err_loc = err_loc[2:]
                prefix_here: Loc = (*prefix, "store")
            else:
                prefix_here = prefix
            loc = (*prefix_here, *err_loc)
            if self.skip is not None and self.skip(loc):
                continue
            message = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                siblings = _known_fields(err_model, err_loc[:-1])
                hint = difflib.get_close_matches(str(err_loc[-1]), siblings, n=1)
                message = "unknown key" + (f" (did you mean `{hint[0]}`?)" if hint else "")
            elif err["type"] == "missing":
                message = f"required key `{err['loc'][-1]}` is missing"
            elif err["type"] == "literal_error":
                allowed = re.findall(r"'([^']*)'", str(err.get("ctx", {}).get("expected", "")))
                hint = difflib.get_close_matches(str(err["input"]), allowed, n=1)
                message = (
                    f"unknown value {err['input']!r}"
                    + (f" (did you mean `{hint[0]}`?)" if hint else "")
                    + f"; one of: {', '.join(allowed)}"
                )
            self.add(loc, message)


def _known_fields(model: Any, loc: Loc) -> list[str]:
    """Field names valid at `loc` of `model`, for 'did you mean' hints."""
    for part in loc:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            continue
        model = field.annotation
        args = getattr(model, "__args__", ())
        if args:  # dict[str, X] or list[X]
            model = args[-1]
    return list(getattr(model, "model_fields", {}))


def parse_config(
    text: str,
    file: str = "<memory>",
    *,
    base_dir: Path | None = None,
    credentials_dir: Path | None = None,
    defer: tuple[str, ...] = (),
) -> Config:
    """Validate a config given as YAML text; raise ConfigError listing every problem.

    `base_dir`: where relative paths (store.path, ${file:...}, a connector's files) start.
    `defer`: the top-level sections whose unreadable credentials are noted (`Config.unread`)
    instead of refused, for commands that use neither those secrets nor those sections' calls.
    """
    resolver = _Resolver(base_dir, credentials_dir, defer)
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        raise ConfigError(
            [
                ConfigProblem(
                    file,
                    mark.line + 1 if mark else None,
                    mark.column + 1 if mark else None,
                    "(syntax)",
                    str(exc.problem),
                )
            ]
        ) from None
    marks: dict[Loc, yaml.Mark] = {}
    if node is None:  # nothing but comments: surely the wrong file, or an unsaved one
        problems = _Problems(file, marks)
        problems.add((), "the file is empty (config.example.yaml shows every setting)")
        raise ConfigError(problems.items)
    data = _walk(node, (), marks, resolver)
    problems = _Problems(file, marks, skip=resolver.failed_under)
    for loc, message in resolver.problems:
        problems.add(loc, message)
    if not isinstance(data, dict):
        problems.add((), "the config must be a mapping")
        raise ConfigError(problems.items)
    unread = _Problems(file, marks)
    for loc, message in resolver.unread:
        unread.add(loc, message)
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        problems.add_validation((), exc, Config)
        # A stand-in no validator accepts (a port from an unset variable): refused after all.
        raise ConfigError(problems.items or unread.items) from None
    config.source_file = file
    config._marks = marks
    config.unread = [str(p) for p in unread.items]
    if base_dir is not None and config.store.type == "sqlite":
        config.store.path = resolver.path(str(config.store.path))
    _check_connectors(config, data, problems, resolver)
    _check_rules(config, problems)
    _check_sources(config, problems)
    if problems.items:
        raise ConfigError(problems.items)
    from bridge.lint import rule_warnings  # reads the rules' syntax trees

    config.rule_warnings = [str(p) for p in rule_warnings(config)]
    config.readable_credentials = list(dict.fromkeys(resolver.readable_credentials))
    return config


def secret_values(model: Any) -> list[str]:
    """Every secret a config holds (tokens, signing secrets, connector credentials), so that
    the log redactor can hide them wherever they would appear. A store URL's secret is its
    password: the rest (user, host, database) is what every message about the store shows."""
    found: list[str] = []
    if isinstance(model, PostgresStoreConfig):
        found += url_passwords(model.url.get_secret_value())
    elif isinstance(model, SecretStr):
        found.append(model.get_secret_value())
    elif isinstance(model, BaseModel):
        for name in type(model).model_fields:
            found += secret_values(getattr(model, name))
        if isinstance(model, Config):
            found += secret_values(model.connector_settings)
    elif isinstance(model, dict):
        for value in model.values():
            found += secret_values(value)
    elif isinstance(model, list | tuple):
        for value in model:
            found += secret_values(value)
    return [s for s in found if s and s not in (UNREAD, UNREAD_URL)]


def url_passwords(url: str) -> list[str]:
    """The password of a libpq URL (userinfo or `?password=`), as written and decoded."""
    parts = urlsplit(url)
    found = [parts.password or ""]
    for pair in parts.query.split("&"):
        key, _, value = pair.partition("=")
        if unquote(key).strip().lower() == "password":
            found.append(value)
    return [form for p in found if p for form in dict.fromkeys((p, unquote(p)))]


def load_config(
    path: str | Path,
    *,
    credentials_dir: Path | None = None,
    defer: tuple[str, ...] = (),
) -> Config:
    """Read and validate a config file; relative paths in it start from its directory.

    `credentials_dir`: read systemd credentials (`${file:/run/credentials/<unit>/<name>}`)
    from this directory instead (what `LoadCredential=` copies from). `defer`: see
    `parse_config`; `serve` defers nothing.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(
            [ConfigProblem(str(path), None, None, "(file)", exc.strerror or str(exc))]
        ) from None
    config = parse_config(
        text,
        str(path),
        base_dir=path.absolute().parent,
        credentials_dir=credentials_dir,
        defer=defer,
    )
    config.warnings += _secret_warnings(path, text, config)
    return config


def _secret_warnings(path: Path, text: str, config: Config) -> list[str]:
    """A file holding a secret that group or others may read: the config itself when a
    secret is written in it (not read from ${VAR} or ${file:...}), or a credential file."""
    found: list[str] = []
    mode = path.stat().st_mode & 0o777
    if mode & 0o077 and any(s in text for s in secret_values(config)):
        found.append(
            f"{path} holds a secret and is readable by others (mode {mode:04o}): "
            f"chmod 600 {path}, or read the secret from ${{VAR}} or ${{file:...}}"
        )
    for credential in config.readable_credentials:
        mode = Path(credential).stat().st_mode & 0o777
        found.append(
            f"{credential} holds a secret and is readable by others (mode {mode:04o}): "
            f"chmod 600 {credential}"
        )
    return found


def _check_connectors(
    config: Config, data: dict[str, Any], problems: _Problems, resolver: _Resolver
) -> None:
    installed = registry.names()
    for name, entry in config.connectors.items():
        cls = registry.get(entry.type)
        if cls is None:
            hint = difflib.get_close_matches(entry.type, installed, n=1)
            problems.add(
                ("connectors", name, "type"),
                f"unknown connector type {entry.type!r}"
                + (f" (did you mean `{hint[0]}`?)" if hint else "")
                + f"; installed: {', '.join(installed)}",
            )
            continue
        settings = dict(data["connectors"][name])
        for field_name, info in cls.config_model.model_fields.items():
            # A file a connector reads (ca_bundle, private_key_file): as ${file:...} paths.
            value = settings.get(field_name)
            if isinstance(value, str) and value and _is_path(info.annotation):
                settings[field_name] = str(resolver.path(value))
        try:
            config.connector_settings[name] = cls.config_model.model_validate(settings)
        except ValidationError as exc:
            before = len(problems.items)
            problems.add_validation(("connectors", name), exc, cls.config_model)
            if len(problems.items) == before:  # refused for a stand-in only: refused after all
                for loc, message in resolver.unread:
                    if loc[:2] == ("connectors", name):
                        problems.add(loc, message)


def _is_path(annotation: Any) -> bool:
    return annotation is Path or Path in getattr(annotation, "__args__", ())


def _check_rules(config: Config, problems: _Problems) -> None:
    # Imported here: the rule engine needs a validated config, not the other way round.
    from bridge.rules import compile_problems

    for i, rule in enumerate(config.rules):
        if rule.action not in ACTIONS:
            hint = difflib.get_close_matches(rule.action, ACTIONS, n=1)
            problems.add(
                ("rules", i, "action"),
                f"unknown action {rule.action!r}"
                + (f" (did you mean `{hint[0]}`?)" if hint else "")
                + f"; one of: {', '.join(ACTIONS)}",
            )
            continue
        if rule.action != "stop":
            _check_connector(config, problems, i, rule.connector)
        for name, mapping in rule.fields.items():
            for where, message in _mapping_problems(mapping):
                problems.add(("rules", i, "fields", name, *where), message)
        for loc, message in compile_problems(rule):
            problems.add(("rules", i, *loc), message)
    names = [r.name for r in config.rules]
    for i, name in enumerate(names):
        if name in names[:i]:
            problems.add(("rules", i, "name"), f"rule name {name!r} is used twice")


def _check_connector(config: Config, problems: _Problems, i: int, connector: str | None) -> None:
    configured = f"configured: {', '.join(config.connectors) or 'none'}"
    if connector is None:
        problems.add(("rules", i, "connector"), f"a connector is required; {configured}")
    elif connector not in config.connectors:
        hint = difflib.get_close_matches(connector, list(config.connectors), n=1)
        problems.add(
            ("rules", i, "connector"),
            f"no connector named {connector!r}"
            + (f" (did you mean `{hint[0]}`?)" if hint else "")
            + f"; {configured}",
        )


def _mapping_problems(mapping: FieldMapping) -> Iterator[tuple[Loc, str]]:
    """Values a monotonic field could be given that its order does not list: they would never
    be written, which is almost certainly a typo."""
    if mapping.policy != "monotonic":
        return
    order = ", ".join(mapping.order)
    outputs: list[tuple[Loc, Any]] = []
    if mapping.map is not None:
        outputs += [(("map", key), value) for key, value in mapping.map.items()]
    elif not (isinstance(mapping.value, str) and ("{{" in mapping.value or "{%" in mapping.value)):
        outputs.append((("value",), mapping.value))
    if mapping.default is not None:
        outputs.append((("default",), mapping.default))
    for where, value in outputs:
        if str(value) not in mapping.order:
            hint = difflib.get_close_matches(str(value), mapping.order, n=1)
            yield (
                where,
                f"{value!r} is not in the order ({order})"
                + (f" (did you mean `{hint[0]}`?)" if hint else ""),
            )


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _check_sources(
    config: Config, problems: _Problems, host: str | None = None, option: str = ""
) -> None:
    # A source without a token accepts anyone who reaches it: allowed only for the machine
    # itself, so only while the daemon listens on loopback and no proxy passes requests on.
    server = config.server
    host = server.host if host is None else host
    if server.trusted_proxies:
        reason = (
            "when server.trusted_proxies is set (a proxy passes on anyone's requests,"
            " from its own address)"
        )
    elif not _is_loopback(host):
        reason = f"when listening on {host}{option} (not loopback)"
    else:
        return
    for name, source in config.sources.items():
        if not source.active_tokens() and source.signature is None:
            problems.add(
                ("sources", name, "tokens"), f"a token or a signature is required {reason}"
            )


def listen_problems(config: Config, host: str) -> list[ConfigProblem]:
    """The sources' problems when the daemon listens on `host` (`serve --host`) instead of
    server.host: the command line gets the check the config file gets."""
    problems = _Problems(config.source_file, config._marks)
    _check_sources(config, problems, host, " (--host)")
    return problems.items


def json_schema() -> dict[str, Any]:
    """The JSON Schema of config.yaml (`crm-bridge schema`), for editors to complete and check
    it: the models above, each installed connector's own settings under `connectors:` (picked
    by `type`), and none of the fields the loader fills in."""
    from pydantic.json_schema import models_json_schema

    models: list[type[BaseModel]] = [Config]
    connector_models = {name: registry.get(name) for name in registry.names()}
    models += [cls.config_model for cls in connector_models.values() if cls is not None]
    refs, schema = models_json_schema([(m, "validation") for m in models], title="crm-bridge")
    defs = schema["$defs"]
    config = defs["Config"]
    for name, field in Config.model_fields.items():
        if field.exclude:
            config["properties"].pop(name, None)
    choices = [
        refs[(cls.config_model, "validation")]
        for cls in connector_models.values()
        if cls is not None
    ]
    config["properties"]["connectors"] = {
        "type": "object",
        "description": "Connectors by name; each one's `type` picks its settings.",
        "additionalProperties": {"oneOf": choices},
    }
    defs.pop("ConnectorEntry", None)
    # A field is written as a bare value (`hs_lead_status: OPEN`) or as a mapping.
    bare = {"type": ["string", "number", "integer", "boolean", "null", "array"]}
    defs["RuleConfig"]["properties"]["fields"]["additionalProperties"] = {
        "anyOf": [{"$ref": "#/$defs/FieldMapping"}, bare]
    }
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "crm-bridge config.yaml",
        "$ref": "#/$defs/Config",
        "$defs": defs,
    }
