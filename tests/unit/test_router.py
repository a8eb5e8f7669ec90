"""The router keeps routing whatever one event does to the rules."""

from __future__ import annotations

import json

from bridge.config import RuleConfig
from bridge.models import NewEvent
from bridge.router import Router
from bridge.rules import RuleSet
from bridge.store.sqlite import SqliteStore

RULE = RuleConfig.model_validate(
    {"name": "all", "when": "true", "connector": "hubspot", "action": "upsert_contact"}
)


class BrokenOnBounces(RuleSet):
    """Rules with a bug that only bounces reach (a stand-in for any unforeseen failure)."""

    def evaluate(self, context, event_id="", occurred_at=0.0):  # type: ignore[no-untyped-def]
        if context.get("type") == "bounce":
            raise RuntimeError("a bug")
        return super().evaluate(context, event_id, occurred_at)


def stored(key: str, type_: str, email: str) -> NewEvent:
    body = json.dumps({"type": type_, "contact": {"email": email}})
    return NewEvent(
        id=key, source="s", type=type_, email=email, received_at=1.0, sort_at=1.0, body=body
    )


async def test_an_event_the_rules_fail_on_is_routed_with_a_note_and_the_rest_go_on(tmp_path):
    store = SqliteStore(tmp_path / "bridge.db")
    await store.open()
    try:
        for key, type_ in (("k1", "reply"), ("k2", "bounce"), ("k3", "reply")):
            await store.ingest(stored(key, type_, f"{key}@example.com"))
        router = Router(store, BrokenOnBounces([RULE]), on_routed=lambda _: None)

        assert await router.route_once() == 3

        events = {k: await store.event(k) for k in ("k1", "k2", "k3")}
        assert [len(events[k]["deliveries"]) for k in ("k1", "k2", "k3")] == [1, 0, 1]
        assert events["k2"]["notes"] == ["the rules failed on this event (RuntimeError: a bug)"]
        assert await store.unrouted(10) == []
    finally:
        await store.close()
