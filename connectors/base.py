"""The interface every CRM connector implements, and the typed values that cross it.

A connector knows its CRM and nothing about queues or rules: it receives one `LeadUpsert`,
writes it, and answers a `DeliveryResult` or raises `RetryableDelivery`/`PermanentDelivery`
(bridge.errors). Both CRM SDKs block, so connectors call them through `run_blocking`, on a
thread pool of the connector's own size: the event loop never stalls and threads stay bounded.
"""

from __future__ import annotations

import abc
import asyncio
import functools
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from bridge.errors import DeliveryError, PermanentDelivery, RetryableDelivery
from bridge.ratelimit import RateLimiter

T = TypeVar("T")


class ConnectorConfig(BaseModel):
    """Settings every connector has; each connector extends it with its own."""

    model_config = ConfigDict(extra="forbid")

    type: str
    max_concurrency: int = Field(default=4, ge=1, le=64)
    timeout: float = Field(default=30.0, gt=0, description="seconds for one HTTP call")
    ca_bundle: Path | None = Field(
        default=None, description="CA file to trust instead of the system's (private CAs, tests)"
    )

    def has_credentials(self) -> bool:
        """False when nothing to log in with is configured: the connector then runs dry."""
        return True


class FieldInfo(BaseModel):
    """One CRM field as the CRM describes it (Salesforce describe, HubSpot properties API)."""

    name: str
    label: str = ""
    # The CRM's own type name, e.g. "picklist", "boolean", "date" (Salesforce) or
    # "enumeration", "bool", "datetime" (HubSpot).
    type: str
    options: tuple[str, ...] | None = None  # the values of a picklist/enumeration
    # Only `options` are accepted (a restricted picklist, an enumeration); False: they are
    # suggestions and any text goes (a Salesforce combobox or unrestricted picklist).
    restricted: bool = True
    writable: bool = True
    max_length: int | None = None


class WritePolicy(BaseModel):
    """When a mapped field may be written over what the CRM already holds.

    `always` (the default) writes; `if_empty` never overwrites a value someone typed in the CRM;
    `on_create` writes only into a record this delivery creates; `monotonic` moves only forward
    along `order` (a late `open` never undoes a `reply`).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Literal["always", "if_empty", "on_create", "monotonic"] = "always"
    order: tuple[str, ...] = ()


class LeadUpsert(BaseModel):
    """Create the record keyed by `id_value`, or update it if the CRM has it already."""

    model_config = ConfigDict(extra="forbid")

    op: Literal["upsert"] = "upsert"
    object: Literal["lead", "contact"] = "lead"
    # The CRM field that identifies the record; None means the CRM's email field.
    id_property: str | None = None
    id_value: str
    fields: dict[str, Any] = Field(default_factory=dict)
    # The CRM's id for this record if an earlier delivery found or created it: lets a connector
    # skip its lookup. A hint only: the record may have been deleted or merged since.
    record_id: str | None = None
    # Per-field write policies; a field not named here is written always.
    policies: dict[str, WritePolicy] = Field(default_factory=dict)
    # False: update an existing record only (e.g. a status change); a missing one is skipped.
    create: bool = True
    # HubSpot: also open a Lead object with these properties (hs_lead_name defaults to the
    # contact's name, else its email) associated with the contact, unless it has one already.
    # Other CRMs ignore it.
    hubspot_lead: dict[str, Any] | None = None
    # An update-only write finding no record: what the delivery engine does (the rule's).
    if_missing: Literal["wait", "skip", "dead_letter"] = "wait"

    def guarded(self) -> dict[str, WritePolicy]:
        """The fields whose policy needs the record's current values before writing."""
        return {k: p for k, p in self.policies.items() if p.mode != "always" and k in self.fields}


class Activity(BaseModel):
    """Log something that happened (a reply, a booked meeting) on a record's timeline.

    `key` is stable across redeliveries of the same delivery: a connector that is asked again
    (`attempt` > 1, so an earlier attempt may have written it before a crash or a timeout)
    looks for an activity carrying that key before creating one, so it is logged once.
    """

    model_config = ConfigDict(extra="forbid")

    op: Literal["activity"] = "activity"
    kind: Literal["note", "task"] = "note"
    object: Literal["lead", "contact"] = "contact"
    id_property: str | None = None
    id_value: str
    subject: str
    body: str = ""
    occurred_at: float  # epoch seconds
    key: str
    record_id: str | None = None
    attempt: int = 1
    # No record to log on: what the delivery engine does (the rule's `if_missing`).
    if_missing: Literal["wait", "skip", "dead_letter"] = "wait"


Operation = Annotated[LeadUpsert | Activity, Field(discriminator="op")]


class DeliveryResult(BaseModel):
    """What the CRM did: the record's id, whether it was created, anything worth keeping."""

    record_id: str | None = None
    created: bool | None = None
    dry_run: bool = False
    # Why nothing was written (an update-only write finding no record): the delivery is
    # finished as skipped, not done.
    skipped: str | None = None
    # With `skipped`: the record to update or log on does not exist (yet). The delivery engine
    # decides what that means (wait for the delivery that creates it, skip, or dead-letter:
    # the rule's `if_missing`), so connectors report it rather than raise.
    missing: bool = False
    detail: dict[str, Any] = Field(default_factory=dict)


