"""Typed models at every boundary: the webhook payload (ingest), events and deliveries (core).

The payload models keep every field they do not know (`extra="allow"`): platforms add fields
without notice, and rules may refer to them.
"""

from __future__ import annotations

import enum
import hashlib
from datetime import datetime
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from bridge.staleness import Ledger
from connectors.base import Operation

# What Supersend documents; newer versions also send `sent`, `unsubscribe` and `finished`, which
# are accepted and stored like any other string (they match no rule unless a rule asks for them).
KNOWN_EVENT_TYPES = ("open", "click", "reply", "bounce", "interest", "appointment")


def refuse_nul(value: str | None) -> str | None:
    """The value, unless it holds a NUL character: PostgreSQL's text columns cannot store one
    (SQLite can), so a field that becomes a column refuses it on both backends alike, with a
    4xx the sender sees, rather than a store error at every retry. (The body column holds the
    JSON text, where a NUL can only be the escape `\\u0000`: stored as it is.)"""
    if value is not None and "\x00" in value:
        raise ValueError("must not contain a NUL character (\\u0000)")
    return value


def normalise_email(value: object) -> str | None:
    """Trimmed and lower-cased: CRMs match emails case-insensitively, and a stray space would
    otherwise create a second record. Empty is None; anything without a local part and a
    domain is refused."""
    if not isinstance(value, str):
        return None  # the model's type check has refused anything but a string or null
    value = value.strip().lower()
    if not value:
        return None
    local, at, domain = value.rpartition("@")
    if not at or not local or not domain:
        raise ValueError("not an email address")
    return value


class ContactSender(BaseModel):
    """The mailbox that sent the campaign message."""

    model_config = ConfigDict(extra="allow")

    id: str | None = None
    provider: str | None = None
    send_as: str | None = None
    email: str | None = None


class Contact(BaseModel):
    """The platform's full contact record, as sent with every event."""

    model_config = ConfigDict(extra="allow")

    # Ids are strings: the platform's own documentation sample has ids that are not valid UUIDs.
    id: str | None = None
    email: str | None = None
    first_name: str | None = None
    last_name: str | None = None
    title: str | None = None
    phone: str | None = None
    company_name: str | None = None
    interest: str | None = None
    appointment: bool | None = None
    clicked: bool | None = None
    opened: bool | None = None
    replied: bool | None = None
    bounced: bool | None = None
    custom: dict[str, Any] | None = None
    createdAt: datetime | None = None
    updatedAt: datetime | None = None
    Sender: ContactSender | None = None

    @field_validator("email")
    @classmethod
    def _normalise_email(cls, value: str | None) -> str | None:
        return normalise_email(refuse_nul(value))


class WebhookPayload(BaseModel):
    """One contact event as the platform POSTs it."""

    model_config = ConfigDict(extra="allow")

    type: str = Field(min_length=1, max_length=64)
    CampaignId: str | None = None
    contact: Contact

    @field_validator("type")
    @classmethod
    def _no_nul(cls, value: str) -> str:
        refuse_nul(value)  # stored as a column (events.type)
        return value


class DeliveryStatus(enum.StrEnum):
    """Where a delivery stands; only `pending` and `in_flight` are unfinished."""

    PENDING = "pending"
    IN_FLIGHT = "in_flight"
    DONE = "done"
    DRY_RUN = "dry_run"
    DEAD = "dead"
    # Finished with nothing to write, by the rules' design: newer events decided every field,
    # or the record to update does not exist (`if_missing`). Counted, never a dead letter.
    SKIPPED = "skipped"
    # Its record does not exist yet: waits (without holding the contact's other deliveries
    # back) for the delivery that creates it, until `next_attempt_at` at the latest.
    AWAITING = "awaiting"


UNFINISHED = (DeliveryStatus.PENDING, DeliveryStatus.IN_FLIGHT, DeliveryStatus.AWAITING)


