"""The router keeps routing whatever one event does to the rules."""

from __future__ import annotations

import asyncio
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


class FailingOnce(SqliteStore):
    """A store whose first routing write fails with a bug's exception."""

    failed = False

    async def route(self, routed, now, delay=0.0):  # type: ignore[no-untyped-def]
        if not self.failed:
            self.failed = True
            raise RuntimeError("a bug")
        return await super().route(routed, now, delay)


async def test_a_failing_batch_is_retried_and_routing_goes_on(tmp_path):
    store = FailingOnce(tmp_path / "bridge.db")
    await store.open()
    router = Router(store, RuleSet([RULE]), on_routed=lambda _: None, poll_interval=0.01)
    try:
        await store.ingest(stored("k1", "reply", "k1@example.com"))
        router.start()

        async def routed() -> None:
            while await store.unrouted(10):
                await asyncio.sleep(0.01)

        await asyncio.wait_for(routed(), 10)
        assert store.failed
        assert len((await store.event("k1"))["deliveries"]) == 1
    finally:
        await router.stop()
        await store.close()