class Pause(BaseModel):
    """A connector holding its calls back, for status and metrics: why, and until when."""

    kind: Literal["rate_limit", "daily_allocation", "concurrency", "configuration", "auth"]
    reason: str
    until: float  # epoch seconds (wall clock)


class Connector(abc.ABC):
    """One configured CRM account. Subclasses set `name` and `config_model`."""

    name: ClassVar[str]
    config_model: ClassVar[type[ConnectorConfig]] = ConnectorConfig
    # How many records one `upsert_leads` call may carry (the CRM's batch size).
    max_batch: ClassVar[int] = 1
    # How many activities one `log_activities` call may carry.
    max_activity_batch: ClassVar[int] = 1
    # The client-side limiter every HTTP call of this connector waits on, or None; the delivery
    # engine reads `limiter.waited_seconds` for its metrics.
    limiter: RateLimiter | None = None

    def __init__(self, instance: str, config: ConnectorConfig) -> None:
        self.instance = instance
        self.config = config
        self._executor: ThreadPoolExecutor | None = None

    async def open(self) -> None:
        """Log in and build SDK clients. Optional."""

    async def verify(self) -> None:
        """Check the credentials with one cheap call; raise `AuthenticationFailed` if the CRM
        refuses them, so readiness shows it before the first delivery does. Optional."""

    async def close(self) -> None:
        """Release what `open` built. Subclasses calling super() get the pool shut down."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    @abc.abstractmethod
    async def upsert_lead(self, lead: LeadUpsert) -> DeliveryResult:
        """Create or update one lead or contact, keyed by its id property."""

    async def upsert_leads(self, leads: list[LeadUpsert]) -> list[DeliveryResult | DeliveryError]:
        """Create or update up to `max_batch` records, with one outcome per record, in order.

        A failure of one record is its outcome; a failure of the whole request (network,
        429, 5xx) raises. The default sends them one by one.
        """
        if len(leads) == 1:
            return [await self.upsert_lead(leads[0])]  # its failure is the whole call's
        outcomes: list[DeliveryResult | DeliveryError] = []
        for lead in leads:
            try:
                outcomes.append(await self.upsert_lead(lead))
            except DeliveryError as exc:
                outcomes.append(exc)
        return outcomes

    async def log_activity(self, activity: Activity) -> DeliveryResult:
        """Log an activity on the record keyed by `id_value` (or `record_id`, when known);
        once, whatever the attempt. No such record: `DeliveryResult(skipped=..., missing=True)`."""
        raise PermanentDelivery(f"the {self.name} connector cannot log activities")

    async def log_activities(self, activities: list[Activity]) -> list[Outcome]:
        """Log up to `max_activity_batch` activities, one outcome each, in order (as
        `upsert_leads`). The default logs them one by one."""
        if len(activities) == 1:
            return [await self.log_activity(activities[0])]
        outcomes: list[Outcome] = []
        for activity in activities:
            try:
                outcomes.append(await self.log_activity(activity))
            except DeliveryError as exc:
                outcomes.append(exc)
        return outcomes

    def implicit_policies(self) -> dict[str, WritePolicy]:
        """Fields the CRM itself only moves forward (HubSpot's `lifecyclestage`), as monotonic
        policies: the delivery engine applies them to any write whose rule gave the field no
        policy, so that merges and out-of-order deliveries keep the CRM's rule too."""
        return {}

    def pauses(self) -> list[Pause]:
        """What holds this connector's calls back now (rate limit, spent allocation, ...),
        for `/status`, `crm-bridge status` and the metrics."""
        return []

    async def describe(self, object: str, reload: bool = False) -> dict[str, FieldInfo]:
        """The fields of `object` ("lead", "contact", "note", "task") as the CRM describes
        them, cached by the connector (`reload` refreshes). `check --online` needs it."""
        raise PermanentDelivery(f"the {self.name} connector cannot describe its fields")

    def forget_schema(self) -> None:
        """Drop cached describe/properties data, so the next write reads the CRM's fields
        again (a reload calls it: the admin may have added a field or a picklist value)."""

    async def current(self, lead: LeadUpsert, names: list[str]) -> dict[str, Any] | None:
        """The record `lead` would write to, as the CRM holds it now: the values of `names`
        (None for an empty one), or None when there is no such record. Write policies and
        `simulate --online` need it; a connector that cannot read raises `PermanentDelivery`."""
        raise PermanentDelivery(f"the {self.name} connector cannot read records")

    async def run_blocking(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a blocking SDK call on this connector's own bounded thread pool."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(
                max_workers=self.config.max_concurrency, thread_name_prefix=self.instance
            )
        loop = asyncio.get_running_loop()
        call = functools.partial(fn, *args, **kwargs)
        # The SDK call carries its own transport timeout; this outer one is a little longer, so a
        # call that hangs below the SDK cannot hold a delivery forever.
        return await asyncio.wait_for(
            loop.run_in_executor(self._executor, call), self.config.timeout * 2 + 5
        )


Outcome = DeliveryResult | DeliveryError


def _empty(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def apply_policies(
    lead: LeadUpsert, current: dict[str, Any] | None
) -> tuple[dict[str, Any], dict[str, str]]:
    """The fields to write given the record's `current` values (None: it does not exist yet),
    and, for each field held back, why. Connectors and `simulate --online` share this."""
    if current is None:
        return dict(lead.fields), {}
    write: dict[str, Any] = {}
    held: dict[str, str] = {}
    for name, value in lead.fields.items():
        policy = lead.policies.get(name, WritePolicy())
        now = current.get(name)
        if policy.mode == "on_create":
            held[name] = "on_create: the record exists"
        elif policy.mode == "if_empty" and not _empty(now):
            held[name] = f"if_empty: the CRM holds {now!r}"
        elif policy.mode == "monotonic" and not forward(policy.order, now, value):
            held[name] = f"monotonic: {value!r} is not after {now!r}"
        else:
            write[name] = value
    return write, held


def combine(into: LeadUpsert | None, later: LeadUpsert) -> LeadUpsert:
    """Two writes of one record as one, leaving what the two in sequence would leave: each
    field takes the later write's value and policy, except where that policy would hold it
    back over the earlier value (a monotonic value that is not further along, so a late `open`
    merged after a `reply` undoes nothing; an `if_empty` or `on_create` value after a value
    that is not empty). The result creates a missing record if either would."""
    if into is None:
        return later
    fields = dict(into.fields)
    policies = dict(into.policies)
    for name, value in later.fields.items():
        policy = later.policies.get(name)
        if policy is not None and name in fields:
            earlier = fields[name]
            if policy.mode == "monotonic" and not forward(policy.order, earlier, value):
                continue
            if policy.mode in ("if_empty", "on_create") and not _empty(earlier):
                continue
        fields[name] = value
        if policy is None:
            policies.pop(name, None)
        else:
            policies[name] = policy
    return into.model_copy(
        update={
            "fields": fields,
            "policies": policies,
            "create": into.create or later.create,
            "hubspot_lead": later.hubspot_lead or into.hubspot_lead,
        }
    )


def forward(order: tuple[str, ...], now: Any, new: Any) -> bool:
    """True when `new` is later than `now` along `order`, in any case (a CRM may store an
    option in its own spelling). A current value outside the order (empty, or one a rep
    chose) is before its start; a new value outside it never moves."""
    folded = [str(o).casefold() for o in order]
    new_text, now_text = str(new).casefold(), str(now).casefold()
    if new_text not in folded:
        return False
    if _empty(now) or now_text not in folded:
        return True
    return folded.index(new_text) > folded.index(now_text)


Outcomes = list[Outcome | None]


async def per_record(
    count: int, crm: str, send: Callable[[Outcomes], Awaitable[None]]
) -> list[Outcome]:
    """Run `send`, which fills in one outcome per record as the CRM answers, and complete them.

    A failure of a whole call raises when no record has an outcome yet (the delivery engine
    then retries the batch); once some have landed it becomes the outcome of the records left.
    """
    outcomes: Outcomes = [None] * count
    try:
        await send(outcomes)
    except DeliveryError as exc:
        if all(o is None for o in outcomes):
            raise
        outcomes = [exc if o is None else o for o in outcomes]
    missing = RetryableDelivery(f"{crm} returned no result for this record")
    return [missing if o is None else o for o in outcomes]


def fit_text(text: str, render: Callable[[str], str], limit: int) -> str:
    """`render(text)`, the text shortened (ending in "…") until the result fits in `limit`
    characters: CRM text fields have hard limits, and the render may add markup or a marker."""
    out = render(text)
    while len(out) > limit and text:
        text = text[: max(0, len(text) - (len(out) - limit) - 1)]
        out = render(text + "…" if text else "")
    return out


class DryRunConnector(Connector):
    """Stands in for a connector that has no credentials: logs and keeps what it would write."""

    name = "dry-run"
    max_batch = 100

    def __init__(self, instance: str, config: ConnectorConfig) -> None:
        super().__init__(instance, config)
        self.crm = config.type

    async def log_activity(self, activity: Activity) -> DeliveryResult:
        operation = {"crm": self.crm, "operation": "log_activity", **activity.model_dump()}
        return DeliveryResult(dry_run=True, detail={"would_write": operation})

    async def upsert_lead(self, lead: LeadUpsert) -> DeliveryResult:
        # The options a plain upsert does not use are shown only when a rule set them.
        unset = {
            name
            for name in ("policies", "create", "hubspot_lead", "if_missing")
            if getattr(lead, name)
            == LeadUpsert.model_fields[name].get_default(call_default_factory=True)
        }
        operation = {
            "crm": self.crm,
            "operation": "upsert_lead",
            **lead.model_dump(mode="json", exclude=unset),
        }
        # The delivery worker logs it and the store keeps it with the delivery.
        return DeliveryResult(dry_run=True, detail={"would_write": operation})