class NewEvent(BaseModel):
    """An accepted webhook, ready to be stored. Its id is its idempotency key."""

    id: str
    source: str
    type: str
    email: str | None
    received_at: float
    # The contact's `updatedAt` (else the receive time): a contact's deliveries are applied in
    # this order, and one older than what a CRM already has is skipped.
    sort_at: float
    body: str


class StoredEvent(BaseModel):
    """A stored event waiting for the rules."""

    id: str
    source: str
    body: str
    received_at: float
    sort_at: float


class NewDelivery(BaseModel):
    """A delivery produced by a rule, stored in the same transaction as its event.

    The operation is frozen here, so a rule edited later never changes what was queued.
    """

    rule: str
    connector: str
    action: str
    contact_key: str
    operation: Operation


class Routed(BaseModel):
    """What the rules made of one stored event: its deliveries, and notes for the user."""

    event_id: str
    sort_at: float
    deliveries: list[NewDelivery]
    notes: list[str] = Field(default_factory=list)


class Delivery(NewDelivery):
    """A stored delivery as the worker sees it after claiming it."""

    id: int
    event_id: str
    status: DeliveryStatus
    attempts: int
    created_at: float
    next_attempt_at: float
    sort_at: float
    horizon_start: float
    last_error: str | None = None
    result: dict[str, Any] | None = None


class ClaimedGroup(BaseModel):
    """The claimed deliveries of one contact on one connector: one write, in `sort_at` order.

    More than one when the contact had a burst queued (coalescing); `applied_sort_at` and
    `record_id` are what the connector last confirmed for this contact.
    """

    deliveries: list[Delivery]
    applied_sort_at: float | None = None
    record_id: str | None = None
    ledger: Ledger = Field(default_factory=Ledger)  # which event decided each field

    @property
    def head(self) -> Delivery:
        return self.deliveries[0]

    @property
    def ids(self) -> list[int]:
        return [d.id for d in self.deliveries]


class Finish(BaseModel):
    """How claimed deliveries ended; the store records a batch of these in one transaction.

    Each delivery's outcome is recorded only under the claim it was sent under: `claims` holds,
    in `delivery_ids`' order, each delivery's `attempts` as that claim left it (every claim
    counts one more). A delivery another instance has claimed since (its lease ran out here)
    keeps that instance's state; nor is an outcome recorded for a delivery deleted meanwhile.
    """

    delivery_ids: list[int]
    claims: list[int]
    status: DeliveryStatus  # pending means "retry at next_attempt_at"
    result: dict[str, Any] | None = None
    error: str | None = None
    next_attempt_at: float | None = None
    # On success: what the CRM now holds for the contact.
    connector: str | None = None
    contact_key: str | None = None
    record_id: str | None = None
    applied_sort_at: float | None = None
    ledger: Ledger | None = None  # the contact's field ledger after this write (None: as it was)

    @model_validator(mode="after")
    def _one_claim_per_delivery(self) -> Finish:
        if len(self.claims) != len(self.delivery_ids):
            raise ValueError("one claim per delivery id")
        return self

    @classmethod
    def of(cls, deliveries: list[Delivery], **fields: Any) -> Finish:
        """The outcome of these claimed deliveries, under the claims they were sent under."""
        return cls(
            delivery_ids=[d.id for d in deliveries],
            claims=[d.attempts for d in deliveries],
            **fields,
        )


class IngestResult(BaseModel):
    """What the store did with an event: its id, and whether it had it already."""

    event_id: str
    duplicate: bool


def idempotency_key(source: str, data: Any) -> str:
    """A key equal for equal payloads, whatever their key order or white space.

    The platform documents no delivery id and may resend, so the content is the identity.
    128 bits of SHA-256 over the canonical JSON: collisions are not a practical concern.
    """
    canonical = orjson.dumps(data, option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(source.encode() + b"\n" + canonical).hexdigest()[:32]
