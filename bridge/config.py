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
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit, urlunsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
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


class SourceConfig(_Strict):
    kind: Literal["supersend"] = "supersend"
    # Several tokens may be active at once, so one can be rotated without downtime.
    tokens: list[SecretStr] = Field(default_factory=list)


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
        """The URL without its password, for logs and `status`."""
        parts = urlsplit(self.url.get_secret_value())
        netloc = parts.netloc
        if "@" in netloc:
            user, _, host = netloc.rpartition("@")
            netloc = f"{user.partition(':')[0]}@{host}" if user else host
        return urlunsplit(parts._replace(netloc=netloc))


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


class RuleConfig(_Strict):
    name: str = Field(min_length=1)
    when: str = Field(min_length=1, description="Jinja2 expression, e.g. type == 'reply'")
    connector: str
    action: Literal["upsert_lead", "upsert_contact", "log_activity"] = "upsert_lead"
    # The CRM field that identifies the record (None: the CRM's email field), and its value.
    id_property: str | None = None
    id_value: str = "{{ contact.email }}"
    fields: dict[str, Any] = Field(default_factory=dict)
    activity: ActivityConfig | None = None

    @model_validator(mode="after")
    def _activity_goes_with_log_activity(self) -> RuleConfig:
        if self.action == "log_activity" and self.activity is None:
            raise ValueError("action log_activity needs an `activity:` (subject, body)")
        if self.action != "log_activity" and self.activity is not None:
            raise ValueError(f"`activity:` is only for action log_activity, not {self.action}")
        return self


class LoggingConfig(_Strict):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["json", "text", "auto"] = "auto"


class Config(_Strict):
    server: ServerConfig = Field(default_factory=ServerConfig)
    sources: dict[str, SourceConfig] = Field(default_factory=lambda: {"supersend": SourceConfig()})
    store: StoreConfig = Field(default_factory=SqliteStoreConfig)
    delivery: DeliveryConfig = Field(default_factory=DeliveryConfig)
    connectors: dict[str, ConnectorEntry] = Field(default_factory=dict)
    rules: list[RuleConfig] = Field(default_factory=list)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)

    # Filled by the loader: each connector's settings, validated by its own class's model.
    connector_settings: dict[str, ConnectorConfig] = Field(default_factory=dict, exclude=True)
    source_file: str = Field(default="<memory>", exclude=True)


# ${VAR}, ${VAR:-default}, ${file:/path}
_INTERPOLATION = re.compile(
    r"\$\{(?:(?P<file>file):(?P<path>[^}]+)|(?P<var>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>[^}]*))?)\}"
)


def _interpolate(value: str, loc: Loc, problems: list[tuple[Loc, str]]) -> str:
    def replace(m: re.Match[str]) -> str:
        if m.group("file"):
            try:
                return Path(m.group("path")).read_text().strip()
            except OSError as exc:
                problems.append((loc, f"cannot read {m.group('path')}: {exc.strerror}"))
                return ""
        var = m.group("var")
        if var in os.environ:
            return os.environ[var]
        if m.group("default") is not None:
            return m.group("default")
        problems.append(
            (loc, f"environment variable {var} is not set (write ${{{var}:-}} to allow it empty)")
        )
        return ""

    return _INTERPOLATION.sub(replace, value)


def _walk(
    node: yaml.Node, loc: Loc, marks: dict[Loc, yaml.Mark], problems: list[tuple[Loc, str]]
) -> Any:
    """Build plain data from a YAML node, remembering where each key stands and interpolating."""
    marks[loc] = node.start_mark
    if isinstance(node, yaml.MappingNode):
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = key_node.value
            if key in out:
                problems.append(((*loc, key), "duplicate key"))
            marks[(*loc, key)] = key_node.start_mark
            out[key] = _walk(value_node, (*loc, key), marks, problems)
            marks[(*loc, key)] = key_node.start_mark
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_walk(item, (*loc, i), marks, problems) for i, item in enumerate(node.value)]
    value = yaml.SafeLoader("").construct_object(node)
    if isinstance(value, str) and "${" in value:
        return _interpolate(value, loc, problems)
    return value


def _key(loc: Loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


class _Problems:
    def __init__(self, file: str, marks: dict[Loc, yaml.Mark]) -> None:
        self.file, self.marks, self.items = file, marks, list[ConfigProblem]()

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
        for err in exc.errors():
            err_loc, err_model = tuple(err["loc"]), model
            if err_loc[:1] == ("store",) and len(err_loc) > 1 and err_loc[1] in STORE_KINDS:
                # The store union's tag is no key of the YAML: report under `store.`.
                err_model = _STORE_MODELS[str(err_loc[1])]
                err_loc = err_loc[2:]
                prefix_here: Loc = (*prefix, "store")
            else:
                prefix_here = prefix
            loc = (*prefix_here, *err_loc)
            message = err["msg"]
            if err["type"] == "extra_forbidden":
                siblings = _known_fields(err_model, err_loc[:-1])
                hint = difflib.get_close_matches(str(err_loc[-1]), siblings, n=1)
                message = "unknown key" + (f" (did you mean `{hint[0]}`?)" if hint else "")
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


def parse_config(text: str, file: str = "<memory>") -> Config:
    """Validate a config given as YAML text; raise ConfigError listing every problem."""
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
    raw: list[tuple[Loc, str]] = []
    data = _walk(node, (), marks, raw) if node is not None else {}
    problems = _Problems(file, marks)
    for loc, message in raw:
        problems.add(loc, message)
    if not isinstance(data, dict):
        problems.add((), "the config must be a mapping")
        raise ConfigError(problems.items)
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        problems.add_validation((), exc, Config)
        raise ConfigError(problems.items) from None
    config.source_file = file
    _check_connectors(config, data, problems)
    _check_rules(config, problems)
    _check_sources(config, problems)
    if problems.items:
        raise ConfigError(problems.items)
    return config


def load_config(path: str | Path) -> Config:
    """Read and validate a config file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(
            [ConfigProblem(str(path), None, None, "(file)", exc.strerror or str(exc))]
        ) from None
    return parse_config(text, str(path))


def _check_connectors(config: Config, data: dict[str, Any], problems: _Problems) -> None:
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
        try:
            config.connector_settings[name] = cls.config_model.model_validate(
                data["connectors"][name]
            )
        except ValidationError as exc:
            problems.add_validation(("connectors", name), exc, cls.config_model)


def _check_rules(config: Config, problems: _Problems) -> None:
    # Imported here: the rule engine needs a validated config, not the other way round.
    from bridge.rules import compile_problems

    for i, rule in enumerate(config.rules):
        if rule.connector not in config.connectors:
            hint = difflib.get_close_matches(rule.connector, list(config.connectors), n=1)
            problems.add(
                ("rules", i, "connector"),
                f"no connector named {rule.connector!r}"
                + (f" (did you mean `{hint[0]}`?)" if hint else "")
                + f"; configured: {', '.join(config.connectors) or 'none'}",
            )
        for loc, message in compile_problems(rule):
            problems.add(("rules", i, *loc), message)
    names = [r.name for r in config.rules]
    for i, name in enumerate(names):
        if name in names[:i]:
            problems.add(("rules", i, "name"), f"rule name {name!r} is used twice")


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _check_sources(config: Config, problems: _Problems) -> None:
    # A source without a token accepts anyone: allowed only while the daemon listens on loopback.
    if _is_loopback(config.server.host):
        return
    for name, source in config.sources.items():
        if not [t for t in source.tokens if t.get_secret_value()]:
            problems.add(
                ("sources", name, "tokens"),
                f"a token is required when listening on {config.server.host} (not loopback)",
            )
